"""
Event-list tests for the sans-IO ESMTP server session.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from twisted.trial.unittest import SynchronousTestCase

from mdgateway.smtp import replies
from mdgateway.smtp.parse import MailFrom
from mdgateway.smtp.replies import Reply
from mdgateway.smtp.server import (
    Action,
    CheckCredentials,
    CheckRecipient,
    CheckSender,
    Close,
    ReceiveChunk,
    ReceiveData,
    ServerSession,
    SessionSettings,
    StartTLS,
    State,
)

ACCEPT = Reply.of(250, "2.1.0", "Ok")

T = TypeVar("T")


def session(**kwargs: Any) -> ServerSession:
    return ServerSession(SessionSettings(hostname="gw.example", **kwargs))


def codes(actions: Sequence[Action]) -> list[int | str]:
    return [a.code if isinstance(a, Reply) else type(a).__name__ for a in actions]


def only(actions: Sequence[Action], kind: type[T]) -> T:
    """
    The one action the session answered with, checked to be a C{kind}, so a
    test reads its fields with their own type rather than the L{Action} union.
    """
    assert len(actions) == 1, actions
    (action,) = actions
    assert isinstance(action, kind), action
    return action


def start_transaction(s: ServerSession, rcpts: int = 1) -> None:
    s.line(b"EHLO client.example")
    check = only(s.line(b"MAIL FROM:<a@example.com>"), CheckSender)
    s.sender_checked(check.mail, ACCEPT)
    for n in range(rcpts):
        rc = only(s.line(b"RCPT TO:<r%d@example.org>" % n), CheckRecipient)
        s.recipient_checked(rc.rcpt, Reply.of(250, "2.1.5", "Ok"), "rule")


class GreetingAndHelloTests(SynchronousTestCase):
    """
    The greeting, EHLO and HELO.
    """

    def test_reply_text_is_ascii_on_the_wire(self) -> None:
        """
        Reply text that carries non-ASCII characters (a client's word quoted
        back, a downstream's text) goes out escaped: RFC 5321 4.2 replies
        are US-ASCII.
        """
        self.assertEqual(
            Reply.of(501, "5.5.4", "Bad parameter: 'D\u00c9J\u00c0'").to_bytes(),
            b"501 5.5.4 Bad parameter: 'D\\xc9J\\xc0'\r\n",
        )

    def test_greeting_names_host(self) -> None:
        """
        The banner is a 220 naming the configured host.
        """
        self.assertEqual(
            session().greeting().to_bytes(), b"220 gw.example ESMTP mdgateway\r\n"
        )

    def test_ehlo_advertises_extensions(self) -> None:
        """
        EHLO lists PIPELINING, SIZE, 8BITMIME, SMTPUTF8, CHUNKING,
        ENHANCEDSTATUSCODES and DSN; STARTTLS only when the listener offers it.
        """
        s = session(tls_mode="starttls", max_message_size=1000)
        reply = only(s.line(b"EHLO client.example"), Reply)
        self.assertEqual(reply.code, 250)
        self.assertEqual(reply.lines[0], "gw.example")
        for keyword in (
            "PIPELINING",
            "SIZE 1000",
            "8BITMIME",
            "SMTPUTF8",
            "CHUNKING",
            "ENHANCEDSTATUSCODES",
            "STARTTLS",
            "DSN",
        ):
            self.assertIn(keyword, reply.lines)
        plain = only(session().line(b"EHLO client.example"), Reply)
        self.assertNotIn("STARTTLS", plain.lines)

    def test_auth_offered_only_under_tls(self) -> None:
        """
        AUTH is not advertised before TLS and is advertised after it.
        """
        s = session(tls_mode="starttls", auth_mechanisms=("PLAIN", "LOGIN"))
        before = only(s.line(b"EHLO c"), Reply)
        self.assertNotIn("AUTH PLAIN LOGIN", before.lines)
        s.line(b"STARTTLS")
        s.tls_started()
        after = only(s.line(b"EHLO c"), Reply)
        self.assertIn("AUTH PLAIN LOGIN", after.lines)
        self.assertNotIn("STARTTLS", after.lines)

    def test_helo_requires_argument(self) -> None:
        """
        HELO and EHLO without a host name get 501 5.5.4.
        """
        for line in (b"HELO", b"EHLO"):
            reply = only(session().line(line), Reply)
            self.assertEqual((reply.code, reply.status), (501, "5.5.4"))

    def test_mail_before_helo(self) -> None:
        """
        MAIL before HELO/EHLO gets 503 5.5.1.
        """
        reply = only(session().line(b"MAIL FROM:<a@b.example>"), Reply)
        self.assertEqual((reply.code, reply.status), (503, "5.5.1"))


class TransactionTests(SynchronousTestCase):
    """
    MAIL, RCPT, DATA, BDAT, RSET and their order.
    """

    def test_full_transaction_actions(self) -> None:
        """
        MAIL asks for a sender check, RCPT for a recipient check, DATA
        answers 354 and asks for content; the final reply ends the
        transaction.
        """
        s = session()
        s.line(b"EHLO c.example")
        actions = s.line(b"MAIL FROM:<a@example.com> SIZE=10 BODY=8BITMIME")
        self.assertEqual(codes(actions), ["CheckSender"])
        mail = only(actions, CheckSender).mail
        self.assertEqual((mail.size, mail.body), (10, "8BITMIME"))
        self.assertEqual(codes(s.sender_checked(mail, ACCEPT)), [250])
        self.assertEqual(s.state, State.TRANSACTION)
        check = only(s.line(b"RCPT TO:<r@example.org> NOTIFY=FAILURE"), CheckRecipient)
        s.recipient_checked(check.rcpt, Reply.of(250, "2.1.5", "Ok"), "inbound")
        assert s.transaction is not None
        self.assertEqual(s.transaction.recipients[0][1], "inbound")
        actions = s.line(b"DATA")
        self.assertEqual(codes(actions), [354, "ReceiveData"])
        done = s.message_received(Reply.of(250, "2.0.0", "Ok: queued as X"))
        self.assertEqual(codes(done), [250])
        self.assertIsNone(s.transaction)
        self.assertEqual(s.state, State.READY)

    def test_refused_sender_leaves_no_transaction(self) -> None:
        """
        A refused MAIL does not open a transaction: RCPT then gets 503.
        """
        s = session()
        s.line(b"EHLO c")
        check = only(s.line(b"MAIL FROM:<a@example.com>"), CheckSender)
        s.sender_checked(check.mail, Reply.of(550, "5.7.1", "no"))
        reply = only(s.line(b"RCPT TO:<r@example.org>"), Reply)
        self.assertEqual((reply.code, reply.status), (503, "5.5.1"))

    def test_nested_mail(self) -> None:
        """
        A second MAIL inside a transaction gets 503 5.5.1.
        """
        s = session()
        start_transaction(s)
        reply = only(s.line(b"MAIL FROM:<b@example.com>"), Reply)
        self.assertEqual((reply.code, reply.status), (503, "5.5.1"))

    def test_size_over_limit_at_mail(self) -> None:
        """
        MAIL with SIZE= over the limit gets 552 5.3.4 before any check.
        """
        s = session(max_message_size=1000)
        s.line(b"EHLO c")
        reply = only(s.line(b"MAIL FROM:<a@example.com> SIZE=1001"), Reply)
        self.assertEqual((reply.code, reply.status), (552, "5.3.4"))

    def test_too_many_recipients(self) -> None:
        """
        The recipient after the limit gets 452 4.5.3 without a check.
        """
        s = session(max_recipients=2)
        start_transaction(s, rcpts=2)
        reply = only(s.line(b"RCPT TO:<x@example.org>"), Reply)
        self.assertEqual((reply.code, reply.status), (452, "4.5.3"))

    def test_data_without_recipients(self) -> None:
        """
        DATA with no accepted recipient gets 554 5.5.1 and no 354.
        """
        s = session()
        start_transaction(s, rcpts=0)
        self.assertEqual(codes(s.line(b"DATA")), [554])

    def test_bdat_chunks(self) -> None:
        """
        BDAT asks for exactly the announced bytes; the first chunk is marked
        so the sink is opened once; DATA after BDAT is refused.
        """
        s = session()
        start_transaction(s)
        chunk = only(s.line(b"BDAT 100"), ReceiveChunk)
        self.assertEqual(chunk, ReceiveChunk(100, False, None, True))
        reply = only(s.line(b"DATA"), Reply)
        self.assertEqual(reply.code, 503)
        last = only(s.line(b"BDAT 0 LAST"), ReceiveChunk)
        self.assertEqual(last, ReceiveChunk(0, True, None, False))

    def test_bdat_without_transaction_consumes(self) -> None:
        """
        BDAT outside a transaction still reads its bytes (so the stream stays
        in step) and then refuses with 503.
        """
        s = session()
        s.line(b"EHLO c")
        chunk = only(s.line(b"BDAT 5 LAST"), ReceiveChunk)
        self.assertEqual(chunk.size, 5)
        assert chunk.refusal is not None
        self.assertEqual(chunk.refusal.code, 503)
        self.assertEqual(codes(s.chunk_refused(chunk.refusal)), [503])

    def test_rset_noop_vrfy_help(self) -> None:
        """
        RSET clears the transaction; NOOP is 250; VRFY is 252 2.5.0; HELP is
        214; EXPN is 502; an unknown verb is 502 5.5.2.
        """
        s = session()
        start_transaction(s)
        self.assertEqual(codes(s.line(b"RSET")), [250])
        self.assertIsNone(s.transaction)
        self.assertEqual(codes(s.line(b"NOOP")), [250])
        vrfy = only(s.line(b"VRFY bob"), Reply)
        self.assertEqual((vrfy.code, vrfy.status), (252, "2.5.0"))
        self.assertEqual(codes(s.line(b"HELP")), [214])
        self.assertEqual(codes(s.line(b"EXPN list")), [502])
        unknown = only(s.line(b"FROB"), Reply)
        self.assertEqual((unknown.code, unknown.status), (502, "5.5.2"))

    def test_quit(self) -> None:
        """
        QUIT answers 221 and closes; later lines are ignored.
        """
        s = session()
        self.assertEqual(codes(s.line(b"QUIT")), [221, "Close"])
        self.assertEqual(s.line(b"NOOP"), [])

    def test_every_reply_has_enhanced_status(self) -> None:
        """
        Every reply except greeting, EHLO/HELO and AUTH challenges carries an
        x.y.z enhanced status code.
        """
        s = session(tls_mode="starttls")
        lines = [
            b"MAIL FROM:<a@b.example>",
            b"EHLO c",
            b"RCPT TO:<x@y.example>",
            b"DATA",
            b"BDAT x",
            b"NOOP",
            b"RSET",
            b"VRFY",
            b"HELP",
            b"AUTH PLAIN",
            b"FROB",
            b"\xff",
            b"MAIL FROM:<bad",
            b"STARTTLS now",
            b"QUIT",
        ]
        for line in lines:
            for action in s.line(line):
                if isinstance(action, Reply) and action.code not in (220, 250):
                    self.assertRegex(action.status, r"^[245]\.\d+\.\d+$", line)


class TLSAndAuthTests(SynchronousTestCase):
    """
    STARTTLS, TLS-required listeners and AUTH.
    """

    def test_starttls_resets_state(self) -> None:
        """
        STARTTLS answers 220 2.0.0 and asks the shim to start TLS; afterwards
        the session forgets the earlier EHLO (RFC 3207).
        """
        s = session(tls_mode="starttls")
        s.line(b"EHLO c")
        self.assertEqual(codes(s.line(b"STARTTLS")), [220, "StartTLS"])
        s.tls_started()
        self.assertIsNone(s.helo)
        reply = only(s.line(b"MAIL FROM:<a@b.example>"), Reply)
        self.assertEqual(reply.code, 503)
        again = only(s.line(b"STARTTLS"), Reply)
        self.assertEqual(again.code, 503)

    def test_starttls_not_offered(self) -> None:
        """
        STARTTLS on a listener without TLS gets 502 5.5.1.
        """
        reply = only(session().line(b"STARTTLS"), Reply)
        self.assertEqual((reply.code, reply.status), (502, "5.5.1"))

    def test_tls_required_before_mail(self) -> None:
        """
        On a starttls-required listener MAIL before TLS gets 530 5.7.0.
        """
        s = session(tls_mode="starttls-required")
        s.line(b"EHLO c")
        reply = only(s.line(b"MAIL FROM:<a@b.example>"), Reply)
        self.assertEqual((reply.code, reply.status), (530, "5.7.0"))

    def test_auth_refused_without_tls(self) -> None:
        """
        AUTH before TLS gets 538 5.7.11, never a credentials check.
        """
        s = session(tls_mode="starttls", auth_mechanisms=("PLAIN",))
        s.line(b"EHLO c")
        reply = only(s.line(b"AUTH PLAIN AGFsaWNlAHNlY3JldA=="), Reply)
        self.assertEqual((reply.code, reply.status), (538, "5.7.11"))

    def test_auth_plain_initial_response(self) -> None:
        """
        AUTH PLAIN with an initial response asks for a credentials check;
        success answers 235 2.7.0 and records the user.
        """
        s = session(tls_mode="implicit", auth_mechanisms=("PLAIN",))
        s.tls_active = True
        s.line(b"EHLO c")
        check = only(s.line(b"AUTH PLAIN AGFsaWNlAHNlY3JldA=="), CheckCredentials)
        self.assertEqual(check, CheckCredentials("PLAIN", "alice", "secret"))
        reply = only(s.credentials_checked("alice"), Reply)
        self.assertEqual((reply.code, reply.status), (235, "2.7.0"))
        self.assertEqual(s.authenticated_user, "alice")

    def test_auth_login_dialogue(self) -> None:
        """
        AUTH LOGIN asks for user name and password with 334 challenges.
        """
        s = session(tls_mode="implicit", auth_mechanisms=("LOGIN",))
        s.tls_active = True
        s.line(b"EHLO c")
        user_prompt = only(s.line(b"AUTH LOGIN"), Reply)
        self.assertEqual(user_prompt.to_bytes(), b"334 VXNlcm5hbWU6\r\n")
        pass_prompt = only(s.line(b"Ym9i"), Reply)
        self.assertEqual(pass_prompt.to_bytes(), b"334 UGFzc3dvcmQ6\r\n")
        check = only(s.line(b"cHc="), CheckCredentials)
        self.assertEqual(check, CheckCredentials("LOGIN", "bob", "pw"))
        reply = only(s.credentials_checked(None), Reply)
        self.assertEqual((reply.code, reply.status), (535, "5.7.8"))
        self.assertIsNone(s.authenticated_user)

    def test_auth_cancel_and_garbage(self) -> None:
        """
        '*' cancels AUTH with 501 5.7.0; undecodable base64 gets 501 5.5.2.
        """
        s = session(tls_mode="implicit", auth_mechanisms=("PLAIN",))
        s.tls_active = True
        s.line(b"EHLO c")
        s.line(b"AUTH PLAIN")
        cancel = only(s.line(b"*"), Reply)
        self.assertEqual((cancel.code, cancel.status), (501, "5.7.0"))
        s.line(b"AUTH PLAIN")
        bad = only(s.line(b"!!!"), Reply)
        self.assertEqual((bad.code, bad.status), (501, "5.5.2"))
        self.assertEqual(s.state, State.READY)

    def test_auth_required(self) -> None:
        """
        With auth required, MAIL before AUTH gets 530 5.7.0.
        """
        s = session(tls_mode="implicit", auth_mechanisms=("PLAIN",), auth_required=True)
        s.tls_active = True
        s.line(b"EHLO c")
        reply = only(s.line(b"MAIL FROM:<a@b.example>"), Reply)
        self.assertEqual((reply.code, reply.status), (530, "5.7.0"))


class ErrorLimitTests(SynchronousTestCase):
    """
    The error budget of a session.
    """

    def test_error_limit_closes(self) -> None:
        """
        After max_errors error replies the session answers 421 4.7.0 and
        closes.
        """
        s = session(max_errors=3)
        s.line(b"FROB")
        s.line(b"FROB")
        actions = s.line(b"FROB")
        self.assertEqual(codes(actions), [502, 421, "Close"])
        self.assertEqual(actions[1], replies.TOO_MANY_ERRORS)
        self.assertEqual(s.state, State.CLOSED)

    def test_positive_replies_do_not_count(self) -> None:
        """
        Successful commands never use up the error budget.
        """
        s = session(max_errors=2)
        for _ in range(10):
            self.assertEqual(codes(s.line(b"NOOP")), [250])
        self.assertEqual(s.errors, 0)


class ActionTypeTests(SynchronousTestCase):
    """
    Action value classes compare by value, so tests and shims can match them.
    """

    def test_values(self) -> None:
        """
        Equal actions compare equal; the password is kept out of repr.
        """
        self.assertEqual(StartTLS(), StartTLS())
        self.assertEqual(Close(), Close())
        self.assertEqual(ReceiveData(), ReceiveData())
        self.assertNotIn("secret", repr(CheckCredentials("PLAIN", "u", "secret")))
        mail = MailFrom(None, None, None, False, {})
        self.assertEqual(CheckSender(mail), CheckSender(mail))
