"""
The whole gateway (the twistd plugin as a subprocess) against a Core
emulator of its own process, told to misbehave: the SMTP replies, the
history (admin API) and the spool for the key cases of the Core matrix
(archives with EICAR, an early 503, a reset mid-upload, a forgotten
data_id), and the circuit breaker proven end to end: Core stopped, the
server taken out of rotation, new mail refused with a 4xx while accepted
mail waits in the spool, Core started, the C{/version} probe bringing it
back, and everything delivered.
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.coreproc import EmulatorProcess
from tests.coresamples import EICAR, nested_zip, tar_of, zip_of
from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import (
    ETC,
    GatewayProcess,
    free_port,
    queued_files,
    wait_for_port,
)
from tests.test_e2e_admin import admin_section, call
from tests.test_e2e_pipeline import headers_of, message, send, wait_for

pytestmark = pytest.mark.timeout(180)


def core_toml(
    port: int,
    admin: int,
    tmp_path: Path,
    downstream: int,
    core_url: str,
    rule: str = "",
    core: str = "",
) -> str:
    """
    A gateway scanning with the Core at C{core_url} (no built-in
    emulator), relaying to C{downstream}, with fast retries and the admin
    API on C{admin}.
    """
    return f"""
sender_helo_domain = "gw.test"
[[listeners]]
name = "smtp"
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "starttls"
[tls]
certificate = "{ETC / "tls" / "localhost.crt"}"
key = "{ETC / "tls" / "localhost.key"}"
[spool]
directory = "{tmp_path / "spool"}"
[delivery]
retry_first = "1s"
retry_max = "2s"
{admin_section(admin, tmp_path)}
[profiles.core.core]
servers = ["{core_url}"]
poll_interval = "50ms"
{core}
[profiles.smtp.downstream]
servers = ["smtp://127.0.0.1:{downstream}"]
tls = "none"
[[rules]]
name = "inbound"
client_networks = ["127.0.0.0/8"]
core_profile = "core"
relay_profile = "downstream"
{rule}
"""


class Rig:
    """
    A gateway, its emulator process and a recording downstream server.
    """

    def __init__(
        self,
        tmp_path: Path,
        smtpd: Callable[..., _Controller],
        *emulator_args: str,
        rule: str = "",
        core: str = "",
    ) -> None:
        self.tmp_path = tmp_path
        self.handler = RecordingHandler()
        downstream = smtpd(self.handler)
        self.core = EmulatorProcess(tmp_path / "emulator.log", *emulator_args)
        self.core.start()
        self.port, self.admin = free_port(), free_port()
        config = tmp_path / "mdgateway.toml"
        config.write_text(
            core_toml(
                self.port,
                self.admin,
                tmp_path,
                downstream.port,
                self.core.url,
                rule,
                core,
            )
        )
        self.gateway = GatewayProcess(config, tmp_path / "gateway.log")
        self.gateway.start(self.port)
        wait_for_port(self.admin)

    def close(self) -> None:
        self.gateway.kill()
        self.core.stop()

    def history(self) -> dict[str, dict[str, Any]]:
        """
        The history by subject.
        """
        items = json.loads(call(self.admin, "/api/messages")[1])["items"]
        return {i["subject"]: i for i in items}

    def finished(self, subject: str) -> dict[str, Any] | None:
        item = self.history().get(subject)
        return item if item is not None and item.get("finished_at") else None

    def bad_events(self) -> list[str]:
        """
        The gateway's error and critical log events.
        """
        return [
            str(e.get("log_format"))
            for e in self.gateway.log_events()
            if e.get("log_level", {}).get("name") in ("error", "critical")
        ]

    def events(self, text: str) -> list[dict[str, Any]]:
        return [
            e for e in self.gateway.log_events() if text in str(e.get("log_format"))
        ]

    def spool(self) -> list[Path]:
        return queued_files(self.tmp_path / "spool")


@pytest.fixture
def rigs() -> Any:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


def _rig(rigs: list[Rig], *args: Any, **kwargs: Any) -> Rig:
    rig = Rig(*args, **kwargs)
    rigs.append(rig)
    return rig


def test_archives_with_eicar_blocked(
    tmp_path: Path, smtpd: Callable[..., _Controller], rigs: list[Rig]
) -> None:
    """
    A compressed zip, a zip nested three deep and a tar.gz, each holding
    EICAR, are blocked: each message is accepted (250), nothing is
    delivered, the history says Blocked, the spool empties, and no error is
    logged; a clean zip in the same run is delivered.
    """
    rig = _rig(rigs, tmp_path, smtpd, rule='blocked_action = "block"')
    archives = {
        "deflated": (zip_of({"eicar.com": EICAR}), "a.zip"),
        "nested": (nested_zip(EICAR, 3), "n.zip"),
        "tgz": (tar_of({"x/eicar.com": EICAR}, "w:gz"), "t.tgz"),
        "clean": (zip_of({"readme.txt": b"hello"}), "c.zip"),
    }
    for subject, attachment in archives.items():
        send(rig.port, message(subject, attachment))
    for subject in archives:
        wait_for(partial(rig.finished, subject))
    history = rig.history()
    for subject in ("deflated", "nested", "tgz"):
        assert history[subject]["verdict"] == "Blocked", history[subject]
        # Blocked originals are quarantined by default.
        assert history[subject]["status"] == "quarantined", history[subject]
    assert history["clean"]["status"] == "delivered"
    (got,) = rig.handler.messages
    assert headers_of(got)["Subject"] == "clean"
    wait_for(lambda: not rig.spool())
    assert rig.bad_events() == []


@pytest.mark.parametrize(
    "knob",
    ["--early-busy-next=1", "--reset-next=1", "--forget-next=1", "--fail-next=1"],
)
def test_transient_core_faults(
    tmp_path: Path, smtpd: Callable[..., _Controller], rigs: list[Rig], knob: str
) -> None:
    """
    Core answering 503 before reading the upload, resetting it mid-way,
    losing the data_id once, or answering 500 once: the message is accepted
    (250), waits in the spool if it must, is then delivered scanned, its
    history ends delivered, and nothing is logged at error level.
    """
    rig = _rig(rigs, tmp_path, smtpd, knob)
    queue_id = send(rig.port, message("faulty", (b"x" * 200_000, "data.bin")))
    assert queue_id
    (got,) = wait_for(lambda: rig.handler.messages, timeout=60)
    assert headers_of(got)["X-Metadefender-Core-Result"] == "Allowed"
    item = wait_for(lambda: rig.finished("faulty"))
    assert isinstance(item, dict) and item["status"] == "delivered"
    wait_for(lambda: not rig.spool())
    assert rig.bad_events() == []


def _smtp_rcpt(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo()
        client.mail("alice@example.com")
        return client.rcpt("bob@example.org")


def test_breaker_end_to_end(
    tmp_path: Path, smtpd: Callable[..., _Controller], rigs: list[Rig]
) -> None:
    """
    The circuit breaker in a realistic outage, through the whole gateway:

    1. Core up: mail is accepted and delivered.
    2. Core stopped: accepted mail waits in the spool (deferred, never
       delivered unscanned); failures of different messages add up until
       the server is marked down; new mail then gets C{451 4.3.2} at RCPT.
    3. Core started on the same port: the C{GET /version} probe brings
       the server back, new mail is accepted again, and every waiting
       message is delivered; the spool empties and the history says
       delivered for all.
    """
    rig = _rig(
        rigs,
        tmp_path,
        smtpd,
        core='failure_threshold = 2\nretry_after = "2s"',
    )
    send(rig.port, message("before"))
    wait_for(lambda: rig.finished("before"))

    rig.core.stop()
    # Different bodies: identical ones would share one scan (the verdict
    # cache's single flight) and count as one failure.
    send(rig.port, message("during-1", body="First.\n"))
    send(rig.port, message("during-2", body="Second.\n"))
    wait_for(lambda: rig.events("marked down"), timeout=30)
    code, text = _smtp_rcpt(rig.port)
    assert (code, text[:5]) == (451, b"4.3.2"), (code, text)
    assert len(rig.spool()) == 2
    history = rig.history()
    for subject in ("during-1", "during-2"):
        assert history[subject]["status"] in ("deferred", "queued", "processing")
    assert len(rig.handler.messages) == 1
    # The probe runs every retry_after seconds, and fails while Core is down.
    wait_for(lambda: rig.events("still down"), timeout=30)
    assert _smtp_rcpt(rig.port)[0] == 451

    rig.core.start()
    wait_for(lambda: rig.events("is back up"), timeout=30)
    assert _smtp_rcpt(rig.port)[0] == 250
    send(rig.port, message("after"))
    for subject in ("during-1", "during-2", "after"):
        wait_for(partial(rig.finished, subject), timeout=60)
    history = rig.history()
    assert {history[s]["status"] for s in history} == {"delivered"}
    assert sorted(headers_of(m)["Subject"] for m in rig.handler.messages) == [
        "after",
        "before",
        "during-1",
        "during-2",
    ]
    wait_for(lambda: not rig.spool())
    assert rig.bad_events() == [], rig.bad_events()
