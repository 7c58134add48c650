# -*- test-case-name: tests.test_queue_manager -*-
"""
The queue manager: every spooled message from 250 to done.

It carries out what the pure planner (L{mdgateway.queue.planner.plan})
decides for each entry, one step at a time: attempt the pending recipients
(L{mdgateway.queue.attempt.CopyRunner}), warn the sender once of a delay,
expire what waited its lifetime, bounce what failed, wait until the next
step is due (or until an operator releases a hold), and remove the entry
last. The delivery state is saved beside the entry after every step, so a
restart never resends to a recipient already delivered, nor sends a second
bounce.

An operator's change to an entry (L{QueueManager.change}: hold, release,
delete, bounce) is applied only where the entry's own visit would save its
state, so it never races an attempt: at once when the entry is waiting,
or after the step in progress when it is being attempted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore, fail
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mdgateway.policy.rules import Policy
from mdgateway.queue.attempt import (
    GENERATED_DSN,
    GENERATED_RELEASE,
    UNSCANNED,
    CopyRunner,
    remove_dir,
)
from mdgateway.queue.blocking import BlockingWork
from mdgateway.queue.bounces import IBounceWriter
from mdgateway.queue.copies import ICopyProcessor
from mdgateway.queue.entry import SCRATCH, SpoolEntry
from mdgateway.queue.envelope import Envelope, Recipient
from mdgateway.queue.history import IHistory, LogHistory, TeeHistory
from mdgateway.queue.loopguard import ILoopGuard
from mdgateway.queue.planner import (
    Bounce,
    Deliver,
    Done,
    Expire,
    Hold,
    Retry,
    RetryPolicy,
    Warn,
    attempted,
    expired,
    plan,
    retry_now,
)
from mdgateway.queue.scanned import remove_orphans, remove_processed
from mdgateway.queue.spool import Spool
from mdgateway.queue.state import DeliveryState, StateFormatError
from mdgateway.relay.interfaces import IRelay

log = Logger()

__all__ = [
    "GENERATED_DSN",
    "Change",
    "EntryGoneError",
    "GENERATED_RELEASE",
    "UNSCANNED",
    "IHistory",
    "LogHistory",
    "QueueManager",
    "RetryPolicy",
    "TeeHistory",
    "copy_file_into",
]

#: The most plan steps one visit to an entry carries out before it waits
#: (a guard: every plan converges in a few steps).
MAX_STEPS = 16

#: An operator's change to a delivery state, given the time (see
#: L{mdgateway.queue.planner.held} and the like); it raises
#: L{NotApplicableError} when it does not apply.
Change = Callable[[DeliveryState, float], DeliveryState]


class EntryGoneError(LookupError):
    """
    The entry is not (or no longer) in this queue manager's hands: it was
    delivered, bounced or deleted meanwhile, or never queued here.
    """


class QueueManager:
    """
    Processes and delivers spooled messages with bounded concurrency.

    Messages travel in two lanes with separate slots: C{concurrency} for
    messages under C{big_message} bytes and C{big_concurrency} for the
    rest, so a few large messages being scanned never make small ones
    wait for a slot.
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
        bounces: IBounceWriter,
        history: IHistory | None = None,
        retry: RetryPolicy | None = None,
        concurrency: int = 16,
        big_message: int = 4 * 1024 * 1024,
        big_concurrency: int = 2,
    ) -> None:
        self.spool = spool
        self.relay = relay
        self.reactor = reactor
        # Adapted now, so a reactor that cannot take work back from threads
        # fails when the gateway is built, not mid-delivery.
        self._threads = IReactorFromThreads(reactor)
        self.threadpool = threadpool
        self._blocking = BlockingWork(self._threads, threadpool)
        self.bounces = bounces
        self.history: IHistory = history or LogHistory()
        self.retry = retry or RetryPolicy()
        self.runner = CopyRunner(
            spool=spool,
            policy=policy,
            processor=processor,
            relay=relay,
            reactor=reactor,
            threadpool=threadpool,
            loop_guard=loop_guard,
            history=self.history,
        )
        self._small_lane = DeferredSemaphore(concurrency)
        self._big_lane = DeferredSemaphore(big_concurrency)
        self._big_message = big_message
        self._scheduled: dict[str, IDelayedCall] = {}
        self._running: dict[str, Deferred[None]] = {}
        self._entries: dict[str, SpoolEntry] = {}
        #: Entries an operator asked to try now, before their next attempt.
        self._forced: set[str] = set()
        #: Operators' changes waiting for the entry's next safe point.
        self._changes: dict[str, list[tuple[Change, Deferred[DeliveryState]]]] = {}
        #: Entries just received, whose first visit starts from a fresh
        #: delivery state.
        self._fresh: set[str] = set()
        #: Entries on hold, and by whom (as their last visit found them).
        self._held: dict[str, str] = {}
        self._stopping = False
        self.completed = 0
        #: Called for each bounce sent (metrics).
        self.on_bounce: Callable[[], object] | None = None

    # -- scheduling ------------------------------------------------------------

    async def clear_scratch(self) -> None:
        """
        Remove the scratch files a previous run of this spool left behind
        (a crash mid-processing), and the kept copies of entries that no
        longer exist (a crash between an entry's removal and theirs); call
        before L{start}.
        """
        await self._thread(remove_dir, os.path.join(self.spool.root, SCRATCH))
        live = [entry.queue_id for entry in await self.spool.list_entries()]
        removed = await self._thread(remove_orphans, self.spool.root, live)
        if removed:
            log.info(
                "removed the kept copies of {count} finished message(s)",
                count=len(removed),
            )

    def start(self, entries: Iterable[SpoolEntry]) -> None:
        """
        Take over the entries found in the spool at start; each waits for
        its next attempt as its saved state says.
        """
        for entry in entries:
            self.submit(entry)

    def accept(self, entry: SpoolEntry) -> None:
        """
        Look at C{entry}, just received, at once: it has no delivery state
        yet, so its first visit need not read one from disk.
        """
        self._fresh.add(entry.queue_id)
        self.submit(entry)

    def submit(self, entry: SpoolEntry, delay: float = 0.0) -> None:
        """
        Look at C{entry} after C{delay} seconds.
        """
        if self._stopping:
            return
        self._entries[entry.queue_id] = entry
        old = self._scheduled.pop(entry.queue_id, None)
        if old is not None and old.active():
            old.cancel()
        self._scheduled[entry.queue_id] = self.reactor.callLater(
            max(0.0, delay), self._start, entry
        )

    def retry_now(self, queue_id: str) -> bool:
        """
        Try an entry now instead of at its next attempt time (not before a
        relay's throttling ends).
        """
        entry = self._entries.get(queue_id)
        if entry is None:
            return False
        if queue_id not in self._running:  # else it is being tried right now
            self._forced.add(queue_id)
            self.submit(entry)
        return True

    def flush(self) -> int:
        """
        Try every entry now (C{postqueue -f}): all but those on hold and
        those being tried right now; how many that is.
        """
        due = [
            queue_id
            for queue_id in self._entries
            if queue_id not in self._running and queue_id not in self._held
        ]
        for queue_id in due:
            self.retry_now(queue_id)
        return len(due)

    def next_attempt(self, queue_id: str) -> float | None:
        call = self._scheduled.get(queue_id)
        return call.getTime() if call is not None and call.active() else None

    def entry(self, queue_id: str) -> SpoolEntry | None:
        """
        The entry if it is in this manager's hands.
        """
        return self._entries.get(queue_id)

    def attempting(self, queue_id: str) -> bool:
        """
        Whether the entry is being visited (attempted) right now.
        """
        return queue_id in self._running

    def held_by(self, queue_id: str) -> str | None:
        """
        Who holds the entry, as its last visit found it.
        """
        return self._held.get(queue_id)

    def change(self, queue_id: str, change: Change) -> Deferred[DeliveryState]:
        """
        Apply an operator's C{change} to the entry's delivery state at its
        next safe point, save it, and carry on with its plan: at once when
        the entry is waiting (without waiting for a delivery slot, unless
        the change makes it due), after the step in progress when it is
        being attempted.

        @return: fires with the state saved, or fails with
            L{EntryGoneError} (the entry is not here, or left before the
            change could apply) or the change's L{NotApplicableError}.
        """
        entry = self._entries.get(queue_id)
        if entry is None or self._stopping:
            return fail(EntryGoneError(queue_id))
        waiter: Deferred[DeliveryState] = Deferred()
        self._changes.setdefault(queue_id, []).append((change, waiter))
        if queue_id not in self._running:
            self._visit(entry, False)
        return waiter

    def _unschedule(self, queue_id: str) -> None:
        call = self._scheduled.pop(queue_id, None)
        if call is not None and call.active():
            call.cancel()

    def _start(self, entry: SpoolEntry) -> None:
        self._scheduled.pop(entry.queue_id, None)
        if entry.queue_id in self._running or self._stopping:
            return
        self._visit(entry, True)

    def _visit(self, entry: SpoolEntry, may_attempt: bool) -> None:
        """
        Carry out the entry's plan now: through a delivery slot when it
        may attempt, at once when it only applies changes (and then hands
        an attempt that became due to a visit of its own).
        """
        queue_id = entry.queue_id
        running: Deferred[None] = Deferred()
        self._running[queue_id] = running
        if may_attempt:
            lane = self.lane(entry)
            d = lane.run(lambda: Deferred.fromCoroutine(self._handle(entry)))
        else:
            d = Deferred.fromCoroutine(self._handle(entry, may_attempt=False))

        def failed(failure: Failure) -> None:
            log.failure(
                "message {message_id}: unexpected error; will retry",
                failure,
                message_id=queue_id,
            )
            self.submit(entry, self.retry.first)

        def ended(result: object) -> None:
            if self._running.get(queue_id) is running:
                del self._running[queue_id]
            running.callback(None)
            self._visit_ended(entry)

        d.addErrback(failed)
        d.addBoth(ended)

    @property
    def in_progress(self) -> int:
        """
        Entries being processed or delivered now, in either lane.
        """
        return len(self._running)

    def lane(self, entry: SpoolEntry) -> DeferredSemaphore:
        """
        The delivery slots C{entry} waits for: the big lane's when it is at
        least C{big_message} bytes.
        """
        if entry.size >= self._big_message:
            return self._big_lane
        return self._small_lane

    def _visit_ended(self, entry: SpoolEntry) -> None:
        """
        A visit ended: changes that came in after its last safe point get
        a visit of their own, or fail if the entry is gone.
        """
        queue_id = entry.queue_id
        if not self._changes.get(queue_id):
            self._changes.pop(queue_id, None)
            return
        if queue_id in self._entries and not self._stopping:
            if queue_id not in self._running:
                self._visit(entry, False)
            return
        for _, waiter in self._changes.pop(queue_id):
            waiter.errback(EntryGoneError(queue_id))

    async def _apply_changes(
        self, entry: SpoolEntry, state: DeliveryState
    ) -> DeliveryState:
        """
        Apply the operators' changes waiting for this entry, save the
        state, and tell each what became of it.
        """
        waiting = self._changes.pop(entry.queue_id, [])
        if not waiting:
            return state
        now = self.reactor.seconds()
        applied: list[Deferred[DeliveryState]] = []
        refused: list[tuple[Deferred[DeliveryState], Exception]] = []
        for change, waiter in waiting:
            try:
                state = change(state, now)
            except Exception as e:  # NotApplicableError, or a bug: told
                refused.append((waiter, e))
            else:
                applied.append(waiter)
        if state.held_by is not None:
            self._held[entry.queue_id] = state.held_by
            self._unschedule(entry.queue_id)
        else:
            self._held.pop(entry.queue_id, None)
        try:
            if applied:
                await self.runner.save(entry, state)
        except Exception as e:
            for waiter in applied:
                waiter.errback(e)
            raise
        finally:
            for waiter, error in refused:
                waiter.errback(error)
        for waiter in applied:
            waiter.callback(state)
        return state

    async def stop(self) -> None:
        """
        Stop scheduling and wait for the entries in hand.
        """
        self._stopping = True
        for call in self._scheduled.values():
            if call.active():
                call.cancel()
        self._scheduled.clear()
        for queue_id, waiting in list(self._changes.items()):
            if queue_id not in self._running:
                del self._changes[queue_id]
                for _, waiter in waiting:
                    waiter.errback(EntryGoneError(queue_id))
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
        return await deferToThreadPool(self._threads, self.threadpool, function, *args)

    async def load_state(self, entry: SpoolEntry) -> DeliveryState:
        """
        The entry's saved delivery state, or a fresh one.
        """
        envelope = entry.envelope
        bounceable = not (
            envelope.sender == "" or envelope.extra.get("generated") == GENERATED_DSN
        )
        if entry.queue_id in self._fresh:
            self._fresh.discard(entry.queue_id)
            data = None
        else:
            data = await self.spool.read_state(entry)
        if data is not None:
            try:
                return DeliveryState.from_json(
                    data, received_at=envelope.received_at, bounceable=bounceable
                )
            except StateFormatError as e:
                log.error(
                    "{message_id}: its delivery state cannot be read ({error}); "
                    "starting afresh",
                    message_id=entry.queue_id,
                    error=str(e),
                )
        return DeliveryState.fresh(
            envelope.received_at, (r.address for r in envelope.recipients), bounceable
        )

    async def _handle(self, entry: SpoolEntry, may_attempt: bool = True) -> None:
        """
        Carry out the entry's plan, step by step, until it has to wait or
        is done; operators' changes apply before each step.

        @param may_attempt: false for a visit that only applies changes:
            an attempt that falls due is left to a visit of its own.
        """
        state = await self.load_state(entry)
        if entry.queue_id in self._forced:
            self._forced.discard(entry.queue_id)
            state = retry_now(state)
        attempted_now = False
        unsaved = False
        for _ in range(MAX_STEPS):
            state = await self._apply_changes(entry, state)
            now = self.reactor.seconds()
            throttled = self.runner.throttled_until(entry, state)
            step = plan(state, now, self.retry, throttled)
            if not isinstance(step, Hold):
                self._held.pop(entry.queue_id, None)
            if isinstance(step, Deliver):
                if not may_attempt:
                    self.submit(entry)
                    return
                if attempted_now:
                    # Backoff is at least the first retry interval; never
                    # a second attempt in one visit.
                    step = Retry(now + self.retry.first)
                else:
                    attempted_now = True
                    state = await self.runner.attempt(entry, state)
                    throttled = self.runner.throttled_until(entry, state)
                    state = attempted(
                        state, self.reactor.seconds(), self.retry, throttled
                    )
                    # Saved by the next step, unless that step removes the
                    # entry: then the removal (as durable as a save) is all
                    # a crash could miss, and a save would only precede it.
                    unsaved = True
                    continue
            if isinstance(step, Warn):
                await self._report(entry, state, step.recipients, delayed=True)
                state = attrs.evolve(state, warned=True)
            elif isinstance(step, Expire):
                state = expired(state, step.recipients, now)
            elif isinstance(step, Bounce):
                await self._report(entry, state, step.recipients, delayed=False)
                state = attrs.evolve(state, bounced=True)
            elif isinstance(step, Retry):
                await self.runner.save(entry, state)
                self.submit(entry, step.at - now)
                log.info(
                    "{message_id} deferred for {count} recipient(s); "
                    "next attempt in {delay:.0f}s",
                    message_id=entry.queue_id,
                    count=len(state.pending),
                    delay=step.at - now,
                )
                return
            elif isinstance(step, Hold):
                await self.runner.save(entry, state)
                self._unschedule(entry.queue_id)
                if self._held.get(entry.queue_id) != step.by:
                    log.info(
                        "{message_id} is on hold (by {by}): nothing is attempted "
                        "until the hold is released",
                        message_id=entry.queue_id,
                        by=step.by,
                    )
                self._held[entry.queue_id] = step.by
                return
            elif isinstance(step, Done):
                if unsaved and state.failed:
                    await self.runner.save(entry, state)
                await self._done(entry, state)
                return
            await self.runner.save(entry, state)
            unsaved = False
        await self.runner.save(entry, state)
        self.submit(entry, self.retry.first)

    async def _done(self, entry: SpoolEntry, state: DeliveryState) -> None:
        if state.failed and not state.bounceable:
            log.info(
                "{message_id}: failed recipients, but no bounce for a null sender",
                message_id=entry.queue_id,
            )
        await self.spool.remove(entry)
        await self._blocking.run(
            entry.size, remove_processed, self.spool.root, entry.queue_id
        )
        self._entries.pop(entry.queue_id, None)
        self.completed += 1

    async def _report(
        self,
        entry: SpoolEntry,
        state: DeliveryState,
        recipients: tuple[str, ...],
        delayed: bool,
    ) -> None:
        """
        Send the sender a delay warning or a bounce about C{recipients}.
        """
        envelope = entry.envelope
        results = {a: state.recipients[a].dsn_record() for a in recipients}
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


def _remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
