# -*- test-case-name: tests.test_loop -*-
"""
The processed marker at run time: the cluster's secret, minting a marker
for a copy, and counting the valid markers of a message that arrives.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from mdgateway.message.marker import (
    load_or_create_secret,
    make_marker,
    read_markers,
    scan_markers,
)

log = Logger()


class ILoopGuard(Interface):
    """
    The processed-marker seam of the queue manager.
    """

    def make(copy_id: str, now: float, body: bytes) -> str:  # noqa: N805
        """
        Our marker value for a copy id, a time and a body digest.
        """

    def count_valid(path: str, now: float, body: bytes | None) -> int:  # noqa: N805
        """
        How many valid markers of ours the spooled file at C{path} carries
        (blocking); C{body} is its body digest when already known.
        """


class SecretNotLoadedError(RuntimeError):
    """
    A marker was asked for before the secret was loaded: a wiring mistake.
    """


@implementer(ILoopGuard)
class MarkerLoopGuard:
    """
    Markers keyed with the secret every instance of the cluster shares.

    @param secret_file: where the secret lives (created on first start).
    @param max_age: how long a marker counts, read at each use so that a
        reload applies.
    """

    def __init__(
        self, clock: IReactorTime, secret_file: str, max_age: Callable[[], float]
    ) -> None:
        self._clock = clock
        self._secret_file = secret_file
        self._max_age = max_age
        self._secret: bytes | None = None

    async def load(self, reactor: IReactorFromThreads, threadpool: ThreadPool) -> None:
        """
        Read the secret, or create it (in a thread: it fsyncs).
        """
        self._secret = await deferToThreadPool(
            reactor, threadpool, load_or_create_secret, self._secret_file
        )

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            raise SecretNotLoadedError(self._secret_file)
        return self._secret

    def make(self, copy_id: str, now: float, body: bytes) -> str:
        return make_marker(self.secret, copy_id, now, body)[1]

    def count_valid(self, path: str, now: float, body: bytes | None) -> int:
        if body is None:
            count = read_markers(path, self.secret, now, max_age=self._max_age())
        else:
            with open(path, "rb") as f:
                count = scan_markers(
                    f, self.secret, now, max_age=self._max_age(), body=body
                )
        for check in count.invalid:
            log.info(
                "ignoring a {reason} loop marker for {marker_id}",
                reason=check.reason,
                marker_id=check.message_id,
            )
        return count.valid

    def looped(self, head: bytes, body: bytes) -> bool:
        """
        Whether a message arriving with this header start and body digest
        has come round more than once (refuse it at the end of DATA).
        """
        count = scan_markers(
            io.BytesIO(head),
            self.secret,
            self._clock.seconds(),
            max_age=self._max_age(),
            body=body,
        )
        return count.looped
