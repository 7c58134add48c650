# -*- test-case-name: tests.test_core_emulator -*-
"""
What the Core emulator "detects" in the bytes of one file.

One pass over a seekable binary stream, read in chunks (never whole in
memory): hashes, the first bytes (for the file type), the EICAR test string,
Luhn-valid 16-digit card numbers, a few byte patterns that describe the
content (the stream names of an OLE compound document, macros, PDF links)
and the markers that make the emulator report a failed or not-scanned
result or a failed sanitization.
"""

from __future__ import annotations

import hashlib
import re
from typing import BinaryIO

import attrs

#: The EICAR anti-virus test string (assembled so this source file itself
#: is not flagged by scanners on developer machines).
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
#: A file containing this gets C{scan_all_result_i} 3 (Failed).
FAIL_MARKER = b"MDCORE-EMULATOR-FAIL"
#: A file containing this gets C{scan_all_result_i} 10 (Not Scanned).
NOT_SCANNED_MARKER = b"MDCORE-EMULATOR-NOT-SCANNED"
#: A file containing this fails Deep CDR ("Sanitization Failed").
CDR_FAIL_MARKER = b"MDCORE-EMULATOR-CDR-FAIL"
#: Ends a "sanitized" file so tests can tell it from the original.
SANITIZED_MARKER = b"\nMDCORE-EMULATOR-SANITIZED\n"

#: Byte patterns whose offsets are collected (UTF-16LE stream names of OLE
#: compound documents, PDF link and script actions).
PATTERNS: dict[str, bytes] = {
    "ole:word": "WordDocument".encode("utf-16-le"),
    "ole:excel": "Workbook".encode("utf-16-le"),
    "ole:powerpoint": "PowerPoint Document".encode("utf-16-le"),
    "ole:macros": "_VBA_PROJECT".encode("utf-16-le"),
    "pdf:link": b"/URI",
    "pdf:script": b"/JavaScript",
}

_CHUNK = 1 << 20
_TAIL = 96
_HEAD = 512
_CARD = re.compile(rb"(?<![0-9])(?:[0-9]{4}[ -]?){3}[0-9]{4}(?![0-9])")
_CONTEXT = 12


def mask_card(text: str) -> str:
    """
    A card number as Core shows a hit: every character but the last four
    digits replaced by C{X}, separators too (C{"XXXXXXXXXXXXXXX1111"} for
    C{"4111 1111 1111 1111"}), so the length is kept.
    """
    keep = 0
    out = []
    for char in reversed(text):
        if char.isdigit() and keep < 4:
            keep += 1
            out.append(char)
        else:
            out.append("X")
    return "".join(reversed(out))


@attrs.frozen
class CardHit:
    """
    A card number found at absolute byte C{offset}.

    @ivar text: the bytes as found (digits and separators).
    """

    offset: int
    text: bytes
    before: str = ""
    after: str = ""

    @property
    def masked(self) -> bytes:
        """
        The number as L{mask_card} shows it, as bytes of the same length.
        """
        return mask_card(self.text.decode("ascii")).encode("ascii")


@attrs.frozen
class Findings:
    """
    The result of one pass over a file.

    @ivar head: the first 512 bytes.
    @ivar patterns: for each L{PATTERNS} name found, how often.
    """

    size: int
    md5: str
    sha1: str
    sha256: str
    head: bytes
    infected: bool = False
    cards: tuple[CardHit, ...] = ()
    fail: bool = False
    not_scanned: bool = False
    cdr_fail: bool = False
    patterns: tuple[tuple[str, int], ...] = ()

    def count(self, pattern: str) -> int:
        """
        How often the L{PATTERNS} entry C{pattern} occurs.
        """
        return dict(self.patterns).get(pattern, 0)


def luhn_valid(digits: str) -> bool:
    """
    The Luhn (mod 10) check used by payment card numbers.
    """
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def find_cards(
    window: bytes, base: int, final: bool, cards: dict[int, CardHit]
) -> None:
    """
    Add the Luhn-valid card numbers of C{window} (which starts at absolute
    offset C{base}) to C{cards}, keyed by offset; a match touching the end
    of a non-final window is left for the next one.
    """
    for match in _CARD.finditer(window):
        if match.end() == len(window) and not final:
            continue  # more digits may follow in the next read
        offset = base + match.start()
        text = match.group()
        digits = re.sub(rb"[^0-9]", b"", text).decode("ascii")
        if offset in cards or not luhn_valid(digits):
            continue
        cards[offset] = CardHit(
            offset=offset,
            text=text,
            before=window[max(0, match.start() - _CONTEXT) : match.start()].decode(
                "latin-1"
            ),
            after=window[match.end() : match.end() + _CONTEXT].decode("latin-1"),
        )


def scan_stream(stream: BinaryIO, chunk_size: int = _CHUNK) -> Findings:
    """
    Read C{stream} from its current position to the end, once.

    Windows overlap by a small tail so a pattern split across two reads is
    still found; card hits and pattern offsets are keyed by absolute offset
    so the overlap does not count them twice.
    """
    md5, sha1, sha256 = hashlib.md5(), hashlib.sha1(), hashlib.sha256()
    size = 0
    head = b""
    base = 0
    tail = b""
    infected = fail = not_scanned = cdr_fail = False
    cards: dict[int, CardHit] = {}
    found: dict[str, set[int]] = {}
    while True:
        chunk = stream.read(chunk_size)
        final = not chunk
        if chunk:
            md5.update(chunk)
            sha1.update(chunk)
            sha256.update(chunk)
            if len(head) < _HEAD:
                head += chunk[: _HEAD - len(head)]
            size += len(chunk)
        window = tail + chunk
        infected = infected or EICAR in window
        fail = fail or FAIL_MARKER in window
        not_scanned = not_scanned or NOT_SCANNED_MARKER in window
        cdr_fail = cdr_fail or CDR_FAIL_MARKER in window
        for name, pattern in PATTERNS.items():
            start = window.find(pattern)
            while start != -1:
                found.setdefault(name, set()).add(base + start)
                start = window.find(pattern, start + 1)
        find_cards(window, base, final, cards)
        if final:
            break
        tail = window[-_TAIL:]
        base += len(window) - len(tail)
    return Findings(
        size=size,
        md5=md5.hexdigest(),
        sha1=sha1.hexdigest(),
        sha256=sha256.hexdigest(),
        head=head,
        infected=infected,
        cards=tuple(cards[k] for k in sorted(cards)),
        fail=fail,
        not_scanned=not_scanned,
        cdr_fail=cdr_fail,
        patterns=tuple(sorted((k, len(v)) for k, v in found.items())),
    )


def copy_masked(
    stream: BinaryIO,
    dest: BinaryIO,
    cards: tuple[CardHit, ...],
    *,
    chunk_size: int = _CHUNK,
) -> None:
    """
    Copy C{stream} (from the start) to C{dest} with every card number in
    C{cards} masked in place.
    """
    stream.seek(0)
    offset = 0
    while chunk := stream.read(chunk_size):
        end = offset + len(chunk)
        buf = bytearray(chunk)
        for card in cards:
            card_end = card.offset + len(card.text)
            if card_end <= offset or card.offset >= end:
                continue
            masked = card.masked
            lo = max(card.offset, offset)
            hi = min(card_end, end)
            buf[lo - offset : hi - offset] = masked[lo - card.offset : hi - card.offset]
        dest.write(buf)
        offset = end
