"""
Records through a store outage, end to end: the real gateway (the twistd
plugin) on a PostgreSQL store, the Core emulator, an aiosmtpd downstream,
and smtplib clients sending clean mail, EICAR and refused commands while
the PostgreSQL server is stopped for a while and started again.

Afterwards the database holds exactly what happened: a history entry for
every accepted message and no other, every blocked original in the
quarantine, every refusal counted in the refused log, nothing twice.

The outage lasts C{MDGATEWAY_OUTAGE_SECONDS} (default 60).
"""

from __future__ import annotations

import email.policy
import json
import os
import re
import signal
import smtplib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import GatewayProcess, free_port, wait_for_port
from tests.pg import PostgresServer, _server_account, find_bindir, unavailable
from tests.test_e2e_pipeline import EICAR, wait_for

OUTAGE = float(os.environ.get("MDGATEWAY_OUTAGE_SECONDS", "60"))

pytestmark = pytest.mark.timeout(240 + 2 * OUTAGE)

TOKEN = "records-test-token"


@pytest.fixture
def pg() -> Iterator[PostgresServer]:
    """
    A PostgreSQL server of this test's own, so stopping it disturbs no
    other test.
    """
    bindir = find_bindir()
    if bindir is None:
        unavailable("no PostgreSQL server binaries")
        raise AssertionError("unreachable")
    server = PostgresServer(bindir, _server_account())
    try:
        server.start()
        yield server
    finally:
        server.stop()


def gateway_toml(
    tmp: Path, smtp: int, admin: int, core: int, dsn: str, down: int
) -> str:
    return f"""
sender_helo_domain = "gw.test"
[[listeners]]
name = "smtp"
endpoint = "tcp:{smtp}:interface=127.0.0.1"
[spool]
directory = "{tmp / "spool"}"
[store]
location = "{dsn}"
instance = "gw"
[admin]
endpoint = "tcp:{admin}:interface=127.0.0.1"
token_file = "{tmp / "admin.token"}"
[delivery]
retry_first = "1s"
retry_max = "2s"
[emulator]
enabled = true
endpoint = "tcp:{core}:interface=127.0.0.1"
[profiles.core.emulator]
servers = ["http://127.0.0.1:{core}"]
poll_interval = "50ms"
[profiles.smtp.downstream]
servers = ["smtp://127.0.0.1:{down}"]
tls = "none"
[[rules]]
name = "inbound"
client_networks = ["127.0.0.0/8"]
core_profile = "emulator"
relay_profile = "downstream"
blocked_action = "block"
quarantine_blocked = true
"""


class Load:
    """
    Clients sending until stopped: per round one connection that is
    refused a too-big SIZE (552) and an unknown command (502), then sends
    one message (every fifth with EICAR attached); what was accepted is
    kept by queue id.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.clean: set[str] = set()
        self.eicar: set[str] = set()
        self.refused = {"too_big": 0, "syntax": 0}
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.n = 0

    def message(self, n: int, infected: bool) -> bytes:
        m = EmailMessage()
        m["From"] = "alice@example.com"
        m["To"] = "bob@example.org"
        m["Subject"] = f"outage {n}"
        m["Message-ID"] = f"<outage-{n}@test>"
        m.set_content(f"message {n}\n")
        if infected:
            m.add_attachment(
                EICAR, maintype="application", subtype="octet-stream", filename="e.com"
            )
        return m.as_bytes(policy=email.policy.SMTP)

    def round(self) -> None:
        with self.lock:
            self.n += 1
            n = self.n
        infected = n % 5 == 0
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.ehlo("load.test")
            code, _ = client.docmd("MAIL FROM:<alice@example.com> SIZE=999999999999")
            assert code == 552, code
            code, _ = client.docmd("FROB")
            assert code == 502, code
            with self.lock:
                self.refused["too_big"] += 1
                self.refused["syntax"] += 1
            client.mail("alice@example.com")
            client.rcpt("bob@example.org")
            code, reply = client.data(self.message(n, infected))
            assert code == 250, (code, reply)
            found = re.search(rb"queued as (\S+)", reply)
            assert found is not None, reply
            queue_id = found.group(1).decode()
        with self.lock:
            (self.eicar if infected else self.clean).add(queue_id)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.round()
            except Exception as e:  # noqa: BLE001 (reported by the test)
                self.failures.append(repr(e))
                time.sleep(0.2)


def api(admin: int, path: str) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin}{path}",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        body = e.read()
    if path == "/metrics":
        return body.decode()
    return json.loads(body)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return list(conn.execute(query).fetchall())


def test_store_outage_under_load_loses_and_doubles_nothing(
    tmp_path: Path,
    pg: PostgresServer,
    smtpd: Callable[..., _Controller],
) -> None:
    """
    With PostgreSQL stopped under load and started again, every accepted
    message has exactly one history entry with its final status and
    verdict (delivered and Allowed, or quarantined and Blocked), every
    blocked original is in the quarantine whole, the refused log accounts
    for every refusal sent (summary rows included), no timeline line is
    doubled, the downstream got each clean message once, and meanwhile the
    records waited on disk (visible in /readyz and /metrics) while the
    instance stayed ready.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    dsn = pg.create_database("outage")
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    smtp, admin, core = free_port(), free_port(), free_port()
    config = tmp_path / "mdgateway.toml"
    config.write_text(gateway_toml(tmp_path, smtp, admin, core, dsn, downstream.port))
    gw = GatewayProcess(config, tmp_path / "gateway.log")
    gw.start(smtp)
    load = Load(smtp)
    threads = [threading.Thread(target=load.run) for _ in range(2)]
    try:
        wait_for_port(admin)
        for thread in threads:
            thread.start()
        wait_for(lambda: len(handler.messages) >= 5, timeout=60)

        pg.pause()
        outage_ends = time.monotonic() + OUTAGE
        seen_waiting = False
        while time.monotonic() < outage_ends:
            ready = api(admin, "/readyz")
            outbox = ready["details"]["outbox"]
            if outbox["store_reachable"] is False and outbox["depth"] > 0:
                seen_waiting = True
                assert ready["ready"], ready
            time.sleep(1)
        accepted_in_outage = len(load.clean) + len(load.eicar)
        pg.resume()
        time.sleep(3)
        load.stopping.set()
        for thread in threads:
            thread.join(60)
        assert seen_waiting, "the records never waited on disk during the outage"
        assert load.failures == [], load.failures[:5]
        accepted = load.clean | load.eicar
        assert accepted_in_outage > 10
        assert load.eicar

        wait_for(lambda: api(admin, "/api/queue")["total"] == 0, timeout=120)
        wait_for(
            lambda: metric(api(admin, "/metrics"), "mdgateway_outbox_depth") == 0,
            timeout=60,
        )
        scraped = api(admin, "/metrics")
        counted = {
            category: metric(scraped, "mdgateway_smtp_refused_total", reason=category)
            for category in load.refused
        }
        assert counted == {k: float(v) for k, v in load.refused.items()}
    finally:
        load.stopping.set()
        status = gw.terminate(60)
    assert status in (0, -signal.SIGTERM), gw.log_text()[-3000:]
    outbox_left = [
        n for n in os.listdir(tmp_path / "spool" / "outbox") if n.endswith(".jsonl")
    ]
    assert outbox_left == []

    history = {
        queue_id: (status, verdict)
        for queue_id, status, verdict in rows(
            dsn, "SELECT queue_id, status, verdict FROM messages"
        )
    }
    assert set(history) == accepted
    assert len(rows(dsn, "SELECT id FROM messages")) == len(accepted)
    for queue_id in load.clean:
        assert history[queue_id] == ("delivered", "Allowed"), queue_id
    for queue_id in load.eicar:
        assert history[queue_id] == ("quarantined", "Blocked"), queue_id

    items = rows(
        dsn,
        "SELECT m.queue_id, q.size, m.size, q.sha256, "
        "(SELECT COUNT(*) FROM quarantine_chunks c WHERE c.item_id = q.id) "
        "FROM quarantine q JOIN messages m ON m.id = q.message_id",
    )
    assert sorted(i[0] for i in items) == sorted(load.eicar)
    for _, stored, spooled, sha256, chunks in items:
        assert stored == spooled and len(sha256) == 64 and chunks >= 1

    doubled = rows(
        dsn,
        "SELECT message_id, at, text, COUNT(*) FROM message_events "
        "GROUP BY message_id, at, text HAVING COUNT(*) > 1",
    )
    assert doubled == []
    received_lines = rows(
        dsn,
        "SELECT message_id, COUNT(*) FROM message_events "
        "WHERE text LIKE 'received from%' GROUP BY message_id",
    )
    assert {count for _, count in received_lines} == {1}
    attempts = rows(
        dsn,
        "SELECT DISTINCT r.attempts FROM message_recipients r "
        "JOIN messages m ON m.id = r.message_id WHERE m.status = 'delivered'",
    )
    assert attempts == [(1,)]

    refused = dict(
        rows(dsn, "SELECT category, SUM(repeats) FROM refusals GROUP BY category")
    )
    # The harness's own probe of the SMTP port while the gateway started got
    # "421 4.3.2 Service starting" (category not_ready), recorded like any
    # refusal; every other refusal is one the load was answered with.
    assert int(refused.pop("not_ready", 0)) <= 1
    assert {k: int(v) for k, v in refused.items()} == load.refused

    delivered_ids = [m.content.split(b"Message-ID: ")[1][:20] for m in handler.messages]
    assert len(handler.messages) == len(load.clean)
    assert len(set(delivered_ids)) == len(delivered_ids)
