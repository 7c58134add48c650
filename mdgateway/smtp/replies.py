# -*- test-case-name: tests.test_smtp_session -*-
"""
SMTP replies: a code, an enhanced status code (RFC 3463) and text.

Every reply the server sends carries an enhanced status code, so clients and
log readers can tell a policy refusal (5.7.1) from a full mailbox or a
syntax error without parsing prose.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Reply:
    """
    One SMTP reply, possibly multi-line.

    @ivar code: the three-digit reply code.
    @ivar status: the enhanced status code (C{"2.0.0"}), or C{""} for the
        greeting and EHLO replies, which RFC 2034 exempts.
    @ivar lines: the text lines, without code or status.
    @ivar category: for a refusal, why, in one word of
        L{mdgateway.smtp.categories.REFUSAL_CATEGORIES}, when whoever made
        the reply knows it better than its code and text tell; not sent,
        and not part of equality.
    """

    code: int
    status: str
    lines: tuple[str, ...]
    category: str | None = attrs.field(default=None, kw_only=True, eq=False)

    @classmethod
    def of(
        cls, code: int, status: str, *lines: str, category: str | None = None
    ) -> Reply:
        return cls(code, status, lines or ("",), category=category)

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def to_bytes(self) -> bytes:
        out = []
        last = len(self.lines) - 1
        for index, line in enumerate(self.lines):
            separator = " " if index == last else "-"
            status = f"{self.status} " if self.status else ""
            out.append(f"{self.code}{separator}{status}{line}\r\n")
        # Reply text is US-ASCII (RFC 5321 4.2); anything else that slipped
        # in (a client's word quoted back, a downstream's text) is escaped.
        return "".join(out).encode("ascii", "backslashreplace")


# Replies used in more than one place. Text follows Postfix's where it has one,
# because operators grep for those words.
OK = Reply.of(250, "2.0.0", "Ok")
BYE = Reply.of(221, "2.0.0", "Bye")
BAD_SEQUENCE_HELO = Reply.of(503, "5.5.1", "Error: send HELO/EHLO first")
BAD_SEQUENCE_MAIL = Reply.of(503, "5.5.1", "Error: need MAIL command")
BAD_SEQUENCE_NESTED = Reply.of(503, "5.5.1", "Error: nested MAIL command")
BAD_SEQUENCE_RCPT = Reply.of(503, "5.5.1", "Error: need RCPT command")
UNKNOWN_COMMAND = Reply.of(502, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply.of(500, "5.5.2", "Error: line too long")
TOO_MANY_LONG_LINES = Reply.of(
    421, "4.7.0", "Error: too many long lines, closing connection"
)
TLS_REQUIRED = Reply.of(530, "5.7.0", "Must issue a STARTTLS command first")
SHUTTING_DOWN = Reply.of(421, "4.3.2", "Service shutting down, try again later")
NOT_READY = Reply.of(421, "4.3.2", "Service starting, try again later")
TOO_MANY_ERRORS = Reply.of(421, "4.7.0", "Too many errors, closing connection")
IDLE_TIMEOUT = Reply.of(421, "4.4.2", "Timeout exceeded, closing connection")
SESSION_DEADLINE = Reply.of(421, "4.4.2", "Session time limit exceeded")
BARE_LINEFEED = Reply.of(
    550, "5.6.11", "Message refused: bare CR or LF not allowed (SMTP smuggling)"
)
DATA_LINE_TOO_LONG = Reply.of(
    550, "5.6.0", "Message refused: a line exceeds the length limit"
)
MESSAGE_TOO_BIG = Reply.of(552, "5.3.4", "Message size exceeds fixed limit")
TOO_MANY_HOPS = Reply.of(554, "5.4.6", "Too many hops: mail loop detected")
TOO_MANY_RECIPIENTS = Reply.of(452, "4.5.3", "Error: too many recipients")
SPOOL_FULL = Reply.of(452, "4.3.1", "Insufficient system storage")
QUEUE_FULL = Reply.of(452, "4.3.1", "Mail queue full, try again later")
LOCAL_ERROR = Reply.of(451, "4.3.0", "Error: local error in processing")
RECORDS_BACKLOG = Reply.of(
    451,
    "4.3.0",
    "Temporarily unable to record mail, try again later",
    category="outbox_full",
)
