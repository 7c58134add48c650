"""
Recipient verification against real aiosmtpd relays that accept, refuse and
are down, through the verifier and through the running gateway.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted

from mdgateway.policy.profiles import RelayServer, SmtpProfile
from mdgateway.receive.admission import ACCEPTED, REFUSED, UNREACHABLE
from mdgateway.receive.verification import SmtpRecipientVerifier
from mdgateway.run.reactor import global_reactor
from mdgateway.smtp.clientmodel import SmtpTimeouts
from mdgateway.testing.relay import TableResolver
from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import default_toml, free_port, running_gateway
from tests.test_e2e_receive import Raw

reactor = global_reactor()

pytestmark = pytest.mark.timeout(60)

TIMEOUTS = SmtpTimeouts(*[10.0] * 8)


def closed_port() -> int:
    """
    A loopback port nothing listens on.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def profile(*ports: int) -> SmtpProfile:
    return SmtpProfile(
        name="relay",
        servers=tuple(RelayServer("smtp", "127.0.0.1", port) for port in ports),
        tls="none",
        timeouts=TIMEOUTS,
    )


@pytest_twisted.ensureDeferred
async def test_verifier_outcomes(smtpd: Callable[..., _Controller]) -> None:
    """
    A relay that accepts the RCPT gives ACCEPTED, a 550 gives REFUSED, a 450
    or a relay that is down gives UNREACHABLE; a down first server fails
    over to the next one; the probe never sends a message.
    """
    handler = RecordingHandler(
        rcpt_replies={
            "nobody@example.org": "550 5.1.1 No such user",
            "busy@example.org": "450 4.2.1 Try later",
        }
    )
    relay = smtpd(handler)
    verifier = SmtpRecipientVerifier(
        reactor, "gw.test", TableResolver({}), reactor.getThreadPool()
    )
    down = closed_port()
    assert (
        await verifier.verify(profile(relay.port), "s@x.example", "bob@example.org")
        == ACCEPTED
    )
    assert (
        await verifier.verify(profile(relay.port), "s@x.example", "nobody@example.org")
        == REFUSED
    )
    assert (
        await verifier.verify(profile(relay.port), "", "busy@example.org")
        == UNREACHABLE
    )
    assert (
        await verifier.verify(profile(down), "s@x.example", "bob@example.org")
        == UNREACHABLE
    )
    assert (
        await verifier.verify(
            profile(down, relay.port), "s@x.example", "bob@example.org"
        )
        == ACCEPTED
    )
    assert handler.messages == []
    assert handler.ehlo_names[0] == "gw.test"


def test_gateway_recipient_verification(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    Through the real gateway: with recipient verification on, a recipient
    the relay accepts is taken, one it refuses gets 550 5.1.1 No policy for
    recipient; with the relay down, the recipient is accepted (as the
    product does).
    """
    handler = RecordingHandler(
        rcpt_replies={"ghost@example.org": "550 5.1.1 No such user"}
    )
    relay = smtpd(handler)
    down = closed_port()
    port = free_port()
    rules = f"""
[profiles.smtp.tenant]
servers = ["smtp://127.0.0.1:{relay.port}"]
tls = "none"
[profiles.smtp.gone]
servers = ["smtp://127.0.0.1:{down}"]
tls = "none"
[[rules]]
name = "verified"
recipients = ["example.org"]
recipient_verification = true
core_profile = "local"
relay_profile = "tenant"
[[rules]]
name = "down"
recipients = ["example.net"]
recipient_verification = true
core_profile = "local"
relay_profile = "gone"
"""
    toml = default_toml(
        port,
        tmp_path / "spool",
        extra=rules,
        rule_filters='recipients = ["never.invalid"]',
    )
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, port):
        raw = Raw(port)
        raw.reply()
        raw.command(b"EHLO client.test")
        assert raw.command(b"MAIL FROM:<a@example.com>")[0] == 250
        assert raw.command(b"RCPT TO:<bob@example.org>")[0] == 250
        code, lines = raw.command(b"RCPT TO:<ghost@example.org>")
        assert (code, lines[0]) == (550, "550 5.1.1 No policy for recipient")
        assert raw.command(b"RCPT TO:<anyone@example.net>")[0] == 250
        raw.close()
    assert handler.messages == []
