# -*- test-case-name: tests.test_dsn -*-
"""
The queue manager's bounces and delay warnings: per-recipient delivery
records turned into a delivery status notification file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from mdgateway.message.dsn import (
    DsnMessage,
    DsnSuppressedError,
    RecipientReport,
    write_dsn,
)
from mdgateway.queue.envelope import Envelope

log = Logger()

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def dsn_result(
    address: str, record: Mapping[str, Any], delayed: bool, retry_until: float
) -> RecipientReport:
    """
    One recipient's delivery record as a DSN entry: the relay's own
    enhanced status when it fits the report's class, a generic one when not.
    """
    code = record.get("code")
    enhanced = str(record.get("enhanced") or "")
    text = str(record.get("text") or "")
    valid = _ENHANCED.fullmatch(enhanced) is not None
    if delayed:
        status = enhanced if valid and enhanced.startswith("4.") else "4.0.0"
    else:
        status = enhanced if valid and enhanced[:2] in ("4.", "5.") else "5.0.0"
    server = str(record.get("server") or "")
    remote = server.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]") or None
    return RecipientReport(
        address,
        "delayed" if delayed else "failed",
        status,
        remote_mta=remote if server and not server.startswith("maildir") else None,
        diagnostic_code=f"smtp; {code} {enhanced} {text}".strip()
        if code
        else text or None,
        last_attempt=record.get("at"),
        will_retry_until=retry_until if delayed else None,
    )


class IBounceWriter(Interface):
    """
    Where the queue manager gets its bounces and delay warnings written.
    """

    def write(
        message_path: str,  # noqa: N805
        envelope: Envelope,
        results: Mapping[str, Mapping[str, Any]],
        path: str,
        delayed: bool,
    ) -> DsnMessage | None:
        """
        Write the report about C{results} into the new file C{path}
        (blocking); L{None} when no report is due.
        """


@implementer(IBounceWriter)
class DsnWriter:
    """
    Writes the DSN for a copy's failed or delayed recipients (blocking:
    the queue manager runs it in a worker thread).

    @param reporting_mta: the name the report is from (read at each call,
        so a reload applies).
    @param lifetime: how long a message is retried (idem).
    """

    def __init__(
        self,
        clock: IReactorTime,
        reporting_mta: Callable[[], str],
        lifetime: Callable[[], float],
    ) -> None:
        self._clock = clock
        self._reporting_mta = reporting_mta
        self._lifetime = lifetime

    def write(
        self,
        message_path: str,
        envelope: Envelope,
        results: Mapping[str, Mapping[str, Any]],
        path: str,
        delayed: bool,
    ) -> DsnMessage | None:
        """
        Write the DSN for C{results} into C{path}; L{None} when none is due
        (a null sender, or what RFC 3464 suppresses).
        """
        retry_until = envelope.received_at + self._lifetime()
        try:
            return write_dsn(
                path,
                message_path,
                envelope,
                [dsn_result(a, r, delayed, retry_until) for a, r in results.items()],
                reporting_mta=self._reporting_mta(),
                now=self._clock.seconds(),
                arrival_date=envelope.received_at,
            )
        except DsnSuppressedError as e:
            log.info(
                "no DSN for {queue_id}: {reason}",
                queue_id=envelope.queue_id,
                reason=str(e),
            )
            return None
