# -*- test-case-name: tests.test_core_emulator -*-
"""
What the Core emulator "detects" in a file, and how it writes converted files.

Pure functions over a seekable binary stream, read once in chunks (never
whole in memory): hashes, the EICAR test string, an encrypted zip (bit 0 of
the general-purpose flag of a local file header), Luhn-valid 16-digit card
numbers, and two markers that make the emulator report a failed or a
not-scanned result.
"""

from __future__ import annotations

import hashlib
import re
import struct
from typing import BinaryIO

import attrs

#: The EICAR anti-virus test string (assembled so this source file itself
#: is not flagged by scanners on developer machines).
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
#: A file containing this gets C{scan_all_result_i} 3 (Failed).
FAIL_MARKER = b"MDCORE-EMULATOR-FAIL"
#: A file containing this gets C{scan_all_result_i} 10 (Not Scanned).
NOT_SCANNED_MARKER = b"MDCORE-EMULATOR-NOT-SCANNED"
#: Appended to a "sanitized" file so tests can tell it from the original.
SANITIZED_MARKER = b"\nMDCORE-EMULATOR-SANITIZED\n"

_CHUNK = 1 << 20
_TAIL = 96
_LOCAL_HEADER = b"PK\x03\x04"
_CARD = re.compile(rb"(?<![0-9])(?:[0-9]{4}[ -]?){3}[0-9]{4}(?![0-9])")
_CONTEXT = 12


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
        The number with every digit but the last four replaced by C{X}.
        """
        digits = sum(ch.isdigit() for ch in self.text.decode("ascii"))
        out = bytearray()
        seen = 0
        for byte in self.text:
            if 0x30 <= byte <= 0x39:
                seen += 1
                out.append(byte if seen > digits - 4 else ord("X"))
            else:
                out.append(byte)
        return bytes(out)


@attrs.frozen
class Findings:
    """
    The result of one pass over a file.
    """

    size: int
    md5: str
    sha1: str
    sha256: str
    head: bytes
    infected: bool = False
    encrypted_archive: bool = False
    cards: tuple[CardHit, ...] = ()
    fail: bool = False
    not_scanned: bool = False


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


def _encrypted_entry(window: bytes) -> bool:
    start = window.find(_LOCAL_HEADER)
    while start != -1 and start + 8 <= len(window):
        (flags,) = struct.unpack_from("<H", window, start + 6)
        if flags & 1:
            return True
        start = window.find(_LOCAL_HEADER, start + 1)
    return False


def scan_stream(stream: BinaryIO, chunk_size: int = _CHUNK) -> Findings:
    """
    Read C{stream} from its current position to the end, once.

    Windows overlap by a small tail so a pattern split across two reads is
    still found; card hits are keyed by absolute offset so the overlap does
    not count them twice.
    """
    md5, sha1, sha256 = hashlib.md5(), hashlib.sha1(), hashlib.sha256()
    size = 0
    head = b""
    base = 0
    tail = b""
    is_zip = False
    infected = encrypted = fail = not_scanned = False
    cards: dict[int, CardHit] = {}
    while True:
        chunk = stream.read(chunk_size)
        final = not chunk
        if chunk:
            md5.update(chunk)
            sha1.update(chunk)
            sha256.update(chunk)
            if size == 0:
                head = chunk[:16]
                is_zip = chunk.startswith(_LOCAL_HEADER)
            size += len(chunk)
        window = tail + chunk
        infected = infected or EICAR in window
        fail = fail or FAIL_MARKER in window
        not_scanned = not_scanned or NOT_SCANNED_MARKER in window
        if is_zip and not encrypted:
            encrypted = _encrypted_entry(window)
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
        encrypted_archive=encrypted,
        cards=tuple(cards[k] for k in sorted(cards)),
        fail=fail,
        not_scanned=not_scanned,
    )


def write_converted(
    stream: BinaryIO,
    dest: BinaryIO,
    cards: tuple[CardHit, ...],
    *,
    sanitized: bool,
    chunk_size: int = _CHUNK,
) -> None:
    """
    Copy C{stream} (from the start) to C{dest} with every card number
    masked, plus L{SANITIZED_MARKER} when the file was "sanitized".
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
    if sanitized:
        dest.write(SANITIZED_MARKER)


def describe_type(head: bytes, extension: str, infected: bool) -> tuple[str, str]:
    """
    A rough C{(file_type, file_type_description)} from the first bytes.
    """
    if infected:
        return "text/plain", "EICAR virus test files"
    if head.startswith(b"%PDF"):
        return "application/pdf", "PDF document"
    if head.startswith(_LOCAL_HEADER):
        office = {
            "docx": "application/vnd.openxmlformats-officedocument."
            "wordprocessingml.document",
            "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            "pptx": "application/vnd.openxmlformats-officedocument."
            "presentationml.presentation",
        }
        if extension in office:
            return office[extension], "Microsoft OOXML"
        return "application/zip", "Zip archive data, at least v2.0 to extract"
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        return "application/msword", "Composite Document File V2 Document"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "text/html", "HTML document text"
    if head.startswith(b"{\\rtf"):
        return "text/rtf", "Rich Text Format data"
    if all(b in b"\t\n\r" or 32 <= b < 127 for b in head):
        return "text/plain", "ASCII text"
    return "application/octet-stream", "data"
