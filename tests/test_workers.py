"""
The multi-process pieces: pipe framing, listener descriptors, stale worker
spools, the supervisor (with a fake process reactor and a clock) and the
merging of worker metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, eventAsJSON, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.config import load_config
from mdgateway.ops.metrics import Metrics
from mdgateway.run.compose import build_gateway
from mdgateway.run.control import Answers, WorkerUnavailableError
from mdgateway.run.reactor import global_reactor
from mdgateway.run.service import GatewayService
from mdgateway.run.supervisor import (
    EXIT_GRACE,
    FIRST_LISTEN_FD,
    METRICS_FD,
    ChildNotReadyError,
    Frames,
    LogRecords,
    Supervisor,
    WorkerRole,
    format_listen_fds,
    parse_listen_fds,
    stale_worker_spools,
    worker_spool,
)
from tests.capture import ListObserver
from tests.gatewayproc import default_toml, free_port


class FramingTests(SynchronousTestCase):
    """
    The two pipes from a worker, split into events and frames.
    """

    def test_log_records_across_chunks(self) -> None:
        """
        RFC 7464 records split at any byte come out as whole events, with
        their fields; a line that is not JSON becomes a text event.
        """
        stream = b"".join(
            b"\x1e" + eventAsJSON(e).encode() + b"\n"
            for e in (
                {"log_format": "one {n}", "n": 1, "log_level": LogLevel.info},
                {"log_format": "two", "log_level": LogLevel.error},
            )
        )
        stream += b"Traceback: not json\n"
        records = LogRecords()
        events = []
        for i in range(0, len(stream), 7):
            events.extend(records.feed(stream[i : i + 7]))
        self.assertEqual([e["log_format"] for e in events[:2]], ["one {n}", "two"])
        self.assertEqual(events[0]["n"], 1)
        self.assertEqual(events[1]["log_level"], LogLevel.error)
        self.assertEqual(events[2]["line"], "Traceback: not json")

    def test_log_records_flush_keeps_last_partial_line(self) -> None:
        """
        Whatever a worker wrote without a final newline before it died is
        still published.
        """
        records = LogRecords()
        self.assertEqual(records.feed(b"last words"), [])
        (event,) = records.flush()
        self.assertEqual(event["line"], "last words")

    def test_frames(self) -> None:
        """
        Length-prefixed frames survive arbitrary splitting; a malformed
        prefix stops the stream instead of misreading it.
        """
        data = Frames.encode(b"abc") + Frames.encode(b"") + Frames.encode(b"\n9\n")
        frames = Frames()
        out = []
        for byte in data:
            out.extend(frames.feed(bytes([byte])))
        self.assertEqual(out, [b"abc", b"", b"\n9\n"])
        broken = Frames()
        self.assertEqual(broken.feed(b"x\nabc"), [])
        self.assertTrue(broken.broken)
        self.assertEqual(broken.feed(Frames.encode(b"ok")), [])

    def test_listen_fds_round_trip(self) -> None:
        """
        Listener descriptors go to the worker's command line and back; junk
        is refused.
        """
        fds = {"smtp": 4, "submission": 5}
        self.assertEqual(parse_listen_fds(format_listen_fds(fds)), fds)
        self.assertEqual(parse_listen_fds(""), {})
        self.assertRaises(ValueError, parse_listen_fds, "smtp=x")
        self.assertRaises(ValueError, parse_listen_fds, "smtp")


class SpoolRootTests(SynchronousTestCase):
    """
    Where each process keeps its messages.
    """

    def test_worker_spool(self) -> None:
        """
        The primary keeps the configured directory; worker k a folder below.
        """
        self.assertEqual(worker_spool("/var/spool/md", 0), "/var/spool/md")
        self.assertEqual(worker_spool("/var/spool/md", 3), "/var/spool/md/workers/3")
        self.assertTrue(WorkerRole().primary)
        self.assertFalse(WorkerRole(index=2).primary)

    def test_stale_worker_spools(self) -> None:
        """
        Spools of workers beyond the configured count are found (so their
        messages are adopted); current ones and stray names are not.
        """
        root = Path(self.mktemp())
        for name in ("1", "2", "3", "notes"):
            (root / "workers" / name).mkdir(parents=True)
        self.assertEqual(
            stale_worker_spools(str(root), 2),
            [str(root / "workers" / "2"), str(root / "workers" / "3")],
        )
        self.assertEqual(stale_worker_spools(str(root), 4), [])
        self.assertEqual(stale_worker_spools(str(root / "none"), 1), [])


@attrs.define
class FakeProcess:
    """
    What L{Supervisor} uses of an L{IProcessTransport}.
    """

    protocol: Any
    pid: int
    args: list[str]
    child_fds: dict[int, Any]
    signals: list[str] = attrs.field(factory=list)
    stdin_closed: bool = False
    written: list[bytes] = attrs.field(factory=list)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def end(self, reason: Failure) -> None:
        self.protocol.processEnded(reason)


class FakeProcessReactor:
    """
    Records spawned processes instead of starting them.
    """

    def __init__(self) -> None:
        self.spawned: list[FakeProcess] = []

    def spawnProcess(
        self, protocol: Any, executable: str, args: list[str], env: Any, childFDs: Any
    ) -> FakeProcess:
        process = FakeProcess(protocol, 1000 + len(self.spawned), args, childFDs)
        protocol.makeConnection(process)
        self.spawned.append(process)
        return process


def killed() -> Failure:
    return Failure(ProcessTerminated(signal=9))


class SupervisorTests(SynchronousTestCase):
    """
    Starting, restarting, signalling and stopping the workers.
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.supervisor = Supervisor(
            reactor=self.reactor,  # type: ignore[arg-type]
            clock=self.clock,
            children=2,
            command=lambda index, fds: ["worker", str(index), format_listen_fds(fds)],
            listen_fds={"smtp": 17, "smtps": 21},
            observer=ListObserver(self.events),
            environment={},
        )

    def test_start_passes_sockets_and_pipes(self) -> None:
        """
        N-1 workers start; each gets stdin, a log pipe, stderr, the metrics
        pipe and the listening sockets at fixed descriptors, named on its
        command line.
        """
        self.supervisor.start()
        self.assertEqual(len(self.reactor.spawned), 2)
        first = self.reactor.spawned[0]
        self.assertEqual(
            first.child_fds,
            {0: "w", 1: "r", 2: 2, METRICS_FD: "r", FIRST_LISTEN_FD: 17, 5: 21},
        )
        self.assertEqual(first.args, ["worker", "1", "smtp=4,smtps=5"])
        self.assertEqual(self.reactor.spawned[1].args[1], "2")
        self.assertEqual(self.supervisor.running, 2)

    def test_worker_logs_are_published_with_index(self) -> None:
        """
        A worker's JSON log events reach the primary's observer marked
        with the worker's index.
        """
        self.supervisor.start()
        worker = self.reactor.spawned[1]
        record = eventAsJSON({"log_format": "hi", "log_level": LogLevel.warn})
        worker.protocol.childDataReceived(1, b"\x1e" + record.encode() + b"\n")
        (event,) = [e for e in self.events if e.get("log_format") == "hi"]
        self.assertEqual(event["worker"], 2)
        self.assertEqual(event["log_level"], LogLevel.warn)

    def test_crash_restarts_with_backoff(self) -> None:
        """
        A worker that dies is started again after a delay that doubles
        while it keeps dying, and is logged as critical each time.
        """
        self.supervisor.start()
        self.reactor.spawned[0].end(killed())
        self.assertEqual(len(self.reactor.spawned), 2)
        self.clock.advance(1.0)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(self.reactor.spawned[2].args[1], "1")
        self.reactor.spawned[2].end(killed())
        self.clock.advance(1.0)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.clock.advance(1.0)
        self.assertEqual(len(self.reactor.spawned), 4)

    def test_signal_all(self) -> None:
        """
        A reload signal goes to every running worker.
        """
        self.supervisor.start()
        self.supervisor.signal_all("HUP")
        self.assertEqual([p.signals for p in self.reactor.spawned], [["HUP"], ["HUP"]])

    def test_stop_closes_stdin_and_waits(self) -> None:
        """
        Stopping asks each worker to drain by closing its stdin and ends
        when all have exited; a worker that dies then is not restarted.
        """
        self.supervisor.start()
        stopped = Deferred.fromCoroutine(self.supervisor.stop(30))
        self.assertTrue(all(p.stdin_closed for p in self.reactor.spawned))
        self.assertNoResult(stopped)
        self.reactor.spawned[0].end(Failure(ProcessDone(0)))
        self.assertNoResult(stopped)
        self.reactor.spawned[1].end(Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        self.clock.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.supervisor.running, 0)

    def test_stop_kills_after_timeout(self) -> None:
        """
        A worker still running when the drain time is up is killed.
        """
        self.supervisor.start()
        stopped = Deferred.fromCoroutine(self.supervisor.stop(30))
        self.reactor.spawned[0].end(Failure(ProcessDone(0)))
        self.clock.advance(30)
        self.assertEqual(self.reactor.spawned[1].signals, ["KILL"])
        self.reactor.spawned[1].end(killed())
        self.successResultOf(stopped)

    def test_stop_cancels_pending_restart(self) -> None:
        """
        A crashed worker waiting for its restart is not started once the
        gateway is stopping.
        """
        self.supervisor.start()
        self.reactor.spawned[0].end(killed())
        stopped = Deferred.fromCoroutine(self.supervisor.stop(30))
        self.reactor.spawned[1].end(Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        self.clock.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_orderly_exit_during_stop_is_not_critical(self) -> None:
        """
        Once the gateway is stopping, a child that exits on its own (Ctrl-C
        reached the whole process group) is logged at info and not
        restarted.
        """
        self.supervisor.start()
        with capturedLogs() as events:
            self.supervisor.stopping()
            self.reactor.spawned[0].end(Failure(ProcessTerminated(signal=2)))
        self.clock.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual([levels(e) for e in events], ["info"])

    def test_exit_by_sigterm_is_a_warning(self) -> None:
        """
        A child stopped by a SIGTERM from outside while the gateway runs is
        restarted and logged as a warning, not as a crash.
        """
        self.supervisor.start()
        with capturedLogs() as events:
            self.reactor.spawned[0].end(Failure(ProcessTerminated(signal=15)))
            self.reactor.spawned[1].end(killed())
            self.clock.advance(EXIT_GRACE)
        self.assertEqual([levels(e) for e in events], ["warn", "critical"])
        self.clock.advance(1.0)
        self.assertEqual(len(self.reactor.spawned), 4)

    def test_exit_just_before_stop_is_not_critical(self) -> None:
        """
        A child that dies a moment before the gateway begins to stop (Ctrl-C
        reached it first) is reported at info once the stop began, and not
        restarted.
        """
        self.supervisor.start()
        with capturedLogs() as events:
            self.reactor.spawned[0].end(Failure(ProcessTerminated(exitCode=1)))
            self.clock.advance(EXIT_GRACE / 2)
            self.supervisor.stopping()
            self.clock.advance(EXIT_GRACE)
        self.assertEqual([levels(e) for e in events], ["info"])
        self.clock.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_metrics_snapshots(self) -> None:
        """
        The latest snapshot a running worker pushed is what the supervisor
        offers; garbage is ignored; a dead worker's gauges are dropped.
        """
        self.supervisor.start()
        worker = self.reactor.spawned[0]
        worker.protocol.childDataReceived(METRICS_FD, Frames.encode(b"[1]"))
        worker.protocol.childDataReceived(METRICS_FD, Frames.encode(b"{not json"))
        self.assertEqual(list(self.supervisor.snapshots()), [[1]])
        worker.end(killed())
        self.assertEqual(list(self.supervisor.snapshots()), [])

    def test_dead_workers_counters_are_kept(self) -> None:
        """
        When a worker dies its counters (and histograms) stay in the
        merged scrape, its gauges go, and its successor's counts add to
        them: the accepted total never goes down across the restart.
        """
        primary = Metrics()
        primary.remote = self.supervisor.snapshots
        self.supervisor.start()
        first = Metrics()
        for _ in range(5):
            first.message_accepted("smtp")
        first.session_opened("smtp")
        first.core_scan("local", 0.3, "allowed")
        spawned = self.reactor.spawned[0]
        spawned.protocol.childDataReceived(
            METRICS_FD, Frames.encode(json.dumps(first.snapshot()).encode())
        )
        accepted = "mdgateway_smtp_messages_accepted_total"
        active = "mdgateway_smtp_sessions_active"
        scans = "mdgateway_core_scan_seconds_count"
        text = primary.render()[0].decode()
        self.assertEqual(sample(text, accepted, '{listener="smtp"}'), 5.0)
        self.assertEqual(sample(text, active, '{listener="smtp"}'), 1.0)
        spawned.end(killed())
        text = primary.render()[0].decode()
        self.assertEqual(sample(text, accepted, '{listener="smtp"}'), 5.0)
        self.assertEqual(
            sample(text, scans, '{outcome="allowed",profile="local"}'), 1.0
        )
        self.assertNotIn(f'{active}{{listener="smtp"}} 1.0', text)
        self.clock.advance(60)
        successor = Metrics()
        for _ in range(2):
            successor.message_accepted("smtp")
        self.assertEqual(len(self.reactor.spawned), 3)
        self.reactor.spawned[-1].protocol.childDataReceived(
            METRICS_FD, Frames.encode(json.dumps(successor.snapshot()).encode())
        )
        text = primary.render()[0].decode()
        self.assertEqual(sample(text, accepted, '{listener="smtp"}'), 7.0)


class ControlTests(SynchronousTestCase):
    """
    Requests from the primary to a worker on its standard input, answered
    on the metrics pipe, with the supervisor's end and the worker's end
    (L{Answers}) wired to each other through the frames they write.
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.clock = Clock()
        self.supervisor = Supervisor(
            reactor=self.reactor,  # type: ignore[arg-type]
            clock=self.clock,
            children=2,
            command=lambda index, fds: ["worker", str(index)],
            listen_fds={},
            observer=ListObserver(),
            environment={},
        )
        self.supervisor.start()
        self.asked: list[dict[str, Any]] = []
        self.pending: dict[int, Deferred[dict[str, Any]]] = {}

    def worker_end(self, process: FakeProcess) -> Answers:
        """
        A worker's L{Answers} that writes to C{process}'s metrics pipe.
        """

        async def handler(request: dict[str, Any]) -> dict[str, Any]:
            self.asked.append(request)
            if request.get("fail"):
                raise ValueError("no such thing")
            if request.get("wait"):
                waiter: Deferred[dict[str, Any]] = Deferred()
                self.pending[len(self.asked)] = waiter
                return await waiter
            return {"echo": request}

        return Answers(
            handler,
            lambda frame: process.protocol.childDataReceived(METRICS_FD, frame),
        )

    def deliver(self, process: FakeProcess, answers: Answers) -> None:
        """
        Pass what the primary wrote to the worker's standard input, split
        at every 5 bytes.
        """
        data = b"".join(process.written)
        process.written.clear()
        for i in range(0, len(data), 5):
            answers.feed(data[i : i + 5])

    def test_ask_reaches_the_right_worker_and_answers(self) -> None:
        """
        A request to worker 2 is written to its standard input only; its
        answer, among metric snapshots on the same pipe, fires the request
        and leaves the snapshots as they are.
        """
        first, second = self.reactor.spawned
        answers = self.worker_end(second)
        second.protocol.childDataReceived(METRICS_FD, Frames.encode(b"[7]"))
        d = self.supervisor.ask(2, {"queue": {"action": "flush"}})
        self.assertEqual(first.written, [])
        self.deliver(second, answers)
        self.assertEqual(
            self.successResultOf(d), {"echo": {"queue": {"action": "flush"}}}
        )
        self.assertEqual(list(self.supervisor.snapshots()), [[7]])

    def test_answers_in_any_order(self) -> None:
        """
        Two requests in flight are each answered with their own result,
        whichever finishes first.
        """
        process = self.reactor.spawned[0]
        answers = self.worker_end(process)
        slow = self.supervisor.ask(1, {"wait": True, "n": 1})
        fast = self.supervisor.ask(1, {"n": 2})
        self.deliver(process, answers)
        self.assertEqual(self.successResultOf(fast), {"echo": {"n": 2}})
        self.assertNoResult(slow)
        self.pending[1].callback({"late": True})
        self.assertEqual(self.successResultOf(slow), {"late": True})

    def test_a_failing_request_fails_with_its_reason(self) -> None:
        """
        A request the worker's handler fails is answered with the reason,
        and fails in the primary; frames that are not requests are ignored.
        """
        process = self.reactor.spawned[0]
        answers = self.worker_end(process)
        answers.feed(Frames.encode(b"{not json") + Frames.encode(b'{"ask": "x"}'))
        d = self.supervisor.ask(1, {"fail": True})
        self.deliver(process, answers)
        failure = self.failureResultOf(d, WorkerUnavailableError)
        self.assertIn("no such thing", str(failure.value))
        self.assertEqual(self.asked, [{"fail": True}])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_not_running_fails_at_once(self) -> None:
        """
        A worker that is not running (waiting for its restart) is not
        waited for.
        """
        self.reactor.spawned[0].end(killed())
        failure = self.failureResultOf(
            self.supervisor.ask(1, {}), WorkerUnavailableError
        )
        self.assertIn("worker 1 is not running", str(failure.value))
        with self.assertRaises(ValueError):
            self.supervisor.ask(3, {})

    def test_exit_before_the_answer(self) -> None:
        """
        A worker that exits before it answers fails its requests at once,
        saying the outcome is unknown; its successor's answers do not
        resolve them.
        """
        process = self.reactor.spawned[0]
        d = self.supervisor.ask(1, {"n": 1})
        process.end(killed())
        failure = self.failureResultOf(d, WorkerUnavailableError)
        self.assertIn("may or may not have been done", str(failure.value))

    def test_deadline(self) -> None:
        """
        A request not answered in time fails, saying it may still be done;
        an answer after that is ignored.
        """
        process = self.reactor.spawned[0]
        answers = self.worker_end(process)
        d = self.supervisor.ask(1, {"wait": True}, timeout=5)
        self.deliver(process, answers)
        self.clock.advance(5)
        failure = self.failureResultOf(d, WorkerUnavailableError)
        self.assertIn("did not answer within 5s", str(failure.value))
        self.pending[1].callback({"late": True})


def sample(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + (labels or " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in metrics")


def levels(event: dict[str, Any]) -> str:
    return str(event["log_level"].name)


class ReadinessTests(SynchronousTestCase):
    """
    A supervised child that says when it is ready (the Core emulator).
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.clock = Clock()
        self.supervisor = Supervisor(
            reactor=self.reactor,  # type: ignore[arg-type]
            clock=self.clock,
            children=1,
            command=lambda index, fds: ["emulator"],
            listen_fds={"core": 9},
            observer=ListObserver(),
            environment={},
            name="emulator",
            ready_when=lambda event: event.get("emulator_listening") is True,
        )
        self.supervisor.start()
        self.child = self.reactor.spawned[0]

    def say(self, **fields: Any) -> None:
        record = eventAsJSON({"log_format": "x", "log_level": LogLevel.info, **fields})
        self.child.protocol.childDataReceived(1, record.encode() + b"\n")

    def test_ready_when_the_child_says_so(self) -> None:
        """
        The wait ends when the child logs the event that says it listens,
        not before.
        """
        ready = self.supervisor.wait_ready(30)
        self.say(other=True)
        self.assertNoResult(ready)
        self.say(emulator_listening=True)
        self.successResultOf(ready)
        self.clock.advance(60)

    def test_exit_before_ready_fails_without_restart(self) -> None:
        """
        A child that exits before it is ready fails the wait with its exit
        status, is logged as an error (not a crash loop) and not restarted.
        """
        ready = self.supervisor.wait_ready(30)
        with capturedLogs() as events:
            self.child.end(Failure(ProcessTerminated(exitCode=1)))
        failure = self.failureResultOf(ready, ChildNotReadyError)
        self.assertIn("emulator exited (exit 1)", str(failure.value))
        self.assertEqual([levels(e) for e in events], ["error"])
        self.clock.advance(60)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_not_ready_in_time(self) -> None:
        """
        A child that never says it is ready fails the wait after the
        timeout.
        """
        ready = self.supervisor.wait_ready(30)
        self.clock.advance(30)
        failure = self.failureResultOf(ready, ChildNotReadyError)
        self.assertIn("not ready after 30s", str(failure.value))


class MergedMetricsTests(SynchronousTestCase):
    """
    One scrape of the primary shows the whole gateway.
    """

    def test_counters_and_gauges_merge(self) -> None:
        """
        Counters and histograms add up over processes, including label
        sets only a worker has; the oldest-message gauge takes the maximum.
        """
        primary, worker = Metrics(), Metrics()
        primary.message_accepted("smtp")
        worker.message_accepted("smtp")
        worker.message_accepted("smtp")
        worker.message_accepted("submission")
        worker.core_scan("p", 0.2, "ok")
        primary.watch_queue_oldest_seconds(lambda: 5.0)
        worker.watch_queue_oldest_seconds(lambda: 50.0)
        primary.watch_queue_depth(lambda: 2)
        worker.watch_queue_depth(lambda: 3)
        snapshot = json.loads(json.dumps(worker.snapshot()))
        primary.remote = lambda: [snapshot]
        text = primary.render()[0].decode()
        accepted = "mdgateway_smtp_messages_accepted_total"
        self.assertEqual(sample(text, accepted, '{listener="smtp"}'), 3)
        self.assertEqual(sample(text, accepted, '{listener="submission"}'), 1)
        self.assertEqual(sample(text, "mdgateway_core_scan_seconds_count", "{"), 1)
        self.assertEqual(sample(text, "mdgateway_queue_oldest_seconds"), 50)
        self.assertEqual(sample(text, "mdgateway_queue_depth"), 5)

    def test_alone_without_workers(self) -> None:
        """
        Without workers the registry renders unchanged.
        """
        metrics = Metrics()
        metrics.message_accepted("smtp")
        text = metrics.render()[0].decode()
        self.assertEqual(sample(text, "mdgateway_smtp_messages_accepted_total", "{"), 1)


class ReloadTests(SynchronousTestCase):
    """
    What a configuration reload may and may not change with workers.
    """

    def test_reload_keeps_process_count(self) -> None:
        """
        A reload applies new rules but keeps the number of processes (and
        listeners and spool) until a restart, saying so in its answer and
        in the log.
        """
        folder = Path(self.mktemp())
        folder.mkdir()
        config = folder / "gw.toml"
        base = default_toml(free_port(), folder / "spool")
        config.write_text(base + "[processes]\nworkers = 2\n")
        service = GatewayService(build_gateway(load_config(config), global_reactor()))
        config.write_text(base + "[processes]\nworkers = 3\n")
        capture = ListObserver()
        warnings = capture.events
        globalLogPublisher.addObserver(capture)
        self.addCleanup(globalLogPublisher.removeObserver, capture)
        result = service.reload()
        self.assertEqual((result.loaded, result.problems), (True, ()))
        self.assertEqual(result.restart_required, ("workers",))
        self.assertEqual(service.config.workers, 2)
        self.assertEqual(service.config.version, load_config(config).version)
        self.assertTrue(
            [e for e in warnings if "after a restart" in str(e.get("log_format"))]
        )
