"""
Tests for the SMTP client: the reply parser, the sans-IO session machine
(L{mdgateway.smtp.client}) and its Twisted shim
(L{mdgateway.smtp.clientprotocol}) over C{StringTransport} and C{Clock}.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import attrs
from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mdgateway.policy.profiles import RelayServer, SmtpProfile
from mdgateway.relay.connect import ClientSettings, server_endpoint
from mdgateway.smtp.client import ClientSession
from mdgateway.smtp.clientmodel import (
    Action,
    ArmTimer,
    CancelTimer,
    ClientEnvelope,
    ClientRecipient,
    CloseConnection,
    Credentials,
    FailureKind,
    FileRegion,
    MessageBody,
    QuitDone,
    ResumeBody,
    Send,
    SessionConfig,
    SessionFailed,
    SessionFailure,
    SessionReady,
    SmtpSessionError,
    SmtpTimeouts,
    Stage,
    StartBody,
    StartClientTLS,
    StopBody,
    TransactionDone,
    TransactionResult,
)
from mdgateway.smtp.clientprotocol import (
    BodyReader,
    SmtpClientProtocol,
    UncheckedClientTLS,
    _BodyProducer,
    body_size,
    client_tls_creator,
    load_trust_root,
)
from mdgateway.smtp.replyparse import (
    MAX_LINE,
    ReplyParser,
    ReplySyntaxError,
    ServerReply,
)
from tests.certs import make_test_pki

T = TypeVar("T")


def temp_dir(case: SynchronousTestCase) -> Path:
    """
    A fresh directory, removed when the test ends.
    """
    path = Path(tempfile.mkdtemp(prefix="mdgw-client-test-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


TIMEOUTS = SmtpTimeouts(
    connect=1,
    greeting=2,
    ehlo=3,
    mail=4,
    rcpt=5,
    data_init=6,
    data_block=7,
    data_term=8,
)
GREETING = b"220 mx.example ESMTP\r\n"


def ehlo(*extensions: str) -> bytes:
    """
    An EHLO reply advertising C{extensions}.
    """
    lines = ["mx.example greets gw.example", *extensions]
    out = [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]
    return "".join(line + "\r\n" for line in out).encode()


def config(**kwargs: object) -> SessionConfig:
    kwargs.setdefault("tls", "none")
    kwargs.setdefault("timeouts", TIMEOUTS)
    return SessionConfig(helo="gw.example", **kwargs)  # type: ignore[arg-type]


def sent(actions: Sequence[Action]) -> bytes:
    """
    Everything the actions write.
    """
    return b"".join(a.data for a in actions if isinstance(a, Send))


def of(actions: Sequence[Action], kind: type[T]) -> list[T]:
    """
    The actions of one type.
    """
    return [a for a in actions if isinstance(a, kind)]


def only(actions: Sequence[Action], kind: type[T]) -> T:
    """
    The one action of a type.
    """
    found = of(actions, kind)
    assert len(found) == 1, (kind, actions)
    return found[0]


def ready_session(*extensions: str, **kwargs: object) -> ClientSession:
    """
    A session set up against a server with C{extensions}.
    """
    session = ClientSession(config(**kwargs))
    session.connection_made()
    session.data_received(GREETING)
    actions = session.data_received(ehlo(*extensions))
    assert of(actions, SessionReady), actions
    return session


ENVELOPE = ClientEnvelope("a@example.org", ("b@example.net", "c@example.net"))


class ReplyParserTests(SynchronousTestCase):
    """
    L{ReplyParser} and L{ServerReply}.
    """

    def test_multiLine(self) -> None:
        """
        A multi-line reply comes out once complete, in pieces or not.
        """
        parser = ReplyParser()
        parser.feed(b"250-first\r\n250-sec")
        self.assertIsNone(parser.next_reply())
        parser.feed(b"ond\r\n250 last\r\n220 next\r\n")
        self.assertEqual(
            parser.next_reply(), ServerReply(250, ("first", "second", "last"))
        )
        self.assertEqual(parser.next_reply(), ServerReply(220, ("next",)))
        self.assertIsNone(parser.next_reply())
        self.assertFalse(parser.pending)

    def test_enhancedStatus(self) -> None:
        """
        The enhanced status code is taken from the first line when its class
        matches the reply code, and removed from the text.
        """
        reply = ServerReply(550, ("5.1.1 <x@y>: no such user", "5.1.1 really"))
        self.assertEqual(reply.enhanced, "5.1.1")
        self.assertEqual(reply.text, "<x@y>: no such user really")
        self.assertEqual(str(reply), "550 5.1.1 <x@y>: no such user really")
        self.assertIsNone(ServerReply(550, ("4.1.1 mismatch",)).enhanced)
        self.assertIsNone(ServerReply(250, ("2.0.0x",)).enhanced)
        self.assertEqual(ServerReply(250, ("2.0.0",)).enhanced, "2.0.0")

    def test_codeOnly(self) -> None:
        """
        A reply may be a bare code; a bare LF ends a line too.
        """
        parser = ReplyParser()
        parser.feed(b"250\n")
        self.assertEqual(parser.next_reply(), ServerReply(250, ("",)))

    def test_garbage(self) -> None:
        """
        Lines that are not replies, or a code change inside a reply, raise.
        """
        for data in [b"hello\r\n", b"250x\r\n", b"150 no\r\n", b"250-a\r\n251 b\r\n"]:
            parser = ReplyParser()
            parser.feed(data)
            self.assertRaises(ReplySyntaxError, parser.next_reply)

    def test_tooLong(self) -> None:
        """
        A line longer than L{MAX_LINE} raises, ended or not.
        """
        parser = ReplyParser()
        parser.feed(b"250 " + b"x" * MAX_LINE)
        self.assertRaises(ReplySyntaxError, parser.next_reply)
        parser = ReplyParser()
        parser.feed(b"250 " + b"x" * MAX_LINE + b"\r\n")
        self.assertRaises(ReplySyntaxError, parser.next_reply)

    def test_discard(self) -> None:
        """
        L{ReplyParser.discard} drops buffered bytes and partial replies.
        """
        parser = ReplyParser()
        parser.feed(b"250-a\r\n250 b")
        self.assertIsNone(parser.next_reply())
        self.assertTrue(parser.pending)
        parser.discard()
        self.assertFalse(parser.pending)
        parser.feed(b"220 fresh\r\n")
        self.assertEqual(parser.next_reply(), ServerReply(220, ("fresh",)))


class ValueTests(SynchronousTestCase):
    """
    Validation of envelopes and settings.
    """

    def test_noCommandInjection(self) -> None:
        """
        CR, LF or other control characters in an address or parameter are
        refused, so nothing can smuggle a command into MAIL or RCPT.
        """
        self.assertRaises(ValueError, ClientEnvelope, "a@b\r\nRSET", ("c@d",))
        self.assertRaises(ValueError, ClientEnvelope, "a@b", ("c@d\nDATA",))
        self.assertRaises(ValueError, ClientRecipient, "c@d", notify="SUCCESS FAILURE")
        self.assertRaises(ValueError, ClientEnvelope, "a@b", ())
        self.assertRaises(ValueError, Credentials, "u\0", "p")
        self.assertRaises(ValueError, SessionConfig, helo="gw example")
        self.assertRaises(ValueError, SessionConfig, helo="gw", tls="maybe")

    def test_recipientsFromStrings(self) -> None:
        """
        Plain strings become L{ClientRecipient}s; non-ASCII addresses need
        SMTPUTF8.
        """
        envelope = ClientEnvelope("", ["x@y", ClientRecipient("z@y", notify="NEVER")])
        self.assertEqual(
            envelope.recipients,
            (ClientRecipient("x@y"), ClientRecipient("z@y", "NEVER")),
        )
        self.assertFalse(envelope.needs_smtputf8)
        self.assertTrue(ClientEnvelope("", ["jörg@y"]).needs_smtputf8)
        self.assertTrue(ClientEnvelope("", ["x@y"], smtputf8=True).needs_smtputf8)

    def test_passwordNotInRepr(self) -> None:
        """
        Credentials do not show the password in their repr.
        """
        self.assertNotIn("hunter2", repr(Credentials("u", "hunter2")))
        self.assertNotIn(
            "hunter2", repr(config(credentials=Credentials("u", "hunter2")))
        )

    def test_settingsFromProfile(self) -> None:
        """
        L{ClientSettings.from_profile} takes TLS, CA, name and timeouts from
        the profile and the password from the caller.
        """
        profile = SmtpProfile(
            "o365",
            (RelayServer("smtp", "mx.example"),),
            tls="verify",
            ca_file="/ca.pem",
            tls_name="mx.example",
            auth_user="u",
            timeouts=TIMEOUTS,
        )
        settings = ClientSettings.from_profile(profile, "gw.example", "pw")
        self.assertEqual(
            settings,
            ClientSettings(
                helo="gw.example",
                tls="verify",
                ca_file="/ca.pem",
                tls_name="mx.example",
                credentials=Credentials("u", "pw"),
                timeouts=TIMEOUTS,
            ),
        )
        self.assertTrue(settings.session_config(True).implicit_tls)


class SetupTests(SynchronousTestCase):
    """
    Greeting, EHLO/HELO, STARTTLS policies and AUTH in the session machine.
    """

    def test_greetingThenEhlo(self) -> None:
        """
        The greeting timer runs from the connection; a 220 greeting is
        answered with EHLO and the HELO name, under the EHLO timeout.
        """
        session = ClientSession(config())
        self.assertEqual(session.connection_made(), [ArmTimer(2, Stage.GREETING)])
        actions = session.data_received(GREETING)
        self.assertEqual(
            actions, [Send(b"EHLO gw.example\r\n"), ArmTimer(3, Stage.EHLO)]
        )

    def test_ready(self) -> None:
        """
        After EHLO the session is ready and knows the extensions, including
        the old C{AUTH=} form and the SIZE limit.
        """
        session = ClientSession(config())
        session.connection_made()
        session.data_received(GREETING)
        actions = session.data_received(
            ehlo("PIPELINING", "SIZE 1000", "auth=LOGIN", "AUTH PLAIN", "8bitmime")
        )
        info = session.info
        self.assertEqual(actions, [CancelTimer(), SessionReady(info)])
        self.assertTrue(session.ready)
        self.assertTrue(info.esmtp)
        self.assertEqual(info.size_limit, 1000)
        self.assertEqual(info.extension("auth"), "LOGIN PLAIN")
        self.assertTrue(info.has("8BITMIME"))
        self.assertFalse(info.has("SMTPUTF8"))
        self.assertEqual(info.greeting, ServerReply(220, ("mx.example ESMTP",)))

    def test_heloFallback(self) -> None:
        """
        When EHLO is refused with 5xx the client says HELO and goes on
        without extensions.
        """
        session = ClientSession(config())
        session.connection_made()
        session.data_received(GREETING)
        actions = session.data_received(b"502 5.5.1 EHLO not implemented\r\n")
        self.assertEqual(
            actions, [Send(b"HELO gw.example\r\n"), ArmTimer(3, Stage.HELO)]
        )
        actions = session.data_received(b"250 mx.example\r\n")
        self.assertTrue(of(actions, SessionReady))
        self.assertFalse(session.info.esmtp)
        self.assertEqual(session.info.extensions, ())

    def test_ehloTransient(self) -> None:
        """
        A 4xx to EHLO is a HELO failure, not a reason for HELO; the client
        says QUIT and closes.
        """
        session = ClientSession(config())
        session.connection_made()
        session.data_received(GREETING)
        actions = session.data_received(b"451 4.3.0 later\r\n")
        failure = only(actions, SessionFailed).failure
        self.assertEqual((failure.kind, failure.stage), (FailureKind.HELO, Stage.EHLO))
        self.assertEqual(sent(actions), b"QUIT\r\n")
        self.assertEqual(only(actions, CloseConnection), CloseConnection(abort=False))

    def test_greetingRefused(self) -> None:
        """
        A 554 greeting fails the session (try the next server) after a QUIT;
        a 421 greeting closes without one.
        """
        session = ClientSession(config())
        session.connection_made()
        actions = session.data_received(b"554 5.7.1 go away\r\n")
        failure = only(actions, SessionFailed).failure
        self.assertEqual(failure.kind, FailureKind.GREETING)
        self.assertEqual(failure.reply, ServerReply(554, ("5.7.1 go away",)))
        self.assertTrue(failure.next_server)
        self.assertEqual(sent(actions), b"QUIT\r\n")
        self.assertTrue(session.closed)

        session = ClientSession(config())
        session.connection_made()
        actions = session.data_received(b"421 4.3.2 busy\r\n")
        failure = only(actions, SessionFailed).failure
        self.assertEqual(failure.kind, FailureKind.GREETING)
        self.assertEqual(sent(actions), b"")
        self.assertEqual(only(actions, CloseConnection), CloseConnection(abort=False))

    def test_tlsNone(self) -> None:
        """
        Policy C{none} never starts TLS, even when offered.
        """
        session = ready_session("STARTTLS", tls="none")
        self.assertFalse(session.info.tls)

    def _starttls(self, policy: str) -> tuple[ClientSession, list[Action]]:
        session = ClientSession(config(tls=policy))
        session.connection_made()
        session.data_received(GREETING)
        actions = session.data_received(ehlo("STARTTLS", "PIPELINING"))
        return session, actions

    def test_opportunisticOffered(self) -> None:
        """
        Policy C{opportunistic} sends STARTTLS when offered; on 220 the shim
        starts TLS and the client says EHLO again, inside TLS, and forgets
        the plaintext extensions.
        """
        session, actions = self._starttls("opportunistic")
        self.assertEqual(actions, [Send(b"STARTTLS\r\n"), ArmTimer(3, Stage.STARTTLS)])
        actions = session.data_received(b"220 2.0.0 go ahead\r\n")
        self.assertEqual(
            actions,
            [StartClientTLS(), Send(b"EHLO gw.example\r\n"), ArmTimer(3, Stage.EHLO)],
        )
        self.assertEqual(session.info.extensions, ())
        session.tls_established("TLSv1.3", "TLS_AES_256_GCM_SHA384")
        actions = session.data_received(ehlo("PIPELINING"))
        self.assertTrue(of(actions, SessionReady))
        info = session.info
        self.assertTrue(info.tls)
        self.assertFalse(info.tls_verified)
        self.assertEqual(info.tls_version, "TLSv1.3")
        self.assertFalse(info.has("STARTTLS"))

    def test_injectionAfterStarttlsDiscarded(self) -> None:
        """
        Bytes that arrive in plaintext right behind the 220 to STARTTLS are
        thrown away, never taken as the (TLS) EHLO reply.
        """
        session, _ = self._starttls("required")
        actions = session.data_received(b"220 go ahead\r\n" + ehlo("AUTH PLAIN"))
        self.assertEqual(
            actions,
            [StartClientTLS(), Send(b"EHLO gw.example\r\n"), ArmTimer(3, Stage.EHLO)],
        )
        actions = session.data_received(ehlo("SIZE 5"))
        self.assertTrue(of(actions, SessionReady))
        self.assertEqual(session.info.extensions, (("SIZE", "5"),))

    def test_opportunisticNotOffered(self) -> None:
        """
        Policy C{opportunistic} goes on in plaintext when STARTTLS is not
        offered, or refused.
        """
        session = ready_session("PIPELINING", tls="opportunistic")
        self.assertFalse(session.info.tls)
        session, _ = self._starttls("opportunistic")
        actions = session.data_received(b"454 4.7.0 TLS not available\r\n")
        self.assertTrue(of(actions, SessionReady))
        self.assertFalse(session.info.tls)

    def test_requiredNotOffered(self) -> None:
        """
        Policies C{required} and C{verify} fail with a TLS failure (try the
        next server) when STARTTLS is not offered or refused.
        """
        for policy in ("required", "verify"):
            session = ClientSession(config(tls=policy))
            session.connection_made()
            session.data_received(GREETING)
            actions = session.data_received(ehlo("PIPELINING"))
            failure = only(actions, SessionFailed).failure
            self.assertEqual(failure.kind, FailureKind.TLS)
            self.assertTrue(failure.next_server)
            self.assertEqual(sent(actions), b"QUIT\r\n")

            session, _ = self._starttls(policy)
            actions = session.data_received(b"454 4.7.0 no\r\n")
            failure = only(actions, SessionFailed).failure
            assert failure.reply is not None
            self.assertEqual((failure.kind, failure.reply.code), (FailureKind.TLS, 454))

    def test_verifyMarksVerified(self) -> None:
        """
        Under policy C{verify} the session records that the certificate
        was checked.
        """
        session, _ = self._starttls("verify")
        session.data_received(b"220 go\r\n")
        session.data_received(ehlo())
        self.assertTrue(session.info.tls_verified)

    def test_implicitTls(self) -> None:
        """
        With implicit TLS the client never sends STARTTLS and may
        authenticate at once.
        """
        session = ClientSession(
            config(tls="required", implicit_tls=True, credentials=Credentials("u", "p"))
        )
        session.connection_made()
        session.data_received(GREETING)
        actions = session.data_received(ehlo("STARTTLS", "AUTH PLAIN"))
        self.assertEqual(
            sent(actions), b"AUTH PLAIN " + base64.b64encode(b"\0u\0p") + b"\r\n"
        )
        self.assertTrue(session.info.tls)

    def test_noAuthWithoutTls(self) -> None:
        """
        Credentials are never sent without TLS: the session fails instead.
        """
        session = ClientSession(
            config(tls="opportunistic", credentials=Credentials("u", "pw"))
        )
        session.connection_made()
        session.data_received(GREETING)
        actions = session.data_received(ehlo("AUTH PLAIN LOGIN"))
        failure = only(actions, SessionFailed).failure
        self.assertEqual(failure.kind, FailureKind.AUTH)
        self.assertEqual(sent(actions), b"QUIT\r\n")

    def _tls_ready_for_auth(
        self, *extensions: str
    ) -> tuple[ClientSession, list[Action]]:
        session = ClientSession(
            config(tls="required", credentials=Credentials("user", "sëcret"))
        )
        session.connection_made()
        session.data_received(GREETING)
        session.data_received(ehlo("STARTTLS"))
        session.data_received(b"220 go\r\n")
        return session, session.data_received(ehlo(*extensions))

    def test_authPlain(self) -> None:
        """
        AUTH PLAIN goes out with the initial response, marked secret, under
        TLS; 235 makes the session ready.
        """
        session, actions = self._tls_ready_for_auth("AUTH LOGIN PLAIN")
        token = base64.b64encode(b"\0user\0s\xc3\xabcret")
        self.assertEqual(
            actions,
            [Send(b"AUTH PLAIN " + token + b"\r\n", True), ArmTimer(3, Stage.AUTH)],
        )
        actions = session.data_received(b"235 2.7.0 ok\r\n")
        self.assertTrue(of(actions, SessionReady))
        self.assertEqual(session.info.auth_mechanism, "PLAIN")

    def test_authLogin(self) -> None:
        """
        AUTH LOGIN sends user and password after each 334, both secret.
        """
        session, actions = self._tls_ready_for_auth("AUTH LOGIN")
        self.assertEqual(sent(actions), b"AUTH LOGIN\r\n")
        actions = session.data_received(b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(actions[0], Send(base64.b64encode(b"user") + b"\r\n", True))
        actions = session.data_received(b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(
            actions[0], Send(base64.b64encode("sëcret".encode()) + b"\r\n", True)
        )
        actions = session.data_received(b"235 ok\r\n")
        self.assertTrue(of(actions, SessionReady))
        self.assertEqual(session.info.auth_mechanism, "LOGIN")

    def test_authRefused(self) -> None:
        """
        A 535 fails the session with an AUTH failure carrying the reply.
        """
        session, _ = self._tls_ready_for_auth("AUTH PLAIN")
        actions = session.data_received(b"535 5.7.8 bad credentials\r\n")
        failure = only(actions, SessionFailed).failure
        assert failure.reply is not None
        self.assertEqual((failure.kind, failure.reply.code), (FailureKind.AUTH, 535))
        self.assertFalse(failure.next_server)

    def test_authNoMechanism(self) -> None:
        """
        A server without PLAIN or LOGIN fails the session.
        """
        session, actions = self._tls_ready_for_auth("AUTH CRAM-MD5")
        failure = only(actions, SessionFailed).failure
        self.assertEqual(failure.kind, FailureKind.AUTH)


def finish_body(session: ClientSession, body: bytes) -> list[Action]:
    actions: list[Action] = []
    if body:
        actions += session.body_chunk(body)
    return actions + session.body_end()


class TransactionTests(SynchronousTestCase):
    """
    MAIL, RCPT, DATA and BDAT in the session machine.
    """

    def test_pipelined(self) -> None:
        """
        With PIPELINING, MAIL, every RCPT and DATA go out in one write; the
        timer follows the reply awaited; 354 starts the body, which is
        dot-stuffed; the end-of-data verdict applies to every recipient.
        """
        session = ready_session("PIPELINING", "SIZE 1000")
        actions = session.start_transaction(ENVELOPE, 12)
        self.assertEqual(
            actions,
            [
                Send(
                    b"MAIL FROM:<a@example.org> SIZE=12\r\n"
                    b"RCPT TO:<b@example.net>\r\n"
                    b"RCPT TO:<c@example.net>\r\n"
                    b"DATA\r\n"
                ),
                ArmTimer(4, Stage.MAIL),
            ],
        )
        self.assertEqual(
            session.data_received(b"250 2.1.0 ok\r\n"), [ArmTimer(5, Stage.RCPT)]
        )
        self.assertEqual(
            session.data_received(b"250 2.1.5 ok\r\n"), [ArmTimer(5, Stage.RCPT)]
        )
        self.assertEqual(
            session.data_received(b"250 2.1.5 ok\r\n"), [ArmTimer(6, Stage.DATA)]
        )
        actions = session.data_received(b"354 go\r\n")
        self.assertEqual(actions, [StartBody(bdat=False), ArmTimer(7, Stage.BODY)])
        self.assertTrue(session.wants_body)
        self.assertEqual(
            session.body_chunk(b".x\r\n"), [Send(b"..x\r\n"), ArmTimer(7, Stage.BODY)]
        )
        self.assertEqual(
            session.body_chunk(b"y\r\n."), [Send(b"y\r\n.."), ArmTimer(7, Stage.BODY)]
        )
        self.assertEqual(
            session.body_end(), [Send(b"\r\n.\r\n"), ArmTimer(8, Stage.DATA_END)]
        )
        actions = session.data_received(b"250 2.0.0 queued as X\r\n")
        result = only(actions, TransactionDone).result
        self.assertEqual(actions[0], CancelTimer())
        self.assertEqual(
            [
                (r.address, r.code, r.enhanced, r.text, r.stage)
                for r in result.recipients
            ],
            [
                ("b@example.net", 250, "2.0.0", "queued as X", Stage.DATA_END),
                ("c@example.net", 250, "2.0.0", "queued as X", Stage.DATA_END),
            ],
        )
        self.assertEqual(len(result.delivered), 2)
        self.assertTrue(session.ready)

    def test_notPipelined(self) -> None:
        """
        Without PIPELINING each command waits for the previous reply.
        """
        session = ready_session("SIZE")
        actions = session.start_transaction(ENVELOPE, 12)
        self.assertEqual(sent(actions), b"MAIL FROM:<a@example.org> SIZE=12\r\n")
        self.assertEqual(
            sent(session.data_received(b"250 ok\r\n")), b"RCPT TO:<b@example.net>\r\n"
        )
        self.assertEqual(
            sent(session.data_received(b"250 ok\r\n")), b"RCPT TO:<c@example.net>\r\n"
        )
        actions = session.data_received(b"250 ok\r\n")
        self.assertEqual(actions, [Send(b"DATA\r\n"), ArmTimer(6, Stage.DATA)])
        self.assertTrue(of(session.data_received(b"354 go\r\n"), StartBody))
        session.body_end()
        result = only(session.data_received(b"250 ok\r\n"), TransactionDone).result
        self.assertEqual([r.code for r in result.recipients], [250, 250])

    def test_mixedRecipients(self) -> None:
        """
        Each recipient keeps its own RCPT verdict; the message verdict goes
        only to those accepted.
        """
        session = ready_session("PIPELINING")
        envelope = ClientEnvelope("a@x", ("ok@y", "gone@y", "later@y"))
        session.start_transaction(envelope, None)
        session.data_received(
            b"250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n"
            b"450 4.2.1 try later\r\n354 go\r\n"
        )
        actions = finish_body(session, b"hi\r\n") + session.data_received(
            b"250 2.0.0 ok\r\n"
        )
        result = only(actions, TransactionDone).result
        self.assertEqual(
            [(r.code, r.enhanced, r.stage) for r in result.recipients],
            [
                (250, "2.0.0", Stage.DATA_END),
                (550, "5.1.1", Stage.RCPT),
                (450, "4.2.1", Stage.RCPT),
            ],
        )
        self.assertEqual([r.address for r in result.permanent], ["gone@y"])
        self.assertEqual([r.address for r in result.transient], ["later@y"])

    def test_allRefusedPipelined(self) -> None:
        """
        When every RCPT is refused the DATA refusal is consumed and the
        result carries the RCPT verdicts.
        """
        session = ready_session("PIPELINING")
        session.start_transaction(ENVELOPE, None)
        actions = session.data_received(
            b"250 ok\r\n550 no\r\n551 no\r\n554 5.5.1 no valid recipients\r\n"
        )
        result = only(actions, TransactionDone).result
        self.assertEqual(
            [(r.code, r.stage) for r in result.recipients],
            [(550, Stage.RCPT), (551, Stage.RCPT)],
        )
        self.assertIsNone(result.data_reply)
        self.assertTrue(session.ready)

    def test_allRefusedBut354(self) -> None:
        """
        A server that says 354 although no recipient was accepted gets an
        empty message (just the terminator), whose verdict is ignored.
        """
        session = ready_session("PIPELINING")
        session.start_transaction(ENVELOPE, None)
        actions = session.data_received(b"250 ok\r\n550 no\r\n550 no\r\n354 go\r\n")
        self.assertEqual(sent(actions), b".\r\n")
        self.assertFalse(of(actions, StartBody))
        actions = session.data_received(b"250 ok\r\n")
        result = only(actions, TransactionDone).result
        self.assertEqual([r.code for r in result.recipients], [550, 550])

    def test_allRefusedNotPipelined(self) -> None:
        """
        Without pipelining, DATA is not sent when no recipient was accepted.
        """
        session = ready_session()
        session.start_transaction(ENVELOPE, None)
        session.data_received(b"250 ok\r\n")
        session.data_received(b"550 no\r\n")
        actions = session.data_received(b"550 no\r\n")
        self.assertEqual(sent(actions), b"")
        self.assertEqual(
            [r.code for r in only(actions, TransactionDone).result.recipients],
            [550, 550],
        )

    def test_mailRefusedPipelined(self) -> None:
        """
        A 5xx to MAIL is the verdict for every recipient, once the replies
        to the pipelined RCPTs and DATA have been read.
        """
        session = ready_session("PIPELINING")
        session.start_transaction(ENVELOPE, None)
        self.assertFalse(
            of(session.data_received(b"553 5.1.8 bad sender\r\n"), TransactionDone)
        )
        actions = session.data_received(
            b"503 need MAIL\r\n503 need MAIL\r\n503 need MAIL\r\n"
        )
        result = only(actions, TransactionDone).result
        self.assertEqual(
            [(r.code, r.enhanced, r.stage) for r in result.recipients],
            [(553, "5.1.8", Stage.MAIL)] * 2,
        )
        assert result.mail_reply is not None
        self.assertEqual(result.mail_reply.code, 553)

    def test_mailTransientNotPipelined(self) -> None:
        """
        A 4xx to MAIL is a transient verdict for all; no RCPT is sent.
        """
        session = ready_session()
        session.start_transaction(ENVELOPE, None)
        actions = session.data_received(b"451 4.3.0 later\r\n")
        self.assertEqual(sent(actions), b"")
        result = only(actions, TransactionDone).result
        self.assertEqual([r.transient for r in result.recipients], [True, True])

    def test_dataRefused(self) -> None:
        """
        A refused DATA command is the verdict (stage DATA) for the accepted
        recipients.
        """
        session = ready_session("PIPELINING")
        session.start_transaction(ENVELOPE, None)
        actions = session.data_received(
            b"250 ok\r\n250 ok\r\n550 no\r\n451 4.3.0 later\r\n"
        )
        result = only(actions, TransactionDone).result
        self.assertEqual(
            [(r.code, r.stage) for r in result.recipients],
            [(451, Stage.DATA), (550, Stage.RCPT)],
        )

    def test_endOfDataTransient(self) -> None:
        """
        A 4xx after the end of data is a transient verdict for the accepted.
        """
        session = ready_session("PIPELINING")
        session.start_transaction(ENVELOPE, None)
        session.data_received(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        actions = finish_body(session, b"x") + session.data_received(
            b"452 4.3.1 full\r\n"
        )
        result = only(actions, TransactionDone).result
        self.assertEqual(
            [(r.code, r.stage) for r in result.recipients], [(452, Stage.DATA_END)] * 2
        )
        self.assertEqual(len(result.transient), 2)

    def test_421AtRcpt(self) -> None:
        """
        A 421 ends the session; recipients already refused keep their
        verdicts in the failure.
        """
        session = ready_session("PIPELINING")
        envelope = ClientEnvelope("a@x", ("b@y", "c@y", "d@y"))
        session.start_transaction(envelope, None)
        actions = session.data_received(b"250 ok\r\n550 5.1.1 no\r\n421 4.3.2 bye\r\n")
        failure = only(actions, SessionFailed).failure
        self.assertEqual(
            (failure.kind, failure.stage), (FailureKind.CLOSING, Stage.RCPT)
        )
        self.assertEqual(
            [(r.address, r.code) for r in failure.recipients], [("b@y", 550)]
        )
        self.assertEqual(only(actions, CloseConnection), CloseConnection(abort=False))
        self.assertTrue(session.closed)

    def test_parameters(self) -> None:
        """
        SIZE, BODY=8BITMIME and SMTPUTF8 are sent when offered and needed.
        """
        session = ready_session("PIPELINING", "SIZE 0", "8BITMIME", "SMTPUTF8")
        self.assertIsNone(session.info.size_limit)
        envelope = ClientEnvelope("ä@x", ("b@y",), eight_bit=True)
        self.assertTrue(
            sent(session.start_transaction(envelope, 99)).startswith(
                "MAIL FROM:<ä@x> SIZE=99 BODY=8BITMIME SMTPUTF8\r\n"
                "RCPT TO:<b@y>\r\n".encode()
            )
        )

    def test_parametersNotOffered(self) -> None:
        """
        Without the SIZE extension no SIZE is sent; a 7-bit ASCII message
        needs no other parameter.
        """
        session = ready_session("PIPELINING")
        actions = session.start_transaction(ClientEnvelope("a@x", ("b@y",)), 99)
        self.assertEqual(sent(actions), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")

    def test_nullSender(self) -> None:
        """
        The null reverse path is C{<>}.
        """
        session = ready_session()
        self.assertEqual(
            sent(session.start_transaction(ClientEnvelope("", ("b@y",)), None)),
            b"MAIL FROM:<>\r\n",
        )

    def test_missingExtensions(self) -> None:
        """
        A message needing SMTPUTF8 or 8BITMIME from a server without it, or
        bigger than the server's SIZE, is refused locally, permanently, with
        5.6.7, 5.6.3 or 5.3.4; nothing is sent and the session stays ready.
        """
        session = ready_session("PIPELINING", "SIZE 100")
        cases = [
            (ClientEnvelope("a@x", ("jörg@y",)), 10, 554, "5.6.7"),
            (ClientEnvelope("a@x", ("b@y",), smtputf8=True), 10, 554, "5.6.7"),
            (ClientEnvelope("a@x", ("b@y",), eight_bit=True), 10, 554, "5.6.3"),
            (ClientEnvelope("a@x", ("b@y", "c@y")), 101, 552, "5.3.4"),
        ]
        for envelope, size, code, enhanced in cases:
            actions = session.start_transaction(envelope, size)
            self.assertEqual(sent(actions), b"")
            result = only(actions, TransactionDone).result
            for r in result.recipients:
                self.assertEqual(
                    (r.code, r.enhanced, r.stage), (code, enhanced, Stage.LOCAL)
                )
                self.assertTrue(r.permanent)
            self.assertTrue(session.ready)

    def test_heloOnlyServerAndUtf8(self) -> None:
        """
        A HELO-only server has no extensions, so UTF-8 mail is refused with
        5.6.7.
        """
        session = ClientSession(config())
        session.connection_made()
        session.data_received(GREETING)
        session.data_received(b"500 what\r\n")
        session.data_received(b"250 hi\r\n")
        actions = session.start_transaction(ClientEnvelope("a@x", ("ü@y",)), None)
        self.assertEqual(
            only(actions, TransactionDone).result.recipients[0].enhanced, "5.6.7"
        )

    def test_dsnPassedThrough(self) -> None:
        """
        With DSN offered, RET/ENVID go on MAIL and NOTIFY/ORCPT on RCPT;
        without it they are left out and the result says so.
        """
        envelope = ClientEnvelope(
            "a@x",
            (
                ClientRecipient(
                    "b@y", notify="SUCCESS,FAILURE", orcpt="rfc822;b+2Bx@y"
                ),
                "c@y",
            ),
            ret="HDRS",
            envid="QQ314159",
        )
        session = ready_session("PIPELINING", "DSN")
        self.assertEqual(
            sent(session.start_transaction(envelope, None)),
            b"MAIL FROM:<a@x> RET=HDRS ENVID=QQ314159\r\n"
            b"RCPT TO:<b@y> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@y\r\n"
            b"RCPT TO:<c@y>\r\n"
            b"DATA\r\n",
        )
        session = ready_session("PIPELINING")
        self.assertEqual(
            sent(session.start_transaction(envelope, None)),
            b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n",
        )
        actions = session.data_received(b"250 ok\r\n550 no\r\n550 no\r\n503 no\r\n")
        self.assertFalse(only(actions, TransactionDone).result.dsn)

    def test_rsetBetweenTransactions(self) -> None:
        """
        The second transaction on a connection starts with RSET, pipelined
        with the rest when possible, one by one otherwise.
        """
        session = ready_session("PIPELINING")
        envelope = ClientEnvelope("a@x", ("b@y",))
        session.start_transaction(envelope, None)
        session.data_received(b"250 ok\r\n250 ok\r\n354 go\r\n")
        finish_body(session, b"x\r\n")
        session.data_received(b"250 ok\r\n")
        actions = session.start_transaction(envelope, None)
        self.assertEqual(
            actions,
            [
                Send(b"RSET\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
                ArmTimer(4, Stage.RSET),
            ],
        )
        self.assertEqual(
            session.data_received(b"250 reset\r\n"), [ArmTimer(4, Stage.MAIL)]
        )

        session = ready_session()
        session.start_transaction(envelope, None)
        session.data_received(b"451 later\r\n")
        self.assertEqual(sent(session.start_transaction(envelope, None)), b"RSET\r\n")
        self.assertEqual(
            sent(session.data_received(b"250 ok\r\n")), b"MAIL FROM:<a@x>\r\n"
        )

    def test_bdatPipelined(self) -> None:
        """
        With CHUNKING the envelope goes out without DATA; after the RCPT
        replies the body goes as BDAT chunks, not dot-stuffed, the last one
        marked LAST, its verdict for every accepted recipient.
        """
        session = ready_session("PIPELINING", "CHUNKING")
        actions = session.start_transaction(ENVELOPE, None)
        self.assertEqual(
            sent(actions),
            b"MAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<b@example.net>\r\n"
            b"RCPT TO:<c@example.net>\r\n",
        )
        session.data_received(b"250 ok\r\n250 ok\r\n")
        actions = session.data_received(b"250 ok\r\n")
        self.assertEqual(actions, [StartBody(bdat=True), ArmTimer(7, Stage.BODY)])
        self.assertEqual(session.body_chunk(b".\r\n"), [ArmTimer(7, Stage.BODY)])
        self.assertEqual(
            session.body_chunk(b"second"),
            [Send(b"BDAT 3\r\n.\r\n"), ArmTimer(7, Stage.BODY)],
        )
        self.assertTrue(session.wants_body)
        self.assertEqual(
            session.body_end(),
            [Send(b"BDAT 6 LAST\r\nsecond"), ArmTimer(7, Stage.BDAT)],
        )
        self.assertEqual(
            session.data_received(b"250 2.0.0 chunk\r\n"), [ArmTimer(8, Stage.DATA_END)]
        )
        actions = session.data_received(b"250 2.0.0 done\r\n")
        result = only(actions, TransactionDone).result
        self.assertEqual(
            [(r.code, r.text, r.stage) for r in result.recipients],
            [(250, "done", Stage.BDAT)] * 2,
        )

    def test_bdatEmpty(self) -> None:
        """
        An empty body is a single C{BDAT 0 LAST}.
        """
        session = ready_session("CHUNKING")
        session.start_transaction(ClientEnvelope("a@x", ("b@y",)), None)
        session.data_received(b"250 ok\r\n")
        self.assertTrue(of(session.data_received(b"250 ok\r\n"), StartBody))
        self.assertEqual(sent(session.body_end()), b"BDAT 0 LAST\r\n")

    def test_bdatNotPipelined(self) -> None:
        """
        Without PIPELINING each BDAT waits for its reply before the next
        chunk is wanted.
        """
        session = ready_session("CHUNKING")
        session.start_transaction(ClientEnvelope("a@x", ("b@y",)), None)
        session.data_received(b"250 ok\r\n")
        session.data_received(b"250 ok\r\n")
        session.body_chunk(b"one")
        self.assertEqual(sent(session.body_chunk(b"two")), b"BDAT 3\r\none")
        self.assertFalse(session.wants_body)
        self.assertEqual(session.data_received(b"250 ok\r\n"), [ResumeBody()])
        self.assertTrue(session.wants_body)

    def test_bdatRefused(self) -> None:
        """
        A refused BDAT chunk stops the body; the verdict goes to the
        accepted recipients, later chunk replies are ignored and the next
        transaction starts with RSET.
        """
        session = ready_session("PIPELINING", "CHUNKING")
        session.start_transaction(ClientEnvelope("a@x", ("b@y",)), None)
        session.data_received(b"250 ok\r\n250 ok\r\n")
        session.body_chunk(b"1")
        session.body_chunk(b"2")
        session.body_chunk(b"3")
        actions = session.data_received(b"552 5.3.4 too big\r\n")
        self.assertEqual(actions, [StopBody(), ArmTimer(7, Stage.BDAT)])
        self.assertFalse(session.wants_body)
        actions = session.data_received(b"503 5.5.1 no\r\n")
        result = only(actions, TransactionDone).result
        self.assertEqual(
            [(r.code, r.stage) for r in result.recipients], [(552, Stage.BDAT)]
        )
        self.assertTrue(
            sent(
                session.start_transaction(ClientEnvelope("a@x", ("b@y",)), None)
            ).startswith(b"RSET\r\n")
        )


class SessionEndTests(SynchronousTestCase):
    """
    Timeouts, losses, unexpected replies and QUIT in the session machine.
    """

    def test_timeout(self) -> None:
        """
        An expired timer fails the session at the stage it was waiting at
        and aborts the connection.
        """
        session = ready_session("PIPELINING")
        session.start_transaction(ENVELOPE, None)
        session.data_received(b"250 ok\r\n")
        actions = session.timer_expired()
        failure = only(actions, SessionFailed).failure
        self.assertEqual(
            (failure.kind, failure.stage), (FailureKind.TIMEOUT, Stage.RCPT)
        )
        self.assertEqual(only(actions, CloseConnection), CloseConnection(abort=True))
        self.assertEqual(session.timer_expired(), [])

    def test_lostDuringBody(self) -> None:
        """
        A loss while the body streams stops the body and fails the session
        at stage BODY; a TLS error is reported as such.
        """
        session = ready_session("PIPELINING")
        session.start_transaction(ENVELOPE, None)
        session.data_received(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        actions = session.connection_lost(False, "reset")
        self.assertEqual(actions[:2], [CancelTimer(), StopBody()])
        failure = only(actions, SessionFailed).failure
        self.assertEqual((failure.kind, failure.stage), (FailureKind.LOST, Stage.BODY))
        self.assertFalse(of(actions, CloseConnection))

        session = ClientSession(config(implicit_tls=True))
        session.connection_made()
        actions = session.connection_lost(True, "handshake failed")
        failure = only(actions, SessionFailed).failure
        self.assertEqual(
            (failure.kind, failure.stage), (FailureKind.TLS, Stage.GREETING)
        )

    def test_unexpectedReply(self) -> None:
        """
        A reply nobody asked for is a protocol error; an unsolicited 421
        means the server is closing.
        """
        session = ready_session()
        failure = only(session.data_received(b"250 what\r\n"), SessionFailed).failure
        self.assertEqual(failure.kind, FailureKind.PROTOCOL)
        session = ready_session()
        failure = only(
            session.data_received(b"421 4.4.2 idle\r\n"), SessionFailed
        ).failure
        self.assertEqual(
            (failure.kind, failure.stage), (FailureKind.CLOSING, Stage.IDLE)
        )

    def test_garbageReply(self) -> None:
        """
        Bytes that are not a reply fail the session.
        """
        session = ClientSession(config())
        session.connection_made()
        failure = only(
            session.data_received(b"SSH-2.0-OpenSSH\r\n"), SessionFailed
        ).failure
        self.assertEqual(failure.kind, FailureKind.PROTOCOL)

    def test_quit(self) -> None:
        """
        QUIT is sent only when ready; the reply (or a loss) ends it.
        """
        session = ready_session()
        self.assertEqual(session.quit(), [Send(b"QUIT\r\n"), ArmTimer(3, Stage.QUIT)])
        self.assertEqual(
            ready_session(timeouts=SmtpTimeouts()).quit()[1], ArmTimer(30, Stage.QUIT)
        )
        self.assertEqual(
            session.data_received(b"221 bye\r\n"),
            [CancelTimer(), CloseConnection(), QuitDone()],
        )
        self.assertEqual(session.connection_lost(False, "done"), [])
        self.assertEqual(session.quit(), [QuitDone()])

        session = ready_session()
        session.quit()
        self.assertEqual(
            session.connection_lost(False, "done"), [CancelTimer(), QuitDone()]
        )

        session = ready_session()
        session.start_transaction(ENVELOPE, None)
        self.assertRaises(RuntimeError, session.quit)
        self.assertRaises(RuntimeError, session.start_transaction, ENVELOPE, None)


# Protocol tests ---------------------------------------------------------------


class TLSStringTransport(StringTransport):
    """
    A C{StringTransport} that records C{startTLS} and can apply
    back-pressure to a streaming producer after each write.
    """

    def __init__(self, pause_every_write: bool = False) -> None:
        super().__init__()
        self.tls_options: list[object] = []
        self.pause_every_write = pause_every_write
        self.writes: list[bytes] = []

    def startTLS(self, options: object) -> None:
        self.tls_options.append(options)

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes.append(data)
        if self.pause_every_write and self.producer is not None and self.streaming:
            self.producer.pauseProducing()


@attrs.define
class Connected:
    protocol: SmtpClientProtocol
    transport: TLSStringTransport
    clock: Clock

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def lose(self, reason: Exception | None = None) -> None:
        self.protocol.connectionLost(Failure(reason or ConnectionLost("reset")))


def connected(
    *extensions: str,
    chunk_size: int = 64 * 1024,
    pause: bool = False,
    **kwargs: object,
) -> Connected:
    """
    A protocol on a string transport, set up against a server with
    C{extensions}.
    """
    clock = Clock()
    session = ClientSession(config(**kwargs))
    creator = UncheckedClientTLS("mx.example") if session.config.tls != "none" else None
    protocol = SmtpClientProtocol(session, clock, creator, chunk_size=chunk_size)
    transport = TLSStringTransport(pause)
    protocol.makeConnection(transport)
    c = Connected(protocol, transport, clock)
    protocol.dataReceived(GREETING)
    if session.config.tls == "none":
        protocol.dataReceived(ehlo(*extensions))
    c.take()
    return c


class ProtocolTests(SynchronousTestCase):
    """
    L{SmtpClientProtocol} over a string transport and a fake clock.
    """

    def test_interfaces(self) -> None:
        """
        The protocol is a handshake listener, the body producer a push
        producer and the unchecked TLS options a connection creator.
        """
        c = connected("PIPELINING")
        verifyObject(IHandshakeListener, c.protocol)
        verifyObject(IOpenSSLClientConnectionCreator, UncheckedClientTLS("mx.example"))
        body = MessageBody.from_bytes(b"x\r\n")
        c.protocol.send(ClientEnvelope("a@x", ("b@y",)), body)
        c.protocol.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        # StringTransport does not pause, so the body went out whole and
        # the producer was unregistered; check one made afresh.
        verifyObject(IPushProducer, _BodyProducer(c.protocol))

    def test_ready(self) -> None:
        """
        C{ready} fires with the server info once the session is set up.
        """
        c = connected("PIPELINING", "SIZE 10")
        info = self.successResultOf(c.protocol.ready)
        self.assertEqual(info.size_limit, 10)

    def test_fileBodyWithPrefix(self) -> None:
        """
        A body of prefix bytes plus a file region (read in small chunks) is
        sent dot-stuffed and exact, and the result fires.
        """
        path = temp_dir(self) / "body.eml"
        path.write_bytes(b"HEADER-TO-SKIP\r\n.line one\r\n..two\r\n.\r\nlast")
        c = connected("PIPELINING", "SIZE 1000", chunk_size=5)
        body = MessageBody.from_file(str(path), offset=16, prefix=b"X-New: 1\r\n")
        self.assertEqual(body_size(body), 10 + 25)
        d = c.protocol.send(ClientEnvelope("a@x", ("b@y",)), body)
        self.assertEqual(
            c.take(), b"MAIL FROM:<a@x> SIZE=35\r\nRCPT TO:<b@y>\r\nDATA\r\n"
        )
        c.protocol.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(
            c.take(), b"X-New: 1\r\n..line one\r\n...two\r\n..\r\nlast\r\n.\r\n"
        )
        self.assertIsNone(c.transport.producer)
        self.assertNoResult(d)
        c.protocol.dataReceived(b"250 2.0.0 queued\r\n")
        result = self.successResultOf(d)
        self.assertIsInstance(result, TransactionResult)
        self.assertEqual(result.recipients[0].code, 250)

    def test_backPressure(self) -> None:
        """
        The body is a streaming producer: after the transport pauses it no
        more is read until it is resumed; the data-block timer runs while
        paused and fires if the transport stays blocked.
        """
        c = connected("PIPELINING", chunk_size=4, pause=True)
        d = c.protocol.send(
            ClientEnvelope("a@x", ("b@y",)), MessageBody.from_bytes(b"abcdefghij")
        )
        c.protocol.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        producer = c.transport.producer
        assert producer is not None
        self.assertTrue(c.transport.streaming)
        self.assertEqual(c.transport.writes[-1], b"abcd")
        producer.resumeProducing()
        self.assertEqual(c.transport.writes[-1], b"efgh")
        c.clock.advance(6.9)
        producer.resumeProducing()
        self.assertEqual(c.transport.writes[-1], b"ij")
        producer.resumeProducing()
        self.assertEqual(c.transport.writes[-1], b"\r\n.\r\n")
        self.assertIsNone(c.transport.producer)

        c = connected("PIPELINING", chunk_size=4, pause=True)
        d = c.protocol.send(
            ClientEnvelope("a@x", ("b@y",)), MessageBody.from_bytes(b"abcdefghij")
        )
        c.protocol.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        c.clock.advance(7)
        failure = self.failureResultOf(d, SmtpSessionError).value.failure
        self.assertEqual(
            (failure.kind, failure.stage), (FailureKind.TIMEOUT, Stage.BODY)
        )
        self.assertTrue(c.transport.disconnected)
        self.assertIsNone(c.transport.producer)

    def test_greetingTimeout(self) -> None:
        """
        No greeting within the greeting timeout fails C{ready} and aborts.
        """
        clock = Clock()
        protocol = SmtpClientProtocol(ClientSession(config()), clock)
        transport = StringTransport()
        protocol.makeConnection(transport)
        clock.advance(1.9)
        self.assertNoResult(protocol.ready)
        clock.advance(0.1)
        failure = self.failureResultOf(protocol.ready, SmtpSessionError).value.failure
        self.assertEqual(
            (failure.kind, failure.stage), (FailureKind.TIMEOUT, Stage.GREETING)
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timerFollowsStage(self) -> None:
        """
        Each awaited reply gets its own timeout, from RFC 5321's table as
        configured: the RCPT timeout applies after the MAIL reply.
        """
        c = connected("PIPELINING")
        d = c.protocol.send(ENVELOPE, MessageBody.from_bytes(b"x"))
        c.clock.advance(3.9)
        c.protocol.dataReceived(b"250 ok\r\n")
        c.clock.advance(4.9)
        self.assertNoResult(d)
        c.clock.advance(0.1)
        failure = self.failureResultOf(d, SmtpSessionError).value.failure
        self.assertEqual(
            (failure.kind, failure.stage), (FailureKind.TIMEOUT, Stage.RCPT)
        )

    def test_hangUpAnywhere(self) -> None:
        """
        If the peer hangs up before the greeting, during setup, in a
        transaction or while idle, the waiting Deferred fails with
        L{SmtpSessionError} and no timer is left behind.
        """
        clock = Clock()
        protocol = SmtpClientProtocol(ClientSession(config()), clock)
        protocol.makeConnection(StringTransport())
        protocol.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(protocol.ready, SmtpSessionError).value.failure
        self.assertEqual(
            (failure.kind, failure.stage), (FailureKind.LOST, Stage.GREETING)
        )
        self.assertEqual(clock.getDelayedCalls(), [])

        c = connected("PIPELINING")
        d = c.protocol.send(ENVELOPE, MessageBody.from_bytes(b"x"))
        c.protocol.dataReceived(b"250 ok\r\n550 5.1.1 no\r\n")
        c.lose()
        failure = self.failureResultOf(d, SmtpSessionError).value.failure
        self.assertEqual((failure.kind, failure.stage), (FailureKind.LOST, Stage.RCPT))
        self.assertEqual([r.code for r in failure.recipients], [550])
        self.assertEqual(c.clock.getDelayedCalls(), [])

        c = connected("PIPELINING")
        c.lose()
        d = c.protocol.send(ENVELOPE, MessageBody.from_bytes(b"x"))
        failure = self.failureResultOf(d, SmtpSessionError).value.failure
        self.assertEqual((failure.kind, failure.stage), (FailureKind.LOST, Stage.IDLE))

    def test_lostMidBody(self) -> None:
        """
        A hang-up while the body streams (the transport stops the producer)
        fails the transaction at stage BODY and closes the file.
        """
        path = temp_dir(self) / "body.eml"
        path.write_bytes(b"x" * 100)
        c = connected("PIPELINING", chunk_size=10, pause=True)
        d = c.protocol.send(ENVELOPE, MessageBody.from_file(str(path)))
        c.protocol.dataReceived(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        producer = c.transport.producer
        assert producer is not None
        producer.stopProducing()
        c.lose()
        failure = self.failureResultOf(d, SmtpSessionError).value.failure
        self.assertEqual((failure.kind, failure.stage), (FailureKind.LOST, Stage.BODY))
        self.assertIsNone(c.protocol._reader)

    def test_startTLS(self) -> None:
        """
        On 220 to STARTTLS the shim starts TLS with its options before
        writing EHLO; an SSL error (or a loss before the handshake
        completes) is a TLS failure.
        """
        c = connected(tls="required")
        c.protocol.dataReceived(ehlo("STARTTLS"))
        self.assertEqual(c.take(), b"STARTTLS\r\n")
        c.protocol.dataReceived(b"220 go\r\n")
        self.assertEqual(len(c.transport.tls_options), 1)
        self.assertIsInstance(c.transport.tls_options[0], UncheckedClientTLS)
        self.assertEqual(c.take(), b"EHLO gw.example\r\n")
        c.lose(SSL.Error([("SSL routines", "", "certificate verify failed")]))
        failure = self.failureResultOf(c.protocol.ready, SmtpSessionError).value.failure
        self.assertEqual((failure.kind, failure.stage), (FailureKind.TLS, Stage.EHLO))
        self.assertTrue(failure.next_server)

    def test_handshakeCompleted(self) -> None:
        """
        After the handshake a plain loss is a loss, not a TLS failure.
        """
        c = connected(tls="required")
        c.protocol.dataReceived(ehlo("STARTTLS"))
        c.protocol.dataReceived(b"220 go\r\n")
        c.protocol.handshakeCompleted()
        c.lose()
        failure = self.failureResultOf(c.protocol.ready, SmtpSessionError).value.failure
        self.assertEqual(failure.kind, FailureKind.LOST)

    def test_needsTlsOptions(self) -> None:
        """
        A STARTTLS policy without TLS options is a programming error.
        """
        self.assertRaises(
            ValueError,
            SmtpClientProtocol,
            ClientSession(config(tls="required")),
            Clock(),
        )

    def test_cancelSend(self) -> None:
        """
        Cancelling a send aborts the connection; the Deferred fails with
        C{CancelledError} and the session is closed.
        """
        c = connected("PIPELINING")
        d = c.protocol.send(ENVELOPE, MessageBody.from_bytes(b"x"))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(c.transport.disconnected)
        self.assertTrue(c.protocol.session.closed)
        self.assertEqual(c.clock.getDelayedCalls(), [])

    def test_oneAtATime(self) -> None:
        """
        A second operation while one is in progress is refused.
        """
        c = connected("PIPELINING")
        c.protocol.send(ENVELOPE, MessageBody.from_bytes(b"x"))
        self.assertRaises(
            RuntimeError, c.protocol.send, ENVELOPE, MessageBody.from_bytes(b"x")
        )
        self.assertRaises(RuntimeError, c.protocol.quit)

    def test_reuseAndQuit(self) -> None:
        """
        Two transactions run on one connection (RSET before the second);
        QUIT closes it and fires.
        """
        c = connected("PIPELINING")
        envelope = ClientEnvelope("a@x", ("b@y",))
        for expected in [b"", b"RSET\r\n"]:
            d = c.protocol.send(envelope, MessageBody.from_bytes(b"hello\r\n"))
            self.assertTrue(c.take().startswith(expected + b"MAIL FROM:<a@x>"))
            c.protocol.dataReceived(
                (b"250 ok\r\n" if expected else b"") + b"250 ok\r\n250 ok\r\n354 go\r\n"
            )
            self.assertEqual(c.take(), b"hello\r\n.\r\n")
            c.protocol.dataReceived(b"250 ok\r\n")
            self.assertEqual(self.successResultOf(d).recipients[0].code, 250)
        d2: Deferred[None] = c.protocol.quit()
        self.assertEqual(c.take(), b"QUIT\r\n")
        self.assertNoResult(d2)
        c.protocol.dataReceived(b"221 bye\r\n")
        self.assertIsNone(self.successResultOf(d2))
        self.assertTrue(c.transport.disconnecting)
        c.lose(ConnectionDone())
        self.assertIsNone(self.successResultOf(c.protocol.quit()))

    def test_bodyReadError(self) -> None:
        """
        A body that cannot be read fails the session (kind BODY) and aborts
        the half-sent message.
        """

        def chunks() -> Iterator[bytes]:
            yield b"part one\r\n"
            raise OSError("disk on fire")

        c = connected("PIPELINING")
        d = c.protocol.send(
            ClientEnvelope("a@x", ("b@y",)), MessageBody.from_chunks(chunks())
        )
        c.protocol.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        failure = self.failureResultOf(d, SmtpSessionError).value.failure
        self.assertEqual((failure.kind, failure.stage), (FailureKind.BODY, Stage.BODY))
        self.assertTrue(c.transport.disconnected)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_missingFile(self) -> None:
        """
        A body file that does not exist raises C{OSError} before anything
        is sent, and the connection stays usable.
        """
        c = connected("PIPELINING")
        body = MessageBody.from_file(str(temp_dir(self) / "missing"))
        self.assertRaises(OSError, c.protocol.send, ENVELOPE, body)
        self.assertEqual(c.take(), b"")
        self.assertTrue(c.protocol.session.ready)

    def test_abort(self) -> None:
        """
        L{SmtpClientProtocol.abort} fails a pending send with ABORTED.
        """
        c = connected("PIPELINING")
        d = c.protocol.send(ENVELOPE, MessageBody.from_bytes(b"x"))
        c.protocol.abort()
        failure = self.failureResultOf(d, SmtpSessionError).value.failure
        self.assertEqual(failure.kind, FailureKind.ABORTED)
        self.assertTrue(c.transport.disconnected)


class BdatProtocolTests(SynchronousTestCase):
    """
    BDAT through the shim.
    """

    def test_bdatPipelined(self) -> None:
        """
        With CHUNKING and PIPELINING the body goes out as raw BDAT chunks
        (no dot-stuffing), the last marked LAST.
        """
        c = connected("PIPELINING", "CHUNKING", chunk_size=4)
        d = c.protocol.send(
            ClientEnvelope("a@x", ("b@y",)), MessageBody.from_bytes(b".\r\n.x")
        )
        self.assertEqual(c.take(), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n")
        c.protocol.dataReceived(b"250 ok\r\n250 ok\r\n")
        self.assertEqual(c.take(), b"BDAT 4\r\n.\r\n.BDAT 1 LAST\r\nx")
        c.protocol.dataReceived(b"250 ok\r\n250 2.0.0 done\r\n")
        self.assertEqual(self.successResultOf(d).recipients[0].stage, Stage.BDAT)

    def test_bdatWaitsWithoutPipelining(self) -> None:
        """
        Without PIPELINING the shim sends one BDAT chunk, waits for its
        reply, then resumes reading the body.
        """
        c = connected("CHUNKING", chunk_size=3)
        d = c.protocol.send(
            ClientEnvelope("a@x", ("b@y",)), MessageBody.from_bytes(b"abcdefg")
        )
        c.protocol.dataReceived(b"250 ok\r\n")
        c.take()
        c.protocol.dataReceived(b"250 ok\r\n")
        self.assertEqual(c.take(), b"BDAT 3\r\nabc")
        c.protocol.dataReceived(b"250 ok\r\n")
        self.assertEqual(c.take(), b"BDAT 3\r\ndef")
        c.protocol.dataReceived(b"250 ok\r\n")
        self.assertEqual(c.take(), b"BDAT 1 LAST\r\ng")
        self.assertIsNone(c.transport.producer)
        c.protocol.dataReceived(b"250 ok\r\n")
        self.assertTrue(self.successResultOf(d).recipients[0].delivered)

    def test_bdatRefusedStopsBody(self) -> None:
        """
        A refused BDAT chunk stops reading the body and closes the file.
        """
        path = temp_dir(self) / "body.eml"
        path.write_bytes(b"x" * 100)
        c = connected("CHUNKING", chunk_size=10)
        d = c.protocol.send(
            ClientEnvelope("a@x", ("b@y",)), MessageBody.from_file(str(path))
        )
        c.protocol.dataReceived(b"250 ok\r\n250 ok\r\n")
        self.assertEqual(
            c.take(), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 10\r\n" + b"x" * 10
        )
        c.protocol.dataReceived(b"552 5.3.4 too big\r\n")
        self.assertEqual(c.take(), b"")
        self.assertIsNone(c.protocol._reader)
        self.assertIsNone(c.transport.producer)
        result = self.successResultOf(d)
        self.assertEqual(
            (result.recipients[0].code, result.recipients[0].stage), (552, Stage.BDAT)
        )


class BodyTests(SynchronousTestCase):
    """
    L{BodyReader} and L{body_size}.
    """

    def test_partsInOrder(self) -> None:
        """
        Parts are read in order, in chunks of at most C{chunk_size}, a file
        region from its offset for its length.
        """
        path = temp_dir(self) / "body.eml"
        path.write_bytes(b"0123456789")
        body = MessageBody(
            (
                b"ab",
                FileRegion(str(path), 2, 5),
                MessageBody.from_chunks([b"x", b"", b"yz"]).parts[0],
            )
        )
        reader = BodyReader(body, chunk_size=3)
        chunks = []
        while chunk := reader.read():
            chunks.append(chunk)
        self.assertEqual(chunks, [b"ab", b"234", b"56", b"x", b"yz"])
        self.assertIsNone(body_size(body))
        self.assertEqual(body_size(MessageBody.from_chunks([b"abc"], size=3)), 3)
        self.assertEqual(body_size(MessageBody((FileRegion(str(path), 4),))), 6)


class TLSHelperTests(SynchronousTestCase):
    """
    TLS options and endpoints.
    """

    def test_trustRoot(self) -> None:
        """
        L{load_trust_root} reads a CA file and refuses one without
        certificates.
        """
        pki = make_test_pki(temp_dir(self) / "pki")
        self.assertIsNotNone(load_trust_root(str(pki.ca_cert)))
        self.assertRaises(ValueError, load_trust_root, str(pki.server_key))
        self.assertIsInstance(
            client_tls_creator("required", "mx.example"), UncheckedClientTLS
        )
        creator = client_tls_creator("verify", "localhost", str(pki.ca_cert))
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(creator))

    def test_endpointSchemes(self) -> None:
        """
        Only C{smtp} and C{smtps} servers can be connected to directly.
        """
        settings = ClientSettings(helo="gw.example")
        self.assertRaises(
            ValueError,
            server_endpoint,
            Clock(),
            RelayServer("mx", "example.com"),
            settings,
        )


class FailureValueTests(SynchronousTestCase):
    """
    L{SessionFailure} and L{SmtpSessionError}.
    """

    def test_str(self) -> None:
        """
        The failure reads well in logs and is what the exception carries.
        """
        failure = SessionFailure(
            FailureKind.CLOSING,
            Stage.MAIL,
            "the server is closing",
            ServerReply(421, ("4.3.2 bye",)),
        )
        self.assertEqual(
            str(failure), "closing at mail: the server is closing (421 4.3.2 bye)"
        )
        self.assertIs(SmtpSessionError(failure).failure, failure)
        self.assertFalse(failure.next_server)
