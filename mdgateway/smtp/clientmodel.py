# -*- test-case-name: tests.test_smtp_client -*-
"""
The values an SMTP client session is given and reports (envelope, body, server
info, per-recipient results, failures) and the actions it asks its shim to carry out.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable

import attrs

from mdgateway.smtp.replyparse import ServerReply


@attrs.frozen
class SmtpTimeouts:
    """
    Client-side SMTP timeouts, RFC 5321 section 4.5.3.2 defaults (seconds).
    """

    connect: float = 30.0
    greeting: float = 300.0
    ehlo: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_term: float = 600.0


#: STARTTLS policies of an SMTP relay profile (see L{SmtpProfile.tls}).
TLS_POLICIES = ("none", "opportunistic", "required", "verify")

#: Longest wait for the reply to QUIT: it decides nothing, so a silent
#: server should not hold up the caller for the full EHLO timeout.
QUIT_TIMEOUT = 30.0

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN = re.compile(r"[\x21-\x7e]+")


class Stage(enum.Enum):
    """
    Where in the session something happened; also names the timeout that
    applies while waiting there (RFC 5321 section 4.5.3.2).
    """

    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    HELO = "helo"
    STARTTLS = "starttls"
    AUTH = "auth"
    IDLE = "idle"
    RSET = "rset"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    BODY = "body"
    DATA_END = "data_end"
    BDAT = "bdat"
    QUIT = "quit"
    LOCAL = "local"


class FailureKind(enum.Enum):
    """
    Why a session ended before it could report per-recipient verdicts.
    """

    #: Could not connect: refused, unreachable, no address, connect timeout.
    CONNECT = "connect"
    #: TLS handshake or certificate check failed, or the policy demanded
    #: STARTTLS and the server did not offer or refused it.
    TLS = "tls"
    #: The greeting was not 220 (4xx, 554, ...).
    GREETING = "greeting"
    #: EHLO and HELO were refused.
    HELO = "helo"
    #: Authentication failed, or could not be done safely (no TLS, no
    #: supported mechanism).
    AUTH = "auth"
    #: The server said 421 (closing the transmission channel).
    CLOSING = "closing"
    #: No reply (or no progress writing the body) within the timeout.
    TIMEOUT = "timeout"
    #: The peer hung up or reset the connection.
    LOST = "lost"
    #: The server broke the protocol (malformed or unexpected reply).
    PROTOCOL = "protocol"
    #: The message body could not be read locally.
    BODY = "body"
    #: The caller aborted the session.
    ABORTED = "aborted"


def _no_control(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if _CONTROL.search(value):
        raise ValueError(f"{attribute.name} must not contain control characters")


def _optional_token(
    instance: object, attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    if value is not None and not _TOKEN.fullmatch(value):
        raise ValueError(f"{attribute.name} must be printable ASCII without spaces")


def _helo_name(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not _TOKEN.fullmatch(value):
        raise ValueError("helo must be a domain or address literal without spaces")


@attrs.frozen
class Credentials:
    """
    AUTH credentials; only ever sent under TLS.
    """

    user: str = attrs.field(validator=_no_control)
    password: str = attrs.field(repr=False, validator=_no_control)


@attrs.frozen
class SessionConfig:
    """
    What one session needs to know before it starts.

    @ivar helo: the name for EHLO/HELO (C{sender_helo_domain}).
    @ivar tls: one of L{TLS_POLICIES}.
    @ivar implicit_tls: C{True} when the connection is TLS from the first
        byte (C{smtps://}); no STARTTLS then, and AUTH is allowed.
    @ivar credentials: AUTH PLAIN/LOGIN credentials, or C{None}.
    """

    helo: str = attrs.field(validator=_helo_name)
    tls: str = attrs.field(
        default="opportunistic", validator=attrs.validators.in_(TLS_POLICIES)
    )
    implicit_tls: bool = False
    credentials: Credentials | None = None
    timeouts: SmtpTimeouts = SmtpTimeouts()


@attrs.frozen
class ClientRecipient:
    """
    One envelope recipient with its optional DSN parameters (RFC 3461),
    given already encoded (xtext) as they go on the wire.
    """

    address: str = attrs.field(validator=_no_control)
    notify: str | None = attrs.field(default=None, validator=_optional_token)
    orcpt: str | None = attrs.field(default=None, validator=_optional_token)


def _recipients(values: Iterable[str | ClientRecipient]) -> tuple[ClientRecipient, ...]:
    return tuple(
        v if isinstance(v, ClientRecipient) else ClientRecipient(v) for v in values
    )


def _not_empty(
    instance: object,
    attribute: attrs.Attribute[tuple[ClientRecipient, ...]],
    value: tuple[ClientRecipient, ...],
) -> None:
    if not value:
        raise ValueError("an envelope needs at least one recipient")


@attrs.frozen
class ClientEnvelope:
    """
    One transaction's envelope.

    @ivar mail_from: the reverse path without brackets; C{""} is the null
        sender.
    @ivar recipients: recipients in order; plain strings are accepted.
    @ivar eight_bit: the body has 8-bit content (needs C{8BITMIME}).
    @ivar smtputf8: the message needs C{SMTPUTF8} (UTF-8 headers); non-ASCII
        addresses turn this on by themselves.
    @ivar ret: DSN C{RET} value (C{FULL} or C{HDRS}).
    @ivar envid: DSN C{ENVID} value, xtext-encoded.
    """

    mail_from: str = attrs.field(validator=_no_control)
    recipients: tuple[ClientRecipient, ...] = attrs.field(
        converter=_recipients, validator=_not_empty
    )
    eight_bit: bool = False
    smtputf8: bool = False
    ret: str | None = attrs.field(default=None, validator=_optional_token)
    envid: str | None = attrs.field(default=None, validator=_optional_token)

    @property
    def needs_smtputf8(self) -> bool:
        """
        C{True} if the flag is set or any address is not ASCII.
        """
        addresses = [self.mail_from] + [r.address for r in self.recipients]
        return self.smtputf8 or not all(a.isascii() for a in addresses)


@attrs.frozen
class FileRegion:
    """
    Part of a file, sent as is: C{length} bytes from C{offset}, or to the
    end of the file when C{length} is C{None}.
    """

    path: str
    offset: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    length: int | None = None


@attrs.frozen
class Chunks:
    """
    Body bytes from an iterable of chunks (read once); C{size}, if known,
    feeds C{SIZE=}.
    """

    chunks: Iterable[bytes] = attrs.field(eq=False)
    size: int | None = None


@attrs.frozen
class MessageBody:
    """
    A message as a sequence of parts sent one after the other, so a caller
    can put new header bytes in front of a spooled file without copying it.

    Line ends should already be CRLF (the spool stores them so). On the
    DATA path dot-stuffing and CRLF repair happen while streaming; BDAT
    sends the bytes unchanged.
    """

    parts: tuple[bytes | FileRegion | Chunks, ...]

    @classmethod
    def from_file(cls, path: str, offset: int = 0, prefix: bytes = b"") -> MessageBody:
        """
        The file's contents from C{offset} on, after C{prefix}.
        """
        region = FileRegion(path, offset)
        return cls((prefix, region) if prefix else (region,))

    @classmethod
    def from_bytes(cls, data: bytes) -> MessageBody:
        """
        A body held in memory (small messages, tests, bounces).
        """
        return cls((data,))

    @classmethod
    def from_chunks(
        cls, chunks: Iterable[bytes], size: int | None = None
    ) -> MessageBody:
        """
        A body produced by an iterable of byte chunks.
        """
        return cls((Chunks(chunks, size),))


@attrs.frozen
class ServerInfo:
    """
    What the client learnt about the server during session setup.

    @ivar greeting: the 220 greeting.
    @ivar ehlo: the last EHLO (or HELO) reply.
    @ivar esmtp: C{False} when the server only took HELO.
    @ivar extensions: EHLO keywords (upper case) and their parameters.
    @ivar tls: the session runs over TLS (STARTTLS or implicit).
    @ivar tls_verified: the certificate and name were checked.
    @ivar auth_mechanism: C{PLAIN} or C{LOGIN} once authenticated.
    """

    greeting: ServerReply | None = None
    ehlo: ServerReply | None = None
    esmtp: bool = False
    extensions: tuple[tuple[str, str], ...] = ()
    tls: bool = False
    tls_verified: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    auth_mechanism: str | None = None

    def extension(self, keyword: str) -> str | None:
        """
        Return the parameters of an advertised extension, C{None} if absent.
        """
        keyword = keyword.upper()
        for name, params in self.extensions:
            if name == keyword:
                return params
        return None

    def has(self, keyword: str) -> bool:
        """
        C{True} if the server advertised the extension.
        """
        return self.extension(keyword) is not None

    @property
    def size_limit(self) -> int | None:
        """
        The C{SIZE} limit, or C{None} if none was announced.
        """
        value = self.extension("SIZE")
        if value is None or not value.strip().isdigit():
            return None
        limit = int(value.strip())
        return limit or None


@attrs.frozen
class RecipientReply:
    """
    The final verdict on one recipient in one transaction.

    @ivar stage: which reply decided it: C{RCPT} (refused at RCPT),
        C{MAIL} (the sender was refused), C{DATA} (the DATA command was
        refused), C{DATA_END} or C{BDAT} (verdict on the message), or
        C{LOCAL} (refused here before sending, e.g. missing extension).
    """

    address: str
    code: int
    enhanced: str | None
    text: str
    stage: Stage

    @classmethod
    def from_reply(
        cls, address: str, reply: ServerReply, stage: Stage
    ) -> RecipientReply:
        """
        Build a verdict from a server reply.
        """
        return cls(address, reply.code, reply.enhanced, reply.text, stage)

    @property
    def delivered(self) -> bool:
        """C{True} when the server took responsibility (2xx)."""
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        """C{True} for a 4xx verdict: try again later."""
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        """C{True} for a 5xx verdict: bounce."""
        return self.code >= 500


@attrs.frozen
class TransactionResult:
    """
    The outcome of one MAIL/RCPT/DATA transaction: a verdict per recipient.

    @ivar recipients: one L{RecipientReply} per envelope recipient, in
        order.
    @ivar mail_reply: the reply to MAIL, C{None} if refused locally.
    @ivar data_reply: the reply that settled the message for the accepted
        recipients (DATA refusal, end of data or BDAT), if any.
    @ivar dsn: the DSN parameters were passed on (the server offers DSN);
        if C{False} the relay may owe the sender a "relayed" DSN.
    """

    server: ServerInfo
    recipients: tuple[RecipientReply, ...]
    mail_reply: ServerReply | None = None
    data_reply: ServerReply | None = None
    dsn: bool = False

    @property
    def delivered(self) -> tuple[RecipientReply, ...]:
        """Recipients the server accepted the message for."""
        return tuple(r for r in self.recipients if r.delivered)

    @property
    def transient(self) -> tuple[RecipientReply, ...]:
        """Recipients to retry later."""
        return tuple(r for r in self.recipients if r.transient)

    @property
    def permanent(self) -> tuple[RecipientReply, ...]:
        """Recipients to bounce."""
        return tuple(r for r in self.recipients if r.permanent)


@attrs.frozen
class SessionFailure:
    """
    The session ended without verdicts for the transaction in progress.

    No recipient of that transaction was delivered (a loss right after the
    end of data may still have delivered it: at-least-once). The relay
    decides what to do; L{next_server} says when another server of the
    profile should be tried first.

    @ivar recipients: verdicts already final when the session ended
        (recipients refused at RCPT), so they need not be retried.
    """

    kind: FailureKind
    stage: Stage
    message: str
    reply: ServerReply | None = None
    recipients: tuple[RecipientReply, ...] = ()

    @property
    def next_server(self) -> bool:
        """
        C{True} for connection, TLS and greeting failures: this server could
        not even start a session, so another one may.
        """
        return self.kind in (FailureKind.CONNECT, FailureKind.TLS, FailureKind.GREETING)

    def __str__(self) -> str:
        text = f"{self.kind.value} at {self.stage.value}: {self.message}"
        return f"{text} ({self.reply})" if self.reply is not None else text


class SmtpSessionError(Exception):
    """
    Raised when a session fails; carries the L{SessionFailure}.
    """

    def __init__(self, failure: SessionFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


# Actions: what the shim must do. ----------------------------------------


@attrs.frozen
class Send:
    """
    Write bytes. C{secret} marks AUTH lines that must never be logged.
    """

    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    secret: bool = False


@attrs.frozen
class StartClientTLS:
    """
    Start TLS on the transport now (the server said 220 to STARTTLS);
    bytes sent after this go through TLS.
    """


@attrs.frozen
class ArmTimer:
    """
    (Re)start the single session timer; on expiry call
    L{ClientSession.timer_expired}.
    """

    seconds: float
    stage: Stage


@attrs.frozen
class CancelTimer:
    """
    Stop the session timer.
    """


@attrs.frozen
class StartBody:
    """
    Start streaming the body: pass chunks to L{ClientSession.body_chunk}
    while L{ClientSession.wants_body} is true, then call
    L{ClientSession.body_end} once.
    """

    bdat: bool


@attrs.frozen
class ResumeBody:
    """
    L{ClientSession.wants_body} became true again (a BDAT reply arrived).
    """


@attrs.frozen
class StopBody:
    """
    Stop streaming and drop the body source: the server refused it.
    """


@attrs.frozen
class SessionReady:
    """
    The session is set up; transactions may start.
    """

    info: ServerInfo


@attrs.frozen
class TransactionDone:
    """
    The transaction started last is finished.
    """

    result: TransactionResult


@attrs.frozen
class SessionFailed:
    """
    The session is over because of C{failure}; it accepts nothing more.
    """

    failure: SessionFailure


@attrs.frozen
class CloseConnection:
    """
    Close the connection: C{abort} drops it at once, otherwise pending
    writes (a final C{QUIT}) are flushed first.
    """

    abort: bool = False


@attrs.frozen
class QuitDone:
    """
    The session ended at the caller's request.
    """


Action = (
    Send
    | StartClientTLS
    | ArmTimer
    | CancelTimer
    | StartBody
    | ResumeBody
    | StopBody
    | SessionReady
    | TransactionDone
    | SessionFailed
    | CloseConnection
    | QuitDone
)
