# -*- test-case-name: tests.test_outbox -*-
"""
Records the gateway owes the store, as values that survive a trip to disk.

Every history line, refusal and quarantined original is first written to
the local outbox (L{mdgateway.store.outbox}) and only then applied to the
store, perhaps much later (the database was down) and perhaps twice (the
gateway stopped between the commit and the outbox clean-up). So each
record carries a unique C{key}, and L{IStore.apply} applies a key at most
once: the rows a record creates carry its key, and a key already present
means the record was applied before.

L{encode} and L{decode} turn a record into JSON-able data and back; the
format is versioned so an outbox written by one release is read by the
next.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs

from mdgateway.store.interfaces import (
    DeliveryStatus,
    MessageStatus,
    PartVerdict,
    ReceivedMessage,
    RecipientDelivery,
    Refusal,
    ScanVerdict,
)

#: The outbox format this code writes; it reads this one only.
FORMAT = 1


@attrs.frozen
class OwedReceived:
    """
    L{IStore.record_received}, then the copy's status changed to
    C{status} with C{status_text} (the pipeline picks a copy up as soon as
    it is received).
    """

    message: ReceivedMessage
    text: str
    at: float
    status: MessageStatus | None = None
    status_text: str = ""


@attrs.frozen
class OwedStatus:
    """
    L{IStore.update_status}.
    """

    message_id: str
    status: MessageStatus
    text: str
    at: float


@attrs.frozen
class OwedEvent:
    """
    L{IStore.add_event}.
    """

    message_id: str
    text: str
    at: float


@attrs.frozen
class OwedVerdicts:
    """
    L{IStore.record_verdicts} with the verdict already worked out, then
    the timeline line C{text} (if any).
    """

    message_id: str
    parts: tuple[PartVerdict, ...]
    actions: tuple[str, ...]
    verdict: ScanVerdict | None
    at: float
    text: str = ""


@attrs.frozen
class OwedDelivery:
    """
    L{IStore.record_delivery} (the upstream queue id already parsed).
    """

    message_id: str
    result: RecipientDelivery
    at: float


@attrs.frozen
class OwedRefusal:
    """
    L{IStore.record_refusal}.
    """

    refusal: Refusal


@attrs.frozen
class OwedQuarantine:
    """
    L{IStore.quarantine} of the original at C{path}: a file the outbox
    keeps (a hard link to the spool entry's message) until the store has
    the original; relative paths are relative to the outbox folder.
    """

    message_id: str
    reason: str
    path: str
    at: float
    expires_at: float | None = None


OwedRecord = (
    OwedReceived
    | OwedStatus
    | OwedEvent
    | OwedVerdicts
    | OwedDelivery
    | OwedRefusal
    | OwedQuarantine
)


@attrs.frozen
class Owed:
    """
    One record and the key that makes applying it idempotent.
    """

    key: str
    record: OwedRecord

    @classmethod
    def new(cls, record: OwedRecord) -> Owed:
        """
        C{record} with a fresh random key.
        """
        return cls(new_key(), record)


def new_key() -> str:
    """
    A fresh record key: 32 hex digits, also usable as a quarantine item id.
    """
    return uuid.uuid4().hex


class OwedFormatError(ValueError):
    """
    Data that is not a record this code can read.
    """


# --------------------------------------------------------------------------
# JSON


def _part(p: PartVerdict) -> dict[str, Any]:
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


def _result(r: RecipientDelivery) -> dict[str, Any]:
    return {
        "recipient": r.recipient,
        "status": r.status.value,
        "code": r.code,
        "enhanced": r.enhanced,
        "text": r.text,
        "upstream_queue_id": r.upstream_queue_id,
        "server": r.server,
        "at": r.at,
    }


def _refusal(r: Refusal) -> dict[str, Any]:
    return {
        "at": r.at,
        "listener": r.listener,
        "client_address": r.client_address,
        "code": r.code,
        "reason": r.reason,
        "enhanced": r.enhanced,
        "helo": r.helo,
        "sender": r.sender,
        "recipient": r.recipient,
        "category": r.category,
        "repeats": r.repeats,
    }


def _message(m: ReceivedMessage) -> dict[str, Any]:
    return {
        "id": m.id,
        "queue_id": m.queue_id,
        "received_at": m.received_at,
        "client_address": m.client_address,
        "helo": m.helo,
        "sender": m.sender,
        "recipients": list(m.recipients),
        "rule": m.rule,
        "direction": m.direction,
        "size": m.size,
        "subject": m.subject,
        "message_id_header": m.message_id_header,
        "instance": m.instance,
        "parent_id": m.parent_id,
    }


def encode(owed: Owed) -> dict[str, Any]:
    """
    C{owed} as JSON-able data.
    """
    r = owed.record
    data: dict[str, Any]
    if isinstance(r, OwedReceived):
        data = {
            "kind": "received",
            "message": _message(r.message),
            "text": r.text,
            "at": r.at,
            "status": None if r.status is None else r.status.value,
            "status_text": r.status_text,
        }
    elif isinstance(r, OwedStatus):
        data = {
            "kind": "status",
            "message_id": r.message_id,
            "status": r.status.value,
            "text": r.text,
            "at": r.at,
        }
    elif isinstance(r, OwedEvent):
        data = {"kind": "event", "message_id": r.message_id, "text": r.text, "at": r.at}
    elif isinstance(r, OwedVerdicts):
        data = {
            "kind": "verdicts",
            "message_id": r.message_id,
            "parts": [_part(p) for p in r.parts],
            "actions": list(r.actions),
            "verdict": None if r.verdict is None else r.verdict.value,
            "at": r.at,
            "text": r.text,
        }
    elif isinstance(r, OwedDelivery):
        data = {
            "kind": "delivery",
            "message_id": r.message_id,
            "result": _result(r.result),
            "at": r.at,
        }
    elif isinstance(r, OwedRefusal):
        data = {"kind": "refusal", "refusal": _refusal(r.refusal)}
    else:
        data = {
            "kind": "quarantine",
            "message_id": r.message_id,
            "reason": r.reason,
            "path": r.path,
            "at": r.at,
            "expires_at": r.expires_at,
        }
    return {"v": FORMAT, "key": owed.key, **data}


def decode(data: Any) -> Owed:
    """
    The record L{encode} made.

    @raise OwedFormatError: when C{data} is anything else.
    """
    try:
        if not isinstance(data, dict) or data.get("v") != FORMAT:
            raise OwedFormatError(f"not an outbox record of format {FORMAT}")
        key = data["key"]
        if not isinstance(key, str) or not key:
            raise OwedFormatError("a record without a key")
        return Owed(key, _decode_record(data))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, OwedFormatError):
            raise
        raise OwedFormatError(f"unreadable outbox record: {e!r}") from e


def _decode_record(d: dict[str, Any]) -> OwedRecord:
    kind = d["kind"]
    if kind == "received":
        m = d["message"]
        return OwedReceived(
            message=ReceivedMessage(
                id=m["id"],
                queue_id=m["queue_id"],
                received_at=float(m["received_at"]),
                client_address=m["client_address"],
                helo=m["helo"],
                sender=m["sender"],
                recipients=tuple(m["recipients"]),
                rule=m["rule"],
                direction=m["direction"],
                size=int(m["size"]),
                subject=m["subject"],
                message_id_header=m["message_id_header"],
                instance=m["instance"],
                parent_id=m["parent_id"],
            ),
            text=d["text"],
            at=float(d["at"]),
            status=None if d["status"] is None else MessageStatus(d["status"]),
            status_text=d["status_text"],
        )
    if kind == "status":
        return OwedStatus(
            d["message_id"], MessageStatus(d["status"]), d["text"], float(d["at"])
        )
    if kind == "event":
        return OwedEvent(d["message_id"], d["text"], float(d["at"]))
    if kind == "verdicts":
        return OwedVerdicts(
            message_id=d["message_id"],
            parts=tuple(
                PartVerdict(
                    part_id=p["part_id"],
                    content_type=p["content_type"],
                    size=int(p["size"]),
                    result=p["result"],
                    filename=p["filename"],
                    data_id=p["data_id"],
                    core_url=p["core_url"],
                    blocked_reason=p["blocked_reason"],
                    sanitized=bool(p["sanitized"]),
                    dlp_hits=tuple(p["dlp_hits"]),
                )
                for p in d["parts"]
            ),
            actions=tuple(d["actions"]),
            verdict=None if d["verdict"] is None else ScanVerdict(d["verdict"]),
            at=float(d["at"]),
            text=d["text"],
        )
    if kind == "delivery":
        r = d["result"]
        return OwedDelivery(
            message_id=d["message_id"],
            result=RecipientDelivery(
                recipient=r["recipient"],
                status=DeliveryStatus(r["status"]),
                code=r["code"],
                enhanced=r["enhanced"],
                text=r["text"],
                upstream_queue_id=r["upstream_queue_id"],
                server=r["server"],
                at=r["at"],
            ),
            at=float(d["at"]),
        )
    if kind == "refusal":
        f = d["refusal"]
        return OwedRefusal(
            Refusal(
                at=float(f["at"]),
                listener=f["listener"],
                client_address=f["client_address"],
                code=int(f["code"]),
                reason=f["reason"],
                enhanced=f["enhanced"],
                helo=f["helo"],
                sender=f["sender"],
                recipient=f["recipient"],
                category=f["category"],
                repeats=int(f["repeats"]),
            )
        )
    if kind == "quarantine":
        return OwedQuarantine(
            message_id=d["message_id"],
            reason=d["reason"],
            path=d["path"],
            at=float(d["at"]),
            expires_at=None if d["expires_at"] is None else float(d["expires_at"]),
        )
    raise OwedFormatError(f"unknown record kind {kind!r}")


#: L{Applied.status} values.
APPLIED = "applied"
DUPLICATE = "duplicate"
FAILED = "failed"


@attrs.frozen
class Applied:
    """
    What L{IStore.apply} did with one record.

    @ivar status: L{APPLIED}, L{DUPLICATE} (applied before; nothing
        changed) or L{FAILED} (C{error} says why; nothing kept).
    """

    key: str
    status: str
    error: str = ""
