# -*- test-case-name: tests.test_store -*-
"""
The store's blocking jobs: one function per operation, run inside one
transaction in a pool thread, written once for SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

import attrs

from mdgateway.store.dialect import Tx, fold
from mdgateway.store.interfaces import (
    CorruptOriginalError,
    DeliveryStatus,
    MessageFilter,
    MessageRecord,
    MessageStatus,
    MessageSummary,
    NotFoundError,
    Page,
    PageRequest,
    PartVerdict,
    QuarantineFilter,
    QuarantineItem,
    QuarantineSource,
    ReceivedMessage,
    RecipientDelivery,
    Refusal,
    RefusalFilter,
    ScanVerdict,
    TimelineEvent,
)
from mdgateway.store.rows import (
    ITEM_COLUMNS,
    SUMMARY_COLUMNS,
    SUMMARY_WIDTH,
    add_event,
    decode_cursor,
    encode_cursor,
    item_from_row,
    message_where,
    quarantine_where,
    recipients_of,
    refusal_from_row,
    refusal_where,
    require_message,
    summary_from_row,
)

# --------------------------------------------------------------------------
# History jobs


def job_record_received(
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
    add_event(tx, m.id, m.received_at, event_text, MessageStatus.QUEUED)
    return True


def job_update_status(
    tx: Tx,
    message_id: str,
    status: MessageStatus,
    text: str,
    at: float,
    key: str | None = None,
) -> bool:
    """
    Set the status and append it to the timeline; with C{key}, only if
    the keyed line is not there yet. Returns whether anything changed.
    """
    require_message(tx, message_id)
    if not add_event(tx, message_id, at, text, status, key):
        return False
    if status.final:
        query = (
            "UPDATE messages SET status = ?, updated_at = ?, finished_at = ? "
            "WHERE id = ?"
        )
        params: tuple[Any, ...] = (status.value, at, at, message_id)
    else:
        query = "UPDATE messages SET status = ?, updated_at = ? WHERE id = ?"
        params = (status.value, at, message_id)
    tx.execute(query, params)
    return True


def job_add_event(
    tx: Tx, message_id: str, text: str, at: float, key: str | None = None
) -> bool:
    require_message(tx, message_id)
    return add_event(tx, message_id, at, text, None, key)


def job_record_verdicts(
    tx: Tx,
    message_id: str,
    parts: tuple[PartVerdict, ...],
    actions: tuple[str, ...],
    verdict: ScanVerdict | None,
    at: float,
    text: str = "",
    key: str | None = None,
) -> bool:
    """
    Replace the verdicts, then (with C{text}) append a timeline line;
    with C{key}, nothing happens when the keyed line is there already.
    """
    if key is not None and text:
        require_message(tx, message_id)
        if not add_event(tx, message_id, at, text, None, key):
            return False
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
    if text and key is None:
        add_event(tx, message_id, at, text, None)
    return True


def _delivery_text(r: RecipientDelivery) -> str:
    reply = " ".join(
        x for x in (str(r.code) if r.code else "", r.enhanced or "", r.text) if x
    )
    line = f"{r.status.value} {r.recipient}"
    if r.server:
        line += f" via {r.server}"
    return f"{line}: {reply}" if reply else line


def job_record_delivery(
    tx: Tx, message_id: str, r: RecipientDelivery, at: float, key: str | None = None
) -> bool:
    """
    Store one recipient's outcome (see L{IStore.record_delivery}); with
    C{key}, only if its keyed timeline line is not there yet.
    """
    require_message(tx, message_id)
    if not add_event(tx, message_id, at, _delivery_text(r), None, key):
        return False
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
    return True


def job_get_message(tx: Tx, message_id: str) -> MessageRecord:
    row = tx.one(
        f"SELECT {SUMMARY_COLUMNS}, m.actions FROM messages m WHERE m.id = ?",
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
        RecipientDelivery(
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
    summary = summary_from_row(row, [d.recipient for d in deliveries])
    return MessageRecord(
        summary=summary,
        timeline=events,
        parts=parts,
        actions=tuple(json.loads(row[SUMMARY_WIDTH])),
        deliveries=deliveries,
    )


def keyset(
    cursor: str | None, kind: str, key_type: type, at_col: str, id_col: str
) -> tuple[list[str], list[Any]]:
    """
    The condition that starts a newest-first page after C{cursor}.
    """
    if cursor is None:
        return [], []
    at, key = decode_cursor(cursor, kind, key_type)
    return [f"({at_col} < ? OR ({at_col} = ? AND {id_col} < ?))"], [at, at, key]


def job_search_messages(
    tx: Tx, f: MessageFilter, page: PageRequest
) -> Page[MessageSummary]:
    w = message_where(f)
    total = tx.one(f"SELECT COUNT(*) FROM messages m {w.sql()}", w.params)
    extra, extra_params = keyset(page.cursor, "m", str, "m.received_at", "m.id")
    rows = tx.all(
        f"SELECT {SUMMARY_COLUMNS} FROM messages m {w.sql(extra)} "
        "ORDER BY m.received_at DESC, m.id DESC LIMIT ?",
        [*w.params, *extra_params, page.limit + 1],
    )
    more = len(rows) > page.limit
    rows = rows[: page.limit]
    recipients = recipients_of(tx, [r[0] for r in rows])
    items = tuple(summary_from_row(r, recipients[r[0]]) for r in rows)
    last = items[-1] if items else None
    return Page(
        items=items,
        total=int(total[0]) if total else 0,
        next_cursor=encode_cursor("m", last.received_at, last.id)
        if more and last
        else None,
    )


# --------------------------------------------------------------------------
# Refused log jobs

REFUSAL_COLUMNS = (
    "f.id, f.at, f.listener, f.client_address, f.helo, f.sender, f.recipient, "
    "f.reply_code, f.enhanced_code, f.reason, f.category, f.repeats"
)


def job_record_refusal(tx: Tx, r: Refusal, key: str | None = None) -> Refusal | None:
    """
    Add a refusal row; with C{key}, only if no row has that key yet
    (C{None} then).
    """
    row = tx.one(
        "INSERT INTO refusals (at, listener, client_address, helo, sender, "
        "sender_key, recipient, recipient_key, reply_code, enhanced_code, reason, "
        "category, repeats, record_key) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (record_key) DO NOTHING RETURNING id",
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
            r.category,
            max(1, r.repeats),
            key,
        ),
    )
    if row is None:
        return None
    return attrs.evolve(r, id=int(row[0]), repeats=max(1, r.repeats))


def job_search_refusals(tx: Tx, f: RefusalFilter, page: PageRequest) -> Page[Refusal]:
    w = refusal_where(f)
    total = tx.one(f"SELECT COUNT(*) FROM refusals f {w.sql()}", w.params)
    extra, extra_params = keyset(page.cursor, "r", int, "f.at", "f.id")
    rows = tx.all(
        f"SELECT {REFUSAL_COLUMNS} FROM refusals f {w.sql(extra)} "
        "ORDER BY f.at DESC, f.id DESC LIMIT ?",
        [*w.params, *extra_params, page.limit + 1],
    )
    more = len(rows) > page.limit
    items = tuple(refusal_from_row(r) for r in rows[: page.limit])
    last = items[-1] if items else None
    return Page(
        items=items,
        total=int(total[0]) if total else 0,
        next_cursor=encode_cursor("r", last.at, last.id)
        if more and last and last.id is not None
        else None,
    )


# --------------------------------------------------------------------------
# Quarantine jobs


def fetch_items(tx: Tx, where: str, params: Sequence[Any]) -> list[QuarantineItem]:
    rows = tx.all(
        f"SELECT {ITEM_COLUMNS}, {SUMMARY_COLUMNS} FROM quarantine q "
        f"JOIN messages m ON m.id = q.message_id {where}",
        params,
    )
    width = ITEM_COLUMNS.count(",") + 1
    recipients = recipients_of(tx, [r[width] for r in rows])
    return [
        item_from_row(r, summary_from_row(r[width:], recipients[r[width]]))
        for r in rows
    ]


def get_item(tx: Tx, item_id: str) -> QuarantineItem:
    items = fetch_items(tx, "WHERE q.id = ?", (item_id,))
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


def job_quarantine(
    tx: Tx,
    item_id: str,
    message_id: str,
    reason: str,
    source: QuarantineSource,
    expires_at: float | None,
    at: float,
    chunk_size: int,
) -> QuarantineItem:
    """
    Store an original under C{item_id}. An outbox record uses its key as
    the item id, so a replay finds the item there and changes nothing
    (see L{job_quarantine_once}).
    """
    require_message(tx, message_id)
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
    add_event(
        tx, message_id, at, f"original quarantined ({size} bytes): {reason}", None
    )
    return get_item(tx, item_id)


def job_quarantine_once(
    tx: Tx,
    item_id: str,
    message_id: str,
    reason: str,
    source: QuarantineSource,
    expires_at: float | None,
    at: float,
    chunk_size: int,
) -> bool:
    """
    L{job_quarantine} unless item C{item_id} exists; whether it stored.
    """
    if tx.one("SELECT 1 FROM quarantine WHERE id = ?", (item_id,)) is not None:
        return False
    job_quarantine(tx, item_id, message_id, reason, source, expires_at, at, chunk_size)
    return True


def job_list_quarantine(
    tx: Tx, f: QuarantineFilter, page: PageRequest
) -> Page[QuarantineItem]:
    w = quarantine_where(f)
    total = tx.one(
        "SELECT COUNT(*) FROM quarantine q JOIN messages m ON m.id = q.message_id "
        f"{w.sql()}",
        w.params,
    )
    extra, extra_params = keyset(page.cursor, "q", str, "q.quarantined_at", "q.id")
    items = fetch_items(
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
        next_cursor=encode_cursor("q", last.quarantined_at, last.id)
        if more and last
        else None,
    )


def job_read_quarantined(tx: Tx, item_id: str, dest_path: str) -> QuarantineItem:
    item = get_item(tx, item_id)
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


def job_pin(tx: Tx, item_id: str, pinned: bool) -> None:
    if not tx.rowcount(
        "UPDATE quarantine SET pinned = ? WHERE id = ?", (pinned, item_id)
    ):
        raise NotFoundError(f"no quarantine item {item_id!r}")


def job_delete_quarantined(tx: Tx, item_id: str, at: float) -> bool:
    row = tx.one("DELETE FROM quarantine WHERE id = ? RETURNING message_id", (item_id,))
    if row is None:
        return False
    add_event(tx, row[0], at, "quarantined original deleted", None)
    return True


def job_mark_released(tx: Tx, item_id: str, by: str, at: float) -> QuarantineItem:
    row = tx.one(
        "UPDATE quarantine SET released_at = ?, released_by = ? WHERE id = ? "
        "RETURNING message_id",
        (at, by, item_id),
    )
    if row is None:
        raise NotFoundError(f"no quarantine item {item_id!r}")
    add_event(tx, row[0], at, f"original released from quarantine by {by}", None)
    return get_item(tx, item_id)


# --------------------------------------------------------------------------
# Retention jobs (one batch each)


def job_purge_quarantine(
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


def job_purge_messages(tx: Tx, cutoff: float, batch: int) -> int:
    return len(
        tx.all(
            "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m "
            "WHERE m.received_at < ? AND NOT EXISTS (SELECT 1 FROM quarantine q "
            "WHERE q.message_id = m.id) LIMIT ?) RETURNING id",
            (cutoff, batch),
        )
    )


def job_purge_refusals(tx: Tx, cutoff: float, batch: int) -> int:
    return len(
        tx.all(
            "DELETE FROM refusals WHERE id IN (SELECT f.id FROM refusals f "
            "WHERE f.at < ? LIMIT ?) RETURNING id",
            (cutoff, batch),
        )
    )
