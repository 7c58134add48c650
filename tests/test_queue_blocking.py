"""
Tests for L{mdgateway.queue.blocking}: where the queue's file work runs.
"""

from __future__ import annotations

import threading

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.queue.blocking import INLINE_BYTES, BlockingWork
from mdgateway.testing.threads import (
    ManualThreadPool,
    ThreadsMemoryReactor,
)


class BlockingWorkTests(SynchronousTestCase):
    """
    Small messages' work in place, the rest (and all syncing work) in the
    pool.
    """

    def setUp(self) -> None:
        self.pool = ManualThreadPool()
        self.work = BlockingWork(ThreadsMemoryReactor(), self.pool)  # type: ignore[arg-type]  # a fake pool
        self.calls: list[str] = []

    def record(self, name: str) -> str:
        self.calls.append(name)
        return name.upper()

    def test_small_in_place(self) -> None:
        """
        Work for a message of at most C{INLINE_BYTES} runs at once, on the
        calling thread, and its result is there without the pool running.
        """
        d = Deferred.fromCoroutine(self.work.run(INLINE_BYTES, self.record, "a"))
        self.assertEqual(self.successResultOf(d), "A")
        self.assertEqual(self.calls, ["a"])

    def test_large_unknown_and_pool_in_the_pool(self) -> None:
        """
        A larger message, one of unknown size, and work sent to the pool
        explicitly wait for the pool; nothing runs until it does.
        """
        ds = [
            Deferred.fromCoroutine(self.work.run(INLINE_BYTES + 1, self.record, "b")),
            Deferred.fromCoroutine(self.work.run(None, self.record, "c")),
            Deferred.fromCoroutine(self.work.pool(self.record, "d")),
        ]
        self.assertEqual(self.calls, [])
        for d in ds:
            self.assertNoResult(d)
        self.pool.run_all()
        self.assertEqual(sorted(self.calls), ["b", "c", "d"])
        self.assertEqual([self.successResultOf(d) for d in ds], ["B", "C", "D"])

    def test_errors_reach_the_caller(self) -> None:
        """
        An exception of work done in place fails the call as one from the
        pool would.
        """

        def broken() -> None:
            raise OSError("disk says no")

        d = Deferred.fromCoroutine(self.work.run(10, broken))
        self.failureResultOf(d, OSError)

    def test_same_thread(self) -> None:
        """
        In-place work runs on the caller's thread (the reactor's), which is
        what makes it cheaper than a hand-over.
        """
        seen: list[threading.Thread] = []
        d = Deferred.fromCoroutine(
            self.work.run(1, lambda: seen.append(threading.current_thread()))
        )
        self.successResultOf(d)
        self.assertEqual(seen, [threading.current_thread()])
