# -*- test-case-name: tests.test_core_verdict -*-
"""
The result of one Core scan as a frozen value, and the parser that builds it.

The parser is pure (a decoded JSON document in, a L{Verdict} out) so every
shape Core is known to produce can be tested without a server. It never
trusts key order or the presence of optional sections.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import attrs

from mdgateway.scan.errors import Condition

#: C{scan_all_result_i} codes that mean Core could not process the file.
FAILED_CODES = frozenset({3, 19, 24})
#: C{scan_all_result_i} for "Not Scanned".
NOT_SCANNED_CODE = 10
#: C{scan_all_result_i} for v5's "Global Timeout Exceeded".
GLOBAL_TIMEOUT_CODE = 31
#: C{scan_all_result_i} while processing.
IN_PROGRESS_CODE = 255

#: L{Verdict.cache} of a verdict Core gave for a hash lookup.
FROM_CORE_HASH = "core"
#: L{Verdict.cache} of a verdict the gateway's verdict cache reused.
FROM_VERDICT_CACHE = "gateway"


class MalformedResultError(ValueError):
    """
    A document that is not a Core result (wrong types, missing C{data_id}).
    """


class Outcome(enum.Enum):
    """
    C{process_info.result}: the workflow's final verdict.
    """

    ALLOWED = "Allowed"
    BLOCKED = "Blocked"
    OTHER = "other"


class DocumentState(enum.Enum):
    """
    Where a polled document stands.
    """

    NOT_FOUND = "not_found"
    IN_PROGRESS = "in_progress"
    COMPLETE = "complete"


@attrs.frozen
class EngineResult:
    """
    One engine's line in C{scan_results.scan_details}.
    """

    name: str
    scan_result_i: int
    threat_found: str = ""
    def_time: str = ""


@attrs.frozen
class DlpHit:
    """
    One Proactive DLP match (the C{hit} text is already masked by Core).
    """

    rule: str
    display_name: str
    hit: str
    certainty: str = ""
    redacted: bool = False


@attrs.frozen
class DlpResult:
    """
    C{dlp_info}: verdict 0 clean, 1 matched, 2 suspicious, 3 failed,
    4 not scanned.
    """

    verdict: int
    hits: tuple[DlpHit, ...] = ()
    redacted: bool = False
    watermarked: bool = False
    filename: str = ""


@attrs.frozen
class ArchiveChild:
    """
    One entry of C{extracted_files.files_in_archive}.
    """

    data_id: str
    display_name: str
    scan_all_result_i: int
    scan_all_result_a: str = ""
    result: str = ""
    detected_by: int = 0


@attrs.frozen
class Verdict:
    """
    What Core decided about one file.

    @ivar core_url: base URL of the server that holds the result (no API
        key), needed to download the converted file.
    @ivar result: C{process_info.result} as sent (C{Allowed}, C{Blocked},
        ...); L{outcome} is its enum form.
    @ivar sanitized: C{Sanitized} (or C{Sanitized Partially}) ran.
    @ivar converted_name: C{post_processing.converted_destination}, if any.
    @ivar outdated: C{process_info.outdated_data}; C{"sanitization"} means
        the converted file is gone.
    @ivar cache: where a verdict that is not a new scan came from:
        L{FROM_CORE_HASH} (Core's answer to a hash lookup) or
        L{FROM_VERDICT_CACHE} (an earlier scan of the same content that
        the gateway reused); C{""} for a new scan.
    """

    data_id: str
    core_url: str
    outcome: Outcome
    result: str
    blocked_reason: str
    scan_all_result_i: int
    scan_all_result_a: str
    sanitized: bool = False
    actions_ran: tuple[str, ...] = ()
    actions_failed: tuple[str, ...] = ()
    converted_name: str | None = None
    dlp: DlpResult | None = None
    engines: tuple[EngineResult, ...] = ()
    children: tuple[ArchiveChild, ...] = ()
    display_name: str = ""
    file_size: int = 0
    file_type: str = ""
    sha256: str = ""
    rule: str = ""
    outdated: tuple[str, ...] = ()
    cache: str = ""

    @property
    def from_cache(self) -> bool:
        """
        The verdict is not a new scan (see L{cache}).
        """
        return bool(self.cache)

    @property
    def blocked(self) -> bool:
        """
        Core's workflow blocked the file.
        """
        return self.outcome is Outcome.BLOCKED

    @property
    def allowed(self) -> bool:
        """
        Core's workflow allowed the file.
        """
        return self.outcome is Outcome.ALLOWED

    @property
    def threats(self) -> tuple[str, ...]:
        """
        Distinct threat names reported by the engines, in engine order.
        """
        seen: dict[str, None] = {}
        for engine in self.engines:
            if engine.scan_result_i in (1, 2, 22) and engine.threat_found:
                seen.setdefault(engine.threat_found)
        return tuple(seen)

    @property
    def has_converted_file(self) -> bool:
        """
        Whether C{GET /file/converted/{data_id}} should have a file: Deep CDR
        sanitized it or DLP redacted or watermarked it, and retention has
        not purged it.
        """
        if "sanitization" in self.outdated:
            return False
        dlp = self.dlp
        return self.sanitized or (dlp is not None and (dlp.redacted or dlp.watermarked))


def _obj(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MalformedResultError(f"{key} is not an object")
    return value


def _str(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise MalformedResultError(f"{key} is not a string")


def _int(doc: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = doc.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        raise MalformedResultError(f"{key} is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise MalformedResultError(f"{key} is not a number")


def split_actions(value: object) -> tuple[str, ...]:
    """
    Split C{actions_ran}/C{actions_failed}: a C{|}-separated string in Core,
    but some integrations send a list, so accept both.
    """
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        parts: list[object] = list(value.split("|"))
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        raise MalformedResultError("post_processing actions are not a string")
    return tuple(p.strip() for p in parts if isinstance(p, str) and p.strip())


def _is_sanitized(actions: tuple[str, ...]) -> bool:
    return any(a == "Sanitized" or a.startswith("Sanitized ") for a in actions)


def is_not_found(doc: object) -> bool:
    """
    The id-as-key shape C{{"<id or hash>": "Not Found"}} (any status).
    """
    if not isinstance(doc, Mapping) or "data_id" in doc or "file_info" in doc:
        return False
    values = list(doc.values())
    return (
        len(values) == 1
        and isinstance(values[0], str)
        and values[0].strip().lower() == "not found"
    )


def document_state(doc: object) -> DocumentState:
    """
    Classify a polled document.

    Complete iff C{process_info.progress_percentage} is 100 and
    C{process_info.result} is not C{Processing}; only without
    C{process_info} does C{scan_results.progress_percentage} count, because
    it reaches 100 before Deep CDR and DLP are done.

    @raise MalformedResultError: neither a result nor the not-found shape.
    """
    if is_not_found(doc):
        return DocumentState.NOT_FOUND
    if not isinstance(doc, Mapping) or not isinstance(doc.get("data_id"), str):
        raise MalformedResultError("document has no data_id")
    process = _obj(doc, "process_info")
    if process:
        done = (
            _int(process, "progress_percentage") >= 100
            and _str(process, "result") != "Processing"
        )
    else:
        done = _int(_obj(doc, "scan_results"), "progress_percentage") >= 100
    return DocumentState.COMPLETE if done else DocumentState.IN_PROGRESS


def _engines(scan: Mapping[str, Any]) -> tuple[EngineResult, ...]:
    details = _obj(scan, "scan_details")
    engines = []
    for name in sorted(details):
        entry = details[name]
        if not isinstance(entry, Mapping):
            raise MalformedResultError(f"scan_details.{name} is not an object")
        engines.append(
            EngineResult(
                name=str(name),
                scan_result_i=_int(entry, "scan_result_i"),
                threat_found=_str(entry, "threat_found"),
                def_time=_str(entry, "def_time"),
            )
        )
    return tuple(engines)


def _dlp(doc: Mapping[str, Any]) -> DlpResult | None:
    info = _obj(doc, "dlp_info")
    if not info:
        return None
    nested = info.get("dlp_info")
    if isinstance(nested, Mapping) and "verdict" not in info:
        # The 4.18 OpenAPI file nests a second dlp_info; real output is flat.
        info = nested
    hits: list[DlpHit] = []
    groups = _obj(info, "hits")
    for rule in sorted(groups):
        group = groups[rule]
        if not isinstance(group, Mapping):
            raise MalformedResultError(f"dlp_info.hits.{rule} is not an object")
        entries = group.get("hits") or []
        if not isinstance(entries, list):
            raise MalformedResultError(f"dlp_info.hits.{rule}.hits is not a list")
        for entry in entries:
            if not isinstance(entry, Mapping):
                raise MalformedResultError("dlp hit is not an object")
            hits.append(
                DlpHit(
                    rule=str(rule),
                    display_name=_str(group, "display_name"),
                    hit=_str(entry, "hit"),
                    certainty=_str(entry, "certainty"),
                    redacted=entry.get("isRedacted") is True,
                )
            )
    return DlpResult(
        verdict=_int(info, "verdict"),
        hits=tuple(hits),
        redacted=_str(_obj(info, "redact"), "result") == "redacted",
        watermarked=_str(_obj(info, "watermark"), "result") == "added",
        filename=_str(info, "filename"),
    )


def _children(doc: Mapping[str, Any]) -> tuple[ArchiveChild, ...]:
    extracted = _obj(doc, "extracted_files")
    entries = extracted.get("files_in_archive") or []
    if not isinstance(entries, list):
        raise MalformedResultError("files_in_archive is not a list")
    children = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise MalformedResultError("archive entry is not an object")
        children.append(
            ArchiveChild(
                data_id=_str(entry, "data_id"),
                display_name=_str(entry, "display_name"),
                scan_all_result_i=_int(entry, "scan_all_result_i"),
                scan_all_result_a=_str(entry, "scan_all_result_a"),
                result=_str(_obj(entry, "process_info"), "result"),
                detected_by=_int(entry, "detected_by"),
            )
        )
    return tuple(children)


def parse_verdict(doc: object, core_url: str, *, from_cache: bool = False) -> Verdict:
    """
    Build a L{Verdict} from a complete result document.

    @param core_url: the server's base URL, without API key.
    @param from_cache: the document answered a hash lookup.
    @raise MalformedResultError: not a complete result document.
    """
    state = document_state(doc)
    if state is not DocumentState.COMPLETE:
        raise MalformedResultError(f"document is {state.value}, not complete")
    assert isinstance(doc, Mapping)
    process = _obj(doc, "process_info")
    scan = _obj(doc, "scan_results")
    info = _obj(doc, "file_info")
    post = _obj(process, "post_processing")
    result = _str(process, "result")
    try:
        outcome = Outcome(result)
    except ValueError:
        outcome = Outcome.OTHER
    blocked_reason = _str(process, "blocked_reason")
    reasons = process.get("blocked_reasons")
    if not blocked_reason and isinstance(reasons, list) and reasons:
        blocked_reason = str(reasons[0])
    actions_ran = split_actions(post.get("actions_ran"))
    outdated = process.get("outdated_data") or []
    converted = _str(post, "converted_destination")
    return Verdict(
        data_id=_str(doc, "data_id"),
        core_url=core_url,
        outcome=outcome,
        result=result,
        blocked_reason=blocked_reason,
        scan_all_result_i=_int(scan, "scan_all_result_i"),
        scan_all_result_a=_str(scan, "scan_all_result_a"),
        sanitized=_is_sanitized(actions_ran),
        actions_ran=actions_ran,
        actions_failed=split_actions(post.get("actions_failed")),
        converted_name=converted or None,
        dlp=_dlp(doc),
        engines=_engines(scan),
        children=_children(doc),
        display_name=unquote(_str(info, "display_name")),
        file_size=_int(info, "file_size"),
        file_type=_str(info, "file_type"),
        sha256=_str(info, "sha256").lower(),
        rule=_str(process, "profile"),
        outdated=tuple(str(o) for o in outdated if isinstance(o, str)),
        cache=FROM_CORE_HASH if from_cache else "",
    )


def failure_condition(verdict: Verdict) -> Condition | None:
    """
    The error condition a complete result stands for, if any.

    C{Failed}, C{Canceled} and (v5) C{Extraction Failed} are
    I{processing failed}; C{Not Scanned} is I{not scanned}; v5's
    C{Global Timeout Exceeded} is I{scan timeout}. Every other code is a
    verdict the rule acts on.
    """
    code = verdict.scan_all_result_i
    if code in FAILED_CODES:
        return Condition.PROCESSING_FAILED
    if code == NOT_SCANNED_CODE:
        return Condition.NOT_SCANNED
    if code == GLOBAL_TIMEOUT_CODE:
        return Condition.SCAN_TIMEOUT
    return None


_DISPOSITION_EXT = re.compile(r"""filename\*\s*=\s*([^;]+)""", re.IGNORECASE)
_DISPOSITION = re.compile(r"""filename\s*=\s*("(?:[^"\\]|\\.)*"|[^;]+)""", re.I)


def filename_from_disposition(header: str | None) -> str | None:
    """
    The file name a C{Content-Disposition} header carries, percent-decoded
    and reduced to its last path component (it ends up in a MIME header,
    and must never name a directory).
    """
    if not header:
        return None
    name: str | None = None
    match = _DISPOSITION_EXT.search(header)
    if match:
        value = match.group(1).strip().strip('"')
        charset, _, rest = value.partition("'")
        if rest:
            _lang, _, encoded = rest.partition("'")
            name = unquote(encoded, encoding=charset or "utf-8", errors="replace")
    if name is None:
        match = _DISPOSITION.search(header)
        if match:
            raw = match.group(1).strip()
            if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            name = unquote(raw)
    if not name:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = "".join(ch for ch in name if ch >= " " and ch != "\x7f")
    return name if name not in ("", ".", "..") else None
