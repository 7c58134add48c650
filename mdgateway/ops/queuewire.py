# -*- test-case-name: tests.test_queue_ops -*-
"""
The queue's values as JSON between the instances of a cluster (see
L{mdgateway.ops.cluster}): entries, content views and action results go
out as plain objects with POSIX times and come back as the same values.

Both ends run the same version in a cluster, but a value that does not
read back is refused (L{WireFormatError}) rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from mdgateway.ops.interfaces import (
    QueueActionResult,
    QueuedMessage,
    QueuedPart,
    QueueEntry,
    QueueRecipient,
)


class WireFormatError(ValueError):
    """
    Another instance sent something that is not the value expected.
    """


def entry_json(entry: QueueEntry) -> dict[str, Any]:
    return attrs.asdict(entry)


def entry_from_json(data: object) -> QueueEntry:
    if not isinstance(data, Mapping):
        raise WireFormatError("a queue entry is not an object")
    try:
        fields = dict(data)
        fields["recipients"] = tuple(
            QueueRecipient(**r) for r in fields.get("recipients", ())
        )
        return QueueEntry(**fields)
    except (TypeError, ValueError) as e:
        raise WireFormatError(f"a queue entry cannot be read: {e}") from None


def message_json(message: QueuedMessage) -> dict[str, Any]:
    return attrs.asdict(message)


def message_from_json(data: object) -> QueuedMessage:
    if not isinstance(data, Mapping):
        raise WireFormatError("a queued message is not an object")
    try:
        fields = dict(data)
        fields["entry"] = entry_from_json(fields.get("entry"))
        fields["parts"] = tuple(QueuedPart(**p) for p in fields.get("parts", ()))
        return QueuedMessage(**fields)
    except (TypeError, ValueError) as e:
        raise WireFormatError(f"a queued message cannot be read: {e}") from None


def result_json(result: QueueActionResult) -> dict[str, Any]:
    return attrs.asdict(result)


def result_from_json(data: object) -> QueueActionResult:
    if not isinstance(data, Mapping):
        raise WireFormatError("a queue action result is not an object")
    try:
        return QueueActionResult(**data)
    except TypeError as e:
        raise WireFormatError(f"a queue action result cannot be read: {e}") from None
