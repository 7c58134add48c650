# -*- test-case-name: tests.test_smtp_client -*-
"""
Sans-IO ESMTP client session: bytes and calls in, actions out.

L{ClientSession} knows SMTP and nothing about sockets, files or time. The
thin Twisted shim in L{mdgateway.smtp.clientprotocol} feeds it received
bytes, timer expiry, TLS and connection events and body chunks, and carries
out the actions it returns (write, start TLS, arm a timer, stream the body,
report a result). Everything the relay needs to decide retries and bounces
is reported, per recipient and per session, in frozen values defined here.
"""

from __future__ import annotations

import base64
import enum
from collections import deque
from collections.abc import Callable

import attrs

from mdgateway.smtp.clientmodel import (
    QUIT_TIMEOUT,
    Action,
    ArmTimer,
    CancelTimer,
    ClientEnvelope,
    CloseConnection,
    FailureKind,
    QuitDone,
    RecipientReply,
    ResumeBody,
    Send,
    ServerInfo,
    SessionConfig,
    SessionFailed,
    SessionFailure,
    SessionReady,
    Stage,
    StartBody,
    StartClientTLS,
    StopBody,
    TransactionDone,
    TransactionResult,
)
from mdgateway.smtp.dotstuff import DotStuffer
from mdgateway.smtp.replyparse import ReplyParser, ReplySyntaxError, ServerReply

_Handler = Callable[[ServerReply], list[Action]]


class _State(enum.Enum):
    NEW = "new"
    SETUP = "setup"
    READY = "ready"
    TRANSACTION = "transaction"
    QUITTING = "quitting"
    CLOSED = "closed"


@attrs.define
class _Command:
    line: bytes
    stage: Stage
    handler: _Handler


@attrs.define
class _Transaction:
    envelope: ClientEnvelope
    bdat: bool
    dsn: bool
    mail_reply: ServerReply | None = None
    rcpt_replies: list[ServerReply | None] = attrs.Factory(list)
    data_reply: ServerReply | None = None
    data_stage: Stage = Stage.DATA
    done: bool = False
    body_started: bool = False
    streaming: bool = False
    stuffer: DotStuffer | None = None
    held: bytes | None = None
    waiting: bool = False
    #: A recipient probe: MAIL and RCPT only, never DATA.
    probe: bool = False

    @property
    def mail_ok(self) -> bool:
        return self.mail_reply is not None and self.mail_reply.code // 100 == 2

    @property
    def accepted(self) -> bool:
        return self.mail_ok and any(
            r is not None and r.code // 100 == 2 for r in self.rcpt_replies
        )


def _local_refusal(
    envelope: ClientEnvelope, code: int, enhanced: str, text: str
) -> tuple[RecipientReply, ...]:
    return tuple(
        RecipientReply(r.address, code, enhanced, text, Stage.LOCAL)
        for r in envelope.recipients
    )


class ClientSession:
    """
    The client side of one SMTP connection, as a pure state machine.

    Inputs are method calls; each returns the L{Action}s to carry out, in
    order. One transaction runs at a time; after L{TransactionDone} the
    session is ready for another (an C{RSET} goes first) or for L{quit}.
    """

    def _closed(self) -> bool:
        # A method, not an attribute test: a transition inside a loop over
        # replies can close the session.
        return self._state is _State.CLOSED

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self._parser = ReplyParser()
        self._state = _State.NEW
        self._outstanding: deque[_Command] = deque()
        self._unsent: deque[_Command] = deque()
        self._pipelining = False
        self._tls = config.implicit_tls
        self._info = ServerInfo(
            tls=config.implicit_tls,
            tls_verified=config.implicit_tls and config.tls == "verify",
        )
        self._txn: _Transaction | None = None
        self._transactions = 0
        self._login_step = 0
        self._replying: Stage | None = None
        self.failure: SessionFailure | None = None

    # Introspection -------------------------------------------------------

    @property
    def info(self) -> ServerInfo:
        """
        What is known about the server so far.
        """
        return self._info

    @property
    def ready(self) -> bool:
        """
        C{True} when a transaction may start.
        """
        return self._state is _State.READY

    @property
    def closed(self) -> bool:
        """
        C{True} once the session is over (failed, quit or lost).
        """
        return self._state is _State.CLOSED

    @property
    def stage(self) -> Stage:
        """
        What the session is waiting for now.
        """
        if self._outstanding:
            return self._outstanding[0].stage
        if self._txn is not None and self._txn.streaming:
            return Stage.BODY
        if self._state is _State.NEW:
            return Stage.CONNECT
        return Stage.IDLE

    @property
    def wants_body(self) -> bool:
        """
        C{True} while the body streams and the next chunk may be sent.
        """
        txn = self._txn
        return (
            self._state is _State.TRANSACTION
            and txn is not None
            and txn.streaming
            and not txn.waiting
        )

    # Connection events ---------------------------------------------------

    def connection_made(self) -> list[Action]:
        """
        The connection is up; wait for the greeting.
        """
        self._state = _State.SETUP
        self._outstanding.append(_Command(b"", Stage.GREETING, self._on_greeting))
        return [self._arm()]

    def tls_established(self, version: str | None, cipher: str | None) -> list[Action]:
        """
        The TLS handshake completed (for the record in L{ServerInfo}).
        """
        self._info = attrs.evolve(self._info, tls_version=version, tls_cipher=cipher)
        return []

    def connection_lost(self, tls_error: bool, detail: str) -> list[Action]:
        """
        The connection is gone. C{tls_error} says the TLS layer failed (a
        handshake or certificate check error, or a loss before the
        handshake finished).
        """
        if self._state is _State.CLOSED:
            return []
        if self._state is _State.QUITTING:
            self._state = _State.CLOSED
            return [CancelTimer(), QuitDone()]
        kind = FailureKind.TLS if tls_error else FailureKind.LOST
        return self._fail(kind, f"connection lost: {detail}", close="none")

    def timer_expired(self) -> list[Action]:
        """
        The timer armed last ran out.
        """
        if self._state is _State.CLOSED:
            return []
        if self._state is _State.QUITTING:
            self._state = _State.CLOSED
            return [CloseConnection(abort=True), QuitDone()]
        stage = self.stage
        return self._fail(FailureKind.TIMEOUT, f"no progress at {stage.value}")

    def abort(self, why: str = "aborted by the caller") -> list[Action]:
        """
        Give up at once.
        """
        if self._state is _State.CLOSED:
            return []
        if self._state is _State.QUITTING:
            self._state = _State.CLOSED
            return [CancelTimer(), CloseConnection(abort=True), QuitDone()]
        return self._fail(FailureKind.ABORTED, why)

    def data_received(self, data: bytes) -> list[Action]:
        """
        Bytes from the server.
        """
        if self._state is _State.CLOSED:
            return []
        self._parser.feed(data)
        actions: list[Action] = []
        while not self._closed():
            try:
                reply = self._parser.next_reply()
            except ReplySyntaxError as e:
                actions += self._fail(FailureKind.PROTOCOL, str(e))
                break
            if reply is None:
                break
            actions += self._on_reply(reply)
        return actions

    # Caller requests -----------------------------------------------------

    def start_transaction(
        self, envelope: ClientEnvelope, size: int | None, probe: bool = False
    ) -> list[Action]:
        """
        Send one message's envelope.

        @param size: the body size in bytes for C{SIZE=}, if known.
        @param probe: send only MAIL and RCPT and report the RCPT replies
            (recipient verification); the next transaction starts with RSET.
        @raise RuntimeError: the session is not ready.
        """
        if self._state is not _State.READY:
            raise RuntimeError(f"cannot start a transaction while {self._state.value}")
        info = self._info
        smtputf8 = envelope.needs_smtputf8
        if smtputf8 and not info.has("SMTPUTF8"):
            return self._refuse_locally(
                envelope, 554, "5.6.7", "the server does not support SMTPUTF8"
            )
        if envelope.eight_bit and not info.has("8BITMIME"):
            return self._refuse_locally(
                envelope, 554, "5.6.3", "the server does not support 8BITMIME"
            )
        limit = info.size_limit
        if limit is not None and size is not None and size > limit:
            return self._refuse_locally(
                envelope,
                552,
                "5.3.4",
                f"message size {size} exceeds the server's limit of {limit}",
            )

        dsn = info.has("DSN")
        txn = _Transaction(
            envelope,
            bdat=info.has("CHUNKING") and not probe,
            dsn=dsn,
            rcpt_replies=[None] * len(envelope.recipients),
            probe=probe,
        )
        self._txn = txn
        self._state = _State.TRANSACTION
        self._pipelining = info.has("PIPELINING")

        mail = b"MAIL FROM:<" + envelope.mail_from.encode("utf-8") + b">"
        if size is not None and info.has("SIZE"):
            mail += b" SIZE=%d" % size
        if envelope.eight_bit:
            mail += b" BODY=8BITMIME"
        if smtputf8:
            mail += b" SMTPUTF8"
        if dsn and envelope.ret is not None:
            mail += b" RET=" + envelope.ret.encode("ascii")
        if dsn and envelope.envid is not None:
            mail += b" ENVID=" + envelope.envid.encode("ascii")

        commands: list[_Command] = []
        if self._transactions:
            commands.append(_Command(b"RSET", Stage.RSET, self._on_rset))
        commands.append(_Command(mail, Stage.MAIL, self._on_mail))
        for index, rcpt in enumerate(envelope.recipients):
            line = b"RCPT TO:<" + rcpt.address.encode("utf-8") + b">"
            if dsn and rcpt.notify is not None:
                line += b" NOTIFY=" + rcpt.notify.encode("ascii")
            if dsn and rcpt.orcpt is not None:
                line += b" ORCPT=" + rcpt.orcpt.encode("ascii")
            commands.append(_Command(line, Stage.RCPT, self._rcpt_handler(index)))
        if not txn.bdat and not probe:
            commands.append(_Command(b"DATA", Stage.DATA, self._on_data))
        self._transactions += 1

        if self._pipelining:
            # RFC 2920: RSET, MAIL and RCPT may appear anywhere in a group,
            # DATA only last. The body itself waits for the 354.
            self._outstanding.extend(commands)
            wire = b"".join(c.line + b"\r\n" for c in commands)
            return [Send(wire), self._arm()]
        self._unsent.extend(commands)
        return self._advance()

    def body_chunk(self, chunk: bytes) -> list[Action]:
        """
        The next piece of the body (only while L{wants_body}).
        """
        txn = self._txn
        if txn is None or not txn.streaming:
            raise RuntimeError("the body is not being streamed")
        if not chunk:
            return []
        timer = ArmTimer(self.config.timeouts.data_block, Stage.BODY)
        if not txn.bdat:
            assert txn.stuffer is not None
            return [Send(txn.stuffer.encode(chunk)), timer]
        # BDAT: hold one chunk back so the last one can carry LAST.
        held, txn.held = txn.held, chunk
        if not held:
            return [timer]
        self._outstanding.append(_Command(b"", Stage.BDAT, self._on_bdat))
        if not self._pipelining:
            txn.waiting = True
        return [Send(b"BDAT %d\r\n" % len(held) + held), timer]

    def body_end(self) -> list[Action]:
        """
        The body source is exhausted.
        """
        txn = self._txn
        if txn is None or not txn.streaming:
            raise RuntimeError("the body is not being streamed")
        txn.streaming = False
        if not txn.bdat:
            assert txn.stuffer is not None
            data = txn.stuffer.finish()
            self._outstanding.append(_Command(b"", Stage.DATA_END, self._on_data_end))
        else:
            held = txn.held or b""
            txn.held = None
            data = b"BDAT %d LAST\r\n" % len(held) + held
            # The verdict on the whole message: DATA_END names its timeout.
            self._outstanding.append(_Command(b"", Stage.DATA_END, self._on_bdat_last))
        return [Send(data), self._arm()]

    def body_failed(self, detail: str) -> list[Action]:
        """
        The body could not be read; the half-sent message cannot be
        finished, so the session ends.
        """
        return self._fail(FailureKind.BODY, detail)

    def quit(self) -> list[Action]:
        """
        End the session politely.

        @raise RuntimeError: a transaction or the setup is in progress
            (use L{abort} to give up then).
        """
        if self._state is _State.CLOSED:
            return [QuitDone()]
        if self._state is not _State.READY:
            raise RuntimeError(f"cannot QUIT while {self._state.value}")
        self._state = _State.QUITTING
        self._outstanding.append(_Command(b"QUIT", Stage.QUIT, self._on_quit))
        return [Send(b"QUIT\r\n"), self._arm()]

    # Machinery -----------------------------------------------------------

    def _arm(self) -> ArmTimer:
        stage = self.stage
        t = self.config.timeouts
        seconds = {
            Stage.GREETING: t.greeting,
            Stage.MAIL: t.mail,
            Stage.RSET: t.mail,
            Stage.RCPT: t.rcpt,
            Stage.DATA: t.data_init,
            Stage.BODY: t.data_block,
            Stage.BDAT: t.data_block,
            Stage.DATA_END: t.data_term,
            Stage.QUIT: min(t.ehlo, QUIT_TIMEOUT),
        }.get(stage, t.ehlo)
        return ArmTimer(seconds, stage)

    def _send(self, command: _Command, secret: bool = False) -> list[Action]:
        self._outstanding.append(command)
        return [Send(command.line + b"\r\n", secret), self._arm()]

    def _on_reply(self, reply: ServerReply) -> list[Action]:
        if not self._outstanding:
            if reply.code == 421:
                return self._fail(
                    FailureKind.CLOSING, "the server is closing", reply, close="close"
                )
            return self._fail(FailureKind.PROTOCOL, "unexpected reply", reply)
        command = self._outstanding.popleft()
        self._replying = command.stage
        try:
            if reply.code == 421 and command.stage is not Stage.QUIT:
                # 421 ends the session whatever was asked (RFC 5321 3.8).
                kind = (
                    FailureKind.GREETING
                    if command.stage is Stage.GREETING
                    else FailureKind.CLOSING
                )
                return self._fail(kind, "the server is closing", reply, close="close")
            actions = command.handler(reply)
        finally:
            self._replying = None
        if self._state is not _State.TRANSACTION:
            return actions
        return actions + self._advance()

    def _advance(self) -> list[Action]:
        """
        After a reply: send the next unpipelined command, start the body or
        finish the transaction, and keep the timer on what we wait for.
        """
        txn = self._txn
        assert txn is not None
        if self._outstanding:
            return [self._arm()]
        if txn.streaming:
            return []
        if txn.probe and not self._unsent:
            txn.done = True
        if self._unsent and not txn.done:
            command = self._unsent.popleft()
            if command.stage is Stage.DATA and not txn.accepted:
                txn.done = True
                self._unsent.clear()
            else:
                return self._send(command)
        if not txn.done and txn.bdat and not txn.body_started:
            if txn.accepted:
                txn.body_started = txn.streaming = True
                return [
                    StartBody(bdat=True),
                    ArmTimer(self.config.timeouts.data_block, Stage.BODY),
                ]
            txn.done = True
        if txn.done:
            return self._finish()
        return []

    def _finish(self) -> list[Action]:
        txn = self._txn
        assert txn is not None
        results = []
        for index, rcpt in enumerate(txn.envelope.recipients):
            if not txn.mail_ok:
                assert txn.mail_reply is not None
                results.append(
                    RecipientReply.from_reply(rcpt.address, txn.mail_reply, Stage.MAIL)
                )
                continue
            reply = txn.rcpt_replies[index]
            if reply is None:
                return self._fail(FailureKind.PROTOCOL, "a RCPT reply is missing")
            if reply.code // 100 != 2 or txn.probe:
                results.append(
                    RecipientReply.from_reply(rcpt.address, reply, Stage.RCPT)
                )
            elif txn.data_reply is None:
                return self._fail(FailureKind.PROTOCOL, "no verdict on the message")
            else:
                results.append(
                    RecipientReply.from_reply(
                        rcpt.address, txn.data_reply, txn.data_stage
                    )
                )
        self._txn = None
        self._state = _State.READY
        result = TransactionResult(
            server=self._info,
            recipients=tuple(results),
            mail_reply=txn.mail_reply,
            data_reply=txn.data_reply,
            dsn=txn.dsn,
        )
        return [CancelTimer(), TransactionDone(result)]

    def _refuse_locally(
        self, envelope: ClientEnvelope, code: int, enhanced: str, text: str
    ) -> list[Action]:
        result = TransactionResult(
            server=self._info,
            recipients=_local_refusal(envelope, code, enhanced, text),
        )
        return [TransactionDone(result)]

    def _fail(
        self,
        kind: FailureKind,
        message: str,
        reply: ServerReply | None = None,
        *,
        close: str = "abort",
    ) -> list[Action]:
        """
        End the session. C{close}: C{abort} drops the connection, C{close}
        closes it after pending writes, C{quit} says QUIT first, C{none}
        leaves it (already gone).
        """
        stage = self._replying or self.stage
        partial: tuple[RecipientReply, ...] = ()
        actions: list[Action] = [CancelTimer()]
        txn = self._txn
        if txn is not None:
            if txn.streaming:
                actions.append(StopBody())
            if txn.mail_ok:
                partial = tuple(
                    RecipientReply.from_reply(r.address, rr, Stage.RCPT)
                    for r, rr in zip(
                        txn.envelope.recipients, txn.rcpt_replies, strict=True
                    )
                    if rr is not None and rr.code // 100 != 2
                )
            elif txn.mail_reply is not None and txn.mail_reply.code // 100 == 5:
                partial = tuple(
                    RecipientReply.from_reply(r.address, txn.mail_reply, Stage.MAIL)
                    for r in txn.envelope.recipients
                )
            txn.streaming = False
        self._txn = None
        self._state = _State.CLOSED
        self._outstanding.clear()
        self._unsent.clear()
        failure = SessionFailure(kind, stage, message, reply, partial)
        self.failure = failure
        if close == "quit":
            actions.append(Send(b"QUIT\r\n"))
        if close != "none":
            actions.append(CloseConnection(abort=close == "abort"))
        actions.append(SessionFailed(failure))
        return actions

    # Setup replies -------------------------------------------------------

    def _ehlo(self) -> list[Action]:
        line = b"EHLO " + self.config.helo.encode("ascii")
        return self._send(_Command(line, Stage.EHLO, self._on_ehlo))

    def _on_greeting(self, reply: ServerReply) -> list[Action]:
        self._info = attrs.evolve(self._info, greeting=reply)
        if reply.code == 220:
            return self._ehlo()
        if reply.code >= 400:
            return self._fail(
                FailureKind.GREETING,
                "the server refused the session",
                reply,
                close="quit",
            )
        return self._fail(FailureKind.PROTOCOL, "unexpected greeting", reply)

    def _on_ehlo(self, reply: ServerReply) -> list[Action]:
        if reply.code // 100 == 2:
            extensions: dict[str, str] = {}
            for text in reply.lines[1:]:
                keyword, _, params = text.strip().partition(" ")
                keyword = keyword.upper()
                if keyword.startswith("AUTH="):
                    # Old form "AUTH=LOGIN PLAIN"; merge with "AUTH".
                    params = (keyword[5:] + " " + params).strip()
                    keyword = "AUTH"
                if keyword in extensions and params:
                    params = (extensions[keyword] + " " + params).strip()
                if keyword:
                    extensions[keyword] = params.strip()
            self._info = attrs.evolve(
                self._info,
                ehlo=reply,
                esmtp=True,
                extensions=tuple(extensions.items()),
            )
            return self._after_hello()
        if reply.code >= 500:
            helo = b"HELO " + self.config.helo.encode("ascii")
            return self._send(_Command(helo, Stage.HELO, self._on_helo))
        return self._fail(FailureKind.HELO, "EHLO refused", reply, close="quit")

    def _on_helo(self, reply: ServerReply) -> list[Action]:
        if reply.code // 100 != 2:
            return self._fail(FailureKind.HELO, "HELO refused", reply, close="quit")
        self._info = attrs.evolve(self._info, ehlo=reply, esmtp=False, extensions=())
        return self._after_hello()

    def _after_hello(self) -> list[Action]:
        policy = self.config.tls
        if not self._tls and policy != "none":
            if self._info.has("STARTTLS"):
                return self._send(
                    _Command(b"STARTTLS", Stage.STARTTLS, self._on_starttls)
                )
            if policy in ("required", "verify"):
                return self._fail(
                    FailureKind.TLS, "the server does not offer STARTTLS", close="quit"
                )
        return self._authenticate()

    def _on_starttls(self, reply: ServerReply) -> list[Action]:
        if reply.code == 220:
            # Anything that came in plaintext behind the 220 may have been
            # injected; it must not be read as if it came over TLS.
            self._parser.discard()
            self._tls = True
            self._info = ServerInfo(
                greeting=self._info.greeting,
                tls=True,
                tls_verified=self.config.tls == "verify",
            )
            return [StartClientTLS()] + self._ehlo()
        if self.config.tls == "opportunistic":
            return self._authenticate()
        return self._fail(FailureKind.TLS, "STARTTLS refused", reply, close="quit")

    def _authenticate(self) -> list[Action]:
        credentials = self.config.credentials
        if credentials is None:
            return self._ready()
        if not self._tls:
            return self._fail(
                FailureKind.AUTH, "will not send credentials without TLS", close="quit"
            )
        mechanisms = (self._info.extension("AUTH") or "").upper().split()
        if "PLAIN" in mechanisms:
            token = (
                b"\0"
                + credentials.user.encode()
                + b"\0"
                + credentials.password.encode()
            )
            line = b"AUTH PLAIN " + base64.b64encode(token)
            return self._send(
                _Command(line, Stage.AUTH, self._on_auth_plain), secret=True
            )
        if "LOGIN" in mechanisms:
            self._login_step = 0
            return self._send(_Command(b"AUTH LOGIN", Stage.AUTH, self._on_auth_login))
        return self._fail(
            FailureKind.AUTH,
            "the server offers neither AUTH PLAIN nor LOGIN",
            close="quit",
        )

    def _on_auth_plain(self, reply: ServerReply) -> list[Action]:
        credentials = self.config.credentials
        assert credentials is not None
        if reply.code == 235:
            return self._authenticated("PLAIN")
        if reply.code == 334:
            # The server wants the response after an empty challenge.
            token = (
                b"\0"
                + credentials.user.encode()
                + b"\0"
                + credentials.password.encode()
            )
            command = _Command(base64.b64encode(token), Stage.AUTH, self._on_auth_plain)
            return self._send(command, secret=True)
        return self._fail(
            FailureKind.AUTH, "authentication failed", reply, close="quit"
        )

    def _on_auth_login(self, reply: ServerReply) -> list[Action]:
        credentials = self.config.credentials
        assert credentials is not None
        if reply.code == 235:
            return self._authenticated("LOGIN")
        if reply.code == 334 and self._login_step < 2:
            value = credentials.user if self._login_step == 0 else credentials.password
            self._login_step += 1
            line = base64.b64encode(value.encode())
            return self._send(
                _Command(line, Stage.AUTH, self._on_auth_login), secret=True
            )
        return self._fail(
            FailureKind.AUTH, "authentication failed", reply, close="quit"
        )

    def _authenticated(self, mechanism: str) -> list[Action]:
        self._info = attrs.evolve(self._info, auth_mechanism=mechanism)
        return self._ready()

    def _ready(self) -> list[Action]:
        self._state = _State.READY
        return [CancelTimer(), SessionReady(self._info)]

    # Transaction replies -------------------------------------------------

    def _on_rset(self, reply: ServerReply) -> list[Action]:
        if reply.code // 100 != 2:
            return self._fail(FailureKind.PROTOCOL, "RSET refused", reply)
        return []

    def _on_mail(self, reply: ServerReply) -> list[Action]:
        txn = self._txn
        assert txn is not None
        txn.mail_reply = reply
        if reply.code // 100 != 2:
            txn.done = True
            self._unsent.clear()
        return []

    def _rcpt_handler(self, index: int) -> _Handler:
        def on_rcpt(reply: ServerReply) -> list[Action]:
            txn = self._txn
            assert txn is not None
            txn.rcpt_replies[index] = reply
            return []

        return on_rcpt

    def _on_data(self, reply: ServerReply) -> list[Action]:
        txn = self._txn
        assert txn is not None
        if reply.code == 354:
            if txn.done or not txn.accepted:
                # A server that says 354 with no valid recipient gets an
                # empty message, whose verdict is then ignored (RFC 2920).
                txn.done = True
                self._outstanding.append(_Command(b"", Stage.DATA_END, self._ignore))
                return [Send(b".\r\n")]
            txn.body_started = txn.streaming = True
            txn.stuffer = DotStuffer()
            return [
                StartBody(bdat=False),
                ArmTimer(self.config.timeouts.data_block, Stage.BODY),
            ]
        if not txn.done and txn.accepted:
            txn.data_reply = reply
            txn.data_stage = Stage.DATA
        txn.done = True
        return []

    def _on_data_end(self, reply: ServerReply) -> list[Action]:
        txn = self._txn
        assert txn is not None
        txn.data_reply = reply
        txn.data_stage = Stage.DATA_END
        txn.done = True
        return []

    def _on_bdat(self, reply: ServerReply) -> list[Action]:
        txn = self._txn
        assert txn is not None
        if txn.done:
            return []
        if reply.code // 100 == 2:
            if txn.waiting:
                txn.waiting = False
                return [ResumeBody()]
            return []
        # RFC 3030: after a failed chunk send no more; the RSET before the
        # next transaction clears the server's state.
        txn.data_reply = reply
        txn.data_stage = Stage.BDAT
        txn.done = True
        txn.waiting = False
        actions: list[Action] = []
        if txn.streaming:
            txn.streaming = False
            txn.held = None
            actions.append(StopBody())
        return actions

    def _on_bdat_last(self, reply: ServerReply) -> list[Action]:
        txn = self._txn
        assert txn is not None
        if not txn.done:
            txn.data_reply = reply
            txn.data_stage = Stage.BDAT
            txn.done = True
        return []

    def _ignore(self, reply: ServerReply) -> list[Action]:
        return []

    def _on_quit(self, reply: ServerReply) -> list[Action]:
        self._state = _State.CLOSED
        return [CancelTimer(), CloseConnection(), QuitDone()]
