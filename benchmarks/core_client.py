"""
Core client throughput: files scanned per second through L{CoreRuntime}
against the Core emulator, at zero emulator latency and at 500 ms per file.

    python3 benchmarks/core_client.py [--seconds 10] [--concurrency 200]
        [--poll-interval 0.05] [--latencies 0,0.5] [--in-process]
        [--instant] [--profile out.pstats] [--submit auto|sync|poll]

The emulator runs as a subprocess (C{python -m twisted mdcore-emulator}) so
client and server do not share one CPU, unless C{--in-process}. Each
scenario keeps C{--concurrency} scans in flight for C{--seconds} and prints
files per second; with latency the ceiling is about concurrency / (time per
file), far above 1 / latency, which is what a client doing one file at a
time would get. Nothing here is a test: the machine is shared and noisy.

With C{--instant} the emulator is the instant stand-in (every file clean at
once, never read), so what is left is the client's own cost: the figure
"client CPU ms/file" is this process's CPU time per scanned file (the
emulator runs in another process). C{--profile} writes a cProfile of the
client's process to a file (C{python3 -m pstats FILE} reads it).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import treq  # noqa: E402
from twisted.internet import defer, task, threads  # noqa: E402

from mdgateway.emulator.app import (  # noqa: E402
    CoreEmulator,
    EmulatorConfig,
    EmulatorServer,
)
from mdgateway.policy.profiles import CoreProfile, CoreServer  # noqa: E402
from mdgateway.scan.errors import CoreError  # noqa: E402
from mdgateway.scan.runtime import CoreRuntime  # noqa: E402

profiler = cProfile.Profile()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def make_files(directory: Path, count: int = 40) -> list[tuple[str, str]]:
    """
    Small attachments: mostly text, every fifth a .docx (sanitized).
    """
    files = []
    for i in range(count):
        name = f"part{i}.docx" if i % 5 == 0 else f"part{i}.txt"
        path = directory / name
        text = (b"line %d of a mail attachment\n" % i) * 150
        if name.endswith(".docx"):
            # A real Word package: the emulator recognises types by content.
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as package:
                package.writestr("[Content_Types].xml", b"<Types/>")
                package.writestr("word/document.xml", text)
        else:
            path.write_bytes(text)
        files.append((str(path), name))
    return files


async def start_emulator(
    reactor: Any, latency: float, in_process: bool, workdir: Path, instant: bool
) -> tuple[str, Any]:
    if in_process:
        config = EmulatorConfig(latency=latency, queue_size=100000, instant=instant)
        server = EmulatorServer(reactor, CoreEmulator(reactor, config))
        server.start()
        return server.url, server
    port = free_port()
    process = subprocess.Popen(
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
            "100000",
            "--quiet",
            "--workdir",
            str(workdir),
            *(["--instant"] if instant else []),
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            answer = await treq.get(f"{url}/version", persistent=False, timeout=1)
            await answer.content()
            return url, process
        except Exception:
            await task.deferLater(reactor, 0.1, lambda: None)
    process.kill()
    raise SystemExit("emulator did not start")


async def stop_emulator(handle: Any) -> None:
    if isinstance(handle, EmulatorServer):
        await handle.close()
    else:
        handle.terminate()
        await threads.deferToThread(handle.wait, 10)


async def scenario(reactor: Any, args: argparse.Namespace, latency: float) -> None:
    with tempfile.TemporaryDirectory(prefix="mdgw-core-bench-") as tmp:
        files = make_files(Path(tmp))
        workdir = Path(tmp) / "emulator"
        workdir.mkdir()
        url, handle = await start_emulator(
            reactor, latency, args.in_process, workdir, args.instant
        )
        profile = CoreProfile(
            name="bench",
            servers=(CoreServer(url),),
            poll_interval=args.poll_interval,
            concurrency=args.concurrency,
            scan_timeout=60,
            submit=args.submit,
        )
        runtime = CoreRuntime.from_profile(profile, reactor)
        done = 0
        errors = 0
        latencies: list[float] = []
        deadline = reactor.seconds() + args.seconds

        async def worker(index: int) -> None:
            nonlocal done, errors
            n = index
            while reactor.seconds() < deadline:
                path, name = files[n % len(files)]
                n += args.concurrency
                began = reactor.seconds()
                try:
                    await runtime.scan(path, name)
                except CoreError as e:
                    errors += 1
                    if errors <= 3:
                        print(f"  error: {e}", file=sys.stderr)
                    continue
                done += 1
                latencies.append(reactor.seconds() - began)

        started = time.monotonic()
        cpu = time.process_time()
        if args.profile:
            profiler.enable()
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(worker(i)) for i in range(args.concurrency)]
        )
        if args.profile:
            profiler.disable()
        cpu = time.process_time() - cpu
        elapsed = time.monotonic() - started
        await runtime.close()
        await stop_emulator(handle)
    latencies.sort()
    median = latencies[len(latencies) // 2] if latencies else float("nan")
    rate = done / elapsed
    bound = (
        f"; one file at a time could not pass {1 / latency:.1f} files/s"
        if latency > 0
        else ""
    )
    print(
        f"latency {latency * 1000:4.0f} ms  concurrency {args.concurrency:4d}  "
        f"{done:6d} files in {elapsed:5.1f} s = {rate:7.1f} files/s  "
        f"(median {median * 1000:5.0f} ms per file, errors {errors}{bound}); "
        f"client CPU {1000 * cpu / max(1, done):.2f} ms/file"
    )


async def main(reactor: Any, args: argparse.Namespace) -> None:
    mode = "in-process" if args.in_process else "subprocess"
    print(
        f"Core client benchmark: emulator as {mode}, poll interval "
        f"{args.poll_interval} s, {args.seconds} s per scenario"
    )
    for latency in args.latencies:
        await scenario(reactor, args, latency)
    if args.profile:
        profiler.dump_stats(args.profile)
        print(f"profile written to {args.profile}")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--poll-interval", type=float, default=0.05)
    parser.add_argument(
        "--latencies",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.0, 0.5],
    )
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument(
        "--instant",
        action="store_true",
        help="the emulator answers at once without scanning (measures the client)",
    )
    parser.add_argument("--profile", help="write a cProfile of the client here")
    parser.add_argument(
        "--submit",
        choices=("auto", "sync", "poll"),
        default="auto",
        help="the Core profile's submit mode",
    )
    return parser.parse_args()


if __name__ == "__main__":
    options = parse()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, options)))
