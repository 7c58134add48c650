"""
systemd integration: C{sd_notify} readiness over a fake notification socket
(unit and with the plugin as a subprocess), the reload the unit's
C{ExecReload} runs, and the unit's exposure score.
"""

from __future__ import annotations

import array
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.run.notify import SystemdNotifier
from tests.gatewayproc import (
    ETC,
    REPO,
    GatewayProcess,
    default_toml,
    environment,
    free_port,
)


class NotifySocket:
    """
    A stand-in for systemd's notification socket: a datagram socket that
    receives each message with the sender's process id.
    """

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[int, dict[str, str]]] = []

    def receive(self) -> list[tuple[int, dict[str, str]]]:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(struct.calcsize("3i"))
                )
            except TimeoutError:
                return self.messages
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", payload[: struct.calcsize("3i")])[0]
            lines = data.decode().splitlines()
            self.messages.append((pid, dict(line.split("=", 1) for line in lines)))

    def wait_for(
        self, key: str, after: int = 0, timeout: float = 30.0
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, fields in self.receive()[after:]:
                if key in fields:
                    return fields
        raise AssertionError(f"no {key} from the gateway")

    def close(self) -> None:
        self.sock.close()


class NotifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        self.path = str(folder / "notify")
        self.systemd = NotifySocket(self.path)
        self.addCleanup(self.systemd.close)

    def test_from_environment_takes_the_variable(self) -> None:
        """
        The notifier is made from C{$NOTIFY_SOCKET}, which is removed so no
        child process speaks for the service; without it there is none.
        """
        environ = {"NOTIFY_SOCKET": self.path, "OTHER": "x"}
        notifier = SystemdNotifier.from_environment(environ)
        self.assertIsNotNone(notifier)
        self.assertEqual(environ, {"OTHER": "x"})
        self.assertIsNone(SystemdNotifier.from_environment({}))

    def test_messages(self) -> None:
        """
        Ready, reloading (with the monotonic time systemd asks for) and
        stopping arrive as C{KEY=value} lines, each with a status.
        """
        notifier = SystemdNotifier(self.path, monotonic=lambda: 12.5)
        self.assertTrue(notifier.ready("ready: config abc"))
        self.assertTrue(notifier.reloading())
        self.assertTrue(notifier.stopping())
        got = [fields for _, fields in self.systemd.receive()]
        self.assertEqual(
            got,
            [
                {"READY": "1", "STATUS": "ready: config abc"},
                {
                    "RELOADING": "1",
                    "MONOTONIC_USEC": "12500000",
                    "STATUS": "reloading the configuration",
                },
                {"STOPPING": "1", "STATUS": "draining"},
            ],
        )
        self.assertEqual({pid for pid, _ in self.systemd.messages}, {os.getpid()})

    def test_abstract_socket(self) -> None:
        """
        An address starting with C{@} is an abstract socket.
        """
        name = f"mdgateway-test-{os.getpid()}"
        abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        abstract.bind("\0" + name)
        self.addCleanup(abstract.close)
        self.assertTrue(SystemdNotifier("@" + name).ready("ok"))
        self.assertEqual(abstract.recv(100), b"READY=1\nSTATUS=ok")

    def test_unreachable_socket_is_logged_once(self) -> None:
        """
        A socket that cannot be reached costs a warning, once, and never an
        exception.
        """
        notifier = SystemdNotifier(self.path + ".missing")
        with capturedLogs() as events:
            self.assertFalse(notifier.ready("x"))
            self.assertFalse(notifier.stopping())
        self.assertEqual(len(events), 1)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    systemd = NotifySocket(str(tmp_path / "notify"))
    yield systemd
    systemd.close()


def mdgateway(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """
    The C{mdgateway} command as the unit's C{ExecReload} runs it.
    """
    return subprocess.run(
        [sys.executable, "-m", "mdgateway.ops.cli", "--config", str(config), *argv],
        capture_output=True,
        text=True,
        env=environment(),
        cwd=str(REPO),
        timeout=60,
    )


@pytest.mark.timeout(120)
def test_plugin_notifies_systemd(tmp_path: Path, notify_socket: NotifySocket) -> None:
    """
    Run with C{$NOTIFY_SOCKET} (C{Type=notify}), the gateway (and only its
    primary, not its worker) says READY=1 once it serves; C{mdgateway
    reload} (the unit's C{ExecReload}) exits 0 for a good file and 1 with
    the problems for a bad one, each time with RELOADING=1 then READY=1;
    SIGTERM says STOPPING=1.
    """
    port, admin = free_port(), free_port()
    extra = (
        f'[admin]\nendpoint = "tcp:{admin}:interface=127.0.0.1"\n'
        f'token_file = "{tmp_path / "admin.token"}"\n'
        "[processes]\nworkers = 2\n"
    )
    toml = default_toml(port, tmp_path / "spool", extra=extra)
    config = tmp_path / "mdgateway.toml"
    config.write_text(toml)
    env = environment()
    env["NOTIFY_SOCKET"] = notify_socket.sock.getsockname()
    gw = GatewayProcess(config, tmp_path / "gateway.log")
    log = open(gw.log_path, "ab")
    gw.proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twisted",
            f"--log-file={gw.log_path}",
            "mdgateway",
            "--config",
            str(config),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(REPO),
    )
    log.close()
    try:
        ready = notify_socket.wait_for("READY")
        assert ready["STATUS"].startswith("ready: config ")
        gw.wait_ready()
        seen = len(notify_socket.receive())
        config.write_text(toml + "\n# a comment changes the version\n")
        result = mdgateway(config, "reload")
        assert (result.returncode, result.stdout) == (0, "configuration reloaded\n")
        assert "RELOADING" in notify_socket.wait_for("RELOADING", after=seen)
        assert "reload loaded" in notify_socket.wait_for("READY", after=seen)["STATUS"]
        seen = len(notify_socket.receive())
        config.write_text(toml.replace('name = "local"', 'name = "local"\nbogus = 1'))
        result = mdgateway(config, "reload")
        assert result.returncode == 1
        assert "configuration NOT reloaded" in result.stdout
        assert "rules[0].bogus" in result.stdout
        refused = notify_socket.wait_for("READY", after=seen)
        assert "reload refused" in refused["STATUS"]
        gw.proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING")
        gw.proc.wait(60)
    finally:
        gw.kill()
    senders = {pid for pid, _ in notify_socket.receive()}
    assert senders == {gw.proc.pid}


UNIT = ETC / "mdgateway.service"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)
def test_unit_exposure() -> None:
    """
    C{systemd-analyze security} rates the shipped unit 2.5 or lower.
    """
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    last = [line for line in result.stdout.splitlines() if "Overall exposure" in line]
    assert last, result.stdout + result.stderr
    score = float(last[-1].split(":")[1].split()[0])
    assert score <= 2.5, last[-1]


def test_unit_runs_what_exists() -> None:
    """
    The unit's ExecStart runs the plugin with the default configuration
    path, is Type=notify, and its ExecReload is the admin API's reload (not
    a signal that cannot fail).
    """
    text = UNIT.read_text()
    assert "Type=notify" in text
    assert (
        "ExecStart=/opt/mdgateway/venv/bin/twist mdgateway "
        "--config /etc/mdgateway/mdgateway.toml" in text
    )
    assert "ExecReload=/opt/mdgateway/venv/bin/mdgateway --config " in text
    assert "ExecReload=/bin/kill" not in text.replace("use: ExecReload=/bin/kill", "")
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in text
    assert "UMask=0027" in text and "StateDirectory=mdgateway" in text
    sysusers = (ETC / "mdgateway.sysusers").read_text()
    assert any(line.split()[:2] == ["u", "mdgateway"] for line in sysusers.splitlines())
