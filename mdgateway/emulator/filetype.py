# -*- test-case-name: tests.test_core_emulator -*-
"""
The file type of an upload, recognised from its content as Core's file type
engine does (not from its name), with the few descriptions real Core
results show (C{"ASCII text"}, C{"Zip archive data, at least v2.0 to
extract"}, C{"EICAR virus test files"}).
"""

from __future__ import annotations

import struct
from collections.abc import Collection

import attrs

from mdgateway.emulator.detect import EICAR, Findings

_ZIP = (b"PK\x03\x04", b"PK\x05\x06")
_OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_OOXML = {
    "word/": ("docx", "docm", "wordprocessingml.document", "Word"),
    "xl/": ("xlsx", "xlsm", "spreadsheetml.sheet", "Excel"),
    "ppt/": ("pptx", "pptm", "presentationml.presentation", "PowerPoint"),
}
_MACRO_MIME = {
    "docm": "application/vnd.ms-word.document.macroEnabled.12",
    "xlsm": "application/vnd.ms-excel.sheet.macroEnabled.12",
    "pptm": "application/vnd.ms-powerpoint.presentation.macroEnabled.12",
}


@attrs.frozen
class FileType:
    """
    What a file is.

    @ivar extensions: the extensions this type goes by, the usual one first
        (what Deep CDR's C{converted_to} reports).
    @ivar archive: C{zip}, C{tar}, C{gzip}, C{bz2} or C{xz} for a container
        the emulator extracts; C{None} otherwise.
    @ivar document: a type Proactive DLP reads (text, HTML, RTF, PDF,
        Office).
    @ivar ooxml: an Office Open XML package (a zip that is a document, not
        an archive).
    """

    mime: str
    description: str
    extensions: tuple[str, ...] = ()
    archive: str | None = None
    document: bool = False
    ooxml: bool = False

    def known_as(self, names: Collection[str]) -> bool:
        """
        Whether any of this type's extensions is in C{names}.
        """
        return any(e in names for e in self.extensions)

    def extension_for(self, name_extension: str) -> str:
        """
        The extension a converted copy gets: the file's own when it fits
        the type, else the type's usual one.
        """
        if name_extension in self.extensions or not self.extensions:
            return name_extension
        return self.extensions[0]


def _zip_description(head: bytes) -> str:
    version = 20
    if head.startswith(b"PK\x03\x04") and len(head) >= 6:
        (version,) = struct.unpack_from("<H", head, 4)
    version = max(10, min(version, 63))
    return f"Zip archive data, at least v{version // 10}.{version % 10} to extract"


def _ooxml(names: Collection[str], extension: str) -> FileType | None:
    if "[Content_Types].xml" not in names:
        return None
    for prefix, (plain, macro, subtype, app) in _OOXML.items():
        if any(n.startswith(prefix) for n in names):
            macros = any(n.lower().endswith("vbaproject.bin") for n in names)
            if macros:
                return FileType(
                    _MACRO_MIME[macro],
                    f"Microsoft {app} 2007+ (macro-enabled)",
                    (macro,),
                    document=True,
                    ooxml=True,
                )
            return FileType(
                f"application/vnd.openxmlformats-officedocument.{subtype}",
                f"Microsoft {app} 2007+",
                (plain,),
                document=True,
                ooxml=True,
            )
    return None


def _ole(findings: Findings) -> FileType:
    if findings.count("ole:excel"):
        return FileType(
            "application/vnd.ms-excel",
            "Composite Document File V2 Document, Microsoft Excel",
            ("xls",),
            document=True,
        )
    if findings.count("ole:powerpoint"):
        return FileType(
            "application/vnd.ms-powerpoint",
            "Composite Document File V2 Document, Microsoft PowerPoint",
            ("ppt",),
            document=True,
        )
    return FileType(
        "application/msword",
        "Composite Document File V2 Document, Microsoft Word",
        ("doc",),
        document=True,
    )


def _text(head: bytes) -> FileType | None:
    probe = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if probe.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return FileType(
            "text/html", "HTML document text", ("html", "htm"), document=True
        )
    if probe.startswith(b"{\\rtf"):
        return FileType("text/rtf", "Rich Text Format data", ("rtf",), document=True)
    if all(b in b"\t\n\r\x0c" or 32 <= b < 127 for b in head):
        return FileType("text/plain", "ASCII text", ("txt",), document=True)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at the end
            return None
    if not any(b < 9 for b in head):
        return FileType("text/plain", "UTF-8 Unicode text", ("txt",), document=True)
    return None


def sniff(
    findings: Findings,
    extension: str,
    zip_names: Collection[str] | None = None,
) -> FileType:
    """
    The type of a file from its first bytes (C{findings.head}), the byte
    patterns found in it and, for a zip that opened, its entry names.

    @param extension: the name's extension (lower case), used only to tell
        a damaged Office document from a damaged zip.
    @param zip_names: the entry names of a zip that opened, else C{None}.
    """
    head = findings.head
    if head.startswith(EICAR):
        return FileType("text/plain", "EICAR virus test files", ("com", "txt"))
    if head.startswith(b"%PDF"):
        return FileType("application/pdf", "PDF document", ("pdf",), document=True)
    if head.startswith(_ZIP):
        if zip_names is not None:
            office = _ooxml(zip_names, extension)
            if office is not None:
                return office
        elif extension in ("docx", "docm", "xlsx", "xlsm", "pptx", "pptm"):
            # A damaged Office document: still a document, so Deep CDR
            # tries it (and fails on its structure).
            return FileType(
                "application/octet-stream",
                "Microsoft OOXML",
                (extension,),
                document=True,
                ooxml=True,
            )
        return FileType(
            "application/zip", _zip_description(head), ("zip",), archive="zip"
        )
    if head.startswith(b"\x1f\x8b"):
        return FileType(
            "application/gzip", "gzip compressed data", ("gz",), archive="gzip"
        )
    if head.startswith(b"BZh"):
        return FileType(
            "application/x-bzip2", "bzip2 compressed data", ("bz2",), archive="bz2"
        )
    if head.startswith(b"\xfd7zXZ\x00"):
        return FileType("application/x-xz", "XZ compressed data", ("xz",), archive="xz")
    if head[257:262] == b"ustar":
        return FileType(
            "application/x-tar", "POSIX tar archive", ("tar",), archive="tar"
        )
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return FileType("application/x-7z-compressed", "7-zip archive data", ("7z",))
    if head.startswith(b"Rar!\x1a\x07"):
        return FileType("application/x-rar", "RAR archive data", ("rar",))
    if head.startswith(_OLE):
        return _ole(findings)
    text = _text(head)
    if text is not None:
        return text
    return FileType("application/octet-stream", "data")
