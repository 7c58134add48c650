# -*- test-case-name: tests.test_core_emulator -*-
"""
The emulator's Deep CDR and Proactive DLP: what they find and the files
they write.

Deep CDR "sanitizes" a document by copying it and ending the copy with
L{SANITIZED_MARKER}; an Office Open XML package is rebuilt without its
macro parts (the marker is then the zip comment, still at the very end).
Proactive DLP finds Luhn-valid card numbers in text, HTML, RTF and PDF
bytes and in the XML parts of Office packages, and when it redacts, masks
them in place (same length, so offsets and sizes stay right).
"""

from __future__ import annotations

import io
import shutil
import zipfile
import zlib
from typing import Any, BinaryIO

import attrs

from mdgateway.emulator.detect import (
    SANITIZED_MARKER,
    CardHit,
    Findings,
    copy_masked,
    find_cards,
)
from mdgateway.emulator.filetype import FileType

#: Office package parts that carry macros (removed by Deep CDR).
_MACRO_PARTS = ("vbaproject.bin", "vbadata.xml", "vbaprojectsignature.bin")
#: An XML part larger than this is not read by DLP.
_MAX_PART = 64 << 20
#: What a damaged Office package raises while it is read.
DAMAGED = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    ValueError,
    RuntimeError,
    NotImplementedError,
)


@attrs.frozen
class CdrOutcome:
    """
    What Deep CDR did to one file.

    @ivar details: the C{sanitization_details} object.
    """

    sanitized: bool
    details: dict[str, Any]

    @property
    def action_ran(self) -> str:
        """
        The C{actions_ran} entry.
        """
        return "Sanitized" if self.sanitized else ""

    @property
    def action_failed(self) -> str:
        """
        The C{actions_failed} entry.
        """
        return "" if self.sanitized else "Sanitization Failed"


@attrs.frozen
class EmulatedDlpHit:
    """
    A card number found by DLP, in C{part} (an Office package part, or
    C{""} for the file's own bytes).
    """

    card: CardHit
    part: str = ""


@attrs.frozen
class DlpOutcome:
    """
    What Proactive DLP found in one file, and whether it redacted it (or
    tried and failed: C{redact_failed}).
    """

    hits: tuple[EmulatedDlpHit, ...]
    redacted: bool = False
    redact_failed: bool = False


def _macro(name: str) -> bool:
    return name.lower().rsplit("/", 1)[-1] in _MACRO_PARTS


def _object(action: str, name: str, count: int) -> dict[str, Any]:
    return {"action": action, "count": count, "object_name": name}


def sanitize(
    source: BinaryIO,
    file_type: FileType,
    findings: Findings,
    zip_names: list[str] | None,
    dest: BinaryIO,
) -> CdrOutcome:
    """
    Write the sanitized copy of C{source} to C{dest}; a failure (the
    failure marker, a damaged Office package) writes nothing useful and
    says why in the details.
    """
    if findings.cdr_fail:
        return CdrOutcome(
            False,
            {"details": "Emulated failure", "failure_category": "failed to sanitize"},
        )
    details: list[dict[str, Any]] = []
    source.seek(0)
    if file_type.ooxml:
        if zip_names is None:
            return CdrOutcome(
                False,
                {
                    "details": "Not a valid Office Open XML package",
                    "failure_category": "invalid file structure",
                },
            )
        try:
            macros = _without_macros(source, dest)
        except DAMAGED as e:
            return CdrOutcome(
                False,
                {"details": str(e)[:200], "failure_category": "invalid file structure"},
            )
        if macros:
            details.append(_object("removed", "macro", macros))
    else:
        shutil.copyfileobj(source, dest)
        dest.write(SANITIZED_MARKER)
        if findings.count("ole:macros"):
            details.append(_object("removed", "macro", findings.count("ole:macros")))
        if file_type.extensions[:1] == ("pdf",):
            if findings.count("pdf:script"):
                details.append(
                    _object("removed", "JavaScript", findings.count("pdf:script"))
                )
            if findings.count("pdf:link"):
                details.append(
                    _object("sanitized", "hyperlink", findings.count("pdf:link"))
                )
    return CdrOutcome(
        True, {"description": "Sanitized successfully.", "details": details}
    )


def _without_macros(source: BinaryIO, dest: BinaryIO) -> int:
    """
    Copy an Office package without its macro parts; return how many macro
    projects were removed.
    """
    macros = 0
    with (
        zipfile.ZipFile(source) as package,
        zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out,
    ):
        for info in package.infolist():
            if _macro(info.filename):
                macros += info.filename.lower().endswith("vbaproject.bin")
                continue
            with package.open(info) as part, out.open(info.filename, "w") as copy:
                shutil.copyfileobj(part, copy)
        out.comment = SANITIZED_MARKER
    return macros


def dlp_scan(
    source: BinaryIO, file_type: FileType, findings: Findings
) -> tuple[EmulatedDlpHit, ...]:
    """
    The card numbers Proactive DLP finds: in the file's bytes, or for an
    Office package in its XML parts.
    """
    if not file_type.ooxml:
        return tuple(EmulatedDlpHit(card) for card in findings.cards)
    hits: list[EmulatedDlpHit] = []
    source.seek(0)
    try:
        with zipfile.ZipFile(source) as package:
            for info in package.infolist():
                if not info.filename.endswith(".xml") or info.file_size > _MAX_PART:
                    continue
                cards: dict[int, CardHit] = {}
                find_cards(package.read(info), 0, True, cards)
                hits.extend(
                    EmulatedDlpHit(cards[k], info.filename) for k in sorted(cards)
                )
    except (*DAMAGED, OSError):
        return tuple(EmulatedDlpHit(card) for card in findings.cards)
    return tuple(hits)


def redact(
    source: BinaryIO,
    file_type: FileType,
    hits: tuple[EmulatedDlpHit, ...],
    dest: BinaryIO,
) -> None:
    """
    Write C{source} to C{dest} with every hit masked in place.

    @raise Exception: one of L{DAMAGED} when an Office package cannot be
        rewritten.
    """
    source.seek(0)
    parts: dict[str, list[CardHit]] = {}
    for hit in hits:
        parts.setdefault(hit.part, []).append(hit.card)
    if not file_type.ooxml or set(parts) == {""}:
        copy_masked(source, dest, tuple(parts.get("", ())))
        return
    with (
        zipfile.ZipFile(source) as package,
        zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out,
    ):
        for info in package.infolist():
            cards = parts.get(info.filename)
            if not cards:
                with package.open(info) as part, out.open(info.filename, "w") as copy:
                    shutil.copyfileobj(part, copy)
                continue
            masked = io.BytesIO()
            copy_masked(io.BytesIO(package.read(info)), masked, tuple(cards))
            out.writestr(info.filename, masked.getvalue())
