# -*- test-case-name: tests.test_queue_manager -*-
"""
One delivery attempt of a spooled message: each security rule's copy of it
processed (or its kept outcome reused) and relayed to the recipients still
pending.

The queue manager decides I{when} (L{mdgateway.queue.planner}); this module
does the work of one attempt and says what became of each recipient, as a
new L{DeliveryState}.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mdgateway.message.digest import content_digest
from mdgateway.message.marker import MarkerCheck, MarkerCount
from mdgateway.policy.rules import Policy, Rule
from mdgateway.queue.blocking import BlockingWork
from mdgateway.queue.copies import (
    CopyJob,
    CopyOutcome,
    Decision,
    Delivery,
    ICopyProcessor,
    rule_stamp,
)
from mdgateway.queue.entry import SCRATCH, SpoolEntry
from mdgateway.queue.envelope import Envelope, Recipient
from mdgateway.queue.history import IHistory
from mdgateway.queue.loopguard import ILoopGuard
from mdgateway.queue.scanned import keep_outcome, load_outcome
from mdgateway.queue.spool import Spool
from mdgateway.queue.state import DeliveryState, RecipientState, RecipientStatus
from mdgateway.relay.delivery import Outgoing, RelayRecipient, Status
from mdgateway.relay.interfaces import IRelay
from mdgateway.store.interfaces import MessageStatus, copy_id

log = Logger()

PENDING = RecipientStatus.PENDING
DELIVERED = RecipientStatus.DELIVERED
FAILED = RecipientStatus.FAILED
BLOCKED = RecipientStatus.BLOCKED

#: C{Envelope.extra["generated"]} of messages the gateway made itself (not
#: scanned): bounces, and quarantined originals released or forwarded.
GENERATED_DSN = "dsn"
GENERATED_RELEASE = "release"
UNSCANNED = frozenset({GENERATED_DSN, GENERATED_RELEASE})

_RELAY_STATUS = {
    Status.DELIVERED: DELIVERED,
    Status.FAILED: FAILED,
    Status.DEFERRED: PENDING,
}


class CopyRunner:
    """
    Carries out attempts: for every security rule that still has pending
    recipients, the copy for that rule is processed once (the outcome is
    kept with the entry before the first delivery, so a retry only
    delivers) and relayed.
    """

    def __init__(
        self,
        *,
        spool: Spool,
        policy: Callable[[], Policy],
        processor: ICopyProcessor,
        relay: IRelay,
        reactor: IReactorTime,
        threadpool: ThreadPool,
        loop_guard: ILoopGuard,
        history: IHistory,
    ) -> None:
        self.spool = spool
        self.policy = policy
        self.processor = processor
        self.relay = relay
        self.reactor: IReactorTime = reactor
        self._threads = IReactorFromThreads(reactor)
        self.threadpool = threadpool
        self._blocking = BlockingWork(self._threads, threadpool)
        self.loop_guard = loop_guard
        self.history = history

    async def _thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """
        Work that syncs to disk: always in the pool.
        """
        return await self._blocking.pool(function, *args)

    async def _small(
        self, entry: SpoolEntry, function: Callable[..., Any], *args: Any
    ) -> Any:
        """
        File work for C{entry} that does not sync: in place for a small
        message (L{mdgateway.queue.blocking}).
        """
        return await self._blocking.run(entry.size, function, *args)

    def copies(
        self, entry: SpoolEntry, state: DeliveryState
    ) -> list[tuple[Rule | None, list[Recipient]]]:
        """
        The pending recipients grouped by the rule that took them (L{None}
        for a rule that no longer exists).
        """
        policy = self.policy()
        groups: dict[str | None, list[Recipient]] = {}
        for r in entry.envelope.recipients:
            record = state.recipients.get(r.address)
            if record is not None and record.status.final:
                continue
            groups.setdefault(r.rule, []).append(r)
        return [
            (policy.rule_named(name) if name else None, recipients)
            for name, recipients in groups.items()
        ]

    def throttled_until(self, entry: SpoolEntry, state: DeliveryState) -> float | None:
        """
        When the last relay that the pending copies go through stops asking
        us to slow down (L{None}: none does).
        """
        until = [
            self.relay.throttled_until(rule.relay_profile)
            for rule, _ in self.copies(entry, state)
            if rule is not None
        ]
        return max((u for u in until if u), default=None)

    async def attempt(self, entry: SpoolEntry, state: DeliveryState) -> DeliveryState:
        """
        One attempt at every pending recipient; the state after it (saved
        after each copy but the last, so a crash loses at most the copy in
        hand; the caller keeps the final state, or removes the entry).
        """
        envelope = entry.envelope
        now = self.reactor.seconds()
        generated = envelope.extra.get("generated") in UNSCANNED
        markers = (
            None
            if generated
            else await self._small(entry, self._check_markers, entry, now)
        )
        copies = self.copies(entry, state)
        for index, (rule, recipients) in enumerate(copies):
            if rule is None:
                state = state.update_all(
                    (r.address for r in recipients),
                    status=PENDING,
                    text="the security rule of this recipient no longer exists",
                )
                continue
            state = await self._copy(entry, state, rule, recipients, generated, markers)
            if index < len(copies) - 1:
                # The caller keeps the state after the last copy.
                await self.save(entry, state)
        return state

    async def save(self, entry: SpoolEntry, state: DeliveryState) -> None:
        await self.spool.write_state(entry, state.to_json())

    def _check_markers(self, entry: SpoolEntry, now: float) -> MarkerCount:
        """
        The markers of a spooled message, checked against its content
        digest (blocking).
        """
        path = str(entry.message_path)
        digest = received_digest(entry.envelope)
        if digest is None:
            digest = content_digest(path)
        count = self.loop_guard.check(path, now, digest)
        for check in count.invalid:
            log.info(
                "{message_id}: ignoring a {reason} loop marker for {marker_id}",
                message_id=entry.queue_id,
                reason=check.reason,
                marker_id=check.message_id,
            )
        return count

    async def _copy(
        self,
        entry: SpoolEntry,
        state: DeliveryState,
        rule: Rule,
        recipients: list[Recipient],
        generated: bool,
        markers: MarkerCount | None,
    ) -> DeliveryState:
        names = list(dict.fromkeys(r.rule or "" for r in entry.envelope.recipients))
        security_id = copy_id(entry.queue_id, names.index(rule.name) + 1)
        workdir = os.path.join(self.spool.root, SCRATCH, security_id)
        await self.history.received(entry, rule, security_id)
        record = state.copies.get(security_id)
        outcome = None
        if isinstance(record, dict) and isinstance(record.get("outcome"), dict):
            outcome = await self._small(
                entry,
                load_outcome,
                record["outcome"],
                self.spool.root,
                entry.queue_id,
                str(entry.message_path),
            )
            if outcome is None:
                log.warn(
                    "{message_id}: the kept outcome of this copy cannot be used; "
                    "processing it again",
                    message_id=security_id,
                )
                record = None
        await self._small(entry, fresh_dir, workdir)
        try:
            if outcome is None:
                outcome = await self._process(
                    entry, rule, recipients, security_id, workdir, generated, markers
                )
                outcome, state = await self._keep(entry, state, security_id, outcome)
                record = state.copies.get(security_id)
            if not (record or {}).get("recorded"):
                await self.history.copy_processed(entry, rule, security_id, outcome)
                if outcome.quarantine is not None:
                    await self.history.quarantine(
                        entry, rule, security_id, outcome.quarantine
                    )
                if record is not None:
                    state = _with_copy(state, security_id, {**record, "recorded": True})
            state = await self._act(
                entry, state, rule, security_id, recipients, outcome
            )
            status, text = copy_status(
                outcome, [state.recipients[r.address] for r in recipients]
            )
            await self.history.status(entry, security_id, status, text)
        finally:
            await self._small(entry, remove_dir, workdir)
        return state

    async def _process(
        self,
        entry: SpoolEntry,
        rule: Rule,
        recipients: list[Recipient],
        security_id: str,
        workdir: str,
        generated: bool,
        markers: MarkerCount | None,
    ) -> CopyOutcome:
        """
        Scan and act on a copy, or relay it once more unscanned when it is
        ours (generated here, or carrying a marker that allows it).
        """
        now = self.reactor.seconds()
        job = CopyJob(
            str(entry.message_path),
            workdir,
            rule,
            security_id,
            entry.envelope.sender,
            tuple(r.address for r in recipients),
            partial(self.loop_guard.make, security_id, now),
            size=entry.size,
        )
        if generated:
            return await self.processor.generated(job)
        relay: MarkerCheck | None = None
        if markers is not None:
            relay = markers.relay_once(
                rule_stamp(rule, ""), now, self.loop_guard.relay_once_max_age()
            )
            if markers.processed and relay is None:
                log.info(
                    "{message_id}: processed by this gateway before, but not "
                    "under a rule at least as strict as {rule} (or too long "
                    "ago): scanning it again",
                    message_id=security_id,
                    rule=rule.name,
                )
        if relay is not None:
            return await self.processor.relay_once(job, relay)
        return await self.processor.process(job)

    async def _keep(
        self,
        entry: SpoolEntry,
        state: DeliveryState,
        security_id: str,
        outcome: CopyOutcome,
    ) -> tuple[CopyOutcome, DeliveryState]:
        """
        Keep a final outcome (one that delivers or blocks) with the entry,
        durably, before the first delivery attempt: retries then deliver
        without scanning again.

        @return: the outcome delivering the kept files, and the state with
            its record (unchanged for an outcome not kept).
        """
        if outcome.decision not in (Decision.DELIVER, Decision.BLOCK):
            return outcome, state
        kept, data = await self._thread(
            keep_outcome,
            outcome,
            self.spool.root,
            entry.queue_id,
            security_id,
            str(entry.message_path),
        )
        state = _with_copy(state, security_id, {"outcome": data, "recorded": False})
        await self.save(entry, state)
        return kept, state

    async def _act(
        self,
        entry: SpoolEntry,
        state: DeliveryState,
        rule: Rule,
        security_id: str,
        recipients: list[Recipient],
        outcome: CopyOutcome,
    ) -> DeliveryState:
        now = self.reactor.seconds()
        addresses = [r.address for r in recipients]
        if outcome.decision is Decision.RETRY:
            return state.update_all(
                addresses,
                status=PENDING,
                code=451,
                enhanced="4.3.0",
                text=f"scan deferred ({outcome.condition}): {outcome.detail}",
                at=now,
            )
        if outcome.decision is Decision.FAIL:
            return state.update_all(
                addresses,
                status=FAILED,
                code=554,
                enhanced="5.7.0",
                text=f"message could not be scanned ({outcome.condition})",
                at=now,
            )
        for delivery in outcome.deliveries:
            outgoing = self._outgoing(entry, recipients, delivery)
            outcomes = await self.relay.deliver(rule.relay_profile, outgoing)
            await self.history.delivered(entry, rule, security_id, delivery, outcomes)
            if delivery.kind != "message":
                continue
            for o in outcomes:
                state = state.update(
                    o.address,
                    status=_RELAY_STATUS[o.status],
                    code=o.code,
                    enhanced=o.enhanced,
                    text=o.text,
                    server=o.server,
                    queue_id=o.queue_id,
                    at=now,
                    result=outcome.result,
                )
        if outcome.decision is Decision.BLOCK:
            state = state.update_all(
                addresses, status=BLOCKED, text=f"blocked: {outcome.result}", at=now
            )
        return state

    def _outgoing(
        self, entry: SpoolEntry, recipients: list[Recipient], delivery: Delivery
    ) -> Outgoing:
        envelope = entry.envelope
        params = envelope.mail_parameters
        return Outgoing(
            sender=envelope.sender,
            recipients=tuple(
                RelayRecipient(
                    r.address, r.parameters.get("NOTIFY"), r.parameters.get("ORCPT")
                )
                for r in recipients
            ),
            path=delivery.path,
            prefix=delivery.prefix,
            offset=delivery.offset,
            eight_bit=(params.get("BODY") or "").upper() == "8BITMIME",
            smtputf8="SMTPUTF8" in params,
            ret=params.get("RET"),
            envid=params.get("ENVID"),
        )


def _with_copy(
    state: DeliveryState, security_id: str, record: dict[str, Any]
) -> DeliveryState:
    return attrs.evolve(state, copies={**state.copies, security_id: record})


def received_digest(envelope: Envelope) -> bytes | None:
    """
    The content digest the SMTP edge computed while the message streamed
    in (L{mdgateway.receive.handler.CONTENT_DIGEST}), so the file is not
    read again.
    """
    text = envelope.extra.get("content_digest")
    try:
        return bytes.fromhex(text) if isinstance(text, str) else None
    except ValueError:
        return None


def copy_status(
    outcome: CopyOutcome, records: Sequence[RecipientState]
) -> tuple[MessageStatus, str]:
    """
    A copy's history status from its outcome and its recipients' states.
    """
    statuses = [r.status for r in records]
    if outcome.decision is Decision.RETRY or PENDING in statuses:
        return MessageStatus.DEFERRED, f"deferred: {outcome.detail or outcome.result}"
    if outcome.decision is Decision.FAIL:
        return MessageStatus.FAILED, f"failed: {outcome.condition}"
    if outcome.decision is Decision.BLOCK:
        if outcome.quarantine is not None:
            return MessageStatus.QUARANTINED, f"{outcome.result}, original quarantined"
        return MessageStatus.BLOCKED, outcome.result
    delivered = statuses.count(DELIVERED)
    if delivered == len(statuses):
        if outcome.result.startswith("Bypassed"):
            return MessageStatus.BYPASSED, f"delivered unscanned: {outcome.result}"
        return MessageStatus.DELIVERED, f"delivered: {outcome.result}"
    if delivered:
        return MessageStatus.PARTIALLY_DELIVERED, "some recipients bounced"
    return MessageStatus.BOUNCED, "every recipient bounced"


def fresh_dir(path: str) -> None:
    remove_dir(path)
    os.makedirs(path, mode=0o700)


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
