# -*- test-case-name: tests.test_workers -*-
"""
C{python -m mdgateway.run.worker}: one worker process of a gateway with
C{[processes] workers} above 1. The primary starts it; operators never do.

It runs the same L{GatewayService} as the primary, on its own spool root,
serving the listening sockets it inherited. It logs JSON to standard
output (the primary re-publishes each event), pushes its metrics on
descriptor 3 every few seconds, answers the primary's requests (the queue
tools, for the messages of its own spool) read from standard input on
descriptor 3 too, reloads on C{SIGHUP}, and drains and exits on C{SIGTERM}
or when its standard input closes (the primary stopping, or dying).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, BinaryIO

from mdgateway.queue.tools import QueueTools, ToolRequest
from mdgateway.run.control import Answers
from mdgateway.run.supervisor import (
    METRICS_FD,
    Frames,
    WorkerRole,
    parse_listen_fds,
    run_child,
)
from mdgateway.tomlreader import ConfigError

#: Seconds between two metric snapshots sent to the primary.
METRICS_EVERY = 2.0


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C reaches the whole process group: the primary drains us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="python -m mdgateway.run.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen", default="")
    args = parser.parse_args(argv)

    from mdgateway.config import load_config
    from mdgateway.run.compose import build_gateway
    from mdgateway.run.reactor import global_reactor
    from mdgateway.run.service import GatewayService

    reactor = global_reactor()

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print("invalid configuration:\n  " + "\n  ".join(e.problems), file=sys.stderr)
        return 2
    os.umask(config.umask)
    role = WorkerRole(index=args.index, listen_fds=parse_listen_fds(args.listen))
    gateway = build_gateway(config, reactor, role=role)
    service = GatewayService(gateway)
    status = {"code": 0}

    def failed(_: object) -> None:
        status["code"] = 1

    service.ready.addErrback(failed)
    metrics_out = os.fdopen(METRICS_FD, "wb", buffering=0)

    def push_metrics() -> None:
        try:
            frame = json.dumps(gateway.metrics.snapshot()).encode()
            write_all(metrics_out, Frames.encode(frame))
        except (OSError, ValueError):
            return
        reactor.callLater(METRICS_EVERY, push_metrics)

    tools = QueueTools(gateway.queue, reactor)

    async def answer(request: dict[str, Any]) -> dict[str, Any]:
        result = await tools.run(ToolRequest.from_json(request.get("queue")))
        return result.to_json()

    answers = Answers(answer, lambda frame: write_all(metrics_out, frame))

    def started() -> None:
        service.startService()
        service.ready.addCallback(lambda _: push_metrics())

    run_child(
        reactor,
        started,
        service.stopService,
        on_hangup=service.reload,
        on_input=answers.feed,
    )
    return status["code"]


def write_all(out: BinaryIO, data: bytes) -> None:
    """
    Write every byte of C{data} to the unbuffered C{out} (a pipe may take
    part of a large frame at a time).
    """
    view = memoryview(data)
    while view:
        written = out.write(view)
        if not written:
            raise OSError("the pipe to the primary took nothing")
        view = view[written:]


if __name__ == "__main__":
    sys.exit(main())
