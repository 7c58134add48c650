# -*- test-case-name: tests.test_workers -*-
"""
Several gateway processes on one host, sharing the listening sockets.

One reactor thread under one GIL is the ceiling of a single process, so
C{[processes] workers = N} runs N processes: the one C{twist} started (the
I{primary}, worker 0) binds every listener, and then starts N-1 I{workers}
that adopt the same listening sockets, so the kernel hands each new
connection to whichever process accepts it first.

Each process owns a spool root of its own (the primary the configured
directory, worker I{k} C{<directory>/workers/<k>}), locked for its life,
so no message is ever handled by two processes; the messages a process
accepted are delivered by it, and recovered by its successor after a
crash. Only the primary runs the admin API, the retention job and the
built-in Core emulator.

A worker's pipes to the primary: its standard input (closed by the
primary, or at the primary's death: the worker drains and exits), its
standard output (its JSON log, re-published by the primary with a
C{worker} field) and descriptor 3 (its metrics, pushed every few seconds
and merged into the primary's C{/metrics}). The primary also sends requests
on the worker's standard input, answered on descriptor 3 (L{Supervisor.ask};
see L{mdgateway.run.control}).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IReactorProcess, IReactorTime, IReadDescriptor
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    eventFromJSON,
    globalLogBeginner,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

import mdgateway
from mdgateway.ops.metrics import RetiredCounters
from mdgateway.run.control import Asks, Frames
from mdgateway.run.reactor import IGatewayReactor

__all__ = ["Frames", "Supervisor", "WorkerRole", "run_child"]

log = Logger()

#: The child descriptor a worker pushes its metric snapshots on.
METRICS_FD = 3
#: The first child descriptor carrying an inherited listening socket.
FIRST_LISTEN_FD = 4
#: Seconds between a crashed worker and its restart, doubling to the cap.
RESTART_FIRST = 1.0
RESTART_MAX = 30.0
#: A worker that ran this long before it died restarts without delay
#: growth: it was not crash-looping.
STABLE_AFTER = 60.0
#: Seconds before a child's unexpected exit is reported: Ctrl-C reaches
#: every process of the group at once, and a child may die of it a moment
#: before the primary begins its own orderly stop.
EXIT_GRACE = 0.25


def worker_spool(root: str, index: int) -> str:
    """
    The spool root of worker C{index} under the configured C{root}.
    """
    if index == 0:
        return root
    return str(Path(root) / "workers" / str(index))


def stale_worker_spools(root: str, workers: int) -> list[str]:
    """
    Spool roots of workers that no longer exist (index C{>= workers}):
    their entries must be adopted, never stranded.
    """
    base = Path(root) / "workers"
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    return [
        str(base / name)
        for name in names
        if name.isdigit() and int(name) >= workers and (base / name).is_dir()
    ]


@attrs.frozen
class WorkerRole:
    """
    Which process of the gateway this is.

    @ivar index: 0 for the primary, 1..N-1 for a worker.
    @ivar listen_fds: for a worker, listener name to inherited descriptor.
    """

    index: int = 0
    listen_fds: Mapping[str, int] = attrs.field(factory=dict)

    @property
    def primary(self) -> bool:
        return self.index == 0


def format_listen_fds(fds: Mapping[str, int]) -> str:
    """
    C{name=fd,...} for a worker's command line (listener names are
    checked identifiers: no C{=} or C{,}).
    """
    return ",".join(f"{name}={fd}" for name, fd in fds.items())


def parse_listen_fds(text: str) -> dict[str, int]:
    """
    The inverse of L{format_listen_fds}.

    @raise ValueError: on anything else.
    """
    fds: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        name, sep, fd = item.partition("=")
        if not sep or not name or not fd.isdigit():
            raise ValueError(f"bad listener descriptor {item!r}")
        fds[name] = int(fd)
    return fds


# -- the pipes: sans-IO framing ------------------------------------------------


class LogRecords:
    """
    Splits a worker's JSON log stream (RFC 7464: C{RS json LF}) into
    events; a record that is not valid JSON becomes a plain text event, so
    nothing a worker says is lost.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        *records, self._buffer = self._buffer.split(b"\n")
        return [e for e in map(_event, records) if e is not None]

    def flush(self) -> list[dict[str, Any]]:
        rest, self._buffer = self._buffer, b""
        event = _event(rest)
        return [event] if event is not None else []


def _event(record: bytes) -> dict[str, Any] | None:
    text = record.strip(b"\x1e \r\t").decode("utf-8", "replace")
    if not text:
        return None
    try:
        event = eventFromJSON(text)
        if isinstance(event, dict):
            return event
    except ValueError:
        pass
    return {"log_format": "{line}", "line": text, "log_level": None}


@implementer(IReadDescriptor)
class ParentWatch:
    """
    Reads a child's standard input to notice its end (the primary closed
    it, for an orderly stop, or died) and to pass on what the primary
    sends (C{on_data}: requests; without it, ignored). Set descriptor 0
    non-blocking and add it as a reader.
    """

    def __init__(
        self, on_closed: Any, on_data: Callable[[bytes], object] | None = None
    ) -> None:
        self._on_closed = on_closed
        self._on_data = on_data

    def fileno(self) -> int:
        return 0

    def doRead(self) -> Any:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return CONNECTION_DONE
        if self._on_data is not None:
            self._on_data(data)
        return None

    def connectionLost(self, reason: Any) -> None:
        self._on_closed()

    def logPrefix(self) -> str:
        return "parent"


def run_child(
    reactor: IGatewayReactor,
    start: Callable[[], object],
    stop: Callable[[], object],
    on_hangup: Callable[[], object] | None = None,
    *,
    ignore_interrupt: bool = True,
    on_input: Callable[[bytes], object] | None = None,
) -> None:
    """
    The life of a process the primary supervises (a worker, the built-in
    Core emulator): JSON log events on standard output, C{start} once the
    reactor runs, C{stop} before it shuts down, which happens on SIGTERM or
    when standard input closes (the primary stopping or gone); SIGHUP runs
    C{on_hangup}, or is ignored. SIGINT is ignored (unless
    C{ignore_interrupt} is false: run by hand): Ctrl-C in a terminal
    reaches the whole process group, and the primary, which gets it too,
    drains its children in order. What the primary writes on standard
    input goes to C{on_input}.
    """
    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(sys.stdout, recordSeparator="")],
        redirectStandardIO=False,
    )

    def started() -> None:
        if ignore_interrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.set_blocking(0, False)
        reactor.addReader(
            ParentWatch(lambda: reactor.stop() if reactor.running else None, on_input)
        )
        start()

    if on_hangup is None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    else:
        hangup = on_hangup
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(hangup))
    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()


# -- the supervisor --------------------------------------------------------------


class _WorkerProtocol(ProcessProtocol):
    """
    The primary's end of one worker's pipes: a thin shim over
    L{LogRecords} and L{Frames}.
    """

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.records = LogRecords()
        self.frames = Frames()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            for event in self.records.feed(data):
                self.worker.supervisor.publish(self.worker.index, event)
        elif childFD == METRICS_FD:
            for frame in self.frames.feed(data):
                self.worker.metrics_frame(frame)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 1:
            for event in self.records.flush():
                self.worker.supervisor.publish(self.worker.index, event)

    def processEnded(self, reason: Failure) -> None:
        self.worker.ended(reason)


@attrs.define
class _Worker:
    """
    The supervisor's record of one worker slot: its current process (if
    any), its restart back-off and its latest metric snapshot.
    """

    supervisor: Supervisor
    index: int
    transport: Any = None
    started_at: float = 0.0
    delay: float = RESTART_FIRST
    snapshot: list[dict[str, Any]] = attrs.field(factory=list)
    exited: Deferred[None] | None = None
    restart: Any = None
    #: It said it is ready (see the supervisor's C{ready_when}).
    is_ready: bool = False
    #: The requests sent to it and not answered yet.
    asks: Asks | None = None

    def metrics_frame(self, frame: bytes) -> None:
        try:
            families = json.loads(frame)
        except ValueError:
            return
        if isinstance(families, list):
            self.snapshot = families
        elif isinstance(families, dict) and self.asks is not None:
            self.asks.answered(families)

    def ended(self, reason: Failure) -> None:
        self.transport = None
        if self.asks is not None:
            self.asks.ended()
        # Its counters live on in the totals; its successor starts at 0.
        self.supervisor.retired.add(self.snapshot)
        self.snapshot = []
        self.supervisor._ended(self, reason)


class Supervisor:
    """
    Starts the workers, restarts one that dies (backing off if it keeps
    dying), passes signals on and stops them all on drain.

    @param children: how many processes to keep running, numbered from 1.
    @param command: the worker command line for index I{k}.
    @param listen_fds: parent descriptors of the listening sockets by
        listener name; each worker gets them at L{FIRST_LISTEN_FD} onwards.
    @param observer: where the workers' log events go (the primary's log).
    @param name: what the children are: C{"worker"} (numbered, their events
        marked C{worker: k}) or another process the primary keeps alive,
        such as the built-in Core emulator (events marked C{process: name}).
    @param ready_when: recognises the log event by which a child says it
        is ready (L{wait_ready}).
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        children: int,
        command: Callable[[int, Mapping[str, int]], Sequence[str]],
        listen_fds: Mapping[str, int],
        observer: ILogObserver,
        environment: Mapping[str, str] | None = None,
        name: str = "worker",
        ready_when: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        self._name = name
        self._ready_when = ready_when
        self._ready_waiters: list[Deferred[None]] = []
        self._reactor = reactor
        self._clock = clock
        self._command = command
        self._listen_fds = dict(listen_fds)
        self._observer = observer
        self._env = dict(environment if environment is not None else os.environ)
        self._workers = [_Worker(self, index) for index in range(1, children + 1)]
        for worker in self._workers:
            worker.asks = Asks(clock, self._label(worker))
        self._stopping = False
        #: The counters of workers that ended (see L{snapshots}).
        self.retired = RetiredCounters()

    @property
    def running(self) -> int:
        return sum(1 for w in self._workers if w.transport is not None)

    def start(self) -> None:
        for worker in self._workers:
            self._spawn(worker)

    def _spawn(self, worker: _Worker) -> None:
        worker.restart = None
        if self._stopping:
            return
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: 2, METRICS_FD: "r"}
        passed: dict[str, int] = {}
        for offset, (name, fd) in enumerate(self._listen_fds.items()):
            child_fds[FIRST_LISTEN_FD + offset] = fd
            passed[name] = FIRST_LISTEN_FD + offset
        argv = list(self._command(worker.index, passed))
        worker.exited = Deferred()
        worker.is_ready = False
        worker.started_at = self._clock.seconds()
        try:
            worker.transport = self._reactor.spawnProcess(
                _WorkerProtocol(worker),
                argv[0],
                argv,
                env=self._env,
                childFDs=child_fds,
            )
        except OSError as e:
            log.critical(
                "{process} could not be started: {error}",
                process=self._label(worker),
                error=str(e),
            )
            worker.transport = None
            self._ended(worker, Failure(e))
            return
        fields = {**self._marks(worker.index), "process": self._label(worker)}
        log.info("{process} started (pid {pid})", pid=worker.transport.pid, **fields)

    def _label(self, worker: _Worker) -> str:
        return f"worker {worker.index}" if self._name == "worker" else self._name

    def _marks(self, index: int) -> dict[str, Any]:
        if self._name == "worker":
            return {"worker": index}
        return {"process": self._name}

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        exited, worker.exited = worker.exited, None
        status = exit_reason(reason)
        if self._stopping:
            log.info(
                "{process} stopped ({status})",
                process=self._label(worker),
                status=status,
            )
        elif self._ready_waiters and not worker.is_ready:
            # It never started: the start fails, rather than loop.
            log.error(
                "{process} exited before it was ready ({status})",
                process=self._label(worker),
                status=status,
            )
            self._fail_ready(f"{self._label(worker)} exited ({status})")
        else:
            lived = self._clock.seconds() - worker.started_at
            if lived >= STABLE_AFTER:
                worker.delay = RESTART_FIRST
            self._clock.callLater(
                EXIT_GRACE, self._report_exit, worker, status, worker.delay
            )
            worker.restart = self._clock.callLater(worker.delay, self._spawn, worker)
            worker.delay = min(worker.delay * 2, RESTART_MAX)
        if exited is not None:
            exited.callback(None)

    def _report_exit(self, worker: _Worker, status: str, delay: float) -> None:
        if self._stopping:
            # The gateway began to stop meanwhile: this was part of it.
            log.info(
                "{process} stopped ({status})",
                process=self._label(worker),
                status=status,
            )
            return
        # Stopped by a signal from outside, or by itself: not a crash.
        emit = log.warn if status in _ORDERLY else log.critical
        emit(
            "{process} exited unexpectedly ({status}); restarting in {delay:g}s",
            process=self._label(worker),
            status=status,
            delay=delay,
        )

    def wait_ready(self, timeout: float) -> Deferred[None]:
        """
        Fires when every child has logged the event C{ready_when}
        recognises; fails with L{ChildNotReadyError} when one exits first
        or C{timeout} seconds pass.
        """
        waiter: Deferred[None] = Deferred()
        if all(w.is_ready for w in self._workers):
            waiter.callback(None)
            return waiter
        self._ready_waiters.append(waiter)
        timer = self._clock.callLater(
            timeout, self._fail_ready, f"not ready after {timeout:g}s"
        )

        def done(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return waiter.addBoth(done)

    def _fail_ready(self, why: str) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.errback(ChildNotReadyError(why))

    def _check_ready(self) -> None:
        if all(w.is_ready for w in self._workers):
            waiters, self._ready_waiters = self._ready_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def publish(self, index: int, event: dict[str, Any]) -> None:
        """
        Re-emit a worker's log event in the primary's log, marked with the
        worker's index.
        """
        event.update(self._marks(index))
        if event.get("log_level") is None:
            event["log_level"] = LogLevel.info
        self._observer(event)
        worker = self._workers[index - 1] if 0 < index <= len(self._workers) else None
        if (
            worker is not None
            and self._ready_when is not None
            and not worker.is_ready
            and self._ready_when(event)
        ):
            worker.is_ready = True
            self._check_ready()

    def ask(
        self, index: int, request: dict[str, Any], timeout: float = 30.0
    ) -> Deferred[dict[str, Any]]:
        """
        Send child C{index} a request; fires with its answer, or fails with
        L{mdgateway.run.control.WorkerUnavailableError}.
        """
        if not 0 < index <= len(self._workers):
            raise ValueError(f"there is no {self._name} {index}")
        worker = self._workers[index - 1]
        assert worker.asks is not None
        write = worker.transport.write if worker.transport is not None else None
        return worker.asks.ask(write, request, timeout)

    def signal_all(self, name: str) -> None:
        """
        Send C{SIG<name>} (C{"HUP"}: reload the configuration) to every
        running worker.
        """
        for worker in self._workers:
            if worker.transport is not None:
                try:
                    worker.transport.signalProcess(name)
                except ProcessExitedAlready:
                    pass

    def snapshots(self) -> Iterator[list[dict[str, Any]]]:
        """
        The last metric snapshot of each running worker, and the last
        counter values of the workers that ended, so merged counters never
        decrease across a worker's restart.
        """
        retired = self.retired.snapshot()
        if retired:
            yield retired
        for worker in self._workers:
            if worker.snapshot:
                yield worker.snapshot

    def stopping(self) -> None:
        """
        The gateway is stopping: a child that exits from now on is not
        restarted, and its exit is no surprise (Ctrl-C, or SIGTERM to the
        whole group, may reach it before the primary asks).
        """
        self._stopping = True
        for worker in self._workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
                worker.restart = None

    async def stop(self, timeout: float) -> None:
        """
        Ask every worker to drain (by closing its standard input), wait up
        to C{timeout} seconds for them to exit, then kill what is left.
        """
        self.stopping()
        self._fail_ready("the gateway is stopping")
        waits = []
        for worker in self._workers:
            if worker.transport is not None and worker.exited is not None:
                waits.append(worker.exited)
                worker.transport.closeStdin()
        if not waits:
            return
        everyone = DeferredList(waits)
        timer = self._clock.callLater(timeout, self._kill_all)
        await everyone
        if timer.active():
            timer.cancel()

    def _kill_all(self) -> None:
        for worker in self._workers:
            if worker.transport is not None:
                log.error(
                    "{process} did not drain in time; killing it",
                    process=self._label(worker),
                )
                try:
                    worker.transport.signalProcess("KILL")
                except ProcessExitedAlready:
                    pass


def worker_command(
    config_path: str, index: int, listen_fds: Mapping[str, int]
) -> list[str]:
    """
    The command line that runs worker C{index} with this interpreter.
    """
    return [
        sys.executable,
        "-m",
        "mdgateway.run.worker",
        "--config",
        config_path,
        "--index",
        str(index),
        "--listen",
        format_listen_fds(listen_fds),
    ]


def worker_environment() -> dict[str, str]:
    """
    This process's environment, with the folder the C{mdgateway} package was
    imported from first on C{PYTHONPATH}, so a worker runs the same code.
    """
    env = dict(os.environ)
    here = str(Path(mdgateway.__file__).resolve().parent.parent)
    paths = [here, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class ChildNotReadyError(Exception):
    """
    A supervised child did not say it was ready (it exited, or took too
    long).
    """


#: Exit statuses of a child stopped in order (by a signal from outside, or
#: by its own decision), as L{exit_reason} writes them.
_ORDERLY = frozenset({"exit 0", "signal SIGTERM", "signal SIGINT"})


def exit_reason(reason: Failure) -> str:
    if reason.check(ProcessDone):
        return "exit 0"
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        return f"signal {signal.Signals(sig).name}"
    return f"exit {getattr(value, 'exitCode', '?')}"
