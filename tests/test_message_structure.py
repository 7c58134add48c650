"""
Tests for L{mdgateway.message.structure} and L{mdgateway.message.lines}.
"""

from __future__ import annotations

import io
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.message.lines import LineReader
from mdgateway.message.structure import (
    Defect,
    Entity,
    Structure,
    StructureLimits,
    parse_file,
    parse_structure,
)

CORPUS = Path(__file__).parent / "corpus"


def crlf(text: str) -> bytes:
    """
    A message written with LF line ends in the test, as CRLF bytes.
    """
    return text.replace("\n", "\r\n").encode("utf-8")


def parse(data: bytes, limits: StructureLimits | None = None) -> Structure:
    return parse_structure(io.BytesIO(data), limits)


def check_invariants(case: SynchronousTestCase, structure: Structure) -> None:
    """
    Assert what every reliable structure promises: ranges are ordered and
    nested, children of a multipart are preceded by a delimiter and followed
    by CRLF and a delimiter.
    """
    assert structure.root is not None
    case.assertEqual(structure.root.headers_start, 0)
    case.assertEqual(structure.root.end, structure.size)
    for entity in structure.walk():
        case.assertTrue(
            entity.headers_start
            <= entity.header_end
            <= entity.body_start
            <= entity.end,
            entity,
        )
        previous_end = entity.body_start
        for child in entity.children:
            case.assertTrue(previous_end <= child.headers_start, child)
            case.assertTrue(child.end <= entity.end, child)
            previous_end = child.end


class LineReaderTests(SynchronousTestCase):
    """
    Tests for L{LineReader}.
    """

    def test_lines_and_offsets(self) -> None:
        """
        C{readline} returns CRLF lines with their line ends, tracks the file
        offset, and returns the last line even without CRLF.
        """
        reader = LineReader(io.BytesIO(b"ab\r\ncd\r\nef"), chunk_size=3)
        self.assertEqual(reader.readline(100), b"ab\r\n")
        self.assertEqual(reader.offset, 4)
        self.assertEqual(reader.readline(100), b"cd\r\n")
        self.assertEqual(reader.readline(100), b"ef")
        self.assertEqual(reader.readline(100), b"")
        self.assertTrue(reader.at_eof)
        self.assertEqual(reader.offset, 10)

    def test_long_line_in_pieces(self) -> None:
        """
        A line longer than the limit comes back in pieces, and a piece never
        ends between the CR and the LF.
        """
        reader = LineReader(io.BytesIO(b"abcd\r\nx"), chunk_size=2)
        self.assertEqual(reader.readline(5), b"abcd")
        self.assertEqual(reader.readline(5), b"\r\n")
        self.assertEqual(reader.readline(5), b"x")

    def test_lone_cr_and_lf_are_line_content(self) -> None:
        """
        Only CRLF ends a line; a lone CR or LF is part of the line.
        """
        reader = LineReader(io.BytesIO(b"a\rb\nc\r\nd"))
        self.assertEqual(reader.readline(100), b"a\rb\nc\r\n")

    def test_skip_across_chunks(self) -> None:
        """
        C{skip_to_line_starting} finds a line start even when the CRLF and
        the prefix are split across reads, and stops at end of file.
        """
        data = b"x" * 10 + b"\r\n-x\r\n--hit\r\nmore"
        for size in range(1, 8):
            reader = LineReader(io.BytesIO(data), chunk_size=size)
            self.assertTrue(reader.skip_to_line_starting(b"--"))
            self.assertEqual(reader.offset, data.index(b"--hit"))
            self.assertEqual(reader.readline(100), b"--hit\r\n")
            self.assertFalse(reader.skip_to_line_starting(b"--"))
            self.assertEqual(reader.offset, len(data))

    def test_skip_counts_current_line_start(self) -> None:
        """
        At the start of the file (a line start) a matching line is found in
        place.
        """
        reader = LineReader(io.BytesIO(b"--a\r\n"))
        self.assertTrue(reader.skip_to_line_starting(b"--"))
        self.assertEqual(reader.offset, 0)

    def test_skip_not_in_middle_of_line(self) -> None:
        """
        A prefix in the middle of a line is not a line start.
        """
        reader = LineReader(io.BytesIO(b"a--b\r\nc"))
        self.assertFalse(reader.skip_to_line_starting(b"--"))

    def test_chunks(self) -> None:
        """
        C{chunks} yields the rest of the file after what was read.
        """
        reader = LineReader(io.BytesIO(b"one\r\ntwo\r\nthree"), chunk_size=4)
        reader.readline(100)
        self.assertEqual(b"".join(reader.chunks()), b"two\r\nthree")


class CorpusStructureTests(SynchronousTestCase):
    """
    The corpus messages parse into the expected trees.
    """

    def test_forwarded(self) -> None:
        """
        A forwarded message's parts are numbered below the message/rfc822
        part, with their MIME fields decoded and offsets pointing at the
        right bytes.
        """
        data = (CORPUS / "forwarded.eml").read_bytes()
        structure = parse_file(CORPUS / "forwarded.eml")
        self.assertFalse(structure.unreliable)
        check_invariants(self, structure)
        summary = [
            (entity.part_id, entity.content_type, entity.filename)
            for entity in structure.walk()
        ]
        self.assertEqual(
            summary,
            [
                ("1", "multipart/mixed", None),
                ("1.1", "text/plain", None),
                ("1.2", "message/rfc822", "Contract and data.eml"),
                ("1.2.1", "multipart/mixed", None),
                ("1.2.1.1", "text/plain", None),
                ("1.2.1.2", "application/pdf", "Vertrag für Müller.pdf"),
                ("1.2.1.3", "application/zip", "données.zip"),
                (
                    "1.3",
                    "application/vnd.openxmlformats-officedocument"
                    ".wordprocessingml.document",
                    "notes.docx",
                ),
            ],
        )
        text = structure.find("1.1")
        assert text is not None
        self.assertEqual(
            data[text.headers_start : text.header_end],
            b"Content-Type: text/plain; charset=us-ascii\r\n",
        )
        self.assertEqual(
            data[text.body_start : text.end], b"See the forwarded message below."
        )
        self.assertEqual(data[text.end : text.end + 11], b"\r\n--outer-b")
        inner = structure.find("1.2.1")
        outer = structure.find("1.2")
        assert inner is not None and outer is not None
        self.assertEqual(inner.headers_start, outer.body_start)
        self.assertEqual(inner.end, outer.end)
        self.assertTrue(data[inner.headers_start :].startswith(b"From: Carol"))
        self.assertEqual(inner.boundary, b"inner-b")
        self.assertEqual(structure.parent("1.2.1.2"), inner)

    def test_every_good_corpus_message_is_reliable(self) -> None:
        """
        Every corpus message not named C{broken-*} parses reliably and
        satisfies the structural invariants.
        """
        for path in sorted(CORPUS.glob("*.eml")):
            if path.name.startswith("broken-"):
                continue
            structure = parse_file(path)
            self.assertIsNone(structure.defect, (path.name, structure.detail))
            check_invariants(self, structure)

    def test_broken_corpus(self) -> None:
        """
        Each broken corpus message is unreliable for the expected reason.
        """
        expected = {
            "broken-missing-close.eml": Defect.MISSING_CLOSE_DELIMITER,
            "broken-wrong-boundary.eml": Defect.BOUNDARY_NOT_FOUND,
            "broken-charset.eml": Defect.UNKNOWN_CHARSET,
            "broken-8bit-headers.eml": Defect.RAW_8BIT_HEADER,
            "broken-deep.eml": Defect.TOO_DEEP,
            "broken-many-parts.eml": Defect.TOO_MANY_PARTS,
        }
        for name, defect in expected.items():
            structure = parse_file(CORPUS / name)
            self.assertEqual(structure.defect, defect, name)
            self.assertTrue(structure.unreliable)
            self.assertIsNone(structure.root)
            self.assertTrue(structure.detail)
            self.assertEqual(structure.size, (CORPUS / name).stat().st_size)

    def test_signed(self) -> None:
        """
        C{multipart/signed} marks the structure and everything inside it as
        signed; C{application/pkcs7-mime} marks the blob itself.
        """
        signed = parse_file(CORPUS / "smime-signed.eml")
        self.assertTrue(signed.signed)
        flags = {entity.part_id: entity.signed for entity in signed.walk()}
        self.assertEqual(
            flags,
            {
                "1": False,
                "1.1": True,
                "1.1.1": True,
                "1.1.2": True,
                "1.2": True,
            },
        )
        enveloped = parse_file(CORPUS / "smime-enveloped.eml")
        self.assertTrue(enveloped.signed)
        assert enveloped.root is not None
        self.assertTrue(enveloped.root.signed)
        self.assertEqual(enveloped.root.content_type, "application/pkcs7-mime")
        self.assertFalse(parse_file(CORPUS / "forwarded.eml").signed)


class StructureShapeTests(SynchronousTestCase):
    """
    Shapes of well-formed MIME that must parse reliably.
    """

    def test_plain_defaults(self) -> None:
        """
        A message without MIME fields is one text/plain 7bit entity whose
        body runs to the end of the file.
        """
        data = crlf("Subject: x\n\nbody\n")
        structure = parse(data)
        root = structure.root
        assert root is not None
        self.assertEqual(root.content_type, "text/plain")
        self.assertEqual(root.transfer_encoding, "7bit")
        self.assertEqual((root.header_end, root.body_start), (12, 14))
        self.assertEqual(data[root.body_start : root.end], b"body\r\n")
        self.assertTrue(root.is_leaf)

    def test_headers_only(self) -> None:
        """
        A message that is only a header block (no blank line, no final
        CRLF) is one entity with an empty body.
        """
        structure = parse(b"Subject: x\r\nFrom: y")
        root = structure.root
        assert root is not None
        self.assertEqual((root.header_end, root.body_start, root.end), (19, 19, 19))

    def test_empty_file(self) -> None:
        """
        An empty file is an empty text/plain message, not an error.
        """
        structure = parse(b"")
        assert structure.root is not None
        self.assertEqual(structure.size, 0)

    def test_no_preamble_and_empty_body(self) -> None:
        """
        A delimiter on the first body line means an empty preamble, and a
        part whose blank line is directly followed by a delimiter has an
        empty body.
        """
        data = crlf(
            'Content-Type: multipart/mixed; boundary="b"\n\n--b\n'
            "Content-Type: text/plain\n\n--b\n\nx\n--b--\n"
        )
        structure = parse(data)
        assert structure.root is not None
        first, second = structure.root.children
        self.assertEqual(
            data[first.headers_start : first.end], b"Content-Type: text/plain\r\n"
        )
        self.assertEqual(first.body_start, first.end)
        self.assertEqual(second.headers_start, second.header_end)
        self.assertEqual(data[second.body_start : second.end], b"x")

    def test_transport_padding(self) -> None:
        """
        Spaces and tabs after a delimiter (transport padding) are allowed,
        as is a close-delimiter at the very end without CRLF.
        """
        data = crlf(
            'Content-Type: multipart/mixed; boundary="b"\n\n--b \t\n\nx\n--b--'
        ).rstrip(b"\r\n")
        structure = parse(data)
        self.assertIsNone(structure.defect, structure.detail)

    def test_digest_default(self) -> None:
        """
        Parts of multipart/digest default to message/rfc822 and are parsed
        as messages.
        """
        data = crlf(
            'Content-Type: multipart/digest; boundary="d"\n\n--d\n\n'
            "Subject: inner\n\ninner body\n--d--\n"
        )
        structure = parse(data)
        part = structure.find("1.1")
        inner = structure.find("1.1.1")
        assert part is not None and inner is not None
        self.assertEqual(part.content_type, "message/rfc822")
        self.assertEqual(data[inner.body_start : inner.end], b"inner body")

    def test_encoded_message_is_a_leaf(self) -> None:
        """
        A message/rfc822 part with a base64 transfer encoding (forbidden but
        seen) is a leaf to be decoded whole, not parsed in place (the
        decomposer also offers its encoded text, which some readers take for
        the message); an encoded delivery-status is unreliable.
        """
        data = crlf(
            'Content-Type: multipart/mixed; boundary="b"\n\n--b\n'
            "Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
            "U3ViamVjdDogeAoKeQo=\n--b--\n"
        )
        part = parse(data).find("1.1")
        assert part is not None
        self.assertTrue(part.is_leaf)
        data = crlf(
            "Content-Type: message/delivery-status\n"
            "Content-Transfer-Encoding: base64\n\nU3RhdHVzOiA1LjAuMAo=\n"
        )
        self.assertEqual(parse(data).defect, Defect.BAD_TRANSFER_ENCODING)

    def test_every_message_type_is_parsed(self) -> None:
        """
        Every message/* type but delivery-status holds a message parsed in
        turn (readers parse message/partial, message/news ... as messages);
        message/delivery-status stays one leaf.
        """
        for kind in ("message/partial", "message/news", "MESSAGE/external-body"):
            data = crlf(
                f"Content-Type: {kind}\n\nContent-Type: application/pdf\n"
                "Content-Transfer-Encoding: base64\n\nJVBERi0xLjQK\n"
            )
            inner = parse(data).find("1.1")
            assert inner is not None, kind
            self.assertEqual(inner.content_type, "application/pdf")
        data = crlf("Content-Type: message/delivery-status\n\nStatus: 5.0.0\n")
        root = parse(data).root
        assert root is not None
        self.assertTrue(root.is_leaf)

    def test_utf8_headers_accepted(self) -> None:
        """
        Raw UTF-8 in MIME fields (RFC 6532) is accepted and decoded.
        """
        data = (
            b"Content-Type: application/pdf\r\n"
            b'Content-Disposition: attachment; filename="\xc3\xa9t\xc3\xa9.pdf"\r\n'
            b"\r\nx"
        )
        root = parse(data).root
        assert root is not None
        self.assertEqual(root.filename, "été.pdf")

    def test_filename_cleaned(self) -> None:
        """
        File names lose directories and control or format characters.
        """
        data = crlf(
            "Content-Type: application/octet-stream;\n"
            ' name="=?utf-8?q?..=2F..=2Fetc=2Fevil=E2=80=AEfdp.exe?="\n\nx'
        )
        root = parse(data).root
        assert root is not None
        self.assertEqual(root.filename, "evilfdp.exe")

    def test_comment_in_charset(self) -> None:
        """
        A comment after a parameter value is not part of the value.
        """
        data = crlf("Content-Type: text/plain; charset=us-ascii (Plain text)\n\nx")
        root = parse(data).root
        assert root is not None
        self.assertEqual(root.charset, "us-ascii")

    def test_unknown_charset_tolerated_when_not_strict(self) -> None:
        """
        With C{strict_charsets} off, an unknown charset does not make the
        structure unreliable.
        """
        data = crlf("Content-Type: text/plain; charset=x-unknown\n\nx")
        self.assertEqual(parse(data).defect, Defect.UNKNOWN_CHARSET)
        relaxed = parse(data, StructureLimits(strict_charsets=False))
        self.assertIsNone(relaxed.defect)

    def test_limits_at_the_edge(self) -> None:
        """
        Exactly C{max_parts} entities and C{max_depth} nesting are allowed.
        """
        parts = "".join(f"--b\n\n{index}\n" for index in range(4))
        data = crlf(f'Content-Type: multipart/mixed; boundary="b"\n\n{parts}--b--\n')
        self.assertIsNone(parse(data, StructureLimits(max_parts=5)).defect)
        self.assertEqual(
            parse(data, StructureLimits(max_parts=4)).defect, Defect.TOO_MANY_PARTS
        )
        self.assertIsNone(parse(data, StructureLimits(max_depth=1)).defect)
        self.assertEqual(
            parse(data, StructureLimits(max_depth=0)).defect, Defect.TOO_DEEP
        )


class DefectTests(SynchronousTestCase):
    """
    Each kind of broken MIME is reported, never raised.
    """

    def assertDefect(
        self, text: str, defect: Defect, limits: StructureLimits | None = None
    ) -> None:
        structure = parse(crlf(text), limits)
        self.assertEqual(structure.defect, defect, structure.detail)
        self.assertIsNone(structure.root)
        self.assertTrue(structure.unreliable)

    def test_space_before_colon(self) -> None:
        """
        A field with space before its colon (obsolete syntax) ends the
        header block for some readers and not for others: unreliable,
        whichever field it is.
        """
        for field in ("Content-Type : application/pdf", "X-Other\t: 1"):
            self.assertDefect(
                f"{field}\nContent-Type: text/plain\n\nx\n", Defect.BAD_HEADER
            )

    def test_transfer_encoding_not_a_bare_token(self) -> None:
        """
        A Content-Transfer-Encoding with anything but a bare token (trailing
        space, a comment, a parameter, a folded value) is decoded by some
        readers and taken as 7bit by others: unreliable. Case does not
        matter.
        """
        for value in ("base64 ", "base64 (x)", "base64; x=1", "\n base64", "base64\t"):
            self.assertDefect(
                f"Content-Type: application/pdf\nContent-Transfer-Encoding: {value}"
                "\n\nJVBERi0xLjQK\n",
                Defect.AMBIGUOUS_HEADER,
            )
        data = crlf(
            "Content-Type: application/pdf\nContent-Transfer-Encoding:BASE64\n\nx\n"
        )
        root = parse(data).root
        assert root is not None
        self.assertEqual(root.transfer_encoding, "base64")

    def test_missing_close(self) -> None:
        """
        A multipart that ends without its close-delimiter is unreliable.
        """
        self.assertDefect(
            'Content-Type: multipart/mixed; boundary="b"\n\n--b\n\nx\n',
            Defect.MISSING_CLOSE_DELIMITER,
        )

    def test_inner_closed_by_outer(self) -> None:
        """
        An inner multipart ended by an outer delimiter, without its own
        close-delimiter, is unreliable.
        """
        self.assertDefect(
            'Content-Type: multipart/mixed; boundary="outer"\n\n--outer\n'
            'Content-Type: multipart/mixed; boundary="inner"\n\n--inner\n\nx\n'
            "--outer--\n",
            Defect.MISSING_CLOSE_DELIMITER,
        )

    def test_boundary_not_found(self) -> None:
        """
        A multipart whose boundary never appears is unreliable.
        """
        self.assertDefect(
            'Content-Type: multipart/mixed; boundary="b"\n\n--c\n\nx\n--c--\n',
            Defect.BOUNDARY_NOT_FOUND,
        )

    def test_multipart_without_body(self) -> None:
        """
        A multipart message that is only headers is unreliable.
        """
        self.assertDefect(
            'Content-Type: multipart/mixed; boundary="b"\n', Defect.BOUNDARY_NOT_FOUND
        )

    def test_empty_multipart(self) -> None:
        """
        A multipart with a close-delimiter but no parts is unreliable.
        """
        self.assertDefect(
            'Content-Type: multipart/mixed; boundary="b"\n\n--b--\n',
            Defect.EMPTY_MULTIPART,
        )

    def test_delimiter_with_garbage(self) -> None:
        """
        A line that starts with a delimiter but has more after it is a
        delimiter to some readers and not to others: unreliable.
        """
        self.assertDefect(
            'Content-Type: multipart/mixed; boundary="b"\n\n--b\n\nx\n--bx\n'
            "Content-Type: application/x-msdownload\n\nMZ\n--b--\n",
            Defect.AMBIGUOUS_DELIMITER,
        )

    def test_same_boundary_nested(self) -> None:
        """
        A nested multipart reusing its parent's boundary is unreliable.
        """
        self.assertDefect(
            'Content-Type: multipart/mixed; boundary="b"\n\n--b\n'
            'Content-Type: multipart/mixed; boundary="b"\n\n--b\n\nx\n--b--\n--b--\n',
            Defect.AMBIGUOUS_DELIMITER,
        )

    def test_delimiter_after_close(self) -> None:
        """
        A delimiter in the epilogue (after the close-delimiter) is
        unreliable: some readers keep parsing parts there.
        """
        self.assertDefect(
            'Content-Type: multipart/mixed; boundary="b"\n\n--b\n\nx\n--b--\n'
            "--b\n\nhidden\n",
            Defect.AMBIGUOUS_DELIMITER,
        )

    def test_duplicate_content_type(self) -> None:
        """
        Two Content-Type fields in one entity are ambiguous.
        """
        self.assertDefect(
            "Content-Type: text/plain\nContent-Type: application/x-msdownload\n\nx",
            Defect.AMBIGUOUS_HEADER,
        )

    def test_duplicate_parameter(self) -> None:
        """
        Two boundary (or filename) parameters are ambiguous.
        """
        self.assertDefect(
            'Content-Type: multipart/mixed; boundary="a"; boundary="b"\n\n--a\n\nx\n'
            "--a--\n",
            Defect.AMBIGUOUS_HEADER,
        )
        self.assertDefect(
            "Content-Type: application/pdf\n"
            'Content-Disposition: attachment; filename="a.pdf"; filename="a.exe"\n\nx',
            Defect.AMBIGUOUS_HEADER,
        )

    def test_not_a_header(self) -> None:
        """
        A line in a header block that is not a field (nor a continuation)
        is unreliable: readers disagree on where the body starts.
        """
        self.assertDefect("Subject: x\nthis is not a header\n\nbody", Defect.BAD_HEADER)
        self.assertDefect(" leading continuation\n\nbody", Defect.BAD_HEADER)
        self.assertDefect("Bad Name: x\n\nbody", Defect.BAD_HEADER)

    def test_bare_lf_in_header(self) -> None:
        """
        A bare CR or LF inside a header line is unreliable.
        """
        structure = parse(b"Subject: a\nContent-Type: text/html\r\n\r\nx")
        self.assertEqual(structure.defect, Defect.BAD_HEADER)

    def test_header_too_large(self) -> None:
        """
        A header block larger than the limit is unreliable, and the parser
        does not buffer beyond it.
        """
        self.assertDefect(
            "Subject: " + "x" * 500 + "\n\nbody",
            Defect.HEADER_TOO_LARGE,
            StructureLimits(max_header_bytes=100),
        )

    def test_raw_8bit(self) -> None:
        """
        Raw bytes that are not UTF-8 in a MIME field are unreliable.
        """
        structure = parse(
            b'Content-Type: application/pdf; name="\xe9t\xe9.pdf"\r\n\r\nx'
        )
        self.assertEqual(structure.defect, Defect.RAW_8BIT_HEADER)

    def test_part_ends_in_headers(self) -> None:
        """
        A part with header fields but no blank line before the next
        delimiter is unreliable.
        """
        self.assertDefect(
            'Content-Type: multipart/mixed; boundary="b"\n\n--b\n'
            "Content-Type: text/plain\n--b--\n",
            Defect.MISSING_SEPARATOR,
        )

    def test_bad_content_type(self) -> None:
        """
        A Content-Type that is not type/subtype, or a multipart without a
        boundary, is unreliable.
        """
        self.assertDefect("Content-Type: text\n\nx", Defect.BAD_CONTENT_TYPE)
        self.assertDefect(
            "Content-Type: multipart/mixed\n\n--b\n\nx\n--b--\n",
            Defect.BAD_CONTENT_TYPE,
        )

    def test_bad_transfer_encoding(self) -> None:
        """
        An unknown transfer encoding, or base64 on a multipart, is
        unreliable.
        """
        self.assertDefect(
            "Content-Transfer-Encoding: x-uuencode\n\nbegin 644 a\n",
            Defect.BAD_TRANSFER_ENCODING,
        )
        self.assertDefect(
            'Content-Type: multipart/mixed; boundary="b"\n'
            "Content-Transfer-Encoding: base64\n\n--b\n\nx\n--b--\n",
            Defect.BAD_TRANSFER_ENCODING,
        )

    def test_unknown_charset_in_filename(self) -> None:
        """
        An encoded file name in an unknown charset is unreliable.
        """
        self.assertDefect(
            "Content-Type: application/pdf\n"
            "Content-Disposition: attachment; filename*=x-mystery''%E9.pdf\n\nx",
            Defect.UNKNOWN_CHARSET,
        )
        self.assertDefect(
            'Content-Type: application/pdf; name="=?x-mystery?q?=E9.pdf?="\n\nx',
            Defect.UNKNOWN_CHARSET,
        )

    def test_too_deep_messages(self) -> None:
        """
        Nesting by attached messages counts towards the depth limit.
        """
        text = "Subject: bottom\n\nx\n"
        for _ in range(5):
            text = "Content-Type: message/rfc822\n\n" + text
        self.assertDefect(text, Defect.TOO_DEEP, StructureLimits(max_depth=4))


class RobustnessTests(SynchronousTestCase):
    """
    No input makes the parser raise or run away.
    """

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=4000))
    def test_random_bytes(self, data: bytes) -> None:
        """
        Random bytes parse to a structure (reliable or not); a reliable one
        satisfies the invariants.
        """
        structure = parse(data)
        self.assertEqual(structure.size, len(data))
        if not structure.unreliable:
            check_invariants(self, structure)

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from(sorted(CORPUS.glob("*.eml"))),
        st.lists(
            st.tuples(
                st.integers(min_value=0, max_value=2**20),
                st.integers(min_value=0, max_value=64),
                st.binary(max_size=40),
            ),
            min_size=1,
            max_size=5,
        ),
    )
    def test_mutated_corpus(
        self, path: Path, mutations: list[tuple[int, int, bytes]]
    ) -> None:
        """
        Corpus messages with bytes deleted, replaced or inserted parse
        without raising; reliable results satisfy the invariants.
        """
        data = bytearray(path.read_bytes())
        for position, length, replacement in mutations:
            position %= len(data) + 1
            data[position : position + length] = replacement
        structure = parse(bytes(data))
        if not structure.unreliable:
            check_invariants(self, structure)

    def test_many_delimiter_like_lines(self) -> None:
        """
        A body full of lines starting with C{--} that are not delimiters is
        parsed in one pass.
        """
        body = "--not a delimiter\n" * 20000
        data = crlf(
            f'Content-Type: multipart/mixed; boundary="b"\n\n--b\n\n{body}--b--\n'
        )
        structure = parse(data)
        self.assertIsNone(structure.defect)
        part = structure.find("1.1")
        assert part is not None
        self.assertEqual(part.end - part.body_start, len(crlf(body)) - 2)

    def test_entity_walk_order(self) -> None:
        """
        L{Entity.walk} yields entities in file order.
        """
        structure = parse_file(CORPUS / "calendar.eml")
        starts = [entity.headers_start for entity in structure.walk()]
        self.assertEqual(starts, sorted(starts))
        self.assertIsInstance(structure.root, Entity)
