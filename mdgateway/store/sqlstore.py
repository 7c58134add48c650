# -*- test-case-name: tests.test_store -*-
"""
The store logic both SQL backends share: every query, written once.

L{SqlStore} implements L{IStore} on top of two things a backend supplies:
a transaction (a L{Tx} on one of its connections, entered and left in a pool
thread) and its L{Dialect}. The jobs below are plain functions of a L{Tx}
that run in a pool thread inside one transaction each.

Threads, not C{adbapi}: the project injects one L{ThreadPool} per kind of
blocking work and calls it with C{deferToThreadPool} (as the spool does), so
the store does the same instead of bringing C{adbapi}'s own pool, its
reactor start-up hooks and untyped interactions. Admission to the pool is
gated on the reactor side (a L{DeferredSemaphore} per connection kind), so a
busy database queues Deferreds, never blocked pool threads: SQLite writes
pass one at a time (its single writer), PostgreSQL calls as many as there
are pooled connections.
"""

from __future__ import annotations

import abc
import base64
import binascii
import hashlib
import io
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import IO, Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mdgateway.store.dialect import LIKE_ESCAPE, Dialect, Tx, fold, like_pattern
from mdgateway.store.interfaces import (
    CorruptOriginalError,
    DeliveryStatus,
    IStore,
    MessageFilter,
    MessageRecord,
    MessageStatus,
    MessageSummary,
    NotFoundError,
    Page,
    PageRequest,
    PartVerdict,
    PurgeCounts,
    QuarantineFilter,
    QuarantineItem,
    QuarantineSource,
    ReceivedMessage,
    RecipientResult,
    Refusal,
    RefusalFilter,
    ScanVerdict,
    StoreError,
    TimelineEvent,
    overall_verdict,
)
from mdgateway.store.schema import current_version, migrate
from mdgateway.store.upstream import parse_upstream_queue_id

_T = TypeVar("_T")

#: Bytes per stored chunk of a quarantined original: what one read, one
#: row and one write hold at a time.
CHUNK_SIZE = 256 * 1024

#: Rows one purge transaction removes, so other writers get their turn.
PURGE_BATCH = 200
#: Writes one group-commit transaction takes at most.
WRITE_BATCH = 200

_DAY = 86400.0
_ESCAPE = f"ESCAPE '{LIKE_ESCAPE}'"

# --------------------------------------------------------------------------
# Cursors


def _encode_cursor(kind: str, at: float, key: str | int) -> str:
    raw = json.dumps([kind, at, key], separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode_cursor(cursor: str, kind: str, key_type: type) -> tuple[float, Any]:
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


class _Where:
    def __init__(self) -> None:
        self.terms: list[str] = []
        self.params: list[Any] = []

    def add(self, term: str, *params: Any) -> None:
        self.terms.append(term)
        self.params.extend(params)

    def like(self, column: str, needle: str | None) -> None:
        if needle:
            self.add(f"{column} LIKE ? {_ESCAPE}", like_pattern(needle))

    def one_of(self, column: str, values: Iterable[str]) -> None:
        values = sorted(values)
        if values:
            marks = ", ".join("?" for _ in values)
            self.add(f"{column} IN ({marks})", *values)

    def sql(self, extra: Sequence[str] = ()) -> str:
        terms = [*self.terms, *extra]
        return ("WHERE " + " AND ".join(terms)) if terms else ""


def _recipient_exists(alias: str) -> str:
    return (
        "EXISTS (SELECT 1 FROM message_recipients r WHERE "
        f"r.message_id = {alias}.id AND r.address_key LIKE ? {_ESCAPE})"
    )


def _message_where(f: MessageFilter) -> _Where:
    w = _Where()
    if f.since is not None:
        w.add("m.received_at >= ?", f.since)
    if f.until is not None:
        w.add("m.received_at < ?", f.until)
    w.like("m.sender_key", f.sender)
    if f.recipient:
        w.add(_recipient_exists("m"), like_pattern(f.recipient))
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


def _refusal_where(f: RefusalFilter) -> _Where:
    w = _Where()
    if f.since is not None:
        w.add("f.at >= ?", f.since)
    if f.until is not None:
        w.add("f.at < ?", f.until)
    if f.client_address:
        w.add(f"f.client_address LIKE ? {_ESCAPE}", like_pattern(f.client_address))
    w.like("f.sender_key", f.sender)
    w.like("f.recipient_key", f.recipient)
    if f.listener is not None:
        w.add("f.listener = ?", f.listener)
    if f.code is not None:
        w.add("f.reply_code = ?", f.code)
    return w


def _quarantine_where(f: QuarantineFilter) -> _Where:
    w = _Where()
    if f.since is not None:
        w.add("q.quarantined_at >= ?", f.since)
    if f.until is not None:
        w.add("q.quarantined_at < ?", f.until)
    w.like("m.sender_key", f.sender)
    if f.recipient:
        w.add(_recipient_exists("m"), like_pattern(f.recipient))
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

_SUMMARY_COLUMNS = (
    "m.id, m.queue_id, m.received_at, m.client_address, m.helo, m.sender, "
    "m.rule, m.direction, m.size, m.subject, m.message_id_header, m.status, "
    "m.verdict, m.processed_at, m.delivered_at, m.finished_at, m.instance, "
    "m.parent_id"
)
_SUMMARY_WIDTH = 18

_ITEM_COLUMNS = (
    "q.id, q.reason, q.quarantined_at, q.expires_at, q.size, q.sha256, "
    "q.pinned, q.released_at, q.released_by"
)


def _summary(row: Sequence[Any], recipients: Sequence[str]) -> MessageSummary:
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


def _item(row: Sequence[Any], message: MessageSummary) -> QuarantineItem:
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


def _refusal(row: Sequence[Any]) -> Refusal:
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
    )


def _recipients_of(tx: Tx, ids: Sequence[str]) -> dict[str, list[str]]:
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


def _require_message(tx: Tx, message_id: str) -> None:
    if tx.one("SELECT 1 FROM messages WHERE id = ?", (message_id,)) is None:
        raise NotFoundError(f"no history entry {message_id!r}")


def _add_event(
    tx: Tx, message_id: str, at: float, text: str, status: MessageStatus | None
) -> None:
    tx.execute(
        "INSERT INTO message_events (message_id, at, status, text) VALUES (?, ?, ?, ?)",
        (message_id, at, None if status is None else status.value, text),
    )


# --------------------------------------------------------------------------
# History jobs


def _job_record_received(
    tx: Tx, m: ReceivedMessage, event_text: str, now: float
) -> bool:
    inserted = tx.rowcount(
        "INSERT INTO messages (id, queue_id, parent_id, instance, received_at, "
        "client_address, helo, sender, sender_key, rule, direction, size, "
        "subject, subject_key, message_id_header, status, verdict, actions, "
        "processed_at, delivered_at, finished_at, updated_at) VALUES "
        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, '[]', "
        "NULL, NULL, NULL, ?) ON CONFLICT (id) DO NOTHING",
        (
            m.id,
            m.queue_id,
            m.parent_id,
            m.instance,
            m.received_at,
            m.client_address,
            m.helo,
            m.sender,
            fold(m.sender),
            m.rule,
            m.direction,
            m.size,
            m.subject,
            fold(m.subject),
            m.message_id_header,
            MessageStatus.QUEUED.value,
            now,
        ),
    )
    if not inserted:
        return False
    for position, address in enumerate(dict.fromkeys(m.recipients)):
        tx.execute(
            "INSERT INTO message_recipients (message_id, position, address, "
            "address_key, status, reply_text, attempts) "
            "VALUES (?, ?, ?, ?, ?, '', 0)",
            (m.id, position, address, fold(address), DeliveryStatus.PENDING.value),
        )
    _add_event(tx, m.id, m.received_at, event_text, MessageStatus.QUEUED)
    return True


def _job_update_status(
    tx: Tx, message_id: str, status: MessageStatus, text: str, at: float
) -> None:
    if status.final:
        query = (
            "UPDATE messages SET status = ?, updated_at = ?, finished_at = ? "
            "WHERE id = ?"
        )
        params: tuple[Any, ...] = (status.value, at, at, message_id)
    else:
        query = "UPDATE messages SET status = ?, updated_at = ? WHERE id = ?"
        params = (status.value, at, message_id)
    if not tx.rowcount(query, params):
        raise NotFoundError(f"no history entry {message_id!r}")
    _add_event(tx, message_id, at, text, status)


def _job_add_event(tx: Tx, message_id: str, text: str, at: float) -> None:
    _require_message(tx, message_id)
    _add_event(tx, message_id, at, text, None)


def _job_record_verdicts(
    tx: Tx,
    message_id: str,
    parts: tuple[PartVerdict, ...],
    actions: tuple[str, ...],
    verdict: ScanVerdict | None,
    at: float,
) -> None:
    changed = tx.rowcount(
        "UPDATE messages SET verdict = ?, actions = ?, processed_at = ?, "
        "updated_at = ? WHERE id = ?",
        (
            None if verdict is None else verdict.value,
            json.dumps(list(actions)),
            at,
            at,
            message_id,
        ),
    )
    if not changed:
        raise NotFoundError(f"no history entry {message_id!r}")
    tx.execute("DELETE FROM message_parts WHERE message_id = ?", (message_id,))
    for position, p in enumerate(parts):
        tx.execute(
            "INSERT INTO message_parts (message_id, position, part_id, filename, "
            "content_type, size, data_id, core_url, result, blocked_reason, "
            "sanitized, dlp_hits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                message_id,
                position,
                p.part_id,
                p.filename,
                p.content_type,
                p.size,
                p.data_id,
                p.core_url,
                p.result,
                p.blocked_reason,
                p.sanitized,
                json.dumps(list(p.dlp_hits)),
            ),
        )


def _delivery_text(r: RecipientResult) -> str:
    reply = " ".join(
        x for x in (str(r.code) if r.code else "", r.enhanced or "", r.text) if x
    )
    line = f"{r.status.value} {r.recipient}"
    if r.server:
        line += f" via {r.server}"
    return f"{line}: {reply}" if reply else line


def _job_record_delivery(
    tx: Tx, message_id: str, r: RecipientResult, at: float
) -> None:
    _require_message(tx, message_id)
    values = (
        r.status.value,
        r.code,
        r.enhanced,
        r.text,
        r.upstream_queue_id,
        r.server,
        at,
    )
    changed = tx.rowcount(
        "UPDATE message_recipients SET status = ?, reply_code = ?, "
        "enhanced_code = ?, reply_text = ?, upstream_queue_id = ?, server = ?, "
        "at = ?, attempts = attempts + 1 WHERE message_id = ? AND address = ?",
        (*values, message_id, r.recipient),
    )
    if not changed:
        tx.execute(
            "INSERT INTO message_recipients (message_id, position, address, "
            "address_key, status, reply_code, enhanced_code, reply_text, "
            "upstream_queue_id, server, at, attempts) VALUES (?, "
            "(SELECT COALESCE(MAX(position), -1) + 1 FROM message_recipients "
            "WHERE message_id = ?), ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
            (message_id, message_id, r.recipient, fold(r.recipient), *values),
        )
    if r.status is DeliveryStatus.DELIVERED:
        tx.execute(
            "UPDATE messages SET delivered_at = CASE WHEN delivered_at IS NULL "
            "OR delivered_at < ? THEN ? ELSE delivered_at END, updated_at = ? "
            "WHERE id = ?",
            (at, at, at, message_id),
        )
    _add_event(tx, message_id, at, _delivery_text(r), None)


def _job_get_message(tx: Tx, message_id: str) -> MessageRecord:
    row = tx.one(
        f"SELECT {_SUMMARY_COLUMNS}, m.actions FROM messages m WHERE m.id = ?",
        (message_id,),
    )
    if row is None:
        raise NotFoundError(f"no history entry {message_id!r}")
    recipients = tx.all(
        "SELECT address, status, reply_code, enhanced_code, reply_text, "
        "upstream_queue_id, server, at, attempts FROM message_recipients "
        "WHERE message_id = ? ORDER BY position",
        (message_id,),
    )
    deliveries = tuple(
        RecipientResult(
            recipient=a,
            status=DeliveryStatus(s),
            code=c,
            enhanced=e,
            text=t,
            upstream_queue_id=u,
            server=sv,
            at=at,
            attempts=n,
        )
        for a, s, c, e, t, u, sv, at, n in recipients
    )
    events = tuple(
        TimelineEvent(at=at, text=text, status=None if s is None else MessageStatus(s))
        for at, s, text in tx.all(
            "SELECT at, status, text FROM message_events WHERE message_id = ? "
            "ORDER BY at, id",
            (message_id,),
        )
    )
    parts = tuple(
        PartVerdict(
            part_id=pid,
            filename=fn,
            content_type=ct,
            size=sz,
            data_id=did,
            core_url=url,
            result=res,
            blocked_reason=br,
            sanitized=bool(san),
            dlp_hits=tuple(json.loads(dlp)),
        )
        for pid, fn, ct, sz, did, url, res, br, san, dlp in tx.all(
            "SELECT part_id, filename, content_type, size, data_id, core_url, "
            "result, blocked_reason, sanitized, dlp_hits FROM message_parts "
            "WHERE message_id = ? ORDER BY position",
            (message_id,),
        )
    )
    summary = _summary(row, [d.recipient for d in deliveries])
    return MessageRecord(
        summary=summary,
        timeline=events,
        parts=parts,
        actions=tuple(json.loads(row[_SUMMARY_WIDTH])),
        deliveries=deliveries,
    )


def _keyset(
    cursor: str | None, kind: str, key_type: type, at_col: str, id_col: str
) -> tuple[list[str], list[Any]]:
    """
    The condition that starts a newest-first page after C{cursor}.
    """
    if cursor is None:
        return [], []
    at, key = _decode_cursor(cursor, kind, key_type)
    return [f"({at_col} < ? OR ({at_col} = ? AND {id_col} < ?))"], [at, at, key]


def _job_search_messages(
    tx: Tx, f: MessageFilter, page: PageRequest
) -> Page[MessageSummary]:
    w = _message_where(f)
    total = tx.one(f"SELECT COUNT(*) FROM messages m {w.sql()}", w.params)
    extra, extra_params = _keyset(page.cursor, "m", str, "m.received_at", "m.id")
    rows = tx.all(
        f"SELECT {_SUMMARY_COLUMNS} FROM messages m {w.sql(extra)} "
        "ORDER BY m.received_at DESC, m.id DESC LIMIT ?",
        [*w.params, *extra_params, page.limit + 1],
    )
    more = len(rows) > page.limit
    rows = rows[: page.limit]
    recipients = _recipients_of(tx, [r[0] for r in rows])
    items = tuple(_summary(r, recipients[r[0]]) for r in rows)
    last = items[-1] if items else None
    return Page(
        items=items,
        total=int(total[0]) if total else 0,
        next_cursor=_encode_cursor("m", last.received_at, last.id)
        if more and last
        else None,
    )


# --------------------------------------------------------------------------
# Refused log jobs

_REFUSAL_COLUMNS = (
    "f.id, f.at, f.listener, f.client_address, f.helo, f.sender, f.recipient, "
    "f.reply_code, f.enhanced_code, f.reason"
)


def _job_record_refusal(tx: Tx, r: Refusal) -> Refusal:
    row = tx.one(
        "INSERT INTO refusals (at, listener, client_address, helo, sender, "
        "sender_key, recipient, recipient_key, reply_code, enhanced_code, reason) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (
            r.at,
            r.listener,
            r.client_address,
            r.helo,
            r.sender,
            None if r.sender is None else fold(r.sender),
            r.recipient,
            None if r.recipient is None else fold(r.recipient),
            r.code,
            r.enhanced,
            r.reason,
        ),
    )
    assert row is not None
    return Refusal(
        id=int(row[0]),
        at=r.at,
        listener=r.listener,
        client_address=r.client_address,
        code=r.code,
        reason=r.reason,
        enhanced=r.enhanced,
        helo=r.helo,
        sender=r.sender,
        recipient=r.recipient,
    )


def _job_search_refusals(tx: Tx, f: RefusalFilter, page: PageRequest) -> Page[Refusal]:
    w = _refusal_where(f)
    total = tx.one(f"SELECT COUNT(*) FROM refusals f {w.sql()}", w.params)
    extra, extra_params = _keyset(page.cursor, "r", int, "f.at", "f.id")
    rows = tx.all(
        f"SELECT {_REFUSAL_COLUMNS} FROM refusals f {w.sql(extra)} "
        "ORDER BY f.at DESC, f.id DESC LIMIT ?",
        [*w.params, *extra_params, page.limit + 1],
    )
    more = len(rows) > page.limit
    items = tuple(_refusal(r) for r in rows[: page.limit])
    last = items[-1] if items else None
    return Page(
        items=items,
        total=int(total[0]) if total else 0,
        next_cursor=_encode_cursor("r", last.at, last.id)
        if more and last and last.id is not None
        else None,
    )


# --------------------------------------------------------------------------
# Quarantine jobs


def _fetch_items(tx: Tx, where: str, params: Sequence[Any]) -> list[QuarantineItem]:
    rows = tx.all(
        f"SELECT {_ITEM_COLUMNS}, {_SUMMARY_COLUMNS} FROM quarantine q "
        f"JOIN messages m ON m.id = q.message_id {where}",
        params,
    )
    width = _ITEM_COLUMNS.count(",") + 1
    recipients = _recipients_of(tx, [r[width] for r in rows])
    return [_item(r, _summary(r[width:], recipients[r[width]])) for r in rows]


def _get_item(tx: Tx, item_id: str) -> QuarantineItem:
    items = _fetch_items(tx, "WHERE q.id = ?", (item_id,))
    if not items:
        raise NotFoundError(f"no quarantine item {item_id!r}")
    return items[0]


@contextmanager
def _open_source(source: QuarantineSource) -> Iterator[IO[bytes]]:
    if isinstance(source, bytes | bytearray | memoryview):
        yield io.BytesIO(source)
    elif isinstance(source, str | os.PathLike):
        with open(source, "rb") as stream:
            yield stream
    else:
        yield source


def _job_quarantine(
    tx: Tx,
    item_id: str,
    message_id: str,
    reason: str,
    source: QuarantineSource,
    expires_at: float | None,
    at: float,
    chunk_size: int,
) -> QuarantineItem:
    _require_message(tx, message_id)
    tx.execute(
        "INSERT INTO quarantine (id, message_id, reason, reason_key, "
        "quarantined_at, expires_at, size, sha256, chunks, pinned) "
        "VALUES (?, ?, ?, ?, ?, ?, 0, '', 0, ?)",
        (item_id, message_id, reason, fold(reason), at, expires_at, False),
    )
    digest = hashlib.sha256()
    size = seq = 0
    with _open_source(source) as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
            tx.execute(
                "INSERT INTO quarantine_chunks (item_id, seq, data) VALUES (?, ?, ?)",
                (item_id, seq, chunk),
            )
            size += len(chunk)
            seq += 1
            del chunk
    tx.execute(
        "UPDATE quarantine SET size = ?, sha256 = ?, chunks = ? WHERE id = ?",
        (size, digest.hexdigest(), seq, item_id),
    )
    _add_event(
        tx, message_id, at, f"original quarantined ({size} bytes): {reason}", None
    )
    return _get_item(tx, item_id)


def _job_list_quarantine(
    tx: Tx, f: QuarantineFilter, page: PageRequest
) -> Page[QuarantineItem]:
    w = _quarantine_where(f)
    total = tx.one(
        "SELECT COUNT(*) FROM quarantine q JOIN messages m ON m.id = q.message_id "
        f"{w.sql()}",
        w.params,
    )
    extra, extra_params = _keyset(page.cursor, "q", str, "q.quarantined_at", "q.id")
    items = _fetch_items(
        tx,
        f"{w.sql(extra)} ORDER BY q.quarantined_at DESC, q.id DESC LIMIT ?",
        [*w.params, *extra_params, page.limit + 1],
    )
    more = len(items) > page.limit
    items = items[: page.limit]
    last = items[-1] if items else None
    return Page(
        items=tuple(items),
        total=int(total[0]) if total else 0,
        next_cursor=_encode_cursor("q", last.quarantined_at, last.id)
        if more and last
        else None,
    )


def _job_read_quarantined(tx: Tx, item_id: str, dest_path: str) -> QuarantineItem:
    item = _get_item(tx, item_id)
    row = tx.one("SELECT chunks FROM quarantine WHERE id = ?", (item_id,))
    chunks = int(row[0]) if row else 0
    directory = os.path.dirname(os.path.abspath(dest_path))
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".part")
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            for seq in range(chunks):
                got = tx.one(
                    "SELECT data FROM quarantine_chunks WHERE item_id = ? AND seq = ?",
                    (item_id, seq),
                )
                if got is None:
                    raise CorruptOriginalError(
                        f"quarantine item {item_id} lacks chunk {seq}"
                    )
                data = got[0]
                digest.update(data)
                out.write(data)
                size += len(data)
                del data, got
            out.flush()
            os.fsync(out.fileno())
        if size != item.size or digest.hexdigest() != item.sha256:
            raise CorruptOriginalError(
                f"quarantine item {item_id} read back {size} bytes with another "
                f"digest than the {item.size} stored"
            )
        os.replace(temp, dest_path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    return item


def _job_pin(tx: Tx, item_id: str, pinned: bool) -> None:
    if not tx.rowcount(
        "UPDATE quarantine SET pinned = ? WHERE id = ?", (pinned, item_id)
    ):
        raise NotFoundError(f"no quarantine item {item_id!r}")


def _job_delete_quarantined(tx: Tx, item_id: str, at: float) -> bool:
    row = tx.one("DELETE FROM quarantine WHERE id = ? RETURNING message_id", (item_id,))
    if row is None:
        return False
    _add_event(tx, row[0], at, "quarantined original deleted", None)
    return True


def _job_mark_released(tx: Tx, item_id: str, by: str, at: float) -> QuarantineItem:
    row = tx.one(
        "UPDATE quarantine SET released_at = ?, released_by = ? WHERE id = ? "
        "RETURNING message_id",
        (at, by, item_id),
    )
    if row is None:
        raise NotFoundError(f"no quarantine item {item_id!r}")
    _add_event(tx, row[0], at, f"original released from quarantine by {by}", None)
    return _get_item(tx, item_id)


# --------------------------------------------------------------------------
# Retention jobs (one batch each)


def _job_purge_quarantine(
    tx: Tx, now: float, cutoff: float | None, batch: int
) -> tuple[int, int]:
    expired = "(q.expires_at IS NOT NULL AND q.expires_at <= ?)"
    params: list[Any] = [now]
    if cutoff is not None:
        expired = f"({expired} OR (q.expires_at IS NULL AND q.quarantined_at < ?))"
        params.append(cutoff)
    rows = tx.all(
        "DELETE FROM quarantine WHERE id IN (SELECT q.id FROM quarantine q "
        f"WHERE NOT q.pinned AND {expired} LIMIT ?) RETURNING size",
        [*params, batch],
    )
    return len(rows), sum(int(r[0]) for r in rows)


def _job_purge_messages(tx: Tx, cutoff: float, batch: int) -> int:
    return len(
        tx.all(
            "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m "
            "WHERE m.received_at < ? AND NOT EXISTS (SELECT 1 FROM quarantine q "
            "WHERE q.message_id = m.id) LIMIT ?) RETURNING id",
            (cutoff, batch),
        )
    )


def _job_purge_refusals(tx: Tx, cutoff: float, batch: int) -> int:
    return len(
        tx.all(
            "DELETE FROM refusals WHERE id IN (SELECT f.id FROM refusals f "
            "WHERE f.at < ? LIMIT ?) RETURNING id",
            (cutoff, batch),
        )
    )


# --------------------------------------------------------------------------
# The store


@implementer(IStore)
class SqlStore(abc.ABC):
    """
    L{IStore} over a SQL database; a backend subclass supplies
    connections and transactions (see L{_transaction}).

    @ivar applied_migrations: versions the last L{open} applied.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        threadpool: ThreadPool,
        dialect: Dialect,
        *,
        read_slots: int,
        write_slots: int | None,
        chunk_size: int = CHUNK_SIZE,
        purge_batch: int = PURGE_BATCH,
    ) -> None:
        """
        @param reactor: provides L{IReactorTime} (default times) and
            L{IReactorFromThreads}.
        @param threadpool: runs every database call; started by the caller.
        @param read_slots: read transactions in the pool at once.
        @param write_slots: write transactions in the pool at once; C{None}
            when reads and writes share the C{read_slots} (one pool of
            connections for both).
        @param chunk_size: bytes per stored chunk of a quarantined original.
        @param purge_batch: rows one retention transaction removes.
        """
        if chunk_size < 1 or purge_batch < 1:
            raise ValueError("chunk_size and purge_batch must be positive")
        self._clock = reactor
        self._threads = IReactorFromThreads(reactor)
        self._pool = threadpool
        self._dialect = dialect
        self._reads = DeferredSemaphore(read_slots)
        self._writes = (
            self._reads if write_slots is None else DeferredSemaphore(write_slots)
        )
        self._chunk_size = chunk_size
        self._purge_batch = purge_batch
        self._inflight: set[Deferred[None]] = set()
        self._queued: list[
            tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]
        ] = []
        self._flushing = False
        self._opened = False
        self._closed = False
        self.applied_migrations: list[int] = []

    # Backend hooks, called in a pool thread.

    @abc.abstractmethod
    def _transaction(self, write: bool, durable: bool) -> AbstractContextManager[Tx]:
        """
        A context manager that begins a transaction on a suitable connection
        and yields a L{Tx}; it commits when the block completes and rolls
        back when it raises. C{durable} asks for the commit to reach stable
        storage even where the backend normally relaxes that.
        """

    @abc.abstractmethod
    def _close_connections(self) -> None:
        """
        Close every connection (pool thread; nothing is in flight).
        """

    @abc.abstractmethod
    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        """
        The driver's exception classes, mapped onto L{StoreError}.
        """

    # Running jobs

    def _in_thread(
        self, write: bool, durable: bool, job: Callable[..., _T], args: tuple[Any, ...]
    ) -> _T:
        try:
            with self._transaction(write, durable) as tx:
                return job(tx, *args)
        except self._driver_errors() as e:
            raise self._mapped(e) from e

    async def _call(
        self,
        write: bool,
        job: Callable[..., _T],
        *args: Any,
        durable: bool = False,
        opening: bool = False,
    ) -> _T:
        if self._closed:
            raise StoreError("the store is closed")
        if not (self._opened or opening):
            raise StoreError("the store is not open; call open() first")
        gate = self._writes if write else self._reads
        done: Deferred[None] = Deferred()
        self._inflight.add(done)
        try:
            if write and not durable and not opening:
                grouped: _T = await self._grouped(job, args)
                return grouped
            result: _T = await gate.run(
                deferToThreadPool,
                self._threads,
                self._pool,
                self._in_thread,
                write,
                durable,
                job,
                args,
            )
            return result
        finally:
            self._inflight.discard(done)
            done.callback(None)

    # Group commit: the history writes of many messages arrive at once
    # under load; one transaction (each write in its own savepoint, so one
    # failing write fails alone) and one thread hand-off for all that are
    # waiting costs far less than one each.

    def _grouped(self, job: Callable[..., _T], args: tuple[Any, ...]) -> Deferred[_T]:
        waiter: Deferred[_T] = Deferred()
        self._queued.append((job, args, waiter))
        if not self._flushing:
            self._flushing = True
            flushing = Deferred.fromCoroutine(self._flush_writes())
            flushing.addErrback(lambda f: self._log.failure("store writes failed", f))
        return waiter

    async def _flush_writes(self) -> None:
        try:
            while self._queued:
                batch = self._queued[:WRITE_BATCH]
                del self._queued[:WRITE_BATCH]
                try:
                    outcomes = await self._writes.run(
                        deferToThreadPool,
                        self._threads,
                        self._pool,
                        self._batch_in_thread,
                        [(job, args) for job, args, _ in batch],
                    )
                except Exception:
                    failure = Failure()
                    for *_, waiter in batch:
                        waiter.errback(failure)
                    continue
                for (*_, waiter), (ok, value) in zip(batch, outcomes, strict=True):
                    if ok:
                        waiter.callback(value)
                    else:
                        waiter.errback(Failure(value))
        finally:
            self._flushing = False

    def _batch_in_thread(
        self, batch: list[tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> list[tuple[bool, Any]]:
        """
        Run C{batch} in one write transaction (pool thread): each job's
        result, or its exception (then none of its changes are kept).
        """
        if len(batch) == 1:
            job, args = batch[0]
            try:
                return [(True, self._in_thread(True, False, job, args))]
            except Exception as e:
                return [(False, e)]
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self._transaction(True, False) as tx:
                for n, (job, args) in enumerate(batch):
                    tx.execute(f"SAVEPOINT w{n}")
                    try:
                        value = job(tx, *args)
                    except Exception as e:
                        tx.execute(f"ROLLBACK TO SAVEPOINT w{n}")
                        outcomes.append((False, self._mapped(e)))
                    else:
                        outcomes.append((True, value))
                    tx.execute(f"RELEASE SAVEPOINT w{n}")
        except Exception as e:
            # The commit itself failed: nothing of the batch was kept.
            error = self._mapped(e)
            return [(False, error)] * len(batch)
        return outcomes

    def _mapped(self, error: BaseException) -> BaseException:
        if isinstance(error, self._driver_errors()):
            return StoreError(f"{self._dialect.name}: {error}")
        return error

    def _now(self, at: float | None) -> float:
        return self._clock.seconds() if at is None else at

    # Lifecycle

    async def open(self) -> None:
        if self._opened:
            return
        self.applied_migrations = await self._call(
            True, migrate, self._clock.seconds(), opening=True
        )
        self._opened = True
        if self.applied_migrations:
            self._log.info(
                "store ({dialect}) migrated to schema version {version}",
                dialect=self._dialect.name,
                version=self.applied_migrations[-1],
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await DeferredList(list(self._inflight))
        await deferToThreadPool(self._threads, self._pool, self._close_connections)

    async def schema_version(self) -> int:
        return await self._call(False, current_version)

    async def check(self) -> None:
        await self._call(False, lambda tx: tx.one("SELECT 1"))

    # History

    async def record_received(
        self, message: ReceivedMessage, event_text: str | None = None
    ) -> bool:
        text = event_text or f"received from {message.helo} [{message.client_address}]"
        return await self._call(
            True, _job_record_received, message, text, self._clock.seconds()
        )

    async def update_status(
        self,
        message_id: str,
        status: MessageStatus,
        event_text: str,
        at: float | None = None,
    ) -> None:
        await self._call(
            True, _job_update_status, message_id, status, event_text, self._now(at)
        )

    async def add_event(
        self, message_id: str, text: str, at: float | None = None
    ) -> None:
        await self._call(True, _job_add_event, message_id, text, self._now(at))

    async def record_verdicts(
        self,
        message_id: str,
        parts: Iterable[PartVerdict],
        actions: Iterable[str] = (),
        verdict: ScanVerdict | None = None,
        at: float | None = None,
    ) -> None:
        parts = tuple(parts)
        if verdict is None:
            verdict = overall_verdict(parts)
        await self._call(
            True,
            _job_record_verdicts,
            message_id,
            parts,
            tuple(actions),
            verdict,
            self._now(at),
        )

    async def record_delivery(self, message_id: str, result: RecipientResult) -> None:
        if (
            result.upstream_queue_id is None
            and result.code is not None
            and 200 <= result.code < 300
        ):
            upstream = parse_upstream_queue_id(result.text)
            if upstream is not None:
                result = RecipientResult(
                    recipient=result.recipient,
                    status=result.status,
                    code=result.code,
                    enhanced=result.enhanced,
                    text=result.text,
                    upstream_queue_id=upstream,
                    server=result.server,
                    at=result.at,
                )
        await self._call(
            True, _job_record_delivery, message_id, result, self._now(result.at)
        )

    async def get_message(self, message_id: str) -> MessageRecord:
        return await self._call(False, _job_get_message, message_id)

    async def search_messages(
        self,
        filters: MessageFilter | None = None,
        page: PageRequest | None = None,
    ) -> Page[MessageSummary]:
        page = page or PageRequest()
        if page.cursor is not None:
            _decode_cursor(page.cursor, "m", str)
        return await self._call(
            False, _job_search_messages, filters or MessageFilter(), page
        )

    # Refused log

    async def record_refusal(self, refusal: Refusal) -> Refusal:
        return await self._call(True, _job_record_refusal, refusal)

    async def search_refusals(
        self,
        filters: RefusalFilter | None = None,
        page: PageRequest | None = None,
    ) -> Page[Refusal]:
        page = page or PageRequest()
        if page.cursor is not None:
            _decode_cursor(page.cursor, "r", int)
        return await self._call(
            False, _job_search_refusals, filters or RefusalFilter(), page
        )

    # Quarantine

    async def quarantine(
        self,
        message_id: str,
        reason: str,
        source: QuarantineSource,
        expires_at: float | None = None,
        at: float | None = None,
    ) -> QuarantineItem:
        return await self._call(
            True,
            _job_quarantine,
            uuid.uuid4().hex,
            message_id,
            reason,
            source,
            expires_at,
            self._now(at),
            self._chunk_size,
            durable=True,
        )

    async def list_quarantine(
        self,
        filters: QuarantineFilter | None = None,
        page: PageRequest | None = None,
    ) -> Page[QuarantineItem]:
        page = page or PageRequest()
        if page.cursor is not None:
            _decode_cursor(page.cursor, "q", str)
        return await self._call(
            False, _job_list_quarantine, filters or QuarantineFilter(), page
        )

    async def get_quarantined(self, item_id: str) -> QuarantineItem:
        return await self._call(False, _get_item, item_id)

    async def read_quarantined(self, item_id: str, dest_path: str) -> QuarantineItem:
        return await self._call(False, _job_read_quarantined, item_id, dest_path)

    async def pin(self, item_id: str, pinned: bool) -> None:
        await self._call(True, _job_pin, item_id, pinned)

    async def delete_quarantined(self, item_id: str) -> bool:
        return await self._call(
            True, _job_delete_quarantined, item_id, self._clock.seconds()
        )

    async def mark_released(
        self, item_id: str, by: str, at: float | None = None
    ) -> QuarantineItem:
        return await self._call(True, _job_mark_released, item_id, by, self._now(at))

    # Retention

    async def _drain(self, job: Callable[[Tx, float, int], int], cutoff: float) -> int:
        """
        Run a purge job batch after batch, each its own transaction, until
        one removes less than a full batch.
        """
        total = 0
        while True:
            count = await self._call(True, job, cutoff, self._purge_batch)
            total += count
            if count < self._purge_batch:
                return total

    async def purge(
        self, now: float, history_days: float | None, quarantine_days: float | None
    ) -> PurgeCounts:
        quarantined = freed = messages = refusals = 0
        cutoff = None if quarantine_days is None else now - quarantine_days * _DAY
        while True:
            count, size = await self._call(
                True, _job_purge_quarantine, now, cutoff, self._purge_batch
            )
            quarantined += count
            freed += size
            if count < self._purge_batch:
                break
        if history_days is not None:
            cutoff = now - history_days * _DAY
            messages = await self._drain(_job_purge_messages, cutoff)
            refusals = await self._drain(_job_purge_refusals, cutoff)
        counts = PurgeCounts(
            messages=messages,
            refusals=refusals,
            quarantined=quarantined,
            quarantined_bytes=freed,
        )
        self._log.info(
            "retention removed {messages} history entries, {refusals} refusals, "
            "{quarantined} quarantined originals ({bytes} bytes)",
            messages=messages,
            refusals=refusals,
            quarantined=quarantined,
            bytes=freed,
        )
        return counts
