# -*- test-case-name: tests.test_spool -*-
"""
Receiving one message into the spool: streamed writes, back-pressure, and the
fsync-then-rename commit that must finish before the C{250}.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from mdgateway.queue.entry import (
    MESSAGE_SUFFIX,
    SpoolEntry,
    SpoolError,
    SpoolFullError,
    spool_error,
)
from mdgateway.queue.envelope import Envelope
from mdgateway.queue.jobs import job_append, job_commit, job_create, job_discard

if TYPE_CHECKING:
    from mdgateway.queue.spool import Spool


class ISpoolWriter(Interface):
    """
    One message being received into the spool.

    Call L{write} for each piece of the body as it arrives; pause reading
    from the client when it returns C{False} and resume when the callback
    given to L{on_drained} runs. Then either L{commit} (answer C{250} when it
    returns) or L{abort}.
    """

    queue_id = Attribute("The entry's queue id (str), fixed at open.")
    opened_at = Attribute("When the writer was opened (float, epoch seconds).")
    size = Attribute("Bytes accepted by write() so far (int).")
    buffered_bytes = Attribute("Bytes held in memory, not yet on disk (int).")
    error = Attribute(
        "The SpoolError that killed this writer, or None; once set, write() "
        "discards data and commit() raises it."
    )
    full = Attribute("Whether error is a SpoolFullError (answer 452 4.3.1).")

    def write(data: bytes) -> bool:  # noqa: N805
        """
        Take some message bytes without blocking. Return C{False} when the
        caller should stop reading from the client until L{on_drained} fires.
        """

    def on_drained(callback: Callable[[], object]) -> None:  # noqa: N805
        """
        Call C{callback} once, on the reactor thread, when the buffer has
        drained enough to read again (at once if it already has). Not called
        after L{abort}.
        """

    def commit(envelope: Envelope) -> Deferred[SpoolEntry]:  # noqa: N805
        """
        Flush, fsync and move the message and its envelope into the queue.
        Fires with the L{SpoolEntry} once both are durable; fails with
        L{SpoolFullError} or L{SpoolError}, and then nothing is queued.
        """

    def abort() -> Deferred[None]:  # noqa: N805
        """
        Drop the message and delete its partial file. Idempotent and safe
        while a flush is in flight; a no-op once L{commit} was called.
        """


class WriterPhase(enum.Enum):
    OPEN = "open"
    COMMITTING = "committing"
    COMMITTED = "committed"
    FAILED = "failed"
    ABORTED = "aborted"


@implementer(ISpoolWriter)
class SpoolWriter:
    """
    Streams one message into C{incoming/<id>.eml}.

    Writes go to an in-memory buffer; once it holds C{flush_size} bytes they
    are handed to the thread pool, one job at a time per writer so the file
    is written in order. C{write} returns C{False} when C{buffer_size} bytes
    are held (buffered plus in flight), and drain callbacks run when that
    falls to half. A caller that pauses on C{False} keeps the memory of one
    message near C{buffer_size} plus one read.

    Create with L{Spool.open_writer}.
    """

    _log = Logger()

    def __init__(self, spool: Spool, queue_id: str, opened_at: float) -> None:
        self._spool = spool
        self.queue_id = queue_id
        self.opened_at = opened_at
        self.size = 0
        self.error: SpoolError | None = None
        self._path = os.path.join(spool._paths.incoming, queue_id + MESSAGE_SUFFIX)
        self._phase = WriterPhase.OPEN
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._inflight_size = 0
        self._fd: int | None = None
        self._opened = False
        self._busy = False
        self._discarded = False
        self._drain_callbacks: list[Callable[[], object]] = []
        self._commit_waiter: Deferred[SpoolEntry] | None = None
        self._abort_waiters: list[Deferred[None]] = []
        self._envelope: Envelope | None = None
        self._envelope_bytes = b""
        self._start(
            self._opened_file, self._job_failed, job_create, spool._ops, self._path
        )

    def __repr__(self) -> str:
        return f"<SpoolWriter {self.queue_id} {self._phase.value} size={self.size}>"

    @property
    def buffered_bytes(self) -> int:
        return self._pending_size + self._inflight_size

    @property
    def full(self) -> bool:
        return isinstance(self.error, SpoolFullError)

    def _below_limit(self) -> bool:
        return self.buffered_bytes < self._spool._buffer_size

    def write(self, data: bytes) -> bool:
        if self._phase is WriterPhase.ABORTED or self.error is not None:
            return True  # discarded; keep reading to the end of the message
        if self._phase is not WriterPhase.OPEN:
            raise RuntimeError(f"write() on a {self._phase.value} spool writer")
        if data:
            data = bytes(data)
            self._pending.append(data)
            self._pending_size += len(data)
            self.size += len(data)
            self._pump()
        return self._below_limit()

    def on_drained(self, callback: Callable[[], object]) -> None:
        if self._phase is WriterPhase.ABORTED:
            return
        if self.error is not None or self._drained():
            callback()
        else:
            self._drain_callbacks.append(callback)

    def _drained(self) -> bool:
        return self.buffered_bytes <= self._spool._buffer_size // 2

    def commit(self, envelope: Envelope) -> Deferred[SpoolEntry]:
        if self._phase is not WriterPhase.OPEN:
            return fail(SpoolError(f"commit() on a {self._phase.value} writer"))
        if envelope.queue_id not in ("", self.queue_id):
            raise ValueError(
                f"envelope for {envelope.queue_id!r} committed to {self.queue_id}"
            )
        envelope = attrs.evolve(envelope, queue_id=self.queue_id)
        try:
            data = envelope.to_json().encode("utf-8")
        except (TypeError, ValueError) as e:
            self.abort()
            return fail(SpoolError(f"envelope cannot be stored: {e}"))
        if self.error is not None:
            self._phase = WriterPhase.FAILED
            self._spool._forget(self)
            return fail(self.error)
        self._phase = WriterPhase.COMMITTING
        self._envelope, self._envelope_bytes = envelope, data
        waiter: Deferred[SpoolEntry] = Deferred()
        self._commit_waiter = waiter
        self._pump()
        return waiter

    def abort(self) -> Deferred[None]:
        if self._phase in (WriterPhase.COMMITTING, WriterPhase.COMMITTED):
            return succeed(None)
        if self._phase is WriterPhase.ABORTED and self._discarded and not self._busy:
            return succeed(None)
        self._phase = WriterPhase.ABORTED
        self._pending, self._pending_size = [], 0
        self._drain_callbacks = []
        waiter: Deferred[None] = Deferred()
        self._abort_waiters.append(waiter)
        self._pump()
        return waiter

    # The job queue: at most one job in the pool at a time.

    def _take_pending(self) -> list[bytes]:
        chunks, self._pending = self._pending, []
        self._inflight_size, self._pending_size = self._pending_size, 0
        return chunks

    def _pump(self) -> None:
        if self._busy:
            return
        if self._phase is WriterPhase.ABORTED:
            if not self._discarded:
                self._discarded = True
                fd, self._fd = self._fd, None
                self._start(
                    self._discarded_file,
                    self._discard_failed,
                    job_discard,
                    self._spool._ops,
                    fd,
                    self._path,
                )
            return
        if self.error is not None or not self._opened or self._fd is None:
            return  # failed, not yet open, or already committed
        if self._phase is WriterPhase.COMMITTING:
            self._start(
                self._committed,
                self._job_failed,
                job_commit,
                self._spool._ops,
                self._spool._paths,
                self.queue_id,
                self._fd,
                self._take_pending(),
                self._envelope_bytes,
            )
        elif self._pending_size >= self._spool._flush_size:
            self._start(
                self._appended,
                self._job_failed,
                job_append,
                self._spool._ops,
                self._fd,
                self._path,
                self._take_pending(),
            )

    def _start(
        self,
        on_result: Callable[[Any], None],
        on_failure: Callable[[Failure], None],
        job: Callable[..., Any],
        *args: Any,
    ) -> None:
        self._busy = True
        d = self._spool._run(job, *args)
        d.addCallbacks(on_result, on_failure)
        d.addErrback(self._log_bug)
        d.addCallback(self._job_done)
        d.addErrback(self._log_bug)

    def _job_done(self, _: object) -> None:
        self._busy = False
        self._pump()
        if self._drain_callbacks and (self.error is not None or self._drained()):
            callbacks, self._drain_callbacks = self._drain_callbacks, []
            for callback in callbacks:
                callback()

    def _log_bug(self, failure: Failure) -> None:
        self._log.failure(
            "spool writer {queue_id} bug", failure, queue_id=self.queue_id
        )

    def _opened_file(self, fd: int) -> None:
        self._fd = fd
        self._opened = True

    def _appended(self, _: None) -> None:
        self._inflight_size = 0

    def _committed(self, _: None) -> None:
        self._fd = None
        self._inflight_size = 0
        self._phase = WriterPhase.COMMITTED
        assert self._envelope is not None and self._commit_waiter is not None
        entry = self._spool._paths.entry(self.queue_id, self._envelope, self.size)
        self._spool._committed(self, entry)
        waiter, self._commit_waiter = self._commit_waiter, None
        waiter.callback(entry)

    def _discarded_file(self, _: None) -> None:
        self._spool._forget(self)
        waiters, self._abort_waiters = self._abort_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _discard_failed(self, failure: Failure) -> None:
        self._log.failure(
            "could not remove aborted spool file {path}", failure, path=self._path
        )
        self._discarded_file(None)

    def _job_failed(self, failure: Failure) -> None:
        # The job closed the file and removed it before failing.
        self._fd = None
        self._inflight_size = 0
        self._pending, self._pending_size = [], 0
        self.error = spool_error(failure.value or SpoolError("unknown failure"))
        self._spool._write_failed(self.error)
        self._log.warn(
            "spool writer {queue_id} failed: {error}",
            queue_id=self.queue_id,
            error=str(self.error),
        )
        if self._phase is WriterPhase.COMMITTING:
            self._phase = WriterPhase.FAILED
            self._spool._forget(self)
            waiter, self._commit_waiter = self._commit_waiter, None
            assert waiter is not None
            waiter.errback(self.error)
