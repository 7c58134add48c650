# -*- test-case-name: tests.test_records -*-
"""
The pipeline's report of what happened to each message copy, kept in the
store (email history, quarantine) and in the log.

Every record goes through the durable outbox (L{mdgateway.store.outbox}):
a step of the pipeline counts as done only once its record is on local
disk, and the store gets it when it can. So a store outage costs the
history nothing, and a blocked original's bytes are kept (linked into the
outbox) before its spool entry is removed. A record that cannot be
written to disk fails the step, which the queue manager tries again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mdgateway.message.headers import read_summary
from mdgateway.policy.rules import Rule
from mdgateway.queue.blocking import BlockingWork
from mdgateway.queue.copies import CopyOutcome, Decision, Delivery, PartReport
from mdgateway.queue.entry import SpoolEntry
from mdgateway.queue.history import IHistory
from mdgateway.relay.delivery import RecipientOutcome, Status
from mdgateway.scan.verdict import FROM_CORE_HASH, FROM_VERDICT_CACHE
from mdgateway.store.interfaces import (
    DeliveryStatus,
    MessageStatus,
    PartVerdict,
    ReceivedMessage,
    RecipientDelivery,
    ScanVerdict,
    overall_verdict,
)
from mdgateway.store.outbox import Outbox
from mdgateway.store.owed import (
    OwedDelivery,
    OwedEvent,
    OwedReceived,
    OwedStatus,
    OwedVerdicts,
)
from mdgateway.store.upstream import parse_upstream_queue_id

log = Logger()

_DELIVERY = {
    Status.DELIVERED: DeliveryStatus.DELIVERED,
    Status.DEFERRED: DeliveryStatus.DEFERRED,
    Status.FAILED: DeliveryStatus.BOUNCED,
}

#: Results that mean Core's verdict was not acted on as given.
_NOT_A_VERDICT = ("Failed/", "Bypassed/", "Skipped/")


#: How the history words a verdict that is not a new scan, by
#: L{mdgateway.scan.verdict.Verdict.cache}.
_REUSED = {
    FROM_VERDICT_CACHE: "reused from the verdict cache",
    FROM_CORE_HASH: "from Core's hash lookup",
}


def reused_verdicts(parts: Iterable[PartReport]) -> tuple[str, ...]:
    """
    One history line per part whose verdict was not a new scan, e.g.
    C{verdict of part 2 (a.pdf) reused from the verdict cache (Core
    data_id ...)}.
    """
    return tuple(
        f"verdict of part {p.part_id} ({p.filename}) {_REUSED.get(p.cache, p.cache)}"
        + (f" (Core data_id {p.data_id})" if p.data_id else "")
        for p in parts
        if p.cache
    )


def copy_verdict(
    outcome: CopyOutcome, parts: tuple[PartVerdict, ...]
) -> ScanVerdict | None:
    """
    The history verdict of a processed copy: Blocked when Core blocked a
    part; none for a copy that failed, waits for a retry, was bypassed or
    skipped, or has a part Core never judged; else what the parts add up
    to (Sanitized when Deep CDR rebuilt a part).
    """
    if outcome.result.startswith("Blocked"):
        return ScanVerdict.BLOCKED
    if outcome.decision in (Decision.RETRY, Decision.FAIL):
        return None
    if outcome.result.startswith(_NOT_A_VERDICT):
        return None
    verdict = overall_verdict(parts)
    if verdict is ScanVerdict.ALLOWED and outcome.sanitized:
        return ScanVerdict.SANITIZED
    return verdict


def _summary(path: str) -> tuple[str, str]:
    with open(path, "rb") as f:
        summary = read_summary(f)
    return summary.subject or "", summary.message_id or ""


@implementer(IHistory)
class StoreHistory:
    """
    History in the store, one record per message copy, through an outbox.
    """

    def __init__(
        self,
        outbox: Outbox,
        reactor: IReactorTime,
        threadpool: ThreadPool,
        *,
        instance: str = "",
        quarantine_days: float | None = 30.0,
    ) -> None:
        self.outbox = outbox
        self.reactor = reactor
        self._threads = IReactorFromThreads(reactor)
        self.threadpool = threadpool
        self._blocking = BlockingWork(self._threads, threadpool)
        self.instance = instance
        self.quarantine_days = quarantine_days

    async def received(self, entry: SpoolEntry, rule: Rule, copy_id: str) -> None:
        envelope = entry.envelope
        subject, message_id = await self._blocking.run(
            entry.size, _summary, str(entry.message_path)
        )
        message = ReceivedMessage(
            id=copy_id,
            queue_id=entry.queue_id,
            received_at=envelope.received_at,
            client_address=envelope.client_address or "",
            helo=envelope.client_helo or "",
            sender=envelope.sender,
            recipients=tuple(
                r.address for r in envelope.recipients if r.rule == rule.name
            ),
            rule=rule.name,
            direction=rule.direction,
            size=entry.size,
            subject=subject,
            message_id_header=message_id,
            instance=self.instance,
            parent_id=envelope.extra.get("about"),
        )
        await self.outbox.append(
            OwedReceived(
                message,
                f"received from {message.helo} [{message.client_address}]",
                self.reactor.seconds(),
                MessageStatus.PROCESSING,
                f"processing under rule {rule.name}",
            )
        )

    async def copy_processed(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, outcome: CopyOutcome
    ) -> None:
        parts = tuple(
            PartVerdict(
                part_id=p.part_id,
                content_type=p.content_type,
                size=p.size,
                result=p.result,
                filename=p.filename,
                data_id=p.data_id or None,
                core_url=p.core_url or None,
                blocked_reason=p.blocked_reason or None,
                sanitized=p.sanitized,
                dlp_hits=(f"{p.dlp_hits} sensitive data hit(s)",) if p.dlp_hits else (),
            )
            for p in outcome.parts
        )
        await self.outbox.append(
            OwedVerdicts(
                copy_id,
                parts,
                (*outcome.actions, *reused_verdicts(outcome.parts)),
                copy_verdict(outcome, parts),
                self.reactor.seconds(),
                f"{outcome.result}: {outcome.decision.value}",
            )
        )

    async def delivered(
        self,
        entry: SpoolEntry,
        rule: Rule,
        copy_id: str,
        delivery: Delivery,
        outcomes: list[RecipientOutcome],
    ) -> None:
        now = self.reactor.seconds()
        if delivery.kind != "message":
            await self.outbox.append(
                OwedEvent(
                    copy_id,
                    f"{delivery.kind} sent: "
                    + ", ".join(f"{o.address} {o.status.value}" for o in outcomes),
                    now,
                )
            )
            return
        for o in outcomes:
            upstream = o.queue_id or None
            if upstream is None and o.code is not None and 200 <= o.code < 300:
                upstream = parse_upstream_queue_id(o.text)
            result = RecipientDelivery(
                recipient=o.address,
                status=_DELIVERY[o.status],
                code=o.code,
                enhanced=o.enhanced,
                text=o.text,
                upstream_queue_id=upstream,
                server=o.server or None,
                at=now,
            )
            await self.outbox.append(OwedDelivery(copy_id, result, now))

    async def quarantine(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, reason: str
    ) -> None:
        now = self.reactor.seconds()
        expires = None
        if self.quarantine_days:
            expires = now + self.quarantine_days * 86400
        # Returns once the original's bytes are kept in the outbox: only
        # then may the spool entry go.
        await self.outbox.quarantine(
            copy_id, reason, str(entry.message_path), now, expires
        )

    async def status(
        self, entry: SpoolEntry, copy_id: str, status: MessageStatus, text: str
    ) -> None:
        await self.outbox.append(
            OwedStatus(copy_id, status, text, self.reactor.seconds())
        )


@implementer(IHistory)
class MetricsHistory:
    """
    The pipeline's events as Prometheus metrics.
    """

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics

    async def received(self, entry: SpoolEntry, rule: Rule, copy_id: str) -> None:
        return None

    async def copy_processed(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, outcome: CopyOutcome
    ) -> None:
        metrics = self.metrics
        metrics.verdict(outcome.result.split("/", 1)[0])
        if outcome.sanitized:
            metrics.cdr("sanitized")
        for part in outcome.parts:
            if part.dlp_hits:
                metrics.dlp("redacted" if part.action == "sanitized" else "hits")

    async def delivered(
        self,
        entry: SpoolEntry,
        rule: Rule,
        copy_id: str,
        delivery: Delivery,
        outcomes: list[RecipientOutcome],
    ) -> None:
        for o in outcomes:
            self.metrics.delivery(rule.relay_profile.name, o.code)

    async def quarantine(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, reason: str
    ) -> None:
        return None

    async def status(
        self, entry: SpoolEntry, copy_id: str, status: MessageStatus, text: str
    ) -> None:
        return None
