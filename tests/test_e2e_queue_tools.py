"""
End to end: the queue tools across processes and instances. Two gateways
from the twist plugin (subprocesses) share one SQLite store: C{gw1} runs
with C{[processes] workers = 2}, C{gw2} with one process. The downstream
(aiosmtpd) answers C{451} for the queued mail's recipient, so that mail
stays queued, and accepts the bounces. The real C{mdgateway} command
(C{python -m mdgateway.ops.cli}) and the admin API act on a message held
by the other instance's worker process: the request crosses the store's
notice board, then the worker's standard input.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.downstream import RecordingHandler
from tests.gatewayproc import (
    ETC,
    REPO,
    GatewayProcess,
    environment,
    free_port,
    wait_for_port,
)
from tests.test_e2e_admin import TOKEN, admin_section
from tests.test_e2e_pipeline import wait_for

pytestmark = pytest.mark.timeout(240)

#: The recipient the downstream keeps deferring.
LATER = "r@example.org"


@attrs.frozen
class Instance:
    """
    One gateway instance of the cluster and where to reach it.
    """

    name: str
    gateway: GatewayProcess
    config: Path
    port: int
    admin: int

    def cli(self, *argv: str, code: int = 0) -> str:
        """
        Run C{mdgateway --config CONFIG ARGV...}; check its exit status.
        """
        done = subprocess.run(
            [sys.executable, "-m", "mdgateway.ops.cli", "--config", str(self.config)]
            + list(argv),
            capture_output=True,
            text=True,
            env=environment(),
            cwd=str(REPO),
            timeout=60,
        )
        assert done.returncode == code, (done.stdout, done.stderr)
        return done.stdout + done.stderr

    def queue(self, *argv: str) -> list[dict[str, Any]]:
        """
        C{mdgateway --json queue list}'s items.
        """
        items: list[dict[str, Any]] = json.loads(
            self.cli("--json", "queue", "list", *argv)
        )["items"]
        return items

    def api(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """
        Call the admin API with a JSON body; the status and the JSON answer.
        """
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {TOKEN}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def instance_toml(
    folder: Path,
    name: str,
    port: int,
    admin: int,
    store: Path,
    core_port: int,
    downstream: int,
    workers: int,
    emulator: bool,
) -> str:
    """
    One instance: a listener, the admin API, the shared store, the Core
    emulator on C{core_port} (started by this instance if C{emulator}), one
    rule relaying to C{downstream}, retries an hour apart.
    """
    return f"""
sender_helo_domain = "{name}.test"
[[listeners]]
name = "smtp"
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "starttls"
[tls]
certificate = "{ETC / "tls" / "localhost.crt"}"
key = "{ETC / "tls" / "localhost.key"}"
[spool]
directory = "{folder / "spool"}"
[store]
location = "{store}"
instance = "{name}"
[processes]
workers = {workers}
[drain]
timeout = 5
[delivery]
retry_first = "1h"
retry_max = "1h"
[emulator]
enabled = {"true" if emulator else "false"}
endpoint = "tcp:{core_port}:interface=127.0.0.1"
[profiles.core.emulator]
servers = ["http://127.0.0.1:{core_port}"]
poll_interval = "50ms"
[profiles.smtp.downstream]
servers = ["smtp://127.0.0.1:{downstream}"]
tls = "none"
[[rules]]
name = "inbound"
client_networks = ["127.0.0.0/8"]
core_profile = "emulator"
relay_profile = "downstream"
{admin_section(admin, folder)}
"""


@contextmanager
def cluster(tmp_path: Path, downstream: int) -> Iterator[tuple[Instance, Instance]]:
    """
    Start C{gw1} (two processes, the emulator) and C{gw2} (one process),
    sharing C{tmp_path/shared.sqlite}; kill both at the end.
    """
    store = tmp_path / "shared.sqlite"
    core_port = free_port()
    started: list[Instance] = []
    try:
        for name, workers in (("gw1", 2), ("gw2", 1)):
            folder = tmp_path / name
            folder.mkdir()
            port, admin = free_port(), free_port()
            config = folder / "mdgateway.toml"
            config.write_text(
                instance_toml(
                    folder,
                    name,
                    port,
                    admin,
                    store,
                    core_port,
                    downstream,
                    workers,
                    emulator=name == "gw1",
                )
            )
            gateway = GatewayProcess(config, folder / "gateway.log")
            gateway.start(port)
            wait_for_port(admin)
            started.append(Instance(name, gateway, config, port, admin))
        one, two = started
        # gw1's worker listens too before anything is sent.
        wait_for(
            lambda: [
                e
                for e in one.gateway.log_events()
                if "listening on " in e["msg"] and e.get("worker") == 1
            ]
        )
        yield one, two
    finally:
        for instance in started:
            instance.gateway.kill()


def messages(gateway: GatewayProcess, text: str) -> list[str]:
    """
    The rendered log messages of C{gateway}'s processes that contain C{text}.
    """
    return [e["msg"] for e in gateway.log_events() if text in e["msg"]]


def send(port: int, sender: str, subject: str) -> None:
    message = (
        f"From: {sender}\r\nTo: {LATER}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@test>\r\n\r\nbody of {subject}\r\n"
    )
    with smtplib.SMTP("127.0.0.1", port, local_hostname="c.test", timeout=30) as s:
        s.sendmail(sender, [LATER], message)


@contextmanager
def primary_frozen(gateway: GatewayProcess) -> Iterator[None]:
    """
    Stop the primary process (SIGSTOP), so its worker alone accepts
    connections on the listener they share.
    """
    assert gateway.proc is not None
    os.kill(gateway.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(gateway.proc.pid, signal.SIGCONT)


def test_queue_tools_across_processes_and_instances(
    tmp_path: Path, smtpd: Callable[..., Any]
) -> None:
    """
    From either instance: C{mdgateway queue list} lists the messages of
    every process of every instance, naming the instance and the process;
    C{hold} and C{release-hold} (found without C{--instance} through the
    shared history) change the message where it is, and the release tries
    it at once; C{show} gives the headers and the MIME structure of a
    message held by the other instance's worker; C{flush} tries every
    instance's messages; C{delete --bounce} removes a message from the
    other instance's worker and its bounce reaches the sender; the admin
    API's hold and silent delete answer with where they acted; every
    action is in the shared audit under the token's name.
    """
    handler = RecordingHandler(rcpt_replies={LATER: "451 4.3.0 Try again later"})
    downstream = smtpd(handler)
    with cluster(tmp_path, downstream.port) as (one, two):
        with primary_frozen(one.gateway):
            send(one.port, "s1@example.com", "in-worker")
        send(two.port, "s2@example.com", "in-gw2")

        def deferred() -> list[dict[str, Any]]:
            items = one.queue()
            return items if all(i["attempts"] for i in items) else []

        # Each message was tried once (451) and waits an hour.
        items = wait_for(lambda: len(deferred()) == 2 and deferred(), timeout=60)
        assert isinstance(items, list)
        by_instance = {i["instance"]: i for i in items}
        assert set(by_instance) == {"gw1", "gw2"}
        worker_id = by_instance["gw1"]["queue_id"]
        other_id = by_instance["gw2"]["queue_id"]
        assert by_instance["gw1"]["worker"] == 1
        assert by_instance["gw2"]["worker"] == 0
        assert by_instance["gw1"]["last_error"].startswith("451 4.3.0")
        assert [i["queue_id"] for i in two.queue("--instance", "gw1")] == [worker_id]

        listing = one.cli("queue", "list")
        header, *rows = listing.splitlines()
        assert header.split()[:3] == ["INSTANCE", "PROC", "QUEUE"]
        row = {line.split()[2]: line.split()[:2] for line in rows[:-1]}
        assert row == {worker_id: ["gw1", "1"], other_id: ["gw2", "0"]}
        assert rows[-1] == "2 queued"

        # gw1 holds gw2's message; the shared history says where it is.
        held = one.cli("queue", "hold", other_id)
        assert held.strip() == f"{other_id} is on hold (by admin)"
        (entry,) = two.queue("--instance", "gw2")
        assert (entry["held_by"], entry["next_attempt"]) == ("admin", None)
        refused = one.cli("queue", "retry", other_id, code=1)
        assert "release the hold" in refused
        one.cli("queue", "release-hold", other_id)
        wait_for(lambda: two.queue("--instance", "gw2")[0]["attempts"] == 2)
        assert two.queue("--instance", "gw2")[0]["held_by"] is None

        # gw2 looks into, holds and releases the message in gw1's worker.
        shown = two.cli("queue", "show", worker_id)
        assert f"queue id:   {worker_id} (on gw1, worker 1)" in shown
        assert "sender:     s1@example.com" in shown
        assert f"recipient:  {LATER}: pending (451 4.3.0 Try again later)" in shown
        headers = shown.split("*** HEADERS ***\n")[1].split("\n\n")[0]
        assert "\tby gw1.test (mdgateway config" in headers
        assert "Subject: in-worker" in headers
        assert "Message-ID: <in-worker@test>" in headers
        structure = shown.split("*** MIME STRUCTURE ***\n")[1]
        assert structure.split()[:2] == ["1", "text/plain"]
        two.cli("queue", "hold", worker_id)
        assert one.queue("--instance", "gw1")[0]["held_by"] == "admin"
        two.cli("queue", "release-hold", worker_id, "--instance", "gw1")
        wait_for(lambda: one.queue("--instance", "gw1")[0]["attempts"] == 2)

        # A flush from gw2 tries both instances' messages now.
        flushed = two.cli("queue", "flush")
        assert "gw1: 1 message(s) tried now" in flushed
        assert "gw2: 1 message(s) tried now" in flushed
        wait_for(lambda: sorted(i["attempts"] for i in one.queue()) == [3, 3])

        # gw2 deletes the worker's message with a bounce to its sender.
        deleted = two.cli("--json", "queue", "delete", "--bounce", worker_id)
        answer = json.loads(deleted)
        assert (answer["instance"], answer["process"]) == ("gw1", 1)
        assert answer["changed"] is True

        def bounces() -> list[Any]:
            return [m for m in handler.messages if m.rcpt_tos == ["s1@example.com"]]

        (bounce,) = wait_for(bounces)
        assert bounce.mail_from == "<>"
        assert b"in-worker" in bounce.content
        assert b"deleted from the queue by the gateway's administrator" in (
            bounce.content.replace(b"\r\n ", b" ")
        )
        assert worker_id not in [i["queue_id"] for i in one.queue()]

        # The admin API: hold, then a silent delete, of gw2's message from gw1.
        status, body = one.api(
            "POST", f"/api/queue/{other_id}/hold", {"instance": "gw2"}
        )
        assert status == 200
        assert (body["action"], body["instance"], body["changed"]) == (
            "hold",
            "gw2",
            True,
        )
        status, gone = one.api("DELETE", f"/api/queue/{other_id}", {"bounce": False})
        assert (status, gone["instance"], gone["changed"]) == (200, "gw2", True)
        status, body = one.api("GET", f"/api/queue/{other_id}")
        assert status == 409
        assert one.queue() == []
        assert gone["detail"].endswith("(1 recipient(s) undelivered, no bounce)")
        # No bounce for the silent delete: gw2 logged the delete and no
        # bounce, where gw1 logged the bounce of its delete.
        assert messages(one.gateway, "bounce sent to s1@example.com as ")
        assert messages(two.gateway, f"{other_id}: {gone['detail']}")
        assert not messages(two.gateway, "bounce sent to ")
        assert not [m for m in handler.messages if m.rcpt_tos == ["s2@example.com"]]

        status, audit = two.api("GET", "/api/audit?limit=100")
        assert status == 200
        done = {
            (a["action"], a["target"])
            for a in audit["items"]
            if a["actor"] == "admin" and a["result"] == "done"
        }
        assert {
            ("hold", other_id),
            ("release-hold", other_id),
            ("hold", worker_id),
            ("delete-queued", worker_id),
            ("delete-queued", other_id),
        } <= done
