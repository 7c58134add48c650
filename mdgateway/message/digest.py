# -*- test-case-name: tests.test_loop -*-
"""
The content digest a processed marker is bound to: everything that decides
what a mail client extracts from a message, and nothing a hop on the way
legitimately changes.

It covers:

  - the body (everything after the top-level header block), byte for
    byte: every part's own header fields (C{Content-Type},
    C{Content-Transfer-Encoding}, C{Content-Disposition}, the boundaries)
    lie inside it, so they are bound exactly;
  - the top-level MIME fields (C{Content-Type},
    C{Content-Transfer-Encoding}, C{Content-Disposition}, C{MIME-Version}),
    in order, every occurrence, canonicalised: unfolded, runs of spaces
    and tabs outside quoted strings made one space, leading and trailing
    space dropped; so a hop that folds these lines anew keeps the digest,
    and any change a parser could read differently (a parameter, a
    quoted string, the case of a boundary, a field added or taken away)
    changes it;
  - any line of the header block that is not a field at all (readers
    disagree on where such a block ends).

Every other top-level field (C{Received}, C{ARC-*}, C{DKIM-Signature},
C{Authentication-Results}, Exchange's C{X-MS-*}, our own stamps) stays out:
hops add and rewrite those.

The digest is computed as the message streams in at the SMTP edge
(L{ContentHasher}) and again from a spooled file (L{content_digest}); both
give the same value for the same message.
"""

from __future__ import annotations

import hashlib
import re

#: The top-level fields the digest covers.
MIME_FIELDS = frozenset(
    {
        b"content-type",
        b"content-transfer-encoding",
        b"content-disposition",
        b"mime-version",
    }
)
#: The largest top-level header block a digest is made for; a message with
#: a larger one has no digest, so no marker on it is valid.
HEADER_LIMIT = 256 * 1024
#: The processed marker's field name, lowercased (see
#: L{mdgateway.message.marker.MARKER_HEADER}); kept by L{ContentHasher}.
MARKER_FIELD = b"x-md-email-security-id"

_DOMAIN = b"mdgateway-content-v2\x00"
_FIELD_START = re.compile(rb"([!-9;-~]+)[ \t]*:")
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"?|[ \t]+|[^" \t]+', re.DOTALL)


def _collapse(value: bytes) -> bytes:
    """
    A field value with each run of spaces and tabs outside quoted strings
    made one space, and none at either end.
    """
    out = [
        b" " if token[:1] in (b" ", b"\t") else token
        for token in _TOKENS.findall(value)
    ]
    return b"".join(out).strip(b" \t")


def canonical_fields(block: bytes) -> bytes:
    """
    The canonical form of the top-level MIME fields (and of lines that are
    not fields) of a header block, each item length-prefixed so that no two
    different lists give the same bytes.

    @param block: the header block, CRLF lines, without its blank line.
    """
    fields: list[list[bytes | None]] = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            last[1] = (last[1] or b"") + line
            continue
        match = _FIELD_START.match(line)
        if match is None:
            fields.append([None, line])
        else:
            fields.append([match.group(1).lower(), line[match.end() :]])
    items: list[bytes] = []
    for name, value in fields:
        assert value is not None
        if name is None:
            items.append(b"?" + value)
        elif name in MIME_FIELDS:
            items.append(name + b":" + _collapse(value))
    return b"".join(b"%d:%s" % (len(item), item) for item in items)


class ContentHasher:
    """
    The content digest of a message fed in pieces as it streams (at the
    SMTP edge), with a running hash of the body and, of the top-level
    header block (up to L{HEADER_LIMIT}), only what the digest and the loop
    check need: the MIME fields, the marker fields and lines that are not
    fields. A session's memory so stays small whatever the sender's other
    header fields weigh.
    """

    def __init__(self, limit: int = HEADER_LIMIT, keep: bytes = MARKER_FIELD) -> None:
        self._limit = limit
        self._keep = MIME_FIELDS | {keep.lower()}
        self._partial = bytearray()
        self._kept: list[bytes] = []
        self._keeping = True
        self._size = 0
        self._body = hashlib.sha256()
        self._in_body = False
        self._too_large = False
        self._complete = False

    def feed(self, data: bytes) -> None:
        if self._in_body:
            self._body.update(data)
            return
        if self._too_large:
            return
        self._partial += data
        pos = 0
        while True:
            end = self._partial.find(b"\r\n", pos)
            if end < 0:
                break
            line = bytes(self._partial[pos : end + 2])
            pos = end + 2
            if line == b"\r\n":
                self._complete = self._in_body = True
                self._body.update(self._partial[pos:])
                self._partial = bytearray()
                return
            self._size += len(line)
            if self._size > self._limit:
                self._overflow()
                return
            self._line(line)
        del self._partial[:pos]
        if self._size + len(self._partial) > self._limit:
            self._overflow()

    def _overflow(self) -> None:
        self._too_large = True
        self._partial = bytearray()
        self._kept = []

    def _line(self, line: bytes) -> None:
        if line[:1] in (b" ", b"\t"):
            if self._keeping:
                self._kept.append(line)
            return
        match = _FIELD_START.match(line)
        self._keeping = match is None or match.group(1).lower() in self._keep
        if self._keeping:
            self._kept.append(line)

    def header(self) -> bytes:
        """
        The MIME fields, marker fields and lines that are not fields of the
        top-level header block fed so far, in order (all of the block there
        is for a message without a blank line); empty when the block is
        larger than the limit.
        """
        if self._too_large:
            return b""
        kept = b"".join(self._kept)
        if self._complete or not self._partial:
            return kept
        # A last line without its CRLF (a message that ends in its header
        # block): kept as a line of its own.
        line = bytes(self._partial) + b"\r\n"
        match = _FIELD_START.match(line)
        if line[:1] in (b" ", b"\t"):
            return kept + line if self._keeping else kept
        if match is None or match.group(1).lower() in self._keep:
            return kept + line
        return kept

    def digest(self) -> bytes | None:
        """
        The digest of what was fed; L{None} when the header block is larger
        than the limit.  A message without a blank line is all header block
        and an empty body.
        """
        if self._too_large:
            return None
        fields = canonical_fields(self.header())
        return hashlib.sha256(
            _DOMAIN + b"%d:" % len(fields) + fields + self._body.digest()
        ).digest()


def content_digest(
    path: str, *, limit: int = HEADER_LIMIT, chunk: int = 1 << 20
) -> bytes | None:
    """
    L{ContentHasher} over a whole file (blocking: run it in a worker
    thread).
    """
    hasher = ContentHasher(limit)
    with open(path, "rb") as f:
        while data := f.read(chunk):
            hasher.feed(data)
    return hasher.digest()
