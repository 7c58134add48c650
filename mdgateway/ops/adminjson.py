# -*- test-case-name: tests.test_admin -*-
"""
The admin API's JSON shapes: store and operations values to plain dicts.

Kept apart from the HTTP plumbing so the shapes are defined (and reviewed)
in one place. Times are ISO-8601 strings in UTC with millisecond precision
and a C{Z} suffix (C{2026-11-05T10:00:00.250Z}), or C{null}; the API's
time filters accept them back unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from mdgateway.ops.health import summary
from mdgateway.ops.interfaces import (
    QueueActionResult,
    QueuedMessage,
    QueueEntry,
    QueueListing,
    QueueRecipient,
    Readiness,
)
from mdgateway.store.audit import AuditEntry
from mdgateway.store.interfaces import (
    MessageRecord,
    MessageSummary,
    Page,
    PartVerdict,
    QuarantineItem,
    RecipientDelivery,
    Refusal,
    TimelineEvent,
)

_T = TypeVar("_T")

JSON = dict[str, Any]


def iso(at: float | None) -> str | None:
    """
    A POSIX time as ISO-8601 UTC (C{...Z}), C{None} kept.
    """
    if at is None:
        return None
    stamp = datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def page(result: Page[_T], item: Callable[[_T], JSON]) -> JSON:
    """
    One page of search results: C{items}, C{total}, C{next_cursor}.
    """
    return {
        "items": [item(value) for value in result.items],
        "total": result.total,
        "next_cursor": result.next_cursor,
    }


def message_summary(s: MessageSummary) -> JSON:
    """
    One history row.
    """
    return {
        "id": s.id,
        "queue_id": s.queue_id,
        "received_at": iso(s.received_at),
        "client_address": s.client_address,
        "helo": s.helo,
        "sender": s.sender,
        "recipients": list(s.recipients),
        "rule": s.rule,
        "direction": s.direction,
        "size": s.size,
        "subject": s.subject,
        "message_id_header": s.message_id_header,
        "status": s.status.value,
        "verdict": s.verdict.value if s.verdict is not None else None,
        "processed_at": iso(s.processed_at),
        "delivered_at": iso(s.delivered_at),
        "finished_at": iso(s.finished_at),
        "instance": s.instance,
        "parent_id": s.parent_id,
    }


def _event(e: TimelineEvent) -> JSON:
    return {
        "at": iso(e.at),
        "text": e.text,
        "status": e.status.value if e.status is not None else None,
    }


def _part(p: PartVerdict) -> JSON:
    return {
        "part_id": p.part_id,
        "content_type": p.content_type,
        "size": p.size,
        "result": p.result,
        "filename": p.filename,
        "data_id": p.data_id,
        "core_url": p.core_url,
        "blocked_reason": p.blocked_reason,
        "sanitized": p.sanitized,
        "dlp_hits": list(p.dlp_hits),
    }


def _delivery(d: RecipientDelivery) -> JSON:
    return {
        "recipient": d.recipient,
        "status": d.status.value,
        "code": d.code,
        "enhanced": d.enhanced,
        "text": d.text,
        "upstream_queue_id": d.upstream_queue_id,
        "server": d.server,
        "at": iso(d.at),
        "attempts": d.attempts,
    }


def message_record(
    record: MessageRecord, quarantine_ids: list[str] | None = None
) -> JSON:
    """
    One history entry in full, with the ids of its quarantined originals.
    """
    out = message_summary(record.summary)
    out["timeline"] = [_event(e) for e in record.timeline]
    out["parts"] = [_part(p) for p in record.parts]
    out["actions"] = list(record.actions)
    out["deliveries"] = [_delivery(d) for d in record.deliveries]
    out["quarantine"] = list(quarantine_ids or [])
    return out


def refusal(r: Refusal) -> JSON:
    """
    One line of the refused log.
    """
    return {
        "id": r.id,
        "at": iso(r.at),
        "listener": r.listener,
        "client_address": r.client_address,
        "code": r.code,
        "enhanced": r.enhanced,
        "reason": r.reason,
        "helo": r.helo,
        "sender": r.sender,
        "recipient": r.recipient,
        "category": r.category,
        "repeats": r.repeats,
    }


def quarantine_item(q: QuarantineItem) -> JSON:
    """
    One quarantine item with the summary of its history entry.
    """
    return {
        "id": q.id,
        "reason": q.reason,
        "quarantined_at": iso(q.quarantined_at),
        "expires_at": iso(q.expires_at),
        "size": q.size,
        "sha256": q.sha256,
        "pinned": q.pinned,
        "released_at": iso(q.released_at),
        "released_by": q.released_by,
        "message": message_summary(q.message),
    }


def _queue_recipient(r: QueueRecipient) -> JSON:
    return {
        "address": r.address,
        "status": r.status,
        "rule": r.rule,
        "last_reply": r.last_reply,
    }


def queue_entry(e: QueueEntry) -> JSON:
    """
    One spooled message.
    """
    return {
        "queue_id": e.queue_id,
        "received_at": iso(e.received_at),
        "sender": e.sender,
        "size": e.size,
        "recipients": [_queue_recipient(r) for r in e.recipients],
        "attempts": e.attempts,
        "next_attempt": iso(e.next_attempt),
        "last_error": e.last_error,
        "generated": e.generated,
        "worker": e.worker,
        "process": e.worker,
        "instance": e.instance,
        "held_by": e.held_by,
        "held_at": iso(e.held_at),
    }


def queue_listing(listing: QueueListing) -> JSON:
    """
    The queue of every instance asked, with what each could tell.
    """
    return {
        "items": [queue_entry(e) for e in listing.entries],
        "total": len(listing.entries),
        "instances": [
            {
                "name": i.name,
                "this": i.this,
                "listed": i.listed,
                "total": i.total,
                "problem": i.problem,
            }
            for i in listing.instances
        ],
    }


def queued_message(m: QueuedMessage) -> JSON:
    """
    The content view of one queued message.
    """
    return {
        **queue_entry(m.entry),
        "client_address": m.client_address,
        "client_helo": m.client_helo,
        "headers": m.headers,
        "headers_complete": m.headers_complete,
        "parts": [
            {
                "part_id": p.part_id,
                "depth": p.depth,
                "content_type": p.content_type,
                "filename": p.filename,
                "disposition": p.disposition,
                "charset": p.charset,
                "transfer_encoding": p.transfer_encoding,
                "size": p.size,
                "preview": p.preview,
                "truncated": p.truncated,
            }
            for p in m.parts
        ],
        "unreliable": m.unreliable,
    }


def queue_action(r: QueueActionResult) -> JSON:
    """
    What one queue action did.
    """
    return {
        "queue_id": r.queue_id,
        "action": r.action,
        "instance": r.instance,
        "process": r.process,
        "changed": r.changed,
        "later": r.later,
        "detail": r.detail,
    }


def audit_entry(a: AuditEntry) -> JSON:
    """
    One operator action of the audit.
    """
    return {
        "id": a.id,
        "at": iso(a.at),
        "actor": a.actor,
        "action": a.action,
        "target": a.target,
        "result": a.result,
        "detail": a.detail,
        "outcome": a.outcome or None,
        "finished_at": iso(a.finished_at) if a.finished_at is not None else None,
    }


def readiness(r: Readiness) -> JSON:
    """
    The readiness verdict with its checks and reasons.
    """
    data: JSON = {
        "ready": r.ready,
        "checks": dict(r.checks),
        "reasons": list(r.reasons),
    }
    if r.details:
        data["details"] = dict(r.details)
    if r.dependencies:
        data["dependencies"] = summary(r.dependencies)
    return data


def health(r: Readiness) -> JSON:
    """
    Readiness with the shared services in full (C{/api/health}).
    """
    return {**readiness(r), "dependencies": dict(r.dependencies)}
