"""
Hypothesis strategies for adversarial MIME: messages nobody here wrote,
built the way evasion is tried.

A message is a random tree of leaves, multiparts and attached messages;
each node's fields and body may then be bent: boundaries quoted or not,
with spaces, backslashes, RFC 2231 continuations and charsets, upper case,
given twice, or differing from the delimiters actually used (case, prefix,
suffix, trailing space); delimiter look-alikes inside bodies; missing and
duplicate MIME fields, folding, space before a colon, lines that are no
fields, a continuation line first; transfer encodings in every case and
with junk around them, base64 without padding, with stray characters or
data after the padding, quoted-printable with broken escapes; preambles and
epilogues with text; multiparts without close-delimiter or without a line
end after it; every C{message/*} type, encoded or not; bodies with raw
8-bit bytes. Everything is CRLF and no line holds a bare CR or LF, as the
SMTP server accepts nothing else.

About half the messages are drawn I{tame}: the same shapes without any
bending, so the path where our parser trusts a structure is exercised as
hard as the one where it does not.
"""

from __future__ import annotations

import base64
import quopri
from typing import Any

from hypothesis import strategies as st

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
#: Characters of boundaries: RFC 2046 bchars plus some it does not allow.
_BOUNDARY_CHARS = _ALNUM + "'()+_,-./:=? \\*"
_TAME_BOUNDARY_CHARS = _ALNUM + "-_.=+"
_TEXT = st.text(alphabet=_ALNUM + " -=._:;\"'<>/\\%!", min_size=0, max_size=40)
_LEAF_TYPES = [
    "text/plain",
    "text/html",
    "text/plain; charset=utf-8",
    "text/plain; charset=iso-8859-1",
    "application/octet-stream",
    "application/pdf; name=a.pdf",
    'application/pdf; name="r\u00e9sum\u00e9.pdf"',
    "image/png",
    "text/calendar; method=REPLY",
    "message/delivery-status",
]
_ODD_LEAF_TYPES = [
    "message/partial",
    "message/external-body",
    "message/news",
    "message/disposition-notification",
    "TEXT/PLAIN",
    "text",
    "multipart/mixed",
    "text/plain (comment)",
    "text/plain; charset=bogus-charset",
    'application/x-thing; name="=?utf-8?q?na=C3=AFve?="',
]
_TAME_ENCODINGS = ["7bit", "8bit", "binary", "base64", "quoted-printable", None]
_ODD_ENCODINGS = [
    "BASE64",
    "Quoted-Printable",
    "base64 ",
    " base64",
    "base64; x=1",
    "base64 (comment)",
    "x-uuencode",
    "bogus",
    "7BIT",
]


def _crlf_free(data: bytes) -> bytes:
    return data.replace(b"\r", b"").replace(b"\n", b"")


@st.composite
def _body(draw: st.DrawFn, tame: bool, boundaries: tuple[str, ...]) -> bytes:
    lines = [line.encode() for line in draw(st.lists(_TEXT, max_size=6))]
    if draw(st.booleans()):
        lines.append(_crlf_free(draw(st.binary(max_size=30))))
    if boundaries and not tame and draw(st.integers(0, 3)) == 0:
        boundary = draw(st.sampled_from(boundaries))
        suffix = draw(st.sampled_from(["", "--", " ", "x", "--x", "\t", " --"]))
        lines.insert(
            draw(st.integers(0, len(lines))), ("--" + boundary + suffix).encode()
        )
    if draw(st.integers(0, 3)) == 0:
        lines.insert(0, draw(st.sampled_from([b"--", b"---", b"From x", b".", b""])))
    return b"\r\n".join(lines)


@st.composite
def _encoded(draw: st.DrawFn, data: bytes, tame: bool) -> tuple[str | None, bytes]:
    choices = _TAME_ENCODINGS if tame else [*_TAME_ENCODINGS, *_ODD_ENCODINGS]
    encoding = draw(st.sampled_from(choices))
    name = (encoding or "7bit").strip().lower()
    if name.startswith("base64"):
        body = base64.encodebytes(data).replace(b"\n", b"\r\n").rstrip(b"\r\n")
        bend = (
            "none"
            if tame
            else draw(
                st.sampled_from(
                    ["none", "none", "nopad", "junk", "afterpad", "space", "trunc"]
                )
            )
        )
        if bend == "nopad":
            body = body.rstrip(b"=")
        elif bend == "junk":
            body = body[:3] + b"!*" + body[3:]
        elif bend == "afterpad":
            body += b"=QUJD"
        elif bend == "space":
            body = body.replace(b"A", b" A")
        elif bend == "trunc" and len(body) % 4 != 1:
            body = body[:-1]
        return encoding, body
    if name.startswith("quoted-printable"):
        body = quopri.encodestring(data.replace(b"\r\n", b"\n"))
        body = body.replace(b"\n", b"\r\n")
        if not tame and draw(st.booleans()):
            body += b"=\r\n=4"
        return encoding, body
    return encoding, data


_BOUNDARY_FORMS = [
    "quoted",
    "plain",
    "spaces",
    "rfc2231",
    "rfc2231cs",
    "upper",
    "dup",
    "dupsame",
    "comment",
    "unterminated",
    "escaped",
    "trailing",
    "folded",
]


@st.composite
def _boundary_parameter(draw: st.DrawFn, boundary: str, tame: bool) -> str:
    form = "quoted" if tame else draw(st.sampled_from(_BOUNDARY_FORMS))
    if form == "quoted":
        return f'boundary="{boundary}"'
    if form == "plain":
        return f"boundary={boundary}"
    if form == "spaces":
        return f'boundary = "{boundary}"'
    if form == "rfc2231":
        cut = max(1, len(boundary) // 2)
        return f'boundary*0="{boundary[:cut]}"; boundary*1="{boundary[cut:]}"'
    if form == "rfc2231cs":
        return f"boundary*=us-ascii''{boundary.replace(' ', '%20')}"
    if form == "upper":
        return f'BOUNDARY="{boundary}"'
    if form == "dup":
        return f'boundary="{boundary}"; boundary="{boundary}x"'
    if form == "dupsame":
        return f'boundary="{boundary}"; boundary="{boundary}"'
    if form == "comment":
        return f'boundary="{boundary}" (comment)'
    if form == "unterminated":
        return f'boundary="{boundary}'
    if form == "escaped":
        return f'boundary="{boundary[:1]}\\{boundary[1:]}"'
    if form == "folded":
        cut = max(1, len(boundary) // 2)
        return f'boundary="{boundary[:cut]}\r\n {boundary[cut:]}"'
    return f'boundary="{boundary} "'


@st.composite
def _fields(draw: st.DrawFn, fields: list[tuple[str, str]], tame: bool) -> bytes:
    """
    A header block (without its blank line) for C{fields}, maybe bent.
    """
    lines: list[str] = []
    for name, value in fields:
        bend = "none"
        if not tame:
            bend = draw(st.sampled_from(["none"] * 6 + ["wsp", "case", "dup", "drop"]))
        if tame or bend == "none":
            if "; " in value and draw(st.booleans()):
                value = value.replace("; ", ";\r\n\t", 1)
        if bend == "wsp":
            lines.append(f"{name} : {value}")
            continue
        if bend == "case":
            name = name.upper()
        if bend == "drop":
            continue
        lines.append(f"{name}: {value}")
        if bend == "dup":
            lines.append(f"{name}: {value}")
    extra = draw(
        st.sampled_from(
            [None, None, "X-Other: 1"]
            if tame
            else [
                None,
                None,
                None,
                "X-Other: 1",
                "not a field",
                " leading",
                "Content-Type: text/html",
                "MIME-Version: 1.0",
            ]
        )
    )
    if extra:
        lines.insert(draw(st.integers(0, len(lines))), extra)
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


@st.composite
def _leaf(draw: st.DrawFn, tame: bool, outer: tuple[str, ...]) -> bytes:
    types = _LEAF_TYPES if tame else _LEAF_TYPES + _ODD_LEAF_TYPES
    content_type = draw(st.sampled_from(types))
    data = draw(_body(tame, outer))
    if content_type == "message/delivery-status" and tame:
        data = b"Reporting-MTA: dns; mx.example.com\r\n\r\nStatus: 5.0.0\r\n"
    encoding, body = draw(_encoded(data, tame))
    fields = [("Content-Type", content_type)]
    if encoding is not None:
        fields.append(("Content-Transfer-Encoding", encoding))
    if draw(st.booleans()):
        dispositions = ["attachment; filename=x.bin", "inline"]
        if not tame:
            dispositions.append('attachment; filename="a"; filename="b"')
        fields.append(("Content-Disposition", draw(st.sampled_from(dispositions))))
    return draw(_fields(fields, tame)) + b"\r\n" + body


@st.composite
def _attached(draw: st.DrawFn, depth: int, tame: bool, outer: tuple[str, ...]) -> bytes:
    inner = draw(_node(depth + 1, tame, outer))
    types = (
        ["message/rfc822"]
        if tame
        else [
            "message/rfc822",
            "message/global",
            "message/news",
            "MESSAGE/RFC822",
        ]
    )
    content_type = draw(st.sampled_from(types))
    encoding = draw(
        st.sampled_from([None, "7bit", "8bit"] if tame else [None, "7bit", "base64"])
    )
    fields = [("Content-Type", content_type)]
    if encoding is not None:
        fields.append(("Content-Transfer-Encoding", encoding))
    if encoding == "base64":
        inner = base64.encodebytes(inner).replace(b"\n", b"\r\n")
    head = b"From: c@example.com\r\nSubject: inner\r\n" if tame else b""
    return draw(_fields(fields, tame)) + b"\r\n" + head + inner


@st.composite
def _multipart(
    draw: st.DrawFn, depth: int, tame: bool, outer: tuple[str, ...]
) -> bytes:
    chars = _TAME_BOUNDARY_CHARS if tame else _BOUNDARY_CHARS
    boundary = draw(st.text(alphabet=chars, min_size=1, max_size=16))
    if tame:
        boundary = f"=_{boundary}_{depth}"
    used = boundary
    if not tame:
        bend = draw(
            st.sampled_from(["none"] * 5 + ["case", "prefix", "suffix", "strip"])
        )
        if bend == "case":
            used = boundary.swapcase()
        elif bend == "prefix" and len(boundary) > 1:
            used = boundary[:-1]
        elif bend == "suffix":
            used = boundary + "x"
        elif bend == "strip":
            used = boundary.strip()
    subtype = draw(
        st.sampled_from(
            ["mixed", "alternative", "related", "digest", "signed", "MIXED"]
        )
    )
    fields = [
        ("MIME-Version", "1.0"),
        (
            "Content-Type",
            f"multipart/{subtype}; {draw(_boundary_parameter(boundary, tame))}",
        ),
    ]
    if not tame and draw(st.integers(0, 9)) == 0:
        fields.append(
            (
                "Content-Transfer-Encoding",
                draw(st.sampled_from(["base64", "7bit", "quoted-printable"])),
            )
        )
    children = draw(
        st.lists(
            _node(depth + 1, tame, (*outer, used)),
            min_size=1 if tame else 0,
            max_size=4 if tame else 3,
        )
    )
    preamble = draw(
        st.sampled_from(
            [
                b"",
                b"",
                b"This is a multi-part message in MIME format.\r\n",
                b"\r\n",
                b"  \r\n",
                b"pre--" + used.encode() + b"\r\n",
            ]
        )
    )
    epilogue = draw(st.sampled_from([b"", b"", b"epilogue text\r\n", b"\r\n"]))
    delimiter = ("--" + used).encode()
    trail = b"" if tame else draw(st.sampled_from([b"", b"", b" ", b"\t", b"  x"]))
    body = preamble
    for child in children:
        body += delimiter + trail + b"\r\n" + child + b"\r\n"
    close = (
        "yes" if tame else draw(st.sampled_from(["yes", "yes", "yes", "no", "bare"]))
    )
    if close == "yes":
        body += delimiter + b"--\r\n" + epilogue
    elif close == "bare":
        body += delimiter + b"--"
    return draw(_fields(fields, tame)) + b"\r\n" + body


def _node(depth: int, tame: bool, outer: tuple[str, ...]) -> Any:
    kinds = ["leaf", "leaf", "multipart", "multipart", "message"]
    if depth >= 3:
        kinds = ["leaf"]

    @st.composite
    def node(draw: st.DrawFn) -> bytes:
        kind = draw(st.sampled_from(kinds))
        if kind == "leaf":
            return draw(_leaf(tame, outer))
        if kind == "message":
            return draw(_attached(depth, tame, outer))
        return draw(_multipart(depth, tame, outer))

    return node()


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """
    One adversarial (or, about half the time, tame) message, CRLF lines.
    """
    tame = draw(st.booleans())
    top = draw(_node(0, tame, ()))
    return b"From: a@example.com\r\nTo: b@example.org\r\nSubject: t\r\n" + top
