# -*- test-case-name: tests.test_smtp_session -*-
"""
The ESMTP server session as a sans-IO state machine.

L{ServerSession} takes command lines and the answers to its questions and
returns actions: replies to send and requests for the I/O shim (check this
sender, receive message content, start TLS, close). It never touches a
socket, a clock or the disk, so every path through it is tested by feeding
it events and reading the actions back.
"""

from __future__ import annotations

import base64
import binascii
import enum

import attrs

from mdgateway.smtp import replies
from mdgateway.smtp.parse import (
    MailFrom,
    ParseError,
    RcptTo,
    parse_bdat,
    parse_command,
    parse_mail_from,
    parse_rcpt_to,
)
from mdgateway.smtp.replies import Reply

TLS_MODES = ("none", "starttls", "starttls-required", "implicit")


@attrs.frozen
class SessionSettings:
    """
    What one listener offers and enforces; shared by all its sessions.
    """

    hostname: str
    tls_mode: str = "none"
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 1000
    max_errors: int = 20
    auth_mechanisms: tuple[str, ...] = ()
    auth_required: bool = False

    @property
    def starttls_offered(self) -> bool:
        return self.tls_mode in ("starttls", "starttls-required")

    @property
    def tls_required(self) -> bool:
        return self.tls_mode in ("starttls-required", "implicit")


class State(enum.Enum):
    """
    Where the session is in the conversation.
    """

    #: Connected; no HELO/EHLO yet (again after STARTTLS).
    GREETED = "greeted"
    #: HELO/EHLO done, no transaction.
    READY = "ready"
    #: MAIL accepted; collecting recipients.
    TRANSACTION = "transaction"
    #: An AUTH exchange is waiting for the client's next line.
    AUTH = "auth"
    #: QUIT (or a fatal error): nothing more is read.
    CLOSED = "closed"


# Actions for the I/O shim, besides plain Reply objects.


@attrs.frozen
class CheckSender:
    """
    Ask the envelope handler about C{MAIL}; answer with
    L{ServerSession.sender_checked}.
    """

    mail: MailFrom


@attrs.frozen
class CheckRecipient:
    """
    Ask the envelope handler about C{RCPT}; answer with
    L{ServerSession.recipient_checked}.
    """

    mail: MailFrom
    rcpt: RcptTo


@attrs.frozen
class CheckCredentials:
    """
    Verify AUTH credentials; answer with L{ServerSession.credentials_checked}.
    """

    mechanism: str
    username: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class ReceiveData:
    """
    Switch to DATA content until CRLF.CRLF; then call L{ServerSession.message_received}.
    """


@attrs.frozen
class ReceiveChunk:
    """
    Read exactly C{size} bytes of BDAT content.

    When C{refusal} is set the bytes are read and thrown away and that reply
    sent, which keeps the session in step with the client (RFC 3030 4.2).
    """

    size: int
    last: bool
    refusal: Reply | None = None
    first: bool = False


@attrs.frozen
class StartTLS:
    """
    Start TLS now; input received before the handshake is discarded.
    """


@attrs.frozen
class Close:
    """
    Close the connection after the replies before this action are sent.
    """


Action = (
    Reply
    | CheckSender
    | CheckRecipient
    | CheckCredentials
    | ReceiveData
    | ReceiveChunk
    | StartTLS
    | Close
)


@attrs.define
class Transaction:
    """
    The mail transaction being built: sender, accepted recipients and the
    opaque binding the handler gave each (the security rule, later on).
    """

    mail: MailFrom
    recipients: list[tuple[RcptTo, object]] = attrs.Factory(list)
    chunking: bool = False
    data: bool = False


_HELP = (
    "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT",
    "See RFC 5321",
)


@attrs.define
class ServerSession:
    """
    One SMTP conversation's rules and state, free of I/O.

    @ivar tls_active: TLS is on (implicit TLS from the start, or after STARTTLS).
    """

    settings: SessionSettings
    tls_active: bool = False
    state: State = State.GREETED
    helo: str | None = None
    esmtp: bool = False
    authenticated_user: str | None = None
    transaction: Transaction | None = None
    errors: int = 0
    _auth_mechanism: str | None = None
    _auth_username: str | None = None

    def greeting(self) -> Reply:
        return Reply.of(220, "", f"{self.settings.hostname} ESMTP mdgateway")

    # -- the client's lines ------------------------------------------------

    def line(self, line: bytes) -> list[Action]:
        """
        One line from the client, without its line ending.
        """
        if self.state is State.CLOSED:
            return []
        if self.state is State.AUTH:
            return self._count(self._auth_line(line))
        try:
            command = parse_command(line)
        except ParseError as e:
            return self._count([e.reply])
        handler = getattr(self, f"_do_{command.verb}", None)
        if handler is None:
            return self._count([replies.UNKNOWN_COMMAND])
        try:
            actions: list[Action] = handler(command.argument)
        except ParseError as e:
            actions = [e.reply]
        return self._count(actions)

    def line_too_long(self) -> list[Action]:
        return self._count([replies.LINE_TOO_LONG])

    def _count(self, actions: list[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, Reply) and action.code >= 500:
                self.errors += 1
        if self.errors >= self.settings.max_errors and self.state is not State.CLOSED:
            self.state = State.CLOSED
            return [*actions, replies.TOO_MANY_ERRORS, Close()]
        return actions

    def _do_EHLO(self, argument: str) -> list[Action]:
        return self._hello(argument, esmtp=True)

    def _do_HELO(self, argument: str) -> list[Action]:
        return self._hello(argument, esmtp=False)

    def _hello(self, argument: str, esmtp: bool) -> list[Action]:
        verb = "EHLO" if esmtp else "HELO"
        if not argument or " " in argument:
            return [Reply.of(501, "5.5.4", f"Syntax: {verb} hostname")]
        self.helo = argument
        self.esmtp = esmtp
        self.transaction = None
        self.state = State.READY
        if not esmtp:
            return [Reply.of(250, "", self.settings.hostname)]
        return [Reply(250, "", (self.settings.hostname, *self.extensions()))]

    def extensions(self) -> list[str]:
        """
        The EHLO keywords this session offers right now.
        """
        offered = [
            "PIPELINING",
            f"SIZE {self.settings.max_message_size}",
        ]
        if self.settings.starttls_offered and not self.tls_active:
            offered.append("STARTTLS")
        if self.settings.auth_mechanisms and self.tls_active:
            offered.append("AUTH " + " ".join(self.settings.auth_mechanisms))
        offered += [
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "SMTPUTF8",
            "CHUNKING",
            "DSN",
        ]
        return offered

    def _do_STARTTLS(self, argument: str) -> list[Action]:
        if argument:
            return [Reply.of(501, "5.5.4", "Syntax: STARTTLS")]
        if self.tls_active:
            return [Reply.of(503, "5.5.1", "Error: TLS already active")]
        if not self.settings.starttls_offered:
            return [Reply.of(502, "5.5.1", "Error: STARTTLS not offered")]
        if self.transaction is not None:
            return [replies.BAD_SEQUENCE_NESTED]
        return [Reply.of(220, "2.0.0", "Ready to start TLS"), StartTLS()]

    def tls_started(self) -> None:
        """
        The handshake finished: forget everything learnt before (RFC 3207 4.2).
        """
        self.tls_active = True
        self.state = State.GREETED
        self.helo = None
        self.esmtp = False
        self.transaction = None

    def _ready_for_mail(self) -> Reply | None:
        if self.helo is None:
            return replies.BAD_SEQUENCE_HELO
        if self.settings.tls_required and not self.tls_active:
            return replies.TLS_REQUIRED
        return None

    def _do_AUTH(self, argument: str) -> list[Action]:
        problem = self._ready_for_mail()
        if problem is not None:
            return [problem]
        if not self.settings.auth_mechanisms:
            return [Reply.of(502, "5.5.1", "Error: authentication not enabled")]
        if not self.tls_active:
            return [
                Reply.of(
                    538,
                    "5.7.11",
                    "Encryption required for requested authentication mechanism",
                )
            ]
        if self.authenticated_user is not None:
            return [Reply.of(503, "5.5.1", "Error: already authenticated")]
        if self.transaction is not None:
            return [Reply.of(503, "5.5.1", "Error: MAIL transaction in progress")]
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in self.settings.auth_mechanisms:
            return [Reply.of(504, "5.5.4", "Unrecognized authentication mechanism")]
        self._auth_mechanism = mechanism
        self._auth_username = None
        self.state = State.AUTH
        if mechanism == "PLAIN":
            if initial:
                return self._auth_line(initial.strip().encode("ascii", "replace"))
            return [Reply.of(334, "", "")]
        if initial:
            return self._auth_line(initial.strip().encode("ascii", "replace"))
        return [Reply.of(334, "", "VXNlcm5hbWU6")]

    def _auth_line(self, line: bytes) -> list[Action]:
        mechanism = self._auth_mechanism
        if line.strip() == b"*":
            self._auth_reset()
            return [Reply.of(501, "5.7.0", "Authentication aborted")]
        try:
            decoded = base64.b64decode(line.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            self._auth_reset()
            return [Reply.of(501, "5.5.2", "Cannot decode response")]
        if mechanism == "PLAIN":
            parts = decoded.split("\0")
            if len(parts) != 3:
                self._auth_reset()
                return [Reply.of(501, "5.5.2", "Invalid PLAIN response")]
            self._auth_reset()
            return [CheckCredentials("PLAIN", parts[1], parts[2])]
        if self._auth_username is None:
            self._auth_username = decoded
            return [Reply.of(334, "", "UGFzc3dvcmQ6")]
        username = self._auth_username
        self._auth_reset()
        return [CheckCredentials("LOGIN", username, decoded)]

    def _auth_reset(self) -> None:
        self._auth_mechanism = None
        self._auth_username = None
        self.state = State.READY

    def credentials_checked(self, username: str | None) -> list[Action]:
        """
        The answer to L{CheckCredentials}: the user, or L{None} if refused.
        """
        if username is None:
            return self._count(
                [Reply.of(535, "5.7.8", "Authentication credentials invalid")]
            )
        self.authenticated_user = username
        return [Reply.of(235, "2.7.0", "Authentication successful")]

    def _do_MAIL(self, argument: str) -> list[Action]:
        problem = self._ready_for_mail()
        if problem is not None:
            return [problem]
        if self.settings.auth_required and self.authenticated_user is None:
            return [Reply.of(530, "5.7.0", "Authentication required")]
        if self.transaction is not None:
            return [replies.BAD_SEQUENCE_NESTED]
        mail = parse_mail_from(argument)
        if mail.size is not None and mail.size > self.settings.max_message_size:
            return [replies.MESSAGE_TOO_BIG]
        return [CheckSender(mail)]

    def sender_checked(self, mail: MailFrom, reply: Reply) -> list[Action]:
        """
        The answer to L{CheckSender}.
        """
        if reply.is_positive:
            self.transaction = Transaction(mail)
            self.state = State.TRANSACTION
        return self._count([reply])

    def _do_RCPT(self, argument: str) -> list[Action]:
        if self.transaction is None:
            return [replies.BAD_SEQUENCE_MAIL]
        if len(self.transaction.recipients) >= self.settings.max_recipients:
            return [replies.TOO_MANY_RECIPIENTS]
        rcpt = parse_rcpt_to(argument, self.transaction.mail.smtputf8)
        return [CheckRecipient(self.transaction.mail, rcpt)]

    def recipient_checked(
        self, rcpt: RcptTo, reply: Reply, binding: object = None
    ) -> list[Action]:
        """
        The answer to L{CheckRecipient}, with what the handler bound it to.
        """
        if reply.is_positive and self.transaction is not None:
            self.transaction.recipients.append((rcpt, binding))
        return self._count([reply])

    def _do_DATA(self, argument: str) -> list[Action]:
        if argument:
            return [Reply.of(501, "5.5.4", "Syntax: DATA")]
        if self.transaction is None:
            return [replies.BAD_SEQUENCE_MAIL]
        if self.transaction.chunking:
            return [Reply.of(503, "5.5.1", "Error: DATA after BDAT")]
        if not self.transaction.recipients:
            return [Reply.of(554, "5.5.1", "Error: no valid recipients")]
        self.transaction.data = True
        return [
            Reply.of(354, "", "End data with <CR><LF>.<CR><LF>"),
            ReceiveData(),
        ]

    def _do_BDAT(self, argument: str) -> list[Action]:
        size, last = parse_bdat(argument)
        refusal = None
        if self.transaction is None:
            refusal = replies.BAD_SEQUENCE_MAIL
        elif not self.transaction.recipients:
            refusal = Reply.of(554, "5.5.1", "Error: no valid recipients")
        if refusal is not None:
            return [ReceiveChunk(size, last, refusal)]
        assert self.transaction is not None
        first = not self.transaction.chunking
        self.transaction.chunking = True
        return [ReceiveChunk(size, last, None, first)]

    def message_received(self, reply: Reply) -> list[Action]:
        """
        The message content ended and was committed or refused with C{reply};
        the transaction is over either way.
        """
        self.transaction = None
        self.state = State.READY
        return self._count([reply])

    def chunk_refused(self, reply: Reply) -> list[Action]:
        """
        A BDAT chunk was refused: any transaction is over (RFC 3030 4.2).
        """
        if self.transaction is None:
            return self._count([reply])
        return self.message_received(reply)

    def _do_RSET(self, argument: str) -> list[Action]:
        self.transaction = None
        if self.helo is not None:
            self.state = State.READY
        return [replies.OK]

    def _do_NOOP(self, argument: str) -> list[Action]:
        return [replies.OK]

    def _do_VRFY(self, argument: str) -> list[Action]:
        if not argument:
            return [Reply.of(501, "5.5.4", "Syntax: VRFY address")]
        return [
            Reply.of(
                252,
                "2.5.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )
        ]

    def _do_EXPN(self, argument: str) -> list[Action]:
        return [Reply.of(502, "5.5.1", "Error: EXPN not supported")]

    def _do_HELP(self, argument: str) -> list[Action]:
        return [Reply(214, "2.0.0", _HELP)]

    def _do_QUIT(self, argument: str) -> list[Action]:
        self.state = State.CLOSED
        return [replies.BYE, Close()]
