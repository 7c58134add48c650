# -*- test-case-name: tests.test_outbox -*-
"""
The durable outbox: records owed to the store, kept on local disk until the
store has them.

The history, the refused log and the quarantine live in a database that
may be unreachable (PostgreSQL restarting, a network partition) while mail
keeps flowing. So nothing the gateway owes the store is written to it
directly: each record (L{mdgateway.store.owed}) is first appended here, and
the step it records counts as done only once the record is on disk
(fsynced). A drainer then applies the records to the store in the order
they were written, as soon as it is reachable, and removes them only after
the store has committed them durably. Each record carries a unique key and
the store applies a key at most once, so a crash between the commit and the
clean-up replays records without duplicating anything.

A quarantined original is kept as a file beside its record (a hard link to
the spool entry's message, so the bytes survive the entry's removal) until
the store holds it.

Layout, under the spool root (folder 0700, files 0600)::

    outbox/<seq>.jsonl      one batch of records, JSON lines, written once
    outbox/<key>.eml        the original of a quarantine record
    outbox/failed/          records the store refused for good, with why

Appends are written in batches (every append waiting while a batch is being
written goes into the next one, which is written with one fsync), so the
cost per record falls as load rises. The outbox is bounded: L{full} is
true at L{limit} records, and the SMTP edge then answers new mail with
C{451 4.3.0} instead of accepting mail whose records could not be kept.
Records of mail already accepted are always written.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mdgateway.store.interfaces import IStore
from mdgateway.store.owed import (
    FAILED,
    Owed,
    OwedFormatError,
    OwedQuarantine,
    OwedRecord,
    decode,
    encode,
    new_key,
)

log = Logger()

SEGMENT_SUFFIX = ".jsonl"
ORIGINAL_SUFFIX = ".eml"
FAILED_DIR = "failed"

#: Records at which new mail is refused, by default.
DEFAULT_LIMIT = 100_000
#: Most records in one segment file.
SEGMENT_RECORDS = 1000
#: Most records applied to the store in one transaction.
BATCH_RECORDS = 500
#: Seconds between attempts while the store fails, doubling to the cap.
RETRY_FIRST = 0.5
RETRY_MAX = 10.0


@attrs.define
class _Segment:
    """
    One segment file: its records are on disk, not yet in the store.

    @ivar records: the records, while this process still has them in
        memory (it wrote them); C{None}: read them from C{path}.
    """

    seq: int
    path: str
    count: int
    written_at: float
    records: list[Owed] | None = None


@attrs.frozen
class OutboxStatus:
    """
    How the outbox stands, for readiness details and logs.

    @ivar store_reachable: whether the last attempt to apply records
        worked (C{None}: none made yet).
    """

    depth: int
    limit: int
    oldest_seconds: float
    full: bool
    store_reachable: bool | None
    failed: int


class Outbox:
    """
    Records owed to one L{IStore}, kept in C{directory} until it has them.

    @param directory: the outbox folder (in the spool's tree; created).
    @param reactor: clock and L{IReactorFromThreads}.
    @param threadpool: runs the disk work (writes, fsyncs, reads).
    @param limit: records at which L{full} turns true.
    """

    def __init__(
        self,
        directory: str,
        store: IStore,
        reactor: IReactorTime,
        threadpool: ThreadPool,
        *,
        limit: int = DEFAULT_LIMIT,
        segment_records: int = SEGMENT_RECORDS,
        batch_records: int = BATCH_RECORDS,
        retry_first: float = RETRY_FIRST,
        retry_max: float = RETRY_MAX,
    ) -> None:
        if limit < 1 or segment_records < 1 or batch_records < 1:
            raise ValueError("limit, segment_records and batch_records must be >= 1")
        self.directory = os.path.abspath(directory)
        self.store = store
        self.limit = limit
        self._clock = reactor
        self._threads = IReactorFromThreads(reactor)
        self._pool = threadpool
        self._segment_records = segment_records
        self._batch_records = batch_records
        self._retry_first = retry_first
        self._retry_max = retry_max
        self._pending: list[tuple[Owed, Deferred[None]]] = []
        self._pending_since: float | None = None
        self._writing: Deferred[None] | None = None
        self._segments: collections.deque[_Segment] = collections.deque()
        self._next_seq = 1
        self._depth = 0
        self._opened = False
        self._closing = False
        self._loop: Deferred[None] | None = None
        self._wake: Deferred[None] | None = None
        self._nap: IDelayedCall | None = None
        self._delay = retry_first
        self.store_reachable: bool | None = None
        #: Records the store refused for good (moved to C{failed/}).
        self.failed = 0
        #: Records applied to the store by this process.
        self.applied = 0
        #: Called with C{(count)} when records are applied (metrics).
        self.on_applied: Callable[[int], object] | None = None
        #: Called with C{(count)} when records are refused for good.
        self.on_failed: Callable[[int], object] | None = None

    def __repr__(self) -> str:
        return f"<Outbox {self.directory} depth={self._depth}>"

    # -- state -------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """
        Records not yet in the store (written or being written).
        """
        return self._depth

    @property
    def full(self) -> bool:
        """
        Whether new mail should be refused until the store catches up.
        """
        return self._depth >= self.limit

    def oldest_age(self) -> float:
        """
        Seconds since the oldest record not yet in the store was
        appended (0 when there is none).
        """
        if self._segments:
            since = self._segments[0].written_at
        elif self._pending_since is not None:
            since = self._pending_since
        else:
            return 0.0
        return max(0.0, self._clock.seconds() - since)

    def status(self) -> OutboxStatus:
        return OutboxStatus(
            depth=self._depth,
            limit=self.limit,
            oldest_seconds=round(self.oldest_age(), 3),
            full=self.full,
            store_reachable=self.store_reachable,
            failed=self.failed,
        )

    def _run(self, job: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._threads, self._pool, job, *args)

    # -- start and stop ------------------------------------------------------------

    async def open(self) -> int:
        """
        Create the folder, take over what a previous run left in it and
        start applying records to the store.

        @return: the number of records found from a previous run.
        """
        found: list[tuple[int, str, int, float]] = await self._run(
            _job_recover, self.directory
        )
        for seq, path, count, written_at in found:
            self._segments.append(_Segment(seq, path, count, written_at))
            self._depth += count
            self._next_seq = max(self._next_seq, seq + 1)
        total = sum(count for *_, count, _ in found)
        if total:
            log.info(
                "outbox {directory}: {count} record(s) of a previous run to apply",
                directory=self.directory,
                count=total,
            )
        self._opened = True
        self._start_writing()
        self._loop = Deferred.fromCoroutine(self._drain_loop())
        self._loop.addErrback(lambda f: log.failure("outbox drainer failed", f))
        return total

    async def adopt(self, root: str) -> int:
        """
        Move the outbox of another spool root (a worker no longer
        configured) into this one, if no process holds that root's lock.

        @return: the records moved.
        """
        count: int | None = await self._run(_job_count_segments, root)
        if count is None:
            return 0
        first = self._next_seq
        self._next_seq += count
        moved: list[tuple[int, str, int, float]] = await self._run(
            _job_adopt, root, self.directory, first, count
        )
        for seq, path, records, written_at in moved:
            self._segments.append(_Segment(seq, path, records, written_at))
            self._depth += records
        total = sum(records for *_, records, _ in moved)
        if total:
            log.info(
                "outbox: adopted {count} record(s) from {root}", count=total, root=root
            )
            self._kick()
        return total

    async def close(self, timeout: float = 10.0) -> None:
        """
        Write what is pending, give the drainer up to C{timeout} seconds
        to apply what is left (not waiting when the store is failing),
        then stop it. What is not applied stays on disk for the next start.
        """
        if self._writing is not None:
            await _settled(self._writing)
        deadline = self._clock.seconds() + timeout
        while (
            self._segments
            and self.store_reachable is not False
            and self._clock.seconds() < deadline
            and self._loop is not None
            and not self._loop.called
        ):
            await _sleep(self._clock, 0.05)
        self._closing = True
        self._kick()
        if self._loop is not None:
            await _settled(self._loop)
        if self._depth:
            log.warn(
                "outbox: {count} record(s) not yet in the store are kept in "
                "{directory} for the next start",
                count=self._depth,
                directory=self.directory,
            )

    # -- appending -----------------------------------------------------------------

    def append(self, record: OwedRecord) -> Deferred[None]:
        """
        Keep C{record}; the L{Deferred} fires once it is on disk, or fails
        with the C{OSError} that kept it from getting there.
        """
        return self.append_owed(Owed.new(record))

    def append_owed(self, owed: Owed) -> Deferred[None]:
        """
        L{append} with a key chosen by the caller.
        """
        done: Deferred[None] = Deferred()
        if not self._pending:
            self._pending_since = self._clock.seconds()
        self._pending.append((owed, done))
        self._depth += 1
        self._start_writing()
        return done

    def _start_writing(self) -> None:
        # Appends made before open() wait until the folder is there.
        writing = self._writing
        if (writing is None or writing.called) and self._opened and self._pending:
            self._writing = Deferred.fromCoroutine(self._write_pending())

    async def quarantine(
        self,
        message_id: str,
        reason: str,
        source: str,
        at: float,
        expires_at: float | None = None,
    ) -> None:
        """
        Keep the original at C{source} (a spool message) for the store:
        linked (or copied) into the outbox, then its record appended;
        returns once both are on disk.
        """
        key = new_key()
        name = key + ORIGINAL_SUFFIX
        await self._run(_job_keep_original, source, os.path.join(self.directory, name))
        record = OwedQuarantine(message_id, reason, name, at, expires_at)
        await self.append_owed(Owed(key, record))

    async def _write_pending(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                since = self._pending_since or self._clock.seconds()
                self._pending_since = None
                for start in range(0, len(batch), self._segment_records):
                    chunk = batch[start : start + self._segment_records]
                    seq = self._next_seq
                    self._next_seq += 1
                    path = os.path.join(self.directory, f"{seq:016d}{SEGMENT_SUFFIX}")
                    lines = [_line(owed) for owed, _ in chunk]
                    try:
                        await self._run(_job_write_segment, path, lines)
                    except Exception:
                        failure = Failure()
                        self._depth -= len(chunk)
                        log.failure(
                            "outbox: could not write {count} record(s) to {path}",
                            failure,
                            count=len(chunk),
                            path=path,
                        )
                        for _, done in chunk:
                            done.errback(failure)
                        continue
                    self._segments.append(
                        _Segment(seq, path, len(chunk), since, [o for o, _ in chunk])
                    )
                    self._kick()
                    for _, done in chunk:
                        done.callback(None)
        finally:
            self._writing = None

    # -- draining ------------------------------------------------------------------

    def _kick(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.callback(None)

    async def _wait(self) -> None:
        self._wake = Deferred()
        await self._wake

    async def _drain_loop(self) -> None:
        while not self._closing:
            if not self._segments:
                await self._wait()
                continue
            try:
                await self._drain_once()
            except Exception as e:
                was = self.store_reachable
                self.store_reachable = False
                if was is not False:
                    log.error(
                        "outbox: the store is failing ({error}); {count} record(s) "
                        "wait on disk and are retried",
                        error=str(e) or type(e).__name__,
                        count=self._depth,
                    )
                await self._pause(self._delay)
                self._delay = min(self._delay * 2, self._retry_max)
                continue
            if self.store_reachable is False:
                log.info(
                    "outbox: the store is back; applying {count} record(s)",
                    count=self._depth,
                )
            self.store_reachable = True
            self._delay = self._retry_first

    async def _pause(self, seconds: float) -> None:
        if self._closing:
            return
        self._wake = Deferred()
        wake = self._wake
        self._nap = self._clock.callLater(seconds, self._kick)
        await wake
        if self._nap is not None and self._nap.active():
            self._nap.cancel()
        self._nap = None

    async def _drain_once(self) -> None:
        taken: list[_Segment] = []
        records: list[Owed] = []
        unreadable: list[tuple[int, str, str]] = []
        for segment in self._segments:
            if taken and len(records) + segment.count > self._batch_records:
                break
            taken.append(segment)
            if segment.records is not None:
                records.extend(segment.records)
            else:
                got, bad = await self._run(_job_read_segment, segment.path)
                records.extend(got)
                unreadable.extend((segment.seq, line, why) for line, why in bad)
        resolved = [self._resolved(owed) for owed in records]
        outcomes = await self.store.apply(resolved)
        failed = [
            (owed, outcome.error)
            for owed, outcome in zip(records, outcomes, strict=True)
            if outcome.status == FAILED
        ]
        if failed or unreadable:
            await self._run(_job_keep_failed, self.directory, failed, unreadable)
            for owed, error in failed:
                log.critical(
                    "outbox: the store refused record {key} for good ({error}); "
                    "kept in {directory}/failed",
                    key=owed.key,
                    error=error,
                    directory=self.directory,
                    record=encode(owed),
                )
            for *_, why in unreadable:
                log.critical(
                    "outbox: unreadable record kept in {directory}/failed: {error}",
                    directory=self.directory,
                    error=why,
                )
            self.failed += len(failed) + len(unreadable)
            if self.on_failed is not None:
                self.on_failed(len(failed) + len(unreadable))
        originals = [
            os.path.join(self.directory, owed.record.path)
            for owed in records
            if isinstance(owed.record, OwedQuarantine)
        ]
        await self._run(_job_remove, [segment.path for segment in taken], originals)
        for segment in taken:
            self._segments.popleft()
            self._depth -= segment.count
        applied = len(records) - len(failed)
        self.applied += applied
        if self.on_applied is not None and applied:
            self.on_applied(applied)

    def _resolved(self, owed: Owed) -> Owed:
        record = owed.record
        if isinstance(record, OwedQuarantine) and not os.path.isabs(record.path):
            path = os.path.join(self.directory, record.path)
            return Owed(owed.key, attrs.evolve(record, path=path))
        return owed


def _line(owed: Owed) -> bytes:
    text = json.dumps(encode(owed), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


async def _settled(d: Deferred[Any]) -> None:
    """
    Wait for C{d} without taking its result (others wait on it too).
    """
    await DeferredList([d], consumeErrors=False)


async def _sleep(clock: IReactorTime, seconds: float) -> None:
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, d.callback, None)
    await d


# --------------------------------------------------------------------------
# Disk jobs (pool threads)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _segment_seq(name: str) -> int | None:
    stem = name[: -len(SEGMENT_SUFFIX)] if name.endswith(SEGMENT_SUFFIX) else ""
    return int(stem) if stem.isdigit() else None


def _job_write_segment(path: str, lines: Sequence[bytes]) -> None:
    """
    Write a segment atomically and durably: a temporary file, fsynced,
    renamed into place, and the folder fsynced (which also makes durable
    the links of originals made into it before).
    """
    temp = path + ".tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = b"".join(lines)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(temp)
        raise
    os.close(fd)
    os.replace(temp, path)
    _fsync_dir(os.path.dirname(path))


def _job_keep_original(source: str, destination: str) -> None:
    """
    Keep the bytes of C{source} at C{destination}: a hard link (the spool
    message is never changed after it is committed), or a copy on file
    systems without links. Made durable by the next segment's folder
    fsync.
    """
    try:
        os.link(source, destination)
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    temp = destination + ".tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb", closefd=False) as out:
            shutil.copyfileobj(src, out, 1024 * 1024)
            out.flush()
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(temp)
        raise
    os.close(fd)
    os.replace(temp, destination)


def _read_lines(path: str) -> tuple[list[Owed], list[tuple[str, str]]]:
    good: list[Owed] = []
    bad: list[tuple[str, str]] = []
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                good.append(decode(json.loads(raw)))
            except (ValueError, OwedFormatError) as e:
                bad.append((raw.decode("utf-8", "replace"), str(e)))
    return good, bad


def _job_read_segment(path: str) -> tuple[list[Owed], list[tuple[str, str]]]:
    return _read_lines(path)


def _job_recover(directory: str) -> list[tuple[int, str, int, float]]:
    """
    Create the folder if needed; remove half-written files and originals
    no segment refers to (a crash between the link and the segment);
    list the segments, oldest first.
    """
    os.makedirs(directory, 0o700, exist_ok=True)
    os.makedirs(os.path.join(directory, FAILED_DIR), 0o700, exist_ok=True)
    found = []
    originals: set[str] = set()
    removed = False
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".tmp"):
            _unlink(path)
            removed = True
            continue
        seq = _segment_seq(name)
        if seq is None:
            continue
        good, bad = _read_lines(path)
        for owed in good:
            if isinstance(owed.record, OwedQuarantine):
                originals.add(os.path.basename(owed.record.path))
        count = len(good) + len(bad)
        if count == 0:
            _unlink(path)
            removed = True
            continue
        found.append((seq, path, count, os.stat(path).st_mtime))
    for name in os.listdir(directory):
        if name.endswith(ORIGINAL_SUFFIX) and name not in originals:
            _unlink(os.path.join(directory, name))
            removed = True
    if removed:
        _fsync_dir(directory)
    found.sort()
    return found


def _job_count_segments(root: str) -> int | None:
    """
    The segments in C{root}'s outbox; C{None} when it has none at all.
    """
    source = os.path.join(root, "outbox")
    try:
        names = os.listdir(source)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return sum(1 for name in names if _segment_seq(name) is not None)


def _job_adopt(
    root: str, directory: str, first_seq: int, most: int
) -> list[tuple[int, str, int, float]]:
    """
    Move up to C{most} segments (and their originals) of C{root}'s outbox
    into C{directory}, numbered from C{first_seq}, holding C{root}'s spool
    lock so no live process is writing them; nothing when another process
    holds it.

    Each original is linked here before its segment moves and unlinked
    there after, so a crash at any point leaves every record with its
    original in at least one of the two outboxes.
    """
    import fcntl

    source = os.path.join(root, "outbox")
    try:
        lock: int | None = os.open(os.path.join(root, "lock"), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        lock = None
    try:
        if lock is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warn("outbox of {root} not adopted: in use", root=root)
                return []
        moved = []
        names = sorted(n for n in os.listdir(source) if _segment_seq(n) is not None)
        for seq, name in enumerate(names[:most], start=first_seq):
            path = os.path.join(source, name)
            good, bad = _read_lines(path)
            linked = []
            for owed in good:
                if isinstance(owed.record, OwedQuarantine):
                    original = os.path.basename(owed.record.path)
                    there = os.path.join(source, original)
                    here = os.path.join(directory, original)
                    if os.path.exists(there) and not os.path.exists(here):
                        os.link(there, here)
                    linked.append(there)
            _fsync_dir(directory)
            target = os.path.join(directory, f"{seq:016d}{SEGMENT_SUFFIX}")
            mtime = os.stat(path).st_mtime
            os.replace(path, target)
            _fsync_dir(directory)
            _fsync_dir(source)
            for there in linked:
                _unlink(there)
            moved.append((seq, target, len(good) + len(bad), mtime))
        failed = os.path.join(source, FAILED_DIR)
        if os.path.isdir(failed):
            for name in os.listdir(failed):
                os.replace(
                    os.path.join(failed, name),
                    os.path.join(directory, FAILED_DIR, f"adopted-{name}"),
                )
            os.rmdir(failed)
        if not any(_segment_seq(n) is not None for n in os.listdir(source)):
            for name in os.listdir(source):
                # Half-written segments, originals whose segment never was.
                _unlink(os.path.join(source, name))
            os.rmdir(source)
            _fsync_dir(root)
        return moved
    finally:
        if lock is not None:
            os.close(lock)


def _job_keep_failed(
    directory: str,
    failed: Sequence[tuple[Owed, str]],
    unreadable: Sequence[tuple[int, str, str]],
) -> None:
    """
    Keep what the store refused for good in C{failed/}: each record with
    its error (and a quarantined original beside it), for an operator.
    """
    target = os.path.join(directory, FAILED_DIR)
    os.makedirs(target, 0o700, exist_ok=True)
    for owed, error in failed:
        data = {"error": error, "record": encode(owed)}
        _write_small(os.path.join(target, f"{owed.key}.json"), data)
        record = owed.record
        if isinstance(record, OwedQuarantine):
            name = os.path.basename(record.path)
            source = os.path.join(directory, name)
            if os.path.exists(source):
                os.replace(source, os.path.join(target, name))
    for n, (seq, line, why) in enumerate(unreadable):
        _write_small(
            os.path.join(target, f"unreadable-{seq:016d}-{n}.json"),
            {"error": why, "line": line},
        )
    _fsync_dir(target)
    _fsync_dir(directory)


def _write_small(path: str, data: Any) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())


def _job_remove(segments: Sequence[str], originals: Sequence[str]) -> None:
    """
    Remove applied segments and the originals the store now holds. Not
    fsynced: if a removal is lost in a crash, the records are applied
    again and found to be duplicates.
    """
    for path in originals:
        _unlink(path)
    for path in segments:
        _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
