# -*- test-case-name: tests.test_store -*-
"""
Shared SQL pieces of the store: paging cursors, WHERE clauses built from
filters, and rows mapped onto the store's values.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from typing import Any

from mdgateway.store.dialect import LIKE_ESCAPE, Tx, like_pattern
from mdgateway.store.interfaces import (
    MessageFilter,
    MessageStatus,
    MessageSummary,
    NotFoundError,
    QuarantineFilter,
    QuarantineItem,
    Refusal,
    RefusalFilter,
    ScanVerdict,
)

DAY = 86400.0
ESCAPE = f"ESCAPE '{LIKE_ESCAPE}'"

# --------------------------------------------------------------------------
# Cursors


def encode_cursor(kind: str, at: float, key: str | int) -> str:
    raw = json.dumps([kind, at, key], separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, kind: str, key_type: type) -> tuple[float, Any]:
    """
    @raise ValueError: not a cursor this search handed out.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        got_kind, at, key = json.loads(raw)
    except (binascii.Error, ValueError, TypeError) as e:
        raise ValueError(f"invalid page cursor {cursor!r}") from e
    if (
        got_kind != kind
        or not isinstance(at, int | float)
        or isinstance(at, bool)
        or type(key) is not key_type
    ):
        raise ValueError(f"invalid page cursor {cursor!r}")
    return float(at), key


# --------------------------------------------------------------------------
# Filters to WHERE clauses (fixed fragments; values always as parameters)


class Where:
    def __init__(self) -> None:
        self.terms: list[str] = []
        self.params: list[Any] = []

    def add(self, term: str, *params: Any) -> None:
        self.terms.append(term)
        self.params.extend(params)

    def like(self, column: str, needle: str | None) -> None:
        if needle:
            self.add(f"{column} LIKE ? {ESCAPE}", like_pattern(needle))

    def one_of(self, column: str, values: Iterable[str]) -> None:
        values = sorted(values)
        if values:
            marks = ", ".join("?" for _ in values)
            self.add(f"{column} IN ({marks})", *values)

    def sql(self, extra: Sequence[str] = ()) -> str:
        terms = [*self.terms, *extra]
        return ("WHERE " + " AND ".join(terms)) if terms else ""


def recipient_exists(alias: str) -> str:
    return (
        "EXISTS (SELECT 1 FROM message_recipients r WHERE "
        f"r.message_id = {alias}.id AND r.address_key LIKE ? {ESCAPE})"
    )


def message_where(f: MessageFilter) -> Where:
    w = Where()
    if f.since is not None:
        w.add("m.received_at >= ?", f.since)
    if f.until is not None:
        w.add("m.received_at < ?", f.until)
    w.like("m.sender_key", f.sender)
    if f.recipient:
        w.add(recipient_exists("m"), like_pattern(f.recipient))
    w.like("m.subject_key", f.subject)
    w.one_of("m.status", (s.value for s in f.statuses))
    if f.rule is not None:
        w.add("m.rule = ?", f.rule)
    if f.direction is not None:
        w.add("m.direction = ?", f.direction)
    w.one_of("m.verdict", (v.value for v in f.verdicts))
    if f.queue_id is not None:
        w.add("m.queue_id = ?", f.queue_id)
    if f.message_id_header is not None:
        w.add("m.message_id_header = ?", f.message_id_header)
    return w


def refusal_where(f: RefusalFilter) -> Where:
    w = Where()
    if f.since is not None:
        w.add("f.at >= ?", f.since)
    if f.until is not None:
        w.add("f.at < ?", f.until)
    if f.client_address:
        w.add(f"f.client_address LIKE ? {ESCAPE}", like_pattern(f.client_address))
    w.like("f.sender_key", f.sender)
    w.like("f.recipient_key", f.recipient)
    if f.listener is not None:
        w.add("f.listener = ?", f.listener)
    if f.code is not None:
        w.add("f.reply_code = ?", f.code)
    if f.category is not None:
        w.add("f.category = ?", f.category)
    return w


def quarantine_where(f: QuarantineFilter) -> Where:
    w = Where()
    if f.since is not None:
        w.add("q.quarantined_at >= ?", f.since)
    if f.until is not None:
        w.add("q.quarantined_at < ?", f.until)
    w.like("m.sender_key", f.sender)
    if f.recipient:
        w.add(recipient_exists("m"), like_pattern(f.recipient))
    w.like("m.subject_key", f.subject)
    w.like("q.reason_key", f.reason)
    if f.rule is not None:
        w.add("m.rule = ?", f.rule)
    if f.direction is not None:
        w.add("m.direction = ?", f.direction)
    if f.pinned is not None:
        w.add("q.pinned = ?", f.pinned)
    if f.released is True:
        w.add("q.released_at IS NOT NULL")
    elif f.released is False:
        w.add("q.released_at IS NULL")
    if f.message_id is not None:
        w.add("q.message_id = ?", f.message_id)
    return w


# --------------------------------------------------------------------------
# Rows to values

SUMMARY_COLUMNS = (
    "m.id, m.queue_id, m.received_at, m.client_address, m.helo, m.sender, "
    "m.rule, m.direction, m.size, m.subject, m.message_id_header, m.status, "
    "m.verdict, m.processed_at, m.delivered_at, m.finished_at, m.instance, "
    "m.parent_id"
)
SUMMARY_WIDTH = 18

ITEM_COLUMNS = (
    "q.id, q.reason, q.quarantined_at, q.expires_at, q.size, q.sha256, "
    "q.pinned, q.released_at, q.released_by"
)


def summary_from_row(row: Sequence[Any], recipients: Sequence[str]) -> MessageSummary:
    return MessageSummary(
        id=row[0],
        queue_id=row[1],
        received_at=row[2],
        client_address=row[3],
        helo=row[4],
        sender=row[5],
        recipients=tuple(recipients),
        rule=row[6],
        direction=row[7],
        size=row[8],
        subject=row[9],
        message_id_header=row[10],
        status=MessageStatus(row[11]),
        verdict=None if row[12] is None else ScanVerdict(row[12]),
        processed_at=row[13],
        delivered_at=row[14],
        finished_at=row[15],
        instance=row[16],
        parent_id=row[17],
    )


def item_from_row(row: Sequence[Any], message: MessageSummary) -> QuarantineItem:
    return QuarantineItem(
        id=row[0],
        message=message,
        reason=row[1],
        quarantined_at=row[2],
        expires_at=row[3],
        size=row[4],
        sha256=row[5],
        pinned=bool(row[6]),
        released_at=row[7],
        released_by=row[8],
    )


def refusal_from_row(row: Sequence[Any]) -> Refusal:
    return Refusal(
        id=row[0],
        at=row[1],
        listener=row[2],
        client_address=row[3],
        helo=row[4],
        sender=row[5],
        recipient=row[6],
        code=row[7],
        enhanced=row[8],
        reason=row[9],
        category=row[10],
        repeats=int(row[11]),
    )


def recipients_of(tx: Tx, ids: Sequence[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {i: [] for i in ids}
    unique = sorted(found)
    for start in range(0, len(unique), 500):
        batch = unique[start : start + 500]
        marks = ", ".join("?" for _ in batch)
        rows = tx.all(
            "SELECT message_id, address FROM message_recipients "
            f"WHERE message_id IN ({marks}) ORDER BY message_id, position",
            batch,
        )
        for message_id, address in rows:
            found[message_id].append(address)
    return found


def require_message(tx: Tx, message_id: str) -> None:
    if tx.one("SELECT 1 FROM messages WHERE id = ?", (message_id,)) is None:
        raise NotFoundError(f"no history entry {message_id!r}")


def add_event(
    tx: Tx,
    message_id: str,
    at: float,
    text: str,
    status: MessageStatus | None,
    key: str | None = None,
) -> bool:
    """
    Append a timeline line; with C{key} (an outbox record's), only if no
    line has that key yet. Returns whether the line was added.
    """
    return bool(
        tx.rowcount(
            "INSERT INTO message_events (message_id, at, status, text, record_key) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (record_key) DO NOTHING",
            (message_id, at, None if status is None else status.value, text, key),
        )
    )
