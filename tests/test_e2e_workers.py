"""
End to end: the gateway with C{[processes] workers = 2} (the twist plugin as
a subprocess, which starts its worker itself) sharing one listener, each
process with a spool of its own; crash recovery of a worker, adoption of a
retired worker's spool, merged metrics and an orderly stop of both.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import smtplib
import socket
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.downstream import RecordingHandler
from tests.gatewayproc import GatewayProcess, free_port, running_gateway, wait_for_port
from tests.test_e2e_admin import TOKEN, admin_section, call
from tests.test_e2e_pipeline import pipeline_toml, wait_for

pytestmark = pytest.mark.timeout(120)


def send(port: int, tag: str, to: str = "r@example.org") -> str:
    message = (
        f"From: a@example.com\r\nTo: {to}\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@test>\r\n\r\nbody of {tag}\r\n"
    )
    with smtplib.SMTP("127.0.0.1", port, local_hostname="c.test", timeout=20) as s:
        s.sendmail("a@example.com", [to], message)
    return tag


def subjects(handler: RecordingHandler) -> list[str]:
    found = []
    for received in handler.messages:
        for line in received.content.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                found.append(line[9:].decode())
    return found


def events(gw: GatewayProcess, text: str) -> list[dict[str, Any]]:
    return [e for e in gw.log_events() if text in e["msg"]]


def worker_events(gw: GatewayProcess, text: str) -> list[dict[str, Any]]:
    """
    The primary's events about its workers (not the built-in emulator).
    """
    return [
        e for e in events(gw, text) if str(e.get("process", "")).startswith("worker")
    ]


def worker_pid(gw: GatewayProcess, after: int = 0) -> int:
    started = wait_for(lambda: worker_events(gw, "started (pid")[after:])
    return int(started[0]["pid"])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


@contextmanager
def stopped(gw: GatewayProcess) -> Iterator[None]:
    """
    Freeze the primary, so only the worker can accept connections, and the
    built-in Core emulator (a process of its own), so nothing is scanned
    meanwhile and what the worker accepts stays in its spool.
    """
    assert gw.proc is not None
    (emulator,) = wait_for(
        lambda: [
            e for e in events(gw, "started (pid") if e.get("process") == "emulator"
        ][-1:]
    )
    frozen = [gw.proc.pid, int(emulator["pid"])]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def workers_toml(
    tmp_path: Path, port: int, downstream: int, workers: int, extra: str = ""
) -> str:
    toml, _ = pipeline_toml(port, tmp_path, downstream)
    return toml + f"\n[processes]\nworkers = {workers}\n[drain]\ntimeout = 5\n" + extra


def metric(admin: int, name: str) -> float:
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin}/metrics",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def test_two_processes_share_the_listener(
    tmp_path: Path, smtpd: Callable[..., Any]
) -> None:
    """
    With two workers configured, the primary starts one worker that serves
    the same listening socket: while the primary is frozen the worker
    alone answers and queues in its own spool (C{workers/1}), its log
    events reach the primary's log marked C{worker: 1}, every message is
    delivered exactly once, C{/metrics} on the primary counts the messages
    of both processes, the primary's C{/api/queue} lists a message waiting
    in the worker's spool (with its worker and last error), SIGHUP to the
    primary reloads the configuration in both, and SIGTERM stops both.
    """
    handler = RecordingHandler(
        rcpt_replies={"later@example.org": "451 4.3.0 Try again later"}
    )
    downstream = smtpd(handler)
    port, admin = free_port(), free_port()
    toml = workers_toml(
        tmp_path, port, downstream.port, 2, admin_section(admin, tmp_path)
    )
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        wait_for_port(admin)
        pid = worker_pid(gw)
        wait_for(
            lambda: [e for e in events(gw, "listening on ") if e.get("worker") == 1]
        )
        sent = [send(port, f"m{n}") for n in range(10)]
        with stopped(gw):
            by_worker = [send(port, f"w{n}") for n in range(3)]
            send(port, "deferred", to="later@example.org")
            queued = list(
                (tmp_path / "spool" / "workers" / "1" / "queue").glob("*.json")
            )
            assert len(queued) >= 3
        wait_for(lambda: len(handler.messages) == 13)
        assert sorted(subjects(handler)) == sorted(sent + by_worker)
        worker_queued = [e for e in events(gw, "queued ") if e.get("worker") == 1]
        assert len(worker_queued) >= 3
        accepted = "mdgateway_smtp_messages_accepted_total"
        wait_for(lambda: metric(admin, accepted) == 14, timeout=15)
        assert metric(admin, "mdgateway_workers_running") == 1
        config = tmp_path / "mdgateway.toml"
        config.write_text(config.read_text() + "\n# changed\n")
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        loaded = " loaded from "
        wait_for(lambda: [e for e in events(gw, loaded) if e.get("worker") == 1])
        assert [e for e in events(gw, loaded) if "worker" not in e]

        def deferred_in_worker() -> list[dict[str, Any]]:
            items = json.loads(call(admin, "/api/queue")[1])["items"]
            return [i for i in items if i["worker"] == 1 and i["last_error"]]

        (waiting,) = wait_for(deferred_in_worker)
        assert waiting["last_error"].startswith("451 4.3.0")
        assert [r["address"] for r in waiting["recipients"]] == ["later@example.org"]
        assert gw.terminate(60) in (0, -signal.SIGTERM)
        wait_for(lambda: not alive(pid), timeout=30)
        assert worker_events(gw, " stopped (")
        assert not events(gw, "exited unexpectedly")


def test_killed_worker_restarts_and_retired_spool_is_adopted(
    tmp_path: Path, smtpd: Callable[..., Any]
) -> None:
    """
    A worker killed with messages in its spool is restarted by the primary
    and its successor delivers them; when the whole gateway dies with
    messages in a worker's spool and comes back with one process, the
    primary adopts that spool's messages and delivers them. Each message
    arrives exactly once.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port = free_port()
    toml = workers_toml(tmp_path, port, downstream.port, 2)
    worker_spool = tmp_path / "spool" / "workers" / "1"
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        pid = worker_pid(gw)
        with stopped(gw):
            first = [send(port, f"k{n}") for n in range(2)]
            os.kill(pid, signal.SIGKILL)
        new_pid = worker_pid(gw, after=1)
        assert new_pid != pid
        assert events(gw, "exited unexpectedly")
        wait_for(lambda: len(handler.messages) == 2)
        assert sorted(subjects(handler)) == sorted(first)
        # Delivered, then recorded, then removed: wait for the removal so
        # the count below sees only the second pair.
        wait_for(lambda: not list((worker_spool / "queue").glob("*.json")))
        with stopped(gw):
            second = [send(port, f"a{n}") for n in range(2)]
            os.kill(new_pid, signal.SIGKILL)
            gw.kill()
        assert len(list((worker_spool / "queue").glob("*.json"))) == 2
    second_run = tmp_path / "second"
    second_run.mkdir()
    toml = workers_toml(tmp_path, port, downstream.port, 1)
    with running_gateway(second_run, toml=toml, port=port) as (gw, _):
        wait_for(lambda: len(handler.messages) == 4)
        assert sorted(subjects(handler)) == sorted(first + second)
        assert not worker_spool.exists()
        assert not worker_events(gw, "started (pid")
        gw.terminate(60)


def test_counters_never_decrease_when_a_worker_is_killed(
    tmp_path: Path, smtpd: Callable[..., Any]
) -> None:
    """
    The primary's merged counters keep a killed worker's counts: the
    accepted total seen before the kill is never undercut by any scrape
    while the worker is restarted, and the successor's messages add to it.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port, admin = free_port(), free_port()
    toml = workers_toml(
        tmp_path, port, downstream.port, 2, admin_section(admin, tmp_path)
    )
    accepted = "mdgateway_smtp_messages_accepted_total"
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        wait_for_port(admin)
        pid = worker_pid(gw)
        with stopped(gw):
            by_worker = [send(port, f"w{n}") for n in range(4)]
        wait_for(lambda: len(handler.messages) == 4)
        # The worker pushes its counters every few seconds.
        wait_for(lambda: metric(admin, accepted) == 4, timeout=20)
        os.kill(pid, signal.SIGKILL)
        scraped = []
        restarted = None
        while restarted is None or len(scraped) < 20:
            scraped.append(metric(admin, accepted))
            if restarted is None and len(worker_events(gw, "started (pid")) > 1:
                restarted = worker_pid(gw, after=1)
        assert min(scraped) == 4, scraped
        with stopped(gw):
            later = [send(port, f"s{n}") for n in range(2)]
        wait_for(lambda: len(handler.messages) == 6)
        wait_for(lambda: metric(admin, accepted) == 6, timeout=20)
        assert sorted(subjects(handler)) == sorted(by_worker + later)
        gw.terminate(60)


def test_restart_waits_for_address_in_use(
    tmp_path: Path, smtpd: Callable[..., Any]
) -> None:
    """
    A gateway started while its listening address is still held (here by a
    plain socket standing in for a predecessor's draining worker) logs that
    it waits, and starts serving as soon as the address is free.
    """
    downstream = smtpd(RecordingHandler())
    port = free_port()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", port))
    blocker.listen(1)
    config = tmp_path / "mdgateway.toml"
    config.write_text(workers_toml(tmp_path, port, downstream.port, 1))
    gw = GatewayProcess(config, tmp_path / "gateway.log")
    gw.start()
    try:
        wait_for(lambda: events(gw, "is in use (a predecessor draining?)"))
        assert gw.proc is not None and gw.proc.poll() is None
        blocker.close()
        wait_for_port(port, proc=gw.proc)
        send(port, "after-wait")
        assert gw.terminate(60) in (0, -signal.SIGTERM)
    finally:
        blocker.close()
        gw.kill()


def test_worker_exits_when_primary_dies(
    tmp_path: Path, smtpd: Callable[..., Any]
) -> None:
    """
    When the primary is killed outright, its worker notices (its standard
    input closes), drains and exits instead of living on unsupervised.
    """
    downstream = smtpd(RecordingHandler())
    port = free_port()
    toml = workers_toml(tmp_path, port, downstream.port, 2)
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        pid = worker_pid(gw)
        wait_for(
            lambda: [e for e in events(gw, "listening on ") if e.get("worker") == 1]
        )
        gw.kill()
        wait_for(lambda: not alive(pid), timeout=30)


def test_builtin_emulator_is_its_own_process_and_restarted(
    tmp_path: Path, smtpd: Callable[..., Any]
) -> None:
    """
    The built-in Core emulator runs as a child process of the gateway: killed,
    it is started again, its events reach the gateway's log marked
    C{process: emulator}, and scanning works again afterwards (a message is
    scanned and delivered).
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port = free_port()
    toml = workers_toml(tmp_path, port, downstream.port, 1)
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):

        def emulator_starts() -> list[dict[str, Any]]:
            return [
                e for e in events(gw, "started (pid") if e.get("process") == "emulator"
            ]

        (first,) = wait_for(emulator_starts)
        assert gw.proc is not None and int(first["pid"]) != gw.proc.pid
        assert [
            e
            for e in events(gw, "MetaDefender Core emulator listening")
            if e.get("process") == "emulator"
        ]
        os.kill(int(first["pid"]), signal.SIGKILL)
        wait_for(lambda: len(emulator_starts()) == 2)
        assert events(gw, "exited unexpectedly")
        send(port, "after-restart")
        wait_for(lambda: subjects(handler) == ["after-restart"])
        assert b"X-Metadefender-Core-Result: Allowed" in handler.messages[0].content
