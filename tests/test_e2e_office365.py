"""
End to end: the Office 365 example (etc/office365.toml) bound to one
tenant, in the real gateway (the twistd plugin as a subprocess) with its
Core emulator and a real downstream server standing in for the tenant's MX
host (aiosmtpd, STARTTLS with a verified certificate).

Clients arrive through a trusted PROXY v2 load balancer on loopback, so
they can carry Exchange Online's addresses and outside ones. Our tenant's
outbound mail, bounces and inbound mail pass; another tenant's mail, mail
without the tenant header, with two, with a malformed one, and mail from
outside Exchange Online are refused and never relayed, over DATA and BDAT.
"""

from __future__ import annotations

import email
import email.policy
import json
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.certs import make_test_pki
from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import ETC, free_port, running_gateway, wait_for_port
from tests.test_e2e_admin import admin_section, call
from tests.test_e2e_pipeline import body_of, unfold, wait_for
from tests.test_e2e_receive import Raw
from tests.test_smtp_proxy import v2_proxy

pytestmark = pytest.mark.timeout(180)

PLACEHOLDER = "11111111-2222-3333-4444-555555555555"
OURS = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
OTHER = "6ec0bd7f-11c0-43da-975e-2a8ad9ebae0b"
CONSUMER = "84df9e7f-e9f6-40af-b435-aaaaaaaaaaaa"
EXO = "40.107.22.5"
EXO6 = "2a01:111:f403:c200::5"
STRANGER = "198.51.100.23"
TENANT_REFUSED = "550 5.7.1 Not from an allowed Office 365 tenant: "


def example_toml(
    tmp_path: Path, port: int, admin: int, downstream: int, ca_file: Path
) -> str:
    """
    etc/office365.toml with only what a test host needs changed: the
    listener (loopback, behind a trusted PROXY load balancer), certificate
    and spool paths, the Core servers (the built-in emulator), the MX host
    (the local downstream server, verified against a test CA), our tenant
    id in place of the placeholder, and an admin API to read the refused
    log from.
    """
    text = (ETC / "office365.toml").read_text()
    core = free_port()
    replacements = {
        'endpoint = "tcp:25:interface=0.0.0.0"': (
            f'endpoint = "tcp:{port}:interface=127.0.0.1"\n'
            'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]'
        ),
        "/etc/mdgateway/tls/cert.pem": str(ETC / "tls" / "localhost.crt"),
        "/etc/mdgateway/tls/key.pem": str(ETC / "tls" / "localhost.key"),
        "/var/spool/mdgateway": str(tmp_path / "spool"),
        "http://127.0.0.1:8008": f"http://127.0.0.1:{core}",
        '"smtp://example-com.mail.protection.outlook.com:25"': (
            f'"smtp://localhost:{downstream}"'
        ),
        'tls = "verify"': f'tls = "verify"\nca_file = "{ca_file}"',
        PLACEHOLDER: OURS,
    }
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    assert PLACEHOLDER not in text
    return (
        text
        + f'\n[emulator]\nenabled = true\nendpoint = "tcp:{core}:interface=127.0.0.1"\n'
        + admin_section(admin, tmp_path)
    )


@pytest.fixture
def office365(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> Iterator[tuple[object, int, int, RecordingHandler]]:
    """
    The example gateway, its admin port and the downstream server's
    recorder.
    """
    pki = make_test_pki(tmp_path / "downstream-pki")
    handler = RecordingHandler()
    downstream = smtpd(
        handler, tls_context=pki.server_ssl_context(), require_starttls=True
    )
    port, admin = free_port(), free_port()
    toml = example_toml(tmp_path, port, admin, downstream.port, pki.ca_cert)
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, port):
        wait_for_port(admin)
        yield gw, port, admin, handler


def content(
    subject: str,
    tenants: tuple[str, ...] = (OURS,),
    sender: str = "alice@example.com",
    to: str = "someone@partner.example",
) -> bytes:
    """
    A message as Exchange Online passes it to the connector: the tenant
    headers it stamps, one X-MS-Exchange-CrossTenant-Id per id given.
    """
    lines = [
        f"From: <{sender}>",
        f"To: <{to}>",
        f"Subject: {subject}",
        f"Message-ID: <{subject.replace(' ', '-')}@example.com>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        *(f"X-MS-Exchange-CrossTenant-Id: {tenant}" for tenant in tenants),
        "X-MS-Exchange-CrossTenant-AuthAs: Internal",
        "X-MS-Exchange-CrossTenant-FromEntityHeader: Hosted",
        "X-OriginatorOrg: example.com",
        "",
        f"This is {subject}.",
        "",
    ]
    return "\r\n".join(lines).encode()


def connect(port: int, client: str) -> Raw:
    """
    A session through the trusted load balancer, for a client at C{client}.
    """
    source = ip_address(client)
    local = ip_address("127.0.0.1" if source.version == 4 else "::1")
    raw = Raw(port, v2_proxy(source, local, (40000, 25)))
    assert raw.reply()[0] == 220
    assert raw.command(b"EHLO mail.protection.outlook.com")[0] == 250
    return raw


def transaction(
    raw: Raw, sender: str, recipients: list[str], data: bytes, bdat: bool = False
) -> tuple[list[int], str]:
    """
    MAIL, RCPTs and the content (DATA, or BDAT in two chunks); the RCPT
    codes and the final reply line (empty when no recipient was taken).
    """
    assert raw.command(f"MAIL FROM:<{sender}>".encode())[0] == 250
    codes = [raw.command(f"RCPT TO:<{r}>".encode())[0] for r in recipients]
    if 250 not in codes:
        assert raw.command(b"RSET")[0] == 250
        return codes, ""
    if bdat:
        half = len(data) // 2
        raw.send(b"BDAT %d\r\n" % half + data[:half])
        code, lines = raw.reply()
        assert code == 250, lines
        raw.send(b"BDAT %d LAST\r\n" % (len(data) - half) + data[half:])
    else:
        assert raw.command(b"DATA")[0] == 354
        raw.send(data + b".\r\n")
    code, lines = raw.reply()
    return codes, lines[0]


def subjects(handler: RecordingHandler) -> list[str]:
    return [
        str(
            email.message_from_bytes(m.content, policy=email.policy.compat32)["Subject"]
        )
        for m in handler.messages
    ]


def headers(handler: RecordingHandler, subject: str) -> email.message.Message:
    for m in handler.messages:
        parsed = email.message_from_bytes(m.content, policy=email.policy.compat32)
        if parsed["Subject"] == subject:
            return parsed
    raise AssertionError(f"{subject!r} not delivered")


def refused_log(admin: int) -> list[dict[str, Any]]:
    status, body = call(admin, "/api/refused?limit=100")
    assert status == 200, body
    return list(json.loads(body)["items"])


def tenant_refusals(admin: int) -> list[dict[str, Any]]:
    return [
        r for r in refused_log(admin) if r["reason"].startswith(TENANT_REFUSED[10:])
    ]


def refusal_metric(admin: int, reason: str) -> float:
    status, text = call(admin, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if (
                sample.name == "mdgateway_smtp_refused_total"
                and sample.labels.get("reason") == reason
            ):
                return float(sample.value)
    return 0.0


def test_other_tenants_and_strangers_refused(office365, tmp_path: Path) -> None:
    """
    From Exchange Online's addresses, a message naming another tenant (as
    the sender "boss@example.com", to an outside address or to our
    domain), the consumer Outlook.com tenant, no tenant, our tenant twice,
    ours and another, or a malformed id is refused with 550 5.7.1 at the
    end of DATA or BDAT LAST, for all its recipients, and the session goes
    on. From an outside address our forged tenant header earns nothing:
    every recipient gets 550 5.7.1 No security rule. Each refusal is
    logged with the session and queue id and the cause, recorded in the
    refused log and counted under "tenant"; nothing refused is relayed
    (the one good message sent last, as a positive control, is the only
    one that arrives).
    """
    gw, port, admin, handler = office365
    outside, ours_in = "victim@elsewhere.example", "bob@example.com"
    cases = [
        ("other tenant out", (OTHER,), [outside], False),
        ("other tenant in", (OTHER,), [ours_in], False),
        ("other tenant mixed", (OTHER,), [ours_in, outside], False),
        ("other tenant bdat", (OTHER,), [outside], True),
        ("consumer tenant", (CONSUMER,), [outside], False),
        ("no tenant", (), [outside], False),
        ("no tenant bdat", (), [ours_in], True),
        ("ours twice", (OURS, OURS), [outside], False),
        ("ours and other", (OURS, OTHER), [outside], False),
        ("malformed", ("{" + OURS + "}",), [outside], False),
    ]
    raw = connect(port, EXO)
    for subject, tenants, recipients, bdat in cases:
        codes, final = transaction(
            raw,
            "boss@example.com",
            recipients,
            content(subject, tenants, "boss@example.com", recipients[0]),
            bdat,
        )
        assert codes == [250] * len(recipients), subject
        assert final.startswith(TENANT_REFUSED), (subject, final)
    codes, final = transaction(
        raw, "alice@example.com", [outside], content("control after refusals")
    )
    assert codes == [250] and final.startswith("250 2.0.0 Ok: queued as "), final
    raw.close()

    v6 = connect(port, EXO6)
    codes, final = transaction(
        v6, "boss@example.com", [outside], content("v6 other", (OTHER,))
    )
    assert final.startswith(TENANT_REFUSED), final
    v6.close()

    stranger = connect(port, STRANGER)
    for recipient in (outside, ours_in):
        codes, final = transaction(
            stranger, "boss@example.com", [recipient], content("forged", (OURS,))
        )
        assert (codes, final) == ([550], "")
    stranger.close()

    wait_for(lambda: handler.messages)
    assert subjects(handler) == ["control after refusals"]
    spool = tmp_path / "spool"
    wait_for(lambda: not list((spool / "queue").glob("*.eml")))
    assert list((spool / "incoming").iterdir()) == []

    causes = {
        e["cause"]
        for e in gw.log_events()
        if "Office 365 tenants" in e.get("log_format", "")
    }
    assert causes == {"foreign", "missing", "repeated", "malformed"}
    foreign = next(
        e
        for e in gw.log_events()
        if e.get("cause") == "foreign" and e.get("tenant") == OTHER
    )
    assert foreign["client"] == EXO and foreign["rule"] == "outbound"
    assert foreign["session_id"] and foreign["message_id"]

    tenant_lines = len(cases) + 1
    wait_for(lambda: len(tenant_refusals(admin)) == tenant_lines)
    log = tenant_refusals(admin)
    assert {(r["code"], r["enhanced"], r["sender"]) for r in log} == {
        (550, "5.7.1", "boss@example.com")
    }
    assert {r["client_address"] for r in log} == {EXO, EXO6}
    assert refusal_metric(admin, "tenant") == tenant_lines
    no_rule = [r for r in refused_log(admin) if r["reason"] == "No security rule"]
    assert {(r["client_address"], r["recipient"]) for r in no_rule} == {
        (STRANGER, outside),
        (STRANGER, ours_in),
    }


def test_our_tenant_passes(office365) -> None:
    """
    Our tenant's mail from Exchange Online is taken and relayed back to the
    tenant's MX host, scanned with the Core rule the guide names for each
    direction: outbound from any of our domains, our bounces (null
    sender), inbound to our domains (over IPv4 and IPv6, DATA and BDAT),
    and one transaction mixing both (one copy per rule). When a processed
    message comes back (a transport rule without the sender-IP exception)
    it is relayed once unscanned, and the second time it is refused with
    554 5.4.6, recorded in the refused log.
    """
    gw, port, admin, handler = office365
    raw = connect(port, EXO)
    sent = [
        ("outbound", "alice@example.com", ["carol@partner.example"], False),
        ("other domain", "alice@subsidiary.example", ["carol@partner.example"], False),
        ("bounce", "", ["carol@partner.example"], False),
        ("inbound", "dave@partner.example", ["bob@example.com"], False),
        ("inbound bdat", "dave@partner.example", ["bob@example.com"], True),
        (
            "mixed",
            "alice@example.com",
            ["bob@example.com", "carol@partner.example"],
            False,
        ),
    ]
    for subject, sender, recipients, bdat in sent:
        codes, final = transaction(
            raw,
            sender,
            recipients,
            content(subject, sender=sender or "postmaster@example.com"),
            bdat,
        )
        assert codes == [250] * len(recipients), subject
        assert final.startswith("250 2.0.0 Ok: queued as "), (subject, final)
    raw.close()
    v6 = connect(port, EXO6)
    codes, final = transaction(
        v6, "dave@partner.example", ["bob@example.com"], content("inbound v6")
    )
    assert final.startswith("250 "), final
    v6.close()

    expected = [s for s, *_ in sent] + ["mixed", "inbound v6"]
    wait_for(lambda: len(handler.messages) == len(expected))
    assert sorted(subjects(handler)) == sorted(expected)
    bounce = next(m for m in handler.messages if b"Subject: bounce" in m.content)
    assert bounce.mail_from == "<>"
    rules = {
        "outbound": "MetaDefender Email Gateway Security DLP",
        "bounce": "MetaDefender Email Gateway Security DLP",
        "inbound": "MetaDefender Email Gateway Security",
        "inbound bdat": "MetaDefender Email Gateway Security",
    }
    for subject, core_rule in rules.items():
        parsed = headers(handler, subject)
        assert parsed["X-Metadefender-Core-Rule"] == core_rule, subject
        assert parsed["X-Metadefender-Core-Result"] == "Allowed", subject
        assert parsed["X-MS-Exchange-CrossTenant-Id"] == OURS
        assert parsed["X-MD-Email-Security-Id"]

    mixed = [
        email.message_from_bytes(m.content, policy=email.policy.compat32)
        for m in handler.messages
        if b"Subject: mixed" in m.content
    ]
    assert sorted(m["X-Metadefender-Core-Rule"] for m in mixed) == [
        "MetaDefender Email Gateway Security",
        "MetaDefender Email Gateway Security DLP",
    ]

    # A misrouted transport rule sends the processed message back.
    first = next(m for m in handler.messages if b"Subject: outbound" in m.content)
    raw = connect(port, EXO)
    codes, final = transaction(
        raw, "alice@example.com", ["carol@partner.example"], first.content
    )
    assert final.startswith("250 "), final
    wait_for(lambda: len(handler.messages) == len(expected) + 1)
    second = handler.messages[-1]
    assert second.content.count(b"X-MD-Email-Security-Id:") == 2
    # Relayed unscanned: the content as it was, the marker it came with
    # kept beside ours, which says it was not scanned again.
    assert body_of(second.content) == body_of(first.content)
    came_with = email.message_from_bytes(first.content, policy=email.policy.compat32)
    again = email.message_from_bytes(second.content, policy=email.policy.compat32)
    markers = [unfold(v) for v in again.get_all("X-MD-Email-Security-Id", [])]
    assert unfold(came_with["X-MD-Email-Security-Id"]) in markers
    assert any("v=Skipped/AlreadyProcessed" in m for m in markers)
    codes, final = transaction(
        raw, "alice@example.com", ["carol@partner.example"], second.content
    )
    assert final.startswith("554 5.4.6"), final
    raw.close()
    loops = wait_for(
        lambda: [r for r in refused_log(admin) if r["enhanced"] == "5.4.6"] or None
    )
    assert [(r["code"], r["client_address"]) for r in loops] == [(554, EXO)]
    assert len(handler.messages) == len(expected) + 1
