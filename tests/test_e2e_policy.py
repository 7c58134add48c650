"""
End to end: security rules deciding at RCPT time in the real gateway (the
twistd plugin as a subprocess), with the Office 365 example configuration,
multi-rule transactions, the refusal log and hot reload.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.gatewayproc import ETC, default_toml, free_port, running_gateway
from tests.test_e2e_receive import Raw

pytestmark = pytest.mark.timeout(120)


def office365_toml(port: int, tmp_path: Path) -> str:
    """
    etc/office365.toml with only the host-specific parts changed: the
    listener port (behind a PROXY-speaking load balancer on loopback, so
    tests can present Office 365's addresses), certificate and spool paths.
    """
    text = (ETC / "office365.toml").read_text()
    text = text.replace(
        'endpoint = "tcp:25:interface=0.0.0.0"',
        f'endpoint = "tcp:{port}:interface=127.0.0.1"\n'
        'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]',
    )
    text = text.replace(
        "/etc/mdgateway/tls/cert.pem", str(ETC / "tls" / "localhost.crt")
    )
    text = text.replace(
        "/etc/mdgateway/tls/key.pem", str(ETC / "tls" / "localhost.key")
    )
    text = text.replace("/var/spool/mdgateway", str(tmp_path / "spool"))
    assert text.count(str(tmp_path)) == 1
    return text


def transaction(raw: Raw, sender: str, recipients: list[str]) -> list[tuple[int, str]]:
    raw.command(b"EHLO mail.protection.outlook.com")
    assert raw.command(f"MAIL FROM:<{sender}>".encode())[0] == 250
    return [
        (code, lines[0])
        for code, lines in (raw.command(f"RCPT TO:<{r}>".encode()) for r in recipients)
    ]


#: The example's placeholder tenant id.
PLACEHOLDER_TENANT = "11111111-2222-3333-4444-555555555555"


def send_body(raw: Raw, tenant: str | None = None) -> str:
    """
    Send a short message; with C{tenant}, the message carries that tenant id
    as Exchange Online stamps it.
    """
    assert raw.command(b"DATA")[0] == 354
    stamp = f"X-MS-Exchange-CrossTenant-Id: {tenant}\r\n" if tenant else ""
    code, lines = raw.command(f"Subject: test\r\n{stamp}\r\nbody\r\n.".encode())
    assert code == 250, lines
    return lines[0].rsplit(" ", 1)[1]


def envelope(tmp_path: Path, queue_id: str) -> dict[str, Any]:
    return json.loads((tmp_path / "spool" / "queue" / f"{queue_id}.json").read_text())


def test_office365_example(tmp_path: Path) -> None:
    """
    The Office 365 example, loaded by the real gateway, refuses a relay
    attempt from an unlisted address to an outside domain (550 5.7.1 No
    security rule, logged with client, sender, recipient and reason),
    accepts inbound mail for the tenant's domain under the inbound rule,
    binds the tenant's outgoing mail to the outbound rule, and stores one
    spool entry with a binding per recipient when one transaction mixes
    both. Another tenant's mail through the same Office 365 servers is
    taken at RCPT (no sender filter) but refused at the end of DATA
    (tests/test_e2e_office365.py covers the binding in depth).
    """
    port = free_port()
    with running_gateway(tmp_path, toml=office365_toml(port, tmp_path), port=port) as (
        gw,
        port,
    ):
        stranger = Raw(port, b"PROXY TCP4 198.51.100.23 127.0.0.1 40000 25\r\n")
        stranger.reply()
        (refusal,) = transaction(
            stranger, "spammer@bad.example", ["victim@elsewhere.example"]
        )
        assert refusal == (550, "550 5.7.1 No security rule")
        stranger.close()

        o365 = Raw(port, b"PROXY TCP4 40.107.22.5 127.0.0.1 40000 25\r\n")
        o365.reply()
        assert (
            transaction(o365, "sender@partner.example", ["bob@example.com"])[0][0]
            == 250
        )
        inbound = envelope(tmp_path, send_body(o365, PLACEHOLDER_TENANT))
        assert [
            (r["address"], r["rule"], r["direction"]) for r in inbound["recipients"]
        ] == [("bob@example.com", "inbound", "inbound")]
        assert inbound["client_address"] == "40.107.22.5"

        results = transaction(
            o365, "alice@example.com", ["carol@example.com", "dave@partner.example"]
        )
        assert [code for code, _ in results] == [250, 250]
        mixed = envelope(tmp_path, send_body(o365, PLACEHOLDER_TENANT))
        assert [(r["address"], r["rule"]) for r in mixed["recipients"]] == [
            ("carol@example.com", "inbound"),
            ("dave@partner.example", "outbound"),
        ]
        # Another tenant's mail through the same Office 365 servers, to an
        # outside domain: the outbound rule takes the recipient, the tenant
        # binding refuses the message.
        assert transaction(o365, "x@othertenant.example", ["y@partner.example"]) == [
            (250, "250 2.1.5 Ok")
        ]
        assert o365.command(b"DATA")[0] == 354
        code, lines = o365.command(
            b"Subject: t\r\nX-MS-Exchange-CrossTenant-Id: "
            b"6ec0bd7f-11c0-43da-975e-2a8ad9ebae0b\r\n\r\nbody\r\n."
        )
        assert (code, lines[0]) == (
            550,
            "550 5.7.1 Not from an allowed Office 365 tenant: "
            "X-MS-Exchange-CrossTenant-Id names another tenant",
        )
        o365.close()

        refusals = [e for e in gw.log_events() if e.get("reason") == "No security rule"]
        assert {(e["client"], e["sender"], e["recipient"]) for e in refusals} == {
            ("198.51.100.23", "spammer@bad.example", "victim@elsewhere.example"),
        }


def wait_for_log(gw, predicate, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in gw.log_events():
            if predicate(event):
                return event
        time.sleep(0.1)
    raise AssertionError("log event not seen")


def test_hot_reload(tmp_path: Path) -> None:
    """
    SIGHUP with a valid new file: new sessions use the new rules and their
    Received header carries the new config version, while a session opened
    before keeps the rules it started with. SIGHUP with an invalid file: the
    running rules stay and each problem is logged with its key path.
    """
    port = free_port()
    spool = tmp_path / "spool"
    config = tmp_path / "mdgateway.toml"
    old_text = default_toml(port, spool, rule_filters='recipients = ["example.org"]')
    with running_gateway(tmp_path, toml=old_text, port=port) as (gw, port):
        before = Raw(port)
        before.reply()
        config.write_text(old_text.replace('"example.org"', '"example.net"'))
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        loaded = wait_for_log(gw, lambda e: "loaded from" in e["msg"])
        new_version = loaded["config_version"]

        after = Raw(port)
        after.reply()
        codes = transaction(after, "a@example.com", ["x@example.org", "y@example.net"])
        assert [c for c, _ in codes] == [550, 250]
        queue_id = send_body(after)
        message = (spool / "queue" / f"{queue_id}.eml").read_bytes()
        assert (
            f"mdgateway config {new_version}".encode() in message.split(b"\r\n\r\n")[0]
        )

        kept = transaction(before, "a@example.com", ["x@example.org", "y@example.net"])
        assert [c for c, _ in kept] == [250, 550]

        config.write_text(
            old_text.replace(
                'recipients = ["example.org"]', 'recipients = ["re:(a+)+"]'
            )
        )
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        refused = wait_for_log(gw, lambda e: "reload refused" in e["msg"])
        assert refused["problem"].startswith("rules[0].recipients")
        still = Raw(port)
        still.reply()
        assert [
            c for c, _ in transaction(still, "a@example.com", ["y@example.net"])
        ] == [250]
