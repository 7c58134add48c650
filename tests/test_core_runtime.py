"""
Tests for L{mdgateway.scan.runtime} (failover, round-robin, circuit
breaker, concurrency, back-pressure) and L{mdgateway.scan.breaker}.

The logic is driven with L{FakeCoreServerClient} and a L{task.Clock}; two
real emulators on loopback check failover when one stops mid-run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mdgateway.emulator.app import CoreEmulator, EmulatorConfig, EmulatorServer
from mdgateway.policy.profiles import CoreProfile, CoreServer
from mdgateway.scan.breaker import CircuitBreaker
from mdgateway.scan.errors import Condition, CoreError
from mdgateway.scan.interfaces import ICoreServerClient
from mdgateway.scan.runtime import CoreRuntime
from mdgateway.scan.verdict import Verdict
from mdgateway.testing.core import FakeCoreServerClient, clean_verdict


def error(condition: Condition, fake: FakeCoreServerClient, **kw: Any) -> CoreError:
    kw.setdefault(
        "server_fault",
        condition in (Condition.UNREACHABLE, Condition.ACCESS_DENIED),
    )
    return CoreError(condition, condition.value, server=fake.server.url, **kw)


class Setup:
    """
    A runtime over fake clients and a clock.
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        servers: int = 2,
        *,
        strategy: str = "failover",
        concurrency: int = 2,
        threshold: int = 2,
        retry_after: float = 30.0,
        queue_bound: int | None = None,
        big_part: int = 4 << 20,
        big_concurrency: int = 2,
    ) -> None:
        self.clock = Clock()
        profile = CoreProfile(
            name="p",
            servers=tuple(CoreServer(f"http://core{i}:8008") for i in range(servers)),
            strategy=strategy,
            concurrency=concurrency,
            failure_threshold=threshold,
            retry_after=retry_after,
            # Server logic only: the fake files have no content to hash.
            verdict_cache=0.0,
            big_part=big_part,
            big_concurrency=big_concurrency,
        )
        self.fakes = [FakeCoreServerClient(s) for s in profile.servers]
        self.runtime = CoreRuntime(
            profile, self.clock, self.fakes, busy_backoff=5.0, queue_bound=queue_bound
        )
        self.scans: list[Deferred[Verdict]] = []
        case.addCleanup(self.abandon)

    def scan(self, path: str = "/spool/part1") -> Deferred[Verdict]:
        d = Deferred.fromCoroutine(self.runtime.scan(path, "part1.txt"))
        self.scans.append(d)
        return d

    def abandon(self) -> None:
        """
        Cancel what a test left running, so no coroutine is resumed after
        the test (or by the garbage collector).
        """
        for d in self.scans:
            d.cancel()
            d.addErrback(lambda _: None)
        for fake in self.fakes:
            for call in fake.pending("probe") + fake.pending("download"):
                call.result.cancel()
        self.runtime.close()

    def scans_on(self) -> list[int]:
        """
        How many scan calls each server received.
        """
        return [len([c for c in f.calls if c.kind == "scan"]) for f in self.fakes]


class FakeTests(SynchronousTestCase):
    """
    The fake client is a verified implementation of the interface.
    """

    def test_verified(self) -> None:
        """
        L{FakeCoreServerClient} provides L{ICoreServerClient}.
        """
        fake = FakeCoreServerClient(CoreServer("http://core:8008"))
        self.assertTrue(verifyObject(ICoreServerClient, fake))


class FailoverTests(SynchronousTestCase):
    """
    Failover prefers the first server and moves a failed scan to the next.
    """

    def test_prefers_first(self) -> None:
        """
        With both servers healthy every scan goes to the first.
        """
        s = Setup(self)
        for _ in range(3):
            d = s.scan()
            s.fakes[0].succeed_scan()
            self.assertTrue(self.successResultOf(d).allowed)
        self.assertEqual(s.scans_on(), [3, 0])

    def test_moves_on(self) -> None:
        """
        An unreachable first server sends the same scan to the second, and
        its result is the caller's.
        """
        s = Setup(self)
        d = s.scan()
        s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]))
        self.assertNoResult(d)
        verdict = s.fakes[1].succeed_scan()
        self.assertIs(self.successResultOf(d), verdict)
        self.assertEqual(s.runtime.status()[0].failures, 1)

    def test_all_fail(self) -> None:
        """
        When every server fails the caller gets the condition, with each
        server's error in the message.
        """
        s = Setup(self)
        d = s.scan()
        s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]))
        s.fakes[1].fail("scan", error(Condition.UNREACHABLE, s.fakes[1]))
        failure = self.failureResultOf(d, CoreError)
        self.assertIs(failure.value.condition, Condition.UNREACHABLE)
        self.assertIn("core0", failure.value.message)
        self.assertIn("core1", failure.value.message)

    def test_busy_moves_on(self) -> None:
        """
        A 503 from the first server moves the scan to the second and keeps
        new work off the first for the back-off time.
        """
        s = Setup(self)
        d = s.scan()
        s.fakes[0].fail("scan", error(Condition.BUSY, s.fakes[0], status=503))
        s.fakes[1].succeed_scan()
        self.successResultOf(d)
        self.assertTrue(s.runtime.status()[0].busy)
        d2 = s.scan()
        self.assertEqual(s.scans_on(), [1, 2])
        s.fakes[1].succeed_scan()
        self.successResultOf(d2)
        s.clock.advance(5)
        self.assertFalse(s.runtime.status()[0].busy)
        s.scan()
        self.assertEqual(s.scans_on(), [2, 2])

    def test_access_denied_wins(self) -> None:
        """
        If any server denied access the caller sees I{access denied}.
        """
        s = Setup(self)
        d = s.scan()
        s.fakes[0].fail("scan", error(Condition.ACCESS_DENIED, s.fakes[0]))
        s.fakes[1].fail("scan", error(Condition.UNREACHABLE, s.fakes[1]))
        self.assertIs(
            self.failureResultOf(d, CoreError).value.condition, Condition.ACCESS_DENIED
        )

    def test_busy_before_unreachable(self) -> None:
        """
        Busy on one server and unreachable on the other is I{busy}.
        """
        s = Setup(self)
        d = s.scan()
        s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]))
        s.fakes[1].fail("scan", error(Condition.BUSY, s.fakes[1]))
        self.assertIs(
            self.failureResultOf(d, CoreError).value.condition, Condition.BUSY
        )

    def test_server_fault_processing_failed_moves_on(self) -> None:
        """
        A server-side failure (an HTTP 500) is retried on the next server.
        """
        s = Setup(self)
        d = s.scan()
        s.fakes[0].fail(
            "scan", error(Condition.PROCESSING_FAILED, s.fakes[0], server_fault=True)
        )
        s.fakes[1].succeed_scan()
        self.successResultOf(d)

    def test_file_failures_not_retried(self) -> None:
        """
        A failure of the file itself (Failed, Not Scanned) goes straight to
        the caller, and says nothing about the server's health: it neither
        counts as a failure nor hides the one before.
        """
        for condition in (Condition.PROCESSING_FAILED, Condition.NOT_SCANNED):
            s = Setup(self)
            first = s.scan()
            s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]))
            s.fakes[1].succeed_scan()
            self.successResultOf(first)
            d = s.scan()
            s.fakes[0].fail("scan", error(condition, s.fakes[0]))
            self.assertIs(self.failureResultOf(d, CoreError).value.condition, condition)
            self.assertEqual(s.scans_on(), [2, 1])
            self.assertEqual(s.runtime.status()[0].failures, 1)
            third = s.scan()
            s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]))
            s.fakes[1].succeed_scan()
            self.successResultOf(third)
            self.assertFalse(s.runtime.status()[0].up)

    def test_scan_timeout_not_retried_but_counted(self) -> None:
        """
        A scan timeout is not repeated on another server (it would double
        the wait) but counts against the server's health.
        """
        s = Setup(self)
        d = s.scan()
        s.fakes[0].fail("scan", error(Condition.SCAN_TIMEOUT, s.fakes[0]))
        self.assertIs(
            self.failureResultOf(d, CoreError).value.condition, Condition.SCAN_TIMEOUT
        )
        self.assertEqual(s.scans_on(), [1, 0])
        self.assertEqual(s.runtime.status()[0].failures, 1)


class CancelTests(SynchronousTestCase):
    """
    A caller's cancellation is not a server failure.
    """

    def test_cancel(self) -> None:
        """
        Cancelling a scan cancels the server's call, fails with
        L{CancelledError}, frees the slot, and neither counts a failure nor
        tries the next server.
        """
        s = Setup(self)
        d = s.scan()
        (call,) = s.fakes[0].pending("scan")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(call.result.called)
        self.assertEqual(s.scans_on(), [1, 0])
        status = s.runtime.status()[0]
        self.assertEqual((status.failures, status.in_flight), (0, 0))


class RoundRobinTests(SynchronousTestCase):
    """
    Round-robin takes turns and still fails over.
    """

    def test_takes_turns(self) -> None:
        """
        Consecutive scans alternate between the servers.
        """
        s = Setup(self, strategy="round_robin")
        order = []
        for _ in range(4):
            s.scan()
            order.append([i for i, f in enumerate(s.fakes) if f.pending("scan")][0])
            s.fakes[order[-1]].succeed_scan()
        self.assertEqual(order, [0, 1, 0, 1])

    def test_fails_over(self) -> None:
        """
        A round-robin scan that fails on its server moves to the other.
        """
        s = Setup(self, strategy="round_robin")
        s.scan()
        s.fakes[0].succeed_scan()
        d = s.scan()
        s.fakes[1].fail("scan", error(Condition.UNREACHABLE, s.fakes[1]))
        s.fakes[0].succeed_scan()
        self.successResultOf(d)
        self.assertEqual(s.scans_on(), [2, 1])


class CircuitBreakerRuntimeTests(SynchronousTestCase):
    """
    A server is taken out after C{failure_threshold} consecutive failures and
    probed with C{GET /version} after C{retry_after} seconds.
    """

    def mark_down(self, s: Setup) -> None:
        for _ in range(2):
            d = s.scan()
            s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]))
            s.fakes[1].succeed_scan()
            self.successResultOf(d)

    def test_marked_down_and_skipped(self) -> None:
        """
        After two failures the first server gets no more scans.
        """
        s = Setup(self)
        self.mark_down(s)
        self.assertFalse(s.runtime.status()[0].up)
        s.scan()
        self.assertEqual(s.scans_on(), [2, 3])

    def test_probe_after_retry_after(self) -> None:
        """
        No probe before C{retry_after}; a failed probe waits C{retry_after}
        again; a good probe brings the server back into rotation.
        """
        s = Setup(self)
        self.mark_down(s)
        s.clock.advance(29.9)
        self.assertEqual(s.fakes[0].pending("probe"), [])
        s.clock.advance(0.1)
        self.assertEqual(len(s.fakes[0].pending("probe")), 1)
        s.fakes[0].fail("probe", error(Condition.UNREACHABLE, s.fakes[0]))
        self.assertFalse(s.runtime.status()[0].up)
        s.clock.advance(29)
        self.assertEqual(s.fakes[0].pending("probe"), [])
        s.clock.advance(1)
        s.fakes[0].pending("probe")[0].result.callback(None)
        status = s.runtime.status()[0]
        self.assertTrue(status.up)
        self.assertEqual(status.failures, 0)
        s.scan()
        self.assertEqual(s.scans_on(), [3, 2])

    def test_late_success_does_not_bring_server_back(self) -> None:
        """
        A scan that started before the server went down and then succeeds
        does not bring it back (only a probe does), and the probe stays
        scheduled.
        """
        s = Setup(self, concurrency=3, threshold=2)
        slow = s.scan()
        for _ in range(2):
            d = s.scan()
            s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]), index=1)
            s.fakes[1].succeed_scan()
            self.successResultOf(d)
        self.assertFalse(s.runtime.status()[0].up)
        s.fakes[0].succeed_scan()
        self.successResultOf(slow)
        self.assertFalse(s.runtime.status()[0].up)
        self.assertEqual(len(s.clock.getDelayedCalls()), 1)

    def test_success_does_not_hide_failures(self) -> None:
        """
        Successes of other files in between do not hide a run of failures:
        the server goes down when half or more of its recent answers were
        failures (here 2 of the last 4), which a count of consecutive
        failures would never see.
        """
        s = Setup(self, threshold=2)
        for _ in range(2):
            d = s.scan()
            s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]))
            s.fakes[1].succeed_scan()
            self.successResultOf(d)
            if s.runtime.status()[0].up:
                d = s.scan()
                s.fakes[0].succeed_scan()
                self.successResultOf(d)
        self.assertFalse(s.runtime.status()[0].up)

    def test_mostly_healthy_stays_up(self) -> None:
        """
        A server whose answers are mostly good stays up: one failure in five
        never puts two in its last four answers.
        """
        s = Setup(self, threshold=2)
        for round_ in range(11):
            d = s.scan()
            if round_ % 5 == 0:
                s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]))
                s.fakes[1].succeed_scan()
            else:
                s.fakes[0].succeed_scan()
            self.successResultOf(d)
            s.clock.advance(1)
        self.assertTrue(s.runtime.status()[0].up)

    def test_old_failures_expire(self) -> None:
        """
        Failures older than the breaker's window no longer count.
        """
        s = Setup(self, threshold=2)
        d = s.scan()
        s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]))
        s.fakes[1].succeed_scan()
        self.successResultOf(d)
        s.clock.advance(61)
        d = s.scan()
        s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]))
        s.fakes[1].succeed_scan()
        self.successResultOf(d)
        self.assertTrue(s.runtime.status()[0].up)
        self.assertEqual(s.runtime.status()[0].failures, 1)

    def test_trial_after_probe(self) -> None:
        """
        After a good probe the server is back on trial: its next failure
        takes it down at once; a good answer ends the trial.
        """
        s = Setup(self, threshold=2)
        self.mark_down(s)
        s.clock.advance(30)
        s.fakes[0].pending("probe")[0].result.callback(None)
        self.assertTrue(s.runtime.status()[0].up)
        d = s.scan()
        s.fakes[0].fail("scan", error(Condition.SCAN_TIMEOUT, s.fakes[0]))
        self.failureResultOf(d, CoreError)
        self.assertFalse(s.runtime.status()[0].up)
        s.clock.advance(30)
        s.fakes[0].pending("probe")[0].result.callback(None)
        d = s.scan()
        s.fakes[0].succeed_scan()
        self.successResultOf(d)
        d = s.scan()
        s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]))
        s.fakes[1].succeed_scan()
        self.successResultOf(d)
        self.assertTrue(s.runtime.status()[0].up)

    def test_all_down(self) -> None:
        """
        With every server down a scan fails at once as I{unreachable}, and
        the runtime reports itself unavailable.
        """
        s = Setup(self, servers=1, threshold=1)
        d = s.scan()
        s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]))
        self.failureResultOf(d, CoreError)
        self.assertFalse(s.runtime.available())
        d = s.scan()
        failure = self.failureResultOf(d, CoreError)
        self.assertIs(failure.value.condition, Condition.UNREACHABLE)
        self.assertIn("no server", failure.value.message)
        self.assertEqual(s.scans_on(), [1])

    def test_down_while_waiting_for_slot(self) -> None:
        """
        A scan queued for a slot on a server that goes down meanwhile moves
        to the next server instead of using it.
        """
        s = Setup(self, concurrency=1, threshold=1, queue_bound=10)
        first = s.scan()
        second = s.scan()
        self.assertEqual(s.scans_on(), [1, 0])
        s.fakes[0].fail("scan", error(Condition.UNREACHABLE, s.fakes[0]))
        # The first scan moved to the second server; the second scan got the
        # freed slot, saw the server down, and now waits for the second
        # server's only slot instead of using the first.
        self.assertEqual(s.scans_on(), [1, 1])
        s.fakes[1].succeed_scan()
        self.assertEqual(s.scans_on(), [1, 2])
        s.fakes[1].succeed_scan()
        self.successResultOf(first)
        self.successResultOf(second)

    def test_close_cancels_probes(self) -> None:
        """
        C{close} cancels a scheduled probe and a probe in progress, and new
        scans are refused.
        """
        s = Setup(self)
        self.mark_down(s)
        self.assertEqual(len(s.clock.getDelayedCalls()), 1)
        self.successResultOf(s.runtime.close())
        self.assertEqual(s.clock.getDelayedCalls(), [])
        self.failureResultOf(s.scan(), CoreError)

        other = Setup(self)
        self.mark_down(other)
        other.clock.advance(30)
        (probe,) = other.fakes[0].pending("probe")
        self.successResultOf(other.runtime.close())
        self.assertTrue(probe.result.called)
        self.assertEqual(other.clock.getDelayedCalls(), [])


class ConcurrencyTests(SynchronousTestCase):
    """
    Per-server slots and the back-pressure signal.
    """

    def test_slots(self) -> None:
        """
        At most C{concurrency} scans run on a server; the next waits for a
        slot.
        """
        s = Setup(self, servers=1, concurrency=2, queue_bound=5)
        scans = [s.scan() for _ in range(3)]
        self.assertEqual(s.scans_on(), [2])
        status = s.runtime.status()[0]
        self.assertEqual((status.in_flight, status.queued), (2, 1))
        s.fakes[0].succeed_scan()
        self.successResultOf(scans[0])
        self.assertEqual(s.scans_on(), [3])

    def test_big_files_have_slots_of_their_own(self) -> None:
        """
        Files of at least C{big_part} bytes take the big lane's
        C{big_concurrency} slots: while they are all taken, a small file is
        still sent at once, and a further big file waits for a big slot.
        """
        s = Setup(
            self,
            servers=1,
            concurrency=1,
            queue_bound=5,
            big_part=100,
            big_concurrency=1,
        )
        folder = Path(self.mktemp())
        folder.mkdir()
        big, small = folder / "big", folder / "small"
        big.write_bytes(b"x" * 100)
        small.write_bytes(b"x" * 99)
        s.scan(str(big))
        s.scan(str(big))
        self.assertEqual(s.scans_on(), [1])
        s.scan(str(small))
        self.assertEqual(s.scans_on(), [2])
        status = s.runtime.status()[0]
        self.assertEqual((status.in_flight, status.queued), (2, 1))
        self.assertTrue(s.runtime.available())

    def test_available_false_when_queue_full(self) -> None:
        """
        With every slot taken and C{queue_bound} scans waiting, the runtime
        is unavailable until the queue drains.
        """
        s = Setup(self, servers=1, concurrency=1, queue_bound=1)
        self.assertTrue(s.runtime.available())
        s.scan()
        self.assertTrue(s.runtime.available())
        s.scan()
        self.assertFalse(s.runtime.available())
        self.assertTrue(s.runtime.status()[0].busy)
        s.fakes[0].succeed_scan()
        self.assertTrue(s.runtime.available())

    def test_queue_spills_to_next_server(self) -> None:
        """
        In failover, a first server whose queue is beyond the bound is
        skipped for the next one.
        """
        s = Setup(self, concurrency=1, queue_bound=1)
        s.scan()
        s.scan()
        s.scan()
        self.assertEqual(s.scans_on(), [1, 1])

    def test_busy_after_503(self) -> None:
        """
        A 503 makes the only server busy: unavailable, and scans fail at
        once with I{busy} until the back-off ends.
        """
        s = Setup(self, servers=1)
        d = s.scan()
        s.fakes[0].fail("scan", error(Condition.BUSY, s.fakes[0]))
        self.assertIs(
            self.failureResultOf(d, CoreError).value.condition, Condition.BUSY
        )
        self.assertFalse(s.runtime.available())
        d = s.scan()
        self.assertIs(
            self.failureResultOf(d, CoreError).value.condition, Condition.BUSY
        )
        self.assertEqual(s.scans_on(), [1])
        s.clock.advance(5)
        self.assertTrue(s.runtime.available())
        self.assertTrue(s.runtime.status()[0].up)


class DownloadTests(SynchronousTestCase):
    """
    Converted files are fetched from the server that produced the verdict.
    """

    def test_routed(self) -> None:
        """
        The download goes to the verdict's server.
        """
        s = Setup(self)
        verdict = clean_verdict(s.fakes[1].server)
        d = Deferred.fromCoroutine(s.runtime.download_sanitized(verdict, "/tmp/x"))
        (call,) = s.fakes[1].pending("download")
        self.assertEqual(call.args, (verdict, "/tmp/x"))
        call.result.callback("a_sanitized.docx")
        self.assertEqual(self.successResultOf(d), "a_sanitized.docx")
        self.assertEqual(s.fakes[0].calls, [])

    def test_unknown_server(self) -> None:
        """
        A verdict from a server outside the profile is a programming error.
        """
        s = Setup(self)
        verdict = clean_verdict(CoreServer("http://elsewhere:8008"))
        d = Deferred.fromCoroutine(s.runtime.download_sanitized(verdict, "/tmp/x"))
        self.failureResultOf(d, ValueError)

    def test_failure_counts(self) -> None:
        """
        A failed download raises the condition and counts against the server.
        """
        s = Setup(self)
        verdict = clean_verdict(s.fakes[0].server)
        d = Deferred.fromCoroutine(s.runtime.download_sanitized(verdict, "/tmp/x"))
        s.fakes[0].fail("download", error(Condition.UNREACHABLE, s.fakes[0]))
        self.failureResultOf(d, CoreError)
        self.assertEqual(s.runtime.status()[0].failures, 1)


class BreakerTests(SynchronousTestCase):
    """
    L{CircuitBreaker} on its own.
    """

    def test_cycle(self) -> None:
        """
        Down at the threshold, probe due after C{retry_after}, up on success.
        """
        breaker = CircuitBreaker(threshold=3, retry_after=10)
        self.assertFalse(breaker.failure(0))
        self.assertFalse(breaker.failure(1))
        self.assertTrue(breaker.failure(2))
        self.assertFalse(breaker.up)
        self.assertFalse(breaker.failure(3))
        self.assertEqual(breaker.next_probe(), 12)
        self.assertFalse(breaker.probe_due(11.9))
        self.assertTrue(breaker.probe_due(12))
        breaker.probe_failed(12)
        self.assertEqual(breaker.next_probe(), 22)
        breaker.success(13)  # a late answer: still down
        self.assertFalse(breaker.up)
        self.assertTrue(breaker.probe_succeeded())
        self.assertTrue(breaker.up)
        self.assertTrue(breaker.on_trial)
        self.assertEqual(breaker.failures, 0)
        self.assertIsNone(breaker.next_probe())
        self.assertFalse(breaker.probe_succeeded())

    def test_rate(self) -> None:
        """
        Down when C{threshold} of the last C{2 x threshold} outcomes are
        failures, however they interleave with successes.
        """
        breaker = CircuitBreaker(threshold=3, retry_after=10)
        for t, ok in enumerate([True, False, True, True, False, True]):
            if ok:
                breaker.success(t)
            else:
                self.assertFalse(breaker.failure(t))
        # The last six are now F T T F T F: three failures.
        self.assertTrue(breaker.failure(6))
        self.assertFalse(breaker.up)


# -- two real emulators ----------------------------------------------------------


async def _two_emulators_run(
    tmp_path: Path, strategy: str
) -> tuple[list[Verdict], EmulatorServer, EmulatorServer, CoreRuntime]:
    first = EmulatorServer(reactor, CoreEmulator(reactor, EmulatorConfig(latency=0.2)))
    second = EmulatorServer(reactor, CoreEmulator(reactor, EmulatorConfig(latency=0.2)))
    first.start()
    second.start()
    profile = CoreProfile(
        name="two",
        servers=(CoreServer(first.url), CoreServer(second.url)),
        strategy=strategy,
        poll_interval=0.05,
        concurrency=4,
        failure_threshold=2,
        retry_after=60,
    )
    runtime = CoreRuntime.from_profile(profile, reactor)
    paths = []
    for i in range(16):
        path = tmp_path / f"f{i}.txt"
        path.write_bytes(b"file number %d" % i)
        paths.append(str(path))
    scans = [Deferred.fromCoroutine(runtime.scan(p, Path(p).name)) for p in paths]
    for _ in range(500):
        if first.emulator.counters["submit"] >= 2:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    await first.stop()
    verdicts: list[Verdict] = await gatherResults(scans)
    return verdicts, first, second, runtime


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("strategy", ["failover", "round_robin"])
async def test_one_emulator_stops_mid_run(tmp_path: Path, strategy: str) -> None:
    """
    With two emulators, stopping the first while scans are in flight loses
    no scan: the ones on it move to the second; the first is marked down.
    """
    verdicts, first, second, runtime = await _two_emulators_run(tmp_path, strategy)
    try:
        assert len(verdicts) == 16
        assert all(v.allowed for v in verdicts)
        on_first = [v for v in verdicts if v.core_url == first.url]
        on_second = [v for v in verdicts if v.core_url == second.url]
        assert len(on_first) + len(on_second) == 16
        # The first took uploads before it stopped, then they moved over.
        assert first.emulator.counters["submit"] >= 2
        assert len(on_first) < first.emulator.counters["submit"]
        assert second.emulator.counters["submit"] >= len(on_second) > 0
        assert not runtime.status()[0].up
        assert runtime.status()[1].up
    finally:
        await runtime.close()
        await first.close()
        await second.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_round_robin_spreads(tmp_path: Path) -> None:
    """
    Round-robin over two live emulators gives each half of the scans.
    """
    servers = [EmulatorServer(reactor) for _ in range(2)]
    for server in servers:
        server.start()
    profile = CoreProfile(
        name="rr",
        servers=tuple(CoreServer(s.url) for s in servers),
        strategy="round_robin",
        poll_interval=0.01,
        verdict_cache=0.0,  # the same file, scanned six times
    )
    runtime = CoreRuntime.from_profile(profile, reactor)
    try:
        path = tmp_path / "a.txt"
        path.write_bytes(b"hello")
        for _ in range(6):
            await runtime.scan(str(path), "a.txt")
        assert [s.emulator.counters["submit"] for s in servers] == [3, 3]
    finally:
        await runtime.close()
        for server in servers:
            await server.close()
