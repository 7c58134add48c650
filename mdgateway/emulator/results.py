# -*- test-case-name: tests.test_core_conformance -*-
"""
The result documents of the emulated Core (C{GET /file/{data_id}},
C{GET /hash/{hash}}, the webhook body, C{POST /file/sync}), built from an
examined L{Node} and where its processing stands, in the shape of the
chosen Core version (L{Shape}).

Presence rules follow Core: C{dlp_info} only when Proactive DLP ran,
C{extracted_files} only for an extracted archive, C{post_processing} in a
finished result, C{sanitization_details} only when Deep CDR ran. While a
file is processing, C{scan_details} lists only the engines that have
finished, and C{total_avs} counts them.
"""

from __future__ import annotations

import time
from typing import Any

import attrs

from mdgateway.emulator.config import Shape
from mdgateway.emulator.examine import CODES, Node, worst

PROCESSING, SCANNED, DONE = range(3)

#: The emulated engines: display name and engine id.
ENGINES = (
    ("Emulated AV One", "emuav1_1_linux"),
    ("Emulated AV Two", "emuav2_1_linux"),
)
THREAT = "EICAR-Test-File (not a virus)"
_ENGINE_ERRORS = {3: "Failed to scan the file", 10: "File was not scanned"}


def iso(seconds: float) -> str:
    """
    Core's timestamp form: ISO 8601 UTC with milliseconds.
    """
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{int(seconds * 1000) % 1000:03d}Z"


@attrs.frozen
class Progress:
    """
    Where the processing of one upload stands at C{now}.

    @ivar stage: C{PROCESSING} (engines running), C{SCANNED} (engines
        done, post-processing running) or C{DONE}.
    """

    stage: int
    received: float
    latency: float
    now: float
    cancelled: bool = False

    def engine_done(self, index: int) -> bool:
        """
        Whether engine C{index} has finished (engines finish one after
        another within the latency).
        """
        if self.stage != PROCESSING and not self.cancelled:
            return True
        due = self.received + self.latency * (index + 1) / len(ENGINES)
        return self.now >= due and self.latency > 0

    @property
    def scan_percent(self) -> int:
        if self.stage != PROCESSING:
            return 100
        if self.latency <= 0:
            return 0
        return int(min((self.now - self.received) / self.latency, 0.99) * 100)

    @property
    def process_percent(self) -> int:
        if self.stage == DONE:
            return 100
        if self.stage == SCANNED:
            return 90
        return self.scan_percent * 9 // 10


@attrs.frozen
class Request:
    """
    What the submission said about the file.
    """

    rule: str
    user_agent: str
    started: str


def code_text(code: int, shape: Shape) -> str:
    """
    C{scan_all_result_a} for C{code}.
    """
    return shape.clean_text if code == 0 else CODES[code]


def _engines(
    node: Node, progress: Progress, shape: Shape, started: str
) -> dict[str, Any]:
    details: dict[str, Any] = {}
    latency_ms = int(progress.latency * 1000)
    for index, (name, eng_id) in enumerate(ENGINES):
        done = progress.engine_done(index)
        if not done and not progress.cancelled:
            continue
        if not done:
            result, threat = 19, ""
        elif node.own_code == 1 or node.infected:
            result, threat = 1, THREAT
        elif node.own_code in _ENGINE_ERRORS:
            result, threat = node.own_code, _ENGINE_ERRORS[node.own_code]
        else:
            result, threat = 0, ""
        entry: dict[str, Any] = {
            "def_time": started,
            "location": "local",
            "scan_result_i": result,
            "scan_time": latency_ms * (index + 1) // len(ENGINES) if done else 0,
            "threat_found": threat,
        }
        if shape.engine_ids:
            entry["eng_id"] = eng_id
            entry["wait_time"] = 0
        details[name] = entry
    return details


def _overall(node: Node, progress: Progress, shape: Shape) -> tuple[int, bool]:
    """
    C{(scan_all_result_i, blocked)} as shown now.
    """
    if progress.cancelled:
        return 19, True
    if progress.stage == PROCESSING:
        return shape.in_progress_code, False
    return node.code, node.blocked


def _post_processing(node: Node, cancelled: bool) -> dict[str, Any]:
    cdr = None if cancelled else node.cdr
    post: dict[str, Any] = {
        "actions_failed": cdr.action_failed if cdr is not None else "",
        "actions_ran": cdr.action_ran if cdr is not None else "",
        "converted_destination": (
            node.converted_name if cdr is not None and cdr.sanitized else ""
        ),
        "converted_to": node.converted_to if cdr is not None and cdr.sanitized else "",
        "copy_move_destination": "",
    }
    if cdr is not None:
        post["sanitization_details"] = cdr.details
    return post


def _dlp(node: Node) -> dict[str, Any]:
    assert node.dlp is not None
    dlp = node.dlp
    redact = "redacted" if dlp.redacted else "not redacted"
    if dlp.redact_failed:
        redact = "failed to redact"
    info: dict[str, Any] = {
        "errors": {"redact": "File structure invalid."} if dlp.redact_failed else {},
        "filename": node.converted_name if dlp.redacted else "",
        "hits": {},
        "metadata_removal": {"result": "not removed"},
        "redact": {"result": redact},
        "verdict": 1 if dlp.hits else 0,
        "watermark": {"result": "not added"},
    }
    if dlp.hits:
        info["certainty"] = "Very High"
        info["severity"] = 0
        info["hits"]["ccn"] = {
            "display_name": "Credit Card Number",
            "hits": [
                {
                    "after": hit.card.after,
                    "before": hit.card.before,
                    "certainty": "Very High",
                    "certainty_score": 100,
                    "hit": hit.card.masked.decode("ascii"),
                    "isRedacted": dlp.redacted,
                    "severity": 0,
                }
                for hit in dlp.hits
            ],
        }
    return info


def _child(child: Node, shape: Shape) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "data_id": child.data_id,
        "detected_by": len(ENGINES) if child.infected else 0,
        "display_name": child.display_name,
        "file_size": child.findings.size,
        "file_type": child.file_type.mime,
        "file_type_description": child.file_type.description,
        "progress_percentage": 100,
        "scan_all_result_i": child.code,
        "scanned_with": len(ENGINES),
    }
    if shape.archive_paging:
        entry["scan_all_result_a"] = code_text(child.code, shape)
        entry["process_info"] = {
            "blocked_reason": CODES[child.code] if child.blocked else "",
            "progress_percentage": 100,
            "result": "Blocked" if child.blocked else "Allowed",
        }
    return entry


def _extracted(node: Node, shape: Shape, first: int, size: int) -> dict[str, Any]:
    children = node.children
    page = children[first : first + size] if size > 0 else children[first:]
    extracted: dict[str, Any] = {"files_in_archive": [_child(c, shape) for c in page]}
    if shape.archive_paging:
        worst_code = worst([c.code for c in children])
        worst_child = next((c for c in children if c.code == worst_code), None)
        extracted.update(
            files_extracted_count=len(children),
            first_index=first,
            page_size=len(page),
            worst_data_id=worst_child.data_id if worst_child is not None else "",
        )
    return extracted


def document(
    node: Node,
    progress: Progress,
    request: Request,
    shape: Shape,
    *,
    first: int = 0,
    page_size: int = 50,
) -> dict[str, Any]:
    """
    The result document of C{node} as it stands.

    @param first: index of the first C{extracted_files} entry shown.
    @param page_size: entries shown (0: all from C{first}).
    """
    done = progress.stage == DONE
    code, blocked = _overall(node, progress, shape)
    reason = code_text(code, shape) if blocked and done else ""
    if progress.cancelled:
        reason = CODES[19]
    latency_ms = int(progress.latency * 1000)
    details = _engines(node, progress, shape, request.started)
    process_info: dict[str, Any] = {
        "blocked_reason": reason,
        "file_type_skipped_scan": False,
        "profile": request.rule,
        "progress_percentage": progress.process_percent,
        "result": ("Blocked" if blocked else "Allowed") if done else "Processing",
        "user_agent": request.user_agent,
    }
    if shape.details:
        if not done:
            verdicts: list[str] = []
        elif progress.cancelled:
            verdicts = [CODES[19]]
        else:
            verdicts = [code_text(c, shape) for c in node.issues] or [shape.clean_text]
        process_info.update(
            outdated_data=[],
            processing_time=latency_ms if progress.stage != PROCESSING else 0,
            queue_time=0,
            username="LOCAL/anonymous",
            verdicts=verdicts,
        )
    if shape.time_details:
        process_info["processing_time_details"] = {
            "av_scan_time": latency_ms if progress.stage != PROCESSING else 0,
            "cdr_time": 0,
            "dlp_time": 0,
            "others_time": 0,
            "vul_time": 0,
        }
    if shape.blocked_reasons:
        process_info["blocked_reasons"] = [reason] if reason else []
    if done:
        post = _post_processing(node, progress.cancelled)
        if (
            shape.always_post_processing
            or post["actions_ran"]
            or post["actions_failed"]
        ):
            process_info["post_processing"] = post
    in_progress = progress.stage == PROCESSING and not progress.cancelled
    doc: dict[str, Any] = {
        "data_id": node.data_id,
        "file_info": {
            "display_name": node.display_name,
            "file_size": node.findings.size,
            "file_type": node.file_type.mime,
            "file_type_description": node.file_type.description,
            "md5": node.findings.md5,
            "sha1": node.findings.sha1,
            "sha256": node.findings.sha256,
            "upload_timestamp": iso(progress.received),
        },
        "process_info": process_info,
        "scan_results": {
            "data_id": node.data_id,
            "progress_percentage": progress.scan_percent,
            "scan_all_result_a": code_text(code, shape),
            "scan_all_result_i": code,
            "scan_details": details,
            "start_time": iso(progress.received),
            "total_avs": len(details),
            "total_time": shape.in_progress_total_time if in_progress else latency_ms,
        },
    }
    if node.extracted:
        doc["extracted_files"] = _extracted(node, shape, first, page_size)
    if done and node.dlp is not None and not progress.cancelled:
        doc["dlp_info"] = _dlp(node)
    return doc
