"""
Shared pytest fixtures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.downstream import RecordingHandler, _Controller
from tests.pg import postgres_server  # noqa: F401  (a fixture)
from tests.storefixtures import (  # noqa: F401  (fixtures)
    backend,
    location,
    store,
    threadpool,
)


@pytest.fixture
def smtpd() -> Iterator[Callable[..., _Controller]]:
    """
    Start aiosmtpd servers on 127.0.0.1:0; all are stopped at teardown.
    """
    started: list[_Controller] = []

    def start(handler: RecordingHandler, **kwargs: Any) -> _Controller:
        controller = _Controller(handler, hostname="127.0.0.1", port=0, **kwargs)
        controller.start()
        started.append(controller)
        return controller

    yield start
    for controller in started:
        controller.stop()
