"""
End to end after the 250: the real gateway (twistd plugin as a subprocess)
scanning with its Core emulator over HTTP and relaying to a real aiosmtpd
downstream server: clean, infected, sanitized and DLP mail, error handling,
retries, bounces and loop prevention.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import TypeVar

import pytest

from mdgateway.config import load_config
from tests.coresamples import docx
from tests.downstream import Received, RecordingHandler, _Controller
from tests.gatewayproc import ETC, GatewayProcess, free_port, running_gateway

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def pipeline_toml(
    port: int,
    tmp_path: Path,
    downstream: int,
    rule: str = "",
    core: str = "",
    emulator: bool = True,
) -> tuple[str, int]:
    """
    A gateway with the Core emulator on its own port, one rule relaying to
    the aiosmtpd server on C{downstream}, and fast retries.
    """
    core_port = free_port()
    toml = f"""
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
[emulator]
enabled = {"true" if emulator else "false"}
endpoint = "tcp:{core_port}:interface=127.0.0.1"
[profiles.core.emulator]
servers = ["http://127.0.0.1:{core_port}"]
poll_interval = "50ms"
{core}
[profiles.smtp.downstream]
servers = ["smtp://127.0.0.1:{downstream}"]
tls = "none"
[[rules]]
name = "inbound"
client_networks = ["127.0.0.0/8"]
core_profile = "emulator"
relay_profile = "downstream"
{rule}
"""
    return toml, core_port


def wait_for(predicate: Callable[[], T | None], timeout: float = 30.0) -> T:
    """
    Poll C{predicate} until it returns a true value, and return that value.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def more_than(handler: RecordingHandler, count: int) -> Callable[[], bool]:
    """
    A predicate: C{handler} has received more than C{count} messages.
    """
    return lambda: len(handler.messages) > count


def send(
    port: int,
    message: EmailMessage | bytes,
    sender: str = "alice@example.com",
    recipients: tuple[str, ...] = ("bob@example.org",),
) -> str:
    data = (
        message
        if isinstance(message, bytes)
        else message.as_bytes(policy=email.policy.SMTP)
    )
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo()
        client.mail(sender)
        for r in recipients:
            client.rcpt(r)
        code, text = client.data(data)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def unfold(value: str) -> str:
    return value.replace("\r\n", "")


def body_of(data: bytes) -> bytes:
    """
    What follows the top-level header block.
    """
    return data.split(b"\r\n\r\n", 1)[1]


def headers_of(received: Received) -> email.message.Message:
    return email.message_from_bytes(received.content, policy=email.policy.compat32)


def message(
    subject: str,
    attachment: tuple[bytes, str] | None = None,
    body: str = "Hello, Bob.\n",
) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "alice@example.com"
    m["To"] = "bob@example.org"
    m["Subject"] = subject
    m.set_content(body)
    if attachment is not None:
        data, name = attachment
        m.add_attachment(
            data, maintype="application", subtype="octet-stream", filename=name
        )
    return m


def test_clean_message_delivered_unchanged(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    A clean message reaches the downstream server byte for byte as the
    gateway spooled it (its Received header, then the client's bytes),
    with only the product's headers added at the top.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port = free_port()
    toml, _ = pipeline_toml(
        port,
        tmp_path,
        downstream.port,
        rule='custom_headers = { "X-Scanned-By" = "mdgateway" }',
    )
    raw = message("clean").as_bytes(policy=email.policy.SMTP)
    with running_gateway(tmp_path, toml=toml, port=port):
        queue_id = send(port, raw)
        (got,) = wait_for(lambda: handler.messages)
        # The entry goes just after the relay's 250 (its last step).
        wait_for(lambda: not list((tmp_path / "spool" / "queue").glob("*")))
    assert got.mail_from == "alice@example.com"
    assert got.rcpt_tos == ["bob@example.org"]
    head, _, rest = got.content.partition(b"Received: from ")
    assert rest.endswith(raw)
    assert f"id {queue_id}".encode() in rest
    parsed = headers_of(got)
    assert parsed["X-Metadefender-Core-Result"] == "Allowed"
    assert parsed["X-Metadefender-EmailSecurity-Sanitized"] == "False"
    assert parsed["X-Metadefender-Core-Url"].startswith("http://127.0.0.1:")
    assert parsed["X-Metadefender-Core-Rule"] == "Automatic"
    assert parsed["X-Scanned-By"] == "mdgateway"
    assert parsed["X-MD-Email-Security-Id"].startswith(f"{queue_id}.1; t=")


@pytest.mark.parametrize("action", ["strip", "block", "deliver"])
def test_eicar(tmp_path: Path, smtpd: Callable[..., _Controller], action: str) -> None:
    """
    An EICAR attachment is stripped (replaced by a notice, the body kept),
    blocked (nothing delivered) or delivered with Blocked/Infected in the
    result header, as the rule's blocked_action says.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port = free_port()
    toml, _ = pipeline_toml(
        port, tmp_path, downstream.port, rule=f'blocked_action = "{action}"'
    )
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        send(port, message("eicar", (EICAR, "eicar.com")))
        if action == "block":
            # The decision line is logged when the copy is decided, and the
            # entry goes only after everything it owed was done: after both,
            # nothing more can be relayed.
            wait_for(lambda: [e for e in gw.log_events() if "verdict" in e])
            wait_for(lambda: not list((tmp_path / "spool" / "queue").glob("*.eml")))
            assert handler.messages == []
            # One decision line per copy: queue id, rule, verdict, action and
            # the version of the configuration it was decided under.
            (decision,) = [e for e in gw.log_events() if "verdict" in e]
            assert decision["verdict"] == "Blocked/Infected"
            assert decision["action"] and decision["rule"]
            assert decision["message_id"].startswith(decision["queue_id"] + ".")
            version = load_config(tmp_path / "mdgateway.toml").version
            assert decision["config_version"] == version
            assert decision["msg"].startswith(decision["message_id"] + " rule ")
            return
        (got,) = wait_for(lambda: handler.messages)
    parsed = headers_of(got)
    assert parsed["X-Metadefender-Core-Result"] == "Blocked/Infected"
    assert b"Hello, Bob." in got.content
    if action == "strip":
        assert EICAR not in got.content
        assert b"was removed by the mail gateway: Infected" in got.content
    else:
        parsed_full = email.message_from_bytes(got.content, policy=email.policy.default)
        (attachment,) = parsed_full.iter_attachments()
        assert attachment.get_content() == EICAR


def test_sanitized_document(tmp_path: Path, smtpd: Callable[..., _Controller]) -> None:
    """
    A document Core sanitizes is replaced by the converted file, and the
    message says so in its headers and subject tag.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port = free_port()
    toml, _ = pipeline_toml(
        port, tmp_path, downstream.port, rule='subject_tag_sanitized = "[SANITIZED]"'
    )
    original = docx(b"A word document" * 20)
    with running_gateway(tmp_path, toml=toml, port=port):
        send(port, message("report", (original, "report.docx")))
        (got,) = wait_for(lambda: handler.messages)
    parsed = email.message_from_bytes(got.content, policy=email.policy.default)
    assert parsed["X-Metadefender-EmailSecurity-Sanitized"] == "True"
    assert parsed["Subject"] == "[SANITIZED] report"
    attachments = [p for p in parsed.iter_attachments()]
    assert len(attachments) == 1
    content = attachments[0].get_content()
    assert content != original and len(content) > 0


def test_core_down_retry_then_bypass_and_fail(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    With no Core reachable: a rule that retries keeps the message queued
    and delivers nothing; one that bypasses delivers it marked
    Bypassed/core_unreachable; one that fails bounces it to the sender.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    for action in ("retry", "bypass", "fail"):
        port = free_port()
        work = tmp_path / action
        work.mkdir()
        toml, _ = pipeline_toml(
            port,
            work,
            downstream.port,
            emulator=False,
            rule=f'[rules.on_error]\ncore_unreachable = "{action}"',
        )
        with running_gateway(work, toml=toml, port=port) as (gw, _):
            before = len(handler.messages)
            send(port, message(f"core down {action}"))
            if action == "retry":
                # The attempt ended deferred (logged): only then is "not
                # delivered" an outcome rather than "not yet".
                wait_for(lambda: deferred(gw), timeout=30)
                assert len(handler.messages) == before
                assert len(list((work / "spool" / "queue").glob("*.eml"))) == 1
            elif action == "bypass":
                wait_for(more_than(handler, before))
                got = headers_of(handler.messages[-1])
                assert got["X-Metadefender-Core-Result"] == "Bypassed/core_unreachable"
            else:
                wait_for(more_than(handler, before))
                bounce = handler.messages[-1]
                assert bounce.mail_from in ("", "<>")
                assert bounce.rcpt_tos == ["alice@example.com"]
                report = email.message_from_bytes(bounce.content)
                assert report.get_content_type() == "multipart/report"
                assert b"Action: failed" in bounce.content
                assert b"Status: 5.7.0" in bounce.content


def test_permanent_refusal_bounces(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    A 550 from the downstream server for one recipient ends in one RFC 3464
    bounce to the sender naming that recipient, while the other recipient
    gets the message.
    """
    handler = RecordingHandler(
        rcpt_replies={"ghost@example.org": "550 5.1.1 No such user"}
    )
    downstream = smtpd(handler)
    port = free_port()
    toml, _ = pipeline_toml(port, tmp_path, downstream.port)
    with running_gateway(tmp_path, toml=toml, port=port):
        send(port, message("two"), recipients=("bob@example.org", "ghost@example.org"))
        wait_for(lambda: len(handler.messages) >= 2)
    delivered, bounce = handler.messages
    assert delivered.rcpt_tos == ["bob@example.org"]
    assert bounce.mail_from in ("", "<>") and bounce.rcpt_tos == ["alice@example.com"]
    report = email.message_from_bytes(bounce.content, policy=email.policy.default)
    status = [
        p for p in report.walk() if p.get_content_type() == "message/delivery-status"
    ][0]
    text = status.as_string()
    assert "Final-Recipient: rfc822; ghost@example.org" in text
    assert "Status: 5.1.1" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user" in text


def test_temporary_failure_then_success(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    A 451 at the end of data is retried and the message delivered once the
    downstream server accepts it.
    """

    class Flaky(RecordingHandler):
        calls = 0

        async def handle_DATA(self, server, session, envelope):
            Flaky.calls += 1
            if Flaky.calls == 1:
                return "451 4.3.0 try again"
            return await super().handle_DATA(server, session, envelope)

    handler = Flaky()
    downstream = smtpd(handler)
    port = free_port()
    toml, _ = pipeline_toml(port, tmp_path, downstream.port)
    with running_gateway(tmp_path, toml=toml, port=port):
        send(port, message("flaky"))
        (got,) = wait_for(lambda: handler.messages, timeout=30)
    assert Flaky.calls == 2
    assert headers_of(got)["X-Metadefender-Core-Result"] == "Allowed"


def test_loop_marker(tmp_path: Path, smtpd: Callable[..., _Controller]) -> None:
    """
    A message that comes back with our valid marker is relayed once without
    being scanned again (it gains a second marker); when it comes back once
    more (two valid markers) it is refused with 554 5.4.6 instead of going
    round until the hop limit; a forged marker, or a valid one copied onto
    another message, counts for nothing: that message is scanned and the
    foreign marker removed.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port = free_port()
    toml, _ = pipeline_toml(port, tmp_path, downstream.port)
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        send(port, message("round"))
        (first,) = wait_for(lambda: handler.messages)
        assert first.content.count(b"X-MD-Email-Security-Id:") == 1
        send(port, first.content)
        wait_for(lambda: len(handler.messages) == 2)
        second = handler.messages[1]
        assert second.content.count(b"X-MD-Email-Security-Id:") == 2
        assert second.content.count(b"X-Metadefender-Core-Result:") == 1
        # The content is relayed unchanged; our fields are stamped anew,
        # the marker it came with kept, the result the marker vouches for.
        assert body_of(second.content) == body_of(first.content)
        again = headers_of(second)
        assert unfold(headers_of(first)["X-MD-Email-Security-Id"]) in [
            unfold(v) for v in again.get_all("X-MD-Email-Security-Id", [])
        ]
        assert again["X-Metadefender-Core-Result"] == "Allowed"
        assert "v=Skipped/AlreadyProcessed" in again["X-MD-Email-Security-Id"]
        assert not any(
            "processed by this gateway before" in e["msg"] for e in gw.log_events()
        )
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.ehlo()
            client.mail("alice@example.com")
            client.rcpt("bob@example.org")
            code, text = client.data(second.content)
        assert (code, text[:5]) == (554, b"5.4.6")

        forged = b"X-MD-Email-Security-Id: forged; t=1; mac=AAAA\r\n" + message(
            "forged"
        ).as_bytes(policy=email.policy.SMTP)
        send(port, forged)
        wait_for(lambda: len(handler.messages) == 3)
        last = handler.messages[-1]
        assert b"forged; t=1" not in last.content
        assert last.content.count(b"X-MD-Email-Security-Id:") == 1
        assert headers_of(last)["X-Metadefender-Core-Result"] == "Allowed"

        stolen = headers_of(first)["X-MD-Email-Security-Id"]
        other = message("different content")
        other.set_content("Not the body that was scanned.\n")
        copied = f"X-MD-Email-Security-Id: {stolen}\r\n".encode() + other.as_bytes(
            policy=email.policy.SMTP
        )
        send(port, copied)
        wait_for(lambda: len(handler.messages) == 4)
        scanned = handler.messages[-1]
        assert headers_of(scanned)["X-Metadefender-Core-Result"] == "Allowed"
        assert scanned.content.count(b"X-MD-Email-Security-Id:") == 1
        assert stolen.split(";")[0].encode() not in scanned.content


def test_verified_starttls_relay(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    Through a relay profile with tls = "verify" (STARTTLS required, the
    certificate checked against a private CA and the name localhost), a
    message reaches a real downstream server byte for byte apart from the
    gateway's headers; against a server whose certificate the CA did not
    sign, nothing is delivered and the message waits in the queue.
    """
    from tests.certs import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    other = make_test_pki(tmp_path / "other")
    handler = RecordingHandler()
    good = smtpd(handler, tls_context=pki.server_ssl_context(), require_starttls=True)
    port = free_port()
    toml, _ = pipeline_toml(port, tmp_path, good.port)
    toml = toml.replace(
        f'servers = ["smtp://127.0.0.1:{good.port}"]\ntls = "none"',
        f'servers = ["smtp://localhost:{good.port}"]\ntls = "verify"\n'
        f'ca_file = "{pki.ca_cert}"',
    )
    raw = message("over verified TLS").as_bytes(policy=email.policy.SMTP)
    with running_gateway(tmp_path, toml=toml, port=port):
        send(port, raw)
        (got,) = wait_for(lambda: handler.messages)
    assert got.content.endswith(raw)
    assert headers_of(got)["X-Metadefender-Core-Result"] == "Allowed"

    untrusted = RecordingHandler()
    bad = smtpd(
        untrusted, tls_context=other.server_ssl_context(), require_starttls=True
    )
    work = tmp_path / "bad"
    work.mkdir()
    port = free_port()
    toml, _ = pipeline_toml(port, work, bad.port)
    toml = toml.replace(
        f'servers = ["smtp://127.0.0.1:{bad.port}"]\ntls = "none"',
        f'servers = ["smtp://localhost:{bad.port}"]\ntls = "verify"\n'
        f'ca_file = "{pki.ca_cert}"',
    )
    with running_gateway(work, toml=toml, port=port) as (gw, _):
        send(port, message("must not go"))
        wait_for(lambda: deferred(gw), timeout=30)
        assert untrusted.messages == []
        assert len(list((work / "spool" / "queue").glob("*.eml"))) == 1


def test_downstream_outage_then_delivery(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    While the downstream server is down the message waits (retried with
    backoff); once the server is back it is delivered, once.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]
    port = free_port()
    toml, _ = pipeline_toml(port, tmp_path, down)
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        send(port, message("patience"))
        wait_for(lambda: deferred(gw), timeout=30)
        assert len(list((tmp_path / "spool" / "queue").glob("*.eml"))) == 1
        handler = RecordingHandler()
        controller = _Controller(handler, hostname="127.0.0.1", port=down)
        controller.start()
        try:
            (got,) = wait_for(lambda: handler.messages, timeout=30)
            # Once the entry is gone, the manager has nothing left to send:
            # a second copy would have to be on the wire already.
            wait_for(lambda: not list((tmp_path / "spool" / "queue").glob("*.eml")))
            assert len(handler.messages) == 1
        finally:
            controller.stop()
    assert headers_of(got)["X-Metadefender-Core-Result"] == "Allowed"
    assert not list((tmp_path / "spool" / "queue").glob("*.eml"))


CORPUS = Path(__file__).parent / "corpus"


def test_corpus_through_the_gateway(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    Every corpus message (plain, alternative, HTML with inline images,
    forwarded, calendar, 8-bit, quoted-printable, S/MIME, and the broken
    ones) goes through the whole gateway and the emulator and arrives
    unchanged apart from the gateway's headers, each scanned (an
    X-Metadefender-Core-Result header) and none lost. (The emulator
    sanitizes HTML; the rule here does not apply sanitized files, so every
    message must come through untouched.) The one with 2,500 parts is more
    than any reading of it may give: it is not called scanned, and under
    the default error handling its sender gets a bounce instead.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port = free_port()
    toml, _ = pipeline_toml(
        port, tmp_path, downstream.port, rule="apply_sanitized = false"
    )
    names = sorted(p.name for p in CORPUS.glob("*.eml"))
    with running_gateway(tmp_path, toml=toml, port=port):
        for name in names:
            send(port, (CORPUS / name).read_bytes())
        wait_for(lambda: len(handler.messages) == len(names), timeout=60)
    bounces = [got for got in handler.messages if got.mail_from in ("", "<>")]
    (bounce,) = bounces
    assert bounce.rcpt_tos == ["alice@example.com"]
    assert b"not_scanned" in bounce.content
    for got in handler.messages:
        if got not in bounces:
            assert headers_of(got)["X-Metadefender-Core-Result"] == "Allowed"
    for name in names:
        original = (CORPUS / name).read_bytes().rstrip(b"\r\n")
        if name == "broken-many-parts.eml":
            delivered = [g for g in handler.messages if g not in bounces]
            assert not any(original in got.content for got in delivered)
            continue
        assert any(original in got.content for got in handler.messages), name


def test_dlp_card_number(tmp_path: Path, smtpd: Callable[..., _Controller]) -> None:
    """
    A Luhn-valid card number in an attachment is a DLP hit that Core
    blocks ("Sensitive Data Found"); the rule strips that attachment and
    the history of the copy says why.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port = free_port()
    toml, _ = pipeline_toml(
        port, tmp_path, downstream.port, rule='blocked_action = "strip"'
    )
    card = b"Customer card: 4111 1111 1111 1111, expires 12/30\r\n"
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        send(port, message("card", (card, "customers.txt")))
        (got,) = wait_for(lambda: handler.messages)
        events = gw.log_events()
    result = headers_of(got)["X-Metadefender-Core-Result"]
    assert result == "Blocked/Sensitive Data Found", result
    assert b"4111 1111 1111 1111" not in got.content
    notices = [
        part.get_content()
        for part in email.message_from_bytes(
            got.content, policy=email.policy.default
        ).walk()
        if part.get_content_type() == "text/plain"
    ]
    assert any(
        "was removed by the mail gateway: Sensitive Data Found" in n for n in notices
    )
    assert any(
        any(p.get("dlp_hits") for p in e.get("parts", []))
        for e in events
        if e.get("verdict", "").startswith("Blocked")
    )


def test_relay_failover(tmp_path: Path, smtpd: Callable[..., _Controller]) -> None:
    """
    When the first server of a failover relay profile is down, the message
    goes to the next one.
    """
    import socket

    handler = RecordingHandler()
    second = smtpd(handler)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]
    port = free_port()
    toml, _ = pipeline_toml(port, tmp_path, second.port)
    toml = toml.replace(
        f'servers = ["smtp://127.0.0.1:{second.port}"]',
        f'servers = ["smtp://127.0.0.1:{down}", "smtp://127.0.0.1:{second.port}"]',
    )
    with running_gateway(tmp_path, toml=toml, port=port):
        send(port, message("failover"))
        (got,) = wait_for(lambda: handler.messages)
    assert headers_of(got)["X-Metadefender-Core-Result"] == "Allowed"


@pytest.mark.timeout(120)
def test_queue_limit_back_pressure(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    With C{spool.max_queue} messages waiting (here: the downstream defers
    them), new mail gets C{452 4.3.1 Mail queue full} at MAIL, a 4xx so
    senders retry; once delivery catches up, mail is accepted again.
    """
    handler = RecordingHandler(rcpt_replies={"r@example.org": "451 4.3.0 later"})
    downstream = smtpd(handler)
    port = free_port()
    toml, _ = pipeline_toml(port, tmp_path, downstream.port)
    toml = toml.replace("[spool]\n", "[spool]\nmax_queue = 2\n", 1)
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        for _ in range(2):
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                client.sendmail(
                    "a@example.com", ["r@example.org"], b"Subject: q\r\n\r\nx\r\n"
                )
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.ehlo()
            code, text = client.mail("a@example.com")
            assert (code, text[:5]) == (452, b"4.3.1")
            assert b"queue full" in text
        handler.rcpt_replies.clear()
        wait_for(lambda: len(handler.messages) == 2)

        def accepted() -> bool:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                client.ehlo()
                return client.mail("a@example.com")[0] == 250

        wait_for(accepted)
        assert [e for e in gw.log_events() if "queue full" in e["msg"]]


def test_marker_replayed_onto_new_structure(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    A delivered copy whose text body is the base64 of a malicious file,
    sent back with its top-level Content-Type, Content-Transfer-Encoding
    and Content-Disposition turned into an attachment (the marker kept), is
    not relayed as already processed: the marker counts for nothing on the
    new structure, the message is scanned, the file found and blocked. A
    clean message sent after it arrives (the positive control).
    """
    import base64

    handler = RecordingHandler()
    downstream = smtpd(handler)
    port = free_port()
    toml, _ = pipeline_toml(port, tmp_path, downstream.port)
    innocent = (
        b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: text\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\n"
        + base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
    )
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        send(port, innocent)
        (first,) = wait_for(lambda: handler.messages)
        assert headers_of(first)["X-Metadefender-Core-Result"] == "Allowed"
        replayed = first.content.replace(
            b"Content-Type: text/plain; charset=us-ascii\r\n"
            b"Content-Transfer-Encoding: 7bit\r\n",
            b'Content-Type: application/octet-stream; name="eicar.com"\r\n'
            b"Content-Transfer-Encoding: base64\r\n"
            b'Content-Disposition: attachment; filename="eicar.com"\r\n',
        )
        assert replayed != first.content
        assert b"X-MD-Email-Security-Id:" in replayed
        send(port, replayed)
        send(port, message("control"))
        wait_for(
            lambda: any(headers_of(m)["Subject"] == "control" for m in handler.messages)
        )
        wait_for(lambda: not list((tmp_path / "spool" / "queue").glob("*.eml")))
        events = gw.log_events()
    assert len(handler.messages) == 2
    assert not any(EICAR in m.content for m in handler.messages)
    assert any(e.get("verdict") == "Blocked/Infected" for e in events)
    assert any(
        "forged loop marker" in e["msg"] and e.get("reason") == "forged" for e in events
    )


def test_marker_replayed_into_stricter_rule(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    A copy that went through a rule delivering blocked content (marked
    Blocked/Infected, the test file inside), replayed unchanged to a
    recipient of a rule that blocks, is scanned again under that rule and
    blocked, not relayed as already processed. A clean message after it
    arrives.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port = free_port()
    toml, _ = pipeline_toml(port, tmp_path, downstream.port)
    lax = """[[rules]]
name = "lax"
client_networks = ["127.0.0.0/8"]
recipients = ["lax@example.org"]
core_profile = "emulator"
relay_profile = "downstream"
blocked_action = "deliver"
"""
    toml = toml.replace("[[rules]]\n", lax + "[[rules]]\n", 1)
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        send(
            port,
            message("infected", (EICAR, "eicar.com")),
            recipients=("lax@example.org",),
        )
        (first,) = wait_for(lambda: handler.messages)
        assert headers_of(first)["X-Metadefender-Core-Result"] == "Blocked/Infected"
        assert b"eicar.com" in first.content
        send(port, first.content, recipients=("bob@example.org",))
        send(port, message("control"), recipients=("bob@example.org",))
        wait_for(lambda: len(handler.messages) == 2)
        wait_for(lambda: not list((tmp_path / "spool" / "queue").glob("*.eml")))
        events = gw.log_events()
    control = handler.messages[1]
    assert headers_of(control)["Subject"] == "control"
    assert control.rcpt_tos == ["bob@example.org"]
    assert any(
        "not under a rule at least as strict" in e["msg"] and e.get("rule") == "inbound"
        for e in events
    )
    blocked = [
        e
        for e in events
        if e.get("rule") == "inbound" and e.get("verdict") == "Blocked/Infected"
    ]
    assert blocked


def test_forged_headers_after_large_header_block(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    Forged product fields (X-Metadefender-* and any X-MD-*) after about
    850 KiB of other header fields, and in the middle of them, never reach
    the recipient: the delivered message carries only the gateway's own,
    and every other field arrives.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port = free_port()
    toml, _ = pipeline_toml(port, tmp_path, downstream.port)
    filler = [b"X-Filler-%05d: %s\r\n" % (i, b"f" * 70) for i in range(10000)]
    forged = (
        b"".join(filler[:5000])
        + b"X-MD-Anything: forged-mid\r\n"
        + b"".join(filler[5000:])
        + b"X-Metadefender-Core-Result: Allowed-forged\r\n"
        + b"X-MD-Email-Security-Id: forged-late; t=1; mac=x\r\n"
        + b"x-metadefender-emailsecurity-sanitized:\r\n True-forged\r\n"
    )
    assert len(forged) > 850 * 1024
    raw = message("big header").as_bytes(policy=email.policy.SMTP)
    with running_gateway(tmp_path, toml=toml, port=port):
        send(port, forged + raw)
        (got,) = wait_for(lambda: handler.messages, timeout=60)
    assert b"forged" not in got.content
    parsed = headers_of(got)
    assert parsed.get_all("X-Metadefender-Core-Result") == ["Allowed"]
    assert len(parsed.get_all("X-MD-Email-Security-Id", [])) == 1
    assert got.content.count(b"X-Filler-") == 10000
    assert got.content.endswith(raw.split(b"\r\n\r\n", 1)[1])


def deferred(gw: GatewayProcess) -> bool:
    """
    Whether the gateway logged that a delivery attempt ended deferred.
    """
    return any("deferred for" in e.get("msg", "") for e in gw.log_events())
