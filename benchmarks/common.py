# -*- test-case-name: tests.test_faults_short -*-
"""
Shared pieces of the benchmark and fault scripts: the gateway's benchmark
configuration, the processes around it (gateway, Core emulator, Postfix's
C{smtp-sink}, a recording sink), an asyncio SMTP client, and checks of what
the gateway left behind (log errors, spool leftovers).

Every process is started through L{Processes}, a context manager that
stops whatever it started when the scenario ends, also on failure.

    python3 -m benchmarks.common sink --port 2600 --record arrivals.jsonl

runs the recording sink by itself: an SMTP server that throws messages
away after writing one JSON line per message (arrival time, size, the
C{X-Bench-Id} and C{X-Metadefender-Core-Result} header values).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import attrs

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.gatewayproc import GatewayProcess, environment  # noqa: E402

#: Postfix's loopback relay as set up by ../shared/bench/setup-postfix.sh.
POSTFIX_PORT = 2525
POSTFIX_SINK_PORT = 2526

SENDER = "bench@example.com"
RECIPIENT = "user@example.com"
BENCH_ID = "X-Bench-Id"
RESULT_HEADER = "X-Metadefender-Core-Result"


# -- ports ---------------------------------------------------------------------


def free_port() -> int:
    """
    A TCP port nobody listens on now (bind to 0 and let go).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """
    Whether something listens on C{port}, read from C{/proc/net/tcp}: no
    connection is made, so a sink's counters stay clean.
    """
    suffix = f":{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[1].endswith(suffix):
                    return True
    except OSError:
        pass
    return False


def wait_listening(
    port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """
    Wait until C{port} listens; fail early when C{proc} exits.
    """
    deadline = time.monotonic() + timeout
    while not listening(port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port} after {timeout:g}s")
        time.sleep(0.02)


def wait_closed(port: int, timeout: float = 10.0) -> None:
    """
    Wait until nothing listens on C{port}.
    """
    deadline = time.monotonic() + timeout
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.02)


# -- processes -----------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """
    SIGTERM, then SIGKILL when it takes longer than C{timeout}.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Processes:
    """
    Everything a scenario started; leaving the C{with} block stops it all,
    newest first, whatever happened inside.
    """

    def __init__(self) -> None:
        self._stops: list[Callable[[], object]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        while self._stops:
            stop = self._stops.pop()
            try:
                stop()
            except Exception as e:  # keep stopping the rest
                print(f"cleanup: {e!r}", file=sys.stderr)

    def on_exit(self, stop: Callable[[], object]) -> None:
        """
        Call C{stop} when the scenario ends.
        """
        self._stops.append(stop)

    def popen(
        self, args: Sequence[str], log: Path, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        """
        Start C{args} with its output in C{log}; stopped at exit.
        """
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(args), stdout=out, stderr=subprocess.STDOUT, **kwargs
            )
        self.on_exit(lambda: stop_process(proc))
        return proc


def _process_table() -> dict[int, tuple[int, int]]:
    """
    Every process: its parent and the CPU ticks (user and system) it used.
    """
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return stats


def _family(pid: int, stats: dict[int, tuple[int, int]]) -> set[int]:
    family, grew = {pid}, True
    while grew:
        grew = False
        for child, (parent, _) in stats.items():
            if parent in family and child not in family:
                family.add(child)
                grew = True
    return family


def _is_core_emulator(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"mdgateway.run.emulator" in command or b"mdcore-emulator" in command


def process_cpu(pid: int) -> float:
    """
    CPU seconds (user and system) used so far by process C{pid} and its
    live descendants (a gateway's worker processes).
    """
    stats = _process_table()
    ticks = sum(stats[p][1] for p in _family(pid, stats) if p in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def split_cpu(pid: int, core_pid: int | None = None) -> tuple[float, float]:
    """
    CPU seconds used so far by the gateway (process C{pid} and its live
    descendants, less a Core emulator among them: the built-in one), and
    by the Core emulator (that built-in one, or the separate process
    C{core_pid} and its descendants).
    """
    stats = _process_table()
    family = _family(pid, stats)
    core = {p for p in family if _is_core_emulator(p)}
    if core_pid is not None:
        core |= _family(core_pid, stats)
    per_tick = 1 / os.sysconf("SC_CLK_TCK")
    gateway = sum(stats[p][1] for p in family - core if p in stats)
    emulator = sum(stats[p][1] for p in core if p in stats)
    return gateway * per_tick, emulator * per_tick


def process_memory(pid: int, field: str = "VmRSS") -> int:
    """
    C{VmRSS} (resident now) or C{VmHWM} (peak resident) of C{pid}, in KiB.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def box_cpu() -> tuple[int, int]:
    """
    (busy, total) jiffies of all cores, from C{/proc/stat}.
    """
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


# -- the gateway ---------------------------------------------------------------


@attrs.frozen
class GatewaySettings:
    """
    The benchmark's gateway: generous limits, so runs measure speed and
    not refusals, and short retries, so outages recover quickly.

    @ivar core_port: where the Core emulator listens (started by the
        gateway when C{builtin_emulator}, else by the caller).
    @ivar latency: seconds the built-in emulator spends on each file.
    @ivar instant: the built-in emulator is the instant stand-in (every
        file clean at once, never read).
    @ivar verdict_cache: the Core profile's verdict cache in seconds; off
        by default, since every benchmark message is the same file and
        real mail mostly is not.
    @ivar submit: the Core profile's submit mode.
    @ivar concurrency: messages processed and relayed at once.
    @ivar core_concurrency: scans in flight per Core server.
    """

    port: int
    spool: Path
    downstream_port: int
    core_port: int
    builtin_emulator: bool = True
    latency: float = 0.0
    concurrency: int = 64
    core_concurrency: int = 160
    poll_interval: float = 0.05
    retry_first: float = 1.0
    retry_max: float = 2.0
    core_retry_after: float = 2.0
    spool_threads: int = 4
    workers: int = 1
    instant: bool = False
    verdict_cache: float = 0.0
    submit: str = "auto"

    def toml(self) -> str:
        """
        The configuration file's text.
        """
        return f"""
sender_helo_domain = "gw.bench.test"

[[listeners]]
name = "bench"
endpoint = "tcp:{self.port}:interface=127.0.0.1"
tls = "none"
max_connections = 5000
max_connections_per_client = 5000

[limits]
message_size = "60MiB"
recipients = 1000
idle_timeout = "15m"
session_deadline = "2h"
errors = 1000

[spool]
directory = "{self.spool}"
threads = {self.spool_threads}

[delivery]
concurrency = {self.concurrency}
retry_first = {self.retry_first}
retry_max = {self.retry_max}

[emulator]
enabled = {"true" if self.builtin_emulator else "false"}
endpoint = "tcp:{self.core_port}:interface=127.0.0.1"
latency = {self.latency}
instant = {"true" if self.instant else "false"}

[drain]
timeout = "5s"

[processes]
workers = {self.workers}

[profiles.core.bench]
servers = ["http://127.0.0.1:{self.core_port}"]
poll_interval = {self.poll_interval}
concurrency = {self.core_concurrency}
retry_after = {self.core_retry_after}
verdict_cache = {self.verdict_cache}
submit = "{self.submit}"

[profiles.smtp.downstream]
servers = ["smtp://127.0.0.1:{self.downstream_port}"]
tls = "none"

[[rules]]
name = "bench"
client_networks = ["127.0.0.0/8"]
core_profile = "bench"
relay_profile = "downstream"
"""


class Gateway:
    """
    The gateway as a C{python -m twisted mdgateway} process with a JSON
    log; it can be killed and started again on the same spool.
    """

    def __init__(self, settings: GatewaySettings, work: Path) -> None:
        self.settings = settings
        self.config = work / "mdgateway.toml"
        self.config.write_text(settings.toml())
        self.log = work / "gateway.log"
        self._process = GatewayProcess(self.config, self.log)

    @property
    def pid(self) -> int:
        assert self._process.proc is not None
        return self._process.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        """
        Start and wait until the gateway serves: its listener opens first
        and answers C{421} until the spool is recovered and every process
        runs, so a new C{gateway_ready} line in the log is the signal (the
        log is kept across restarts).
        """
        before = self._ready_lines()
        self._process.start()
        proc = self._process.proc
        assert proc is not None
        wait_listening(self.settings.port, timeout, proc)
        deadline = time.monotonic() + timeout
        while self._ready_lines() <= before:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway is not ready after {timeout:g}s")
            time.sleep(0.05)

    def _ready_lines(self) -> int:
        return sum(1 for e in log_events(self.log) if e.get("gateway_ready"))

    def running(self) -> bool:
        proc = self._process.proc
        return proc is not None and proc.poll() is None

    def kill(self) -> None:
        """
        SIGKILL: no drain, no cleanup, as in a crash.
        """
        self._process.kill()

    def stop(self) -> None:
        """
        SIGTERM and wait for the drain; SIGKILL after a while.
        """
        proc = self._process.proc
        if proc is not None:
            stop_process(proc, timeout=30)

    def cpu(self) -> float:
        return process_cpu(self.pid)

    def memory(self, field: str = "VmRSS") -> int:
        return process_memory(self.pid, field)

    def problems(self) -> list[str]:
        """
        Every error or critical event of the log, as text.
        """
        return log_problems(self.log)

    def leftovers(self) -> dict[str, int]:
        """
        Files still in the spool's folders (see L{spool_leftovers}).
        """
        return spool_leftovers(self.settings.spool)


def log_events(path: Path) -> Iterator[dict[str, Any]]:
    """
    The events of the gateway's JSON Lines log.
    """
    if not path.exists():
        return
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                yield json.loads(line)
            except ValueError:
                continue


#: The Core emulator's counters of requests about files (see
#: L{mdgateway.emulator.app.CoreEmulator.counters}): C{submit} counts every
#: file admitted, by C{POST /file} or C{POST /file/sync} (which C{sync}
#: counts again); C{/version} and the other server questions are not per
#: file.
FILE_REQUESTS = ("submit", "poll", "hash", "download", "cancel")


def core_requests(log: Path) -> dict[str, Any]:
    """
    Core requests per scanned file, from the request counts a Core
    emulator logs when it stops (C{emulator_counts}: in the gateway's log
    for the built-in one, in its own log when separate; summed if it was
    restarted). A file is scanned once per submission (C{POST /file} or
    C{POST /file/sync}, both counted as C{submit}); its requests are the
    submission, the polls, and any hash lookup, download or cancel.
    """
    counts: dict[str, int] = {}
    for event in log_events(log):
        found = event.get("emulator_counts")
        if isinstance(found, dict):
            for key, value in found.items():
                counts[key] = counts.get(key, 0) + int(value)
    if not counts:
        return {"core_counts": None}
    files = counts.get("submit", 0)
    requests = sum(counts.get(key, 0) for key in FILE_REQUESTS)
    return {
        "core_counts": counts,
        "core_files": files,
        "core_requests_per_file": round(requests / files, 2) if files else None,
    }


def _format_event(event: dict[str, Any]) -> str:
    text = str(event.get("msg", ""))
    if event.get("error"):
        text += f" [{str(event['error'])[:300]}]"
    return text


def log_problems(path: Path) -> list[str]:
    """
    The error and critical events of a JSON log, formatted.
    """
    found = []
    for event in log_events(path):
        name = event.get("level")
        if name in ("error", "critical"):
            found.append(f"{name}: {_format_event(event)}")
    return found


def spool_leftovers(spool: Path) -> dict[str, int]:
    """
    Files left in each spool folder (C{queue}, C{incoming}, C{corrupt},
    C{work}...); only folders that hold something are named.
    """
    counts: dict[str, int] = {}
    if not spool.is_dir():
        return counts
    for folder in sorted(p for p in spool.iterdir() if p.is_dir()):
        if folder.name == "workers":
            # Each worker process has a spool root of its own here.
            for root in sorted(p for p in folder.iterdir() if p.is_dir()):
                for name, n in spool_leftovers(root).items():
                    counts[f"workers/{root.name}/{name}"] = n
            continue
        n = sum(1 for p in folder.rglob("*") if p.is_file())
        if n:
            counts[folder.name] = n
    return counts


def start_emulator(
    processes: Processes,
    port: int,
    log: Path,
    latency: float = 0.0,
    instant: bool = False,
) -> subprocess.Popen[bytes]:
    """
    A separate C{mdcore-emulator} process on C{port} (C{instant}: the
    instant stand-in).
    """
    proc = processes.popen(
        [
            sys.executable,
            "-m",
            "twisted",
            "mdcore-emulator",
            "--port",
            str(port),
            "--latency",
            str(latency),
            "--queue-size",
            "2000",
            "--quiet",
            *(["--instant"] if instant else []),
        ],
        log,
        env=environment(),
        cwd=str(REPO),
    )
    wait_listening(port, 30, proc)
    return proc


# -- Postfix's smtp-source and smtp-sink ----------------------------------------

_MESG = re.compile(rb"mesg=(\d+)")


class SmtpSink:
    """
    Postfix's C{smtp-sink -c}: throws mail away and prints running counters,
    of which C{mesg=} is the number of messages received.
    """

    def __init__(self, processes: Processes, port: int, log: Path) -> None:
        if listening(port):
            raise RuntimeError(f"port {port} is taken: not our sink")
        self.port = port
        self.log = log
        self.log.write_bytes(b"")
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = processes.popen(
            ["smtp-sink", "-c", *user, f"127.0.0.1:{port}", "1000"], log
        )
        wait_listening(port, 10, self.proc)

    def count(self) -> int:
        """
        The last C{mesg=} counter printed.
        """
        try:
            with open(self.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 512))
                tail = f.read()
        except OSError:
            return 0
        found = _MESG.findall(tail)
        return int(found[-1]) if found else 0


def smtp_source_command(
    port: int, count: int, sessions: int, message: Path
) -> list[str]:
    """
    C{smtp-source}: C{count} messages from file, one per session, over
    C{sessions} parallel sessions.
    """
    return [
        "smtp-source",
        "-s",
        str(sessions),
        "-m",
        str(count),
        "-F",
        str(message),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        "-M",
        "source.bench.test",
        f"127.0.0.1:{port}",
    ]


def have_tools() -> bool:
    return all(shutil.which(t) for t in ("smtp-source", "smtp-sink"))


def postfix_available() -> bool:
    """
    Whether the loopback Postfix relay of setup-postfix.sh is there.
    """
    return shutil.which("postfix") is not None and listening(POSTFIX_PORT)


def postfix_queue() -> list[dict[str, Any]]:
    """
    The messages in Postfix's queue (C{postqueue -j}, one JSON object a
    line).
    """
    try:
        out = subprocess.run(
            ["postqueue", "-j"], capture_output=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    entries = []
    for line in out.splitlines():
        if line.strip().startswith(b"{"):
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    return entries


def postfix_queue_length() -> int:
    return len(postfix_queue())


def flush_postfix_leftovers(work: Path, timeout: float = 600.0) -> int:
    """
    Deliver what earlier benchmark runs left in Postfix's queue (mail from
    L{SENDER} deferred because its sink had gone) into a sink, so a timed
    run starts from an empty queue and its sink counts only its own mail.

    @return: how many messages were flushed.
    @raise RuntimeError: when the queue holds other mail, or does not
        empty in time.
    """
    entries = postfix_queue()
    if not entries:
        return 0
    others = [e for e in entries if e.get("sender") != SENDER]
    if others:
        raise RuntimeError(
            f"Postfix's queue holds {len(others)} message(s) not from {SENDER};"
            " not touching them"
        )
    with Processes() as processes:
        SmtpSink(processes, POSTFIX_SINK_PORT, work / "flush-sink.out")
        subprocess.run(["postqueue", "-f"], check=False, timeout=60)
        deadline = time.monotonic() + timeout
        while postfix_queue_length():
            if time.monotonic() > deadline:
                raise RuntimeError("Postfix's queue did not empty into the sink")
            time.sleep(1)
    return len(entries)


# -- an asyncio SMTP client ----------------------------------------------------


@attrs.frozen
class Attempt:
    """
    One SMTP transaction as the client saw it.

    @ivar stage: where it ended: C{connect}, C{banner}, C{ehlo}, C{mail},
        C{rcpt}, C{data}, C{dot} (the reply after the content) or C{done}.
    @ivar code: the last reply code, 0 when the connection failed.
    @ivar data_at: when C{DATA} was sent (C{time.monotonic}), 0 if never.
    """

    ok: bool
    stage: str
    code: int
    text: str
    queue_id: str
    started: float
    data_at: float
    finished: float

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}" if self.code else self.text


class SmtpReplyError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """
    One (possibly multi-line) reply.
    """
    lines = []
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError("connection closed")
        lines.append(line[4:].strip().decode("utf-8", "replace"))
        if line[3:4] != b"-":
            return int(line[:3]), " ".join(lines)


_QUEUED = re.compile(r"queued as (\S+)")


async def send_message(
    port: int,
    payload: bytes,
    *,
    sender: str = SENDER,
    recipients: Sequence[str] = (RECIPIENT,),
    host: str = "127.0.0.1",
    timeout: float = 300.0,
    pause: float = 0.0,
) -> Attempt:
    """
    Send one message in its own session; C{payload} is the DATA content
    from L{benchmarks.mkmsg.wire} (CRLF, dot-stuffed, with the final dot).
    Never raises for SMTP or connection trouble: the L{Attempt} says.

    @param pause: seconds to wait after each 256 KiB of content, to keep a
        big message in flight for a while.
    """
    started = time.monotonic()
    stage = "connect"
    data_at = 0.0
    code = 0
    writer: asyncio.StreamWriter | None = None

    async def command(line: bytes, want: int) -> tuple[int, str]:
        assert writer is not None
        writer.write(line)
        reply = await read_reply(reader)
        if reply[0] != want:
            raise SmtpReplyError(*reply)
        return reply

    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            stage = "banner"
            code, text = await read_reply(reader)
            if code != 220:
                raise SmtpReplyError(code, text)
            stage = "ehlo"
            await command(b"EHLO client.bench.test\r\n", 250)
            stage = "mail"
            await command(f"MAIL FROM:<{sender}>\r\n".encode(), 250)
            stage = "rcpt"
            accepted = 0
            last: tuple[int, str] = (0, "")
            for rcpt in recipients:
                writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
                last = await read_reply(reader)
                accepted += last[0] == 250
            if not accepted:
                raise SmtpReplyError(*last)
            stage = "data"
            data_at = time.monotonic()
            await command(b"DATA\r\n", 354)
            stage = "dot"
            step = 256 * 1024 if pause else len(payload)
            for offset in range(0, len(payload), step):
                writer.write(payload[offset : offset + step])
                await writer.drain()
                if pause:
                    await asyncio.sleep(pause)
            code, text = await read_reply(reader)
            if code != 250:
                raise SmtpReplyError(code, text)
            finished = time.monotonic()
            found = _QUEUED.search(text)
            writer.write(b"QUIT\r\n")
            try:
                async with asyncio.timeout(2):
                    await read_reply(reader)
            except (TimeoutError, ConnectionError, ValueError):
                pass
            return Attempt(
                True,
                "done",
                code,
                text,
                found.group(1) if found else "",
                started,
                data_at,
                finished,
            )
    except SmtpReplyError as e:
        return Attempt(
            False, stage, e.code, e.text, "", started, data_at, time.monotonic()
        )
    except (OSError, ConnectionError, TimeoutError, ValueError, EOFError) as e:
        return Attempt(
            False,
            stage,
            0,
            f"{type(e).__name__}: {e}",
            "",
            started,
            data_at,
            time.monotonic(),
        )
    finally:
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ConnectionError):
                pass


async def open_idle_sessions(
    port: int, count: int, batch: int = 50
) -> list[asyncio.StreamWriter]:
    """
    Open C{count} sessions that say EHLO and then wait; a batch at a time,
    so the listen backlog never overflows.

    @raise RuntimeError: when one is refused.
    """
    writers: list[asyncio.StreamWriter] = []

    async def one() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        code, text = await read_reply(reader)
        if code != 220:
            writer.close()
            raise RuntimeError(f"banner {code} {text}")
        writer.write(b"EHLO idle.bench.test\r\n")
        code, text = await read_reply(reader)
        if code != 250:
            writer.close()
            raise RuntimeError(f"EHLO {code} {text}")
        return writer

    for start in range(0, count, batch):
        n = min(batch, count - start)
        writers.extend(await asyncio.gather(*(one() for _ in range(n))))
    return writers


# -- statistics ----------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """
    The C{fraction} quantile by nearest rank (0 for no values).
    """
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- the recording sink ----------------------------------------------------------


class _SinkProtocol(asyncio.Protocol):
    """
    A minimal SMTP server that records each message and throws it away.
    The content is scanned for the terminating dot chunk by chunk, so a
    50 MB message costs little time and memory; only its first 64 KiB are
    kept to read headers from.
    """

    HEAD = 64 * 1024

    def __init__(self, record: Callable[[dict[str, Any]], None], number: int) -> None:
        self.record = record
        self.number = number
        self.buffer = bytearray()
        self.in_data = False
        self.recipients = 0
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.tail = b""
        self.size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 sink.bench.test ESMTP recording sink\r\n")

    def reply(self, text: str) -> None:
        assert self.transport is not None
        self.transport.write(text.encode() + b"\r\n")

    def data_received(self, data: bytes) -> None:
        while data:
            if self.in_data:
                data = self._content(data)
                continue
            self.buffer += data
            data = b""
            while not self.receiving():
                end = self.buffer.find(b"\n")
                if end < 0:
                    if len(self.buffer) > 4096:
                        self.reply("500 5.5.2 Line too long")
                        self.buffer.clear()
                    break
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                self._command(line.rstrip(b"\r\n").decode("latin-1"))
            if self.receiving() and self.buffer:
                data = bytes(self.buffer)
                self.buffer.clear()

    def receiving(self) -> bool:
        """
        Whether the session is in DATA (a command just read may switch it).
        """
        return self.in_data

    def _command(self, line: str) -> None:
        verb = line[:4].upper()
        if verb == "EHLO":
            self.reply(
                "250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                "250-SIZE 209715200\r\n250 ENHANCEDSTATUSCODES"
            )
        elif verb == "HELO":
            self.reply("250 sink.bench.test")
        elif verb == "MAIL":
            self.recipients = 0
            self.reply("250 2.1.0 Ok")
        elif verb == "RCPT":
            self.recipients += 1
            self.reply("250 2.1.5 Ok")
        elif verb == "DATA":
            if not self.recipients:
                self.reply("503 5.5.1 No recipients")
                return
            self.in_data = True
            self.head = bytearray()
            self.tail = b"\r\n"
            self.size = 0
            self.reply("354 End data with <CR><LF>.<CR><LF>")
        elif verb in ("RSET", "NOOP"):
            self.recipients = 0 if verb == "RSET" else self.recipients
            self.reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            assert self.transport is not None
            self.transport.close()
        else:
            self.reply("502 5.5.2 Command not implemented")

    def _content(self, chunk: bytes) -> bytes:
        """
        Take message content; return what follows the final dot.
        """
        window = self.tail + chunk
        found = window.find(b"\r\n.\r\n")
        if found < 0:
            self._keep(chunk)
            self.tail = window[-4:]
            return b""
        # The content ends with the CRLF before the dot line.
        content_end = found + 2 - len(self.tail)
        if content_end > 0:
            self._keep(chunk[:content_end])
        rest = chunk[found + 5 - len(self.tail) :]
        self.in_data = False
        self._received()
        return rest

    def _keep(self, data: bytes) -> None:
        self.size += len(data)
        if len(self.head) < self.HEAD:
            self.head += data[: self.HEAD - len(self.head)]

    def _received(self) -> None:
        fields = header_fields(bytes(self.head))
        self.record(
            {
                "t": time.monotonic(),
                "id": fields.get(BENCH_ID.lower()),
                "result": fields.get(RESULT_HEADER.lower()),
                "size": self.size,
                "rcpts": self.recipients,
                "conn": self.number,
            }
        )
        self.recipients = 0
        self.reply(f"250 2.0.0 Ok: queued as S{self.number}")


def header_fields(message: bytes) -> dict[str, str]:
    """
    The first value of each header field of C{message} (names lowercased).
    """
    head = message.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    fields: dict[str, str] = {}
    current = ""
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t"):
            if current:  # a folded continuation of the field being kept
                fields[current] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        current = name if sep and name not in fields else ""
        if current:
            fields[current] = value.strip()
    return fields


async def serve_sink(port: int, record: IO[str]) -> None:
    """
    Run the recording sink on 127.0.0.1:C{port} until killed.
    """
    counter = 0

    def write(entry: dict[str, Any]) -> None:
        record.write(json.dumps(entry) + "\n")
        record.flush()

    def protocol() -> _SinkProtocol:
        nonlocal counter
        counter += 1
        return _SinkProtocol(write, counter)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        protocol, "127.0.0.1", port, reuse_address=True, backlog=1024
    )
    async with server:
        await server.serve_forever()


class RecordingSink:
    """
    The recording sink as a separate process, so it can be stopped and
    started again on the same port and its timing is not disturbed by the
    load generator's own work.
    """

    def __init__(
        self, processes: Processes, port: int, record: Path, log: Path
    ) -> None:
        self.processes = processes
        self.port = port
        self.record = record
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if listening(self.port):
            raise RuntimeError(f"port {self.port} is taken: not our sink")
        self.proc = self.processes.popen(
            [
                sys.executable,
                "-m",
                "benchmarks.common",
                "sink",
                "--port",
                str(self.port),
                "--record",
                str(self.record),
            ],
            self.log,
            cwd=str(REPO),
            env=environment(),
        )
        wait_listening(self.port, 15, self.proc)

    def stop(self) -> None:
        """
        Kill it (no goodbye to connected clients), and wait for the port to
        close.
        """
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        wait_closed(self.port)

    def records(self) -> list[dict[str, Any]]:
        """
        One entry per message received so far.
        """
        if not self.record.exists():
            return []
        entries = []
        for line in self.record.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a line being written
        return entries


@contextmanager
def raised_file_limit(wanted: int) -> Iterator[None]:
    """
    Raise this process's open-file limit (children inherit it).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, wanted), hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark helpers")
    commands = parser.add_subparsers(dest="command", required=True)
    sink = commands.add_parser("sink", help="run the recording sink")
    sink.add_argument("--port", type=int, required=True)
    sink.add_argument("--record", type=Path, required=True)
    args = parser.parse_args(argv)
    with open(args.record, "a") as record:
        try:
            asyncio.run(serve_sink(args.port, record))
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
