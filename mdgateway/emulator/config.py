# -*- test-case-name: tests.test_core_emulator -*-
"""
The Core emulator's knobs, and the Core versions whose result shapes it can
imitate.

Result documents differ between Core versions in ways a client must
survive: the early 4.x servers (captured in 2016) call a clean file
C{"Clean"}, show C{total_time: -1} while a file is processing and send no
C{verdicts}, C{username} or engine ids; 4.18 to 4.21 add those fields; 5.x
adds C{blocked_reasons} and drops the fields the 4.18 specification was the
last to document. L{SHAPES} names each such version profile.
"""

from __future__ import annotations

import attrs

#: File types (by content; each named by its usual extensions) that Deep CDR
#: sanitizes unless told otherwise: Office documents with and without
#: macros, PDF, HTML and RTF.
DEFAULT_SANITIZE_TYPES = frozenset(
    {
        "doc",
        "docm",
        "docx",
        "htm",
        "html",
        "pdf",
        "ppt",
        "pptm",
        "pptx",
        "rtf",
        "xls",
        "xlsm",
        "xlsx",
    }
)


@attrs.frozen
class Shape:
    """
    How one Core version shapes its answers.

    @ivar name: the C{--profile} value.
    @ivar version: what C{GET /version} reports.
    @ivar clean_text: C{scan_all_result_a} for code 0.
    @ivar in_progress_total_time: C{scan_results.total_time} while
        processing.
    @ivar in_progress_code: C{scan_all_result_i} (and its text) while
        processing: 255 "In Progress", or the early servers' 0.
    @ivar details: 4.18-era C{process_info} fields (C{verdicts},
        C{username}, C{queue_time}, C{processing_time}, C{outdated_data}).
    @ivar engine_ids: engines carry C{eng_id} and C{wait_time} (4.18+).
    @ivar time_details: C{process_info.processing_time_details} (4.19.1+).
    @ivar blocked_reasons: v5's C{process_info.blocked_reasons} array.
    @ivar archive_paging: C{extracted_files} carries its counts and paging
        keys (C{files_extracted_count}, C{first_index}, C{page_size},
        C{worst_data_id}), and children their C{scan_all_result_a} and
        C{process_info}.
    @ivar always_post_processing: C{post_processing} is present in every
        finished result, not only when an action ran.
    @ivar sync: C{POST /file/sync} exists (4.21.0+).
    @ivar webhooks: the C{callbackurl} header and C{GET /file/webhook/{id}}
        exist (4.18+).
    @ivar extraction_failed: an archive that cannot be opened is code 24
        "Extraction Failed" (v5); older versions scan it as a plain file.
    """

    name: str
    version: str
    clean_text: str = "No Threat Detected"
    in_progress_total_time: int = 0
    in_progress_code: int = 255
    details: bool = True
    engine_ids: bool = True
    time_details: bool = True
    blocked_reasons: bool = False
    archive_paging: bool = True
    always_post_processing: bool = True
    sync: bool = True
    webhooks: bool = True
    extraction_failed: bool = False


#: The version profiles: C{v4} (4.21, the default), C{v5} (5.6) and
#: C{early-v4} (the 2016 4.x captures).
SHAPES: dict[str, Shape] = {
    "v4": Shape(name="v4", version="4.21.1"),
    "v5": Shape(
        name="v5",
        version="5.6.1",
        details=False,
        blocked_reasons=True,
        extraction_failed=True,
    ),
    "early-v4": Shape(
        name="early-v4",
        version="4.3.0",
        clean_text="Clean",
        in_progress_total_time=-1,
        in_progress_code=0,
        details=False,
        engine_ids=False,
        time_details=False,
        archive_paging=False,
        always_post_processing=False,
        sync=False,
        webhooks=False,
    ),
}


@attrs.frozen
class EmulatorConfig:
    """
    The emulator's knobs; replace L{CoreEmulator.config} to change them on
    the fly.

    @ivar latency: seconds each file spends "processing" (its engines finish
        one after another within it).
    @ivar postprocess: seconds between the end of the scan (when
        C{scan_results} reaches 100) and the end of post-processing (Deep
        CDR, DLP, when C{process_info} reaches 100). A result poll in
        between also ends it, so a client that stops on C{scan_results}
        is caught by the very next poll.
    @ivar queue_size: files processing at once before C{POST /file} answers
        503 (0 makes every upload busy).
    @ivar apikey: when set, every call must carry it (header or
        C{?apikey=}); never logged.
    @ivar sanitize_types: file types (lower-case extensions, no dot) that
        Deep CDR sanitizes; the type is recognised from the content.
    @ivar fail_rate: probability that any request answers 500.
    @ivar stall_body: result polls and downloads send headers and a partial
        body, then stall.
    @ivar not_found_status: status for an unknown C{data_id} (404, or 200 as
        some Core versions answer).
    @ivar dlp_block: a card number blocks the file (not redacted); when
        C{False} the file is allowed and Proactive DLP writes a redacted
        copy.
    @ivar dlp_rules: the rules that run Proactive DLP (C{None}: all).
    @ivar retention: seconds a finished result (and its converted file) is
        kept.
    @ivar max_results: finished results kept at most.
    @ivar max_file_size: bytes an upload may have (C{GET /file/rules}
        reports it); larger ones get Core's 500 size message.
    @ivar archive_depth: nested archive levels extracted; an archive deeper
        than that is "Exceeded Archive Depth" (9).
    @ivar archive_files: files extracted from one archive at most ("Exceeded
        Archive File Number", 14).
    @ivar archive_size: bytes extracted from one archive at most ("Exceeded
        Archive Size", 13).
    @ivar sync_timeout: seconds C{POST /file/sync} holds the connection
        before it answers 408 with the C{data_id}.
    @ivar page_size: C{extracted_files} entries per page by default.
    @ivar retry_after: seconds a 503 "too busy" answer asks the client to
        wait, in a C{Retry-After} header (C{None}: no header, as the
        reference documents; some Core deployments send one).
    @ivar shape: the Core version whose result shapes are imitated.
    @ivar version: what C{GET /version} reports (default: the shape's).
    @ivar instant: a benchmark stand-in, never a Core for real mail: every
        upload is reported clean (Allowed, no threat, nothing sanitized)
        at once, without reading its content (no file type, no hashes, no
        archive extraction, no DLP or Deep CDR). C{latency} and
        C{postprocess} do not apply; the API answers as Core does
        otherwise, so a gateway's own cost per message can be measured
        with almost none spent on the Core side.
    """

    latency: float = 0.0
    postprocess: float = 0.1
    queue_size: int = 500
    apikey: str | None = attrs.field(default=None, repr=False)
    sanitize_types: frozenset[str] = DEFAULT_SANITIZE_TYPES
    fail_rate: float = 0.0
    stall_body: bool = False
    not_found_status: int = 404
    dlp_block: bool = True
    dlp_rules: frozenset[str] | None = None
    retention: float = 600.0
    max_results: int = 100_000
    max_file_size: int = 200_000_000
    archive_depth: int = 5
    archive_files: int = 1000
    archive_size: int = 200_000_000
    sync_timeout: float = 30.0
    page_size: int = 50
    retry_after: int | None = None
    shape: Shape = SHAPES["v4"]
    version: str | None = None
    rules: tuple[str, ...] = ("Default", "Email Security")
    instant: bool = False

    @property
    def reported_version(self) -> str:
        """
        The version C{GET /version} reports.
        """
        return self.version or self.shape.version

    def dlp_for(self, rule: str) -> bool:
        """
        Whether C{rule} runs Proactive DLP.
        """
        return self.dlp_rules is None or rule in self.dlp_rules
