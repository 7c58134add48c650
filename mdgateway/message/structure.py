# -*- test-case-name: tests.test_message_structure -*-
"""
A streaming MIME structure parser that records where each entity's header
block and body lie in the spooled file.

It reads the file once, in chunks, keeping only the MIME fields of the
entities it is inside, so memory is bounded whatever the size of the
message.  Anything a mail client might read differently from us (a boundary
that is never found, a line that looks like a delimiter but is not one, an
unknown charset, a malformed header block, ...) makes the structure
I{unreliable}: the parser stops, says why, and the caller scans the message
as one file instead of trusting a part list that may hide something.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from os import PathLike
from typing import BinaryIO

import attrs

from mdgateway.message.errors import CharsetError
from mdgateway.message.fields import (
    boundary_problem,
    clean_filename,
    decode_bytes,
    duplicate_parameter,
    get_parameter,
    split_parameters,
)
from mdgateway.message.lines import LineReader

#: Transfer encodings under which a body is its own bytes.
IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary"})
#: Every transfer encoding we can decode.
KNOWN_ENCODINGS = IDENTITY_ENCODINGS | {"base64", "quoted-printable"}
#: Types whose body is a whole message that is parsed in turn.
MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})
#: The one C{message/*} type whose body is not a message (but a list of
#: header blocks): kept as one leaf.
DELIVERY_STATUS = "message/delivery-status"
#: Multipart types that sign or encrypt their content (S/MIME, PGP/MIME).
ENVELOPE_TYPES = frozenset({"multipart/signed", "multipart/encrypted"})
#: Opaque S/MIME blobs.
PKCS7_TYPES = frozenset({"application/pkcs7-mime", "application/x-pkcs7-mime"})

_MIME_FIELDS = frozenset(
    {b"content-type", b"content-transfer-encoding", b"content-disposition"}
)
_FIELD_NAME = re.compile(rb"[!-9;-~]+")
_MIME_TYPE = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+/[!#$%&'*+\-.^_`|~0-9a-z]+")
_TOKEN = re.compile(rb"[ \t]*[A-Za-z0-9!#$%&'*+.^_`|~-]+")
#: The longest line read when checking a possible delimiter.
_DELIMITER_LINE = 1024
#: The longest boundary accepted (RFC 2046 says 70).
_MAX_BOUNDARY = 200


def is_message_type(content_type: str) -> bool:
    """
    Whether an entity of this type holds a message that is parsed in turn:
    every C{message/*} type but C{message/delivery-status}, as mail readers
    (Python's email among them) parse C{message/partial}, C{message/news}
    and the rest, not only C{message/rfc822}.
    """
    return content_type.startswith("message/") and content_type != DELIVERY_STATUS


@attrs.frozen
class StructureLimits:
    """
    Bounds on what the parser accepts before calling a structure unreliable.

    @ivar max_depth: deepest nesting of multiparts and attached messages.
    @ivar max_parts: most entities (every multipart, message and leaf).
    @ivar max_header_bytes: largest header block of one entity.
    @ivar strict_charsets: treat an unknown charset (of a text part, or in
        an encoded file name) as a reason to distrust the structure.
    """

    max_depth: int = 20
    max_parts: int = 1000
    max_header_bytes: int = 256 * 1024
    strict_charsets: bool = True


class Defect(enum.Enum):
    """
    Why a structure is unreliable.
    """

    BOUNDARY_NOT_FOUND = "boundary_not_found"
    MISSING_CLOSE_DELIMITER = "missing_close_delimiter"
    EMPTY_MULTIPART = "empty_multipart"
    AMBIGUOUS_DELIMITER = "ambiguous_delimiter"
    AMBIGUOUS_HEADER = "ambiguous_header"
    BAD_HEADER = "bad_header"
    HEADER_TOO_LARGE = "header_too_large"
    RAW_8BIT_HEADER = "raw_8bit_header"
    MISSING_SEPARATOR = "missing_separator"
    BAD_CONTENT_TYPE = "bad_content_type"
    BAD_TRANSFER_ENCODING = "bad_transfer_encoding"
    UNKNOWN_CHARSET = "unknown_charset"
    BAD_BASE64 = "bad_base64"
    BAD_QUOTED_PRINTABLE = "bad_quoted_printable"
    AMBIGUOUS_BODY = "ambiguous_body"
    TOO_DEEP = "too_deep"
    TOO_MANY_PARTS = "too_many_parts"


@attrs.frozen
class Entity:
    """
    One MIME entity and where it lies in the file.

    Offsets are absolute byte offsets in the spooled file.  For an entity
    inside a multipart, C{end} is where the CRLF before the next delimiter
    line starts (RFC 2046 gives that CRLF to the delimiter), so replacing
    C{[headers_start, end)} leaves the delimiters intact.

    @ivar part_id: C{"1"} for the message; C{"1.2"} for the second part of
        multipart C{"1"}; C{"1.2.1"} for the message inside the
        C{message/rfc822} part C{"1.2"}.
    @ivar depth: nesting depth, 0 for the message.
    @ivar headers_start: offset of the first byte of the header block.
    @ivar header_end: offset just after the last header field, where the
        blank line starts.
    @ivar body_start: offset of the first body byte, after the blank line.
    @ivar end: offset just after the last body byte.
    @ivar content_type: lowercased C{type/subtype}, the RFC 2045 default
        when absent.
    @ivar charset: lowercased C{charset} parameter, if any.
    @ivar transfer_encoding: lowercased, C{7bit} when absent.
    @ivar disposition: lowercased disposition type, if any.
    @ivar filename: decoded and cleaned name (Content-Disposition
        C{filename}, else Content-Type C{name}), if any.
    @ivar boundary: the boundary of a multipart.
    @ivar signed: inside C{multipart/signed} or C{multipart/encrypted}, or
        an C{application/pkcs7-mime} blob: changing it breaks a signature.
    @ivar children: parts of a multipart, or the one message of a
        C{message/rfc822} entity; empty for a leaf.
    @ivar preamble: C{(start, end)} offsets of a multipart's preamble (the
        text before its first delimiter), if it has one.
    @ivar epilogue: C{(start, end)} offsets of a multipart's epilogue (the
        text after its close-delimiter line), if it has one.
    """

    part_id: str
    depth: int
    headers_start: int
    header_end: int
    body_start: int
    end: int
    content_type: str
    charset: str | None
    transfer_encoding: str
    disposition: str | None
    filename: str | None
    boundary: bytes | None
    signed: bool
    children: tuple[Entity, ...] = ()
    preamble: tuple[int, int] | None = None
    epilogue: tuple[int, int] | None = None

    @property
    def is_multipart(self) -> bool:
        """
        Whether this entity is a multipart (its children are its parts).
        """
        return self.boundary is not None

    @property
    def is_leaf(self) -> bool:
        """
        Whether this entity has content of its own rather than sub-entities.
        """
        return not self.children

    def walk(self) -> Iterator[Entity]:
        """
        Yield this entity and every entity below it, in file order.
        """
        pending = [self]
        while pending:
            entity = pending.pop()
            yield entity
            pending.extend(reversed(entity.children))


@attrs.frozen
class Structure:
    """
    The result of parsing a message.

    @ivar size: the file size.
    @ivar root: the message entity, or L{None} when unreliable.
    @ivar defect: why the structure is unreliable, or L{None}.
    @ivar detail: a human-readable explanation of C{defect}.
    @ivar signed: an S/MIME (or PGP/MIME) signed or encrypted entity was
        seen; modifying parts inside it would break the signature.
    """

    size: int
    root: Entity | None
    defect: Defect | None = None
    detail: str = ""
    signed: bool = False

    @property
    def unreliable(self) -> bool:
        """
        Whether the part list cannot be trusted (see L{Defect}).
        """
        return self.defect is not None

    def walk(self) -> Iterator[Entity]:
        """
        Yield every entity in file order (nothing when unreliable).
        """
        if self.root is not None:
            yield from self.root.walk()

    def find(self, part_id: str) -> Entity | None:
        """
        The entity with this part id, if there is one.
        """
        for entity in self.walk():
            if entity.part_id == part_id:
                return entity
        return None

    def parent(self, part_id: str) -> Entity | None:
        """
        The entity directly containing C{part_id}, if any.
        """
        for entity in self.walk():
            if any(child.part_id == part_id for child in entity.children):
                return entity
        return None


class _State(enum.Enum):
    HEADERS = enum.auto()
    LEAF = enum.auto()
    MESSAGE = enum.auto()
    PREAMBLE = enum.auto()
    PARTS = enum.auto()
    EPILOGUE = enum.auto()


@attrs.frozen
class _Mime:
    content_type: str
    charset: str | None
    transfer_encoding: str
    disposition: str | None
    filename: str | None
    boundary: bytes | None


@attrs.define(eq=False)
class _Node:
    part_id: str
    depth: int
    headers_start: int
    parent: _Node | None
    signed: bool
    state: _State = _State.HEADERS
    fields: dict[bytes, bytearray] = attrs.Factory(dict)
    current: bytearray | None = None
    seen_field: bool = False
    header_size: int = 0
    header_end: int = -1
    body_start: int = -1
    end: int = -1
    mime: _Mime | None = None
    children: list[_Node] = attrs.Factory(list)
    preamble_end: int = -1
    epilogue_start: int = -1

    @property
    def boundary(self) -> bytes | None:
        if self.state in (_State.PREAMBLE, _State.PARTS, _State.EPILOGUE):
            assert self.mime is not None
            return self.mime.boundary
        return None


class _UnreliableError(Exception):
    def __init__(self, defect: Defect, detail: str) -> None:
        super().__init__(detail)
        self.defect = defect
        self.detail = detail


class _Parser:
    def __init__(self, file: BinaryIO, limits: StructureLimits) -> None:
        self._reader = LineReader(file)
        self._limits = limits
        self._count = 0
        self._signed = False
        self._root = self._new("1", 0, 0, None, False)
        self._stack = [self._root]
        self._multiparts = 0

    def run(self) -> Entity:
        reader = self._reader
        while True:
            top = self._stack[-1]
            if top.state is _State.HEADERS:
                offset = reader.offset
                room = self._limits.max_header_bytes - top.header_size + 1
                line = reader.readline(room)
                if not line:
                    break
                if self._multiparts and line.startswith(b"--"):
                    match = self._match(line, offset)
                    if match is not None:
                        self._delimiter(match[0], match[1], offset, line)
                        continue
                self._header_line(top, line, offset)
            elif not self._multiparts:
                reader.skip_to_end()
                break
            else:
                if not reader.skip_to_line_starting(b"--"):
                    break
                offset = reader.offset
                line = reader.readline(_DELIMITER_LINE)
                match = self._match(line, offset)
                if match is not None:
                    self._delimiter(match[0], match[1], offset, line)
        self._finish(reader.offset)
        return _freeze(self._root)

    @property
    def signed(self) -> bool:
        return self._signed

    def _new(
        self, part_id: str, depth: int, start: int, parent: _Node | None, signed: bool
    ) -> _Node:
        self._count += 1
        if self._count > self._limits.max_parts:
            raise _UnreliableError(
                Defect.TOO_MANY_PARTS,
                f"more than {self._limits.max_parts} MIME entities",
            )
        if depth > self._limits.max_depth:
            raise _UnreliableError(
                Defect.TOO_DEEP,
                f"part {part_id} is nested deeper than {self._limits.max_depth}",
            )
        return _Node(part_id, depth, start, parent, signed)

    def _match(self, line: bytes, offset: int) -> tuple[_Node, bool] | None:
        terminated = line.endswith(b"\r\n")
        body = line[:-2] if terminated else line
        terminated = terminated or self._reader.at_eof
        found: tuple[_Node, bool] | None = None
        for node in reversed(self._stack):
            boundary = node.boundary
            if boundary is None or not body.startswith(b"--" + boundary):
                continue
            rest = body[len(boundary) + 2 :]
            close = rest.startswith(b"--")
            if close:
                rest = rest[2:]
            if not terminated or rest.strip(b" \t"):
                raise _UnreliableError(
                    Defect.AMBIGUOUS_DELIMITER,
                    f"the line at offset {offset} starts like a delimiter of "
                    f"part {node.part_id} but is not one",
                )
            if found is not None:
                raise _UnreliableError(
                    Defect.AMBIGUOUS_DELIMITER,
                    f"the line at offset {offset} is a delimiter of both part "
                    f"{found[0].part_id} and part {node.part_id}",
                )
            found = (node, close)
        return found

    def _delimiter(self, node: _Node, close: bool, offset: int, line: bytes) -> None:
        index = next(i for i, item in enumerate(self._stack) if item is node)
        end = offset - 2 if offset >= node.body_start + 2 else offset
        for deeper in reversed(self._stack[index + 1 :]):
            self._close(deeper, end)
        del self._stack[index + 1 :]
        self._multiparts = sum(1 for item in self._stack if item.boundary is not None)
        if node.state is _State.EPILOGUE:
            raise _UnreliableError(
                Defect.AMBIGUOUS_DELIMITER,
                f"delimiter of part {node.part_id} at offset {offset} after "
                "its close-delimiter",
            )
        if node.state is _State.PREAMBLE:
            node.preamble_end = end
        if close:
            if node.state is _State.PREAMBLE:
                raise _UnreliableError(
                    Defect.EMPTY_MULTIPART, f"multipart {node.part_id} has no parts"
                )
            node.state = _State.EPILOGUE
            node.epilogue_start = offset + len(line)
            return
        node.state = _State.PARTS
        assert node.mime is not None
        child = self._new(
            f"{node.part_id}.{len(node.children) + 1}",
            node.depth + 1,
            offset + len(line),
            node,
            node.signed or node.mime.content_type in ENVELOPE_TYPES,
        )
        node.children.append(child)
        self._stack.append(child)

    def _close(self, node: _Node, end: int) -> None:
        if node.state is _State.PREAMBLE:
            raise _UnreliableError(
                Defect.BOUNDARY_NOT_FOUND,
                f"the boundary of multipart {node.part_id} never appears",
            )
        if node.state is _State.PARTS:
            raise _UnreliableError(
                Defect.MISSING_CLOSE_DELIMITER,
                f"multipart {node.part_id} has no close-delimiter",
            )
        if node.state is _State.HEADERS:
            raise _UnreliableError(
                Defect.MISSING_SEPARATOR,
                f"part {node.part_id} ends inside its header block",
            )
        node.end = end
        node.body_start = min(node.body_start, end)

    def _finish(self, size: int) -> None:
        for node in reversed(self._stack):
            if node.state is _State.HEADERS:
                self._end_headers(node, size, headers_only=True)
            self._close(node, size)

    def _header_line(self, node: _Node, line: bytes, offset: int) -> None:
        node.header_size += len(line)
        if node.header_size > self._limits.max_header_bytes:
            raise _UnreliableError(
                Defect.HEADER_TOO_LARGE,
                f"the header block of part {node.part_id} is larger than "
                f"{self._limits.max_header_bytes} bytes",
            )
        if line == b"\r\n":
            self._end_headers(node, offset)
            return
        content = line[:-2] if line.endswith(b"\r\n") else line
        if b"\r" in content or b"\n" in content:
            raise _UnreliableError(
                Defect.BAD_HEADER,
                f"bare CR or LF in the header block of part {node.part_id}",
            )
        if content[:1] in (b" ", b"\t"):
            if not node.seen_field:
                raise _UnreliableError(
                    Defect.BAD_HEADER,
                    f"the header block of part {node.part_id} starts with a "
                    "continuation line",
                )
            if node.current is not None:
                # Kept folded: readers differ on folds inside some values.
                node.current += b"\r\n" + content
            return
        colon = content.find(b":")
        name = content[:colon] if colon > 0 else b""
        if name[-1:] in (b" ", b"\t") and _FIELD_NAME.fullmatch(name.rstrip(b" \t")):
            # RFC 5322's obsolete syntax allows it, but some readers (Python's
            # email among them) end the header block at such a line.
            raise _UnreliableError(
                Defect.BAD_HEADER,
                f"the field at offset {offset} in the header block of part "
                f"{node.part_id} has space before its colon",
            )
        if not _FIELD_NAME.fullmatch(name):
            raise _UnreliableError(
                Defect.BAD_HEADER,
                f"the line at offset {offset} in the header block of part "
                f"{node.part_id} is not a header field",
            )
        node.seen_field = True
        key = name.lower()
        if key in _MIME_FIELDS:
            if key in node.fields:
                raise _UnreliableError(
                    Defect.AMBIGUOUS_HEADER,
                    f"part {node.part_id} has more than one "
                    f"{key.decode('ascii')} field",
                )
            node.current = node.fields[key] = bytearray(content[colon + 1 :])
        else:
            node.current = None

    def _end_headers(
        self, node: _Node, offset: int, headers_only: bool = False
    ) -> None:
        node.header_end = offset
        node.body_start = offset if headers_only else offset + 2
        mime = node.mime = self._mime(node)
        node.fields = {}
        node.current = None
        if mime.boundary is not None:
            if headers_only:
                raise _UnreliableError(
                    Defect.BOUNDARY_NOT_FOUND,
                    f"multipart {node.part_id} has no body",
                )
            node.state = _State.PREAMBLE
            self._multiparts += 1
            if mime.content_type in ENVELOPE_TYPES:
                self._signed = True
        elif (
            is_message_type(mime.content_type)
            and mime.transfer_encoding in IDENTITY_ENCODINGS
            and not headers_only
        ):
            node.state = _State.MESSAGE
            child = self._new(
                f"{node.part_id}.1", node.depth + 1, offset + 2, node, node.signed
            )
            node.children.append(child)
            self._stack.append(child)
        else:
            node.state = _State.LEAF
            if mime.content_type in PKCS7_TYPES:
                node.signed = True
                self._signed = True

    def _text(self, node: _Node, key: bytes, folded: bool = False) -> str | None:
        """
        A MIME field's value, unfolded (or as folded, with C{folded}).
        """
        raw = node.fields.get(key)
        if raw is None:
            return None
        try:
            text = raw.decode("utf-8")
            return text if folded else text.replace("\r\n", "")
        except UnicodeDecodeError:
            raise _UnreliableError(
                Defect.RAW_8BIT_HEADER,
                f"the {key.decode('ascii')} field of part {node.part_id} has "
                "raw 8-bit bytes that are not UTF-8",
            ) from None

    def _mime(self, node: _Node) -> _Mime:
        strict = self._limits.strict_charsets
        parent = node.parent
        digest = (
            parent is not None
            and parent.mime is not None
            and parent.mime.content_type == "multipart/digest"
        )
        content_type = "message/rfc822" if digest else "text/plain"
        parameters: list[tuple[str, str]] = []
        raw_type = self._text(node, b"content-type")
        if raw_type is not None:
            main, parameters = split_parameters(raw_type)
            content_type = main.lower()
            if not _MIME_TYPE.fullmatch(content_type):
                raise _UnreliableError(
                    Defect.BAD_CONTENT_TYPE,
                    f"part {node.part_id} has Content-Type {main[:100]!r}",
                )
            self._no_duplicates(node, "content-type", parameters)
        charset = get_parameter(parameters, "charset", words=False)
        charset = charset.strip().lower() if charset else None
        if strict and charset and content_type.startswith("text/"):
            try:
                decode_bytes(b"x", charset, strict=True)
            except CharsetError:
                raise _UnreliableError(
                    Defect.UNKNOWN_CHARSET,
                    f"part {node.part_id} has unknown charset {charset[:100]!r}",
                ) from None
        boundary = None
        if content_type.startswith("multipart/"):
            problem = boundary_problem(self._text(node, b"content-type", True) or "")
            if problem is not None:
                raise _UnreliableError(
                    Defect.AMBIGUOUS_HEADER,
                    f"multipart {node.part_id} has {problem}",
                )
            value = get_parameter(parameters, "boundary", words=False)
            boundary = value.encode("utf-8") if value else b""
            if not 0 < len(boundary) <= _MAX_BOUNDARY:
                raise _UnreliableError(
                    Defect.BAD_CONTENT_TYPE,
                    f"multipart {node.part_id} has a missing or oversized boundary",
                )
        raw_encoding = self._text(node, b"content-transfer-encoding")
        encoding = "7bit"
        if raw_encoding is not None:
            encoding = split_parameters(raw_encoding)[0].lower()
            field = node.fields[b"content-transfer-encoding"]
            if not _TOKEN.fullmatch(field):
                # Readers differ on anything but a bare token: Python's
                # email, for one, decodes "base64 " (a trailing space) or a
                # folded value as 7bit.
                raise _UnreliableError(
                    Defect.AMBIGUOUS_HEADER,
                    f"the Content-Transfer-Encoding field of part "
                    f"{node.part_id} is not a bare token",
                )
        if encoding not in KNOWN_ENCODINGS or (
            (boundary is not None or content_type == DELIVERY_STATUS)
            and encoding not in IDENTITY_ENCODINGS
        ):
            raise _UnreliableError(
                Defect.BAD_TRANSFER_ENCODING,
                f"part {node.part_id} ({content_type}) has transfer encoding "
                f"{encoding[:100]!r}",
            )
        disposition = None
        filename = None
        try:
            raw_disposition = self._text(node, b"content-disposition")
            if raw_disposition is not None:
                main, disposition_parameters = split_parameters(raw_disposition)
                disposition = main.lower() or None
                self._no_duplicates(node, "content-disposition", disposition_parameters)
                filename = get_parameter(
                    disposition_parameters, "filename", strict=strict
                )
            if filename is None:
                filename = get_parameter(parameters, "name", strict=strict)
        except CharsetError as error:
            raise _UnreliableError(
                Defect.UNKNOWN_CHARSET,
                f"the file name of part {node.part_id} uses unknown charset "
                f"{error.charset[:100]!r}",
            ) from None
        return _Mime(
            content_type=content_type,
            charset=charset,
            transfer_encoding=encoding,
            disposition=disposition,
            filename=clean_filename(filename) if filename is not None else None,
            boundary=boundary,
        )

    def _no_duplicates(
        self, node: _Node, field: str, parameters: list[tuple[str, str]]
    ) -> None:
        duplicate = duplicate_parameter(parameters)
        if duplicate is not None:
            raise _UnreliableError(
                Defect.AMBIGUOUS_HEADER,
                f"the {field} field of part {node.part_id} has two "
                f"{duplicate[:100]!r} parameters",
            )


def _span(start: int, end: int) -> tuple[int, int] | None:
    return (start, end) if 0 <= start < end else None


def _freeze(node: _Node) -> Entity:
    mime = node.mime
    assert mime is not None
    return Entity(
        part_id=node.part_id,
        depth=node.depth,
        headers_start=node.headers_start,
        header_end=node.header_end,
        body_start=node.body_start,
        end=node.end,
        content_type=mime.content_type,
        charset=mime.charset,
        transfer_encoding=mime.transfer_encoding,
        disposition=mime.disposition,
        filename=mime.filename,
        boundary=mime.boundary,
        signed=node.signed,
        children=tuple(_freeze(child) for child in node.children),
        preamble=_span(node.body_start, node.preamble_end),
        epilogue=_span(node.epilogue_start, node.end),
    )


def parse_structure(file: BinaryIO, limits: StructureLimits | None = None) -> Structure:
    """
    Parse the MIME structure of a message file.

    Never raises for bad content: a message we cannot be sure about comes
    back with L{Structure.unreliable} set.  Reads from the start of the
    file, in chunks; runs in time linear in the file size.

    @param file: a seekable binary file of CRLF lines.
    @raise OSError: if the file cannot be read.
    """
    limits = limits or StructureLimits()
    file.seek(0)
    parser = None
    try:
        parser = _Parser(file, limits)
        root = parser.run()
    except _UnreliableError as unreliable:
        size = file.seek(0, 2)
        return Structure(
            size=size,
            root=None,
            defect=unreliable.defect,
            detail=unreliable.detail,
            signed=parser.signed if parser is not None else False,
        )
    return Structure(size=root.end, root=root, signed=parser.signed)


def parse_file(
    path: str | PathLike[str], limits: StructureLimits | None = None
) -> Structure:
    """
    L{parse_structure} for the file at C{path}.
    """
    with open(path, "rb") as file:
        return parse_structure(file, limits)
