"""
What an ambiguous message costs: decompose a large message whose structure
the parser trusts, and the same message made ambiguous (a duplicate
boundary parameter), which adds Python's two readings of it.

    python3 benchmarks/decompose.py [--size-mib 18] [--repeats 3]

Each run is a fresh process, so the peak resident memory it reports is the
run's own.
"""

from __future__ import annotations

import argparse
import base64
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def message(size: int, ambiguous: bool) -> bytes:
    payload = base64.encodebytes(os.urandom(size)).replace(b"\n", b"\r\n")
    parameter = b"boundary=b1; boundary=b1" if ambiguous else b'boundary="b1"'
    return (
        b"From: a@example.com\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; " + parameter + b"\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + payload + b"--b1--\r\n"
    )


def one(path: str) -> None:
    sys.path.insert(0, os.path.dirname(HERE))
    from mdgateway.message.decompose import decompose

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        result = decompose(path, os.path.join(work, "parts"))
        elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{elapsed:.3f} {peak // 1024} {(peak - before) // 1024} {len(result.parts)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=float, default=18.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one)
        return
    size = int(args.size_mib * 1024 * 1024)
    print(f"attachment of {args.size_mib} MiB (base64 in the message)")
    header = ("structure", "median s", "peak MiB", "added MiB", "parts")
    print(f"{header[0]:<12}{header[1]:>10}{header[2]:>10}{header[3]:>11}{header[4]:>7}")
    with tempfile.TemporaryDirectory() as work:
        for ambiguous in (False, True):
            path = os.path.join(work, "message.eml")
            with open(path, "wb") as f:
                f.write(message(size, ambiguous))
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, __file__, "--one", path],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.split()
                runs.append(out)
            name = "ambiguous" if ambiguous else "trusted"
            seconds = statistics.median(float(r[0]) for r in runs)
            peak = max(int(r[1]) for r in runs)
            added = max(int(r[2]) for r in runs)
            print(f"{name:<12}{seconds:>10.2f}{peak:>10}{added:>11}{runs[0][3]:>7}")


if __name__ == "__main__":
    main()
