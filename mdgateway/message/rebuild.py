# -*- test-case-name: tests.test_message_rebuild -*-
"""
Write a new message in which chosen parts are replaced (by a sanitized file
from Core, or by a short notice for stripped content) and every other byte
is copied exactly.

Only the bytes C{[headers_start, end)} of each replaced entity change; the
top-level header block, preamble, epilogue, delimiters and untouched parts
are copied from the original file in chunks.  A replaced entity keeps its
header fields other than the MIME ones it gets anew (so C{Content-ID},
C{Content-Description} and, for a whole message, C{From}/C{Subject} stay).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from os import PathLike
from typing import BinaryIO

import attrs

from mdgateway.message.errors import RebuildError
from mdgateway.message.fields import (
    clean_filename,
    encode_words,
    format_parameter,
)
from mdgateway.message.lines import copy_range
from mdgateway.message.structure import MESSAGE_TYPES, Entity, Structure

#: Header fields a replaced entity loses (and, for the first three, gets anew).
REPLACED_FIELDS = frozenset(
    {
        b"content-type",
        b"content-transfer-encoding",
        b"content-disposition",
        b"content-length",
        b"content-md5",
    }
)
_MIME_TYPE = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+/[!#$%&'*+\-.^_`|~0-9a-z]+")
_CHARSET = re.compile(r"[!#$%&'+\-^_`{}~0-9A-Za-z.]+")
#: 57 input bytes make one 76-column base64 line.
_BASE64_BLOCK = 57 * 1024
_NOTICE_LINE = 76


@attrs.frozen
class NewFile:
    """
    Replace a part with the content of a file (the sanitized file from
    Core), written as base64.

    @ivar path: the new content.
    @ivar content_type: its C{type/subtype}.
    @ivar filename: its name (cleaned like received names); L{None} for
        none, which suits replaced body text.
    @ivar charset: a C{charset} parameter to declare, if any.
    @ivar disposition: C{inline} or C{attachment}; L{None} keeps the
        original's, or when it had none: C{inline} for unnamed body text
        and parts of C{multipart/related}, else C{attachment}.
    """

    path: str | PathLike[str]
    content_type: str
    filename: str | None
    charset: str | None = None
    disposition: str | None = None


@attrs.frozen
class Notice:
    """
    Replace a part with a short text (for content that was removed),
    written as UTF-8 C{text/plain}, 7bit when possible, else
    quoted-printable.

    @ivar filename: if given, the notice is an attachment with this name;
        otherwise it is inline text.
    """

    text: str
    filename: str | None = None


Replacement = NewFile | Notice


def _plan(
    structure: Structure, replacements: Mapping[str, Replacement]
) -> list[tuple[Entity, Entity | None, Replacement]]:
    assert structure.root is not None
    parents: dict[str, tuple[Entity, Entity | None]] = {
        structure.root.part_id: (structure.root, None)
    }
    for entity in structure.root.walk():
        for child in entity.children:
            parents[child.part_id] = (child, entity)
    plan = []
    for part_id, replacement in replacements.items():
        if part_id not in parents:
            raise RebuildError(f"no part {part_id!r} in this message")
        entity, parent = parents[part_id]
        plan.append((entity, parent, replacement))
    plan.sort(key=lambda item: item[0].headers_start)
    for before, after in zip(plan, plan[1:], strict=False):
        if after[0].headers_start < before[0].end:
            raise RebuildError(
                f"parts {before[0].part_id} and {after[0].part_id} overlap; "
                "replace only one of them"
            )
    return plan


def _kept_fields(source: BinaryIO, entity: Entity) -> tuple[bytes, bool]:
    source.seek(entity.headers_start)
    block = source.read(entity.header_end - entity.headers_start)
    kept: list[bytes] = []
    keep = True
    mime_version = False
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] not in (b" ", b"\t"):
            name = line.split(b":", 1)[0].strip().lower()
            keep = name not in REPLACED_FIELDS
            mime_version = mime_version or name == b"mime-version"
        if keep:
            kept.append(line + b"\r\n")
    return b"".join(kept), mime_version


def _field(name: str, value: str, parameters: list[str]) -> bytes:
    text = f"{name}: {value}" + "".join(f";\r\n {item}" for item in parameters)
    return text.encode("ascii") + b"\r\n"


def _name_parameter(filename: str) -> list[str]:
    if all(" " <= char <= "~" for char in filename):
        return format_parameter("name", filename)
    return ['name="' + "\r\n ".join(encode_words(filename)) + '"']


def _disposition(entity: Entity, parent: Entity | None) -> str:
    if entity.disposition in ("inline", "attachment"):
        return entity.disposition
    body = entity.content_type in ("text/plain", "text/html") and not entity.filename
    if body or (parent is not None and parent.content_type == "multipart/related"):
        return "inline"
    return "attachment"


def _file_headers(replacement: NewFile, entity: Entity, parent: Entity | None) -> bytes:
    content_type = replacement.content_type.strip().lower()
    if not _MIME_TYPE.fullmatch(content_type):
        raise RebuildError(
            f"replacement for part {entity.part_id} has content type "
            f"{replacement.content_type!r}"
        )
    if replacement.charset is not None and not _CHARSET.fullmatch(replacement.charset):
        raise RebuildError(
            f"replacement for part {entity.part_id} has charset {replacement.charset!r}"
        )
    disposition = replacement.disposition or _disposition(entity, parent)
    if disposition not in ("inline", "attachment"):
        raise RebuildError(
            f"replacement for part {entity.part_id} has disposition {disposition!r}"
        )
    filename = None
    if replacement.filename is not None:
        filename = clean_filename(replacement.filename) or "attachment.bin"
    type_parameters = []
    if replacement.charset is not None:
        type_parameters += format_parameter("charset", replacement.charset)
    disposition_parameters = []
    if filename is not None:
        type_parameters += _name_parameter(filename)
        disposition_parameters = format_parameter("filename", filename)
    return (
        _field("Content-Type", content_type, type_parameters)
        + _field("Content-Disposition", disposition, disposition_parameters)
        + b"Content-Transfer-Encoding: base64\r\n"
    )


def _notice(replacement: Notice) -> tuple[bytes, bytes]:
    text = replacement.text.replace("\r\n", "\n").replace("\r", "\n")
    data = text.encode("utf-8", "replace")
    lines = data.split(b"\n")
    if data.isascii() and all(len(line) <= _NOTICE_LINE for line in lines):
        encoding = "7bit"
        body = b"\r\n".join(lines)
    else:
        encoding = "quoted-printable"
        body = binascii.b2a_qp(data, istext=True).replace(b"\n", b"\r\n")
    if body.endswith(b"\r\n"):
        body = body[:-2]
    if replacement.filename is None:
        disposition = _field("Content-Disposition", "inline", [])
    else:
        filename = clean_filename(replacement.filename) or "notice.txt"
        disposition = _field(
            "Content-Disposition",
            "attachment",
            format_parameter("filename", filename),
        )
    headers = (
        _field("Content-Type", "text/plain", format_parameter("charset", "utf-8"))
        + disposition
        + f"Content-Transfer-Encoding: {encoding}\r\n".encode("ascii")
    )
    return headers, body


def _read_full(file: BinaryIO, size: int) -> bytes:
    pieces = []
    while size > 0:
        data = file.read(size)
        if not data:
            break
        pieces.append(data)
        size -= len(data)
    return b"".join(pieces)


def _write_base64(path: str | PathLike[str], output: BinaryIO) -> None:
    first = True
    with open(path, "rb") as file:
        while block := _read_full(file, _BASE64_BLOCK):
            encoded = base64.encodebytes(block).replace(b"\n", b"\r\n")
            if not first:
                output.write(b"\r\n")
            output.write(encoded[:-2])
            first = False


def _prepare(
    entity: Entity, parent: Entity | None, replacement: Replacement
) -> tuple[bytes, bytes | None]:
    if isinstance(replacement, NewFile):
        return _file_headers(replacement, entity, parent), None
    return _notice(replacement)


def _write_entity(
    source: BinaryIO,
    output: BinaryIO,
    entity: Entity,
    parent: Entity | None,
    replacement: Replacement,
    prepared: tuple[bytes, bytes | None],
    at_end: bool,
) -> None:
    headers, body = prepared
    kept, mime_version = _kept_fields(source, entity)
    output.write(kept)
    is_message = parent is None or parent.content_type in MESSAGE_TYPES
    if is_message and not mime_version:
        output.write(b"MIME-Version: 1.0\r\n")
    output.write(headers)
    output.write(b"\r\n")
    if isinstance(replacement, NewFile):
        _write_base64(replacement.path, output)
    elif body is not None:
        output.write(body)
    if at_end:
        output.write(b"\r\n")


def rebuild(
    source: BinaryIO,
    structure: Structure,
    replacements: Mapping[str, Replacement],
    output: BinaryIO,
) -> None:
    """
    Write C{source} to C{output} with the parts named in C{replacements}
    (part id to L{NewFile} or L{Notice}) replaced.

    With no replacements the output is identical to the input.  Blocking and
    streamed: meant for a worker thread.

    @param source: the spooled message, seekable.
    @param structure: its reliable structure (from
        L{mdgateway.message.structure.parse_structure} or a
        L{mdgateway.message.decompose.Decomposition}).
    @param output: where the new message is written; the caller flushes,
        syncs and renames it.
    @raise RebuildError: if the structure is unreliable or does not match
        the file's size, a part id is unknown, two replaced parts overlap
        (one inside the other), or a replacement's content type, charset or
        disposition is invalid; nothing has been written then.
    @raise OSError: if a file cannot be read or written.
    """
    if structure.root is None:
        raise RebuildError(
            f"the message structure is unreliable ({structure.detail}); "
            "parts cannot be replaced"
        )
    size = source.seek(0, 2)
    if size != structure.size:
        raise RebuildError(
            f"the file has {size} bytes but the structure describes {structure.size}"
        )
    plan = [
        (entity, parent, replacement, _prepare(entity, parent, replacement))
        for entity, parent, replacement in _plan(structure, replacements)
    ]
    position = 0
    for entity, parent, replacement, prepared in plan:
        copy_range(source, output, position, entity.headers_start)
        _write_entity(
            source,
            output,
            entity,
            parent,
            replacement,
            prepared,
            entity.end >= size,
        )
        position = entity.end
    copy_range(source, output, position, size)


def rebuild_file(
    source: str | PathLike[str],
    structure: Structure,
    replacements: Mapping[str, Replacement],
    output: str | PathLike[str],
) -> None:
    """
    L{rebuild} from one path to another (the output is created or
    truncated, and not synced).
    """
    with open(source, "rb") as source_file, open(output, "wb") as output_file:
        rebuild(source_file, structure, replacements, output_file)
