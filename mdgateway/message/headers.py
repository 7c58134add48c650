# -*- test-case-name: tests.test_message_headers -*-
"""
Work on the top-level header block: the fields the gateway stamps, the
Subject tag, removal of forged fields, and a cheap summary for logs and
history.

Stamping produces bytes to send before the original file, so the message is
never copied for it.  Tagging and removal stream the file through once,
changing only the bytes of the fields concerned.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import BinaryIO

import attrs

from mdgateway.message.errors import HeaderNameError
from mdgateway.message.fields import (
    FTEXT,
    decode_words,
    encode_words,
    needs_encoding,
)
from mdgateway.message.lines import LineReader

#: Where header lines are folded (RFC 5322's recommended limit).
MAX_LINE = 78
#: RFC 5322's hard limit on a line, without CRLF.
_HARD_LINE = 998
#: The longest header field name accepted for stamping.
MAX_NAME = 76
#: Piece size for reading header lines while streaming.
_PIECE = 64 * 1024
#: The most of a Subject field kept to decide whether it is already tagged.
_SUBJECT_LIMIT = 64 * 1024
#: The most of one summarised field kept.
_SUMMARY_VALUE = 4096
_FIELD_START = re.compile(rb"([!-9;-~]+)[ \t]*:")
_UNFOLD = re.compile(r"\r\n(?=[ \t])")


def validate_name(name: str) -> str:
    """
    Check a header field name (RFC 5322 C{ftext}: printable ASCII except
    colon, no spaces; at most L{MAX_NAME} characters so the field starts on
    one line).

    @return: the name.
    @raise HeaderNameError: naming the bad key.
    """
    if len(name) > MAX_NAME or not FTEXT.fullmatch(name):
        raise HeaderNameError(name)
    return name


def _fold_text(name: str, value: str) -> bytes | None:
    lines: list[str] = []
    current = f"{name}:"
    for index, word in enumerate(value.split(" ")):
        piece = " " + word
        if index and word and len(current) + len(piece) > MAX_LINE:
            lines.append(current)
            current = piece
        else:
            current += piece
    lines.append(current)
    if any(len(line) > _HARD_LINE for line in lines):
        return None
    return "\r\n".join(lines).encode("ascii") + b"\r\n"


def _fold_words(name: str, value: str) -> bytes:
    # The first word always shares the name's line, even if that makes the
    # line longer than 78: parsers keep the leading space of a value that
    # starts on a continuation line.
    head = f"{name}:"
    words = encode_words(value, first=MAX_LINE - len(head) - 1, rest=MAX_LINE - 1)
    return (head + " " + "\r\n ".join(words)).encode("ascii") + b"\r\n"


def format_field(name: str, value: str) -> bytes:
    """
    One header field, CRLF-terminated, folded at L{MAX_LINE} columns.

    A value with non-ASCII or control characters (CR and LF included, so a
    value can never add a line of its own), or with text that looks like an
    encoded word, is written whole as UTF-8 RFC 2047 encoded words.

    @raise HeaderNameError: if the name is not valid (see L{validate_name}).
    """
    validate_name(name)
    if not needs_encoding(value):
        folded = _fold_text(name, value)
        if folded is not None:
            return folded
    return _fold_words(name, value)


def format_fields(fields: Iterable[tuple[str, str]]) -> bytes:
    """
    The bytes of new header fields to send before the original message
    (the caller streams C{format_fields(...)} and then the file).

    Every name is checked before anything is formatted.

    @raise HeaderNameError: for the first invalid name.
    """
    pairs = list(fields)
    for name, _ in pairs:
        validate_name(name)
    return b"".join(format_field(name, value) for name, value in pairs)


def decode_value(raw: bytes | str) -> str:
    """
    A header value for display: unfolded, encoded words decoded leniently,
    raw 8-bit read as UTF-8 (or Latin-1 when it is not UTF-8), surrounding
    whitespace removed.
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    else:
        text = raw
    text = _UNFOLD.sub("", text).replace("\r", " ").replace("\n", " ").strip()
    return decode_words(text).strip()


def has_tag(subject: str, tag: str) -> bool:
    """
    Whether a decoded subject already carries the tag anywhere (so
    C{Re: [SANITIZED] ...} is not tagged again), ignoring case.
    """
    return tag.strip().casefold() in subject.casefold()


def _tag_bytes(tag: str, before_word: bool) -> bytes:
    if not needs_encoding(tag):
        return tag.encode("ascii")
    text = tag + " " if before_word else tag
    return " ".join(encode_words(text)).encode("ascii")


def _tagged(field: bytes, tag: str) -> bytes:
    colon = field.index(b":")
    head = field[: colon + 1]
    rest = field[colon + 1 :].lstrip(b" \t")
    empty_first_line = not rest or rest.startswith(b"\r\n")
    tag_bytes = _tag_bytes(tag, rest.startswith(b"=?"))
    if empty_first_line:
        return head + b" " + tag_bytes + rest
    new = head + b" " + tag_bytes + b" " + rest
    first_line = new.find(b"\r\n")
    if (first_line if first_line >= 0 else len(new)) > _HARD_LINE:
        new = head + b" " + tag_bytes + b"\r\n " + rest
    return new


@attrs.frozen
class HeaderRewrite:
    """
    What L{rewrite_headers} changed.

    @ivar removed: how many fields were removed.
    @ivar subject_tagged: whether a tag was added to a Subject (or a tagged
        Subject added because there was none).
    """

    removed: int
    subject_tagged: bool


class _Matcher:
    def __init__(self, names: Iterable[str]) -> None:
        exact: set[bytes] = set()
        prefixes: list[bytes] = []
        for name in names:
            if name.endswith("*"):
                validate_name(name[:-1] or "x")
                prefixes.append(name[:-1].lower().encode("ascii"))
            else:
                exact.add(validate_name(name).lower().encode("ascii"))
        self._exact = exact
        self._prefixes = tuple(prefixes)

    def __call__(self, name: bytes) -> bool:
        return name in self._exact or name.startswith(self._prefixes)


class _Rewriter:
    def __init__(
        self, output: BinaryIO, matcher: _Matcher, subject_tag: str | None
    ) -> None:
        self._output = output
        self._matcher = matcher
        self._tag = subject_tag
        self._action = "keep"
        self._subject: bytearray | None = None
        self.seen_subject = False
        self.removed = 0
        self.tagged = False

    def field(self, piece: bytes, name: bytes) -> None:
        self.flush()
        if self._matcher(name):
            self._action = "drop"
            self.removed += 1
        elif self._tag is not None and name == b"subject":
            self._action = "subject"
            self.seen_subject = True
            self._subject = bytearray()
        else:
            self._action = "keep"
        self.more(piece)

    def other(self, piece: bytes) -> None:
        self.flush()
        self._action = "keep"
        self.more(piece)

    def more(self, piece: bytes) -> None:
        if self._action == "keep":
            self._output.write(piece)
        elif self._action == "subject":
            assert self._subject is not None
            self._subject += piece
            if len(self._subject) > _SUBJECT_LIMIT:
                self.flush()
                self._action = "keep"

    def flush(self) -> None:
        if self._subject is None:
            return
        field = bytes(self._subject)
        self._subject = None
        assert self._tag is not None
        value = decode_value(field[field.index(b":") + 1 :])
        if has_tag(value, self._tag):
            self._output.write(field)
        else:
            self._output.write(_tagged(field, self._tag))
            self.tagged = True

    def end(self, mid_line: bool) -> None:
        self.flush()
        if self._tag is not None and not self.seen_subject:
            if mid_line:
                self._output.write(b"\r\n")
            self._output.write(b"Subject: " + _tag_bytes(self._tag, False) + b"\r\n")
            self.tagged = True


def rewrite_headers(
    source: BinaryIO,
    output: BinaryIO,
    *,
    prepend: bytes = b"",
    remove: Iterable[str] = (),
    subject_tag: str | None = None,
) -> HeaderRewrite:
    """
    Copy a message from C{source} (from its current position) to C{output},
    editing only the top-level header block, in one streamed pass.

    The header block runs to the first blank line, however large it is; a
    line in it that is not a field is kept as it is, and fields after it
    are still edited (some readers end the block there, others do not).

    @param prepend: bytes written first (such as L{format_fields} output).
    @param remove: field names to drop, case-insensitively; a name ending
        in C{*} is a prefix (C{X-Metadefender-*}).
    @param subject_tag: text to put before every Subject that does not
        already carry it (see L{has_tag}); a Subject holding only the tag is
        added when there is none.  Folding and encoded words of the
        original are kept.
    @raise HeaderNameError: for an invalid name in C{remove}.
    """
    rewriter = _Rewriter(output, _Matcher(remove), subject_tag)
    reader = LineReader(source)
    output.write(prepend)
    mid_line = False
    while True:
        piece = reader.readline(_PIECE)
        if not piece:
            rewriter.end(mid_line)
            break
        if mid_line or piece[:1] in (b" ", b"\t"):
            rewriter.more(piece)
        else:
            match = _FIELD_START.match(piece)
            if piece == b"\r\n":
                rewriter.end(False)
                output.write(piece)
                for chunk in reader.chunks():
                    output.write(chunk)
                break
            if match is None:
                # Not a field: readers differ on whether the header block
                # ends here, so it is kept and the search for fields to
                # remove goes on to the blank line.
                rewriter.other(piece)
            else:
                rewriter.field(piece, match.group(1).lower())
        mid_line = not piece.endswith(b"\r\n")
    return HeaderRewrite(removed=rewriter.removed, subject_tagged=rewriter.tagged)


def has_fields(source: BinaryIO, names: Iterable[str]) -> bool:
    """
    Whether the top-level header block (read from the file's current
    position to its blank line, however large) has a field named in
    C{names} (see L{rewrite_headers} for the names and prefixes).

    The whole block is read, in bounded pieces: a forged field after
    hundreds of KiB of other fields is found as surely as the first one.

    @raise HeaderNameError: for an invalid name in C{names}.
    """
    matcher = _Matcher(names)
    reader = LineReader(source)
    mid_line = False
    while True:
        piece = reader.readline(_PIECE)
        if not piece:
            return False
        if not mid_line and piece[:1] not in (b" ", b"\t"):
            if piece == b"\r\n":
                return False
            match = _FIELD_START.match(piece)
            if match is not None and matcher(match.group(1).lower()):
                return True
        mid_line = not piece.endswith(b"\r\n")


def tag_subject(source: BinaryIO, output: BinaryIO, tag: str) -> bool:
    """
    Copy a message, putting C{tag} (such as C{[SANITIZED]}) before its
    Subject unless it is there already.

    @return: whether the tag was added.
    """
    return rewrite_headers(source, output, subject_tag=tag).subject_tagged


def remove_headers(source: BinaryIO, output: BinaryIO, names: Iterable[str]) -> int:
    """
    Copy a message without the top-level fields named in C{names} (see
    L{rewrite_headers}), such as forged C{X-Metadefender-*} fields.

    @return: how many fields were removed.
    """
    return rewrite_headers(source, output, remove=names).removed


def read_header_block(source: BinaryIO, limit: int) -> tuple[bytes, bool]:
    """
    The top-level header block (without its blank line), at most C{limit}
    bytes of it, cut at a line end when the limit is hit; and whether the
    whole block was read.
    """
    data = source.read(limit + 4)
    if data.startswith(b"\r\n"):
        return b"", True
    end = data.find(b"\r\n\r\n")
    if end >= 0 and end + 2 <= limit:
        return data[: end + 2], True
    if len(data) <= limit:
        return data, True
    cut = data.rfind(b"\r\n", 0, limit)
    return (data[: cut + 2] if cut >= 0 else b""), False


@attrs.frozen
class HeaderSummary:
    """
    A few top-level fields, decoded for display.

    @ivar message_id: C{Message-ID}, as written.
    @ivar subject: decoded C{Subject}.
    @ivar sender: decoded C{From}.
    @ivar date: C{Date}, as written.
    @ivar received: number of C{Received} fields.
    @ivar header_bytes: bytes read (the whole header block with its blank
        line when C{complete}).
    @ivar complete: the header block ended within the limit.
    """

    message_id: str | None
    subject: str | None
    sender: str | None
    date: str | None
    received: int
    header_bytes: int
    complete: bool


_SUMMARY_FIELDS = {
    b"message-id": "message_id",
    b"subject": "subject",
    b"from": "sender",
    b"date": "date",
}


def read_summary(source: BinaryIO, limit: int = 256 * 1024) -> HeaderSummary:
    """
    Read the top-level header block of a message (from the file's current
    position), at most C{limit} bytes of it, and summarise it.  The first
    of each field counts.
    """
    reader = LineReader(source)
    values: dict[str, bytearray] = {}
    current: bytearray | None = None
    received = 0
    read = 0
    complete = False
    mid_line = False
    while read < limit:
        piece = reader.readline(min(_PIECE, limit - read))
        if not piece:
            complete = True
            break
        read += len(piece)
        if not mid_line and piece == b"\r\n":
            complete = True
            break
        if mid_line or piece[:1] in (b" ", b"\t"):
            if current is not None and len(current) < _SUMMARY_VALUE:
                current += piece[: _SUMMARY_VALUE - len(current)]
        else:
            match = _FIELD_START.match(piece)
            if match is None:
                complete = True
                break
            name = match.group(1).lower()
            received += name == b"received"
            current = None
            key = _SUMMARY_FIELDS.get(name)
            if key is not None and key not in values:
                current = values[key] = bytearray(
                    piece[match.end() : match.end() + _SUMMARY_VALUE]
                )
        mid_line = not piece.endswith(b"\r\n")

    def get(key: str) -> str | None:
        raw = values.get(key)
        return decode_value(bytes(raw)) if raw is not None else None

    return HeaderSummary(
        message_id=get("message_id"),
        subject=get("subject"),
        sender=get("sender"),
        date=get("date"),
        received=received,
        header_bytes=read,
        complete=complete,
    )
