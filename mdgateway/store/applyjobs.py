# -*- test-case-name: tests.test_outbox -*-
"""
The store's blocking jobs for records drained from the outbox and for the
operator audit, run inside one transaction in a pool thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from mdgateway.store.audit import FAILED as AUDIT_FAILED
from mdgateway.store.audit import STARTED, AuditEntry, AuditFilter
from mdgateway.store.dialect import Tx
from mdgateway.store.interfaces import NotFoundError, Page, PageRequest
from mdgateway.store.jobs import (
    job_add_event,
    job_quarantine_once,
    job_record_delivery,
    job_record_received,
    job_record_refusal,
    job_record_verdicts,
    job_update_status,
    keyset,
)
from mdgateway.store.owed import (
    APPLIED,
    DUPLICATE,
    FAILED,
    Applied,
    Owed,
    OwedDelivery,
    OwedEvent,
    OwedQuarantine,
    OwedReceived,
    OwedRefusal,
    OwedStatus,
    OwedVerdicts,
)
from mdgateway.store.rows import Where, encode_cursor

# --------------------------------------------------------------------------
# Outbox records


def job_apply_one(tx: Tx, owed: Owed, chunk_size: int) -> bool:
    """
    Apply one owed record; C{False} when its key shows it was applied
    before (nothing changes then).
    """
    r, key = owed.record, owed.key
    if isinstance(r, OwedReceived):
        inserted = job_record_received(tx, r.message, r.text, r.at)
        if r.status is None:
            return inserted
        changed = job_update_status(
            tx, r.message.id, r.status, r.status_text, r.at, key
        )
        return inserted or changed
    if isinstance(r, OwedStatus):
        return job_update_status(tx, r.message_id, r.status, r.text, r.at, key)
    if isinstance(r, OwedEvent):
        return job_add_event(tx, r.message_id, r.text, r.at, key)
    if isinstance(r, OwedVerdicts):
        return job_record_verdicts(
            tx, r.message_id, r.parts, r.actions, r.verdict, r.at, r.text, key
        )
    if isinstance(r, OwedDelivery):
        return job_record_delivery(tx, r.message_id, r.result, r.at, key)
    if isinstance(r, OwedRefusal):
        return job_record_refusal(tx, r.refusal, key) is not None
    assert isinstance(r, OwedQuarantine)
    return job_quarantine_once(
        tx, key, r.message_id, r.reason, r.path, r.expires_at, r.at, chunk_size
    )


def job_apply(
    tx: Tx,
    records: Sequence[Owed],
    chunk_size: int,
    record_errors: tuple[type[BaseException], ...],
) -> list[Applied]:
    """
    Apply C{records} in order, each in a savepoint of its own, so that one
    that fails for a reason of its own (an error of C{record_errors}: a
    missing history entry, an unreadable original, a constraint) fails
    alone. Any other error (the connection broke, the disk is full) is
    raised and fails the whole transaction.
    """
    outcomes: list[Applied] = []
    for n, owed in enumerate(records):
        tx.execute(f"SAVEPOINT a{n}")
        try:
            applied = job_apply_one(tx, owed, chunk_size)
        except record_errors as e:
            tx.execute(f"ROLLBACK TO SAVEPOINT a{n}")
            outcomes.append(Applied(owed.key, FAILED, f"{type(e).__name__}: {e}"))
        else:
            outcomes.append(Applied(owed.key, APPLIED if applied else DUPLICATE))
        tx.execute(f"RELEASE SAVEPOINT a{n}")
    return outcomes


#: Errors that belong to one record, not to the database connection.
RECORD_ERRORS: tuple[type[BaseException], ...] = (
    NotFoundError,
    FileNotFoundError,
    IsADirectoryError,
    PermissionError,
    ValueError,
    TypeError,
)

# --------------------------------------------------------------------------
# Audit

AUDIT_COLUMNS = (
    "a.id, a.at, a.actor, a.action, a.target, a.result, a.detail, a.claim, "
    "a.request_key, a.outcome, a.finished_at"
)


def _audit_from_row(row: Sequence[Any]) -> AuditEntry:
    return AuditEntry(
        id=int(row[0]),
        at=row[1],
        actor=row[2],
        action=row[3],
        target=row[4],
        result=row[5],
        detail=row[6],
        claim=row[7],
        key=row[8],
        outcome=row[9],
        finished_at=row[10],
    )


def _get_audit(tx: Tx, entry_id: int) -> AuditEntry:
    row = tx.one(f"SELECT {AUDIT_COLUMNS} FROM audit a WHERE a.id = ?", (entry_id,))
    if row is None:
        raise NotFoundError(f"no audit entry {entry_id}")
    return _audit_from_row(row)


def job_record_audit(tx: Tx, e: AuditEntry) -> AuditEntry:
    row = tx.one(
        "INSERT INTO audit (at, actor, action, target, result, detail, claim, "
        "request_key, outcome, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "RETURNING id",
        (
            e.at,
            e.actor,
            e.action,
            e.target,
            e.result,
            e.detail,
            e.claim,
            e.key,
            e.outcome,
            e.finished_at,
        ),
    )
    assert row is not None
    return attrs.evolve(e, id=int(row[0]))


def job_claim_audit(tx: Tx, e: AuditEntry) -> tuple[AuditEntry, bool]:
    if e.claim is None:
        return job_record_audit(tx, e), True
    row = tx.one(
        "INSERT INTO audit (at, actor, action, target, result, detail, claim, "
        "request_key, outcome, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '', NULL) "
        "ON CONFLICT (claim) DO NOTHING RETURNING id",
        (e.at, e.actor, e.action, e.target, STARTED, e.detail, e.claim, e.key),
    )
    if row is not None:
        return attrs.evolve(e, id=int(row[0]), result=STARTED), True
    existing = tx.one(
        f"SELECT {AUDIT_COLUMNS} FROM audit a WHERE a.claim = ?", (e.claim,)
    )
    assert existing is not None
    found = _audit_from_row(existing)
    if found.result != AUDIT_FAILED:
        return found, False
    # The earlier attempt failed: this one takes its claim over.
    tx.execute(
        "UPDATE audit SET at = ?, actor = ?, result = ?, detail = ?, outcome = '', "
        "request_key = ?, finished_at = NULL WHERE id = ?",
        (e.at, e.actor, STARTED, e.detail, e.key, found.id),
    )
    return attrs.evolve(e, id=found.id, result=STARTED), True


def job_finish_audit(
    tx: Tx, entry_id: int, result: str, detail: str, outcome: str, at: float
) -> AuditEntry:
    if not tx.rowcount(
        "UPDATE audit SET result = ?, detail = ?, outcome = ?, finished_at = ? "
        "WHERE id = ?",
        (result, detail, outcome, at, entry_id),
    ):
        raise NotFoundError(f"no audit entry {entry_id}")
    return _get_audit(tx, entry_id)


def job_search_audit(tx: Tx, f: AuditFilter, page: PageRequest) -> Page[AuditEntry]:
    w = Where()
    if f.since is not None:
        w.add("a.at >= ?", f.since)
    if f.until is not None:
        w.add("a.at < ?", f.until)
    for column, value in (
        ("a.actor", f.actor),
        ("a.action", f.action),
        ("a.target", f.target),
    ):
        if value is not None:
            w.add(f"{column} = ?", value)
    total = tx.one(f"SELECT COUNT(*) FROM audit a {w.sql()}", w.params)
    extra, extra_params = keyset(page.cursor, "a", int, "a.at", "a.id")
    rows = tx.all(
        f"SELECT {AUDIT_COLUMNS} FROM audit a {w.sql(extra)} "
        "ORDER BY a.at DESC, a.id DESC LIMIT ?",
        [*w.params, *extra_params, page.limit + 1],
    )
    more = len(rows) > page.limit
    items = tuple(_audit_from_row(r) for r in rows[: page.limit])
    last = items[-1] if items else None
    return Page(
        items=items,
        total=int(total[0]) if total else 0,
        next_cursor=encode_cursor("a", last.at, last.id)
        if more and last and last.id is not None
        else None,
    )
