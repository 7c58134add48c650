# -*- test-case-name: tests.test_faults_short -*-
"""
The gateway's benchmark: throughput, small-message latency under load, and
memory, beside Postfix on the same machine in the same run.

    python3 benchmarks/run.py            # the full suite (about 25 minutes)
    python3 benchmarks/run.py --quick    # a smoke run, under 3 minutes
    python3 benchmarks/run.py --only throughput --scenarios text,attach
    python3 benchmarks/run.py --core instant  # only the instant Core stand-in

The gateway runs the full path from its twistd plugin: receive, spool with
fsync, decompose, scan every part with its built-in Core emulator, rebuild,
relay to Postfix's C{smtp-sink}. C{smtp-source} drives it with one message
per session; a run's time is from the start of C{smtp-source} until the
sink has counted every message. Each throughput scenario runs with one and
two gateway processes (C{--workers}), and with the emulator scanning and
with the instant stand-in (C{--core}), which answers at once without
reading the file, so the table shows the gateway's own CPU per message
(its process tree less the emulator's) beside the figure with scanning,
and the Core requests per scanned file (the emulator's request counts).
When Postfix's loopback relay of C{../shared/bench/setup-postfix.sh}
listens on 127.0.0.1:2525, the same loads go through Postfix to a sink on
127.0.0.1:2526, and when amavisd-new is installed (and the run has root)
through Postfix with amavisd-new as its content filter
(L{benchmarks.amavis}); the ratios are printed, and a peer that is not
there is left out with a line saying why. The report ends with the figures
issue 18 sets targets for. Results also go to
C{benchmarks/results/<timestamp>.json}.

Nothing here is a test: the machine is shared and noisy, so compare runs,
not single figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import amavis, mkmsg  # noqa: E402
from benchmarks.common import (  # noqa: E402
    BENCH_ID,
    POSTFIX_PORT,
    POSTFIX_SINK_PORT,
    RESULTS,
    Attempt,
    Gateway,
    GatewaySettings,
    Processes,
    RecordingSink,
    SmtpSink,
    box_cpu,
    core_requests,
    flush_postfix_leftovers,
    free_port,
    have_tools,
    open_idle_sessions,
    percentile,
    postfix_available,
    postfix_queue_length,
    raised_file_limit,
    send_message,
    smtp_source_command,
    split_cpu,
    start_emulator,
)
from benchmarks.report import (  # noqa: E402
    CORE_MODES,
    INSTANT,
    PEER_NAMES,
    print_latency,
    print_memory,
    print_problems,
    print_targets,
    print_throughput,
)

KiB = 1024
MiB = 1024 * 1024

LATENCY_INSTANT = "gateway, instant Core"
LATENCY_BUILTIN = "gateway, Core built in"
LATENCY_SEPARATE = "gateway, Core separate"


@attrs.frozen
class Throughput:
    """
    One throughput scenario: C{count} messages of a kind and size over
    C{sessions} sessions, the emulator taking C{latency} seconds a file.
    """

    key: str
    label: str
    kind: str
    size: int
    count: int
    quick: int
    sessions: int = 20
    latency: float = 0.0
    #: Whether C{--quick} runs it (unless named in C{--scenarios}).
    in_quick: bool = True
    #: The Core stand-ins C{--quick} runs it with.
    quick_modes: tuple[str, ...] = CORE_MODES


THROUGHPUT = (
    Throughput("text", "10 KiB text", "text", 10 * KiB, 5000, 200),
    Throughput("attach", "1 MiB base64 attachment", "attach", MiB, 300, 20),
    Throughput(
        "text-200ms",
        "10 KiB text, Core 200 ms",
        "text",
        10 * KiB,
        5000,
        200,
        latency=0.2,
    ),
    Throughput(
        "attach-200ms",
        "1 MiB attach, Core 200 ms",
        "attach",
        MiB,
        300,
        20,
        latency=0.2,
        in_quick=False,
    ),
    Throughput(
        "text-2s",
        "10 KiB text, Core 2 s",
        "text",
        10 * KiB,
        5000,
        200,
        latency=2.0,
        in_quick=False,
    ),
    Throughput(
        "attach-2s",
        "1 MiB attach, Core 2 s",
        "attach",
        MiB,
        300,
        20,
        latency=2.0,
        in_quick=False,
    ),
    Throughput(
        "big",
        "25 MiB base64 attachment",
        "attach",
        25 * MiB,
        40,
        4,
        sessions=4,
        quick_modes=(INSTANT,),
    ),
)


@attrs.frozen
class Tuning:
    """
    The gateway settings the command line may change.
    """

    concurrency: int
    core_concurrency: int
    poll_interval: float
    separate_core: bool = False
    workers: int = 1
    instant: bool = False
    verdict_cache: float = 0.0
    submit: str = "auto"

    def settings(self, **kwargs: Any) -> GatewaySettings:
        return GatewaySettings(
            workers=self.workers,
            concurrency=self.concurrency,
            core_concurrency=self.core_concurrency,
            poll_interval=self.poll_interval,
            verdict_cache=self.verdict_cache,
            submit=self.submit,
            **kwargs,
        )

    def gateway(
        self,
        processes: Processes,
        work: Path,
        downstream_port: int,
        latency: float = 0.0,
        separate_core: bool | None = None,
    ) -> tuple[Gateway, int | None]:
        """
        Start a gateway relaying to C{downstream_port}, with the Core
        emulator (the instant stand-in if C{instant}) built in or
        (C{separate_core}) as a process of its own; return the gateway and
        the separate emulator's pid.
        """
        separate = self.separate_core if separate_core is None else separate_core
        core_port = free_port()
        core_pid = None
        if separate:
            core_pid = start_emulator(
                processes, core_port, work / "emulator.log", latency, self.instant
            ).pid
        gateway = Gateway(
            self.settings(
                port=free_port(),
                spool=work / "spool",
                downstream_port=downstream_port,
                core_port=core_port,
                builtin_emulator=not separate,
                latency=latency,
                instant=self.instant and not separate,
            ),
            work,
        )
        processes.on_exit(gateway.stop)
        gateway.start()
        return gateway, core_pid


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- one timed smtp-source run ---------------------------------------------------


def timed_source(
    target: int,
    sink: SmtpSink,
    count: int,
    sessions: int,
    message: Path,
    log: Path,
    timeout: float,
    stall: float,
    pid: int | None = None,
    core_pid: int | None = None,
) -> dict[str, Any]:
    """
    Run C{smtp-source} against C{target} and wait until C{sink} has
    C{count} messages; time both.

    @param stall: give up when the sink's count has not moved for this long.
    @param pid: the gateway, whose CPU time (its process tree but the Core
        emulator) is reported per message, and the Core emulator's apart.
    @param core_pid: a separate Core emulator process.
    """
    result: dict[str, Any] = {"count": count, "ok": False}
    cpu0 = split_cpu(pid, core_pid) if pid else (0.0, 0.0)
    box0 = box_cpu()
    start = time.monotonic()
    with open(log, "ab") as out:
        source = subprocess.Popen(
            smtp_source_command(target, count, sessions, message),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        last, moved = 0, start
        while True:
            now = time.monotonic()
            if "inject_seconds" not in result and source.poll() is not None:
                result["inject_seconds"] = round(now - start, 3)
                result["source_rc"] = source.returncode
            n = sink.count()
            if n >= count:
                break
            if n != last:
                last, moved = n, now
            if now - start > timeout or now - moved > stall:
                result["error"] = (
                    f"sink has {n} of {count} after {now - start:.0f}s"
                    f" (smtp-source exit {source.poll()}, see {log})"
                )
                result["delivered"] = n
                return result
            time.sleep(0.01)
        seconds = now - start
        box1 = box_cpu()
        if pid:
            cpu1 = split_cpu(pid, core_pid)
            result["process_cpu_ms_per_msg"] = round(
                1000 * (cpu1[0] - cpu0[0]) / count, 2
            )
            result["core_cpu_ms_per_msg"] = round(1000 * (cpu1[1] - cpu0[1]) / count, 2)
        busy, total = box1[0] - box0[0], box1[1] - box0[1]
        result["box_cpu_pct"] = round(100 * busy / max(1, total), 1)
        if "inject_seconds" not in result:
            source.wait(60)
            result["inject_seconds"] = round(time.monotonic() - start, 3)
            result["source_rc"] = source.returncode
        time.sleep(0.3)  # more than count would be duplicates or leftovers
        result.update(
            ok=True,
            seconds=round(seconds, 3),
            msg_per_s=round(count / seconds, 1),
            delivered=sink.count(),
        )
        if result["source_rc"]:
            result["error"] = f"smtp-source exit {result['source_rc']} (see {log})"
            result["ok"] = False
        return result
    finally:
        if source.poll() is None:
            source.terminate()
            source.wait(10)


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def queue_empty(spool: Path) -> bool:
    queue = spool / "queue"
    return not queue.is_dir() or not any(queue.iterdir())


def finish_gateway(
    gateway: Gateway, result: dict[str, Any], drain: float = 60.0
) -> None:
    """
    Let the spool empty, stop the gateway, and record what it complained
    about and what it left behind.
    """
    result["queue_drained"] = wait_for(
        lambda: queue_empty(gateway.settings.spool), drain
    )
    gateway.stop()
    problems = gateway.problems()
    result["log_problems"] = len(problems)
    result["log_problem_samples"] = problems[:5]
    result["spool_leftovers"] = gateway.leftovers()


# -- throughput ------------------------------------------------------------------


def gateway_throughput(
    scenario: Throughput, count: int, work: Path, tuning: Tuning, timeout: float
) -> dict[str, Any]:
    message = mkmsg.write(scenario.kind, scenario.size, work / "message.eml")
    with Processes() as processes:
        sink_port = free_port()
        sink = SmtpSink(processes, sink_port, work / "sink.out")
        gateway, core_pid = tuning.gateway(processes, work, sink_port, scenario.latency)
        result = timed_source(
            gateway.settings.port,
            sink,
            count,
            scenario.sessions,
            message,
            work / "source.log",
            timeout=timeout,
            stall=max(60.0, 10 * scenario.latency),
            pid=gateway.pid,
            core_pid=core_pid,
        )
        finish_gateway(gateway, result)
    # The emulator logs its request counts when it stops: the built-in one
    # with the gateway, a separate one when the processes above ended.
    result.update(core_requests(work / "emulator.log" if core_pid else gateway.log))
    add_mb_per_s(result, message)
    return result


def add_mb_per_s(result: dict[str, Any], message: Path) -> None:
    """
    The run's rate in megabytes (10**6) of message a second.
    """
    if result.get("ok"):
        size = message.stat().st_size
        result["mb_per_s"] = round(result["msg_per_s"] * size / 1e6, 1)


def postfix_throughput(
    kind: str,
    size: int,
    count: int,
    sessions: int,
    work: Path,
    timeout: float,
    port: int = POSTFIX_PORT,
) -> dict[str, Any]:
    """
    The load through Postfix: its plain relay, or (C{port}) the inbound
    port of the amavis path; either way Postfix relays to the sink.
    """
    message = mkmsg.write(kind, size, work / "message.eml")
    if not wait_for(lambda: postfix_queue_length() == 0, 30, 0.5):
        return {"ok": False, "error": "Postfix's queue is not empty"}
    time.sleep(2)  # cached connections to an earlier sink expire
    with Processes() as processes:
        sink = SmtpSink(processes, POSTFIX_SINK_PORT, work / "sink.out")
        result = timed_source(
            port,
            sink,
            count,
            sessions,
            message,
            work / "source.log",
            timeout=timeout,
            stall=60,
        )
    add_mb_per_s(result, message)
    return result


# -- small-message latency while big messages flow -----------------------------


async def probe_series(
    port: int, count: int, interval: float, prefix: str
) -> list[tuple[str, Attempt]]:
    """
    Send C{count} small messages one after another, C{interval} apart.
    """
    out = []
    for i in range(count):
        ident = f"{prefix}-{i}"
        payload = mkmsg.wire(mkmsg.text_message(10 * KiB, i, {BENCH_ID: ident}))
        out.append((ident, await send_message(port, payload)))
        await asyncio.sleep(interval)
    return out


def latency_stats(
    attempts: list[tuple[str, Attempt]], arrivals: dict[str, float]
) -> dict[str, Any]:
    accepted = [(i, a) for i, a in attempts if a.ok]
    to_250 = [1000 * (a.finished - a.data_at) for _, a in accepted]
    delivered = [1000 * (arrivals[i] - a.data_at) for i, a in accepted if i in arrivals]
    refused = [a.reply for _, a in attempts if not a.ok]
    return {
        "probes": len(attempts),
        "accepted": len(accepted),
        "delivered": len(delivered),
        "refused_samples": refused[:5],
        "data_to_250_ms": summary(to_250),
        "data_to_delivered_ms": summary(delivered),
    }


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 0.50), 1),
        "p99": round(percentile(values, 0.99), 1),
        "max": round(max(values), 1) if values else 0.0,
        "n": len(values),
    }


def latency_run(
    target: int,
    sink: RecordingSink,
    work: Path,
    probes: int,
    big_size: int,
    big_sessions: int,
    interval: float,
) -> dict[str, Any]:
    """
    Probes first with no other traffic, then while C{big_sessions}
    C{smtp-source} sessions send messages of C{big_size} without pause.
    """
    result: dict[str, Any] = {}
    idle = asyncio.run(probe_series(target, max(20, probes // 5), interval, "idle"))
    big = mkmsg.write("attach", big_size, work / "big.eml")
    with open(work / "big-source.log", "ab") as out:
        source = subprocess.Popen(
            smtp_source_command(target, 100000, big_sessions, big),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: any(r["size"] > MiB for r in sink.records()), 60)
        started = time.monotonic()
        loaded = asyncio.run(probe_series(target, probes, interval, "load"))
        window = time.monotonic() - started
        source_rc = source.poll()
    finally:
        source.terminate()
        source.wait(10)
    wanted = {i for i, a in idle + loaded if a.ok}
    wait_for(lambda: wanted <= {r["id"] for r in sink.records()}, 120, 0.2)
    records = sink.records()
    arrivals = {r["id"]: r["t"] for r in records if r["id"]}
    bigs = [
        r for r in records if r["size"] > MiB and started <= r["t"] <= started + window
    ]
    result["idle"] = latency_stats(idle, arrivals)
    result["loaded"] = latency_stats(loaded, arrivals)
    result["big_delivered_during_probes"] = len(bigs)
    result["big_mb_per_s"] = round(sum(r["size"] for r in bigs) / window / 1e6, 1)
    result["probe_window_s"] = round(window, 1)
    if source_rc:
        result["error"] = (
            f"the {big_size // MiB} MiB load stopped early (exit {source_rc})"
        )
    return result


def gateway_latency(
    work: Path,
    tuning: Tuning,
    probes: int,
    big_size: int,
    big_sessions: int,
    separate_core: bool,
) -> dict[str, Any]:
    """
    The latency run through the gateway. The Core emulator scans each
    upload on its reactor thread: built in, a big upload stalls the
    gateway's own reactor; as a process of its own, small files queue
    behind big ones there instead. Neither is what a real Core does, so
    both are measured.
    """
    with Processes() as processes:
        sink = RecordingSink(
            processes, free_port(), work / "arrivals.jsonl", work / "sink.log"
        )
        sink.start()
        gateway, _ = tuning.gateway(
            processes, work, sink.port, separate_core=separate_core
        )
        result = latency_run(
            gateway.settings.port, sink, work, probes, big_size, big_sessions, 0.1
        )
        finish_gateway(gateway, result, drain=120)
        return result


def postfix_latency(
    work: Path, probes: int, big_size: int, big_sessions: int
) -> dict[str, Any]:
    if not wait_for(lambda: postfix_queue_length() == 0, 30, 0.5):
        return {"error": "Postfix's queue is not empty"}
    time.sleep(2)
    with Processes() as processes:
        sink = RecordingSink(
            processes, POSTFIX_SINK_PORT, work / "arrivals.jsonl", work / "sink.log"
        )
        sink.start()
        result = latency_run(
            POSTFIX_PORT, sink, work, probes, big_size, big_sessions, 0.1
        )
        # Let Postfix hand over what it still holds while the sink is up.
        result["queue_drained"] = wait_for(
            lambda: postfix_queue_length() == 0, 120, 0.5
        )
        return result


# -- memory ------------------------------------------------------------------------


def gateway_memory(
    work: Path, tuning: Tuning, sessions: int, big_size: int
) -> dict[str, Any]:
    """
    Resident memory of the gateway process alone (the Core emulator runs
    as its own process here): at rest, with C{sessions} idle sessions, and
    its peak while one message of C{big_size} passes through.
    """
    result: dict[str, Any] = {"sessions": sessions, "big_size": big_size}
    with Processes() as processes, raised_file_limit(sessions + 1000):
        core_port = free_port()
        start_emulator(processes, core_port, work / "emulator.log")
        sink = RecordingSink(
            processes, free_port(), work / "arrivals.jsonl", work / "sink.log"
        )
        sink.start()

        def fresh(name: str) -> Gateway:
            folder = work / name
            folder.mkdir()
            gateway = Gateway(
                tuning.settings(
                    port=free_port(),
                    spool=folder / "spool",
                    downstream_port=sink.port,
                    core_port=core_port,
                    builtin_emulator=False,
                ),
                folder,
            )
            processes.on_exit(gateway.stop)
            gateway.start()
            time.sleep(1)
            return gateway

        gateway = fresh("idle")
        result["rss_start_kib"] = gateway.memory()

        async def hold() -> int:
            writers = await open_idle_sessions(gateway.settings.port, sessions)
            await asyncio.sleep(2)
            rss = gateway.memory()
            for w in writers:
                w.close()
            return rss

        result["rss_idle_sessions_kib"] = asyncio.run(hold())
        result["kib_per_session"] = round(
            (result["rss_idle_sessions_kib"] - result["rss_start_kib"]) / sessions, 1
        )
        finish_gateway(gateway, result)

        gateway = fresh("big")
        result["rss_before_big_kib"] = gateway.memory()
        payload = mkmsg.wire(mkmsg.attach_message(big_size, 7, {BENCH_ID: "big"}))
        sent: list[Attempt] = []
        sender = threading.Thread(
            target=lambda: sent.append(
                asyncio.run(send_message(gateway.settings.port, payload))
            ),
            daemon=True,
        )
        sampled = 0
        sender.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            sampled = max(sampled, gateway.memory())
            if any(r["id"] == "big" for r in sink.records()):
                break
            time.sleep(0.02)
        sender.join(60)
        arrival = {r["id"]: r["t"] for r in sink.records() if r["id"]}.get("big")
        result["rss_peak_big_kib"] = gateway.memory("VmHWM")
        result["rss_sampled_max_big_kib"] = sampled
        result["rss_after_big_kib"] = gateway.memory()
        if sent and sent[0].ok:
            attempt = sent[0]
            result["big_data_to_250_s"] = round(attempt.finished - attempt.data_at, 2)
            if arrival is not None:
                result["big_data_to_delivered_s"] = round(arrival - attempt.data_at, 2)
        else:
            reply = sent[0].reply if sent else "no reply"
            result["error"] = f"the big message was not accepted: {reply}"
        if arrival is None:
            result["error"] = "the big message was not delivered"
        finish_gateway(gateway, result)
        return result


# -- main --------------------------------------------------------------------------


def _modes_help() -> str:
    """
    The C{--help} epilog: what the full and the quick mode run.
    """

    def wrapped(head: str, text: str) -> str:
        return textwrap.fill(
            text, 78, initial_indent=f"  {head:16}", subsequent_indent=" " * 18
        )

    full = ", ".join(f"{t.key} x{t.count}" for t in THROUGHPUT)
    quick = ", ".join(f"{t.key} x{t.quick}" for t in THROUGHPUT if t.in_quick)
    return "\n".join(
        [
            "modes:",
            wrapped(
                "full (default)",
                f"throughput {full}, each with the instant and the scanning"
                " Core (the Core-latency scenarios scanning only), 1 and 2"
                " processes, each load once through each peer; latency with the"
                " instant Core, the built-in and a separate emulator (300"
                " probes); memory."
                " About 25 minutes; the table of benchmarks/README.md.",
            ),
            wrapped(
                "--quick",
                f"throughput {quick} (big with the instant Core only), 1 and 2"
                " processes, each load once through each peer; latency with the"
                " instant Core and the built-in emulator (50 probes); memory."
                " Under 3 minutes, a"
                " smoke run: its figures are noisy.",
            ),
            "",
            "The report: one throughput table (the gateway and its peers),"
            " small-message\nlatency, memory, and the figures issue 18 sets"
            " targets for, each beside\nits target.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_modes_help(),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run under 3 minutes: few messages per scenario, the quick"
        " scenarios only, latency with the instant Core and the built-in"
        " emulator only",
    )
    parser.add_argument(
        "--only",
        default="throughput,latency,memory",
        help="comma-separated groups: throughput, latency, memory",
    )
    parser.add_argument(
        "--scenarios",
        default=None,
        help="comma-separated throughput scenarios (default: all; with --quick: "
        + ", ".join(t.key for t in THROUGHPUT if t.in_quick)
        + "): "
        + ", ".join(t.key for t in THROUGHPUT),
    )
    parser.add_argument(
        "--core",
        default=",".join(CORE_MODES),
        help="throughput runs with which Core stand-ins: instant (answers at once,"
        " never reads a file: the gateway's own cost), scanning (the emulator)",
    )
    parser.add_argument(
        "--peers",
        default="postfix,amavis",
        help="peers measured beside the gateway: postfix (the plain relay),"
        " amavis (Postfix with amavisd-new, when installed; needs root)",
    )
    parser.add_argument(
        "--no-postfix", action="store_true", help="leave both peers out"
    )
    parser.add_argument(
        "--verdict-cache",
        type=float,
        default=0.0,
        help="the Core profile's verdict cache in seconds (default off: every"
        " benchmark message is the same file)",
    )
    parser.add_argument(
        "--submit",
        choices=("auto", "sync", "poll"),
        default="auto",
        help="the Core profile's submit mode",
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--core-concurrency", type=int, default=160)
    parser.add_argument("--poll-interval", type=float, default=0.05)
    parser.add_argument(
        "--separate-core",
        action="store_true",
        help="throughput runs: the Core emulator as a process of its own",
    )
    parser.add_argument(
        "--workers",
        default="1,2",
        help="gateway processes ([processes] workers); a list runs each in turn "
        "for the throughput group",
    )
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    # An orderly exit on SIGTERM, so every scenario stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not have_tools():
        print("smtp-source/smtp-sink not found: run ../shared/bench/setup-postfix.sh")
        return 2
    groups = set(args.only.split(","))
    core_modes = [m for m in args.core.split(",") if m]
    if not core_modes or set(core_modes) - set(CORE_MODES):
        parser.error(f"--core takes {', '.join(CORE_MODES)}")
    wanted_peers = set(args.peers.split(","))
    tuning = Tuning(
        args.concurrency,
        args.core_concurrency,
        args.poll_interval,
        args.separate_core,
        verdict_cache=args.verdict_cache,
        submit=args.submit,
    )
    worker_counts = [int(n) for n in args.workers.split(",")]
    if args.scenarios is not None:
        unknown = set(args.scenarios.split(",")) - {t.key for t in THROUGHPUT}
        if unknown:
            parser.error(f"unknown --scenarios: {', '.join(sorted(unknown))}")
    if wanted_peers - {"postfix", "amavis", ""}:
        parser.error("--peers takes postfix, amavis")
    root = Path(tempfile.mkdtemp(prefix="mdgw-run-"))
    #: Why each peer is left out of this run (None: it runs).
    peers: dict[str, str | None] = {"postfix": None, "amavis": None}
    if args.no_postfix:
        wanted_peers = set()
    postfix = bool(wanted_peers & {"postfix", "amavis"})
    if postfix and not postfix_available():
        postfix = False
        peers["postfix"] = (
            f"Postfix's relay does not listen on 127.0.0.1:{POSTFIX_PORT}"
            " (as root: ../shared/bench/setup-postfix.sh)"
        )
    if postfix:
        try:
            flushed = flush_postfix_leftovers(root)
        except RuntimeError as e:
            postfix = False
            peers["postfix"] = str(e)
        else:
            if flushed:
                say(f"flushed {flushed} leftover messages from Postfix's queue")
    if "amavis" not in wanted_peers:
        peers["amavis"] = "not asked for (--peers, --no-postfix)"
    elif not postfix:
        peers["amavis"] = peers["postfix"]
    elif "throughput" in groups:
        peers["amavis"] = amavis.unavailable()
    else:
        peers["amavis"] = "measured in the throughput group only"
    if "postfix" not in wanted_peers:
        peers["postfix"] = "not asked for (--peers, --no-postfix)"
    started = datetime.now(UTC)
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        "tuning": attrs.asdict(tuning),
        "postfix": postfix,
        "peers_left_out": peers,
    }
    failed = False
    try:
        if "throughput" in groups:
            report["throughput"] = rows = []
            with contextlib.ExitStack() as stack:
                if peers["amavis"] is None:
                    say("setting up Postfix with amavisd-new")
                    try:
                        stack.enter_context(
                            amavis.AmavisPath(
                                stack.enter_context(Processes()), root / "amavis"
                            )
                        )
                    except Exception as e:
                        peers["amavis"] = f"setup failed: {type(e).__name__}: {e}"
                for peer, why in peers.items():
                    if why is not None:
                        say(f"{PEER_NAMES[peer]} left out: {why}")
                report["amavis"] = peers["amavis"] is None
                failed |= throughput_group(
                    rows, args, tuning, worker_counts, core_modes, root,
                    peers["postfix"] is None, peers["amavis"] is None,
                )  # fmt: skip
        if "latency" in groups:
            probes = 50 if args.quick else 300
            report["latency"] = latency = {}
            # The instant stand-in shows the gateway's own latency; the
            # scanning emulator adds its 100 ms of post-processing per file
            # and its CPU on the same two cores.
            setups = [
                (LATENCY_INSTANT, False, True),
                (LATENCY_BUILTIN, False, False),
                (LATENCY_SEPARATE, True, False),
            ]
            for label, separate, instant in setups[:2] if args.quick else setups:
                say(f"latency: {probes} probes while 25 MiB messages flow ({label})")
                latency[label] = _guarded(
                    gateway_latency,
                    _fresh(root, label.replace(" ", "-").replace(",", "")),
                    attrs.evolve(tuning, workers=max(worker_counts), instant=instant),
                    probes,
                    25 * MiB,
                    2,
                    separate,
                )
                failed |= "error" in latency[label]
            if peers["postfix"] is None:
                say("latency: the same through Postfix")
                latency["postfix"] = _guarded(
                    postfix_latency,
                    _fresh(root, "latency-postfix"),
                    probes,
                    25 * MiB,
                    2,
                )
        if "memory" in groups:
            say("memory: 1000 idle sessions, then one 50 MiB message")
            report["memory"] = _guarded(
                gateway_memory, _fresh(root, "memory"), tuning, 1000, 50 * MiB
            )
            failed |= "error" in report["memory"]
    finally:
        report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        if args.keep:
            say(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"mdgateway benchmark, {report['started']}, {_cpus()} CPUs, "
        f"delivery concurrency {tuning.concurrency}, Core concurrency "
        f"{tuning.core_concurrency}, poll interval {tuning.poll_interval:g}s, "
        f"Core emulator for throughput "
        f"{'separate' if tuning.separate_core else 'built in'}, submit "
        f"{tuning.submit}, verdict cache {tuning.verdict_cache:g}s"
        + (", quick" if args.quick else "")
    )
    if report.get("throughput"):
        print_throughput(report["throughput"], peers)
    if report.get("latency"):
        print_latency(report["latency"])
    if report.get("memory") and "rss_start_kib" in report["memory"]:
        print_memory(report["memory"])
    elif report.get("memory"):
        print(f"\nmemory: failed: {report['memory'].get('error')}")
    print_targets(report)
    print_problems(report)
    print(f"\nresults: {out}")
    return 1 if failed else 0


def throughput_group(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    tuning: Tuning,
    worker_counts: list[int],
    core_modes: list[str],
    root: Path,
    postfix: bool,
    with_amavis: bool,
) -> bool:
    """
    Every wanted scenario with every Core stand-in and process count, the
    peers once per load; whether any gateway run failed.
    """
    failed = False
    peer_done: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    for scenario, mode, workers in itertools.product(
        wanted_scenarios(args), core_modes, worker_counts
    ):
        if mode == INSTANT and scenario.latency > 0:
            continue  # the instant stand-in has no latency to imitate
        if args.quick and args.scenarios is None and mode not in scenario.quick_modes:
            continue
        count = scenario.quick if args.quick else scenario.count
        label = scenario.label
        if len(worker_counts) > 1:
            label += f", {workers} proc"
        say(f"throughput: {label} x {count} through the gateway, {mode} Core")
        row: dict[str, Any] = {
            "key": scenario.key,
            "label": label,
            "core": mode,
            "count": count,
            "workers": workers,
        }
        row["gateway"] = _guarded(
            gateway_throughput,
            scenario,
            count,
            _fresh(root, f"{scenario.key}-{mode}-{workers}"),
            attrs.evolve(tuning, workers=workers, instant=mode == INSTANT),
            args.timeout,
        )
        peers = [("postfix", POSTFIX_PORT)] if postfix else []
        if with_amavis:
            peers.append(("amavis", amavis.INBOUND_PORT))
        for peer, port in peers:
            key = (peer, scenario.kind, scenario.size, count)
            if key not in peer_done:
                say(f"throughput: {scenario.label} x {count} through {peer}")
                peer_done[key] = _guarded(
                    postfix_throughput,
                    scenario.kind,
                    scenario.size,
                    count,
                    scenario.sessions,
                    _fresh(root, f"{peer}-{scenario.key}"),
                    args.timeout,
                    port,
                )
            row[peer] = peer_done[key]
        failed |= not row["gateway"].get("ok")
        rows.append(row)
        say(json.dumps(row))
    return failed


def wanted_scenarios(args: argparse.Namespace) -> list[Throughput]:
    """
    The throughput scenarios of C{--scenarios}, or by default all of them
    (with C{--quick}, those marked for it).
    """
    if args.scenarios is None:
        return [t for t in THROUGHPUT if t.in_quick or not args.quick]
    wanted = set(args.scenarios.split(","))
    return [t for t in THROUGHPUT if t.key in wanted]


def _guarded(run: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """
    Run one scenario; a crash becomes its error, and the suite goes on.
    """
    try:
        return run(*args)
    except Exception as e:
        import traceback

        traceback.print_exc()
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def _fresh(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    return folder


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
