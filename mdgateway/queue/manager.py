# -*- test-case-name: tests.test_pipeline -*-
"""
The queue manager: every spooled message from 250 to done.

For each entry it processes one copy per security rule, relays what the
rule delivers, keeps per-recipient state in the spool (so a restart never
resends to a recipient already delivered), retries with exponential
backoff, bounces what fails for good, and removes the entry last.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from mdgateway.message.headers import format_field
from mdgateway.message.marker import MARKER_HEADER, body_digest
from mdgateway.policy.rules import Policy, Rule
from mdgateway.queue.bounces import IBounceWriter
from mdgateway.queue.entry import SCRATCH, SpoolEntry
from mdgateway.queue.envelope import Envelope, Recipient
from mdgateway.queue.loopguard import ILoopGuard
from mdgateway.queue.processing import (
    CopyJob,
    CopyOutcome,
    CopyProcessor,
    Decision,
    Delivery,
)
from mdgateway.queue.spool import Spool
from mdgateway.relay.delivery import (
    Outgoing,
    RecipientOutcome,
    Relay,
    RelayRecipient,
    Status,
)
from mdgateway.store.interfaces import MessageStatus, copy_id

log = Logger()

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
BLOCKED = "blocked"
FINAL = frozenset({DELIVERED, FAILED, BLOCKED})

#: C{Envelope.extra["generated"]} of messages the gateway made itself (not
#: scanned): bounces, and quarantined originals released or forwarded.
GENERATED_DSN = "dsn"
GENERATED_RELEASE = "release"
UNSCANNED = frozenset({GENERATED_DSN, GENERATED_RELEASE})


@attrs.frozen
class RetryPolicy:
    """
    When to try again, in the spirit of Postfix: from five minutes, doubling
    up to an hour, for at most five days.
    """

    first: float = 300.0
    maximum: float = 3600.0
    lifetime: float = 5 * 86400.0
    #: Send a delay warning to the sender after this long (L{None}: never).
    delay_warning: float | None = None

    def delay(self, attempts: int) -> float:
        return float(min(self.first * 2 ** max(attempts - 1, 0), self.maximum))


class IHistory(Interface):
    """
    Where the pipeline reports what it did: the store's email history, or
    just the log. Every method is a coroutine; recording failures are the
    history's own business and never stop delivery.
    """

    async def received(entry: SpoolEntry, rule: Rule, copy_id: str) -> None:
        """
        A copy is being processed for the first time or again.
        """

    async def copy_processed(
        entry: SpoolEntry, rule: Rule, copy_id: str, outcome: CopyOutcome
    ) -> None:
        """
        A copy was scanned and acted on.
        """

    async def delivered(
        entry: SpoolEntry,
        rule: Rule,
        copy_id: str,
        delivery: Delivery,
        outcomes: list[RecipientOutcome],
    ) -> None:
        """
        A delivery attempt ended with these per-recipient outcomes.
        """

    async def quarantine(
        entry: SpoolEntry, rule: Rule, copy_id: str, reason: str
    ) -> None:
        """
        Keep the original of the entry (before the spool entry goes).
        """

    async def status(
        entry: SpoolEntry, copy_id: str, status: MessageStatus, text: str
    ) -> None:
        """
        The copy's status changed.
        """


@implementer(IHistory)
class LogHistory:
    """
    History as structured log events only: one decision line per copy.

    @param config_version: the version of the configuration in force, for
        the decision line.
    """

    def __init__(self, config_version: Callable[[], str] = str) -> None:
        self._config_version = config_version

    async def received(self, entry: SpoolEntry, rule: Rule, copy_id: str) -> None:
        log.debug("{message_id} processing", message_id=copy_id, rule=rule.name)

    async def copy_processed(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, outcome: CopyOutcome
    ) -> None:
        log.info(
            "{message_id} rule {rule}: {verdict}, {action}",
            message_id=copy_id,
            queue_id=entry.queue_id,
            rule=rule.name,
            direction=rule.direction,
            verdict=outcome.result,
            action=outcome.decision.value,
            config_version=self._config_version(),
            actions=list(outcome.actions),
            parts=[attrs.asdict(p) for p in outcome.parts],
        )

    async def delivered(
        self,
        entry: SpoolEntry,
        rule: Rule,
        copy_id: str,
        delivery: Delivery,
        outcomes: list[RecipientOutcome],
    ) -> None:
        for o in outcomes:
            log.info(
                "{message_id} to {recipient}: {status} ({reply})",
                message_id=copy_id,
                recipient=o.address,
                status=o.status.value,
                reply=o.reply,
                server=o.server,
                upstream_id=o.queue_id,
                kind=delivery.kind,
            )

    async def quarantine(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, reason: str
    ) -> None:
        log.info(
            "{message_id}: original quarantined ({reason})",
            message_id=copy_id,
            reason=reason,
        )

    async def status(
        self, entry: SpoolEntry, copy_id: str, status: MessageStatus, text: str
    ) -> None:
        log.info(
            "{message_id} {status}: {text}",
            message_id=copy_id,
            status=status.value,
            text=text,
        )


@implementer(IHistory)
class TeeHistory:
    """
    Report to several histories in turn (the store and the log).
    """

    def __init__(self, *histories: IHistory) -> None:
        self.histories = histories

    async def received(self, entry: SpoolEntry, rule: Rule, copy_id: str) -> None:
        for history in self.histories:
            await history.received(entry, rule, copy_id)

    async def copy_processed(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, outcome: CopyOutcome
    ) -> None:
        for history in self.histories:
            await history.copy_processed(entry, rule, copy_id, outcome)

    async def delivered(
        self,
        entry: SpoolEntry,
        rule: Rule,
        copy_id: str,
        delivery: Delivery,
        outcomes: list[RecipientOutcome],
    ) -> None:
        for history in self.histories:
            await history.delivered(entry, rule, copy_id, delivery, outcomes)

    async def quarantine(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, reason: str
    ) -> None:
        for history in self.histories:
            await history.quarantine(entry, rule, copy_id, reason)

    async def status(
        self, entry: SpoolEntry, copy_id: str, status: MessageStatus, text: str
    ) -> None:
        for history in self.histories:
            await history.status(entry, copy_id, status, text)


class QueueManager:
    """
    Processes and delivers spooled messages with bounded concurrency.
    """

    def __init__(
        self,
        *,
        spool: Spool,
        policy: Callable[[], Policy],
        processor: CopyProcessor,
        relay: Relay,
        reactor: Any,
        threadpool: ThreadPool,
        loop_guard: ILoopGuard,
        bounces: IBounceWriter,
        history: IHistory | None = None,
        retry: RetryPolicy | None = None,
        concurrency: int = 16,
    ) -> None:
        self.spool = spool
        self.policy = policy
        self.processor = processor
        self.relay = relay
        self.reactor = reactor
        self.threadpool = threadpool
        self.loop_guard = loop_guard
        self.bounces = bounces
        self.history: IHistory = history or LogHistory()
        self.retry = retry or RetryPolicy()
        self._semaphore = DeferredSemaphore(concurrency)
        self._scheduled: dict[str, IDelayedCall] = {}
        self._running: dict[str, Deferred[None]] = {}
        self._entries: dict[str, SpoolEntry] = {}
        self._stopping = False
        self.completed = 0
        #: Called for each bounce sent (metrics).
        self.on_bounce: Callable[[], object] | None = None

    # -- scheduling ------------------------------------------------------------

    async def clear_scratch(self) -> None:
        """
        Remove the scratch files a previous run of this spool left behind
        (a crash mid-processing); call before L{start}.
        """
        await self._thread(_remove_dir, os.path.join(self.spool.root, SCRATCH))

    def start(self, entries: Iterable[SpoolEntry]) -> None:
        """
        Take over the entries found in the spool at start.
        """
        for entry in entries:
            self.submit(entry)

    def submit(self, entry: SpoolEntry, delay: float = 0.0) -> None:
        """
        Handle C{entry} after C{delay} seconds.
        """
        if self._stopping:
            return
        self._entries[entry.queue_id] = entry
        old = self._scheduled.pop(entry.queue_id, None)
        if old is not None and old.active():
            old.cancel()
        self._scheduled[entry.queue_id] = self.reactor.callLater(
            delay, self._start, entry
        )

    def retry_now(self, queue_id: str) -> bool:
        """
        Try an entry now instead of at its next attempt time.
        """
        entry = self._entries.get(queue_id)
        if entry is None or queue_id in self._running:
            return entry is not None
        self.submit(entry)
        return True

    def next_attempt(self, queue_id: str) -> float | None:
        call = self._scheduled.get(queue_id)
        return call.getTime() if call is not None and call.active() else None

    def _start(self, entry: SpoolEntry) -> None:
        self._scheduled.pop(entry.queue_id, None)
        if entry.queue_id in self._running or self._stopping:
            return
        d = self._semaphore.run(lambda: Deferred.fromCoroutine(self._handle(entry)))
        self._running[entry.queue_id] = d

        def done(result: object) -> None:
            self._running.pop(entry.queue_id, None)

        def failed(failure: Failure) -> None:
            log.failure(
                "message {message_id}: unexpected error; will retry",
                failure,
                message_id=entry.queue_id,
            )
            self.submit(entry, self.retry.first)

        d.addErrback(failed)
        d.addBoth(done)

    async def stop(self) -> None:
        """
        Stop scheduling and wait for the entries in hand.
        """
        self._stopping = True
        for call in self._scheduled.values():
            if call.active():
                call.cancel()
        self._scheduled.clear()
        for d in list(self._running.values()):
            try:
                await d
            except Exception:
                pass
        await self.relay.close()

    @property
    def depth(self) -> int:
        return len(self._entries)

    # -- one entry ---------------------------------------------------------------

    async def _thread(self, function: Callable[..., Any], *args: Any) -> Any:
        return await deferToThreadPool(self.reactor, self.threadpool, function, *args)

    def _fresh_state(self, envelope: Envelope) -> dict[str, Any]:
        return {
            "version": 1,
            "attempts": 0,
            "warned": False,
            "recipients": {r.address: {"status": PENDING} for r in envelope.recipients},
        }

    async def _handle(self, entry: SpoolEntry) -> None:
        envelope = entry.envelope
        state = await self.spool.read_state(entry) or self._fresh_state(envelope)
        now = self.reactor.seconds()
        state["attempts"] = int(state.get("attempts", 0)) + 1
        generated = envelope.extra.get("generated") in UNSCANNED
        markers = (
            0
            if generated
            else await self._thread(
                self.loop_guard.count_valid,
                str(entry.message_path),
                now,
                _received_digest(envelope),
            )
        )
        for rule, recipients in self._copies(entry, state):
            if rule is None:
                for r in recipients:
                    state["recipients"][r.address].update(
                        status=PENDING,
                        text="the security rule of this recipient no longer exists",
                    )
                continue
            await self._copy(
                entry, state, rule, recipients, skip=generated or markers >= 1
            )
            await self.spool.write_state(entry, state)
        await self._conclude(entry, state)

    def _copies(
        self, entry: SpoolEntry, state: dict[str, Any]
    ) -> list[tuple[Rule | None, list[Recipient]]]:
        policy = self.policy()
        groups: dict[str | None, list[Recipient]] = {}
        for r in entry.envelope.recipients:
            if state["recipients"].get(r.address, {}).get("status", PENDING) in FINAL:
                continue
            groups.setdefault(r.rule, []).append(r)
        return [
            (policy.rule_named(name) if name else None, recipients)
            for name, recipients in groups.items()
        ]

    async def _copy(
        self,
        entry: SpoolEntry,
        state: dict[str, Any],
        rule: Rule,
        recipients: list[Recipient],
        skip: bool,
    ) -> None:
        names = list(dict.fromkeys(r.rule or "" for r in entry.envelope.recipients))
        security_id = copy_id(entry.queue_id, names.index(rule.name) + 1)
        now = self.reactor.seconds()
        workdir = os.path.join(self.spool.root, SCRATCH, security_id)
        await self.history.received(entry, rule, security_id)
        await self._thread(_fresh_dir, workdir)
        try:
            if skip:
                # Relayed once more, unscanned and unchanged but for a new
                # marker: if it comes back yet again it carries two valid
                # markers and the SMTP edge refuses it as a loop.
                body = _received_digest(entry.envelope) or await self._thread(
                    body_digest, str(entry.message_path)
                )
                prefix = format_field(
                    MARKER_HEADER, self.loop_guard.make(security_id, now, body)
                )
                outcome = CopyOutcome(
                    Decision.DELIVER,
                    "Skipped/AlreadyProcessed",
                    (Delivery(str(entry.message_path), prefix),),
                    actions=("already processed by this gateway: relayed unscanned",),
                )
            else:
                job = CopyJob(
                    str(entry.message_path),
                    workdir,
                    rule,
                    security_id,
                    entry.envelope.sender,
                    tuple(r.address for r in recipients),
                    partial(self.loop_guard.make, security_id, now),
                )
                outcome = await self.processor.process(job)
            await self.history.copy_processed(entry, rule, security_id, outcome)
            if outcome.quarantine is not None:
                await self.history.quarantine(
                    entry, rule, security_id, outcome.quarantine
                )
            await self._act(entry, state, rule, security_id, recipients, outcome)
            status, text = _copy_status(
                outcome, [state["recipients"][r.address] for r in recipients]
            )
            await self.history.status(entry, security_id, status, text)
        finally:
            await self._thread(_remove_dir, workdir)

    async def _act(
        self,
        entry: SpoolEntry,
        state: dict[str, Any],
        rule: Rule,
        security_id: str,
        recipients: list[Recipient],
        outcome: CopyOutcome,
    ) -> None:
        now = self.reactor.seconds()
        records = state["recipients"]
        if outcome.decision is Decision.RETRY:
            for r in recipients:
                records[r.address].update(
                    status=PENDING,
                    code=451,
                    enhanced="4.3.0",
                    text=f"scan deferred ({outcome.condition}): {outcome.detail}",
                    at=now,
                )
            return
        if outcome.decision is Decision.FAIL:
            for r in recipients:
                records[r.address].update(
                    status=FAILED,
                    code=554,
                    enhanced="5.7.0",
                    text=f"message could not be scanned ({outcome.condition})",
                    at=now,
                )
            return
        main_status = BLOCKED if outcome.decision is Decision.BLOCK else None
        for delivery in outcome.deliveries:
            outgoing = self._outgoing(entry, recipients, delivery)
            outcomes = await self.relay.deliver(rule.relay_profile, outgoing)
            await self.history.delivered(entry, rule, security_id, delivery, outcomes)
            if delivery.kind != "message":
                continue
            for o in outcomes:
                status = {
                    Status.DELIVERED: DELIVERED,
                    Status.FAILED: FAILED,
                    Status.DEFERRED: PENDING,
                }[o.status]
                records[o.address].update(
                    status=status,
                    code=o.code,
                    enhanced=o.enhanced,
                    text=o.text,
                    server=o.server,
                    queue_id=o.queue_id,
                    at=now,
                    result=outcome.result,
                )
        if main_status is not None:
            for r in recipients:
                records[r.address].update(
                    status=main_status, text=f"blocked: {outcome.result}", at=now
                )

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

    async def _conclude(self, entry: SpoolEntry, state: dict[str, Any]) -> None:
        records = state["recipients"]
        now = self.reactor.seconds()
        age = now - entry.envelope.received_at
        pending = [
            a for a, r in records.items() if r.get("status", PENDING) not in FINAL
        ]
        if pending and age >= self.retry.lifetime:
            for address in pending:
                last = records[address].get("text", "")
                records[address].update(
                    status=FAILED,
                    code=554,
                    enhanced="5.4.7",
                    text=f"delivery time expired; last problem: {last}",
                    at=now,
                )
            pending = []
        if pending:
            if (
                self.retry.delay_warning is not None
                and not state.get("warned")
                and age >= self.retry.delay_warning
            ):
                await self._bounce(entry, state, delayed=True)
                state["warned"] = True
            await self.spool.write_state(entry, state)
            delay = self.retry.delay(int(state["attempts"]))
            for rule, _ in self._copies(entry, state):
                if rule is not None:
                    until = self.relay.throttled_until(rule.relay_profile)
                    if until:
                        delay = max(delay, until - now)
            self.submit(entry, delay)
            log.info(
                "{message_id} deferred for {count} recipient(s); "
                "next attempt in {delay:.0f}s",
                message_id=entry.queue_id,
                count=len(pending),
                delay=delay,
            )
            return
        if any(r.get("status") == FAILED for r in records.values()):
            await self._bounce(entry, state, delayed=False)
        await self.spool.remove(entry)
        self._entries.pop(entry.queue_id, None)
        self.completed += 1

    async def _bounce(
        self, entry: SpoolEntry, state: dict[str, Any], delayed: bool
    ) -> None:
        envelope = entry.envelope
        if envelope.sender == "" or envelope.extra.get("generated") == GENERATED_DSN:
            if not delayed:
                log.info(
                    "{message_id}: failed recipients, but no bounce for a null sender",
                    message_id=entry.queue_id,
                )
            return
        wanted = PENDING if delayed else FAILED
        results = {
            a: r
            for a, r in state["recipients"].items()
            if r.get("status", PENDING) == wanted
        }
        writer = self.spool.open_writer()
        path = os.path.join(self.spool.root, SCRATCH, f"{writer.queue_id}.dsn")
        try:
            report = await self._thread(
                self.bounces.write,
                str(entry.message_path),
                envelope,
                results,
                path,
                delayed,
            )
            if report is None or not report.reported:
                await writer.abort()
                return
            await copy_file_into(writer, path)
            # The bounce goes back the way the first failed copy came in.
            first = next(r for r in envelope.recipients if r.address in results)
            dsn_envelope = Envelope(
                queue_id=writer.queue_id,
                received_at=self.reactor.seconds(),
                sender="",
                recipients=(
                    Recipient(envelope.sender, {}, first.rule, first.direction),
                ),
                mail_parameters=_dsn_parameters(report),
                extra={"generated": GENERATED_DSN, "about": entry.queue_id},
            )
            bounce = await writer.commit(dsn_envelope)
        finally:
            await self._thread(_remove_file, path)
        if not delayed and self.on_bounce is not None:
            self.on_bounce()
        log.info(
            "{message_id}: {kind} sent to {sender} as {bounce_id}",
            message_id=entry.queue_id,
            kind="delay warning" if delayed else "bounce",
            sender=envelope.sender,
            bounce_id=bounce.queue_id,
        )
        self.submit(bounce)


def _received_digest(envelope: Envelope) -> bytes | None:
    """
    The body digest the SMTP edge computed while the message streamed in
    (L{mdgateway.receive.handler.BODY_DIGEST}), so the file is not read again.
    """
    text = envelope.extra.get("body_sha256")
    try:
        return bytes.fromhex(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _copy_status(
    outcome: CopyOutcome, records: list[dict[str, Any]]
) -> tuple[MessageStatus, str]:
    """
    A copy's history status from its outcome and its recipients' states.
    """
    statuses = [r.get("status", PENDING) for r in records]
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


def _dsn_parameters(report: Any) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    if report.body_8bit:
        params["BODY"] = "8BITMIME"
    if report.smtputf8:
        params["SMTPUTF8"] = None
    return params


async def copy_file_into(writer: Any, path: str) -> None:
    """
    Stream a file into a spool writer, waiting whenever it asks to.

    The reads are 64 KiB from the page cache (the file was just written),
    so they stay on the reactor thread.
    """
    with open(path, "rb") as f:
        while chunk := f.read(65536):
            if not writer.write(chunk):
                drained: Deferred[None] = Deferred()
                writer.on_drained(partial(drained.callback, None))
                await drained


def _fresh_dir(path: str) -> None:
    _remove_dir(path)
    os.makedirs(path, mode=0o700)


def _remove_dir(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
