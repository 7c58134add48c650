# -*- test-case-name: tests.test_queue_planner -*-
"""
What the queue manager knows about a spooled message between attempts:
per-recipient outcomes, attempts, warnings, and when to try next.

It is kept as JSON beside the spool entry (L{Spool.write_state}), replaced
atomically after every step, so a restart never resends to a recipient
already delivered and never forgets that a bounce went out.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

#: The state format this code writes; it reads this and older ones.
STATE_VERSION = 2


class StateFormatError(ValueError):
    """
    Delivery state JSON this version cannot read.
    """


class RecipientStatus(enum.Enum):
    """
    Where one recipient stands.
    """

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    BLOCKED = "blocked"

    @property
    def final(self) -> bool:
        return self is not RecipientStatus.PENDING


def _optional_int(value: object) -> int | None:
    return value if type(value) is int else None


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _optional_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@attrs.frozen
class RecipientState:
    """
    One recipient's last outcome.

    @ivar status: where it stands.
    @ivar code: the last SMTP reply code (the relay's, or ours).
    @ivar enhanced: the enhanced status code that went with it.
    @ivar text: what happened, for people and for the DSN.
    @ivar server: the relay server that answered, if any.
    @ivar queue_id: the next hop's id for the message, if it said one.
    @ivar at: when it happened.
    @ivar result: the copy's verdict summary when it was relayed.
    """

    status: RecipientStatus = RecipientStatus.PENDING
    code: int | None = None
    enhanced: str | None = None
    text: str = ""
    server: str | None = None
    queue_id: str | None = None
    at: float | None = None
    result: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"status": self.status.value}
        for name in ("code", "enhanced", "server", "queue_id", "at", "result"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        if self.text:
            data["text"] = self.text
        return data

    @classmethod
    def from_json(cls, data: object) -> RecipientState:
        if not isinstance(data, Mapping):
            raise StateFormatError(f"a recipient's state is not an object: {data!r}")
        try:
            status = RecipientStatus(data.get("status", "pending"))
        except ValueError:
            raise StateFormatError(f"unknown status {data.get('status')!r}") from None
        return cls(
            status=status,
            code=_optional_int(data.get("code")),
            enhanced=_optional_str(data.get("enhanced")),
            text=_optional_str(data.get("text")) or "",
            server=_optional_str(data.get("server")),
            queue_id=_optional_str(data.get("queue_id")),
            at=_optional_float(data.get("at")),
            result=_optional_str(data.get("result")),
        )

    def dsn_record(self) -> dict[str, Any]:
        """
        The fields the DSN writer reads (L{mdgateway.queue.bounces}).
        """
        return self.to_json()


def _frozen_recipients(
    value: Mapping[str, RecipientState],
) -> Mapping[str, RecipientState]:
    return MappingProxyType(dict(value))


def _frozen_copies(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


@attrs.frozen
class DeliveryState:
    """
    The queue manager's record of one spooled message.

    @ivar received_at: when the message was accepted (its lifetime counts
        from here).
    @ivar bounceable: whether a failure may be reported to the sender (not
        for the null sender, nor for our own bounces).
    @ivar recipients: address to its state, in envelope order.
    @ivar attempts: processing and delivery attempts made so far.
    @ivar next_attempt_at: when the next attempt is due (L{None}: now).
    @ivar warned: whether the sender got a delay warning.
    @ivar bounced: whether the report about the failed recipients went out.
    @ivar copies: per security-rule copy, what processing left for the
        deliveries still to come (verdicts, the rebuilt message).
    @ivar held_by: the operator who put the message on hold (nothing is
        attempted while it is set), or L{None}.
    @ivar held_at: when the hold began.
    @ivar held_for: seconds spent on hold by earlier holds, which do not
        count against the lifetime or the delay warning.
    """

    received_at: float
    bounceable: bool
    recipients: Mapping[str, RecipientState] = attrs.field(converter=_frozen_recipients)
    attempts: int = 0
    next_attempt_at: float | None = None
    warned: bool = False
    bounced: bool = False
    copies: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_copies)
    held_by: str | None = None
    held_at: float | None = None
    held_for: float = 0.0

    @classmethod
    def fresh(
        cls, received_at: float, addresses: Iterable[str], bounceable: bool
    ) -> DeliveryState:
        return cls(
            received_at=received_at,
            bounceable=bounceable,
            recipients={a: RecipientState() for a in addresses},
        )

    # -- queries -------------------------------------------------------------------

    def with_status(self, status: RecipientStatus) -> list[str]:
        """
        The addresses in C{status}, in envelope order.
        """
        return [a for a, r in self.recipients.items() if r.status is status]

    @property
    def pending(self) -> list[str]:
        return self.with_status(RecipientStatus.PENDING)

    @property
    def failed(self) -> list[str]:
        return self.with_status(RecipientStatus.FAILED)

    @property
    def held(self) -> bool:
        return self.held_by is not None

    # -- changes ---------------------------------------------------------------------

    def update(self, address: str, **changes: Any) -> DeliveryState:
        """
        A state in which C{address}'s record has C{changes}.
        """
        recipients = dict(self.recipients)
        recipients[address] = attrs.evolve(recipients[address], **changes)
        return attrs.evolve(self, recipients=recipients)

    def update_all(self, addresses: Iterable[str], **changes: Any) -> DeliveryState:
        state = self
        for address in addresses:
            state = state.update(address, **changes)
        return state

    # -- JSON ------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": STATE_VERSION,
            "received_at": self.received_at,
            "bounceable": self.bounceable,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "warned": self.warned,
            "bounced": self.bounced,
            "recipients": {a: r.to_json() for a, r in self.recipients.items()},
            "copies": dict(self.copies),
        }
        # Written only when set: a version without holds reads the rest
        # (it loses the hold, never the delivery state).
        if self.held_by is not None:
            data["held_by"] = self.held_by
            data["held_at"] = self.held_at
        if self.held_for:
            data["held_for"] = self.held_for
        return data

    @classmethod
    def from_json(
        cls, data: object, *, received_at: float, bounceable: bool
    ) -> DeliveryState:
        """
        Read a state written by this or an older version.

        @param received_at: from the envelope, for version 1 states that
            did not carry it.
        @param bounceable: idem.
        """
        if not isinstance(data, Mapping):
            raise StateFormatError("the delivery state is not an object")
        version = data.get("version", 1)
        if type(version) is not int or not 1 <= version <= STATE_VERSION:
            raise StateFormatError(f"unknown delivery state version {version!r}")
        recipients = data.get("recipients")
        if not isinstance(recipients, Mapping):
            raise StateFormatError("the delivery state has no recipients")
        copies = data.get("copies", {})
        attempts = data.get("attempts", 0)
        return cls(
            received_at=_optional_float(data.get("received_at")) or received_at,
            bounceable=bool(data.get("bounceable", bounceable)),
            recipients={
                str(a): RecipientState.from_json(r) for a, r in recipients.items()
            },
            attempts=attempts if type(attempts) is int and attempts >= 0 else 0,
            next_attempt_at=_optional_float(data.get("next_attempt_at")),
            warned=data.get("warned") is True,
            bounced=data.get("bounced") is True,
            copies=copies if isinstance(copies, Mapping) else {},
            held_by=_optional_str(data.get("held_by")),
            held_at=_optional_float(data.get("held_at")),
            held_for=max(0.0, _optional_float(data.get("held_for")) or 0.0),
        )
