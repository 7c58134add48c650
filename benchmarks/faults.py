# -*- test-case-name: tests.test_faults_short -*-
"""
Fault injection: what the gateway does with mail it accepted when it is
killed, when MetaDefender Core or the downstream server goes away, and
when the spool's disk fills up.

    python3 benchmarks/faults.py            # the full form (about 8 minutes)
    python3 benchmarks/faults.py --short    # small counts, short outages
    python3 benchmarks/faults.py --short --only sigkill,core

Each scenario drives the gateway (a C{python -m twisted mdgateway} process
with a separate C{mdcore-emulator} process as its Core and a recording sink
as its downstream server) with a load generator that puts a unique
C{X-Bench-Id} in every message and retries each message on 4xx or a lost
connection until it gets its 250, like a sending MTA. The report counts, per
scenario, messages accepted (250 received), delivered (seen by the sink),
duplicated (extra copies delivered: allowed, a crash may resend), lost
(accepted but never delivered: must be 0) and unscanned (delivered without
an C{X-Metadefender-Core-Result} or with C{Bypassed}: must be 0), and the
replies clients got during the outage (4xx only: a 5xx is a failure).

The exit status is non-zero when anything was lost, delivered unscanned,
refused with 5xx, or when an expected reply (C{452 4.3.1} for a full disk)
was never seen.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import errno
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import mkmsg  # noqa: E402
from benchmarks.common import (  # noqa: E402
    BENCH_ID,
    Attempt,
    Gateway,
    GatewaySettings,
    Processes,
    RecordingSink,
    free_port,
    send_message,
    start_emulator,
    wait_closed,
)

KiB = 1024
MiB = 1024 * 1024


@attrs.frozen
class Form:
    """
    How big a scenario is.

    @ivar count: messages the load generator sends.
    @ivar outage: seconds an outage lasts.
    @ivar duration: seconds over which paced loads spread their messages.
    @ivar settle: seconds allowed after the load for everything accepted to
        be delivered.
    """

    count: int
    sessions: int
    outage: float
    duration: float
    settle: float
    kills: int = 3
    workers: int = 1


SHORT = Form(count=200, sessions=10, outage=4.0, duration=10.0, settle=60.0)
FULL = Form(count=2000, sessions=20, outage=60.0, duration=150.0, settle=300.0)

#: What clients must be told while the spool's disk is full.
DISK_FULL = "452 4.3.1"

#: Scan results that mean the message was not scanned.
UNSCANNED = ("Bypassed", "Skipped")


class UnavailableError(Exception):
    """
    The scenario cannot run here (for example: mounting a tmpfs needs root).
    """


# -- the load generator ---------------------------------------------------------


@attrs.frozen
class Refusal:
    """
    An attempt that did not end in 250.
    """

    at: float
    ident: str
    stage: str
    code: int
    text: str

    @property
    def reply(self) -> str:
        """
        C{"452 4.3.1"}, C{"451 4.3.2"}..., or C{"connection"} for a
        connection that failed or was lost.
        """
        if not self.code:
            return "connection"
        enhanced = self.text.split(" ", 1)[0]
        return f"{self.code} {enhanced}" if enhanced[:1].isdigit() else str(self.code)


def message_for(index: int, prefix: str) -> tuple[str, bytes]:
    """
    Message C{index} of a run: mostly 4 KiB of text, every fifth one with
    a 64 KiB attachment, each with its own id and Message-ID.
    """
    ident = f"{prefix}-{index:05d}"
    headers = {BENCH_ID: ident, "Message-ID": f"<{ident}@bench.test>"}
    if index % 5 == 4:
        body = mkmsg.attach_message(64 * KiB, index, headers)
    else:
        body = mkmsg.text_message(4 * KiB, index, headers)
    return ident, mkmsg.wire(body)


class Load:
    """
    Sends C{count} messages over C{sessions} concurrent sessions from a
    thread of its own; each message is retried, as a sending MTA would,
    until it is accepted or gets a 5xx.

    @ivar accepted: id to the queue id of its (first) 250.
    @ivar refusals: every attempt that did not end in 250.
    @ivar rejected: ids that got a 5xx (given up).
    """

    def __init__(
        self,
        port: Callable[[], int],
        count: int,
        sessions: int,
        prefix: str,
        duration: float = 0.0,
        retry_delay: float = 0.25,
    ) -> None:
        """
        @param port: the gateway's port now (read at each attempt).
        @param duration: spread the messages' first attempts evenly over
            this many seconds (0: as fast as the sessions go).
        """
        self.port = port
        self.count = count
        self.sessions = sessions
        self.prefix = prefix
        self.duration = duration
        self.retry_delay = retry_delay
        self.accepted: dict[str, str] = {}
        self.refusals: list[Refusal] = []
        self.rejected: set[str] = set()
        self.attempts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="load", daemon=True)
        self.started = 0.0
        self.finished = 0.0
        self.error: BaseException | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """
        Give up on what has not been accepted yet.
        """
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:  # reported by the scenario
            self.error = e
        finally:
            self.finished = time.monotonic()

    async def _run(self) -> None:
        pending: asyncio.Queue[int] = asyncio.Queue()
        for index in range(self.count):
            pending.put_nowait(index)
        await asyncio.gather(*(self._worker(pending) for _ in range(self.sessions)))

    async def _worker(self, pending: asyncio.Queue[int]) -> None:
        rng = random.Random()
        while not self._stop.is_set():
            try:
                index = pending.get_nowait()
            except asyncio.QueueEmpty:
                return
            if self.duration:
                due = self.started + self.duration * index / self.count
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            ident, payload = message_for(index, self.prefix)
            while not self._stop.is_set():
                self.attempts += 1
                attempt = await send_message(self.port(), payload, timeout=120)
                if attempt.ok:
                    self.accepted.setdefault(ident, attempt.queue_id)
                    break
                self.refusals.append(_refusal(ident, attempt))
                if 500 <= attempt.code < 600:
                    self.rejected.add(ident)
                    break
                await asyncio.sleep(self.retry_delay * (0.5 + rng.random()))


def _refusal(ident: str, attempt: Attempt) -> Refusal:
    return Refusal(attempt.finished, ident, attempt.stage, attempt.code, attempt.text)


# -- the report --------------------------------------------------------------------


@attrs.frozen
class Report:
    """
    What one scenario found.

    @ivar duplicated: extra copies delivered (a message delivered three
        times counts two).
    @ivar lost: accepted, never delivered.
    @ivar unscanned: deliveries without a scan result, or bypassed.
    @ivar five_xx: 5xx replies during the outages (and at any other time:
        none are expected).
    @ivar outage_replies: what clients were told during the outages.
    @ivar missing_replies: replies the scenario expected and never saw.
    """

    name: str
    sent: int
    accepted: int
    delivered: int
    duplicated: int
    lost: int
    unscanned: int
    five_xx: int
    outage_replies: dict[str, int]
    other_replies: dict[str, int]
    missing_replies: tuple[str, ...]
    unaccepted: int
    corrupt: int
    log_problems: int
    log_samples: tuple[str, ...]
    leftovers: dict[str, int]
    seconds: float
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.unscanned == 0
            and self.five_xx == 0
            and not self.missing_replies
            and self.unaccepted == 0
            and self.corrupt == 0
        )

    def lines(self) -> list[str]:
        """
        The scenario's table.
        """
        rows = [
            ("sent (unique messages)", self.sent),
            ("accepted (250)", self.accepted),
            ("delivered (unique)", self.delivered),
            ("duplicated (extra copies)", self.duplicated),
            ("lost", self.lost),
            ("delivered unscanned", self.unscanned),
            ("5xx replies", self.five_xx),
            ("never accepted", self.unaccepted),
            ("corrupt spool entries", self.corrupt),
            ("gateway log errors/criticals", self.log_problems),
        ]
        out = [
            f"== {self.name}: {'ok' if self.ok else 'FAILED'} ({self.seconds:.0f} s)"
        ]
        out += [f"  {label:30} {value:>6}" for label, value in rows]
        out.append(f"  replies during the outage: {_counts(self.outage_replies)}")
        out.append(f"  replies at other times:    {_counts(self.other_replies)}")
        if self.missing_replies:
            out.append(
                f"  expected but never seen:   {', '.join(self.missing_replies)}"
            )
        if self.leftovers:
            out.append(f"  spool leftovers: {self.leftovers}")
        out += [f"  log: {s[:160]}" for s in self.log_samples]
        out += [f"  note: {n}" for n in self.notes]
        return out


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none"


@attrs.define
class Outages:
    """
    When the faults were in force (C{time.monotonic} spans).
    """

    spans: list[tuple[float, float]] = attrs.Factory(list)
    grace: float = 2.0

    @contextmanager
    def span(self) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.spans.append((start, time.monotonic()))

    def during(self, at: float) -> bool:
        return any(a <= at <= b + self.grace for a, b in self.spans)


# -- the rig: gateway, Core, sink --------------------------------------------------


class Rig:
    """
    A gateway with a separate Core emulator process and a recording sink,
    each of which a scenario can stop and start.
    """

    def __init__(
        self,
        processes: Processes,
        work: Path,
        form: Form,
        spool: Path | None = None,
    ) -> None:
        self.processes = processes
        self.work = work
        self.core_port = free_port()
        self.core: subprocess.Popen[bytes] | None = None
        self.start_core()
        self.sink = RecordingSink(
            processes, free_port(), work / "arrivals.jsonl", work / "sink.log"
        )
        self.sink.start()
        self.settings = GatewaySettings(
            port=free_port(),
            spool=spool or work / "spool",
            downstream_port=self.sink.port,
            core_port=self.core_port,
            builtin_emulator=False,
            concurrency=16,
            core_concurrency=40,
            retry_first=1.0,
            retry_max=2.0,
            core_retry_after=1.0,
            workers=form.workers,
        )
        self.gateway = Gateway(self.settings, work)
        processes.on_exit(self.gateway.stop)
        self.gateway.start()

    def start_core(self) -> None:
        self.core = start_emulator(
            self.processes, self.core_port, self.work / "emulator.log"
        )

    def stop_core(self) -> None:
        """
        Kill the Core emulator, as a crash or a network cut would.
        """
        if self.core is not None:
            self.core.kill()
            self.core.wait(10)
            wait_closed(self.core_port)

    def settle(self, load: Load, timeout: float) -> bool:
        """
        Wait until everything accepted was delivered and the spool is
        empty.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            delivered = {r["id"] for r in self.sink.records()}
            accepted = load.accepted.copy()  # the load's thread may still add
            if set(accepted) <= delivered and _queue_empty(self.settings.spool):
                time.sleep(1.0)  # late duplicates
                return True
            time.sleep(0.2)
        return False

    def report(self, name: str, load: Load, outages: Outages, **extra: Any) -> Report:
        records = self.sink.records()
        accepted = load.accepted.copy()
        copies = collections.Counter(r["id"] for r in records if r["id"])
        unscanned = [
            r
            for r in records
            if r["id"] and (not r["result"] or str(r["result"]).startswith(UNSCANNED))
        ]
        during: collections.Counter[str] = collections.Counter()
        other: collections.Counter[str] = collections.Counter()
        five_xx = 0
        for refusal in load.refusals:
            (during if outages.during(refusal.at) else other)[refusal.reply] += 1
            five_xx += 500 <= refusal.code < 600
        expected: tuple[str, ...] = extra.pop("expected", ())
        self.gateway.stop()
        problems = self.gateway.problems()
        leftovers = self.gateway.leftovers()
        return Report(
            name=name,
            sent=load.count,
            accepted=len(accepted),
            delivered=len(copies),
            duplicated=sum(n - 1 for n in copies.values()),
            lost=len(set(accepted) - set(copies)),
            unscanned=len(unscanned),
            five_xx=five_xx,
            outage_replies=dict(during),
            other_replies=dict(other),
            missing_replies=tuple(r for r in expected if r not in during),
            unaccepted=load.count - len(accepted),
            corrupt=leftovers.get("corrupt", 0),
            log_problems=len(problems),
            log_samples=tuple(problems[:5]),
            leftovers=leftovers,
            seconds=time.monotonic() - load.started,
            **extra,
        )


def _queue_empty(spool: Path) -> bool:
    queue = spool / "queue"
    return not queue.is_dir() or not any(queue.iterdir())


def _wait_accepted(load: Load, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(load.accepted) < n and not load.done:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(load.accepted)} of {n} accepted in time")
        time.sleep(0.02)


def _finish(rig: Rig, load: Load, form: Form, notes: list[str]) -> None:
    """
    Let the load end (it gives up after C{form.settle}), then wait for
    delivery.
    """
    if not load.join(form.settle + form.duration):
        notes.append("the load did not finish in time; unaccepted messages given up")
        load.stop()
        load.join(30)
    if load.error is not None:
        notes.append(f"load generator failed: {load.error!r}")
    if not rig.settle(load, form.settle):
        notes.append(f"not everything accepted was delivered within {form.settle:g}s")


# -- the scenarios ---------------------------------------------------------------------


def sigkill(work: Path, form: Form = SHORT) -> Report:
    """
    (a) SIGKILL the gateway C{form.kills} times during the load, restarting
    it each time at once on the same spool.
    """
    notes: list[str] = []
    outages = Outages()
    with Processes() as processes:
        rig = Rig(processes, work, form)
        load = Load(lambda: rig.settings.port, form.count, form.sessions, "kill")
        load.start()
        for k in range(form.kills):
            _wait_accepted(load, form.count * (k + 1) // (form.kills + 1))
            with outages.span():
                rig.gateway.kill()
                time.sleep(0.5)
                rig.gateway.start()
            notes.append(
                f"kill {k + 1} after {len(load.accepted)} accepted, "
                f"{len(rig.sink.records())} delivered"
            )
        _finish(rig, load, form, notes)
        return rig.report(f"SIGKILL x{form.kills}", load, outages, notes=tuple(notes))


def core_outage(work: Path, form: Form = SHORT) -> Report:
    """
    (b) Kill the Core emulator for C{form.outage} seconds mid-load: mail
    waits (the rule retries), clients get 4xx, nothing passes unscanned.
    """
    notes: list[str] = []
    outages = Outages()
    with Processes() as processes:
        rig = Rig(processes, work, form)
        load = Load(
            lambda: rig.settings.port, form.count, form.sessions, "core", form.duration
        )
        load.start()
        _wait_accepted(load, form.count // 3)
        with outages.span():
            rig.stop_core()
            time.sleep(form.outage)
            rig.start_core()
        notes.append(
            f"Core down for {outages.spans[-1][1] - outages.spans[-1][0]:.1f}s"
        )
        _finish(rig, load, form, notes)
        return rig.report("Core down", load, outages, notes=tuple(notes))


def downstream_outage(work: Path, form: Form = SHORT) -> Report:
    """
    (c) Kill the downstream server for C{form.outage} seconds mid-load:
    the gateway keeps accepting and delivers everything once it is back.
    """
    notes: list[str] = []
    outages = Outages()
    with Processes() as processes:
        rig = Rig(processes, work, form)
        load = Load(
            lambda: rig.settings.port, form.count, form.sessions, "down", form.duration
        )
        load.start()
        _wait_accepted(load, form.count // 3)
        with outages.span():
            rig.sink.stop()
            time.sleep(form.outage)
            rig.sink.start()
        notes.append(
            f"downstream down for {outages.spans[-1][1] - outages.spans[-1][0]:.1f}s"
        )
        _finish(rig, load, form, notes)
        return rig.report("downstream down", load, outages, notes=tuple(notes))


#: The tmpfs must leave the spool more than its 64 MiB free-space threshold
#: when empty, or the gateway refuses all mail from the start.
TMPFS_SIZE = "96m"


@contextmanager
def tmpfs(path: Path, size: str = TMPFS_SIZE) -> Iterator[Path]:
    """
    Mount a tmpfs of C{size} on C{path} for the duration.

    @raise UnavailableError: when mounting is not possible (not root, no tmpfs).
    """
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        detail = getattr(e, "stderr", b"") or b""
        raise UnavailableError(
            f"cannot mount a tmpfs: {e} {detail.decode(errors='replace')}"
        ) from e
    try:
        yield path
    finally:
        for _ in range(20):
            done = subprocess.run(
                ["umount", str(path)], capture_output=True, check=False
            )
            if done.returncode == 0:
                break
            time.sleep(0.5)


def fill(folder: Path) -> Path:
    """
    Fill the file system of C{folder} with one file until it is full.
    """
    filler = folder / "filler.bin"
    block = b"\0" * (1024 * 1024)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    with open(filler, "ab", buffering=0) as f:  # the last partial block
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return filler


def disk_full(work: Path, form: Form = SHORT) -> Report:
    """
    (d) Fill the spool's disk (a tmpfs) mid-load for C{form.outage}
    seconds, while one big message is still streaming in: clients get
    C{452 4.3.1}, nothing accepted before is damaged, and everything is
    delivered once space is freed.

    @raise UnavailableError: when a tmpfs cannot be mounted.
    """
    notes: list[str] = []
    outages = Outages()
    with tmpfs(work / "spool") as spool, Processes() as processes:
        rig = Rig(processes, work, form, spool=spool)
        load = Load(
            lambda: rig.settings.port, form.count, form.sessions, "full", form.duration
        )
        load.start()
        _wait_accepted(load, form.count // 3)
        big = _BigMessage(rig.settings.port)
        big.start()
        _wait_streaming(spool)
        with outages.span():
            filler = fill(spool)
            notes.append(
                f"spool filled ({filler.stat().st_size // MiB} MiB filler) "
                f"after {len(load.accepted)} accepted"
            )
            time.sleep(form.outage)
            filler.unlink()
        big.join(120)
        _finish(rig, load, form, notes)
        report = rig.report(
            "spool disk full", load, outages, expected=(DISK_FULL,), notes=tuple(notes)
        )
        return big.judge(report, {r["id"] for r in rig.sink.records()})


class _BigMessage:
    """
    One 24 MiB message sent slowly, so the disk fills while it streams in:
    it must get a 4xx (C{452 4.3.1}), or, had it finished first, a 250 and
    then be delivered.
    """

    IDENT = "full-big"

    def __init__(self, port: int) -> None:
        self.port = port
        self.attempt: Attempt | None = None
        self._thread = threading.Thread(target=self._send, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _send(self) -> None:
        payload = mkmsg.wire(mkmsg.attach_message(24 * MiB, 3, {BENCH_ID: self.IDENT}))
        self.attempt = asyncio.run(send_message(self.port, payload, pause=0.05))

    def judge(self, report: Report, delivered: set[str]) -> Report:
        a = self.attempt
        if a is None:
            note = "the big message got no reply"
            return attrs.evolve(report, notes=report.notes + (note,), unaccepted=1)
        note = f"the big message streaming while the disk filled got: {a.reply}"
        notes = report.notes + (note,)
        if a.ok:
            lost = report.lost + (self.IDENT not in delivered)
            return attrs.evolve(report, notes=notes, lost=lost)
        five_xx = report.five_xx + (500 <= a.code < 600)
        missing = report.missing_replies
        if not a.reply.startswith(DISK_FULL):
            missing += (f"{DISK_FULL} for the big message",)
        return attrs.evolve(
            report, notes=notes, five_xx=five_xx, missing_replies=missing
        )


def _wait_streaming(spool: Path, timeout: float = 30.0) -> None:
    """
    Wait until a message being received has more than 2 MiB in the spool.
    """
    # Any process may have taken it: the primary's spool or a worker's.
    folders = [spool / "incoming"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        folders[1:] = sorted(spool.glob("workers/*/incoming"))
        for incoming in folders:
            try:
                if any(p.stat().st_size > 2 * MiB for p in incoming.iterdir()):
                    return
            except OSError:
                pass
        time.sleep(0.01)
    raise TimeoutError("the big message never started streaming into the spool")


SCENARIOS: dict[str, Callable[[Path, Form], Report]] = {
    "sigkill": sigkill,
    "core": core_outage,
    "downstream": downstream_outage,
    "disk": disk_full,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--short", action="store_true", help="small counts, short outages"
    )
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=", ".join(SCENARIOS)
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="gateway processes ([processes] workers)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    form = attrs.evolve(SHORT if args.short else FULL, workers=args.workers)
    root = Path(tempfile.mkdtemp(prefix="mdgw-faults-"))
    failed = False
    try:
        for name in args.only.split(","):
            scenario = SCENARIOS[name]
            work = root / name
            work.mkdir()
            print(f"-- {name}", flush=True)
            try:
                report = scenario(work, form)
            except UnavailableError as e:
                print(f"== {name}: skipped ({e})", flush=True)
                continue
            except Exception:
                traceback.print_exc()
                print(f"== {name}: FAILED (the scenario itself failed)", flush=True)
                failed = True
                continue
            print("\n".join(report.lines()), flush=True)
            failed |= not report.ok
    finally:
        if args.keep:
            print(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print("FAILED" if failed else "all scenarios ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
