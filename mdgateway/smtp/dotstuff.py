# -*- test-case-name: tests.test_dotstuff -*-
"""
Streaming dot-stuffing for the SMTP C{DATA} body (RFC 5321 section 4.5.2).

The body arrives in chunks of any size, cut anywhere: inside a CRLF, right
before a leading dot, on the first byte. State carried between chunks makes
the result independent of where the cuts fall (Twisted's own client stuffs
each chunk on its own and gets this wrong; see the design notes).

Every line ending that leaves the encoder is CRLF: a bare CR or bare LF in
the input becomes CRLF too. That is what the next hop will see as a line
anyway, and a stray C{LF.CR LF} must never reach a server that would read it
as the end of the data (SMTP smuggling).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

#: The end-of-data marker sent after the last line.
TERMINATOR = b".\r\n"


class CRLFNormalizer:
    """
    Rewrite bare CR and bare LF as CRLF across chunk boundaries.

    A CR at the end of a chunk is held back until the next byte shows
    whether it starts a CRLF, so a CRLF is never split between two outputs.
    """

    def __init__(self) -> None:
        self._held_cr = False

    def feed(self, chunk: bytes) -> bytes:
        """
        Normalise one chunk; the output may be shorter by one held CR.
        """
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return chunk.replace(b"\n", b"\r\n")

    def flush(self) -> bytes:
        """
        Return what is still held (a final CR becomes CRLF).
        """
        if self._held_cr:
            self._held_cr = False
            return b"\r\n"
        return b""


class DotStuffer:
    """
    Encode a body for C{DATA}: CRLF line ends, a dot doubled at the start of
    every line, a CRLF added to an unterminated last line, then C{.CRLF}.

    Feed chunks to L{encode}, then call L{finish} once.
    """

    def __init__(self) -> None:
        self._normalizer = CRLFNormalizer()
        self._line_start = True

    def encode(self, chunk: bytes) -> bytes:
        """
        Encode one chunk of body bytes.
        """
        return self._stuff(self._normalizer.feed(chunk))

    def finish(self) -> bytes:
        """
        Return the rest of the body and the end-of-data marker.
        """
        tail = self._stuff(self._normalizer.flush())
        if not self._line_start:
            tail += b"\r\n"
        self._line_start = True
        return tail + TERMINATOR

    def _stuff(self, data: bytes) -> bytes:
        if not data:
            return data
        # Within normalised data every line break is CRLF and a CRLF is
        # never cut, so "CRLF ." finds every line start except the first,
        # which the carried state covers.
        if self._line_start and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\r\n.", b"\r\n..")
        self._line_start = data.endswith(b"\r\n")
        return data


def dot_stuff(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """
    Encode a whole body given as chunks, terminator included.
    """
    stuffer = DotStuffer()
    for chunk in chunks:
        encoded = stuffer.encode(chunk)
        if encoded:
            yield encoded
    yield stuffer.finish()
