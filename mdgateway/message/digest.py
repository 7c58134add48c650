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
    SMTP edge), keeping only its top-level header block (up to
    L{HEADER_LIMIT}) and a running hash of the body.

    @ivar header_block: the top-level header block without its blank line,
        once it is complete and within the limit; L{None} before that.
    """

    def __init__(self, limit: int = HEADER_LIMIT) -> None:
        self._limit = limit
        # A CRLF in front, so a message that starts with its blank line
        # (no header fields) is found by the same search.
        self._head = bytearray(b"\r\n")
        self._body = hashlib.sha256()
        self._in_body = False
        self._too_large = False
        self.header_block: bytes | None = None

    def feed(self, data: bytes) -> None:
        if self._in_body:
            self._body.update(data)
            return
        if self._too_large:
            return
        start = max(0, len(self._head) - 3)
        self._head += data
        end = self._head.find(b"\r\n\r\n", start)
        if end >= 0 and end > self._limit:
            self._too_large = True
            self._head = bytearray()
        elif end >= 0:
            self.header_block = bytes(self._head[2 : end + 2])
            self._body.update(self._head[end + 4 :])
            self._head = bytearray()
            self._in_body = True
        elif len(self._head) - 2 > self._limit:
            self._too_large = True
            self._head = bytearray()

    def header(self) -> bytes:
        """
        The top-level header block fed so far (all of it for a message
        without a blank line), at most the limit; empty when larger.
        """
        if self.header_block is not None:
            return self.header_block
        return bytes(self._head[2:])

    def digest(self) -> bytes | None:
        """
        The digest of what was fed; L{None} when the header block is larger
        than the limit.  A message without a blank line is all header block
        and an empty body.
        """
        if self._too_large:
            return None
        block = self.header_block
        if block is None:
            block = self.header()
            body = hashlib.sha256().digest()
        else:
            body = self._body.digest()
        fields = canonical_fields(block)
        return hashlib.sha256(_DOMAIN + b"%d:" % len(fields) + fields + body).digest()


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
