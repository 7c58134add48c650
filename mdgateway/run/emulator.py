# -*- test-case-name: tests.test_e2e_workers -*-
"""
C{python -m mdgateway.run.emulator}: the built-in Core emulator
(C{[emulator] enabled}) as a process of its own, started and kept alive by
the gateway.

Inside the gateway's process the emulator's Python content scan of a large
upload competed with the SMTP sessions for the interpreter lock; as its own
process it stands where a real Core stands, beside the gateway, not in it.
It logs JSON to standard output (the gateway re-publishes each event) and
exits when its standard input closes (the gateway stopping, or dying).

The gateway binds the emulator's port itself and passes the listening
socket down (C{--fd}), so a port another program holds stops the gateway's
start instead of being taken for the emulator, and a restarted emulator
serves the same socket. Run by hand, it listens on C{--endpoint}.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from functools import partial
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ServerFactory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mdgateway.emulator.app import CoreEmulator, EmulatorConfig
from mdgateway.emulator.server import BACKLOG, build_site, log_request_counts
from mdgateway.emulator.tap import warn_instant
from mdgateway.run.reactor import global_reactor
from mdgateway.run.supervisor import run_child

log = Logger()

#: Threads examining uploads (their scan is Python, so more threads would
#: only queue on the interpreter lock).
THREADS = 4


def with_backlog(endpoint: str, backlog: int = BACKLOG) -> str:
    """
    A C{tcp:}/C{tcp6:} endpoint description with a listen backlog, unless it
    names one already (Twisted's default of 50 resets connections when a
    few hundred uploads arrive at once).
    """
    kind = endpoint.split(":", 1)[0].lower()
    if kind not in ("tcp", "tcp6") or "backlog=" in endpoint:
        return endpoint
    return f"{endpoint}:backlog={backlog}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mdgateway.run.emulator")
    parser.add_argument("--endpoint", required=True, help="a Twisted server endpoint")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument(
        "--instant",
        action="store_true",
        help="a benchmark stand-in: every file clean at once, never read",
    )
    parser.add_argument(
        "--fd", type=int, help="serve this inherited listening socket instead"
    )
    args = parser.parse_args(argv)
    supervised = args.fd is not None
    if supervised:
        # Ctrl-C reaches the whole process group: the gateway stops us.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    reactor = global_reactor()
    pool = ThreadPool(minthreads=0, maxthreads=THREADS, name="mdcore-emulator")
    emulator = CoreEmulator(
        reactor,
        EmulatorConfig(latency=args.latency, instant=args.instant),
        blocking=partial(deferToThreadPool, reactor, pool),
    )
    site = build_site(emulator, access_log=False, reactor=reactor)
    status = {"code": 0}

    async def listen() -> None:
        if args.fd is not None:
            inherited = socket.socket(fileno=args.fd)
            try:
                reactor.adoptStreamPort(
                    inherited.fileno(), inherited.family, cast(ServerFactory, site)
                )
            finally:
                inherited.close()  # adoptStreamPort keeps a duplicate
        else:
            await serverFromString(reactor, with_backlog(args.endpoint)).listen(site)
        log.info(
            "MetaDefender Core emulator listening on {endpoint}",
            endpoint=args.endpoint,
            emulator_listening=True,
        )
        if args.instant:
            warn_instant()

    def failed(failure: Any) -> None:
        log.critical(
            "the Core emulator cannot listen on {endpoint}: {error}",
            endpoint=args.endpoint,
            error=failure.getErrorMessage(),
        )
        status["code"] = 1
        reactor.stop()

    def started() -> None:
        pool.start()
        Deferred.fromCoroutine(listen()).addErrback(failed)

    def stopping() -> None:
        log_request_counts(emulator)
        emulator.close()
        pool.stop()

    # Nothing to reload: SIGHUP is ignored, so it never kills the emulator.
    run_child(reactor, started, stopping, ignore_interrupt=supervised)
    return status["code"]


if __name__ == "__main__":
    sys.exit(main())
