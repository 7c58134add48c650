# -*- test-case-name: tests.test_console_units -*-
"""
A message opened for an operator's eyes (a quarantined original, a queued
message): its header block as it was sent and its MIME parts, each with a
text preview when it is text.

Nothing here interprets the content beyond decoding it to characters: the
console shows headers and text parts as escaped text, never as HTML, and
offers the whole message only as a download. Reading is bounded (header
block, each preview, all previews together), and blocking: run it in a
thread pool.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import quopri
from typing import BinaryIO

import attrs

from mdgateway.message.headers import read_header_block
from mdgateway.message.structure import Entity, parse_structure

#: Most bytes of the header block shown.
HEADER_LIMIT = 64 * 1024
#: Most encoded bytes of one text part read for its preview.
PREVIEW_LIMIT = 32 * 1024
#: Most parts listed.
MAX_PARTS = 500
#: Most encoded bytes read for all previews of one message together.
PREVIEW_BUDGET = 256 * 1024


@attrs.frozen
class MessagePart:
    """
    One MIME entity of the message.

    @ivar size: encoded bytes of its body.
    @ivar preview: the start of its decoded text, for a text leaf that is
        not signed data; C{None} otherwise.
    @ivar truncated: the preview stops before the part does.
    """

    part_id: str
    depth: int
    content_type: str
    filename: str | None
    disposition: str | None
    charset: str | None
    transfer_encoding: str
    size: int
    preview: str | None = None
    truncated: bool = False


@attrs.frozen
class MessageView:
    """
    What an operator is shown of a message.

    @ivar headers: the top-level header block, decoded leniently (bytes
        that are not UTF-8 appear as replacement characters).
    @ivar unreliable: why the MIME structure cannot be trusted (then no
        parts are listed), if it cannot.
    """

    size: int
    headers: str
    headers_complete: bool
    parts: tuple[MessagePart, ...]
    unreliable: str | None = None


def _decode_body(data: bytes, encoding: str, charset: str | None) -> str:
    if encoding == "base64":
        compact = b"".join(data.split())
        compact = compact[: len(compact) // 4 * 4]
        try:
            data = base64.b64decode(compact, validate=False)
        except (binascii.Error, ValueError):
            data = b""
    elif encoding == "quoted-printable":
        data = quopri.decodestring(data)
    name = charset or "utf-8"
    try:
        codecs.lookup(name)
    except LookupError:
        name = "utf-8"
    return data.decode(name, errors="replace")


def _part(file: BinaryIO, entity: Entity, budget: int) -> MessagePart:
    size = max(0, entity.end - entity.body_start)
    preview = None
    truncated = False
    if (
        entity.is_leaf
        and entity.content_type.startswith("text/")
        and not entity.signed
        and budget > 0
    ):
        limit = min(PREVIEW_LIMIT, budget)
        file.seek(entity.body_start)
        data = file.read(min(size, limit))
        truncated = size > limit
        preview = _decode_body(data, entity.transfer_encoding, entity.charset)
    return MessagePart(
        part_id=entity.part_id,
        depth=entity.depth,
        content_type=entity.content_type,
        filename=entity.filename,
        disposition=entity.disposition,
        charset=entity.charset,
        transfer_encoding=entity.transfer_encoding,
        size=size,
        preview=preview,
        truncated=truncated,
    )


def inspect_message(path: str, preview_budget: int = PREVIEW_BUDGET) -> MessageView:
    """
    Read the message at C{path} (blocking).

    @param preview_budget: encoded bytes read for all text previews
        together; the parts after it has run out get none.
    """
    with open(path, "rb") as file:
        block, complete = read_header_block(file, HEADER_LIMIT)
        headers = block.decode("utf-8", errors="replace")
        structure = parse_structure(file)
        if structure.unreliable:
            return MessageView(
                size=structure.size,
                headers=headers,
                headers_complete=complete,
                parts=(),
                unreliable=structure.detail or str(structure.defect),
            )
        parts: list[MessagePart] = []
        budget = preview_budget
        for entity in structure.walk():
            if len(parts) >= MAX_PARTS:
                break
            part = _part(file, entity, budget)
            if part.preview is not None:
                budget -= min(part.size, PREVIEW_LIMIT)
            parts.append(part)
        return MessageView(
            size=structure.size,
            headers=headers,
            headers_complete=complete,
            parts=tuple(parts),
        )
