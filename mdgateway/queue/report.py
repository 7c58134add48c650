# -*- test-case-name: tests.test_history -*-
"""
The pipeline's report of what happened to each message copy, kept in the
store (email history, quarantine) and in the log.

Recording never stands in the way of mail: a store that fails is logged
loudly, and delivery goes on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mdgateway.message.headers import read_summary
from mdgateway.policy.rules import Rule
from mdgateway.queue.copies import CopyOutcome, Delivery
from mdgateway.queue.entry import SpoolEntry
from mdgateway.queue.history import IHistory
from mdgateway.relay.delivery import RecipientOutcome, Status
from mdgateway.store.interfaces import (
    DeliveryStatus,
    IStore,
    MessageStatus,
    PartVerdict,
    ReceivedMessage,
    RecipientResult,
    ScanVerdict,
)

log = Logger()

_DELIVERY = {
    Status.DELIVERED: DeliveryStatus.DELIVERED,
    Status.DEFERRED: DeliveryStatus.DEFERRED,
    Status.FAILED: DeliveryStatus.BOUNCED,
}


def _verdict(outcome: CopyOutcome) -> ScanVerdict | None:
    if outcome.result.startswith("Blocked"):
        return ScanVerdict.BLOCKED
    if outcome.sanitized:
        return ScanVerdict.SANITIZED
    if outcome.result == "Allowed":
        return ScanVerdict.ALLOWED
    return None


def _summary(path: str) -> tuple[str, str]:
    with open(path, "rb") as f:
        summary = read_summary(f)
    return summary.subject or "", summary.message_id or ""


@implementer(IHistory)
class StoreHistory:
    """
    History in an L{IStore}, one record per message copy.
    """

    def __init__(
        self,
        store: IStore,
        reactor: Any,
        threadpool: ThreadPool,
        *,
        instance: str = "",
        quarantine_days: float | None = 30.0,
        backlog: int = 2000,
    ) -> None:
        self.store = store
        self.reactor = reactor
        self.threadpool = threadpool
        self.instance = instance
        self.quarantine_days = quarantine_days
        self.backlog = backlog
        self._chains: dict[str, Deferred[None]] = {}
        self._pending = 0
        self._room: list[Deferred[None]] = []

    async def _safely(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except Exception:
            log.failure("history: could not record {what}", what=what)
            return None

    async def _later(
        self, copy_id: str, what: str, call: Callable[[], Awaitable[Any]]
    ) -> None:
        """
        Record in the background, in order for each copy, so the pipeline
        never waits on the database; only when the backlog is full does the
        caller wait for room.
        """
        while self._pending >= self.backlog:
            room: Deferred[None] = Deferred()
            self._room.append(room)
            await room
        self._pending += 1
        previous = self._chains.get(copy_id)

        async def run() -> None:
            if previous is not None:
                await previous
            await self._safely(what, call)

        step: Deferred[None] = Deferred.fromCoroutine(run())
        self._chains[copy_id] = step

        def done(_: object) -> None:
            self._pending -= 1
            if self._chains.get(copy_id) is step:
                del self._chains[copy_id]
            if self._room:
                self._room.pop(0).callback(None)

        step.addBoth(done)

    async def flush(self, copy_id: str) -> None:
        """
        Wait until everything recorded for C{copy_id} so far is written.
        """
        step = self._chains.get(copy_id)
        if step is not None:
            waiter: Deferred[None] = Deferred()

            def release(result: object) -> object:
                waiter.callback(None)
                return result

            step.addBoth(release)
            await waiter

    async def drain(self) -> None:
        """
        Wait until every recording in the background is written (at stop).
        """
        while self._chains:
            await self.flush(next(iter(self._chains)))

    async def received(self, entry: SpoolEntry, rule: Rule, copy_id: str) -> None:
        envelope = entry.envelope
        subject, message_id = await deferToThreadPool(
            self.reactor, self.threadpool, _summary, str(entry.message_path)
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

        async def record() -> None:
            await self.store.record_received(message)
            await self.store.update_status(
                copy_id, MessageStatus.PROCESSING, f"processing under rule {rule.name}"
            )

        await self._later(copy_id, "a received message", record)

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

        async def record() -> None:
            await self.store.record_verdicts(
                copy_id, parts, tuple(outcome.actions), _verdict(outcome)
            )
            await self.store.add_event(
                copy_id, f"{outcome.result}: {outcome.decision.value}"
            )

        await self._later(copy_id, "verdicts", record)

    async def delivered(
        self,
        entry: SpoolEntry,
        rule: Rule,
        copy_id: str,
        delivery: Delivery,
        outcomes: list[RecipientOutcome],
    ) -> None:
        if delivery.kind != "message":
            await self._later(
                copy_id,
                "an event",
                lambda: self.store.add_event(
                    copy_id,
                    f"{delivery.kind} sent: "
                    + ", ".join(f"{o.address} {o.status.value}" for o in outcomes),
                ),
            )
            return
        for o in outcomes:
            result = RecipientResult(
                recipient=o.address,
                status=_DELIVERY[o.status],
                code=o.code,
                enhanced=o.enhanced,
                text=o.text,
                upstream_queue_id=o.queue_id or None,
                server=o.server or None,
                at=self.reactor.seconds(),
            )
            await self._later(
                copy_id, "a delivery", partial(self._delivery, copy_id, result)
            )

    async def _delivery(self, copy_id: str, result: RecipientResult) -> None:
        await self.store.record_delivery(copy_id, result)

    async def quarantine(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, reason: str
    ) -> None:
        expires = None
        if self.quarantine_days:
            expires = self.reactor.seconds() + self.quarantine_days * 86400
        # The original must be in the store before the spool entry goes:
        # this one is waited for, after what came before it for the copy.
        await self.flush(copy_id)
        await self._safely(
            "a quarantined original",
            lambda: self.store.quarantine(
                copy_id, reason, str(entry.message_path), expires_at=expires
            ),
        )

    async def status(
        self, entry: SpoolEntry, copy_id: str, status: MessageStatus, text: str
    ) -> None:
        await self._later(
            copy_id, "a status", lambda: self.store.update_status(copy_id, status, text)
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
