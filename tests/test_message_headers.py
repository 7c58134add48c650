"""
Tests for L{mdgateway.message.headers} and L{mdgateway.message.fields}.
"""

from __future__ import annotations

import email
import email.policy
import io
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.message.errors import CharsetError, HeaderNameError
from mdgateway.message.fields import (
    clean_filename,
    decode_words,
    encode_words,
    format_parameter,
    get_parameter,
    split_parameters,
)
from mdgateway.message.headers import (
    decode_value,
    format_field,
    format_fields,
    has_tag,
    read_summary,
    remove_headers,
    rewrite_headers,
    tag_subject,
    validate_name,
)

CORPUS = Path(__file__).parent / "corpus"


def parse_headers(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(
        data + b"\r\nbody\r\n", policy=email.policy.default
    )
    assert isinstance(message, email.message.EmailMessage)
    return message


def tagged(data: bytes, tag: str = "[SANITIZED]") -> tuple[bytes, bool]:
    output = io.BytesIO()
    changed = tag_subject(io.BytesIO(data), output, tag)
    return output.getvalue(), changed


class NameTests(SynchronousTestCase):
    """
    Header names are checked against RFC 5322 C{ftext}.
    """

    def test_valid(self) -> None:
        """
        Printable ASCII names without colon or space are accepted.
        """
        for name in (
            "X-Metadefender-Core-Result",
            "X-MD-Email-Security-Id",
            "a",
            "X_y.z!",
        ):
            self.assertEqual(validate_name(name), name)

    def test_invalid(self) -> None:
        """
        Empty names, names with space, colon, control or non-ASCII
        characters, and overlong names raise L{HeaderNameError} naming the
        key.
        """
        for name in ("", "X Bad", "X:Bad", "X-\tTab", "X-Bad\r\n", "X-é", "X" * 77):
            with self.assertRaises(HeaderNameError) as caught:
                validate_name(name)
            self.assertEqual(caught.exception.name, name)
            self.assertIn(repr(name), str(caught.exception))

    def test_format_fields_checks_first(self) -> None:
        """
        L{format_fields} checks every name before formatting any.
        """
        with self.assertRaises(HeaderNameError) as caught:
            format_fields([("X-Good", "1"), ("X Bad", "2")])
        self.assertEqual(caught.exception.name, "X Bad")


class FormatTests(SynchronousTestCase):
    """
    Stamped fields are folded and encoded so that parsers read them back.
    """

    def test_simple(self) -> None:
        """
        A short ASCII value is written as it is.
        """
        self.assertEqual(
            format_fields(
                [
                    ("X-Metadefender-Core-Result", "Blocked/Dirty"),
                    ("X-Metadefender-Core-Url", "http://127.0.0.1:8008"),
                ]
            ),
            b"X-Metadefender-Core-Result: Blocked/Dirty\r\n"
            b"X-Metadefender-Core-Url: http://127.0.0.1:8008\r\n",
        )

    def test_long_ascii_folded(self) -> None:
        """
        A long ASCII value is folded at spaces into lines of at most 78
        columns, and unfolds to the same value.
        """
        value = " ".join(f"word{index}" for index in range(60))
        data = format_field("X-Long", value)
        lines = data.split(b"\r\n")[:-1]
        self.assertGreater(len(lines), 3)
        self.assertTrue(all(len(line) <= 78 for line in lines))
        self.assertEqual(data.replace(b"\r\n ", b" "), f"X-Long: {value}\r\n".encode())
        self.assertEqual(str(parse_headers(data)["X-Long"]), value)

    def test_unbreakable_ascii(self) -> None:
        """
        A word longer than a line cannot be folded and is kept whole (up to
        RFC 5322's 998), beyond which the value is encoded.
        """
        self.assertEqual(
            format_field("X-A", "b" * 200), b"X-A: " + b"b" * 200 + b"\r\n"
        )
        data = format_field("X-A", "b" * 2000)
        self.assertTrue(all(len(line) <= 78 for line in data.split(b"\r\n")))
        self.assertEqual(str(parse_headers(data)["X-A"]), "b" * 2000)

    def test_non_ascii_encoded(self) -> None:
        """
        Non-ASCII values are written as UTF-8 encoded words in lines of at
        most 78 columns.
        """
        value = "Réunion à Zürich — 会議 " * 6
        data = format_field("X-Subject-Copy", value)
        self.assertTrue(data.startswith(b"X-Subject-Copy: =?utf-8?"))
        self.assertTrue(all(len(line) <= 78 for line in data.split(b"\r\n")))
        self.assertTrue(data.isascii())
        self.assertEqual(str(parse_headers(data)["X-Subject-Copy"]), value)

    def test_long_name(self) -> None:
        """
        With a long name the first encoded word still shares its line (a
        value starting on a continuation line reads back with a leading
        space), and later words fold at 78 columns.
        """
        name = "X-" + "N" * 70
        data = format_field(name, "é" * 30)
        lines = data.split(b"\r\n")
        self.assertTrue(lines[0].startswith(f"{name}: =?utf-8?".encode()))
        self.assertLessEqual(len(lines[0]), len(name) + 2 + 24)
        self.assertTrue(all(len(line) <= 78 for line in lines[1:]))
        self.assertEqual(str(parse_headers(data)[name]), "é" * 30)

    def test_no_injection(self) -> None:
        """
        CR and LF in a value cannot start a new header line.
        """
        data = format_field("X-Note", "hello\r\nBcc: victim@example.com")
        self.assertEqual(data.count(b"\r\n"), 1)
        message = parse_headers(data)
        self.assertIsNone(message["Bcc"])
        self.assertEqual(str(message["X-Note"]), "hello\r\nBcc: victim@example.com")

    def test_literal_encoded_word(self) -> None:
        """
        A value that looks like an encoded word is encoded itself, so it
        reads back literally.
        """
        value = "=?utf-8?q?not_decoded?="
        data = format_field("X-A", value)
        self.assertEqual(str(parse_headers(data)["X-A"]), value)
        self.assertEqual(decode_value(data.split(b":", 1)[1]), value)

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from(["X-A", "X-Metadefender-Core-Rule", "X-" + "n" * 60]),
        st.text(min_size=1, max_size=300).map(str.strip).filter(bool),
    )
    def test_round_trip(self, name: str, value: str) -> None:
        """
        Any value round-trips through the stdlib parser and through
        L{decode_value}, in lines of at most 78 columns (998 for one
        unbreakable ASCII word).
        """
        data = format_field(name, value)
        self.assertTrue(data.isascii())
        self.assertEqual(data.count(b"\r\n") - data.count(b"\r\n "), 1)
        lines = data.split(b"\r\n")[:-1]
        self.assertTrue(all(len(line) <= 998 for line in lines))
        if b"=?utf-8?" in data:
            self.assertLessEqual(len(lines[0]), max(78, len(name) + 2 + 24))
            self.assertTrue(all(len(line) <= 78 for line in lines[1:]))
        self.assertEqual(decode_value(data.split(b":", 1)[1]), value)
        if all(char.isprintable() for char in value):
            self.assertEqual(str(parse_headers(data)[name]), value)


class FieldValueTests(SynchronousTestCase):
    """
    MIME parameters and encoded words.
    """

    def test_split_parameters(self) -> None:
        """
        Parameters split on semicolons outside quotes; quoted pairs are
        unescaped; names are lowercased; comments outside quotes dropped.
        """
        main, parameters = split_parameters(
            'Text/Plain (comment); Charset=utf-8 (x); name="a;b \\"c\\".txt"; bare; =x'
        )
        self.assertEqual(main, "Text/Plain")
        self.assertEqual(
            parameters,
            [("charset", "utf-8"), ("name", 'a;b "c".txt'), ("", "x")],
        )

    def test_unterminated_quote(self) -> None:
        """
        An unterminated quoted value runs to the end.
        """
        self.assertEqual(split_parameters('a/b; name="x; y')[1], [("name", "x; y")])

    def test_rfc2231(self) -> None:
        """
        RFC 2231 sections and charsets are decoded, and beat the plain
        parameter.
        """
        parameters = split_parameters(
            "attachment; filename=\"plain.pdf\"; filename*0*=iso-8859-1'de'M%FC;"
            ' filename*1="ller ";  filename*2*=%E9.pdf'
        )[1]
        self.assertEqual(get_parameter(parameters, "filename"), "Müller é.pdf")
        self.assertEqual(
            get_parameter(split_parameters("a; name*=utf-8''%E2%82%AC.txt")[1], "name"),
            "€.txt",
        )
        self.assertEqual(
            get_parameter(split_parameters('a; name*0="ab"; name*1="cd"')[1], "name"),
            "abcd",
        )

    def test_rfc2231_sections_charset(self) -> None:
        """
        Sections are joined before decoding with the first section's
        charset.
        """
        parameters = split_parameters(
            "attachment; filename*0*=iso-8859-1''M%FCller; filename*1*=%E9.pdf"
        )[1]
        self.assertEqual(get_parameter(parameters, "filename"), "Mülleré.pdf")

    def test_unknown_charset(self) -> None:
        """
        Unknown charsets raise L{CharsetError} when strict and fall back to
        UTF-8 otherwise.
        """
        parameters = split_parameters("a; name*=x-none''%C3%A9")[1]
        with self.assertRaises(CharsetError):
            get_parameter(parameters, "name", strict=True)
        self.assertEqual(get_parameter(parameters, "name"), "é")
        with self.assertRaises(CharsetError):
            decode_words("=?zlib_codec?q?x?=", strict=True)

    def test_decode_words(self) -> None:
        """
        Whitespace between adjacent encoded words is dropped, other text is
        kept, and undecodable words stay literal.
        """
        self.assertEqual(
            decode_words("=?utf-8?q?a?= \r\n =?utf-8?b?w6k=?= x =?utf-8?q?b?="),
            "aé x b",
        )
        self.assertEqual(decode_words("=?utf-8?b?w6k?="), "é")
        self.assertEqual(decode_words("=?utf-8?b?é?="), "=?utf-8?b?é?=")
        self.assertEqual(decode_words("=?ISO-8859-1*de?Q?M=FCnchen?="), "München")

    def test_encode_words_limits(self) -> None:
        """
        Encoded words are at most 75 characters and never split a
        character.
        """
        text = "日本語のテキスト" * 10
        words = encode_words(text)
        self.assertTrue(all(len(word) <= 75 for word in words))
        self.assertEqual(decode_words(" ".join(words)), text)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=200))
    def test_parameter_round_trip(self, value: str) -> None:
        """
        Any value written by L{format_parameter} reads back with
        L{get_parameter}.
        """
        text = "attachment; " + "; ".join(format_parameter("filename", value))
        self.assertEqual(
            get_parameter(split_parameters(text)[1], "filename"),
            value.encode("utf-8", "replace").decode("utf-8"),
        )

    def test_clean_filename(self) -> None:
        """
        File names keep only their last path component, lose control and
        format characters, and are at most 255 characters keeping the
        extension.
        """
        self.assertEqual(clean_filename("C:\\Users\\x\\report.pdf"), "report.pdf")
        self.assertEqual(clean_filename("../../etc/passwd"), "passwd")
        self.assertEqual(clean_filename("invoice\u202efdp.exe"), "invoicefdp.exe")
        self.assertEqual(clean_filename("a\x00b\r\n.txt"), "ab.txt")
        self.assertIsNone(clean_filename(".."))
        self.assertIsNone(clean_filename("dir/"))
        long = clean_filename("x" * 300 + ".docx")
        assert long is not None
        self.assertEqual((len(long), long[-5:]), (255, ".docx"))


class SubjectTagTests(SynchronousTestCase):
    """
    Tagging the Subject changes only the Subject's bytes.
    """

    def test_simple(self) -> None:
        """
        The tag goes before the subject; everything else is unchanged.
        """
        data = b"From: a\r\nSubject: Hello\r\nTo: b\r\n\r\nSubject: body\r\n"
        out, changed = tagged(data)
        self.assertTrue(changed)
        self.assertEqual(
            out,
            b"From: a\r\nSubject: [SANITIZED] Hello\r\nTo: b\r\n\r\nSubject: body\r\n",
        )

    def test_missing(self) -> None:
        """
        A message without Subject gets one holding the tag, at the end of
        the header block.
        """
        out, changed = tagged(b"From: a\r\n\r\nbody")
        self.assertTrue(changed)
        self.assertEqual(out, b"From: a\r\nSubject: [SANITIZED]\r\n\r\nbody")
        out, _ = tagged(b"From: a")
        self.assertEqual(out, b"From: a\r\nSubject: [SANITIZED]\r\n")

    def test_folded(self) -> None:
        """
        A folded Subject keeps its folding and unfolds to the tagged text.
        """
        data = b"Subject: a very\r\n long subject\r\nX: y\r\n\r\nb"
        out, _ = tagged(data)
        self.assertEqual(
            out, b"Subject: [SANITIZED] a very\r\n long subject\r\nX: y\r\n\r\nb"
        )
        out, _ = tagged(b"Subject:\r\n starts on the next line\r\n\r\nb")
        self.assertEqual(
            out, b"Subject: [SANITIZED]\r\n starts on the next line\r\n\r\nb"
        )
        self.assertEqual(
            str(parse_headers(out.split(b"\r\n\r\n")[0] + b"\r\n")["Subject"]),
            "[SANITIZED] starts on the next line",
        )

    def test_encoded_words(self) -> None:
        """
        A Subject of encoded words reads as the tag followed by the decoded
        subject.
        """
        data = (CORPUS / "alternative.eml").read_bytes()
        out, changed = tagged(data)
        self.assertTrue(changed)
        message = email.message_from_bytes(out, policy=email.policy.default)
        self.assertEqual(str(message["Subject"]), "[SANITIZED] Rencontre à Paris")
        self.assertEqual(len(out), len(data) + len(b"[SANITIZED] "))

    def test_non_ascii_tag(self) -> None:
        """
        A non-ASCII tag is encoded, and reads back before both plain and
        encoded subjects with one space between.
        """
        for subject, shown in (
            (b"Hello", "[GESÄUBERT] Hello"),
            (b"=?utf-8?q?caf=C3=A9?=", "[GESÄUBERT] café"),
        ):
            out, _ = tagged(b"Subject: " + subject + b"\r\n\r\nb", "[GESÄUBERT]")
            self.assertTrue(out.isascii())
            self.assertEqual(
                str(parse_headers(out.split(b"\r\n\r\n")[0] + b"\r\n")["Subject"]),
                shown,
            )

    def test_not_twice(self) -> None:
        """
        A Subject that already carries the tag, anywhere and in any case, is
        left alone.
        """
        for subject in (
            b"[SANITIZED] Hello",
            b"Re: [SANITIZED] Hello",
            b"[sanitized] hello",
            b"=?utf-8?q?=5BSANITIZED=5D_caf=C3=A9?=",
        ):
            data = b"Subject: " + subject + b"\r\n\r\nbody"
            out, changed = tagged(data)
            self.assertFalse(changed, subject)
            self.assertEqual(out, data)
        self.assertTrue(has_tag("Fwd: [SANITIZED] x", "[SANITIZED]"))

    def test_every_subject(self) -> None:
        """
        Every Subject field is tagged (readers disagree on which one they
        show).
        """
        out, _ = tagged(b"Subject: one\r\nSubject: two\r\n\r\nb")
        self.assertEqual(
            out, b"Subject: [SANITIZED] one\r\nSubject: [SANITIZED] two\r\n\r\nb"
        )

    def test_empty_subject(self) -> None:
        """
        An empty Subject becomes the tag.
        """
        out, _ = tagged(b"Subject:\r\n\r\nb")
        self.assertEqual(out, b"Subject: [SANITIZED]\r\n\r\nb")

    def test_huge_subject(self) -> None:
        """
        A Subject larger than the buffer is still tagged, streamed; as its
        line is over 998 already, the tag gets a line of its own.
        """
        data = b"Subject: " + b"x" * 200000 + b"\r\n\r\nbody"
        out, changed = tagged(data)
        self.assertTrue(changed)
        self.assertEqual(out, b"Subject: [SANITIZED]\r\n " + data[len(b"Subject: ") :])


class RemoveTests(SynchronousTestCase):
    """
    Removing top-level header fields.
    """

    def test_remove(self) -> None:
        """
        Named fields, folded ones included, are removed from the top-level
        header block only; prefixes end in C{*}; everything else is
        unchanged.
        """
        data = (
            b"Received: x\r\n"
            b"X-Metadefender-Core-Result: Allowed\r\n"
            b"X-MetaDefender-EmailSecurity-Sanitized:\r\n False\r\n"
            b"X-MD-Email-Security-Id: forged\r\n"
            b"Subject: s\r\n\r\n"
            b"X-Metadefender-Core-Result: in the body\r\n"
        )
        output = io.BytesIO()
        removed = remove_headers(
            io.BytesIO(data), output, ["X-Metadefender-*", "x-md-email-security-id"]
        )
        self.assertEqual(removed, 3)
        self.assertEqual(
            output.getvalue(),
            b"Received: x\r\nSubject: s\r\n\r\n"
            b"X-Metadefender-Core-Result: in the body\r\n",
        )

    def test_invalid_name(self) -> None:
        """
        An invalid name to remove is refused.
        """
        with self.assertRaises(HeaderNameError):
            remove_headers(io.BytesIO(b""), io.BytesIO(), ["X Bad"])

    def test_combined_pass(self) -> None:
        """
        One pass can prepend stamped fields, remove forged ones and tag the
        Subject, copying the rest of a corpus message exactly.
        """
        data = (CORPUS / "forwarded.eml").read_bytes()
        forged = data.replace(
            b"Subject: Fwd", b"X-Metadefender-Core-Result: Allowed\r\nSubject: Fwd", 1
        )
        output = io.BytesIO()
        stamp = format_fields([("X-Metadefender-Core-Result", "Sanitized")])
        result = rewrite_headers(
            io.BytesIO(forged),
            output,
            prepend=stamp,
            remove=["X-Metadefender-*"],
            subject_tag="[SANITIZED]",
        )
        self.assertEqual((result.removed, result.subject_tagged), (1, True))
        self.assertEqual(
            output.getvalue(),
            stamp + data.replace(b"Subject: Fwd", b"Subject: [SANITIZED] Fwd", 1),
        )

    def test_line_that_is_not_a_field(self) -> None:
        """
        A line in the header block that is not a field is kept, and fields
        after it are still removed (some readers take them for header
        fields); editing ends at the blank line, after which everything is
        copied, fields look-alikes included.
        """
        output = io.BytesIO()
        removed = remove_headers(
            io.BytesIO(
                b"X-Bad: 1\r\nnot a field\r\nX-Bad: 2\r\n\tfolded\r\n"
                b"Subject: s\r\n\r\nX-Bad: 3\r\n"
            ),
            output,
            ["X-Bad"],
        )
        self.assertEqual(
            output.getvalue(), b"not a field\r\nSubject: s\r\n\r\nX-Bad: 3\r\n"
        )
        self.assertEqual(removed, 2)


class SummaryTests(SynchronousTestCase):
    """
    The top-level header summary.
    """

    def test_corpus(self) -> None:
        """
        Message-ID, decoded Subject and From, Date and the Received count
        are read from the header block.
        """
        with open(CORPUS / "alternative.eml", "rb") as file:
            summary = read_summary(file)
        self.assertEqual(summary.message_id, "<alt-1@example.net>")
        self.assertEqual(summary.subject, "Rencontre à Paris")
        self.assertEqual(summary.sender, "Renée Dupré <renee@example.net>")
        self.assertEqual(summary.date, "Tue, 04 Nov 2025 10:00:00 +0100")
        self.assertEqual(summary.received, 2)
        self.assertTrue(summary.complete)
        data = (CORPUS / "alternative.eml").read_bytes()
        self.assertEqual(summary.header_bytes, data.index(b"\r\n\r\n") + 4)

    def test_bounded(self) -> None:
        """
        Only C{limit} bytes are read; the summary says it is incomplete.
        """
        data = b"Received: x\r\n" * 10000 + b"Subject: late\r\n\r\n"
        summary = read_summary(io.BytesIO(data), limit=1300)
        self.assertEqual(
            (summary.received, summary.subject, summary.complete), (100, None, False)
        )
        self.assertEqual(summary.header_bytes, 1300)

    def test_raw_8bit_and_missing(self) -> None:
        """
        Raw 8-bit values are shown (UTF-8, else Latin-1); absent fields are
        L{None}.
        """
        summary = read_summary(io.BytesIO(b"Subject: Gr\xfc\xdfe\r\n\r\n"))
        self.assertEqual(summary.subject, "Grüße")
        self.assertIsNone(summary.message_id)
        self.assertEqual(summary.received, 0)
