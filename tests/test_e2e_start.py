"""
End to end: the gateway starts all or nothing, and stops in order. The
plugin runs as a subprocess (C{python -m twisted mdgateway}); the tests
hold ports and locks the way another program would.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.gatewayproc import (
    REPO,
    GatewayProcess,
    default_toml,
    environment,
    free_port,
    log_events,
)

pytestmark = pytest.mark.timeout(120)

MESSAGE = b"From: a@example.com\r\nTo: r@example.org\r\nSubject: s\r\n\r\nhi\r\n"

#: No predecessor drains in these tests: do not wait long for a busy port.
FAST = '[drain]\ntimeout = "0s"\n'


@contextmanager
def held_port() -> Iterator[tuple[socket.socket, int]]:
    """
    A port another program listens on.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


def run_until_exit(tmp_path: Path, toml: str, timeout: float = 60) -> tuple[int, str]:
    """
    Start the gateway on C{toml} and wait for it to exit; its status and
    everything it wrote (log and standard streams).
    """
    config = tmp_path / "mdgateway.toml"
    config.write_text(toml)
    gw = GatewayProcess(config, tmp_path / "gateway.log")
    gw.start()
    assert gw.proc is not None
    status = gw.proc.wait(timeout)
    return status, gw.log_text()


def failed_start(output: str) -> str:
    """
    The one critical line of a start that failed once the reactor ran.
    """
    critical = [e for e in log_events(output) if e["level"] == "critical"]
    assert len(critical) == 1, critical
    assert critical[0]["msg"].startswith("mdgateway failed to start: ")
    return str(critical[0]["msg"])


def test_listener_address_not_available(tmp_path: Path) -> None:
    """
    A listener address the host does not have stops the start before the
    reactor runs: exit status 1 and one line on standard error naming the
    listener, its key and the reason; no traceback.
    """
    port = free_port()
    toml = default_toml(port, tmp_path / "spool").replace(
        "interface=127.0.0.1", "interface=192.0.2.1"
    )
    status, output = run_until_exit(tmp_path, toml)
    assert status == 1
    expected = (
        "mdgateway: cannot start: listeners[0].endpoint (smtp): cannot listen "
        f"on tcp:{port}:interface=192.0.2.1: Cannot assign requested address"
    )
    assert expected in output.splitlines(), output
    assert "Traceback" not in output


def test_listener_port_held_by_another_program(tmp_path: Path) -> None:
    """
    A listener port another program holds is waited for (a predecessor's
    workers may hold it while they drain: drain timeout + 5 s), then stops
    the start: exit status 1, one critical line naming the listener, its
    key and the reason, and no traceback.
    """
    with held_port() as (_, port):
        toml = default_toml(port, tmp_path / "spool", extra=FAST)
        status, output = run_until_exit(tmp_path, toml)
    assert status == 1
    assert failed_start(output) == (
        "mdgateway failed to start: listeners[0].endpoint (smtp): cannot listen "
        f"on tcp:{port}:interface=127.0.0.1: Address already in use (still, "
        "after 5s)"
    )
    assert "Traceback" not in output


def test_admin_endpoint_that_cannot_bind(tmp_path: Path) -> None:
    """
    An admin port another program holds stops the start before the reactor
    runs (no predecessor keeps it), and the SMTP listener bound before it
    is released (nothing half-starts).
    """
    smtp = free_port()
    with held_port() as (_, admin):
        extra = f'[admin]\nendpoint = "tcp:{admin}:interface=127.0.0.1"\n'
        toml = default_toml(smtp, tmp_path / "spool", extra=extra)
        status, output = run_until_exit(tmp_path, toml)
    assert status == 1
    assert (
        f"mdgateway: cannot start: admin.endpoint: cannot listen on "
        f"tcp:{admin}:interface=127.0.0.1: Address already in use" in output
    ), output
    assert "Traceback" not in output
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", smtp), timeout=2).close()


def test_emulator_port_held_by_another_program(tmp_path: Path) -> None:
    """
    With the built-in emulator on, a port another program holds stops the
    start with one critical line naming C{emulator.endpoint}; the other
    program never gets a connection (no message part is ever sent to it).
    """
    smtp = free_port()
    with held_port() as (impostor, core):
        extra = (
            f'[emulator]\nenabled = true\nendpoint = "tcp:{core}:interface=127.0.0.1"\n'
        )
        toml = default_toml(
            smtp, tmp_path / "spool", extra=extra, core_url=f"http://127.0.0.1:{core}"
        )
        status, output = run_until_exit(tmp_path, toml)
        with pytest.raises(BlockingIOError):
            impostor.accept()
    assert status == 1
    assert failed_start(output) == (
        "mdgateway failed to start: emulator.endpoint: cannot listen on "
        f"tcp:{core}:interface=127.0.0.1: Address already in use "
        "(another program holds it)"
    )
    assert "Traceback" not in output


def test_failure_after_the_reactor_runs_exits_nonzero(tmp_path: Path) -> None:
    """
    A start that fails later (here: another process holds the spool's lock)
    is logged once at critical, the gateway stops in order and exits with
    status 1, its log complete.
    """
    spool = tmp_path / "spool"
    spool.mkdir()
    with open(spool / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status, output = run_until_exit(tmp_path, default_toml(free_port(), spool))
    assert status == 1
    line = failed_start(output)
    assert "spool directory" in line and "in use by another process" in line
    assert stopped(log_events(output))


def stopped(events: list[dict[str, Any]]) -> bool:
    """
    Whether the primary logged the end of its orderly stop.
    """
    return any(
        e["msg"] == "stopped"
        and e["logger"] == "mdgateway.run.service"
        and "worker" not in e
        for e in events
    )


def start_in_own_group(
    tmp_path: Path, toml: str
) -> tuple[subprocess.Popen[bytes], Path]:
    config = tmp_path / "mdgateway.toml"
    config.write_text(toml)
    log = tmp_path / "gateway.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twisted",
            f"--log-file={log}",
            "mdgateway",
            "--config",
            str(config),
        ],
        env=environment(),
        cwd=str(REPO),
        start_new_session=True,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not any(e.get("gateway_ready") for e in log_events(log)):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, log


@pytest.mark.parametrize("how", ["sigterm-primary", "ctrl-c-group"])
def test_orderly_stop_logs_no_critical(tmp_path: Path, how: str) -> None:
    """
    With the emulator and a worker running, SIGTERM to the primary, or
    SIGINT to the whole process group (Ctrl-C in a terminal), stops every
    process in order: no line at critical (no child "exited unexpectedly"),
    no restart, and every child gone.
    """
    smtp, core = free_port(), free_port()
    extra = (
        f'[emulator]\nenabled = true\nendpoint = "tcp:{core}:interface=127.0.0.1"\n'
        "[processes]\nworkers = 2\n"
    )
    toml = default_toml(
        smtp, tmp_path / "spool", extra=extra, core_url=f"http://127.0.0.1:{core}"
    )
    proc, log = start_in_own_group(tmp_path, toml)
    pgid = os.getpgid(proc.pid)
    with smtplib.SMTP("127.0.0.1", smtp, local_hostname="stop.test") as client:
        client.sendmail("a@example.com", ["r@example.org"], MESSAGE)
    if how == "sigterm-primary":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(pgid, signal.SIGINT)
    proc.wait(60)
    events = log_events(log)
    assert [e for e in events if e["level"] == "critical"] == []
    assert not [e for e in events if "exited unexpectedly" in e["msg"]]
    assert stopped(events)
    with pytest.raises(ProcessLookupError):
        # Every process of the group has exited.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.1)


def test_logs_are_json_lines(tmp_path: Path) -> None:
    """
    Every line of the default log is one JSON object with RFC 3339 C{time},
    C{level}, C{logger} and the rendered C{msg}, no RS (0x1E) and none of
    Twisted's internal fields; the emulator's and workers' events come
    through the primary in the same shape, marked with their process.
    """
    smtp, core = free_port(), free_port()
    extra = (
        f'[emulator]\nenabled = true\nendpoint = "tcp:{core}:interface=127.0.0.1"\n'
        "[processes]\nworkers = 2\n"
    )
    toml = default_toml(
        smtp, tmp_path / "spool", extra=extra, core_url=f"http://127.0.0.1:{core}"
    )
    proc, log = start_in_own_group(tmp_path, toml)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    text = log.read_text()
    assert "\x1e" not in text
    records = [json.loads(line) for line in text.splitlines()]
    for record in records:
        assert list(record)[:4] == ["time", "level", "logger", "msg"], record
        assert record["time"].endswith("Z") and "T" in record["time"]
        assert not [k for k in record if k.startswith("log_")], record
    emulator = [r for r in records if r.get("process") == "emulator"]
    assert any(
        r["msg"].startswith("MetaDefender Core emulator listening") for r in emulator
    )
    assert any(r.get("worker") == 1 for r in records)
