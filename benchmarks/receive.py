"""
Receive throughput: how many messages per second the gateway accepts into its
fsynced spool, driven by Postfix's smtp-source, beside Postfix's own smtpd
when it is installed as the loopback relay of ../shared/bench/setup-postfix.sh.

    python3 benchmarks/receive.py [--count 5000] [--sessions 20] [--size 10240]

Prints a table. Nothing here is a test: the machine is shared and noisy, so
run it a few times and compare medians.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.gatewayproc import GatewayProcess, default_toml, free_port  # noqa: E402


def smtp_source(port: int, count: int, sessions: int, size: int) -> float:
    """
    Run smtp-source against 127.0.0.1:port; return elapsed seconds.
    """
    started = time.monotonic()
    subprocess.run(
        [
            "smtp-source",
            "-s",
            str(sessions),
            "-m",
            str(count),
            "-l",
            str(size),
            "-f",
            "bench@example.com",
            "-t",
            "user@example.com",
            "-M",
            "bench.test",
            f"127.0.0.1:{port}",
        ],
        check=True,
        timeout=600,
    )
    return time.monotonic() - started


RULE = 'client_networks = ["127.0.0.0/8"]'


def gateway_run(count: int, sessions: int, size: int) -> float:
    with tempfile.TemporaryDirectory(prefix="mdgw-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        toml = default_toml(port, work / "spool").replace(
            "[accept]", '[limits]\nmessage_size = "60MiB"\n[accept]'
        )
        config = work / "mdgateway.toml"
        config.write_text(toml)
        gw = GatewayProcess(config, work / "gateway.log")
        gw.start(port)
        try:
            seconds = smtp_source(port, count, sessions, size)
            queued = len(list((work / "spool" / "queue").glob("*.eml")))
            if queued != count:
                print(f"warning: {queued} of {count} queued", file=sys.stderr)
            return seconds
        finally:
            gw.terminate()


def postfix_available() -> bool:
    if shutil.which("postfix") is None:
        return False
    try:
        with socket.create_connection(("127.0.0.1", 2525), timeout=1):
            return True
    except OSError:
        return False


def postfix_run(count: int, sessions: int, size: int) -> float:
    sink = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", "-c", "127.0.0.1:2526", "1000"]
    )
    try:
        time.sleep(0.3)
        seconds = smtp_source(2525, count, sessions, size)
        # Let Postfix relay what it queued before the sink goes away, so no
        # leftovers skew the next run.
        deadline = time.monotonic() + 120
        while (
            time.monotonic() < deadline
            and subprocess.run(["postqueue", "-j"], capture_output=True).stdout.strip()
        ):
            time.sleep(0.5)
        return seconds
    finally:
        sink.terminate()
        sink.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("smtp-source") is None:
        sys.exit("smtp-source not found: run ../shared/bench/setup-postfix.sh first")
    rows = [("mdgateway (accept into spool)", gateway_run)]
    if postfix_available():
        rows.append(("postfix smtpd (accept into queue)", postfix_run))
    print(f"{args.count} messages of {args.size} bytes, {args.sessions} sessions")
    print(f"{'setup':36} {'median s':>9} {'msg/s':>9}   runs (s)")
    results = {}
    for name, run in rows:
        runs = [run(args.count, args.sessions, args.size) for _ in range(args.repeats)]
        median = statistics.median(runs)
        results[name] = args.count / median
        shown = ", ".join(f"{r:.2f}" for r in runs)
        print(f"{name:36} {median:9.2f} {args.count / median:9.0f}   {shown}")
    if len(results) == 2:
        ours, theirs = results.values()
        print(f"ratio mdgateway / postfix: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
