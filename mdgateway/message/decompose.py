# -*- test-case-name: tests.test_message_decompose -*-
"""
Write the parts of a message that Core scans to files: the body (text and
HTML parts) and every attachment, inline parts and the parts of attached
messages included, decoded from their transfer encodings.

This is plain blocking code meant for a worker thread.  It streams: each
part is read in chunks and decoded incrementally, so memory stays bounded
for any message size.  When the structure cannot be trusted the whole
message is offered as one file, C{message.eml}, instead.
"""

from __future__ import annotations

import binascii
import enum
import os
import re
import shutil
from os import PathLike
from pathlib import Path
from typing import BinaryIO, Protocol

import attrs

from mdgateway.message.lines import read_range
from mdgateway.message.readings import ReadingError, read_alternatives
from mdgateway.message.structure import (
    DELIVERY_STATUS,
    IDENTITY_ENCODINGS,
    Defect,
    Entity,
    Structure,
    StructureLimits,
    parse_structure,
)

#: The name under which an unreliable message is offered whole.
WHOLE_MESSAGE_NAME = "message.eml"
#: How deep encoded attached messages are decoded and taken apart.
MAX_ENCODED_NESTING = 4
#: Name prefixes of what the decomposer writes into its folder.
_MADE = (
    "part-",
    "preamble-",
    "epilogue-",
    "body-",
    "encoded-",
    "inner-",
    "stripped-",
)

_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_WHITESPACE = b" \t\r\n"
#: Extensions for made-up names of unnamed attachments.
_EXTENSIONS = {
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/csv": ".csv",
    "text/xml": ".xml",
    "message/rfc822": ".eml",
    "message/global": ".eml",
    "message/delivery-status": ".txt",
    "text/rfc822-headers": ".txt",
    "application/pkcs7-mime": ".p7m",
    "application/x-pkcs7-mime": ".p7m",
    "application/pkcs7-signature": ".p7s",
    "application/x-pkcs7-signature": ".p7s",
    "application/pgp-signature": ".asc",
    "application/pgp-encrypted": ".asc",
    "application/pdf": ".pdf",
    "application/zip": ".zip",
    "application/ms-tnef": ".dat",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
}


class PartOrigin(enum.Enum):
    """
    Where a scannable part comes from, which decides whether it can be
    replaced on its own.
    """

    #: An entity of our reading of the message: it can be stripped or
    #: replaced by its sanitized version.
    ENTITY = "entity"
    #: Text as it is: the non-blank preamble or epilogue of a multipart, the
    #: whole body of a C{message/*} entity that readers may keep as one file
    #: rather than parse, or the encoded text of an encoded message that
    #: readers may take for the message itself.
    TEXT = "text"
    #: The whole message, offered when its structure is unreliable.
    WHOLE = "whole"
    #: A payload of another reader's reading of an unreliable message.
    READING = "reading"
    #: A part of an encoded attached message, decoded and taken apart: it
    #: goes (or stays) with that message.
    NESTED = "nested"
    #: An entity decoded as other readers decode it (quoted-printable with
    #: space at the end of a line, which some delete).
    VARIANT = "variant"


class PartKind(enum.Enum):
    """
    Whether a part is message text or an attachment.
    """

    BODY = "body"
    ATTACHMENT = "attachment"


@attrs.frozen
class ScannablePart:
    """
    One decoded part written to disk for Core.

    @ivar part_id: the entity's part id (see L{Entity.part_id}); the key
        for replacements in L{mdgateway.message.rebuild.rebuild}.
    @ivar kind: L{PartKind.BODY} for C{text/plain} and C{text/html} parts
        that are neither C{attachment} nor named; otherwise attachment.
    @ivar content_type: lowercased C{type/subtype}.
    @ivar charset: the declared charset, if any.
    @ivar filename: the decoded, cleaned file name, or a made-up one
        (C{body.txt}, C{body.html}, C{part-1.2.bin}, ...).
    @ivar named: whether C{filename} came from the message.
    @ivar inline: the part is shown in place: disposition C{inline}, or no
        disposition and body text or a part of C{multipart/related} (inline
        images).
    @ivar headers_start: see L{Entity}.
    @ivar body_start: see L{Entity}.
    @ivar end: see L{Entity}.
    @ivar path: the file holding the decoded content.
    @ivar size: its size in bytes.
    @ivar in_attached_message: the part belongs to an attached message
        (C{message/rfc822}), not to the message itself.
    @ivar signed: changing this part would break an S/MIME or PGP/MIME
        signature, or the part is an opaque C{pkcs7-mime} blob.
    """

    part_id: str
    kind: PartKind
    content_type: str
    charset: str | None
    filename: str
    named: bool
    inline: bool
    headers_start: int
    body_start: int
    end: int
    path: Path
    size: int
    in_attached_message: bool
    signed: bool
    origin: PartOrigin = PartOrigin.ENTITY

    @property
    def replaceable(self) -> bool:
        """
        Whether the part can be stripped or sanitized on its own: only an
        entity of our reading can; content found anywhere else can only
        go (or stay) with the whole message.
        """
        return self.origin is PartOrigin.ENTITY


@attrs.frozen
class Decomposition:
    """
    What to scan, and the structure to rebuild with.

    @ivar parts: the scannable parts in file order; when unreliable, one
        part, the whole message as C{message.eml}.
    @ivar structure: the parsed structure (its C{defect} set when
        unreliable, including for bad base64 found while decoding).
    @ivar reading_error: why another reading of an unreliable message
        could not be completed (see L{mdgateway.message.readings}); such a
        message cannot be called scanned.
    """

    parts: tuple[ScannablePart, ...]
    structure: Structure
    reading_error: str | None = None

    @property
    def unreliable(self) -> bool:
        """
        Whether the parts could not be trusted and the message is offered
        whole (see L{Decomposition.defect}).
        """
        return self.structure.unreliable

    @property
    def defect(self) -> Defect | None:
        """
        Why the message is offered whole, if it is.
        """
        return self.structure.defect

    @property
    def detail(self) -> str:
        """
        A human-readable reason for C{defect}.
        """
        return self.structure.detail

    @property
    def signed(self) -> bool:
        """
        The message has S/MIME or PGP/MIME signed or encrypted content (see
        L{Structure.signed}); by default it should not be modified.
        """
        return self.structure.signed


class _Decoder(Protocol):
    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class _ContentError(Exception):
    """
    A part's content that readers would take apart differently.
    """

    defect = Defect.BAD_BASE64


class _Base64Error(_ContentError):
    pass


class _DeliveryStatusError(_ContentError):
    defect = Defect.AMBIGUOUS_BODY


class _EncodedMessageError(_ContentError):
    defect = Defect.AMBIGUOUS_BODY


class _QuotedPrintableError(_ContentError):
    defect = Defect.BAD_QUOTED_PRINTABLE


_FIELD_LINE = re.compile(rb"[!-9;-~]+:")


class _DeliveryStatus:
    """
    Checks, as it streams, that a C{message/delivery-status} body is what
    RFC 3464 says, blocks of header fields and nothing else: readers that
    parse it (Python's email does) take any other line for the body of a
    block of its own, which this reading would not see.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._in_block = False

    def feed(self, data: bytes) -> bytes:
        lines = (self._pending + data).split(b"\r\n")
        self._pending = lines.pop()
        for line in lines:
            self._line(line)
        return data

    def finish(self) -> bytes:
        if self._pending:
            self._line(self._pending)
        return b""

    def _line(self, line: bytes) -> None:
        if not line:
            self._in_block = False
        elif line[:1] in (b" ", b"\t") and self._in_block:
            pass
        elif _FIELD_LINE.match(line):
            self._in_block = True
        else:
            raise _DeliveryStatusError(
                "a delivery-status line that is not a header field"
            )


class _Identity:
    def feed(self, data: bytes) -> bytes:
        return data

    def finish(self) -> bytes:
        return b""


class _Base64:
    """
    Incremental base64 decoding that tolerates line breaks, spaces and
    missing final padding, and rejects everything else.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._done = False

    def feed(self, data: bytes) -> bytes:
        data = data.translate(None, _WHITESPACE)
        if not data:
            return b""
        if self._done:
            if data.strip(b"="):
                raise _Base64Error("data after the padding")
            return b""
        if data.translate(None, _BASE64_ALPHABET).strip(b"="):
            raise _Base64Error("characters outside the base64 alphabet")
        data = self._pending + data
        pad = data.find(b"=")
        if pad >= 0:
            if data[pad:].strip(b"="):
                raise _Base64Error("data after the padding")
            if pad % 4 < 2:
                raise _Base64Error("misplaced padding")
            self._done = True
            self._pending = b""
            return _decode_base64(data[:pad])
        whole = len(data) - len(data) % 4
        self._pending = data[whole:]
        return binascii.a2b_base64(data[:whole])

    def finish(self) -> bytes:
        if len(self._pending) % 4 == 1:
            raise _Base64Error("truncated data")
        return _decode_base64(self._pending)


def _decode_base64(data: bytes) -> bytes:
    if len(data) % 4 == 1:
        raise _Base64Error("truncated data")
    return binascii.a2b_base64(data + b"=" * (-len(data) % 4))


_TRAILING_SPACE = re.compile(rb"[ \t]+(?=\r\n)")
_QP_INVALID = re.compile(rb"[^\t\r\n\x20-\x7e]|=(?![0-9A-Fa-f]{2}|[ \t]*\r\n|[ \t]*\Z)")
_FINAL_SPACE = re.compile(rb"[ \t]+(?=\r\n|\Z)")


class _QuotedPrintable:
    """
    Incremental quoted-printable decoding, cutting only where no escape or
    soft line break can be split.

    Readers differ on space at the end of an encoded line (RFC 2045 says
    to delete it; Python keeps it): L{trailing} says whether there was
    any, and with C{strip} it is deleted, for the other reading.
    """

    def __init__(self, strip: bool = False) -> None:
        self._pending = b""
        self._strip = strip
        self.trailing = False

    def _decode(self, data: bytes, final: bool) -> bytes:
        if _QP_INVALID.search(data):
            # A raw control or 8-bit byte, or an "=" that is no escape:
            # readers drop, keep or replace it, each their own way.
            raise _QuotedPrintableError("not quoted-printable")
        pattern = _FINAL_SPACE if final else _TRAILING_SPACE
        if pattern.search(data):
            self.trailing = True
            if self._strip:
                data = pattern.sub(b"", data)
        return binascii.a2b_qp(data)

    def feed(self, data: bytes) -> bytes:
        data = self._pending + data
        cut = data.rfind(b"\r\n") + 2
        if cut < 2:
            cut = len(data)
            equals = data.rfind(b"=", max(0, cut - 3))
            if equals >= 0:
                cut = equals
        self._pending = data[cut:]
        return self._decode(data[:cut], False)

    def finish(self) -> bytes:
        data, self._pending = self._pending, b""
        return self._decode(data, True)


def _decoder(encoding: str) -> _Decoder:
    if encoding == "base64":
        return _Base64()
    if encoding == "quoted-printable":
        return _QuotedPrintable()
    return _Identity()


def _scannable(root: Entity) -> list[tuple[Entity, Entity | None, bool]]:
    """
    The leaves below C{root} in file order, each with its parent and
    whether it lies inside an attached message.
    """
    found: list[tuple[Entity, Entity | None, bool]] = []
    pending: list[tuple[Entity, Entity | None, bool]] = [(root, None, False)]
    while pending:
        entity, parent, attached = pending.pop()
        if entity.is_leaf:
            found.append((entity, parent, attached))
            continue
        inner = attached or not entity.is_multipart
        pending.extend((child, entity, inner) for child in reversed(entity.children))
    return found


def _describe(entity: Entity) -> tuple[PartKind, str, bool]:
    body = (
        entity.content_type in ("text/plain", "text/html")
        and entity.disposition != "attachment"
        and entity.filename is None
    )
    if entity.filename is not None:
        return (
            PartKind.BODY if body else PartKind.ATTACHMENT,
            entity.filename,
            True,
        )
    if body:
        suffix = ".html" if entity.content_type == "text/html" else ".txt"
        return PartKind.BODY, f"body{suffix}", False
    extension = _EXTENSIONS.get(entity.content_type, ".bin")
    return PartKind.ATTACHMENT, f"part-{entity.part_id}{extension}", False


def _inline(entity: Entity, parent: Entity | None, kind: PartKind) -> bool:
    if entity.disposition is not None:
        return entity.disposition == "inline"
    related = parent is not None and parent.content_type == "multipart/related"
    return kind is PartKind.BODY or related


def _write_part(
    source: BinaryIO,
    entity: Entity,
    parent: Entity | None,
    attached: bool,
    directory: Path,
    variants: list[ScannablePart],
) -> ScannablePart:
    """
    Write one leaf, decoded; a quoted-printable leaf with space at the end
    of an encoded line is also written as readers that delete that space
    decode it (appended to C{variants}).
    """
    path = directory / f"part-{entity.part_id}"
    decoder = _decoder(entity.transfer_encoding)
    check = _DeliveryStatus() if entity.content_type == DELIVERY_STATUS else _Identity()
    size = 0
    with open(path, "wb") as output:
        for chunk in read_range(source, entity.body_start, entity.end):
            data = check.feed(decoder.feed(chunk))
            output.write(data)
            size += len(data)
        data = check.feed(decoder.finish())
        check.finish()
        output.write(data)
        size += len(data)
    kind, filename, named = _describe(entity)
    if isinstance(decoder, _QuotedPrintable) and decoder.trailing:
        variant = directory / f"stripped-{entity.part_id}"
        stripping = _QuotedPrintable(strip=True)
        with open(variant, "wb") as output:
            for chunk in read_range(source, entity.body_start, entity.end):
                output.write(stripping.feed(chunk))
            output.write(stripping.finish())
        variants.append(
            ScannablePart(
                part_id=f"{entity.part_id}~stripped",
                kind=kind,
                content_type=entity.content_type,
                charset=entity.charset,
                filename=f"stripped-{filename}",
                named=False,
                inline=False,
                headers_start=entity.headers_start,
                body_start=entity.body_start,
                end=entity.end,
                path=variant,
                size=variant.stat().st_size,
                in_attached_message=attached,
                signed=entity.signed,
                origin=PartOrigin.VARIANT,
            )
        )
    return ScannablePart(
        part_id=entity.part_id,
        kind=kind,
        content_type=entity.content_type,
        charset=entity.charset,
        filename=filename,
        named=named,
        inline=_inline(entity, parent, kind),
        headers_start=entity.headers_start,
        body_start=entity.body_start,
        end=entity.end,
        path=path,
        size=size,
        in_attached_message=attached,
        signed=entity.signed,
    )


def _whole(source_path: Path, structure: Structure, directory: Path) -> Decomposition:
    """
    An unreliable message: offered whole, and with every payload of the
    other readings (see L{mdgateway.message.readings}).
    """
    path = directory / WHOLE_MESSAGE_NAME
    path.unlink(missing_ok=True)
    try:
        os.link(source_path, path)
    except OSError:
        shutil.copyfile(source_path, path)
    whole = ScannablePart(
        part_id="1",
        kind=PartKind.ATTACHMENT,
        content_type="message/rfc822",
        charset=None,
        filename=WHOLE_MESSAGE_NAME,
        named=False,
        inline=False,
        headers_start=0,
        body_start=0,
        end=structure.size,
        path=path,
        size=structure.size,
        in_attached_message=False,
        signed=structure.signed,
        origin=PartOrigin.WHOLE,
    )
    parts = [whole]
    try:
        readings = read_alternatives(source_path, directory / "readings", set())
    except ReadingError as error:
        return Decomposition((whole,), structure, reading_error=str(error))
    for reading in readings:
        extension = _EXTENSIONS.get(reading.content_type, ".bin")
        parts.append(
            ScannablePart(
                part_id=f"~{reading.reading}.{reading.index}",
                kind=PartKind.ATTACHMENT,
                content_type=reading.content_type,
                charset=None,
                filename=f"reading-{reading.reading}-{reading.index}{extension}",
                named=False,
                inline=False,
                headers_start=0,
                body_start=0,
                end=structure.size,
                path=reading.path,
                size=reading.size,
                in_attached_message=False,
                signed=structure.signed,
                origin=PartOrigin.READING,
            )
        )
    return Decomposition(parts=tuple(parts), structure=structure)


def _spans(entity: Entity) -> list[tuple[str, tuple[int, int] | None]]:
    spans = [("preamble", entity.preamble), ("epilogue", entity.epilogue)]
    if entity.is_leaf and entity.content_type.startswith("message/"):
        if entity.transfer_encoding not in IDENTITY_ENCODINGS:
            # An encoded message (RFC 2046 forbids it, clients decode it,
            # and so do we for its leaf): readers like Python's email take
            # the encoded text itself for the message's body.
            spans.append(("encoded", (entity.body_start, entity.end)))
    if entity.children and not entity.is_multipart:
        if entity.content_type != "message/rfc822":
            # message/global, message/partial, message/news,
            # message/disposition-notification ...: parsed as a message by
            # some readers (Python's email, and so here), kept as one file
            # by others: both are scanned.
            spans.append(("body", (entity.body_start, entity.end)))
    return spans


_HEADER_LIKE = re.compile(rb"From |[!-9;-~]*:|[ \t]|\r\n")


def _check_encoded_message(source: BinaryIO, span: tuple[int, int]) -> None:
    """
    An encoded message's text is read as a message body whole only when
    its first line cannot pass for a header field (or the blank line
    after them); otherwise readers split it, and the message is ambiguous.
    """
    source.seek(span[0])
    first = source.read(min(span[1] - span[0], 1000))
    if first and _HEADER_LIKE.match(first):
        raise _EncodedMessageError(
            "an encoded message part whose text starts like a header field"
        )


def _texts(
    source: BinaryIO, root: Entity, directory: Path, found: list[ScannablePart]
) -> None:
    """
    The preambles and epilogues of the multiparts below C{root} that hold
    more than white space, the bodies of C{message/*} entities other than
    C{message/rfc822} as a whole, and the encoded text of an encoded
    C{message/*} leaf, each written as it is (no transfer encoding applies
    to them). They are appended to C{found}.
    """
    for entity in root.walk():
        for where, span in _spans(entity):
            if span is None:
                continue
            if where == "encoded":
                _check_encoded_message(source, span)
            path = directory / f"{where}-{entity.part_id}"
            blank = True
            with open(path, "wb") as output:
                for chunk in read_range(source, *span):
                    output.write(chunk)
                    blank = blank and not chunk.strip(_WHITESPACE)
            if blank and (where in ("preamble", "epilogue") or span[0] == span[1]):
                # Blank preamble and epilogue text is nothing anyone reads.
                path.unlink()
                continue
            found.append(
                ScannablePart(
                    part_id=f"{entity.part_id}~{where}",
                    kind=PartKind.ATTACHMENT,
                    content_type="text/plain",
                    charset=None,
                    filename=f"{where}-{entity.part_id}.txt",
                    named=False,
                    inline=False,
                    headers_start=span[0],
                    body_start=span[0],
                    end=span[1],
                    path=path,
                    size=span[1] - span[0],
                    in_attached_message=False,
                    signed=entity.signed,
                    origin=PartOrigin.TEXT,
                )
            )


def decompose(
    message: str | PathLike[str],
    directory: str | PathLike[str],
    limits: StructureLimits | None = None,
) -> Decomposition:
    """
    Parse a spooled message and write each scannable part, decoded, to
    C{directory/part-<part id>}.

    Every leaf is written, and the preamble and epilogue of every
    multipart that hold more than white space (as C{preamble-<id>} and
    C{epilogue-<id>}, as they are), and the raw body of every C{message/*}
    part other than C{message/rfc822} (C{body-<id>}). An encoded attached
    message (base64 or quoted-printable, which RFC 2046 forbids and clients
    decode) is offered decoded, as its encoded text (C{encoded-<id>}), and
    taken apart in turn (C{inner-<id>/}, up to L{MAX_ENCODED_NESTING} deep).

    Never raises for bad content.  When the structure is unreliable (see
    L{Defect}), or a base64 part turns out not to be base64, the part files
    are removed and the message is offered whole as C{directory/message.eml}
    (a hard link to the spooled file where possible, else a copy), together
    with every payload other readers extract from it (see
    L{mdgateway.message.readings}).

    @param message: the spooled message file (CRLF lines).
    @param directory: where the part files go; created if missing.
    @raise OSError: if a file cannot be read or written.
    """
    return _decompose(Path(message), Path(directory), limits, 0)


def _encoded_message(entity: Entity) -> bool:
    return (
        entity.is_leaf
        and entity.content_type.startswith("message/")
        and entity.content_type != DELIVERY_STATUS
        and entity.transfer_encoding not in IDENTITY_ENCODINGS
    )


def _inner(
    part: ScannablePart, directory: Path, limits: StructureLimits | None, depth: int
) -> tuple[list[ScannablePart], str | None]:
    """
    The parts of an encoded attached message, decoded (clients decode it
    and show its attachments), each tied to the attached message.
    """
    if depth >= MAX_ENCODED_NESTING:
        raise _EncodedMessageError(
            f"encoded messages nested deeper than {MAX_ENCODED_NESTING}"
        )
    inner = _decompose(
        part.path, directory / f"inner-{part.part_id}", limits, depth + 1
    )
    found = [
        attrs.evolve(
            item,
            part_id=f"{part.part_id}>{item.part_id}",
            origin=PartOrigin.NESTED,
            headers_start=part.headers_start,
            body_start=part.body_start,
            end=part.end,
            in_attached_message=True,
            signed=item.signed or part.signed,
        )
        for item in inner.parts
        # The decoded message is the attached message's own part already,
        # unless it is ambiguous (offered whole with its readings): then it
        # is offered once more under the name that says so.
        if item.origin is not PartOrigin.WHOLE or inner.unreliable
    ]
    return found, inner.reading_error


def _decompose(
    source_path: Path, target: Path, limits: StructureLimits | None, depth: int
) -> Decomposition:
    target.mkdir(parents=True, exist_ok=True)
    reading_error = None
    with open(source_path, "rb") as source:
        structure = parse_structure(source, limits)
        if structure.root is None:
            return _whole(source_path, structure, target)
        parts: list[ScannablePart] = []
        current: Entity | None = None
        try:
            for entity, parent, attached in _scannable(structure.root):
                current = entity
                part = _write_part(source, entity, parent, attached, target, parts)
                parts.append(part)
                if _encoded_message(entity):
                    inner, error = _inner(part, target, limits, depth)
                    parts.extend(inner)
                    reading_error = reading_error or error
            current = None
            _texts(source, structure.root, target, parts)
            parts.sort(key=lambda part: part.headers_start)
        except _ContentError as error:
            # Remove what this call wrote (part files, the folders of encoded
            # attached messages), nothing else of the folder.
            for item in target.iterdir():
                if item.name.startswith(_MADE):
                    if item.is_dir():
                        shutil.rmtree(item, ignore_errors=True)
                    else:
                        item.unlink(missing_ok=True)
            broken = attrs.evolve(
                structure,
                root=None,
                defect=error.defect,
                detail=f"part {current.part_id if current else '?'}: {error}",
            )
            return _whole(source_path, broken, target)
    return Decomposition(
        parts=tuple(parts), structure=structure, reading_error=reading_error
    )
