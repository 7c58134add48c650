"""
A cluster: two gateway instances sharing one PostgreSQL store behind a real
HAProxy speaking PROXY v2, health-checked on /readyz. Mail flows through
both, a message quarantined by one instance is released through the other,
and draining one instance fails no client.
"""

from __future__ import annotations

import email.policy
import json
import os
import shutil
import smtplib
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import ETC, GatewayProcess, free_port, wait_for_port
from tests.pg import PostgresServer, postgres_server  # noqa: F401  (fixture)
from tests.test_e2e_pipeline import EICAR, wait_for
from tests.test_e2e_receive import Raw

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="HAProxy not installed"),
]

TOKEN = "cluster-test-token"


def gateway_toml(
    name: str, smtp: int, admin: int, core: int, dsn: str, downstream: int, tmp: Path
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
[store]
location = "{dsn}"
instance = "{name}"
[admin]
endpoint = "tcp:{admin}:interface=127.0.0.1"
token_file = "{tmp / "admin.token"}"
[delivery]
retry_first = "1s"
retry_max = "2s"
loop_secret_file = "{tmp / "loop.secret"}"
[drain]
grace = "2s"
timeout = "10s"
[emulator]
enabled = true
endpoint = "tcp:{core}:interface=127.0.0.1"
[profiles.core.emulator]
servers = ["http://127.0.0.1:{core}"]
poll_interval = "50ms"
[profiles.smtp.downstream]
servers = ["smtp://127.0.0.1:{downstream}"]
tls = "none"
[[rules]]
name = "inbound"
client_networks = ["127.0.0.0/8"]
core_profile = "emulator"
relay_profile = "downstream"
blocked_action = "block"
quarantine_blocked = true
"""


def haproxy_cfg(front: int, backends: list[tuple[str, int, int]]) -> str:
    servers = "\n".join(
        f"    server {name} 127.0.0.1:{smtp} check port {admin} send-proxy-v2"
        for name, smtp, admin in backends
    )
    return f"""
global
    maxconn 1000
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


class Cluster:
    def __init__(self, tmp: Path, dsn: str, downstream: int) -> None:
        self.tmp = tmp
        (tmp / "admin.token").write_text(TOKEN + "\n")
        secret = tmp / "loop.secret"
        secret.write_bytes(os.urandom(32))
        secret.chmod(0o600)
        self.front = free_port()
        self.nodes: dict[str, tuple[GatewayProcess, int, int]] = {}
        for name in ("gw1", "gw2"):
            smtp, admin, core = free_port(), free_port(), free_port()
            (tmp / name).mkdir()
            config = tmp / name / "mdgateway.toml"
            config.write_text(
                gateway_toml(name, smtp, admin, core, dsn, downstream, tmp)
            )
            gw = GatewayProcess(config, tmp / name / "gateway.log")
            gw.start(smtp)
            wait_for_port(admin)
            self.nodes[name] = (gw, smtp, admin)
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(
            haproxy_cfg(self.front, [(n, s, a) for n, (_, s, a) in self.nodes.items()])
        )
        self.haproxy = subprocess.Popen(
            ["haproxy", "-f", str(cfg), "-db"],
            stdout=open(tmp / "haproxy.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.front, proc=self.haproxy)
        # HAProxy accepts before its first health checks have found a
        # server; wait until a connection through it is greeted.
        wait_for(lambda: greeted(self.front))

    def api(
        self,
        name: str,
        path: str,
        method: str = "GET",
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        admin = self.nodes[name][2]
        request = urllib.request.Request(
            f"http://127.0.0.1:{admin}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={
                "Authorization": f"Bearer {TOKEN}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.haproxy.terminate()
        self.haproxy.wait(10)
        for gw, _, _ in self.nodes.values():
            gw.kill()


@pytest.fixture
def cluster(
    tmp_path: Path,
    postgres_server: PostgresServer,  # noqa: F811
    smtpd: Callable[..., _Controller],
) -> Iterator[tuple[Cluster, RecordingHandler]]:
    handler = RecordingHandler()
    downstream = smtpd(handler)
    dsn = postgres_server.create_database("cluster")
    c = Cluster(tmp_path, dsn, downstream.port)
    try:
        yield c, handler
    finally:
        c.stop()


def message(n: int, attachment: bytes | None = None) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "alice@example.com"
    m["To"] = "bob@example.org"
    m["Subject"] = f"cluster {n}"
    m["Message-ID"] = f"<cluster-{n}@test>"
    m.set_content(f"message {n}\n")
    if attachment is not None:
        m.add_attachment(
            attachment,
            maintype="application",
            subtype="octet-stream",
            filename="eicar.com",
        )
    return m


def send(port: int, m: EmailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.send_message(m)


def send_proxied(port: int, m: EmailMessage, proxy: bytes) -> None:
    """
    Straight to one instance's PROXY listener, as HAProxy would.
    """
    raw = Raw(port, proxy)
    assert raw.reply()[0] == 220
    raw.command(b"EHLO direct.test")
    assert raw.command(b"MAIL FROM:<alice@example.com>")[0] == 250
    assert raw.command(b"RCPT TO:<bob@example.org>")[0] == 250
    assert raw.command(b"DATA")[0] == 354
    data = m.as_bytes(policy=email.policy.SMTP).replace(b"\r\n.", b"\r\n..")
    code, lines = raw.command(data + b".")
    assert code == 250, lines
    raw.close()


def test_cluster(cluster: tuple[Cluster, RecordingHandler]) -> None:
    """
    Through HAProxy, mail is spread over both instances and all delivered;
    an EICAR message quarantined by gw1 is listed and released through gw2
    (delivered as the original copy); SIGTERM on gw1 while clients keep
    sending fails none of them, and after gw1 comes back every accepted
    message has been delivered once.
    """
    c, handler = cluster
    for n in range(10):
        send(c.front, message(n))
    wait_for(lambda: len(handler.messages) >= 10, timeout=60)
    page = c.api("gw2", "/api/messages?limit=100")
    instances = {item["instance"] for item in page["items"]}
    assert instances == {"gw1", "gw2"}, instances

    gw1_smtp = c.nodes["gw1"][1]
    send_proxied(
        gw1_smtp, message(99, EICAR), b"PROXY TCP4 127.0.0.5 127.0.0.1 4000 25\r\n"
    )
    items = wait_for(lambda: c.api("gw2", "/api/quarantine")["items"], timeout=30)
    (item,) = items
    assert item["message"]["instance"] == "gw1"
    before = len(handler.messages)
    released = c.api(
        "gw2", f"/api/quarantine/{item['id']}/release", "POST", {"force": True}
    )
    assert released
    wait_for(lambda: len(handler.messages) > before, timeout=30)
    original = handler.messages[-1].content
    assert b"X-Metadefender-EmailSecurity-OriginalCopy: True" in original
    assert c.api("gw2", f"/api/quarantine/{item['id']}")["released_by"]

    failures: list[str] = []
    sent: list[int] = []

    def load() -> None:
        for n in range(100, 140):
            try:
                send(c.front, message(n))
                sent.append(n)
            except Exception as e:  # noqa: BLE001
                failures.append(f"{n}: {e!r}")
            time.sleep(0.05)

    worker = threading.Thread(target=load)
    worker.start()
    wait_for(lambda: len(sent) >= 3)  # the load is flowing through both
    gw1 = c.nodes["gw1"][0]
    gw1.terminate(timeout=60)
    worker.join(120)
    assert failures == []
    assert len(sent) == 40
    gw1.start(c.nodes["gw1"][1])
    wanted = {f"cluster {n}" for n in sent}

    def delivered() -> set[str]:
        subjects = set()
        for m in handler.messages:
            for line in m.content.split(b"\r\n"):
                if line.startswith(b"Subject: cluster 1"):
                    subjects.add(line[9:].decode())
        return subjects

    wait_for(lambda: wanted <= delivered(), timeout=60)
    subjects = [
        line
        for m in handler.messages
        for line in m.content.split(b"\r\n")
        if line.startswith(b"Subject: cluster 1")
        and len(line) == len(b"Subject: cluster 100")
    ]
    assert len(subjects) == len(set(subjects)), "a message was delivered twice"


def greeted(port: int) -> bool:
    """
    Whether a connection to C{port} gets an SMTP greeting.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(512).startswith(b"220")
    except OSError:
        return False
