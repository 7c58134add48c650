"""
Tests for L{mdgateway.message.rebuild}.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import io
import itertools
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.message.decompose import Decomposition, PartKind, decompose
from mdgateway.message.errors import RebuildError
from mdgateway.message.fields import clean_filename, format_parameter
from mdgateway.message.rebuild import (
    NewFile,
    Notice,
    Replacement,
    rebuild,
    rebuild_file,
)
from mdgateway.message.structure import Structure, parse_file, parse_structure

CORPUS = Path(__file__).parent / "corpus"


def temporary_directory(case: SynchronousTestCase) -> Path:
    """
    A directory removed when the test ends.
    """
    directory = tempfile.TemporaryDirectory()
    case.addCleanup(directory.cleanup)
    return Path(directory.name)


def rebuilt_bytes(
    source: Path, structure: Structure, replacements: dict[str, Replacement]
) -> bytes:
    output = io.BytesIO()
    with open(source, "rb") as file:
        rebuild(file, structure, replacements, output)
    return output.getvalue()


def entity_bytes(data: bytes, structure: Structure) -> dict[str, bytes]:
    """
    Each entity's bytes C{[headers_start, end)} by part id.
    """
    return {
        entity.part_id: data[entity.headers_start : entity.end]
        for entity in structure.walk()
    }


def stdlib(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


class ReplaceTests(SynchronousTestCase):
    """
    Replacing parts changes only those parts.
    """

    def test_replace_attachment_in_forwarded(self) -> None:
        """
        Replacing the PDF inside a forwarded message with a sanitized file
        leaves every other entity that does not contain it byte-identical,
        keeps the text around it, and the new part decodes to the new
        content with the new type and name.
        """
        directory = temporary_directory(self)
        source = CORPUS / "forwarded.eml"
        original = source.read_bytes()
        before = parse_file(source)
        sanitized = directory / "sanitized"
        sanitized.write_bytes(b"%PDF-1.7 sanitized\n" * 50)
        data = rebuilt_bytes(
            source,
            before,
            {
                "1.2.1.2": NewFile(
                    sanitized, "application/pdf", "Vertrag für Müller.pdf"
                )
            },
        )
        after = parse_structure(io.BytesIO(data))
        self.assertFalse(after.unreliable, after.detail)
        old = entity_bytes(original, before)
        new = entity_bytes(data, after)
        self.assertEqual(old.keys(), new.keys())
        changed = {"1", "1.2", "1.2.1", "1.2.1.2"}
        for part_id in old.keys() - changed:
            self.assertEqual(old[part_id], new[part_id], part_id)
        for part_id in changed:
            self.assertNotEqual(old[part_id], new[part_id], part_id)
        replaced = before.find("1.2.1.2")
        assert replaced is not None
        self.assertEqual(
            data[: replaced.headers_start], original[: replaced.headers_start]
        )
        tail = original[replaced.end :]
        self.assertEqual(data[len(data) - len(tail) :], tail)
        parts = decompose_bytes(self, data)
        part = {p.part_id: p for p in parts.parts}["1.2.1.2"]
        self.assertEqual(part.path.read_bytes(), sanitized.read_bytes())
        self.assertEqual(part.filename, "Vertrag für Müller.pdf")
        self.assertEqual(part.content_type, "application/pdf")
        self.assertFalse(part.inline)

    def test_base64_layout(self) -> None:
        """
        A replaced file is base64 in 76-column lines, with MIME fields that
        name it, and the stdlib parser reads the same file name and content.
        """
        directory = temporary_directory(self)
        content = bytes(range(256)) * 10
        (directory / "new").write_bytes(content)
        source = CORPUS / "quoted-printable.eml"
        data = rebuilt_bytes(
            source,
            parse_file(source),
            {"1.2": NewFile(directory / "new", "application/octet-stream", "é.bin")},
        )
        start = data.index(b"Content-Type: application/octet-stream")
        end = data.index(b"\r\n--qp-mixed--")
        headers, body = data[start:end].split(b"\r\n\r\n", 1)
        self.assertEqual(
            headers,
            b"Content-Type: application/octet-stream;\r\n"
            b' name="=?utf-8?b?w6kuYmlu?="\r\n'
            b"Content-Disposition: attachment;\r\n"
            b" filename*=utf-8''%C3%A9.bin\r\n"
            b"Content-Transfer-Encoding: base64",
        )
        lines = body.split(b"\r\n")
        self.assertTrue(all(len(line) == 76 for line in lines[:-1]))
        self.assertEqual(base64.b64decode(b"".join(lines)), content)
        attachment = next(stdlib(data).iter_attachments())
        self.assertEqual(attachment.get_filename(), "é.bin")
        self.assertEqual(attachment.get_content(), content)

    def test_notice_7bit(self) -> None:
        """
        A short ASCII notice replaces a part as 7bit inline text.
        """
        source = CORPUS / "quoted-printable.eml"
        data = rebuilt_bytes(
            source,
            parse_file(source),
            {"1.2": Notice("The attachment figures.csv was removed.\nPolicy: strip.")},
        )
        self.assertIn(
            b'Content-Type: text/plain;\r\n charset="utf-8"\r\n'
            b"Content-Disposition: inline\r\n"
            b"Content-Transfer-Encoding: 7bit\r\n\r\n"
            b"The attachment figures.csv was removed.\r\nPolicy: strip.\r\n"
            b"--qp-mixed--",
            data,
        )

    def test_notice_quoted_printable(self) -> None:
        """
        A non-ASCII or long-lined notice is quoted-printable, may be named,
        and decodes to the text.
        """
        source = CORPUS / "quoted-printable.eml"
        text = "Anhang entfernt: Zürich.csv " + "x" * 100
        data = rebuilt_bytes(
            source, parse_file(source), {"1.2": Notice(text, filename="removed.txt")}
        )
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable", data)
        self.assertTrue(all(len(line) <= 78 for line in data.split(b"\r\n")))
        attachments = list(stdlib(data).iter_attachments())
        self.assertEqual(attachments[0].get_filename(), "removed.txt")
        self.assertEqual(attachments[0].get_content(), text)

    def test_replace_single_part_message(self) -> None:
        """
        Replacing the whole body of a single-part message keeps the
        top-level fields other than the MIME ones byte-for-byte, and adds
        MIME-Version when it was missing.
        """
        directory = temporary_directory(self)
        source = CORPUS / "plain.eml"
        original = source.read_bytes()
        structure = parse_file(source)
        data = rebuilt_bytes(source, structure, {"1": Notice("Removed.")})
        assert structure.root is not None
        header_block = original[: structure.root.header_end]
        self.assertTrue(data.startswith(header_block + b"MIME-Version: 1.0\r\n"))
        self.assertTrue(data.endswith(b"\r\n\r\nRemoved.\r\n"))
        enveloped = CORPUS / "smime-enveloped.eml"
        (directory / "new").write_bytes(b"new")
        data = rebuilt_bytes(
            enveloped,
            parse_file(enveloped),
            {"1": NewFile(directory / "new", "application/octet-stream", "x.bin")},
        )
        self.assertEqual(data.count(b"MIME-Version"), 1)
        self.assertNotIn(b"pkcs7", data)
        self.assertIn(b"Subject: Encrypted\r\n", data)

    def test_inline_image_keeps_content_id(self) -> None:
        """
        A replaced inline image keeps its Content-ID (so the HTML still
        shows it) and is inline, even when it had no disposition.
        """
        directory = temporary_directory(self)
        (directory / "png").write_bytes(b"\x89PNG sanitized")
        source = CORPUS / "related.eml"
        data = rebuilt_bytes(
            source,
            parse_file(source),
            {"1.3": NewFile(directory / "png", "image/png", "spacer.png")},
        )
        parts = {part.part_id: part for part in decompose_bytes(self, data).parts}
        self.assertTrue(parts["1.3"].inline)
        self.assertIn(
            b"Content-ID: <spacer@example.org>\r\nContent-Type: image/png;", data
        )

    def test_body_without_name(self) -> None:
        """
        A body part replaced without a file name stays unnamed inline body
        text.
        """
        directory = temporary_directory(self)
        (directory / "html").write_bytes(b"<p>clean</p>")
        source = CORPUS / "alternative.eml"
        data = rebuilt_bytes(
            source,
            parse_file(source),
            {"1.2": NewFile(directory / "html", "text/html", None, charset="utf-8")},
        )
        part = decompose_bytes(self, data).parts[1]
        self.assertEqual(
            (part.kind, part.filename, part.named, part.inline, part.charset),
            (PartKind.BODY, "body.html", False, True, "utf-8"),
        )
        self.assertEqual(part.path.read_bytes(), b"<p>clean</p>")

    def test_several_and_empty(self) -> None:
        """
        Several parts can be replaced at once, and an empty replacement
        file gives an empty part.
        """
        directory = temporary_directory(self)
        (directory / "empty").write_bytes(b"")
        source = CORPUS / "calendar.eml"
        data = rebuilt_bytes(
            source,
            parse_file(source),
            {
                "1.2": NewFile(directory / "empty", "application/ics", "invite.ics"),
                "1.1.2": Notice("Calendar removed."),
            },
        )
        parts = decompose_bytes(self, data).parts
        self.assertEqual(
            [(part.part_id, part.path.read_bytes()) for part in parts],
            [
                ("1.1.1", b"You have been invited to: Quarterly review"),
                ("1.1.2", b"Calendar removed."),
                ("1.2", b""),
            ],
        )

    def test_rebuild_file(self) -> None:
        """
        L{rebuild_file} writes the rebuilt message to a path.
        """
        directory = temporary_directory(self)
        source = CORPUS / "related.eml"
        rebuild_file(source, parse_file(source), {}, directory / "out.eml")
        self.assertEqual((directory / "out.eml").read_bytes(), source.read_bytes())


class RebuildErrorTests(SynchronousTestCase):
    """
    Requests that cannot be honoured raise L{RebuildError} before anything
    is written.
    """

    def assertRefused(
        self, source: Path, structure: Structure, replacements: dict[str, Replacement]
    ) -> None:
        output = io.BytesIO()
        with open(source, "rb") as file, self.assertRaises(RebuildError):
            rebuild(file, structure, replacements, output)
        self.assertEqual(output.getvalue(), b"")

    def test_refusals(self) -> None:
        """
        Unknown part ids, overlapping parts, bad content types, charsets and
        dispositions, unreliable structures and structures of another file
        are refused.
        """
        source = CORPUS / "forwarded.eml"
        structure = parse_file(source)
        notice = Notice("x")
        self.assertRefused(source, structure, {"9.9": notice})
        self.assertRefused(source, structure, {"1.2": notice, "1.2.1.2": notice})
        self.assertRefused(source, structure, {"1": notice, "1.3": notice})
        self.assertRefused(
            source, structure, {"1.1": notice, "1.3": NewFile(source, "bad", "x")}
        )
        self.assertRefused(
            source,
            structure,
            {"1.3": NewFile(source, "text/plain", "x", charset='a"b')},
        )
        self.assertRefused(
            source,
            structure,
            {"1.3": NewFile(source, "text/plain", "x", disposition="hidden")},
        )
        broken = CORPUS / "broken-missing-close.eml"
        self.assertRefused(broken, parse_file(broken), {})
        self.assertRefused(CORPUS / "plain.eml", structure, {})


# A generated message tree: ("leaf", type, encoding, name, disposition,
# payload, charset), ("multipart", subtype, children, preamble, epilogue) or
# ("message", inner).
TEXT = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?", max_size=60
)
LINES = st.lists(TEXT, max_size=5).map("\r\n".join)


@st.composite
def leaves(draw: Any) -> tuple[Any, ...]:
    encoding = draw(st.sampled_from(["7bit", "base64", "quoted-printable"]))
    content_type = draw(
        st.sampled_from(
            ["text/plain", "text/html", "application/pdf", "image/png", "text/calendar"]
        )
    )
    if encoding == "7bit":
        payload = draw(LINES).encode("ascii")
    else:
        payload = draw(st.binary(max_size=300))
    name = draw(st.one_of(st.none(), st.text(min_size=1, max_size=30)))
    disposition = draw(st.sampled_from([None, "inline", "attachment"]))
    charset = (
        draw(st.sampled_from([None, "utf-8"]))
        if content_type.startswith("text/")
        else None
    )
    return ("leaf", content_type, encoding, name, disposition, payload, charset)


def trees() -> st.SearchStrategy[tuple[Any, ...]]:
    return st.recursive(
        leaves(),
        lambda children: st.one_of(
            st.tuples(
                st.just("multipart"),
                st.sampled_from(["mixed", "alternative", "related"]),
                st.lists(children, min_size=1, max_size=4),
                LINES,
                LINES,
            ),
            st.tuples(st.just("message"), children),
        ),
        max_leaves=12,
    )


def serialise(tree: tuple[Any, ...], counter: itertools.count[int]) -> bytes:
    """
    The bytes of one entity: header block, blank line, body.
    """
    kind = tree[0]
    if kind == "leaf":
        _, content_type, encoding, name, disposition, payload, charset = tree
        parameters = []
        if charset:
            parameters += format_parameter("charset", charset)
        if name is not None:
            parameters += format_parameter("name", name)
        headers = f"Content-Type: {content_type}" + "".join(
            f";\r\n {item}" for item in parameters
        )
        headers += f"\r\nContent-Transfer-Encoding: {encoding}\r\n"
        if disposition:
            extra = format_parameter("filename", name) if name is not None else []
            headers += (
                f"Content-Disposition: {disposition}"
                + "".join(f";\r\n {item}" for item in extra)
                + "\r\n"
            )
        if encoding == "base64":
            body = base64.encodebytes(payload).replace(b"\n", b"\r\n")
        elif encoding == "quoted-printable":
            body = binascii.b2a_qp(payload, istext=False).replace(b"\n", b"\r\n")
        else:
            body = payload
        return headers.encode("utf-8") + b"\r\n" + body
    if kind == "message":
        return b"Subject: inner\r\nFrom: inner@example.com\r\n" + serialise(
            tree[1], counter
        )
    _, subtype, children, preamble, epilogue = tree
    boundary = f"=_b{next(counter)}_=".encode("ascii")
    body = preamble.encode("ascii") + b"\r\n" if preamble else b""
    for child in children:
        body += b"--" + boundary + b"\r\n" + serialise(child, counter) + b"\r\n"
    body += b"--" + boundary + b"--"
    if epilogue:
        body += b"\r\n" + epilogue.encode("ascii")
    return (
        f'Content-Type: multipart/{subtype}; boundary="'.encode("ascii")
        + boundary
        + b'"\r\n\r\n'
        + body
    )


def message(tree: tuple[Any, ...]) -> bytes:
    return (
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: generated\r\n"
        b"MIME-Version: 1.0\r\n" + serialise(tree, itertools.count())
    )


def leaf_payloads(tree: tuple[Any, ...]) -> list[tuple[bytes, str | None]]:
    """
    Each leaf's payload and expected file name, in file order.
    """
    if tree[0] == "leaf":
        name = tree[3]
        return [(tree[5], clean_filename(name) if name is not None else None)]
    if tree[0] == "message":
        return leaf_payloads(tree[1])
    return [item for child in tree[2] for item in leaf_payloads(child)]


def decompose_bytes(case: SynchronousTestCase, data: bytes) -> Decomposition:
    directory = temporary_directory(case)
    (directory / "in.eml").write_bytes(data)
    return decompose(directory / "in.eml", directory / "parts")


def part_summary(result: Decomposition) -> list[tuple[Any, ...]]:
    return [
        (
            part.part_id,
            part.kind,
            part.content_type,
            part.charset,
            part.filename,
            part.named,
            part.inline,
            part.in_attached_message,
            part.path.read_bytes(),
        )
        for part in result.parts
    ]


class PropertyTests(SynchronousTestCase):
    """
    Byte-for-byte properties over generated multipart messages.
    """

    @settings(max_examples=150, deadline=None)
    @given(trees())
    def test_generated_round_trip(self, tree: tuple[Any, ...]) -> None:
        """
        A generated message parses reliably; its parts decode to the
        payloads it was written with (and the stdlib parser agrees);
        rebuilding with no replacements gives the identical file; and
        replacing every part by its own decoded content gives a message that
        decomposes to the same parts.
        """
        data = message(tree)
        with tempfile.TemporaryDirectory() as name:
            directory = Path(name)
            source = directory / "in.eml"
            source.write_bytes(data)
            first = decompose(source, directory / "first")
            self.assertFalse(first.unreliable, first.detail)
            # Non-blank preamble and epilogue text is scanned too, but is no
            # part of the tree.
            entities = [part for part in first.parts if part.replaceable]
            expected = leaf_payloads(tree)
            self.assertEqual(
                [
                    (part.path.read_bytes(), part.filename if part.named else None)
                    for part in entities
                ],
                expected,
            )
            reference = email.message_from_bytes(data, policy=email.policy.compat32)
            self.assertEqual(
                [part.path.read_bytes() for part in entities],
                [
                    part.get_payload(decode=True)
                    for part in reference.walk()
                    if not part.is_multipart()
                ],
            )
            self.assertEqual(rebuilt_bytes(source, first.structure, {}), data)
            replacements: dict[str, Replacement] = {
                part.part_id: NewFile(
                    part.path,
                    part.content_type,
                    part.filename if part.named else None,
                    charset=part.charset,
                )
                for part in entities
            }
            (directory / "out.eml").write_bytes(
                rebuilt_bytes(source, first.structure, replacements)
            )
            second = decompose(directory / "out.eml", directory / "second")
            self.assertFalse(second.unreliable, second.detail)
            self.assertEqual(part_summary(second), part_summary(first))

    def test_corpus_identity(self) -> None:
        """
        Rebuilding any reliable corpus message with no replacements gives
        the identical file.
        """
        for path in sorted(CORPUS.glob("*.eml")):
            structure = parse_file(path)
            if structure.unreliable:
                continue
            self.assertEqual(
                rebuilt_bytes(path, structure, {}), path.read_bytes(), path.name
            )
