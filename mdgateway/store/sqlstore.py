# -*- test-case-name: tests.test_store -*-
"""
The store logic both SQL backends share: every query, written once.

L{SqlStore} implements L{IStore} on top of two things a backend supplies:
a transaction (a L{Tx} on one of its connections, entered and left in a pool
thread) and its L{Dialect}. The jobs below are plain functions of a L{Tx}
that run in a pool thread inside one transaction each.

Threads, not C{adbapi}: the project injects one L{ThreadPool} per kind of
blocking work and calls it with C{deferToThreadPool} (as the spool does), so
the store does the same instead of bringing C{adbapi}'s own pool, its
reactor start-up hooks and untyped interactions. Admission to the pool is
gated on the reactor side (a L{DeferredSemaphore} per connection kind), so a
busy database queues Deferreds, never blocked pool threads: SQLite writes
pass one at a time (its single writer), PostgreSQL calls as many as there
are pooled connections.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mdgateway.store.applyjobs import (
    RECORD_ERRORS,
    job_apply,
    job_claim_audit,
    job_finish_audit,
    job_record_audit,
    job_search_audit,
)
from mdgateway.store.audit import AuditEntry, AuditFilter
from mdgateway.store.board import (
    TAKE_LIMIT,
    Command,
    ICommandBoard,
    Member,
    job_answer_command,
    job_get_command,
    job_heartbeat,
    job_join,
    job_leave,
    job_members,
    job_pending_for,
    job_post_command,
    job_purge_commands,
    job_take_commands,
    job_withdraw_command,
)
from mdgateway.store.counts import job_count_by_verdict, job_instance_activity
from mdgateway.store.dialect import Dialect, Tx
from mdgateway.store.interfaces import (
    FROM_PARTS,
    FromParts,
    InstanceActivity,
    IStore,
    MessageFilter,
    MessageRecord,
    MessageStatus,
    MessageSummary,
    Page,
    PageRequest,
    PartVerdict,
    PurgeCounts,
    QuarantineFilter,
    QuarantineItem,
    QuarantineSource,
    ReceivedMessage,
    RecipientDelivery,
    Refusal,
    RefusalFilter,
    ScanVerdict,
    StoreError,
    VerdictCount,
    overall_verdict,
)
from mdgateway.store.jobs import (
    get_item,
    job_add_event,
    job_delete_quarantined,
    job_get_message,
    job_list_quarantine,
    job_mark_released,
    job_pin,
    job_purge_messages,
    job_purge_quarantine,
    job_purge_refusals,
    job_quarantine,
    job_read_quarantined,
    job_record_delivery,
    job_record_received,
    job_record_refusal,
    job_record_verdicts,
    job_search_messages,
    job_search_refusals,
    job_update_status,
)
from mdgateway.store.owed import Applied, Owed
from mdgateway.store.rows import DAY, decode_cursor
from mdgateway.store.schema import current_version, migrate
from mdgateway.store.upstream import parse_upstream_queue_id

_T = TypeVar("_T")

#: Bytes per stored chunk of a quarantined original: what one read, one
#: row and one write hold at a time.
CHUNK_SIZE = 256 * 1024

#: Rows one purge transaction removes, so other writers get their turn.
PURGE_BATCH = 200
#: Writes one group-commit transaction takes at most.
WRITE_BATCH = 200

# --------------------------------------------------------------------------
# The store


@implementer(IStore, ICommandBoard)
class SqlStore(abc.ABC):
    """
    L{IStore} over a SQL database; a backend subclass supplies
    connections and transactions (see L{_transaction}).

    @ivar applied_migrations: versions the last L{open} applied.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        threadpool: ThreadPool,
        dialect: Dialect,
        *,
        read_slots: int,
        write_slots: int | None,
        chunk_size: int = CHUNK_SIZE,
        purge_batch: int = PURGE_BATCH,
    ) -> None:
        """
        @param reactor: provides L{IReactorTime} (default times) and
            L{IReactorFromThreads}.
        @param threadpool: runs every database call; started by the caller.
        @param read_slots: read transactions in the pool at once.
        @param write_slots: write transactions in the pool at once; C{None}
            when reads and writes share the C{read_slots} (one pool of
            connections for both).
        @param chunk_size: bytes per stored chunk of a quarantined original.
        @param purge_batch: rows one retention transaction removes.
        """
        if chunk_size < 1 or purge_batch < 1:
            raise ValueError("chunk_size and purge_batch must be positive")
        self._clock = reactor
        self._threads = IReactorFromThreads(reactor)
        self._pool = threadpool
        self._dialect = dialect
        self._reads = DeferredSemaphore(read_slots)
        self._writes = (
            self._reads if write_slots is None else DeferredSemaphore(write_slots)
        )
        self._chunk_size = chunk_size
        self._purge_batch = purge_batch
        self._inflight: set[Deferred[None]] = set()
        self._queued: list[
            tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]
        ] = []
        self._flushing = False
        self._opened = False
        self._closed = False
        self.applied_migrations: list[int] = []

    # Backend hooks, called in a pool thread.

    @abc.abstractmethod
    def _transaction(self, write: bool, durable: bool) -> AbstractContextManager[Tx]:
        """
        A context manager that begins a transaction on a suitable connection
        and yields a L{Tx}; it commits when the block completes and rolls
        back when it raises. C{durable} asks for the commit to reach stable
        storage even where the backend normally relaxes that.
        """

    @abc.abstractmethod
    def _close_connections(self) -> None:
        """
        Close every connection (pool thread; nothing is in flight).
        """

    @abc.abstractmethod
    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        """
        The driver's exception classes, mapped onto L{StoreError}.
        """

    def _record_errors(self) -> tuple[type[BaseException], ...]:
        """
        The driver's exceptions that belong to one statement's data (a
        constraint, a bad value), not to the connection: an outbox record
        that raises one fails alone (see L{apply}).
        """
        return ()

    # Running jobs

    def _in_thread(
        self, write: bool, durable: bool, job: Callable[..., _T], args: tuple[Any, ...]
    ) -> _T:
        try:
            with self._transaction(write, durable) as tx:
                return job(tx, *args)
        except self._driver_errors() as e:
            raise self._mapped(e) from e

    async def _call(
        self,
        write: bool,
        job: Callable[..., _T],
        *args: Any,
        durable: bool = False,
        opening: bool = False,
    ) -> _T:
        if self._closed:
            raise StoreError("the store is closed")
        if not (self._opened or opening):
            raise StoreError("the store is not open; call open() first")
        gate = self._writes if write else self._reads
        done: Deferred[None] = Deferred()
        self._inflight.add(done)
        try:
            if write and not durable and not opening:
                grouped: _T = await self._grouped(job, args)
                return grouped
            result: _T = await gate.run(
                deferToThreadPool,
                self._threads,
                self._pool,
                self._in_thread,
                write,
                durable,
                job,
                args,
            )
            return result
        finally:
            self._inflight.discard(done)
            done.callback(None)

    # Group commit: the history writes of many messages arrive at once
    # under load; one transaction (each write in its own savepoint, so one
    # failing write fails alone) and one thread hand-off for all that are
    # waiting costs far less than one each.

    def _grouped(self, job: Callable[..., _T], args: tuple[Any, ...]) -> Deferred[_T]:
        waiter: Deferred[_T] = Deferred()
        self._queued.append((job, args, waiter))
        if not self._flushing:
            self._flushing = True
            flushing = Deferred.fromCoroutine(self._flush_writes())
            flushing.addErrback(lambda f: self._log.failure("store writes failed", f))
        return waiter

    async def _flush_writes(self) -> None:
        try:
            while self._queued:
                batch = self._queued[:WRITE_BATCH]
                del self._queued[:WRITE_BATCH]
                try:
                    outcomes = await self._writes.run(
                        deferToThreadPool,
                        self._threads,
                        self._pool,
                        self._batch_in_thread,
                        [(job, args) for job, args, _ in batch],
                    )
                except Exception:
                    failure = Failure()
                    for *_, waiter in batch:
                        waiter.errback(failure)
                    continue
                for (*_, waiter), (ok, value) in zip(batch, outcomes, strict=True):
                    if ok:
                        waiter.callback(value)
                    else:
                        waiter.errback(Failure(value))
        finally:
            self._flushing = False

    def _batch_in_thread(
        self, batch: list[tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> list[tuple[bool, Any]]:
        """
        Run C{batch} in one write transaction (pool thread): each job's
        result, or its exception (then none of its changes are kept).
        """
        if len(batch) == 1:
            job, args = batch[0]
            try:
                return [(True, self._in_thread(True, False, job, args))]
            except Exception as e:
                return [(False, e)]
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self._transaction(True, False) as tx:
                for n, (job, args) in enumerate(batch):
                    tx.execute(f"SAVEPOINT w{n}")
                    try:
                        value = job(tx, *args)
                    except Exception as e:
                        tx.execute(f"ROLLBACK TO SAVEPOINT w{n}")
                        outcomes.append((False, self._mapped(e)))
                    else:
                        outcomes.append((True, value))
                    tx.execute(f"RELEASE SAVEPOINT w{n}")
        except Exception as e:
            # The commit itself failed: nothing of the batch was kept.
            error = self._mapped(e)
            return [(False, error)] * len(batch)
        return outcomes

    def _mapped(self, error: BaseException) -> BaseException:
        if isinstance(error, self._driver_errors()):
            return StoreError(f"{self._dialect.name}: {error}")
        return error

    def _now(self, at: float | None) -> float:
        return self._clock.seconds() if at is None else at

    # Lifecycle

    async def open(self) -> None:
        if self._opened:
            return
        self.applied_migrations = await self._call(
            True, migrate, self._clock.seconds(), opening=True
        )
        self._opened = True
        if self.applied_migrations:
            self._log.info(
                "store ({dialect}) migrated to schema version {version}",
                dialect=self._dialect.name,
                version=self.applied_migrations[-1],
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await DeferredList(list(self._inflight))
        await deferToThreadPool(self._threads, self._pool, self._close_connections)

    async def schema_version(self) -> int:
        return await self._call(False, current_version)

    async def check(self) -> None:
        await self._call(False, lambda tx: tx.one("SELECT 1"))

    # History

    async def record_received(
        self, message: ReceivedMessage, event_text: str | None = None
    ) -> bool:
        text = event_text or f"received from {message.helo} [{message.client_address}]"
        return await self._call(
            True, job_record_received, message, text, self._clock.seconds()
        )

    async def update_status(
        self,
        message_id: str,
        status: MessageStatus,
        event_text: str,
        at: float | None = None,
    ) -> None:
        await self._call(
            True, job_update_status, message_id, status, event_text, self._now(at)
        )

    async def add_event(
        self, message_id: str, text: str, at: float | None = None
    ) -> None:
        await self._call(True, job_add_event, message_id, text, self._now(at))

    async def record_verdicts(
        self,
        message_id: str,
        parts: Iterable[PartVerdict],
        actions: Iterable[str] = (),
        verdict: ScanVerdict | None | FromParts = FROM_PARTS,
        at: float | None = None,
    ) -> None:
        parts = tuple(parts)
        if isinstance(verdict, FromParts):
            verdict = overall_verdict(parts)
        await self._call(
            True,
            job_record_verdicts,
            message_id,
            parts,
            tuple(actions),
            verdict,
            self._now(at),
        )

    async def record_delivery(self, message_id: str, result: RecipientDelivery) -> None:
        if (
            result.upstream_queue_id is None
            and result.code is not None
            and 200 <= result.code < 300
        ):
            upstream = parse_upstream_queue_id(result.text)
            if upstream is not None:
                result = RecipientDelivery(
                    recipient=result.recipient,
                    status=result.status,
                    code=result.code,
                    enhanced=result.enhanced,
                    text=result.text,
                    upstream_queue_id=upstream,
                    server=result.server,
                    at=result.at,
                )
        await self._call(
            True, job_record_delivery, message_id, result, self._now(result.at)
        )

    async def get_message(self, message_id: str) -> MessageRecord:
        return await self._call(False, job_get_message, message_id)

    async def search_messages(
        self,
        filters: MessageFilter | None = None,
        page: PageRequest | None = None,
    ) -> Page[MessageSummary]:
        page = page or PageRequest()
        if page.cursor is not None:
            decode_cursor(page.cursor, "m", str)
        return await self._call(
            False, job_search_messages, filters or MessageFilter(), page
        )

    # Refused log

    async def record_refusal(self, refusal: Refusal) -> Refusal:
        recorded = await self._call(True, job_record_refusal, refusal)
        assert recorded is not None  # only a keyed refusal can be a repeat
        return recorded

    async def search_refusals(
        self,
        filters: RefusalFilter | None = None,
        page: PageRequest | None = None,
    ) -> Page[Refusal]:
        page = page or PageRequest()
        if page.cursor is not None:
            decode_cursor(page.cursor, "r", int)
        return await self._call(
            False, job_search_refusals, filters or RefusalFilter(), page
        )

    # Quarantine

    async def quarantine(
        self,
        message_id: str,
        reason: str,
        source: QuarantineSource,
        expires_at: float | None = None,
        at: float | None = None,
    ) -> QuarantineItem:
        return await self._call(
            True,
            job_quarantine,
            uuid.uuid4().hex,
            message_id,
            reason,
            source,
            expires_at,
            self._now(at),
            self._chunk_size,
            durable=True,
        )

    async def list_quarantine(
        self,
        filters: QuarantineFilter | None = None,
        page: PageRequest | None = None,
    ) -> Page[QuarantineItem]:
        page = page or PageRequest()
        if page.cursor is not None:
            decode_cursor(page.cursor, "q", str)
        return await self._call(
            False, job_list_quarantine, filters or QuarantineFilter(), page
        )

    async def get_quarantined(self, item_id: str) -> QuarantineItem:
        return await self._call(False, get_item, item_id)

    async def read_quarantined(self, item_id: str, dest_path: str) -> QuarantineItem:
        return await self._call(False, job_read_quarantined, item_id, dest_path)

    async def pin(self, item_id: str, pinned: bool) -> None:
        await self._call(True, job_pin, item_id, pinned)

    async def delete_quarantined(self, item_id: str) -> bool:
        return await self._call(
            True, job_delete_quarantined, item_id, self._clock.seconds()
        )

    async def mark_released(
        self, item_id: str, by: str, at: float | None = None
    ) -> QuarantineItem:
        return await self._call(True, job_mark_released, item_id, by, self._now(at))

    # Dashboard counts

    async def count_by_verdict(
        self, since: float, until: float, step: float
    ) -> tuple[VerdictCount, ...]:
        if not step > 0 or not until > since:
            raise ValueError("count_by_verdict needs step > 0 and until > since")
        return await self._call(False, job_count_by_verdict, since, until, step)

    async def instance_activity(self, since: float) -> tuple[InstanceActivity, ...]:
        return await self._call(False, job_instance_activity, since)

    # Records owed by the outbox

    async def apply(self, records: Sequence[Owed]) -> list[Applied]:
        if not records:
            return []
        return await self._call(
            True,
            job_apply,
            tuple(records),
            self._chunk_size,
            RECORD_ERRORS + self._record_errors(),
            durable=True,
        )

    # Audit

    async def record_audit(self, entry: AuditEntry) -> AuditEntry:
        return await self._call(True, job_record_audit, entry, durable=True)

    async def claim_audit(self, entry: AuditEntry) -> tuple[AuditEntry, bool]:
        return await self._call(True, job_claim_audit, entry, durable=True)

    async def finish_audit(
        self,
        entry_id: int,
        result: str,
        detail: str,
        outcome: str = "",
        at: float | None = None,
    ) -> AuditEntry:
        return await self._call(
            True,
            job_finish_audit,
            entry_id,
            result,
            detail,
            outcome,
            self._now(at),
            durable=True,
        )

    async def search_audit(
        self,
        filters: AuditFilter | None = None,
        page: PageRequest | None = None,
    ) -> Page[AuditEntry]:
        page = page or PageRequest()
        if page.cursor is not None:
            decode_cursor(page.cursor, "a", int)
        return await self._call(False, job_search_audit, filters or AuditFilter(), page)

    # The cluster's notice board (see mdgateway.store.board)

    async def join(self, instance: str, at: float) -> None:
        await self._call(True, job_join, instance, at, durable=True)

    async def heartbeat(self, instance: str, at: float) -> None:
        await self._call(True, job_heartbeat, instance, at, durable=True)

    async def leave(self, instance: str, at: float) -> None:
        await self._call(True, job_leave, instance, at, durable=True)

    async def members(self) -> tuple[Member, ...]:
        return await self._call(False, job_members)

    async def post_command(
        self, instance: str, sender: str, request: str, at: float
    ) -> int:
        return await self._call(
            True, job_post_command, instance, sender, request, at, durable=True
        )

    async def take_commands(
        self, instance: str, limit: int = TAKE_LIMIT
    ) -> tuple[Command, ...]:
        # Looked at several times a second: a read, unless there is work.
        if not await self._call(False, job_pending_for, instance):
            return ()
        return await self._call(True, job_take_commands, instance, limit, durable=True)

    async def answer_command(self, command_id: int, answer: str, at: float) -> None:
        await self._call(True, job_answer_command, command_id, answer, at, durable=True)

    async def get_command(self, command_id: int) -> Command:
        return await self._call(False, job_get_command, command_id)

    async def withdraw_command(self, command_id: int) -> bool:
        return await self._call(True, job_withdraw_command, command_id, durable=True)

    async def purge_commands(self, before: float) -> int:
        return await self._call(True, job_purge_commands, before, durable=True)

    # Retention

    async def _drain(self, job: Callable[[Tx, float, int], int], cutoff: float) -> int:
        """
        Run a purge job batch after batch, each its own transaction, until
        one removes less than a full batch.
        """
        total = 0
        while True:
            count = await self._call(True, job, cutoff, self._purge_batch)
            total += count
            if count < self._purge_batch:
                return total

    async def purge(
        self, now: float, history_days: float | None, quarantine_days: float | None
    ) -> PurgeCounts:
        quarantined = freed = messages = refusals = 0
        cutoff = None if quarantine_days is None else now - quarantine_days * DAY
        while True:
            count, size = await self._call(
                True, job_purge_quarantine, now, cutoff, self._purge_batch
            )
            quarantined += count
            freed += size
            if count < self._purge_batch:
                break
        if history_days is not None:
            cutoff = now - history_days * DAY
            messages = await self._drain(job_purge_messages, cutoff)
            refusals = await self._drain(job_purge_refusals, cutoff)
        counts = PurgeCounts(
            messages=messages,
            refusals=refusals,
            quarantined=quarantined,
            quarantined_bytes=freed,
        )
        self._log.info(
            "retention removed {messages} history entries, {refusals} refusals, "
            "{quarantined} quarantined originals ({bytes} bytes)",
            messages=messages,
            refusals=refusals,
            quarantined=quarantined,
            bytes=freed,
        )
        return counts
