# -*- test-case-name: tests.test_testing -*-
"""
A verified fake of L{IScanner} (the Core profile runtime,
L{mdgateway.scan.runtime.CoreRuntime}) for tests of message processing: it
decides verdicts by content and name, as a Core server with AV and Deep CDR
would, and records every call.

It has the runtime's signatures and failure modes (L{CoreError} with a
L{Condition}, C{ValueError} for a verdict from another profile);
C{tests.test_testing} checks both against the interface.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
from zope.interface import implementer

from mdgateway.emulator.detect import EICAR
from mdgateway.scan.errors import Condition, CoreError
from mdgateway.scan.interfaces import IScanner
from mdgateway.scan.verdict import Verdict, parse_verdict

#: The base URL verdicts of the fake come from (no API key, like the
#: runtime's L{Verdict.core_url}).
CORE_URL = "http://core.test:8008"
#: The Core workflow the fake reports.
CORE_RULE = "Email Security"

#: C{scan_all_result_i} and text of the fake's failure verdicts, as Core
#: reports them for the conditions that are results rather than transport
#: failures.
_FAILURE_CODES = {
    Condition.PROCESSING_FAILED: (3, "Failed"),
    Condition.NOT_SCANNED: (10, "Not Scanned"),
    Condition.SCAN_TIMEOUT: (31, "Global Timeout Exceeded"),
}


@attrs.frozen
class ScanCall:
    """
    One C{scan} the fake received, with the bytes the file held then (the
    caller may remove it afterwards).
    """

    path: str
    filename: str
    content: bytes


@attrs.frozen
class DownloadCall:
    """
    One C{download_sanitized} the fake received.
    """

    verdict: Verdict
    dest_path: str


def converted_content(original: bytes) -> bytes:
    """
    What the fake's "Deep CDR" makes of a file: binary, different from the
    original, and derived from it so each part's output is distinct.
    """
    return (
        b"PK\x03\x04 sanitized by the fake Core\r\n\x00\xff\x80"
        + hashlib.sha256(original).digest()
        + bytes(range(256))
    )


def _engine(result: int, threat: str = "") -> dict[str, Any]:
    return {
        "def_time": "2025-11-01T10:00:00.000Z",
        "eng_id": "engine_1_linux",
        "location": "local",
        "scan_result_i": result,
        "scan_time": 3,
        "threat_found": threat,
        "wait_time": 1,
    }


def result_document(
    data_id: str,
    filename: str,
    content: bytes,
    *,
    blocked_reason: str | None = None,
    converted_name: str | None = None,
    failure: Condition | None = None,
) -> dict[str, Any]:
    """
    A complete Core v4 result document (C{GET /file/{data_id}}) for a file.

    @param blocked_reason: the file is infected (C{Blocked}) for this reason.
    @param converted_name: Deep CDR ran and left a converted file so named.
    @param failure: the result stands for this condition (see
        L{mdgateway.scan.verdict.failure_condition}).
    """
    all_result, all_text = 0, "No Threat Detected"
    result, reason = "Allowed", ""
    engines = {"ClamAV": _engine(0), "Bitdefender": _engine(0)}
    if blocked_reason is not None:
        all_result, all_text = 1, "Infected"
        result, reason = "Blocked", blocked_reason
        engines = {
            "ClamAV": _engine(1, "Eicar-Test-Signature"),
            "Bitdefender": _engine(1, "EICAR-Test-File (not a virus)"),
        }
    elif failure is not None:
        all_result, all_text = _FAILURE_CODES[failure]
        result, reason = "Blocked", all_text
    return {
        "data_id": data_id,
        "file_info": {
            "display_name": quote(filename),
            "file_size": len(content),
            "file_type": "application/octet-stream",
            "file_type_description": "Binary data",
            "md5": hashlib.md5(content).hexdigest(),
            "sha1": hashlib.sha1(content).hexdigest(),
            "sha256": hashlib.sha256(content).hexdigest().upper(),
            "upload_timestamp": "2025-11-04T09:12:45.000Z",
        },
        "process_info": {
            "blocked_reason": reason,
            "file_type_skipped_scan": False,
            "outdated_data": [],
            "post_processing": {
                "actions_failed": "",
                "actions_ran": "Sanitized" if converted_name else "",
                "converted_destination": converted_name or "",
                "converted_to": converted_name.rsplit(".", 1)[-1]
                if converted_name
                else "",
                "copy_move_destination": "",
            },
            "processing_time": 40,
            "profile": CORE_RULE,
            "progress_percentage": 100,
            "queue_time": 2,
            "result": result,
            "user_agent": "mdemailsecurity",
            "username": "LOCAL/admin",
            "verdicts": [reason] if reason else [],
        },
        "scan_results": {
            "data_id": data_id,
            "progress_percentage": 100,
            "scan_all_result_a": all_text,
            "scan_all_result_i": all_result,
            "scan_details": engines,
            "start_time": "2025-11-04T09:12:45.000Z",
            "total_avs": 2,
            "total_time": 40,
        },
    }


@implementer(IScanner)
class FakeScanner:
    """
    Scans files like a Core server with AV and Deep CDR, by content:

      - a file named in C{errors} fails with that L{Condition} (conditions
        that are Core results carry their failure verdict, like the client);
      - a file holding the EICAR string, or named in C{blocked_names}, is
        C{Blocked} with reason C{blocked_reason};
      - a file whose name ends with one of C{sanitize_suffixes}
        (case-insensitively) is C{Allowed} and sanitized, with a converted
        file (C{convert} of the original, by default
        L{converted_content}) that C{download_sanitized} writes;
      - everything else is C{Allowed}.

    Calls are recorded in L{scans}, L{downloads} and L{written}. File
    contents are read on the calling thread: test files are small.

    @ivar written: each downloaded file's path and the bytes written there.
    """

    def __init__(
        self,
        *,
        core_url: str = CORE_URL,
        sanitize_suffixes: Iterable[str] = (".docx",),
        blocked_names: Iterable[str] = (),
        blocked_reason: str = "Infected",
        errors: Mapping[str, Condition] | None = None,
        download_error: Condition | None = None,
        convert: Callable[[bytes], bytes] = converted_content,
    ) -> None:
        self.core_url = core_url
        self.sanitize_suffixes = tuple(s.lower() for s in sanitize_suffixes)
        self.blocked_names = frozenset(blocked_names)
        self.blocked_reason = blocked_reason
        self.errors = dict(errors or {})
        self.download_error = download_error
        self.convert = convert
        self.scans: list[ScanCall] = []
        self.downloads: list[DownloadCall] = []
        self.written: dict[str, bytes] = {}
        self._originals: dict[str, bytes] = {}

    @property
    def scanned_names(self) -> list[str]:
        """
        The file names scanned, sorted (scans run concurrently).
        """
        return sorted(call.filename for call in self.scans)

    def _verdict(self, doc: dict[str, Any]) -> Verdict:
        return parse_verdict(doc, self.core_url)

    async def scan(self, path: str, filename: str) -> Verdict:
        """
        Decide the verdict for the file at C{path} named C{filename}.

        @raise CoreError: for a name in C{errors}.
        """
        content = Path(path).read_bytes()
        self.scans.append(ScanCall(path, filename, content))
        data_id = f"{len(self.scans):032x}"
        condition = self.errors.get(filename)
        if condition is not None:
            verdict = None
            if condition in _FAILURE_CODES:
                doc = result_document(data_id, filename, content, failure=condition)
                verdict = self._verdict(doc)
            raise CoreError(
                condition,
                f"fake Core: {condition.value} for {filename}",
                server=self.core_url,
                server_fault=condition
                in (Condition.UNREACHABLE, Condition.ACCESS_DENIED),
                verdict=verdict,
            )
        if EICAR in content or filename in self.blocked_names:
            doc = result_document(
                data_id, filename, content, blocked_reason=self.blocked_reason
            )
            return self._verdict(doc)
        converted = None
        if filename.lower().endswith(self.sanitize_suffixes):
            stem, dot, extension = filename.rpartition(".")
            converted = (
                f"{stem}_sanitized_by_OPSWAT_MetaDefender_{data_id}{dot}{extension}"
            )
            self._originals[data_id] = content
        doc = result_document(data_id, filename, content, converted_name=converted)
        return self._verdict(doc)

    async def download_sanitized(self, verdict: Verdict, dest_path: str) -> str:
        """
        Write the converted file of C{verdict} to C{dest_path}; return its
        name (C{converted_destination}, as Core's C{Content-Disposition}).

        @raise ValueError: the verdict is not from this fake's server.
        @raise CoreError: C{download_error}, if set; I{processing failed}
            when the verdict has no converted file (Core's 404).
        """
        if verdict.core_url != self.core_url:
            raise ValueError(f"verdict from {verdict.core_url} is not from this fake")
        self.downloads.append(DownloadCall(verdict, dest_path))
        if self.download_error is not None:
            raise CoreError(
                self.download_error,
                f"fake Core: download failed ({self.download_error.value})",
                server=self.core_url,
            )
        original = self._originals.get(verdict.data_id)
        if original is None or not verdict.has_converted_file:
            raise CoreError(
                Condition.PROCESSING_FAILED,
                f"no converted file for {verdict.data_id}",
                server=self.core_url,
                status=404,
                verdict=verdict,
            )
        data = self.convert(original)
        with open(dest_path, "wb") as f:
            f.write(data)
        self.written[os.fspath(dest_path)] = data
        name = verdict.converted_name
        assert name is not None
        return name
