"""
Tests for L{mdgateway.smtp.data}: end-of-data detection and dot-unstuffing
(L{DotDecoder}) and the streaming content checks (L{BodyChecker}), with the
stream cut at arbitrary points.
"""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.smtp import replies
from mdgateway.smtp.data import BodyChecker, DotDecoder

PROPERTY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
BIG = 10**9


def stuff(message: bytes) -> bytes:
    """
    Encode C{message} for DATA the RFC 5321 4.5.2 way, independently of the
    code under test: end it with CRLF if needed, double a leading dot on
    every line, append C{.CRLF}.
    """
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    lines = message.split(b"\r\n")[:-1]
    return b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines
    ) + (b".\r\n")


def with_final_crlf(message: bytes) -> bytes:
    """
    What the receiver must hand on: the message, CRLF-terminated.
    """
    return message if not message or message.endswith(b"\r\n") else message + b"\r\n"


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """
    Split C{data} at the given offsets (any order, repeats allowed).
    """
    bounds = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def cuts_of(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=12)


def decode(pieces: list[bytes]) -> tuple[bytes, bytes | None]:
    """
    Feed C{pieces} to a fresh L{DotDecoder} as a server would: stop at the
    terminator and keep everything after it as the next commands.

    @return: the decoded content, and the bytes after the terminator
        (L{None} if it never came).
    """
    decoder = DotDecoder()
    out = []
    for index, piece in enumerate(pieces):
        content, rest = decoder.feed(piece)
        out.append(content)
        if rest is not None:
            assert decoder.done
            return b"".join(out), rest + b"".join(pieces[index + 1 :])
        assert not decoder.done
    return b"".join(out), None


def check(checker: BodyChecker, pieces: list[bytes]) -> list[bool]:
    """
    Feed every piece to C{checker}; the verdict after each.
    """
    return [checker.feed(piece) for piece in pieces]


#: A line without CR or LF, biased towards dots, which stuffing is about.
line = st.one_of(
    st.sampled_from([b"", b".", b"..", b". ", b".x", b"x.", b"QUIT", b"Subject: x"]),
    st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
line_messages = st.tuples(st.lists(line, max_size=10), st.booleans()).map(
    lambda t: b"\r\n".join(t[0]) + (b"\r\n" if t[0] and t[1] else b"")
)
#: Any bytes at all, from an alphabet that makes CR, LF and dot sequences
#: likely; bare CR and LF pass through the decoder untouched.
raw_messages = st.lists(
    st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n."]), max_size=30
).map(b"".join) | st.binary(max_size=40)
messages = line_messages | raw_messages
#: What a pipelining client sends after the terminator.
trailers = st.one_of(
    st.sampled_from(
        [b"", b"QUIT\r\n", b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"]
    ),
    st.binary(max_size=20),
    st.just(b".\r\n\r\n.\r\n"),
)
#: Sequences that some MTAs take as the end of data and we must not.
SMUGGLING = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r"]


# -- DotDecoder -------------------------------------------------------------


class DotDecoderTests(SynchronousTestCase):
    """
    L{DotDecoder} ends DATA only at CRLF.CRLF and undoes dot-stuffing,
    wherever the network cuts the stream.
    """

    def test_empty_message(self) -> None:
        """
        A terminator straight away is an empty message, the rest kept.
        """
        decoder = DotDecoder()
        self.assertEqual(decoder.feed(b".\r\nQUIT\r\n"), (b"", b"QUIT\r\n"))
        self.assertTrue(decoder.done)

    def test_simple_message(self) -> None:
        """
        The content keeps its final CRLF and loses the terminator.
        """
        self.assertEqual(
            DotDecoder().feed(b"Subject: x\r\n\r\nbody\r\n.\r\n"),
            (b"Subject: x\r\n\r\nbody\r\n", b""),
        )

    def test_unstuffing(self) -> None:
        """
        A leading dot is removed from every line, the first one included, and
        only at line starts.
        """
        content, rest = DotDecoder().feed(b"..first\r\na.b\r\n..\r\n...\r\n.\r\n")
        self.assertEqual(content, b".first\r\na.b\r\n.\r\n..\r\n")
        self.assertEqual(rest, b"")

    def test_partial_output_held(self) -> None:
        """
        A possible start of the terminator at the end of a feed is held back
        until the next feed decides; nothing is emitted twice.
        """
        decoder = DotDecoder()
        self.assertEqual(decoder.feed(b"a\r\n."), (b"a", None))
        self.assertEqual(decoder.feed(b"\r"), (b"", None))
        self.assertEqual(decoder.feed(b"x"), (b"\r\n\rx", None))
        self.assertEqual(decoder.feed(b"\r\n.\r\n"), (b"\r\n", b""))

    def test_terminator_split_everywhere(self) -> None:
        """
        The terminator is found whichever of its bytes a feed ends on.
        """
        stream = b"line\r\n.\r\nNOOP\r\n"
        for point in range(len(stream) + 1):
            self.assertEqual(
                decode([stream[:point], stream[point:]]), (b"line\r\n", b"NOOP\r\n")
            )

    def test_smuggling_sequences_do_not_end_data(self) -> None:
        """
        C{LF.LF}, C{CR.CR}, C{CRLF.LF}, C{LF.CRLF} and C{CRLF.CR} do not end
        DATA, alone or after a line.
        """
        for sequence in SMUGGLING:
            for stream in (sequence, b"a" + sequence, b"a\r\n" + sequence + b"x"):
                content, rest = decode([stream])
                self.assertIsNone(rest, stream)

    @PROPERTY
    @given(messages, trailers, st.data())
    def test_round_trip(
        self, message: bytes, trailer: bytes, data: st.DataObject
    ) -> None:
        """
        For any content, stuffed and terminated, then cut anywhere and fed
        piece by piece: the output is the content with a final CRLF, and the
        bytes after the terminator come back exactly.
        """
        stream = stuff(message) + trailer
        pieces = cut(stream, data.draw(cuts_of(stream)))
        self.assertEqual(decode(pieces), (with_final_crlf(message), trailer))

    @PROPERTY
    @given(
        st.lists(line, max_size=4).map(lambda ls: b"\r\n".join(ls)),
        st.sampled_from([b"", b"QUIT\r\n"]),
    )
    def test_every_split_of_small_inputs(self, message: bytes, trailer: bytes) -> None:
        """
        For small inputs, every two-piece split and byte-at-a-time feeding give
        the same content and trailing bytes.
        """
        stream = stuff(message) + trailer
        expected = (with_final_crlf(message), trailer)
        for point in range(len(stream) + 1):
            self.assertEqual(decode([stream[:point], stream[point:]]), expected)
        self.assertEqual(decode([bytes([b]) for b in stream]), expected)

    @PROPERTY
    @given(
        raw_messages,
        st.sampled_from(SMUGGLING),
        raw_messages,
        st.data(),
    )
    def test_smuggling_never_ends_data(
        self, before: bytes, sequence: bytes, after: bytes, data: st.DataObject
    ) -> None:
        """
        A stream that holds a smuggling sequence but no real CRLF.CRLF (the
        start of the stream counts as a line start) never ends DATA, however
        it is cut; and the content it yields is refused as bare CR/LF.
        """
        stream = before + sequence + after + b"x"
        assume(b"\r\n.\r\n" not in b"\r\n" + stream)
        pieces = cut(stream, data.draw(cuts_of(stream)))
        decoder = DotDecoder()
        checker = BodyChecker(BIG, BIG, BIG)
        for piece in pieces:
            content, rest = decoder.feed(piece)
            self.assertIsNone(rest)
            self.assertFalse(decoder.done)
            checker.feed(content)
        self.assertEqual(checker.refusal, replies.BARE_LINEFEED)


# -- BodyChecker ------------------------------------------------------------


#: CRLF-terminated lines of plain text, no CR or LF inside.
clean_lines = st.lists(
    st.binary(max_size=20).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b":", b"")
    ),
    max_size=10,
).map(lambda ls: b"".join(x + b"\r\n" for x in ls))


class BodyCheckerLineEndingTests(SynchronousTestCase):
    """
    L{BodyChecker} refuses any bare CR or bare LF with 550 5.6.11, however
    the content is cut.
    """

    def test_clean_content_accepted(self) -> None:
        """
        CRLF-only content is accepted and nothing is refused.
        """
        checker = BodyChecker(BIG, 998, 50)
        self.assertEqual(check(checker, [b"a\r\nb\r\n", b"\r\n", b"c\r\n"]), [True] * 3)
        self.assertIsNone(checker.refusal)

    def test_empty_feed(self) -> None:
        """
        An empty piece changes nothing.
        """
        checker = BodyChecker(BIG, 998, 50)
        self.assertTrue(checker.feed(b""))
        self.assertTrue(checker.feed(b"a\r"))
        self.assertTrue(checker.feed(b""))
        self.assertTrue(checker.feed(b"\nb\r\n"))

    def test_crlf_split_across_feeds(self) -> None:
        """
        A CRLF whose CR ends one feed and whose LF starts the next is fine.
        """
        checker = BodyChecker(BIG, 998, 50)
        self.assertEqual(check(checker, [b"a\r", b"\nb\r", b"\n"]), [True] * 3)

    def test_bare_line_ends_refused(self) -> None:
        """
        Bare LF, bare CR, CR CR LF and LF CR are all refused.
        """
        for content in (
            b"a\nb\r\n",
            b"a\rb\r\n",
            b"a\r\r\n",
            b"a\n\r\n",
            b"\n",
            b"\r\n\rx",
        ):
            checker = BodyChecker(BIG, 998, 50)
            self.assertEqual(
                (checker.feed(content), checker.refusal),
                (False, replies.BARE_LINEFEED),
                content,
            )

    def test_cr_then_not_lf_across_feeds(self) -> None:
        """
        A CR that ends one feed and is not followed by LF in the next is a
        bare CR.
        """
        for second in (b"x\r\n", b"\r\n", b"\r"):
            checker = BodyChecker(BIG, 998, 50)
            self.assertEqual(check(checker, [b"a\r", second]), [True, False])
            self.assertEqual(checker.refusal, replies.BARE_LINEFEED)

    def test_refusal_reply(self) -> None:
        """
        The reply is 550 5.6.11.
        """
        self.assertEqual(
            (replies.BARE_LINEFEED.code, replies.BARE_LINEFEED.status), (550, "5.6.11")
        )

    def test_bare_cr_at_end_of_content(self) -> None:
        """
        BDAT content may end with a bare CR; telling the checker the content
        ended refuses it.
        """
        checker = BodyChecker(BIG, 998, 50)
        self.assertTrue(checker.feed(b"a\r\nb\r"))
        self.assertFalse(checker.finish())
        self.assertEqual(checker.refusal, replies.BARE_LINEFEED)

    @PROPERTY
    @given(clean_lines, st.data())
    def test_clean_content_any_cuts(self, content: bytes, data: st.DataObject) -> None:
        """
        CRLF-only content is accepted however it is cut, a CRLF split between
        two feeds included.
        """
        checker = BodyChecker(BIG, BIG, BIG)
        self.assertTrue(all(check(checker, cut(content, data.draw(cuts_of(content))))))
        self.assertIsNone(checker.refusal)
        self.assertEqual(checker.size, len(content))

    @PROPERTY
    @given(clean_lines, st.sampled_from([b"\r", b"\n"]), st.data())
    def test_bare_anywhere_any_cuts(
        self, content: bytes, bare: bytes, data: st.DataObject
    ) -> None:
        """
        One bare CR or LF put anywhere in CRLF-terminated content is refused
        with 550 5.6.11 however the content is cut. (A CR as the very last
        octet, possible only with BDAT: see L{test_bare_cr_at_end_of_content}.)
        """
        assume(content or bare == b"\n")
        at = data.draw(st.integers(0, len(content) - (bare == b"\r")))
        spoiled = content[:at] + bare + content[at:]
        assume(spoiled.count(b"\r\n") == content.count(b"\r\n"))
        checker = BodyChecker(BIG, BIG, BIG)
        verdicts = check(checker, cut(spoiled, data.draw(cuts_of(spoiled))))
        self.assertFalse(verdicts[-1])
        self.assertEqual(checker.refusal, replies.BARE_LINEFEED)


class BodyCheckerSizeTests(SynchronousTestCase):
    """
    L{BodyChecker} refuses content over the size limit with 552 5.3.4.
    """

    def test_exact_limit(self) -> None:
        """
        Exactly C{max_size} octets pass; one more is refused.
        """
        checker = BodyChecker(10, 998, 50)
        self.assertEqual(check(checker, [b"1234\r\n", b"56\r\n"]), [True, True])
        self.assertEqual(checker.size, 10)
        self.assertFalse(checker.feed(b"x"))
        self.assertEqual(checker.refusal, replies.MESSAGE_TOO_BIG)
        self.assertEqual(
            (replies.MESSAGE_TOO_BIG.code, replies.MESSAGE_TOO_BIG.status),
            (552, "5.3.4"),
        )

    @PROPERTY
    @given(clean_lines, st.integers(0, 200), st.data())
    def test_size_any_cuts(
        self, content: bytes, limit: int, data: st.DataObject
    ) -> None:
        """
        Content is refused for size exactly when it is longer than the limit,
        however it is cut.
        """
        checker = BodyChecker(limit, BIG, BIG)
        check(checker, cut(content, data.draw(cuts_of(content))))
        expected = replies.MESSAGE_TOO_BIG if len(content) > limit else None
        self.assertEqual(checker.refusal, expected)


class BodyCheckerLineLengthTests(SynchronousTestCase):
    """
    L{BodyChecker} refuses a line longer than C{max_line_length} octets (not
    counting its CRLF) with 550 5.6.0.
    """

    def test_exact_limit(self) -> None:
        """
        A line of exactly the limit is accepted, one octet more refused.
        """
        ok = BodyChecker(BIG, 998, 50)
        self.assertTrue(ok.feed(b"a" * 998 + b"\r\nb\r\n"))
        long = BodyChecker(BIG, 998, 50)
        self.assertFalse(long.feed(b"b\r\n" + b"a" * 999 + b"\r\n"))
        self.assertEqual(long.refusal, replies.DATA_LINE_TOO_LONG)
        self.assertEqual(
            (replies.DATA_LINE_TOO_LONG.code, replies.DATA_LINE_TOO_LONG.status),
            (550, "5.6.0"),
        )

    def test_long_line_over_several_feeds(self) -> None:
        """
        A long line spread over many feeds is refused; a line of exactly the
        limit spread the same way, its CRLF split too, is not.
        """
        ok = BodyChecker(BIG, 998, 50)
        self.assertTrue(all(check(ok, [b"a" * 500, b"a" * 498 + b"\r", b"\n"])))
        long = BodyChecker(BIG, 998, 50)
        check(long, [b"x\r\n" + b"a" * 500, b"a" * 499, b"\r\n"])
        self.assertEqual(long.refusal, replies.DATA_LINE_TOO_LONG)
        endless = BodyChecker(BIG, 998, 50)
        self.assertEqual(check(endless, [b"a" * 600] * 3), [True, False, False])

    @PROPERTY
    @given(
        st.integers(1, 30),
        st.lists(st.integers(-3, 2), min_size=1, max_size=8),
        st.data(),
    )
    def test_line_length_any_cuts(
        self, limit: int, offsets: list[int], data: st.DataObject
    ) -> None:
        """
        With lines of lengths around the limit, content is refused for line
        length exactly when some line is longer than the limit, however it is
        cut.
        """
        lengths = [max(0, limit + o) for o in offsets]
        content = b"".join(b"a" * n + b"\r\n" for n in lengths)
        checker = BodyChecker(BIG, limit, BIG)
        check(checker, cut(content, data.draw(cuts_of(content))))
        expected = replies.DATA_LINE_TOO_LONG if max(lengths) > limit else None
        self.assertEqual(checker.refusal, expected)


RECEIVED = b"Received: from a.example by b.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n"


def message_with_received(count: int) -> bytes:
    return b"Return-Path: <a@b>\r\n" + RECEIVED * count + b"Subject: x\r\n\r\nbody\r\n"


class BodyCheckerReceivedTests(SynchronousTestCase):
    """
    L{BodyChecker} counts C{Received} header fields and refuses more than
    C{max_received} with 554 5.4.6 (a mail loop).
    """

    def test_at_limit_accepted(self) -> None:
        """
        Exactly C{max_received} Received fields pass.
        """
        checker = BodyChecker(BIG, 998, 3)
        self.assertTrue(checker.feed(message_with_received(3)))
        self.assertEqual(checker.received_count, 3)

    def test_over_limit_refused(self) -> None:
        """
        One Received field more than allowed is refused with 554 5.4.6.
        """
        checker = BodyChecker(BIG, 998, 3)
        self.assertFalse(checker.feed(message_with_received(4)))
        self.assertEqual(checker.refusal, replies.TOO_MANY_HOPS)
        self.assertEqual(
            (replies.TOO_MANY_HOPS.code, replies.TOO_MANY_HOPS.status), (554, "5.4.6")
        )

    def test_first_line_counts(self) -> None:
        """
        A Received field on the very first line is counted.
        """
        checker = BodyChecker(BIG, 998, 50)
        checker.feed(RECEIVED + b"\r\n")
        self.assertEqual(checker.received_count, 1)

    def test_case_insensitive(self) -> None:
        """
        The field name matches in any case.
        """
        checker = BodyChecker(BIG, 998, 50)
        checker.feed(b"RECEIVED: x\r\nreceived: y\r\nReCeIvEd: z\r\n\r\n")
        self.assertEqual(checker.received_count, 3)

    def test_other_fields_not_counted(self) -> None:
        """
        C{X-Received}, C{Received-SPF} and a folded line that mentions
        Received are not Received fields.
        """
        checker = BodyChecker(BIG, 998, 50)
        checker.feed(
            b"X-Received: a\r\nReceived-SPF: pass\r\nSubject: x\r\n"
            b" Received: folded\r\n\r\n"
        )
        self.assertEqual(checker.received_count, 0)

    def test_body_not_counted(self) -> None:
        """
        Received lines after the blank line that ends the header are body
        text, in the same feed or a later one.
        """
        checker = BodyChecker(BIG, 998, 1)
        body = b"Subject: x\r\n\r\n" + RECEIVED * 5
        self.assertTrue(checker.feed(body))
        self.assertTrue(checker.feed(RECEIVED * 5))
        self.assertEqual(checker.received_count, 0)

    def test_message_without_header(self) -> None:
        """
        A message that starts with the blank line has no header fields.
        """
        checker = BodyChecker(BIG, 998, 0)
        self.assertTrue(checker.feed(b"\r\n" + RECEIVED))
        self.assertEqual(checker.received_count, 0)

    def test_blank_line_split_across_feeds(self) -> None:
        """
        The end of the header is seen when its CRLF CRLF is split anywhere.
        """
        head = b"Subject: x\r\n\r\n"
        for point in range(len(head) - 4, len(head) + 1):
            checker = BodyChecker(BIG, 998, 0)
            check(checker, [head[:point], head[point:], RECEIVED])
            self.assertIsNone(checker.refusal, point)

    def test_received_split_anywhere_counted_once(self) -> None:
        """
        However a header block is cut in two, and when it is fed byte by
        byte, every Received field is counted exactly once.
        """
        message = message_with_received(2)
        for point in range(len(message) + 1):
            checker = BodyChecker(BIG, 998, 50)
            check(checker, [message[:point], message[point:]])
            self.assertEqual(checker.received_count, 2, point)
        checker = BodyChecker(BIG, 998, 1)
        check(checker, [bytes([b]) for b in message])
        self.assertEqual(checker.refusal, replies.TOO_MANY_HOPS)

    @PROPERTY
    @given(
        st.lists(
            st.sampled_from(
                [RECEIVED, b"received: x\r\n", b"Subject: x\r\n", b"X-Received: y\r\n"]
            ),
            max_size=8,
        ),
        st.integers(0, 3),
        st.data(),
    )
    def test_count_with_cuts_outside_field_names(
        self, fields: list[bytes], body_received: int, data: st.DataObject
    ) -> None:
        """
        With feed boundaries anywhere except strictly inside a C{Received:}
        name, the count is exact (each field once, body lines never) and the
        refusal matches it. (Cuts inside the name are covered above.)
        """
        message = b"".join(fields) + b"\r\n" + RECEIVED * body_received
        expected = sum(f.lower().startswith(b"received:") for f in fields)
        inside: set[int] = set()
        start = 0
        for field in fields:
            if field.lower().startswith(b"received:"):
                inside.update(range(start + 1, start + len(b"received:")))
            start += len(field)
        points = [p for p in data.draw(cuts_of(message)) if p not in inside]
        limit = data.draw(st.integers(0, 4))
        checker = BodyChecker(BIG, 998, limit)
        check(checker, cut(message, points))
        if expected > limit:
            self.assertEqual(checker.refusal, replies.TOO_MANY_HOPS)
        else:
            self.assertIsNone(checker.refusal)
            self.assertEqual(checker.received_count, expected)


class BodyCheckerRefusalTests(SynchronousTestCase):
    """
    Once L{BodyChecker} has refused, it keeps its first reason and keeps
    answering L{False}, so the caller can read on to the end of the message.
    """

    def test_stays_refused(self) -> None:
        """
        After a refusal, clean content, empty feeds and more bad content all
        give L{False}, and the first reason stays.
        """
        checker = BodyChecker(BIG, 10, 50)
        self.assertFalse(checker.feed(b"a\nb"))
        for piece in (b"clean\r\n", b"", b"x" * 100, RECEIVED * 60, b"\r"):
            self.assertFalse(checker.feed(piece))
        self.assertEqual(checker.refusal, replies.BARE_LINEFEED)

    @PROPERTY
    @given(
        st.binary(max_size=60),
        st.integers(0, 40),
        st.integers(0, 10),
        st.integers(0, 2),
        st.data(),
    )
    def test_never_raises_and_sticks(
        self,
        content: bytes,
        max_size: int,
        max_line: int,
        max_received: int,
        data: st.DataObject,
    ) -> None:
        """
        For any bytes and limits, cut anywhere: no exception, and once a feed
        answers L{False} every later one does and the reason never changes.
        """
        checker = BodyChecker(max_size, max_line, max_received)
        first = None
        for piece in cut(content, data.draw(cuts_of(content))):
            verdict = checker.feed(piece)
            if first is not None:
                self.assertFalse(verdict)
                self.assertIs(checker.refusal, first)
            elif not verdict:
                first = checker.refusal
                self.assertIsNotNone(first)

    @PROPERTY
    @given(line_messages, st.data())
    def test_decoder_and_checker_together(
        self, message: bytes, data: st.DataObject
    ) -> None:
        """
        Content stuffed and decoded through L{DotDecoder} in arbitrary pieces
        passes the checker unchanged, whatever lines start with dots.
        """
        stream = stuff(message) + b"QUIT\r\n"
        points = data.draw(cuts_of(stream))
        decoder = DotDecoder()
        checker = BodyChecker(BIG, BIG, BIG)
        out = []
        for piece in cut(stream, points):
            content, rest = decoder.feed(piece)
            out.append(content)
            if content:
                self.assertTrue(checker.feed(content))
            if rest is not None:
                break
        self.assertEqual(b"".join(out), with_final_crlf(message))
        self.assertEqual(checker.size, len(with_final_crlf(message)))
