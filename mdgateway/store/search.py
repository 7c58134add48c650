# -*- test-case-name: tests.test_store -*-
"""
Searching the store: filters, pages and what a purge removed.

Kept apart from L{mdgateway.store.interfaces} (which re-exports every name
here) so that neither module grows past a readable size. The status and
verdict converters import their enums when called, since the interfaces
module imports this one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Generic, TypeVar

import attrs

if TYPE_CHECKING:
    from mdgateway.store.interfaces import MessageStatus, ScanVerdict

_T = TypeVar("_T")


def _statuses(value: object) -> frozenset[MessageStatus]:
    from mdgateway.store.interfaces import MessageStatus

    if value is None:
        return frozenset()
    if isinstance(value, MessageStatus | str):
        return frozenset({MessageStatus(value)})
    if isinstance(value, Iterable):
        return frozenset(MessageStatus(v) for v in value)
    raise TypeError(f"not a status or statuses: {value!r}")


def _verdicts(value: object) -> frozenset[ScanVerdict]:
    from mdgateway.store.interfaces import ScanVerdict

    if value is None:
        return frozenset()
    if isinstance(value, ScanVerdict | str):
        return frozenset({ScanVerdict(value)})
    if isinstance(value, Iterable):
        return frozenset(ScanVerdict(v) for v in value)
    raise TypeError(f"not a verdict or verdicts: {value!r}")


@attrs.frozen
class MessageFilter:
    """
    Email history filters; every one that is set must match.

    Text filters (C{sender}, C{recipient}, C{subject}) match a
    case-insensitive substring. C{since} is inclusive, C{until} exclusive,
    both on the received time.
    """

    since: float | None = None
    until: float | None = None
    sender: str | None = None
    recipient: str | None = None
    subject: str | None = None
    statuses: frozenset[MessageStatus] = attrs.field(
        default=frozenset(), converter=_statuses
    )
    rule: str | None = None
    direction: str | None = None
    verdicts: frozenset[ScanVerdict] = attrs.field(
        default=frozenset(), converter=_verdicts
    )
    queue_id: str | None = None
    message_id_header: str | None = None


@attrs.frozen
class RefusalFilter:
    """
    Refused log filters; every one that is set must match. Text filters
    match a case-insensitive substring; C{listener} and C{code} are exact.
    """

    since: float | None = None
    until: float | None = None
    client_address: str | None = None
    sender: str | None = None
    recipient: str | None = None
    listener: str | None = None
    code: int | None = None
    category: str | None = None


@attrs.frozen
class QuarantineFilter:
    """
    Quarantine filters; every one that is set must match. C{since} and
    C{until} bound the quarantine time; text filters are case-insensitive
    substrings, except C{rule}, C{direction} and C{message_id} (exact).
    """

    since: float | None = None
    until: float | None = None
    sender: str | None = None
    recipient: str | None = None
    subject: str | None = None
    reason: str | None = None
    rule: str | None = None
    direction: str | None = None
    pinned: bool | None = None
    released: bool | None = None
    message_id: str | None = None


#: The largest page a search returns.
MAX_PAGE = 1000


@attrs.frozen
class PageRequest:
    """
    Which page of a search to return, newest first.

    @ivar cursor: C{next_cursor} of the previous page, C{None} for the
        first. Pages are keyed on the sort order, so rows added meanwhile
        neither repeat nor shift rows across pages.
    """

    limit: int = attrs.field(default=50)
    cursor: str | None = None

    @limit.validator
    def _check_limit(self, attribute: object, value: int) -> None:
        if not 1 <= value <= MAX_PAGE:
            raise ValueError(f"page limit must be 1 to {MAX_PAGE}, not {value}")


@attrs.frozen
class Page(Generic[_T]):
    """
    One page of search results.

    @ivar total: how many rows match the filters, across all pages.
    @ivar next_cursor: pass it in the next L{PageRequest}; C{None} on the
        last page.
    """

    items: tuple[_T, ...]
    total: int
    next_cursor: str | None


@attrs.frozen
class PurgeCounts:
    """
    What one L{IStore.purge} removed.
    """

    messages: int = 0
    refusals: int = 0
    quarantined: int = 0
    quarantined_bytes: int = 0
