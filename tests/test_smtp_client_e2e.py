"""
End-to-end tests of the SMTP client against real aiosmtpd servers on
127.0.0.1 (each in its own thread with its own asyncio loop), and against
small misbehaving Twisted servers.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from aiosmtpd.smtp import AuthResult, LoginPassword
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from mdgateway.policy.profiles import RelayServer
from mdgateway.relay.connect import ClientSettings, connect_server, deliver_once
from mdgateway.smtp.clientmodel import (
    ClientEnvelope,
    Credentials,
    FailureKind,
    MessageBody,
    SessionFailure,
    SmtpSessionError,
    SmtpTimeouts,
    Stage,
    TransactionResult,
)
from tests.certs import TestPKI, make_test_pki
from tests.downstream import RecordingHandler, _Controller

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    return make_test_pki(tmp_path / "pki")


def server_context(pki: TestPKI) -> ssl.SSLContext:
    return pki.server_ssl_context()


#: Bounded, so a bug shows up as a failure rather than a five-minute wait.
TIMEOUTS = SmtpTimeouts(*[20.0] * 8)


def settings(**kwargs: Any) -> ClientSettings:
    kwargs.setdefault("tls", "none")
    kwargs.setdefault("timeouts", TIMEOUTS)
    return ClientSettings(helo="gw.example", **kwargs)


def server(
    controller: _Controller, scheme: str = "smtp", host: str = "127.0.0.1"
) -> RelayServer:
    return RelayServer(scheme, host, controller.port)


def authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (
        auth_data.login,
        auth_data.password,
    ) == (b"relay", "pässword".encode())
    # handled=False: aiosmtpd then sends the 535 itself.
    return AuthResult(success=ok, handled=False)


ENVELOPE = ClientEnvelope("sender@example.org", ("rcpt@example.net",))


async def send_one(
    relay: RelayServer,
    client_settings: ClientSettings,
    body: bytes,
    envelope: ClientEnvelope = ENVELOPE,
) -> TransactionResult:
    client = await connect_server(reactor, relay, client_settings)
    try:
        return await client.send(envelope, MessageBody.from_bytes(body))
    finally:
        await client.quit()


@pytest_twisted.ensureDeferred
async def test_plain(smtpd: Callable[..., _Controller]) -> None:
    """
    A plain session delivers the message byte for byte, with the HELO
    name, SIZE and no TLS.
    """
    handler = RecordingHandler()
    controller = smtpd(handler)
    body = b"Subject: hi\r\n\r\nhello\r\n"
    client = await connect_server(reactor, server(controller), settings())
    assert not client.info.tls
    result = await client.send(ENVELOPE, MessageBody.from_bytes(body))
    await client.quit()
    assert [(r.code, r.enhanced, r.stage) for r in result.recipients] == [
        (250, "2.0.0", Stage.DATA_END)
    ]
    assert handler.ehlo_names == ["gw.example"]
    [message] = handler.messages
    assert message.content == body
    assert message.mail_from == "sender@example.org"
    assert message.rcpt_tos == ["rcpt@example.net"]
    assert f"SIZE={len(body)}" in message.mail_options


@pytest_twisted.ensureDeferred
async def test_dotsAndBigBody(
    smtpd: Callable[..., _Controller], tmp_path: Path
) -> None:
    """
    A 300 KiB body from a file, full of lines with leading dots (and a lone
    dot line), behind a prepended header, arrives exactly.
    """
    handler = RecordingHandler(pipelining=True)
    controller = smtpd(handler)
    lines = []
    for i in range(12000):
        lines.append(b"." if i % 1000 == 7 else b".line %05d with a leading dot" % i)
    content = b"\r\n".join(lines) + b"\r\n"
    assert len(content) > 300 * 1024
    path = tmp_path / "spooled.eml"
    path.write_bytes(b"ENVELOPE-JUNK\r\n" + content)
    prefix = b"Received: by gw.example\r\n"
    client = await connect_server(
        reactor, server(controller), settings(chunk_size=4096)
    )
    result = await client.send(
        ENVELOPE, MessageBody.from_file(str(path), offset=15, prefix=prefix)
    )
    await client.quit()
    assert result.recipients[0].delivered
    assert handler.messages[0].content == prefix + content


@pytest_twisted.ensureDeferred
async def test_noFinalNewline(smtpd: Callable[..., _Controller]) -> None:
    """
    A body whose last line has no CRLF arrives with one added.
    """
    handler = RecordingHandler()
    controller = smtpd(handler)
    result = await send_one(server(controller), settings(), b".first\r\n.\r\nlast")
    assert result.recipients[0].delivered
    assert handler.messages[0].content == b".first\r\n.\r\nlast\r\n"


@pytest_twisted.ensureDeferred
async def test_starttlsRequired(
    smtpd: Callable[..., _Controller], pki: TestPKI
) -> None:
    """
    Policy C{required} upgrades with STARTTLS (without checking the
    certificate) before MAIL, which the server insists on.
    """
    handler = RecordingHandler()
    controller = smtpd(handler, tls_context=server_context(pki), require_starttls=True)
    client = await connect_server(reactor, server(controller), settings(tls="required"))
    assert client.info.tls and not client.info.tls_verified
    assert client.info.tls_version is not None
    result = await client.send(ENVELOPE, MessageBody.from_bytes(b"secret\r\n"))
    await client.quit()
    assert result.recipients[0].delivered
    assert handler.messages[0].content == b"secret\r\n"


@pytest_twisted.ensureDeferred
async def test_starttlsRequiredNotOffered(smtpd: Callable[..., _Controller]) -> None:
    """
    Policy C{required} against a server without STARTTLS fails with a TLS
    failure and sends nothing.
    """
    handler = RecordingHandler()
    controller = smtpd(handler)
    with pytest.raises(SmtpSessionError) as caught:
        await connect_server(reactor, server(controller), settings(tls="required"))
    assert caught.value.failure.kind is FailureKind.TLS
    assert handler.messages == []


@pytest_twisted.ensureDeferred
async def test_starttlsVerify(smtpd: Callable[..., _Controller], pki: TestPKI) -> None:
    """
    Policy C{verify} with the test CA and the name C{localhost} checks the
    certificate and delivers.
    """
    handler = RecordingHandler()
    controller = smtpd(handler, tls_context=server_context(pki))
    client_settings = settings(
        tls="verify", ca_file=str(pki.ca_cert), tls_name="localhost"
    )
    client = await connect_server(reactor, server(controller), client_settings)
    assert client.info.tls_verified
    result = await client.send(ENVELOPE, MessageBody.from_bytes(b"checked\r\n"))
    await client.quit()
    assert result.recipients[0].delivered


@pytest_twisted.ensureDeferred
async def test_starttlsVerifyWrongName(
    smtpd: Callable[..., _Controller], pki: TestPKI
) -> None:
    """
    Policy C{verify} with a name the certificate does not carry fails with
    a TLS failure (try the next server); nothing is delivered.
    """
    handler = RecordingHandler()
    controller = smtpd(handler, tls_context=server_context(pki))
    client_settings = settings(
        tls="verify", ca_file=str(pki.ca_cert), tls_name="mx.wrong.example"
    )
    with pytest.raises(SmtpSessionError) as caught:
        await connect_server(reactor, server(controller), client_settings)
    assert caught.value.failure.kind is FailureKind.TLS
    assert caught.value.failure.next_server
    assert handler.messages == []


@pytest_twisted.ensureDeferred
async def test_starttlsVerifyUntrusted(
    smtpd: Callable[..., _Controller], pki: TestPKI, tmp_path: Path
) -> None:
    """
    Policy C{verify} against a certificate from another CA fails with a
    TLS failure.
    """
    other = make_test_pki(tmp_path / "other")
    controller = smtpd(RecordingHandler(), tls_context=server_context(pki))
    client_settings = settings(
        tls="verify", ca_file=str(other.ca_cert), tls_name="localhost"
    )
    with pytest.raises(SmtpSessionError) as caught:
        await connect_server(reactor, server(controller), client_settings)
    assert caught.value.failure.kind is FailureKind.TLS


@pytest_twisted.ensureDeferred
async def test_implicitTls(smtpd: Callable[..., _Controller], pki: TestPKI) -> None:
    """
    An C{smtps://} server is spoken to over TLS from the first byte, and
    with policy C{verify} its certificate is checked.
    """
    handler = RecordingHandler()
    controller = smtpd(handler, ssl_context=server_context(pki))
    client_settings = settings(
        tls="verify", ca_file=str(pki.ca_cert), tls_name="localhost"
    )
    client = await connect_server(reactor, server(controller, "smtps"), client_settings)
    assert client.info.tls and client.info.tls_verified
    result = await client.send(ENVELOPE, MessageBody.from_bytes(b"implicit\r\n"))
    await client.quit()
    assert result.recipients[0].delivered
    assert handler.messages[0].content == b"implicit\r\n"


@pytest_twisted.ensureDeferred
async def test_implicitTlsWrongName(
    smtpd: Callable[..., _Controller], pki: TestPKI
) -> None:
    """
    Implicit TLS with a name mismatch fails with a TLS failure.
    """
    controller = smtpd(RecordingHandler(), ssl_context=server_context(pki))
    client_settings = settings(
        tls="verify", ca_file=str(pki.ca_cert), tls_name="nope.example"
    )
    with pytest.raises(SmtpSessionError) as caught:
        await connect_server(reactor, server(controller, "smtps"), client_settings)
    assert caught.value.failure.kind is FailureKind.TLS


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest_twisted.ensureDeferred
async def test_auth(
    smtpd: Callable[..., _Controller], pki: TestPKI, mechanism: str
) -> None:
    """
    AUTH PLAIN and AUTH LOGIN work under STARTTLS against a server that
    only offers AUTH over TLS.
    """
    handler = RecordingHandler()
    excluded = ["LOGIN"] if mechanism == "PLAIN" else ["PLAIN"]
    controller = smtpd(
        handler,
        tls_context=server_context(pki),
        authenticator=authenticator,
        auth_require_tls=True,
        auth_required=True,
        auth_exclude_mechanism=excluded,
    )
    client_settings = settings(
        tls="required", credentials=Credentials("relay", "pässword")
    )
    client = await connect_server(reactor, server(controller), client_settings)
    assert client.info.auth_mechanism == mechanism
    result = await client.send(ENVELOPE, MessageBody.from_bytes(b"authed\r\n"))
    await client.quit()
    assert result.recipients[0].delivered


@pytest_twisted.ensureDeferred
async def test_authRefused(smtpd: Callable[..., _Controller], pki: TestPKI) -> None:
    """
    Wrong credentials fail the session with an AUTH failure and the 535.
    """
    controller = smtpd(
        RecordingHandler(),
        tls_context=server_context(pki),
        authenticator=authenticator,
        auth_require_tls=True,
    )
    client_settings = settings(
        tls="required", credentials=Credentials("relay", "wrong")
    )
    with pytest.raises(SmtpSessionError) as caught:
        await connect_server(reactor, server(controller), client_settings)
    failure = caught.value.failure
    assert failure.kind is FailureKind.AUTH
    assert failure.reply is not None and failure.reply.code == 535


@pytest_twisted.ensureDeferred
async def test_pipelinedMixedRecipients(smtpd: Callable[..., _Controller]) -> None:
    """
    Against a pipelining server, some recipients refused with 550 and some
    with 450 get their own verdicts, the rest the message verdict.
    """
    handler = RecordingHandler(
        pipelining=True,
        rcpt_replies={
            "gone@example.net": "550 5.1.1 No such user",
            "busy@example.net": "450 4.2.1 Mailbox busy",
        },
    )
    controller = smtpd(handler)
    envelope = ClientEnvelope(
        "s@example.org",
        ("a@example.net", "gone@example.net", "busy@example.net", "b@example.net"),
    )
    result = await send_one(server(controller), settings(), b"x\r\n", envelope)
    assert [(r.address, r.code, r.enhanced, r.stage) for r in result.recipients] == [
        ("a@example.net", 250, "2.0.0", Stage.DATA_END),
        ("gone@example.net", 550, "5.1.1", Stage.RCPT),
        ("busy@example.net", 450, "4.2.1", Stage.RCPT),
        ("b@example.net", 250, "2.0.0", Stage.DATA_END),
    ]
    assert handler.messages[0].rcpt_tos == ["a@example.net", "b@example.net"]


@pytest_twisted.ensureDeferred
async def test_transientAtData(smtpd: Callable[..., _Controller]) -> None:
    """
    A 451 after the data is a transient verdict for every accepted
    recipient.
    """
    handler = RecordingHandler(data_reply="451 4.3.0 Try again later")
    controller = smtpd(handler)
    result = await send_one(server(controller), settings(), b"x\r\n")
    assert [(r.code, r.enhanced, r.transient) for r in result.recipients] == [
        (451, "4.3.0", True)
    ]


@pytest_twisted.ensureDeferred
async def test_reuse(smtpd: Callable[..., _Controller]) -> None:
    """
    Two transactions on one connection (RSET between them), then QUIT.
    """
    handler = RecordingHandler(pipelining=True)
    controller = smtpd(handler)
    body = MessageBody.from_bytes
    outcomes = await deliver_once(
        reactor,
        server(controller),
        settings(),
        [
            (ClientEnvelope("a@x.example", ("one@y.example",)), body(b"first\r\n")),
            (ClientEnvelope("b@x.example", ("two@y.example",)), body(b"second\r\n")),
        ],
    )
    assert all(isinstance(o, TransactionResult) and o.delivered for o in outcomes)
    assert [(m.mail_from, m.content) for m in handler.messages] == [
        ("a@x.example", b"first\r\n"),
        ("b@x.example", b"second\r\n"),
    ]
    assert handler.ehlo_names == ["gw.example"]


@pytest_twisted.ensureDeferred
async def test_smtputf8(smtpd: Callable[..., _Controller]) -> None:
    """
    A UTF-8 address goes through with SMTPUTF8 when the server offers it.
    """
    handler = RecordingHandler()
    controller = smtpd(handler)
    envelope = ClientEnvelope("jörg@example.org", ("ñandú@example.net",))
    result = await send_one(server(controller), settings(), b"x\r\n", envelope)
    assert result.recipients[0].delivered
    assert handler.messages[0].rcpt_tos == ["ñandú@example.net"]
    assert "SMTPUTF8" in handler.messages[0].mail_options


# Misbehaving servers ---------------------------------------------------------


class Scripted(Protocol):
    """
    Sends a greeting, then answers lines from a script; hangs up when the
    script runs out.
    """

    def __init__(self, greeting: bytes | None, replies: list[bytes]) -> None:
        self.greeting = greeting
        self.replies = list(replies)

    def connectionMade(self) -> None:
        if self.greeting is not None:
            self.transport.write(self.greeting)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        for _ in range(data.count(b"\n")):
            if not self.replies:
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.transport.write(self.replies.pop(0))  # type: ignore[union-attr]


async def scripted_server(greeting: bytes | None, replies: list[bytes]) -> Any:
    factory = Factory.forProtocol(lambda: Scripted(greeting, replies))
    return await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)


@pytest_twisted.ensureDeferred
async def test_connectionRefused() -> None:
    """
    A refused connection is a CONNECT failure; L{deliver_once} reports it
    for every transaction.
    """
    port = await scripted_server(None, [])
    number = port.getHost().port
    await port.stopListening()
    outcomes = await deliver_once(
        reactor,
        RelayServer("smtp", "127.0.0.1", number),
        settings(),
        [(ENVELOPE, MessageBody.from_bytes(b"x"))] * 2,
    )
    assert [type(o) for o in outcomes] == [SessionFailure, SessionFailure]
    assert outcomes[0].kind is FailureKind.CONNECT  # type: ignore[union-attr]
    assert outcomes[0].next_server  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_hangUpAfterRcpt() -> None:
    """
    A server that hangs up in the middle of a transaction makes the send
    fail (the result never hangs), keeping the RCPT refusals seen.
    """
    port = await scripted_server(
        b"220 hi\r\n", [b"250 hi\r\n", b"250 ok\r\n", b"550 5.1.1 no\r\n"]
    )
    try:
        relay = RelayServer("smtp", "127.0.0.1", port.getHost().port)
        client = await connect_server(reactor, relay, settings())
        envelope = ClientEnvelope("a@x", ("b@y", "c@y"))
        with pytest.raises(SmtpSessionError) as caught:
            await client.send(envelope, MessageBody.from_bytes(b"x\r\n"))
        failure = caught.value.failure
        assert failure.kind is FailureKind.LOST
        assert failure.stage is Stage.RCPT
        assert [(r.address, r.code) for r in failure.recipients] == [("b@y", 550)]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_silentServer() -> None:
    """
    A server that never greets runs into the greeting timeout.
    """
    port = await scripted_server(None, [])
    try:
        relay = RelayServer("smtp", "127.0.0.1", port.getHost().port)
        quick = settings(timeouts=SmtpTimeouts(greeting=0.2))
        with pytest.raises(SmtpSessionError) as caught:
            await connect_server(reactor, relay, quick)
        assert caught.value.failure.kind is FailureKind.TIMEOUT
        assert caught.value.failure.stage is Stage.GREETING
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_greeting421() -> None:
    """
    A 421 greeting is a GREETING failure: try the next server.
    """
    port = await scripted_server(b"421 4.3.2 too busy\r\n", [])
    try:
        relay = RelayServer("smtp", "127.0.0.1", port.getHost().port)
        with pytest.raises(SmtpSessionError) as caught:
            await connect_server(reactor, relay, settings())
        failure = caught.value.failure
        assert failure.kind is FailureKind.GREETING and failure.next_server
        assert failure.reply is not None and failure.reply.code == 421
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_transientAtDataCommand() -> None:
    """
    A 451 to the DATA command itself is a transient verdict (stage DATA)
    for the accepted recipients, and the connection stays usable.
    """
    port = await scripted_server(
        b"220 hi\r\n",
        [b"250 hi\r\n", b"250 ok\r\n", b"250 ok\r\n", b"451 4.3.0 not now\r\n"]
        + [b"221 bye\r\n"],
    )
    try:
        relay = RelayServer("smtp", "127.0.0.1", port.getHost().port)
        client = await connect_server(reactor, relay, settings())
        result = await client.send(ENVELOPE, MessageBody.from_bytes(b"x\r\n"))
        assert [(r.code, r.enhanced, r.stage) for r in result.recipients] == [
            (451, "4.3.0", Stage.DATA)
        ]
        assert client.usable
        await client.quit()
    finally:
        await port.stopListening()
