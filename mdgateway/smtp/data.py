# -*- test-case-name: tests.test_smtp_data -*-
"""
The message content of DATA and BDAT: end-of-data detection, dot-unstuffing
and the checks that keep smuggled or looping mail out.

This is the server's hot path, so it works on whole network chunks with
C{bytes.find}/C{replace}/C{count} instead of looping over lines in Python.
"""

from __future__ import annotations

import re

import attrs

from mdgateway.smtp import replies
from mdgateway.smtp.replies import Reply

_TERMINATOR = b"\r\n.\r\n"
# Suffixes of a chunk that may be the start of the terminator and so must
# wait for the next chunk, longest first.
_PARTIAL_TERMINATORS = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")


@attrs.define
class DotDecoder:
    """
    Find the end of DATA (only ever C{CRLF . CRLF}) and undo dot-stuffing.

    The stream is treated as if it were preceded by CRLF, so that a C{.} on
    the very first line is handled by the same rule as every other line; the
    two phantom bytes are never emitted.
    """

    _held: bytes = b"\r\n"
    _phantom: int = 2
    done: bool = False

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """
        Consume network bytes.

        @return: the decoded message bytes available so far, and, once the
            terminator has been seen, the bytes that followed it (the next
            pipelined commands) instead of L{None}.
        """
        buffer = self._held + data
        end = buffer.find(_TERMINATOR)
        rest: bytes | None
        if end >= 0:
            body, rest = buffer[: end + 2], buffer[end + 5 :]
            self._held = b""
            self.done = True
        else:
            keep = 0
            for partial in _PARTIAL_TERMINATORS:
                if buffer.endswith(partial):
                    keep = len(partial)
                    break
            body, rest = buffer[: len(buffer) - keep], None
            self._held = buffer[len(buffer) - keep :]
        if b"\r\n." in body:
            body = body.replace(b"\r\n.", b"\r\n")
        if self._phantom:
            cut = min(self._phantom, len(body))
            body = body[cut:]
            self._phantom -= cut
        return body, rest


@attrs.define
class BodyChecker:
    """
    Check message content as it streams: size, bare CR/LF, line length and
    the number of C{Received} headers.

    The first problem found is kept in C{refusal}; the caller keeps reading
    to the end of the message and then sends it, so the session never loses
    its place in the stream.
    """

    max_size: int
    max_line_length: int
    max_received: int
    size: int = 0
    refusal: Reply | None = None
    received_count: int = 0
    _line_length: int = 0
    _last_cr: bool = False
    _in_headers: bool = True
    _header_tail: bytes = b"\r\n"

    def _refuse(self, reply: Reply) -> None:
        if self.refusal is None:
            self.refusal = reply

    def feed(self, chunk: bytes) -> bool:
        """
        Check the next piece of content; L{False} once it must be refused.
        """
        if not chunk:
            return self.refusal is None
        self.size += len(chunk)
        if self.size > self.max_size:
            self._refuse(replies.MESSAGE_TOO_BIG)
        if self.refusal is not None:
            return False
        self._check_line_endings(chunk)
        self._check_line_length(chunk)
        if self._in_headers:
            self._count_received(chunk)
        return self.refusal is None

    def finish(self) -> bool:
        """
        The content ended. BDAT content need not end in CRLF, so a last CR
        or an over-long last line is judged only now.
        """
        if self._last_cr:
            self._refuse(replies.BARE_LINEFEED)
        elif self._line_length > self.max_line_length:
            self._refuse(replies.DATA_LINE_TOO_LONG)
        return self.refusal is None

    def _check_line_endings(self, chunk: bytes) -> None:
        crlf = chunk.count(b"\r\n")
        cr = chunk.count(b"\r")
        lf = chunk.count(b"\n")
        if self._last_cr:
            if chunk.startswith(b"\n"):
                crlf += 1
                cr += 1
            else:
                self._refuse(replies.BARE_LINEFEED)
        if chunk.endswith(b"\r"):
            cr -= 1
            self._last_cr = True
        else:
            self._last_cr = False
        if cr != crlf or lf != crlf:
            self._refuse(replies.BARE_LINEFEED)

    def _check_line_length(self, chunk: bytes) -> None:
        # bytes.split runs in C over the chunk once; a regex such as
        # [^\n]{999} would rescan every line from each of its positions.
        limit = self.max_line_length + 1  # the CR of CRLF is counted here
        pieces = chunk.split(b"\n")
        first = self._line_length + len(pieces[0])
        if len(pieces) == 1:
            self._line_length = first
        else:
            self._line_length = len(pieces[-1])
            if len(pieces) > 2 and max(map(len, pieces[1:-1])) > limit:
                self._refuse(replies.DATA_LINE_TOO_LONG)
        if first > limit or self._line_length > limit:
            self._refuse(replies.DATA_LINE_TOO_LONG)

    def _count_received(self, chunk: bytes) -> None:
        # Look only at the header block; keep ten bytes of context (one less
        # than CRLF "received:") so a field name cut by a chunk boundary is
        # seen once, and the CRLF CRLF ending the block too.
        text = self._header_tail + chunk
        end = text.find(b"\r\n\r\n")
        if end >= 0:
            text = text[: end + 2]
            self._in_headers = False
        self.received_count += len(re.findall(rb"\r\nreceived:", text.lower()))
        self._header_tail = text[-10:] if self._in_headers else b""
        if self.received_count > self.max_received:
            self._refuse(replies.TOO_MANY_HOPS)
