"""
The shapes of MetaDefender Core's answers, as the reference
(C{../shared/reference/metadefender-core-api.md}) documents them, written as
checks: which keys a result document has (and when), their types, and the
vocabularies of their values, per Core version profile. The conformance
tests run every answer of the emulator through L{check_result}.

Each check raises C{AssertionError} naming the path of the first thing that
differs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: scan_all_result_i -> the texts Core uses for it (reference 2.2).
RESULT_TEXTS: dict[int, set[str]] = {
    0: {"No Threat Detected", "Clean"},
    1: {"Infected"},
    2: {"Suspicious"},
    3: {"Failed"},
    4: {"Cleaned / Deleted"},
    7: {"Allowlisted", "Whitelisted"},
    8: {"Blocklisted", "Blacklisted"},
    9: {"Exceeded Archive Depth"},
    10: {"Not Scanned"},
    12: {"Encrypted Archive"},
    13: {"Exceeded Archive Size"},
    14: {"Exceeded Archive File Number"},
    15: {"Password Protected Document"},
    16: {"Exceeded Archive Timeout"},
    17: {"Mismatch"},
    18: {"Potentially Vulnerable File"},
    19: {"Canceled", "Cancelled"},
    20: {"Sensitive Data Found"},
    21: {"Yara Rule Matched"},
    22: {"Potentially Unwanted Program"},
    23: {"Unsupported File Type"},
    24: {"Extraction Failed"},
    255: {"In Progress"},
}
#: Per-engine scan_result_i values (reference 2.2).
ENGINE_RESULTS = {0, 1, 2, 3, 10, 19, 22, 23}
ACTIONS_RAN = {"Sanitized", "Sanitized Partially", "Sanitization Skipped"}
ACTIONS_FAILED = {
    "Sanitization Failed",
    "Sanitization Timed Out",
    "Sanitization Timeout",
}
FAILURE_CATEGORIES = {
    "invalid file structure",
    "unsupported version",
    "exceeded file size",
    "password protected",
    "processing time out",
    "failed to sanitize",
}
CERTAINTY = {"Very Low", "Low", "Medium", "High", "Very High"}
REDACT = {"redacted", "not redacted", "failed to redact"}
WATERMARK = {"added", "not added", "failed to add"}
METADATA_REMOVAL = {"removed", "not removed", "failed to remove"}
OUTDATED = {"enginedefinitions", "configuration", "sanitization"}

_DATA_ID = re.compile(r"[0-9a-f]{32}\Z")
_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
_HEX = {32: re.compile(r"[0-9a-f]{32}\Z"), 40: re.compile(r"[0-9a-f]{40}\Z")}
_HEX[64] = re.compile(r"[0-9a-f]{64}\Z")
_MASKED = re.compile(r"X+\d{4}\Z")


def _fail(path: str, why: str) -> None:
    raise AssertionError(f"{path}: {why}")


def _keys(
    path: str,
    value: object,
    required: set[str],
    optional: set[str] = frozenset(),  # type: ignore[assignment]
) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _fail(path, f"not an object: {value!r}")
    assert isinstance(value, Mapping)
    keys = set(value)
    if missing := required - keys:
        _fail(path, f"missing {sorted(missing)}")
    if extra := keys - required - optional:
        _fail(path, f"unexpected {sorted(extra)}")
    return value


def _type(path: str, value: object, kind: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) and kind in (int, (int,)):
        _fail(path, f"is a bool, not {kind}")
    if not isinstance(value, kind):
        _fail(path, f"{value!r} is not {kind}")


def _stamp(path: str, value: object) -> None:
    _type(path, value, str)
    assert isinstance(value, str)
    if not _STAMP.match(value):
        _fail(path, f"{value!r} is not an ISO-8601 UTC time with milliseconds")


def _percent(path: str, value: object) -> None:
    _type(path, value, int)
    assert isinstance(value, int)
    if not 0 <= value <= 100:
        _fail(path, f"{value} is not 0-100")


def check_code(path: str, code: object, text: object) -> None:
    """
    A C{scan_all_result_i} and its C{scan_all_result_a} agree with Core's
    table.
    """
    _type(f"{path}.scan_all_result_i", code, int)
    assert isinstance(code, int)
    if code not in RESULT_TEXTS:
        _fail(f"{path}.scan_all_result_i", f"{code} is not a Core code")
    if text not in RESULT_TEXTS[code]:
        _fail(f"{path}.scan_all_result_a", f"{text!r} is not the text of {code}")


def check_file_info(info: object, *, v5: bool = False) -> None:
    path = "file_info"
    optional = (
        {"upload_time", "receive_data_timestamp", "type_category"} if v5 else set()
    )
    info = _keys(
        path,
        info,
        {
            "display_name",
            "file_size",
            "file_type",
            "file_type_description",
            "md5",
            "sha1",
            "sha256",
            "upload_timestamp",
        },
        optional,
    )
    _type(f"{path}.display_name", info["display_name"], str)
    _type(f"{path}.file_size", info["file_size"], int)
    _type(f"{path}.file_type", info["file_type"], str)
    _type(f"{path}.file_type_description", info["file_type_description"], str)
    for key, size in (("md5", 32), ("sha1", 40), ("sha256", 64)):
        if not _HEX[size].match(str(info[key])):
            _fail(f"{path}.{key}", f"{info[key]!r} is not lowercase hex")
    _stamp(f"{path}.upload_timestamp", info["upload_timestamp"])


def check_engines(details: object, *, engine_ids: bool) -> None:
    path = "scan_results.scan_details"
    _type(path, details, dict)
    assert isinstance(details, dict)
    required = {"def_time", "location", "scan_result_i", "scan_time", "threat_found"}
    if engine_ids:
        required |= {"eng_id", "wait_time"}
    for name, entry in details.items():
        where = f"{path}.{name}"
        entry = _keys(where, entry, required)
        _stamp(f"{where}.def_time", entry["def_time"])
        if entry["scan_result_i"] not in ENGINE_RESULTS:
            _fail(f"{where}.scan_result_i", f"{entry['scan_result_i']!r}")
        _type(f"{where}.scan_time", entry["scan_time"], int)
        _type(f"{where}.threat_found", entry["threat_found"], str)
        if entry["scan_result_i"] in (1, 2, 22) and not entry["threat_found"]:
            _fail(f"{where}.threat_found", "empty for a detection")
        if entry["scan_result_i"] == 0 and entry["threat_found"]:
            _fail(f"{where}.threat_found", "set for a clean result")
        if engine_ids:
            _type(f"{where}.eng_id", entry["eng_id"], str)
            _type(f"{where}.wait_time", entry["wait_time"], int)


def _actions(path: str, value: object, vocabulary: set[str]) -> list[str]:
    _type(path, value, str)
    assert isinstance(value, str)
    parts = [p.strip() for p in value.split("|")] if value else []
    for part in parts:
        if part not in vocabulary:
            _fail(path, f"{part!r} is not one of {sorted(vocabulary)}")
    return parts


def check_post_processing(post: object) -> None:
    path = "process_info.post_processing"
    post = _keys(
        path,
        post,
        {
            "actions_failed",
            "actions_ran",
            "converted_destination",
            "converted_to",
            "copy_move_destination",
        },
        {"sanitization_details"},
    )
    ran = _actions(f"{path}.actions_ran", post["actions_ran"], ACTIONS_RAN)
    failed = _actions(f"{path}.actions_failed", post["actions_failed"], ACTIONS_FAILED)
    for key in ("converted_destination", "converted_to", "copy_move_destination"):
        _type(f"{path}.{key}", post[key], str)
    sanitized = any(a.startswith("Sanitized") for a in ran)
    if sanitized != bool(post["converted_destination"]):
        _fail(f"{path}.converted_destination", "must be set exactly when sanitized")
    details = post.get("sanitization_details")
    if details is None:
        return
    where = f"{path}.sanitization_details"
    if failed:
        details = _keys(where, details, {"failure_category", "details"})
        if details["failure_category"] not in FAILURE_CATEGORIES:
            _fail(f"{where}.failure_category", repr(details["failure_category"]))
        _type(f"{where}.details", details["details"], str)
        return
    details = _keys(where, details, {"description", "details"})
    _type(f"{where}.description", details["description"], str)
    _type(f"{where}.details", details["details"], list)
    for index, item in enumerate(details["details"]):
        at = f"{where}.details[{index}]"
        item = _keys(
            at,
            item,
            {"action", "object_name"},
            {"count", "object_details", "file_name", "description", "details"},
        )
        if item["action"] not in ("sanitized", "removed"):
            _fail(f"{at}.action", repr(item["action"]))
        if "count" in item:
            _type(f"{at}.count", item["count"], int)


def check_dlp(info: object) -> None:
    path = "dlp_info"
    info = _keys(
        path,
        info,
        {
            "errors",
            "filename",
            "hits",
            "metadata_removal",
            "redact",
            "verdict",
            "watermark",
        },
        {"certainty", "severity"},
    )
    if info["verdict"] not in (0, 1, 2, 3, 4):
        _fail(f"{path}.verdict", repr(info["verdict"]))
    if "certainty" in info and info["certainty"] not in CERTAINTY:
        _fail(f"{path}.certainty", repr(info["certainty"]))
    if "severity" in info and info["severity"] not in (0, 1):
        _fail(f"{path}.severity", repr(info["severity"]))
    for key, vocabulary in (
        ("redact", REDACT),
        ("watermark", WATERMARK),
        ("metadata_removal", METADATA_REMOVAL),
    ):
        result = _keys(f"{path}.{key}", info[key], {"result"})["result"]
        if result not in vocabulary:
            _fail(f"{path}.{key}.result", repr(result))
    _type(f"{path}.errors", info["errors"], dict)
    _type(f"{path}.filename", info["filename"], str)
    hits = info["hits"]
    _type(f"{path}.hits", hits, dict)
    redacted = info["redact"]["result"] == "redacted"
    if bool(info["filename"]) != (redacted or info["watermark"]["result"] == "added"):
        _fail(f"{path}.filename", "must name the output exactly when one was written")
    for rule, group in hits.items():
        where = f"{path}.hits.{rule}"
        group = _keys(where, group, {"display_name", "hits"})
        for index, hit in enumerate(group["hits"]):
            at = f"{where}.hits[{index}]"
            hit = _keys(
                at,
                hit,
                {
                    "after",
                    "before",
                    "certainty",
                    "certainty_score",
                    "hit",
                    "isRedacted",
                    "severity",
                },
            )
            if not _MASKED.match(hit["hit"]):
                _fail(f"{at}.hit", f"{hit['hit']!r} is not masked like Core's")
            if hit["certainty"] not in CERTAINTY:
                _fail(f"{at}.certainty", repr(hit["certainty"]))
            _percent(f"{at}.certainty_score", hit["certainty_score"])
            _type(f"{at}.isRedacted", hit["isRedacted"], bool)
            if hit["isRedacted"] != redacted:
                _fail(f"{at}.isRedacted", "disagrees with redact.result")
    if bool(hits) != (info["verdict"] == 1):
        _fail(f"{path}.verdict", "must be 1 exactly when there are hits")


def check_extracted(extracted: object, *, paging: bool) -> None:
    path = "extracted_files"
    paged = {"files_extracted_count", "first_index", "page_size", "worst_data_id"}
    extracted = _keys(
        path, extracted, {"files_in_archive"} | (paged if paging else set())
    )
    child_keys = {
        "data_id",
        "detected_by",
        "display_name",
        "file_size",
        "file_type",
        "file_type_description",
        "progress_percentage",
        "scan_all_result_i",
        "scanned_with",
    }
    if paging:
        child_keys |= {"scan_all_result_a", "process_info"}
    entries = extracted["files_in_archive"]
    _type(f"{path}.files_in_archive", entries, list)
    for index, child in enumerate(entries):
        at = f"{path}.files_in_archive[{index}]"
        child = _keys(at, child, child_keys)
        if not _DATA_ID.match(child["data_id"]):
            _fail(f"{at}.data_id", repr(child["data_id"]))
        for key in ("detected_by", "file_size", "scanned_with"):
            _type(f"{at}.{key}", child[key], int)
        _percent(f"{at}.progress_percentage", child["progress_percentage"])
        if paging:
            check_code(at, child["scan_all_result_i"], child["scan_all_result_a"])
            info = _keys(
                f"{at}.process_info",
                child["process_info"],
                {"blocked_reason", "progress_percentage", "result"},
            )
            if info["result"] not in ("Allowed", "Blocked", "Processing"):
                _fail(f"{at}.process_info.result", repr(info["result"]))
    if paging:
        for key in ("files_extracted_count", "first_index", "page_size"):
            _type(f"{path}.{key}", extracted[key], int)
        if extracted["page_size"] != len(entries):
            _fail(f"{path}.page_size", "is not the number of entries shown")
        _type(f"{path}.worst_data_id", extracted["worst_data_id"], str)


def check_result(doc: object, profile: str = "v4") -> None:
    """
    A result document (C{GET /file/{id}}, C{GET /hash/{h}}, a webhook or
    sync body) has Core's shape for the version C{profile} (C{v4},
    C{v5} or C{early-v4}).
    """
    v4, v5 = profile == "v4", profile == "v5"
    doc = _keys(
        "",
        doc,
        {"data_id", "file_info", "process_info", "scan_results"},
        {"dlp_info", "extracted_files"},
    )
    if not _DATA_ID.match(doc["data_id"]):
        _fail("data_id", repr(doc["data_id"]))
    check_file_info(doc["file_info"], v5=v5)
    scan = _keys(
        "scan_results",
        doc["scan_results"],
        {
            "data_id",
            "progress_percentage",
            "scan_all_result_a",
            "scan_all_result_i",
            "scan_details",
            "start_time",
            "total_avs",
            "total_time",
        },
    )
    if scan["data_id"] != doc["data_id"]:
        _fail("scan_results.data_id", "differs from data_id")
    _percent("scan_results.progress_percentage", scan["progress_percentage"])
    check_code("scan_results", scan["scan_all_result_i"], scan["scan_all_result_a"])
    check_engines(scan["scan_details"], engine_ids=v4 or v5)
    _stamp("scan_results.start_time", scan["start_time"])
    if scan["total_avs"] != len(scan["scan_details"]):
        _fail("scan_results.total_avs", "is not the number of engines listed")
    _type("scan_results.total_time", scan["total_time"], int)

    required = {
        "blocked_reason",
        "file_type_skipped_scan",
        "profile",
        "progress_percentage",
        "result",
        "user_agent",
    }
    if v4:
        required |= {
            "outdated_data",
            "processing_time",
            "queue_time",
            "username",
            "verdicts",
        }
    if v4 or v5:
        required |= {"processing_time_details"}
    if v5:
        required |= {"blocked_reasons"}
    process = _keys("process_info", doc["process_info"], required, {"post_processing"})
    result = process["result"]
    if result not in ("Allowed", "Blocked", "Processing"):
        _fail("process_info.result", repr(result))
    _percent("process_info.progress_percentage", process["progress_percentage"])
    _type(
        "process_info.file_type_skipped_scan", process["file_type_skipped_scan"], bool
    )
    _type("process_info.profile", process["profile"], str)
    _type("process_info.user_agent", process["user_agent"], str)
    reason = process["blocked_reason"]
    _type("process_info.blocked_reason", reason, str)
    done = process["progress_percentage"] == 100 and result != "Processing"
    if (result == "Blocked") != bool(reason):
        _fail("process_info.blocked_reason", "must be set exactly when Blocked")
    if reason and not any(reason in texts for texts in RESULT_TEXTS.values()):
        _fail("process_info.blocked_reason", f"{reason!r} is not a Core verdict")
    if v4:
        verdicts = process["verdicts"]
        _type("process_info.verdicts", verdicts, list)
        for verdict in verdicts:
            if not any(verdict in texts for texts in RESULT_TEXTS.values()):
                _fail("process_info.verdicts", f"{verdict!r} is not a Core verdict")
        if done and not verdicts:
            _fail("process_info.verdicts", "empty in a finished result")
        if (
            done
            and scan["scan_all_result_i"] == 0
            and verdicts != ["No Threat Detected"]
        ):
            _fail("process_info.verdicts", "a clean file says No Threat Detected")
        for key in ("processing_time", "queue_time"):
            _type(f"process_info.{key}", process[key], int)
        _type("process_info.username", process["username"], str)
        for item in process["outdated_data"]:
            if item not in OUTDATED:
                _fail("process_info.outdated_data", repr(item))
    if v4 or v5:
        _keys(
            "process_info.processing_time_details",
            process["processing_time_details"],
            {"av_scan_time", "cdr_time", "dlp_time", "others_time", "vul_time"},
            {"extraction_time", "filetype_time", "hash_time", "opswatfilescan_time"},
        )
    if v5:
        reasons = process["blocked_reasons"]
        if reasons != ([reason] if reason else []):
            _fail("process_info.blocked_reasons", "disagrees with blocked_reason")
    if "post_processing" in process:
        if not done:
            _fail("process_info.post_processing", "present before the end")
        check_post_processing(process["post_processing"])
    elif done and (v4 or v5):
        _fail("process_info.post_processing", "missing from a finished result")

    if result == "Processing":
        code = scan["scan_all_result_i"]
        if scan["progress_percentage"] < 100:
            expected = 0 if profile == "early-v4" else 255
            if code != expected:
                _fail("scan_results.scan_all_result_i", f"{code} while processing")
            expected_time = -1 if profile == "early-v4" else 0
            if scan["total_time"] != expected_time:
                _fail("scan_results.total_time", f"{scan['total_time']} in progress")
            for name, engine in scan["scan_details"].items():
                if engine["scan_result_i"] == 255:
                    _fail(f"scan_results.scan_details.{name}", "an unfinished engine")
        if "dlp_info" in doc:
            _fail("dlp_info", "present before the end")
    if "dlp_info" in doc:
        check_dlp(doc["dlp_info"])
        if doc["dlp_info"]["verdict"] == 1 and scan["scan_all_result_i"] == 0:
            _fail("scan_results.scan_all_result_i", "0 with a DLP hit")
    if "extracted_files" in doc:
        check_extracted(doc["extracted_files"], paging=v4 or v5)
