"""
Small real files for the Core emulator's tests: Office packages, PDF,
archives of every kind the emulator extracts, and a zip encrypted with a
password (ZipCrypto, written here because the standard library only
reads it).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Mapping

from mdgateway.emulator.detect import EICAR

CARD = b"4111 1111 1111 1111"

_CONTENT_TYPES = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>'
)


def docx(text: bytes = b"Hello", *, macros: bool = False) -> bytes:
    """
    A minimal Word package (C{.docm} with a macro part when C{macros}).
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as package:
        package.writestr("[Content_Types].xml", _CONTENT_TYPES)
        package.writestr(
            "word/document.xml",
            b"<w:document><w:body><w:t>" + text + b"</w:t></w:body></w:document>",
        )
        if macros:
            package.writestr("word/vbaProject.bin", b"\xd0\xcf\x11\xe0 macro " * 8)
    return buffer.getvalue()


def xlsx() -> bytes:
    """
    A minimal Excel package.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as package:
        package.writestr("[Content_Types].xml", _CONTENT_TYPES)
        package.writestr("xl/workbook.xml", b"<workbook/>")
    return buffer.getvalue()


def pdf(body: bytes = b"BT (Hello) Tj ET") -> bytes:
    """
    A small PDF (the emulator recognises it by its header).
    """
    return (
        b"%PDF-1.4\n1 0 obj << /Length 20 >> stream\n" + body + b"\nendstream\n%%EOF\n"
    )


def zip_of(
    entries: Mapping[str, bytes], compression: int = zipfile.ZIP_DEFLATED
) -> bytes:
    """
    A zip of C{entries} (deflated unless told otherwise).
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_of(entries: Mapping[str, bytes], mode: str = "w") -> bytes:
    """
    A tar of C{entries}; C{mode} C{"w:gz"} (or C{:bz2}, C{:xz}) compresses
    it.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data)


def bzipped(data: bytes) -> bytes:
    return bz2.compress(data)


def xzipped(data: bytes) -> bytes:
    return lzma.compress(data)


def nested_zip(data: bytes, depth: int, name: str = "eicar.com") -> bytes:
    """
    C{data} as C{name} inside C{depth} zips, one in the other.
    """
    inner = zip_of({name: data})
    for level in range(1, depth):
        inner = zip_of({f"level{level}.zip": inner})
    return inner


_CRC_TABLE = [
    (lambda c: [c := (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1 for _ in range(8)][-1])(
        n
    )
    for n in range(256)
]


class _ZipCrypto:
    """
    The traditional PKWARE stream cipher (the public algorithm of APPNOTE
    6.1), for writing test archives only.
    """

    def __init__(self, password: bytes) -> None:
        self.keys = [0x12345678, 0x23456789, 0x34567890]
        for byte in password:
            self._update(byte)

    def _crc(self, crc: int, byte: int) -> int:
        return (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]

    def _update(self, byte: int) -> None:
        k = self.keys
        k[0] = self._crc(k[0], byte)
        k[1] = ((k[1] + (k[0] & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        k[2] = self._crc(k[2], k[1] >> 24)

    def encrypt(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            temp = (self.keys[2] | 2) & 0xFFFF
            out.append(byte ^ (((temp * (temp ^ 1)) >> 8) & 0xFF))
            self._update(byte)
        return bytes(out)


def encrypted_zip(entries: Mapping[str, bytes], password: bytes) -> bytes:
    """
    A valid zip whose entries are stored and encrypted with C{password}
    (ZipCrypto): the standard library opens it with that password only.
    """
    local = bytearray()
    central = bytearray()
    for name, data in entries.items():
        raw_name = name.encode("utf-8")
        crc = zlib.crc32(data)
        cipher = _ZipCrypto(password)
        header = bytes(range(1, 12)) + bytes([crc >> 24])
        payload = cipher.encrypt(header + data)
        offset = len(local)
        local += struct.pack(
            "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 1, 0, 0, 0, crc, len(payload),
            len(data), len(raw_name), 0,
        )  # fmt: skip
        local += raw_name + payload
        central += struct.pack(
            "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 1, 0, 0, 0, crc,
            len(payload), len(data), len(raw_name), 0, 0, 0, 0, 0, offset,
        )  # fmt: skip
        central += raw_name
    end = struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
        len(central), len(local), 0,
    )  # fmt: skip
    return bytes(local + central + end)


__all__ = [
    "CARD",
    "EICAR",
    "docx",
    "encrypted_zip",
    "nested_zip",
    "pdf",
    "tar_of",
    "zip_of",
]
