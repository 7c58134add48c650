# -*- test-case-name: tests.test_smtp_client -*-
"""
Incremental parsing of SMTP server replies (RFC 5321 section 4.2).

A reply is one or more lines C{ddd-text} closed by C{ddd text}. The client
is fed whatever the transport delivers, so the parser keeps a buffer, hands
out complete replies one at a time (the caller must be able to stop right
after a C{STARTTLS} reply and throw the rest away), and is bounded so a
hostile server cannot make it buffer without limit.
"""

from __future__ import annotations

import re

import attrs

#: Longest reply line accepted, CRLF included. RFC 5321 says 512, but real
#: servers send longer lines (long C{AUTH} or C{250-} banner lines).
MAX_LINE = 4096

#: Most lines accepted in one multi-line reply.
MAX_LINES = 256

_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=\s|$)")


class ReplySyntaxError(Exception):
    """
    The server sent something that is not an SMTP reply.
    """


@attrs.frozen
class ServerReply:
    """
    One complete server reply.

    @ivar code: the three-digit reply code.
    @ivar lines: the text of each line after C{ddd-} or C{ddd }, decoded as
        UTF-8 (invalid bytes replaced: the text is for people and logs).
    """

    code: int
    lines: tuple[str, ...] = ("",)

    @property
    def enhanced(self) -> str | None:
        """
        The RFC 3463 enhanced status code at the start of the first line, if
        its class matches the reply code (C{5.1.1} for a C{550}).
        """
        match = _ENHANCED.match(self.lines[0])
        if match is None or match.group(1) != str(self.code)[0]:
            return None
        return match.group(0)

    @property
    def text(self) -> str:
        """
        All lines joined by a space, each without the enhanced status code.
        """
        enhanced = self.enhanced
        parts = []
        for line in self.lines:
            if enhanced is not None and line.startswith(enhanced):
                line = line[len(enhanced) :].lstrip()
            parts.append(line)
        return " ".join(part for part in parts if part)

    @property
    def positive(self) -> bool:
        """C{True} for 2xx and 3xx replies."""
        return self.code < 400

    @property
    def transient(self) -> bool:
        """C{True} for 4xx replies (try again later)."""
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        """C{True} for 5xx replies."""
        return self.code >= 500

    def __str__(self) -> str:
        head = f"{self.code} {self.enhanced}" if self.enhanced else str(self.code)
        text = self.text
        return f"{head} {text}" if text else head


class ReplyParser:
    """
    Turn a byte stream into L{ServerReply} values.

    Line ends are CRLF; a bare LF is accepted too (replies are only read,
    never relayed, so leniency costs nothing here).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._code: int | None = None
        self._lines: list[str] = []

    def feed(self, data: bytes) -> None:
        """
        Add received bytes; call L{next_reply} to take complete replies.
        """
        self._buffer += data

    def next_reply(self) -> ServerReply | None:
        """
        Return the next complete reply, or C{None} if more bytes are needed.

        @raise ReplySyntaxError: the buffered bytes are not a valid reply, a
            line is too long, or a reply has too many lines.
        """
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    raise ReplySyntaxError("reply line too long")
                return None
            if end + 1 > MAX_LINE:
                raise ReplySyntaxError("reply line too long")
            line = self._buffer[:end]
            self._buffer = self._buffer[end + 1 :]
            if line.endswith(b"\r"):
                line = line[:-1]
            reply = self._line(line)
            if reply is not None:
                return reply

    def _line(self, line: bytes) -> ServerReply | None:
        match = _LINE.fullmatch(line)
        if match is None or (match.group(2) == b"" and match.group(3) != b""):
            raise ReplySyntaxError(f"not an SMTP reply line: {line[:80]!r}")
        code = int(match.group(1))
        if self._code is not None and code != self._code:
            raise ReplySyntaxError("reply code changed inside a multi-line reply")
        self._code = code
        self._lines.append(match.group(3).decode("utf-8", "replace"))
        if len(self._lines) > MAX_LINES:
            raise ReplySyntaxError("too many lines in one reply")
        if match.group(2) == b"-":
            return None
        reply = ServerReply(code, tuple(self._lines))
        self._code = None
        self._lines = []
        return reply

    def discard(self) -> None:
        """
        Drop everything buffered, including an unfinished reply.

        Used after a C{220} to C{STARTTLS}: bytes that arrived in plaintext
        behind it may have been injected by an attacker and must never be
        read as if they came over TLS.
        """
        self._buffer = b""
        self._code = None
        self._lines = []

    @property
    def pending(self) -> bool:
        """
        C{True} while part of a reply is buffered.
        """
        return bool(self._buffer) or bool(self._lines)
