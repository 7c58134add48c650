# -*- test-case-name: tests.test_spool -*-
"""
The durable spool: where an accepted message lives from C{250} until it is done.

The SMTP server streams a message into a L{SpoolWriter} and may answer
C{250 2.0.0 Ok: queued as <id>} only once L{SpoolWriter.commit} has returned:
by then the message bytes and the L{Envelope} are fsynced and renamed into
C{queue/}. The pipeline later reads entries, keeps per-recipient delivery
state beside them and removes an entry last. A crash at any instant leaves
either no entry or a complete one; duplicates after a crash are acceptable,
loss is not.

Layout under the spool root (directories 0700, files 0600)::

    incoming/<id>.eml       message being received (flock-ed by its writer)
    incoming/<id>.json      envelope being committed
    queue/<id>.eml          committed message, bytes exactly as received
    queue/<id>.json         committed envelope; its presence marks a complete entry
    state/<id>.json         mutable delivery state, replaced atomically
    corrupt/                envelopes recovery could not use, kept for an operator
    lock                    flock-ed by the one process using this root

Anything else under the root (such as the C{workers/} roots of other
processes) is not this spool's: recovery never looks at it. A spool can
adopt the entries of another root (L{Spool.adopt}), so that a root no
process uses any more does not strand its mail.

All disk work runs in an injected thread pool, never on the reactor thread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool

from mdgateway.fileops import IFileOps, OSFileOps
from mdgateway.queue.entry import (
    LOCK_RETRY,
    RecoveryReport,
    SpoolEntry,
    SpoolError,
    SpoolInUseError,
    SpoolPaths,
    spool_error,
)
from mdgateway.queue.ids import QueueIdGenerator
from mdgateway.queue.jobs import (
    close_quietly,
    decode_state,
    job_adopt_entry,
    job_free_space,
    job_list,
    job_list_root,
    job_lock,
    job_read_state,
    job_recover,
    job_remove,
    job_remove_root,
    job_write_state,
    make_layout,
    nothing,
)
from mdgateway.queue.writer import SpoolWriter, WriterPhase

_T = TypeVar("_T")


class Spool:
    """
    The spool directory of one gateway instance.

    Call L{recover} once at start, before any L{open_writer}: it takes the
    root's lock, creates the layout, removes what a crash left half done
    and returns the entries to process. The lock is held until L{close},
    so a second process on the same root fails at start with
    L{SpoolInUseError} instead of delivering this one's mail twice. To
    wait for a predecessor that is still draining, or to L{adopt} the
    entries of other roots, call L{acquire} before L{recover}::

        await spool.acquire(wait=30)
        for root in stale_roots:
            await spool.adopt(root)
        entries = await spool.recover()

    (Besides the lock, entry ids are unique across processes and files a
    live writer holds are flock-ed, so recovery never cleans away the work
    of a live writer.)

    @ivar last_recovery: what the last L{recover} found.
    """

    _log = Logger()

    def __init__(
        self,
        root: FilePath[str] | str,
        reactor: IReactorTime,
        threadpool: ThreadPool,
        *,
        fileops: IFileOps | None = None,
        new_queue_id: Callable[[], str] | None = None,
        buffer_size: int = 256 * 1024,
        flush_size: int = 64 * 1024,
        min_free_bytes: int = 64 * 1024 * 1024,
        min_free_inodes: int = 1000,
        space_check_interval: float = 1.0,
    ) -> None:
        """
        @param root: the spool directory (created by L{acquire} if missing).
        @param reactor: provides L{IReactorTime} and L{IReactorFromThreads}.
        @param threadpool: runs every blocking call; started by the caller.
        @param fileops: the file-system calls; L{OSFileOps} by default.
        @param new_queue_id: makes queue ids; a L{QueueIdGenerator} on
            C{reactor} by default.
        @param buffer_size: bytes a writer holds before asking to pause.
        @param flush_size: bytes a writer gathers before writing them out.
        @param min_free_bytes: below this much free space L{writable} is
            false.
        @param min_free_inodes: below this many free inodes (where the file
            system counts them) L{writable} is false.
        @param space_check_interval: seconds a free-space reading is reused.
        """
        path = root.path if isinstance(root, FilePath) else os.fspath(root)
        self._paths = SpoolPaths.under(os.path.abspath(path))
        self._clock = reactor
        self._threads = IReactorFromThreads(reactor)
        self._pool = threadpool
        self._ops: IFileOps = fileops if fileops is not None else OSFileOps()
        self._new_queue_id = new_queue_id or QueueIdGenerator(reactor)
        self._buffer_size = buffer_size
        self._flush_size = min(flush_size, buffer_size)
        self._min_free_bytes = min_free_bytes
        self._min_free_inodes = min_free_inodes
        self._space_interval = space_check_interval
        self._space_ok = True
        self._space_checked = float("-inf")
        self._space_checking = False
        self._recovered = False
        self._writers: set[SpoolWriter] = set()
        self._settled_waiters: dict[SpoolWriter, list[Deferred[None]]] = {}
        self._closed = False
        self._entries: dict[str, float] = {}
        self._locks: dict[str, DeferredLock] = {}
        self._lock_fd: int | None = None
        self._acquiring = DeferredLock()
        self.last_recovery: RecoveryReport | None = None
        self.corrupt_count = 0

    @property
    def root(self) -> str:
        """
        The spool directory.
        """
        return self._paths.root

    def _run(self, job: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(self._threads, self._pool, job, *args)

    # Start-up

    @property
    def closed(self) -> bool:
        """
        Whether L{close} was called.
        """
        return self._closed

    async def acquire(self, wait: float = 0.0) -> None:
        """
        Create the root if needed and take its lock (C{flock} on
        C{<root>/lock}), held until L{close}. Does nothing once held.

        @param wait: seconds of the injected clock to keep trying, every
            0.25 s, while another process holds the lock (a predecessor
            still draining); the wait is logged once.
        @raise SpoolInUseError: when another process still holds it.
        @raise SpoolError: when the root or the lock file cannot be made.
        @raise RuntimeError: after L{close}.
        """
        await self._acquiring.acquire()
        try:
            if self._lock_fd is None:
                try:
                    self._lock_fd = await self._take_lock(self._paths, wait, True)
                except OSError as e:
                    raise spool_error(e) from e
        finally:
            self._acquiring.release()

    async def _take_lock(
        self, paths: SpoolPaths, wait: float, create_root: bool
    ) -> int:
        """
        The open lock file of the root C{paths}, locked by us.

        @raise SpoolInUseError: when another holds it for C{wait} seconds.
        @raise OSError: from L{job_lock}.
        """
        deadline = self._clock.seconds() + wait
        waiting = False
        while True:
            if self._closed:
                raise RuntimeError("the spool is closed")
            fd = await self._run(job_lock, self._ops, paths, create_root)
            if fd is not None:
                if self.closed:  # closed while the lock was being taken
                    await self._run(close_quietly, self._ops, fd)
                    raise RuntimeError("the spool is closed")
                return fd
            now = self._clock.seconds()
            if now >= deadline:
                raise SpoolInUseError(
                    f"spool directory {paths.root} is in use by another process"
                )
            if not waiting:
                waiting = True
                self._log.warn(
                    "spool directory {directory} is in use by another process; "
                    "waiting up to {wait} s for it",
                    directory=paths.root,
                    wait=wait,
                )
            await deferLater(self._clock, min(LOCK_RETRY, deadline - now), nothing)

    async def adopt(self, source_root: FilePath[str] | str | os.PathLike[str]) -> int:
        """
        Move the complete entries of another spool root into this one,
        keeping their queue ids, and remove that root if nothing else is
        left in it; L{recover} then returns them with this spool's own.

        For a root no process uses any more (a worker that is no longer
        configured), so that its mail is not stranded. Call it after
        L{acquire} and before L{recover}: the entries must be in place when
        recovery lists them.

        The source's lock is taken first. Its leftovers of a crash are
        cleaned up as its own recovery would (partial files removed,
        unusable envelopes kept in its C{corrupt/}); then each complete
        entry is moved so that a crash at any point leaves it complete in
        at least one of the two roots (see L{job_adopt_entry}); an
        adoption cut short is completed by the next one without
        duplicates. An entry whose id exists here already stays in the
        source, with a warning; so does anything else not a spool entry.

        @param source_root: the root to empty; a missing one adopts nothing.
        @return: the number of entries moved.
        @raise RuntimeError: without our lock, after L{recover}, or after
            L{close}.
        @raise ValueError: when C{source_root} is this spool's root.
        @raise SpoolInUseError: when another process holds the source's
            lock; nothing was touched.
        @raise SpoolError: when the disk failed; what was moved is here,
            the rest is still in the source (and perhaps in both).
        """
        if self._lock_fd is None or self._recovered or self._closed:
            raise RuntimeError(
                "Spool.adopt() must come after acquire() and before recover()"
            )
        path = source_root.path if isinstance(source_root, FilePath) else source_root
        source = SpoolPaths.under(os.path.abspath(os.fspath(path)))
        if source.root == self._paths.root:
            raise ValueError(f"a spool cannot adopt its own root {source.root}")
        try:
            fd = await self._take_lock(source, 0.0, False)
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise spool_error(e) from e
        try:
            adopted = await self._adopt_locked(source)
        except OSError as e:
            raise spool_error(e) from e
        finally:
            await self._run(close_quietly, self._ops, fd)
        self._log.info(
            "adopted {count} spool entries from {source}",
            count=adopted,
            source=source.root,
        )
        return adopted

    async def _adopt_locked(self, source: SpoolPaths) -> int:
        await self._run(make_layout, self._ops, self._paths)
        report, problems, _ = await self._run(job_recover, self._ops, source)
        self._report_recovery(source, report, problems)
        adopted = 0
        for entry in report.entries:
            moved = await self._run(
                job_adopt_entry, self._ops, self._paths, source, entry.queue_id
            )
            if moved:
                adopted += 1
            else:
                self._log.warn(
                    "spool entry {queue_id} of {source} is not adopted: its id "
                    "is taken in {root}; it stays in {source}",
                    queue_id=entry.queue_id,
                    source=source.root,
                    root=self._paths.root,
                )
        remains = await self._run(job_remove_root, self._ops, source)
        if remains:
            self._log.warn(
                "spool directory {source} is kept: it still holds {remains}",
                source=source.root,
                remains=remains,
            )
        return adopted

    async def recover(self) -> list[SpoolEntry]:
        """
        Take the root's lock (see L{acquire}) unless held, create the
        layout if needed and clean up after a crash.

        Removes partial files in C{incoming/} and messages in C{queue/}
        without an envelope (interrupted commits, never acknowledged);
        moves envelopes without message, or unreadable ones, to
        C{corrupt/} with a critical log line; removes orphan state files.
        Files locked by a live writer are left alone, and so is everything
        outside the layout's directories.

        @return: the complete entries, oldest first.
        @raise SpoolInUseError: when another process holds the lock.
        """
        if self._lock_fd is None:
            await self.acquire()
        report, problems, space = await self._run(job_recover, self._ops, self._paths)
        self.last_recovery = report
        self._entries = {e.queue_id: e.envelope.received_at for e in report.entries}
        self._recovered = True
        self._space_result(space)
        self._report_recovery(self._paths, report, problems)
        self._log.info(
            "spool recovered: {entries} entries, {partials} partial files removed",
            entries=len(report.entries),
            partials=len(report.removed_partials),
        )
        return list(report.entries)

    def _report_recovery(
        self, paths: SpoolPaths, report: RecoveryReport, problems: list[tuple[str, str]]
    ) -> None:
        """
        Count and log what the recovery of the root C{paths} found wrong.
        """
        self.corrupt_count += len(report.corrupt)
        for queue_id, problem in problems:
            self._log.critical(
                "spool entry {queue_id} is corrupt ({problem}); moved to {corrupt}",
                queue_id=queue_id,
                problem=problem,
                corrupt=paths.corrupt,
            )
        if report.removed_unfinished:
            self._log.warn(
                "removed {count} unfinished spool entries: {queue_ids}",
                count=len(report.removed_unfinished),
                queue_ids=list(report.removed_unfinished),
            )
        if report.unknown:
            self._log.warn(
                "unknown files in {queue}: {names}",
                queue=paths.queue,
                names=list(report.unknown),
            )

    # Receiving

    def open_writer(self) -> SpoolWriter:
        """
        Start receiving a message. Returns at once; the file is created in
        the pool, and a failure to create it surfaces as the writer's
        C{error} and from C{commit}.

        @raise RuntimeError: before L{recover} has completed, or after
            L{close}.
        """
        if not self._recovered:
            raise RuntimeError("Spool.recover() must complete before open_writer()")
        if self._closed:
            raise RuntimeError("the spool is closed")
        writer = SpoolWriter(self, self._new_queue_id(), self._clock.seconds())
        if writer.error is None and writer._phase is WriterPhase.OPEN:
            self._writers.add(writer)
        return writer

    def _committed(self, writer: SpoolWriter, entry: SpoolEntry) -> None:
        self._entries[entry.queue_id] = entry.envelope.received_at
        self._forget(writer)

    def _forget(self, writer: SpoolWriter) -> None:
        """
        C{writer} is done (committed, failed or its file removed).
        """
        self._writers.discard(writer)
        waiters = self._settled_waiters.pop(writer, [])
        for waiter in waiters:
            waiter.callback(None)

    async def close(self) -> None:
        """
        Stop taking messages and let disk work in flight finish, so the
        thread pool can be stopped: writers still receiving are aborted
        (their files removed), commits under way complete, state changes
        under way land; then the root's lock is released. After this,
        L{open_writer} raises and L{writable} is false.
        """
        self._closed = True
        waits: list[Deferred[Any]] = []
        for writer in list(self._writers):
            waiter: Deferred[None] = Deferred()
            self._settled_waiters.setdefault(writer, []).append(waiter)
            waits.append(waiter)
            writer.abort()
        for lock in list(self._locks.values()):
            waits.append(lock.acquire().addCallback(lambda lock: lock.release()))
        try:
            await gatherResults(waits)
        finally:
            fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                await self._run(close_quietly, self._ops, fd)

    def _write_failed(self, error: SpoolError) -> None:
        self._space_ok = False
        self._space_checked = self._clock.seconds()

    # Readiness and metrics

    def writable(self) -> bool:
        """
        Whether new mail should be accepted: recovery is done, free space
        and inodes are above their thresholds, and no write failed in the
        last C{space_check_interval}. Cheap: the reading is cached and
        refreshed in the pool.
        """
        now = self._clock.seconds()
        if self._recovered and not self._closed and not self._space_checking:
            if now - self._space_checked >= self._space_interval:
                self._space_checking = True
                d = self._run(job_free_space, self._ops, self._paths.root)
                d.addCallbacks(self._space_result, self._space_failed)
        return self._recovered and not self._closed and self._space_ok

    async def refresh_space(self) -> bool:
        """
        L{writable}, from a reading at most C{space_check_interval} old:
        a reading older than that is taken now and awaited, so a readiness
        probe never answers from the state of the probe before it.
        """
        now = self._clock.seconds()
        if (
            self._recovered
            and not self._closed
            and not self._space_checking
            and now - self._space_checked >= self._space_interval
        ):
            self._space_checking = True
            try:
                space = await self._run(job_free_space, self._ops, self._paths.root)
            except Exception:
                self._space_failed(Failure())
            else:
                self._space_result(space)
        return self.writable()

    def _space_result(self, space: tuple[int, int | None]) -> None:
        free_bytes, free_inodes = space
        self._space_checking = False
        self._space_checked = self._clock.seconds()
        self._space_ok = free_bytes >= self._min_free_bytes and (
            free_inodes is None or free_inodes >= self._min_free_inodes
        )

    def _space_failed(self, failure: Failure) -> None:
        self._space_checking = False
        self._space_checked = self._clock.seconds()
        self._space_ok = False
        self._log.failure("cannot read free space of the spool", failure)

    @property
    def entry_count(self) -> int:
        """
        Number of committed entries not yet removed.
        """
        return len(self._entries)

    @property
    def active_writers(self) -> int:
        """
        Number of messages being received.
        """
        return len(self._writers)

    def oldest_age(self) -> float:
        """
        Seconds since the oldest entry was received; 0 when empty.
        """
        if not self._entries:
            return 0.0
        return max(0.0, self._clock.seconds() - min(self._entries.values()))

    # Entries

    async def list_entries(self) -> list[SpoolEntry]:
        """
        The complete entries now in the queue, oldest first. Changes
        nothing; unreadable envelopes are logged and left for L{recover}.
        """
        entries, bad = await self._run(job_list, self._ops, self._paths)
        for queue_id, problem in bad:
            self._log.critical(
                "spool entry {queue_id} is unreadable: {problem}",
                queue_id=queue_id,
                problem=problem,
            )
        return entries

    async def list_root(
        self, root: str
    ) -> list[tuple[SpoolEntry, dict[str, Any] | None]]:
        """
        The complete entries of another process's spool root (a worker's),
        with their delivery state, oldest first. Reads only: the owner
        renames every file into place, so what is read is whole.
        """
        return await self._run(job_list_root, self._ops, SpoolPaths.under(root))

    async def _serially(self, queue_id: str, job: Callable[..., _T], *args: Any) -> _T:
        """
        Run C{job} after any earlier state change of the same entry, so
        the last write wins on disk as it did in the caller.
        """
        lock = self._locks.get(queue_id)
        if lock is None:
            lock = self._locks[queue_id] = DeferredLock()
        await lock.acquire()
        try:
            return await self._run(job, *args)
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(queue_id, None)

    async def read_state(self, entry: SpoolEntry) -> dict[str, Any] | None:
        """
        The delivery state last written for C{entry}, or C{None} if none was
        (or it is unreadable, which is logged: the entry is then treated as
        new, giving duplicates rather than loss).
        """
        data = await self._serially(
            entry.queue_id, job_read_state, self._ops, entry.state_path
        )
        if data is None:
            return None
        state = decode_state(data)
        if not isinstance(state, dict):
            self._log.critical(
                "delivery state of {queue_id} is unreadable ({problem}); starting over",
                queue_id=entry.queue_id,
                problem=repr(state),
            )
            return None
        return state

    async def write_state(self, entry: SpoolEntry, state: Mapping[str, Any]) -> None:
        """
        Replace the delivery state of C{entry} atomically and durably
        (temporary file, fsync, rename, fsync of the directory).

        @param state: a JSON object; serialised now, so later changes to it
            do not leak into this write.
        @raise SpoolError: when it could not be written; the old state stands.
        """
        data = json.dumps(dict(state), ensure_ascii=False, allow_nan=False)
        try:
            await self._serially(
                entry.queue_id,
                job_write_state,
                self._ops,
                self._paths,
                entry.queue_id,
                data.encode("utf-8"),
            )
        except OSError as e:
            raise spool_error(e) from e

    async def remove(self, entry: SpoolEntry) -> None:
        """
        Remove a finished entry: envelope first (made durable), then
        message and state; see L{job_remove} for why this order.
        """
        try:
            await self._serially(
                entry.queue_id, job_remove, self._ops, self._paths, entry.queue_id
            )
        except OSError as e:
            raise spool_error(e) from e
        self._entries.pop(entry.queue_id, None)
