"""
Tests for L{mdgateway.smtp.dotstuff}: streaming dot-stuffing for DATA.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.smtp.dotstuff import CRLFNormalizer, DotStuffer, dot_stuff


def unstuff(stream: bytes) -> bytes:
    """
    Decode a DATA stream the way RFC 5321 section 4.5.2 tells a server to:
    CRLF-delimited lines, a line of one dot ends the data, and a leading
    dot is removed from any other line. Fails if bytes follow the end.
    """
    lines: list[bytes] = []
    position = 0
    while True:
        end = stream.index(b"\r\n", position)
        line = stream[position:end]
        position = end + 2
        if line == b".":
            assert position == len(stream), "bytes after the end of data"
            return b"".join(lines)
        if line.startswith(b"."):
            line = line[1:]
        lines.append(line + b"\r\n")


def canonical(body: bytes) -> bytes:
    """
    What a body must decode to: every line end CRLF, and a CRLF after an
    unterminated last line.
    """
    body = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


def encode(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.encode(c) for c in chunks) + stuffer.finish()


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = [0] + sorted(c % (len(body) + 1) for c in cuts) + [len(body)]
    return [body[a:b] for a, b in zip(points, points[1:], strict=False)]


_pieces = st.one_of(
    st.sampled_from(
        [b".", b"..", b"\r\n", b"\n", b"\r", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r"]
    ),
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda t: t.encode("utf-8")),
    st.integers(min_value=990, max_value=2100).map(lambda n: b"x" * n),
)
_bodies = st.lists(_pieces, max_size=30).map(b"".join)
_crlf_bodies = st.lists(
    st.one_of(
        st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        st.sampled_from([b".", b"..", b". ", b"...x"]),
    ),
    max_size=20,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


class PropertyTests(SynchronousTestCase):
    """
    Round trips over generated bodies and chunkings.
    """

    @settings(max_examples=400, deadline=None)
    @given(_crlf_bodies, st.lists(st.integers(min_value=0), max_size=8))
    def test_crlfRoundTrip(self, body: bytes, cuts: list[int]) -> None:
        """
        A CRLF body, cut anywhere, decodes back to exactly the same bytes.
        """
        self.assertEqual(unstuff(encode(split(body, cuts))), body)

    @settings(max_examples=400, deadline=None)
    @given(_bodies, st.lists(st.integers(min_value=0), max_size=8))
    def test_anyBytesRoundTrip(self, body: bytes, cuts: list[int]) -> None:
        """
        Any bytes, cut anywhere, decode to the body with canonical CRLF line
        ends (and a CRLF added to an unterminated last line).
        """
        self.assertEqual(unstuff(encode(split(body, cuts))), canonical(body))

    @settings(max_examples=400, deadline=None)
    @given(_bodies, st.lists(st.integers(min_value=0), max_size=8))
    def test_chunkingDoesNotMatter(self, body: bytes, cuts: list[int]) -> None:
        """
        The encoded stream is the same whatever the chunk boundaries.
        """
        self.assertEqual(encode(split(body, cuts)), encode([body]))

    @settings(max_examples=400, deadline=None)
    @given(_bodies, st.lists(st.integers(min_value=0), max_size=8))
    def test_noEarlyEndOfData(self, body: bytes, cuts: list[int]) -> None:
        """
        The encoded stream contains CRLF.CRLF only as its terminator (also
        at the very start), and no bare CR or bare LF anywhere, so no
        server, strict or lenient, can see the data end early.
        """
        stream = encode(split(body, cuts))
        self.assertTrue(stream.endswith(b".\r\n"))
        self.assertEqual((b"\r\n" + stream).find(b"\r\n.\r\n"), len(stream) - 3)
        self.assertNotRegex(stream, rb"\r(?!\n)|(?<!\r)\n")


class ExampleTests(SynchronousTestCase):
    """
    Hand-picked cases, including every cut position of a tricky body.
    """

    def test_empty(self) -> None:
        """
        An empty body is just the terminator.
        """
        self.assertEqual(encode([]), b".\r\n")
        self.assertEqual(encode([b"", b""]), b".\r\n")

    def test_firstLine(self) -> None:
        """
        A dot on the very first line is doubled.
        """
        self.assertEqual(encode([b".\r\n"]), b"..\r\n.\r\n")
        self.assertEqual(encode([b".hidden\r\n"]), b"..hidden\r\n.\r\n")

    def test_noFinalNewline(self) -> None:
        """
        An unterminated last line gets CRLF before the terminator.
        """
        self.assertEqual(encode([b"abc"]), b"abc\r\n.\r\n")
        self.assertEqual(encode([b"a\r\n."]), b"a\r\n..\r\n.\r\n")

    def test_finalBareCR(self) -> None:
        """
        A CR held back at the end of the body becomes a CRLF.
        """
        self.assertEqual(encode([b"abc\r"]), b"abc\r\n.\r\n")

    def test_everyCutPosition(self) -> None:
        """
        With one or two cuts at every position, a body full of dots and
        mixed line ends encodes the same as in one piece.
        """
        body = b".a\r\n.\r\n..\n.\r.b\r\n\r\n.c"
        whole = encode([body])
        self.assertEqual(unstuff(whole), canonical(body))
        for i in range(len(body) + 1):
            for j in range(i, len(body) + 1):
                chunks = [body[:i], body[i:j], body[j:]]
                self.assertEqual(encode(chunks), whole, (i, j))

    def test_byteAtATime(self) -> None:
        """
        Feeding one byte at a time gives the same stream.
        """
        body = b"..\r\n.\r\nx\r\n.\r\n"
        self.assertEqual(
            encode([body[i : i + 1] for i in range(len(body))]), encode([body])
        )
        self.assertEqual(encode([body]), b"...\r\n..\r\nx\r\n..\r\n.\r\n")

    def test_dotStuffHelper(self) -> None:
        """
        L{dot_stuff} encodes an iterable of chunks, terminator included.
        """
        stream = b"".join(dot_stuff([b".a", b"\r", b"\n.b"]))
        self.assertEqual(stream, b"..a\r\n..b\r\n.\r\n")

    def test_normalizer(self) -> None:
        """
        L{CRLFNormalizer} never splits a CRLF and turns bare CR/LF into CRLF.
        """
        n = CRLFNormalizer()
        self.assertEqual(n.feed(b"a\r"), b"a")
        self.assertEqual(n.feed(b"\nb\n"), b"\r\nb\r\n")
        self.assertEqual(n.feed(b"\r\r"), b"\r\n")
        self.assertEqual(n.flush(), b"\r\n")
        self.assertEqual(n.flush(), b"")
