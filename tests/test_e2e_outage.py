"""
End to end: a shared Core server goes down behind HAProxy. Two gateway
instances (the plugin as subprocesses) scan with one Core (the emulator, run
by the test as a separate service) and relay to one downstream server.

When Core or the relay is down, no instance turns unready (they would all
turn red together and HAProxy would close every client's connection);
clients get a clear C{451 4.3.2} at RCPT instead, the outage shows in
C{/readyz}'s details, C{/api/health} and the metrics, and mail flows again
when Core comes back.
"""

from __future__ import annotations

import itertools
import json
import shutil
import smtplib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import (
    ETC,
    REPO,
    GatewayProcess,
    environment,
    free_port,
    wait_for_port,
)

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="HAProxy not installed"),
]

TOKEN = "outage-test-token"
MESSAGE = b"From: a@example.com\r\nTo: bob@example.org\r\nSubject: o\r\n\r\nhi\r\n"
_SENT = itertools.count()


def gateway_toml(
    tmp: Path, name: str, smtp: int, admin: int, core: int, relay: int
) -> str:
    return f"""
sender_helo_domain = "{name}.test"
[[listeners]]
name = "smtp"
endpoint = "tcp:{smtp}:interface=127.0.0.1"
tls = "starttls"
proxy_protocol = true
trusted_proxies = ["127.0.0.1/32"]
[tls]
certificate = "{ETC / "tls" / "localhost.crt"}"
key = "{ETC / "tls" / "localhost.key"}"
[spool]
directory = "{tmp / name / "spool"}"
[admin]
endpoint = "tcp:{admin}:interface=127.0.0.1"
token_file = "{tmp / "admin.token"}"
[delivery]
retry_first = "1s"
retry_max = "1s"
[profiles.core.shared]
servers = ["http://127.0.0.1:{core}"]
failure_threshold = 1
retry_after = "1s"
poll_interval = "50ms"
[profiles.smtp.downstream]
servers = ["smtp://127.0.0.1:{relay}"]
tls = "none"
[[rules]]
name = "inbound"
client_networks = ["127.0.0.0/8"]
core_profile = "shared"
relay_profile = "downstream"
"""


class Core:
    """
    The shared Core: the emulator as a service of its own, stopped and
    started by the test.
    """

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mdgateway.run.emulator",
                "--endpoint",
                f"tcp:{self.port}:interface=127.0.0.1",
            ],
            stdin=subprocess.PIPE,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            env=environment(),
            cwd=str(REPO),
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def get(admin: int, path: str, token: bool = True) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metric(admin: int, name: str) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin}/metrics",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return "\n".join(line for line in lines if line.startswith(name))


def rcpt(front: int) -> tuple[int, bytes]:
    """
    Through HAProxy: the greeting must come (never a closed connection),
    then the RCPT answer.
    """
    with smtplib.SMTP(
        "127.0.0.1", front, local_hostname="client.test", timeout=15
    ) as c:
        c.ehlo()
        assert c.mail("a@example.com")[0] == 250
        code, text = c.rcpt("bob@example.org")
        if code == 250:
            # A body of its own: identical content would be answered from
            # the verdict cache without asking Core at all.
            c.data(MESSAGE + f"message {next(_SENT)}\r\n".encode())
        return code, text


def until(probe: Callable[[], Any], timeout: float = 60.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(every)


@pytest.fixture
def setup(
    tmp_path: Path,
) -> Iterator[tuple[int, list[int], Core, RecordingHandler, _Controller]]:
    handler = RecordingHandler()
    downstream = _Controller(handler, hostname="127.0.0.1", port=0)
    downstream.start()
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    core = Core(free_port(), tmp_path / "core.log")
    core.start()
    gateways: list[GatewayProcess] = []
    backends = []
    for name in ("gw1", "gw2"):
        smtp, admin = free_port(), free_port()
        (tmp_path / name).mkdir()
        config = tmp_path / name / "mdgateway.toml"
        config.write_text(
            gateway_toml(tmp_path, name, smtp, admin, core.port, downstream.port)
        )
        gw = GatewayProcess(config, tmp_path / name / "gateway.log")
        gw.start()
        gw.wait_ready()
        gateways.append(gw)
        backends.append((name, smtp, admin))
    front = free_port()
    servers = "\n".join(
        f"    server {n} 127.0.0.1:{s} check port {a} send-proxy-v2"
        for n, s, a in backends
    )
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        f"""
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend smtp_in
    bind 127.0.0.1:{front}
    default_backend gateways
backend gateways
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 300ms fall 1 rise 1
{servers}
"""
    )
    haproxy = subprocess.Popen(
        ["haproxy", "-f", str(cfg), "-db"],
        stdout=open(tmp_path / "haproxy.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(front, proc=haproxy)
        yield front, [a for _, _, a in backends], core, handler, downstream
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        for gw in gateways:
            gw.kill()
        core.stop()
        with suppress(AssertionError):  # the relay test stops it itself
            downstream.stop()


def test_shared_core_outage(
    setup: tuple[int, list[int], Core, RecordingHandler, _Controller],
) -> None:
    """
    Core down: both instances stay ready (200) while their details say the
    Core profile is unreachable; clients through HAProxy get their greeting
    and C{451 4.3.2 Scanning service unavailable: not reachable} at RCPT.
    Core back: RCPT is accepted again and everything sent is delivered.
    """
    front, admins, core, handler, _ = setup
    until(lambda: all(get(a, "/readyz", token=False)[0] == 200 for a in admins))
    assert rcpt(front)[0] == 250
    until(lambda: len(handler.messages) == 1)

    core.stop()
    stopped_at = time.monotonic()
    answers: list[tuple[int, bytes]] = []

    def refused_everywhere() -> bool:
        for admin in admins:
            code, body = get(admin, "/readyz", token=False)
            assert code == 200, body
        answers.append(rcpt(front))
        # Two refusals in a row: both instances (round robin) know.
        return [code for code, _ in answers[-2:]] == [451, 451]

    until(refused_everywhere, every=0.2)
    noticed = time.monotonic() - stopped_at
    assert answers[-1] == (
        451,
        b"4.3.2 Scanning service unavailable: not reachable, try again later",
    )
    for admin in admins:
        code, body = get(admin, "/readyz", token=False)
        assert code == 200 and body["ready"] is True
        assert body["dependencies"]["core"] == {"shared": False}
        assert body["dependencies"]["relay"] == {"downstream": True}
        _, health = get(admin, "/api/health")
        core_state = health["dependencies"]["core"]["shared"]
        assert core_state["condition"] == "core_unreachable"
        assert core_state["servers"][0]["up"] is False
        assert 'mdgateway_core_servers_up{profile="shared"} 0.0' in metric(
            admin, "mdgateway_core_servers_up"
        )

    accepted = sum(1 for code, _ in answers if code == 250)
    core.start()
    restarted_at = time.monotonic()
    until(lambda: rcpt(front)[0] == 250, every=0.2)
    recovered = time.monotonic() - restarted_at
    until(lambda: len(handler.messages) == 2 + accepted)
    print(f"noticed in {noticed:.1f}s, recovered in {recovered:.1f}s")


def test_relay_outage_keeps_instances_ready(
    setup: tuple[int, list[int], Core, RecordingHandler, _Controller],
) -> None:
    """
    The relay down: mail is still accepted (it waits in the spool), both
    instances stay ready, and the relay's state shows in C{/readyz}'s
    details, C{/api/health} and C{mdgateway_relay_up}; the relay back, the
    waiting mail is delivered.
    """
    front, admins, _, handler, downstream = setup
    downstream.stop()
    for _ in range(4):
        assert rcpt(front)[0] == 250

    def relay_down_everywhere() -> bool:
        return all(
            get(a, "/readyz", token=False)[1]["dependencies"]["relay"]
            == {"downstream": False}
            for a in admins
        )

    until(relay_down_everywhere)
    for admin in admins:
        code, body = get(admin, "/readyz", token=False)
        assert code == 200 and body["ready"] is True
        _, health = get(admin, "/api/health")
        assert health["dependencies"]["relay"]["downstream"]["healthy"] is False
        assert health["dependencies"]["store"]["ok"] is True
        assert 'mdgateway_relay_up{profile="downstream"} 0.0' in metric(
            admin, "mdgateway_relay_up"
        )
    again = _Controller(handler, hostname="127.0.0.1", port=downstream.port)
    again.start()
    try:
        until(lambda: len(handler.messages) == 4)
    finally:
        again.stop()
