"""
Tests for L{mdgateway.message.decompose}.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import hashlib
import os
import tempfile
import tracemalloc
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.message.decompose import (
    WHOLE_MESSAGE_NAME,
    Decomposition,
    PartKind,
    PartOrigin,
    _Base64,
    _Base64Error,
    _QuotedPrintable,
    decompose,
)
from mdgateway.message.structure import Defect, StructureLimits

CORPUS = Path(__file__).parent / "corpus"

# The payloads the corpus messages were written with.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d4944415478da63f8cfc0f01f0005000201e2213bc80000000049454e44ae426082"
)
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01"
    b"\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
PDF = (
    b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    * 3
)
ZIP = b"PK\x05\x06" + b"\x00" * 18
DOCX = b"PK\x03\x04" + bytes(range(256)) * 2
ICS = (
    b"BEGIN:VCALENDAR\r\nPRODID:-//Example Corp//Calendar 1.0//EN\r\nVERSION:2.0\r\n"
    b"METHOD:REQUEST\r\nBEGIN:VEVENT\r\n"
    b"UID:040000008200E00074C5B7101A82E008@example.net\r\n"
    b"DTSTART:20251112T130000Z\r\nDTEND:20251112T140000Z\r\n"
    b"SUMMARY:Quarterly review\r\nORGANIZER:mailto:alice@example.net\r\n"
    b"ATTENDEE;ROLE=REQ-PARTICIPANT:mailto:bob@example.com\r\n"
    b"END:VEVENT\r\nEND:VCALENDAR\r\n"
)
SIGNATURE = bytes(range(200, 256)) * 20
P7M = bytes(range(256)) * 4

B = PartKind.BODY
A = PartKind.ATTACHMENT

#: file name -> [(part id, kind, content type, file name, named, inline,
#: in attached message, signed, decoded content)]
EXPECTED: dict[
    str, list[tuple[str, PartKind, str, str, bool, bool, bool, bool, bytes]]
] = {
    "plain.eml": [
        (
            "1",
            B,
            "text/plain",
            "body.txt",
            False,
            True,
            False,
            False,
            b"Hi Bob,\r\n\r\nAre you free for lunch on Thursday? The usual place "
            b"at 12:30.\r\n\r\n-- \r\nAlice\r\n",
        ),
    ],
    "alternative.eml": [
        (
            "1.1",
            B,
            "text/plain",
            "body.txt",
            False,
            True,
            False,
            False,
            "Bonjour Bob,\r\n\r\nRendez-vous à Paris le 12 novembre — le café "
            "habituel. Apporte le dossier.\r\n\r\nRenée".encode(),
        ),
        (
            "1.2",
            B,
            "text/html",
            "body.html",
            False,
            True,
            False,
            False,
            "<html><body><p>Bonjour Bob,</p><p>Rendez-vous à Paris le 12 novembre "
            '— le café habituel. Apporte le dossier.</p><p style="color:#333">'
            "Renée</p></body></html>".encode(),
        ),
    ],
    "related.eml": [
        (
            "1.1",
            B,
            "text/html",
            "body.html",
            False,
            True,
            False,
            False,
            b'<html><body>\r\n<img src="cid:logo@example.org" alt="logo">\r\n'
            b'<p>News of the month.</p>\r\n<img src="cid:spacer@example.org">\r\n'
            b"</body></html>",
        ),
        ("1.2", A, "image/png", "logo.png", True, True, False, False, PNG),
        ("1.3", A, "image/gif", "part-1.3.gif", False, True, False, False, GIF),
    ],
    "forwarded.eml": [
        (
            "1.1",
            B,
            "text/plain",
            "body.txt",
            False,
            True,
            False,
            False,
            b"See the forwarded message below.",
        ),
        (
            "1.2.1.1",
            B,
            "text/plain",
            "body.txt",
            False,
            True,
            True,
            False,
            b"Contract attached, plus the data export.",
        ),
        (
            "1.2.1.2",
            A,
            "application/pdf",
            "Vertrag für Müller.pdf",
            True,
            False,
            True,
            False,
            PDF,
        ),
        ("1.2.1.3", A, "application/zip", "données.zip", True, False, True, False, ZIP),
        (
            "1.3",
            A,
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "notes.docx",
            True,
            False,
            False,
            False,
            DOCX,
        ),
    ],
    "calendar.eml": [
        (
            "1.1.1",
            B,
            "text/plain",
            "body.txt",
            False,
            True,
            False,
            False,
            b"You have been invited to: Quarterly review",
        ),
        (
            "1.1.2",
            A,
            "text/calendar",
            "part-1.1.2.ics",
            False,
            False,
            False,
            False,
            ICS,
        ),
        ("1.2", A, "application/ics", "invite.ics", True, False, False, False, ICS),
    ],
    "smime-signed.eml": [
        (
            "1.1.1",
            B,
            "text/plain",
            "body.txt",
            False,
            True,
            False,
            True,
            b"The report is attached.",
        ),
        ("1.1.2", A, "application/pdf", "report.pdf", True, False, False, True, PDF),
        (
            "1.2",
            A,
            "application/pkcs7-signature",
            "smime.p7s",
            True,
            False,
            False,
            True,
            SIGNATURE,
        ),
    ],
    "smime-enveloped.eml": [
        ("1", A, "application/pkcs7-mime", "smime.p7m", True, False, False, True, P7M),
    ],
    "eightbit.eml": [
        (
            "1",
            B,
            "text/plain",
            "body.txt",
            False,
            True,
            False,
            False,
            "Grüße aus München!\r\n".encode("latin-1"),
        ),
    ],
    "quoted-printable.eml": [
        (
            "1.1",
            B,
            "text/plain",
            "body.txt",
            False,
            True,
            False,
            False,
            b"Figures for the week: 100 = 60 + 40. This line is long enough that "
            b"it needs a soft line break to stay under seventy-six columns. \r\n"
            b"Trailing space kept above; tab\there.",
        ),
        (
            "1.2",
            A,
            "text/csv",
            "figures.csv",
            True,
            False,
            False,
            False,
            "region,amount\r\nZürich,100\r\nMálaga,40".encode(),
        ),
    ],
}

BROKEN = {
    "broken-missing-close.eml": Defect.MISSING_CLOSE_DELIMITER,
    "broken-wrong-boundary.eml": Defect.BOUNDARY_NOT_FOUND,
    "broken-base64.eml": Defect.BAD_BASE64,
    "broken-charset.eml": Defect.UNKNOWN_CHARSET,
    "broken-8bit-headers.eml": Defect.RAW_8BIT_HEADER,
    "broken-deep.eml": Defect.TOO_DEEP,
    "broken-many-parts.eml": Defect.TOO_MANY_PARTS,
}


def temporary_directory(case: SynchronousTestCase) -> Path:
    """
    A directory removed when the test ends.
    """
    directory = tempfile.TemporaryDirectory()
    case.addCleanup(directory.cleanup)
    return Path(directory.name)


def decompose_bytes(
    case: SynchronousTestCase, data: bytes, **kwargs: StructureLimits
) -> Decomposition:
    directory = temporary_directory(case)
    message = directory / "message.in"
    message.write_bytes(data)
    return decompose(message, directory / "parts", **kwargs)


def python_leaves(data: bytes) -> list[bytes]:
    """
    The distinct non-empty leaf payloads of Python's email under both
    policies.
    """
    found: list[bytes] = []
    for policy in (email.policy.compat32, email.policy.default):
        for part in email.message_from_bytes(data, policy=policy).walk():
            if not part.is_multipart():
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes) and payload and payload not in found:
                    found.append(payload)
    return found


class CorpusDecomposeTests(SynchronousTestCase):
    """
    Each corpus message decomposes part by part as expected.
    """

    def test_corpus(self) -> None:
        """
        Every good corpus message yields exactly the expected parts (id,
        kind, type, name, flags, byte range) with the expected decoded
        content, written to C{part-<id>} files and nothing else.
        """
        for name, expected in EXPECTED.items():
            directory = temporary_directory(self)
            source = CORPUS / name
            data = source.read_bytes()
            result = decompose(source, directory)
            self.assertFalse(result.unreliable, (name, result.detail))
            entities = [p for p in result.parts if p.origin is PartOrigin.ENTITY]
            got = [
                (
                    part.part_id,
                    part.kind,
                    part.content_type,
                    part.filename,
                    part.named,
                    part.inline,
                    part.in_attached_message,
                    part.signed,
                    part.path.read_bytes(),
                )
                for part in entities
            ]
            self.assertEqual(got, expected, name)
            self.assertEqual(
                sorted(path.name for path in directory.iterdir()),
                sorted(part.path.name for part in result.parts),
            )
            for part in result.parts:
                if part.origin is PartOrigin.TEXT:
                    # A non-blank preamble or epilogue, as it is.
                    text = data[part.body_start : part.end]
                    self.assertEqual(part.path.read_bytes(), text)
                    self.assertTrue(text.strip())
                    continue
                entity = result.structure.find(part.part_id)
                assert entity is not None
                self.assertEqual(
                    (part.headers_start, part.body_start, part.end),
                    (entity.headers_start, entity.body_start, entity.end),
                )
                self.assertEqual(part.size, len(part.path.read_bytes()))
                self.assertTrue(data[part.headers_start : part.end])

    def test_agrees_with_stdlib(self) -> None:
        """
        On every good corpus message, the parts and decoded contents match
        what the stdlib C{email} parser finds (it reads whole messages into
        memory, so it is only a reference here).
        """
        for name in EXPECTED:
            data = (CORPUS / name).read_bytes()
            reference = email.message_from_bytes(data, policy=email.policy.compat32)
            theirs = [
                (part.get_content_type(), part.get_payload(decode=True))
                for part in reference.walk()
                if not part.is_multipart()
            ]
            result = decompose(CORPUS / name, temporary_directory(self))
            ours = [
                (part.content_type, part.path.read_bytes())
                for part in result.parts
                if part.origin is PartOrigin.ENTITY
            ]
            self.assertEqual(ours, theirs, name)

    def test_signed_flag(self) -> None:
        """
        S/MIME messages are reported as signed; others are not.
        """
        signed = {
            name
            for name in EXPECTED
            if decompose(CORPUS / name, temporary_directory(self)).signed
        }
        self.assertEqual(signed, {"smime-signed.eml", "smime-enveloped.eml"})

    def test_broken_corpus(self) -> None:
        """
        Each broken corpus message is offered whole as C{message.eml} with
        the defect named, followed by each payload Python's email extracts
        under either policy (once each, in the C{readings} folder); no part
        files of our own are left behind. A reading that gives too many
        parts is reported as a reading error instead.
        """
        for name, defect in BROKEN.items():
            directory = temporary_directory(self)
            source = CORPUS / name
            result = decompose(source, directory)
            self.assertTrue(result.unreliable, name)
            self.assertEqual(result.defect, defect, name)
            self.assertTrue(result.detail)
            part, *others = result.parts
            self.assertEqual(part.origin, PartOrigin.WHOLE)
            self.assertEqual(part.filename, WHOLE_MESSAGE_NAME)
            self.assertEqual(part.content_type, "message/rfc822")
            self.assertEqual(part.kind, PartKind.ATTACHMENT)
            self.assertEqual(part.path, directory / WHOLE_MESSAGE_NAME)
            self.assertEqual(part.path.read_bytes(), source.read_bytes())
            self.assertEqual((part.headers_start, part.end), (0, source.stat().st_size))
            self.assertEqual(
                sorted(path.name for path in directory.iterdir()),
                sorted([WHOLE_MESSAGE_NAME, "readings"]),
            )
            self.assertIsNone(result.structure.root)
            if name == "broken-many-parts.eml":
                self.assertIn("more than 1000 parts", result.reading_error or "")
                self.assertEqual(others, [])
                continue
            self.assertIsNone(result.reading_error)
            self.assertTrue(all(p.origin is PartOrigin.READING for p in others))
            self.assertEqual(
                sorted(p.path.read_bytes() for p in others),
                sorted(python_leaves(source.read_bytes())),
            )

    def test_whole_message_is_independent(self) -> None:
        """
        Removing the offered C{message.eml} leaves the spooled file alone,
        and decomposing twice into one directory works.
        """
        directory = temporary_directory(self)
        source = directory / "spooled.eml"
        source.write_bytes((CORPUS / "broken-charset.eml").read_bytes())
        decompose(source, directory / "parts")
        part = decompose(source, directory / "parts").parts[0]
        self.assertEqual(part.filename, WHOLE_MESSAGE_NAME)
        part.path.unlink()
        self.assertEqual(
            source.read_bytes(), (CORPUS / "broken-charset.eml").read_bytes()
        )

    def test_limits_passed_on(self) -> None:
        """
        StructureLimits given to C{decompose} reach the parser.
        """
        result = decompose(
            CORPUS / "forwarded.eml",
            temporary_directory(self),
            StructureLimits(max_depth=2),
        )
        self.assertEqual(result.defect, Defect.TOO_DEEP)

    def test_unnamed_types(self) -> None:
        """
        Unnamed attachments get a made-up name from their type, and
        C{.bin} for types without a known extension; body text inside an
        attachment disposition is an attachment.
        """
        data = (
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            b"Content-Type: application/x-thing\r\n\r\nx\r\n--b\r\n"
            b"Content-Type: text/plain\r\nContent-Disposition: attachment\r\n\r\ny\r\n"
            b"--b--\r\n"
        )
        parts = decompose_bytes(self, data).parts
        self.assertEqual(
            [(part.filename, part.kind, part.inline) for part in parts],
            [
                ("part-1.1.bin", PartKind.ATTACHMENT, False),
                ("part-1.2.txt", PartKind.ATTACHMENT, False),
            ],
        )


class Base64Tests(SynchronousTestCase):
    """
    Incremental base64 decoding.
    """

    def decode(self, *chunks: bytes) -> bytes:
        decoder = _Base64()
        return b"".join(decoder.feed(chunk) for chunk in chunks) + decoder.finish()

    def test_lines_and_missing_padding(self) -> None:
        """
        Line breaks and spaces are ignored and missing final padding is
        tolerated.
        """
        self.assertEqual(self.decode(b"QU\r\nJD", b" RA"), b"ABCD")
        self.assertEqual(self.decode(b"QUJDRA=", b"=\r\n"), b"ABCD")

    def test_bad(self) -> None:
        """
        Characters outside the alphabet, data after padding, misplaced
        padding and a truncated quantum are errors.
        """
        for chunks in (
            (b"QUJ!",),
            (b"QUJDRA==", b"QUJD"),
            (b"QUJDRA==QUJD",),
            (b"QUJD=",),
            (b"QUJDR",),
        ):
            with self.assertRaises(_Base64Error, msg=chunks):
                self.decode(*chunks)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=2000), st.lists(st.integers(1, 300), max_size=20))
    def test_any_split(self, data: bytes, cuts: list[int]) -> None:
        """
        Decoding gives the original bytes however the encoded text is cut
        into chunks.
        """
        encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
        chunks = []
        position = 0
        for cut in cuts:
            chunks.append(encoded[position : position + cut])
            position += cut
        chunks.append(encoded[position:])
        self.assertEqual(self.decode(*chunks), data)


class QuotedPrintableTests(SynchronousTestCase):
    """
    Incremental quoted-printable decoding.
    """

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=2000), st.lists(st.integers(1, 300), max_size=20))
    def test_any_split(self, data: bytes, cuts: list[int]) -> None:
        """
        Decoding gives the original bytes however the encoded text is cut
        into chunks, soft line breaks and escapes included.
        """
        encoded = binascii.b2a_qp(data, istext=False).replace(b"\n", b"\r\n")
        decoder = _QuotedPrintable()
        out = []
        position = 0
        for cut in cuts:
            out.append(decoder.feed(encoded[position : position + cut]))
            position += cut
        out.append(decoder.feed(encoded[position:]))
        out.append(decoder.finish())
        self.assertEqual(b"".join(out), data)

    def test_long_line_without_breaks(self) -> None:
        """
        A very long line without line breaks is decoded in pieces without
        splitting an escape.
        """
        decoder = _QuotedPrintable()
        encoded = b"=41" * 30000
        out = b"".join(
            decoder.feed(encoded[i : i + 1000]) for i in range(0, 90000, 1000)
        )
        self.assertEqual(out + decoder.finish(), b"A" * 30000)


class BoundsTests(SynchronousTestCase):
    """
    Memory and robustness bounds.
    """

    def test_thirty_megabytes_bounded_memory(self) -> None:
        """
        A 30 MB message (a base64 attachment and a quoted-printable text)
        decomposes with a traced memory peak of a few megabytes, and decodes
        correctly.
        """
        directory = temporary_directory(self)
        message = directory / "big.eml"
        attachment = hashlib.sha256()
        attachment_size = 0
        with open(message, "wb") as out:
            out.write(
                b'Subject: big\r\nContent-Type: multipart/mixed; boundary="big"\r\n\r\n'
                b"--big\r\nContent-Type: text/plain\r\n"
                b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
            )
            text_line = b"caf=C3=A9 " * 7 + b"=\r\n"
            for _ in range(40000):
                out.write(text_line)
            out.write(
                b"end\r\n--big\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\n"
            )
            block = os.urandom(57 * 4096)
            while out.tell() < 30 * 1024 * 1024:
                attachment.update(block)
                attachment_size += len(block)
                out.write(base64.encodebytes(block).replace(b"\n", b"\r\n"))
            out.write(b"--big--\r\n")
        self.assertGreaterEqual(message.stat().st_size, 30 * 1024 * 1024)
        tracemalloc.start()
        try:
            result = decompose(message, directory / "parts")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 4 * 1024 * 1024)
        self.assertFalse(result.unreliable, result.detail)
        text, binary = result.parts
        self.assertEqual(text.size, 40000 * len("café ".encode()) * 7 + 3)
        self.assertEqual(binary.size, attachment_size)
        digest = hashlib.sha256()
        with open(binary.path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
        self.assertEqual(digest.hexdigest(), attachment.hexdigest())

    @settings(max_examples=150, deadline=None)
    @given(
        st.sampled_from(sorted(CORPUS.glob("*.eml"))),
        st.lists(
            st.tuples(
                st.integers(min_value=0, max_value=2**20),
                st.integers(min_value=0, max_value=32),
                st.binary(max_size=40),
            ),
            min_size=1,
            max_size=4,
        ),
    )
    def test_mutated_corpus(
        self, path: Path, mutations: list[tuple[int, int, bytes]]
    ) -> None:
        """
        Mutated corpus messages decompose without raising: either into
        parts whose files exist, or whole as C{message.eml} followed by the
        payloads of other readings.
        """
        data = bytearray(path.read_bytes())
        for position, length, replacement in mutations:
            position %= len(data) + 1
            data[position : position + length] = replacement
        with tempfile.TemporaryDirectory() as name:
            directory = Path(name)
            (directory / "in.eml").write_bytes(bytes(data))
            result = decompose(directory / "in.eml", directory / "parts")
            for part in result.parts:
                self.assertEqual(part.path.stat().st_size, part.size)
            if result.unreliable:
                self.assertEqual(result.parts[0].origin, PartOrigin.WHOLE)
                self.assertTrue(
                    all(p.origin is PartOrigin.READING for p in result.parts[1:])
                )

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=3000))
    def test_random_bytes(self, data: bytes) -> None:
        """
        Random bytes decompose without raising.
        """
        with tempfile.TemporaryDirectory() as name:
            directory = Path(name)
            (directory / "in.eml").write_bytes(data)
            result = decompose(directory / "in.eml", directory / "parts")
            self.assertTrue(result.parts)


class EncodedMessageTests(SynchronousTestCase):
    """
    An encoded message/rfc822 part is read two ways, and both are offered.
    """

    def test_both_readings(self) -> None:
        """
        The decoded message is offered as a leaf (what clients show), and
        its encoded text as it is (what Python's email takes for the
        attached message's body).
        """
        inner = b"Subject: inner\r\n\r\nhello\r\n"
        data = (
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(inner).replace(b"\n", b"\r\n")
            + b"--b--\r\n"
        )
        result = decompose_bytes(self, data)
        self.assertFalse(result.unreliable, result.detail)
        contents = {p.part_id: p.path.read_bytes() for p in result.parts}
        self.assertEqual(contents["1.1"], inner)
        self.assertEqual(
            contents["1.1~encoded"],
            base64.encodebytes(inner).strip().replace(b"\n", b"\r\n"),
        )
        self.assertIn(contents["1.1~encoded"], python_leaves(data))

    def test_encoded_text_like_a_header(self) -> None:
        """
        When the encoded text starts like a header field (quoted-printable
        keeps the inner message's header readable), readers split it
        differently: the message is ambiguous and offered whole with the
        other readings.
        """
        data = (
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            b"Content-Type: message/rfc822\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
            b"Subject: inner\r\n\r\nh=C3=A9llo\r\n--b--\r\n"
        )
        result = decompose_bytes(self, data)
        self.assertEqual(result.defect, Defect.AMBIGUOUS_BODY)
        self.assertEqual(result.parts[0].filename, WHOLE_MESSAGE_NAME)


class QuotedPrintableReadingsTests(SynchronousTestCase):
    """
    Quoted-printable that readers decode differently.
    """

    def test_space_at_line_end(self) -> None:
        """
        Space at the end of an encoded line is kept by some readers
        (Python's email) and deleted by others (RFC 2045): both decodings
        are offered, the second as a variant that cannot be replaced alone.
        """
        data = (
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable"
            b"\r\n\r\nline one  \r\nline=20two\r\n"
        )
        result = decompose_bytes(self, data)
        self.assertFalse(result.unreliable, result.detail)
        contents = {p.part_id: (p.path.read_bytes(), p.origin) for p in result.parts}
        self.assertEqual(
            contents["1"], (b"line one  \r\nline two\r\n", PartOrigin.ENTITY)
        )
        self.assertEqual(
            contents["1~stripped"], (b"line one\r\nline two\r\n", PartOrigin.VARIANT)
        )

    def test_not_quoted_printable(self) -> None:
        """
        Raw 8-bit or control bytes, or an "=" that is no escape, are read
        each reader its own way: the message is ambiguous.
        """
        for body in (b"caf\xc3\xa9\r\n", b"a\x00b\r\n", b"50=% off\r\n", b"=G1\r\n"):
            data = (
                b"Content-Type: text/plain\r\n"
                b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + body
            )
            result = decompose_bytes(self, data)
            self.assertEqual(result.defect, Defect.BAD_QUOTED_PRINTABLE, body)
        fine = (
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nsoft=\r\nbreak=3D=\r\n"
        )
        self.assertFalse(decompose_bytes(self, fine).unreliable)
