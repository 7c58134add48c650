"""
Conformance of the Core emulator to the documented shapes of Core's answers
(C{../shared/reference/metadefender-core-api.md}): every result document,
at every stage of its processing, for every verdict the emulator produces,
in the shape of each Core version profile (v4, v5, early 4.x); the error
bodies and status codes of every endpoint; the information endpoints; and
the progress semantics clients depend on. The gateway's own parser reads
every document too, so a shape the client cannot read fails here.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.emulator.app import EmulatorConfig
from mdgateway.emulator.config import SHAPES
from mdgateway.emulator.detect import CDR_FAIL_MARKER, FAIL_MARKER, NOT_SCANNED_MARKER
from mdgateway.scan.verdict import DocumentState, document_state, parse_verdict
from tests.coresamples import (
    CARD,
    EICAR,
    docx,
    encrypted_zip,
    gzipped,
    nested_zip,
    pdf,
    tar_of,
    zip_of,
)
from tests.coreshapes import check_result
from tests.test_core_emulator import Answer, Wire

#: One upload per verdict the emulator can give: name -> (bytes, file name,
#: extra config, expected scan_all_result_i, expected result).
CASES: dict[str, tuple[bytes, str, dict[str, Any], int, str]] = {
    "clean text": (b"hello", "a.txt", {}, 0, "Allowed"),
    "clean binary": (b"\x00\x01\x02\x03", "a.bin", {}, 0, "Allowed"),
    "infected": (EICAR, "eicar.com", {}, 1, "Blocked"),
    "failed": (FAIL_MARKER, "f.txt", {}, 3, "Blocked"),
    "not scanned": (NOT_SCANNED_MARKER, "n.txt", {}, 10, "Blocked"),
    "encrypted archive": (
        encrypted_zip({"a.txt": b"x"}, b"pw"),
        "e.zip",
        {},
        12,
        "Blocked",
    ),
    "dlp blocked": (b"card " + CARD, "c.txt", {}, 20, "Blocked"),
    "dlp redacted": (b"card " + CARD, "c.txt", {"dlp_block": False}, 20, "Allowed"),
    "sanitized pdf": (pdf(), "r.pdf", {}, 0, "Allowed"),
    "sanitized docm": (docx(macros=True), "m.docm", {}, 0, "Allowed"),
    "sanitization failed": (pdf(CDR_FAIL_MARKER), "x.pdf", {}, 0, "Allowed"),
    "zip with eicar": (
        zip_of({"e.com": EICAR, "a.txt": b"a"}),
        "z.zip",
        {},
        1,
        "Blocked",
    ),
    "clean zip": (zip_of({"a.txt": b"a"}), "z.zip", {}, 0, "Allowed"),
    "nested zip": (nested_zip(EICAR, 3), "n.zip", {}, 1, "Blocked"),
    "tar.gz": (tar_of({"e.com": EICAR}, "w:gz"), "t.tgz", {}, 1, "Blocked"),
    "gzip": (gzipped(b"plain"), "p.txt.gz", {}, 0, "Allowed"),
    "too deep": (nested_zip(b"x", 4), "d.zip", {"archive_depth": 2}, 9, "Blocked"),
    "too many files": (
        zip_of({f"{i}": b"x" for i in range(3)}),
        "m.zip",
        {"archive_files": 2},
        14,
        "Blocked",
    ),
    "too big inside": (
        zip_of({"b": b"x" * 300}),
        "b.zip",
        {"archive_size": 100},
        13,
        "Blocked",
    ),
}


def stages(wire: Wire, data_id: str) -> list[dict[str, Any]]:
    """
    Every document a client polling C{data_id} sees, from the first poll
    to the complete one.
    """
    docs = [wire.result(data_id).json()]
    latency = wire.emulator.config.latency
    for _ in range(4):
        wire.clock.advance(latency / 4)
        docs.append(wire.result(data_id).json())
    for _ in range(3):
        docs.append(wire.result(data_id).json())
        if docs[-1]["process_info"]["progress_percentage"] == 100:
            break
    return docs


def check_with_client(doc: dict[str, Any]) -> None:
    """
    The gateway's parser reads the document and classifies it as Core's
    progress rule says.
    """
    state = document_state(doc)
    done = (
        doc["process_info"]["progress_percentage"] == 100
        and doc["process_info"]["result"] != "Processing"
    )
    assert state is (DocumentState.COMPLETE if done else DocumentState.IN_PROGRESS)
    if done:
        verdict = parse_verdict(doc, "http://core")
        assert verdict.result == doc["process_info"]["result"]


@pytest.mark.parametrize("profile", list(SHAPES))
@pytest.mark.parametrize("case", list(CASES))
def test_result_documents(profile: str, case: str) -> None:
    """
    Every poll of every case, in each version profile, has the documented
    shape (keys, presence rules, types, vocabularies), is sorted, is read
    by the gateway's parser, and ends in the expected verdict.
    """
    data, name, extra, code, result = CASES[case]
    config = EmulatorConfig(latency=2.0, shape=SHAPES[profile], **extra)
    wire = Wire(config)
    try:
        data_id = wire.upload(data, name)
        seen = stages(wire, data_id)
        for doc in seen:
            check_result(doc, profile)
            check_with_client(doc)
            raw = wire.result(data_id).body
            assert raw == json.dumps(json.loads(raw), sort_keys=True).encode()
        final = seen[-1]
        assert final["scan_results"]["scan_all_result_i"] == code
        assert final["process_info"]["result"] == result
        for child in final.get("extracted_files", {}).get("files_in_archive", []):
            check_result(wire.result(child["data_id"]).json(), profile)
        found = wire.request("GET", f"/hash/{final['file_info']['sha256']}").json()
        check_result(found, profile)
    finally:
        wire.emulator.close()


@pytest.mark.parametrize("profile", list(SHAPES))
def test_cancelled_document(profile: str) -> None:
    """
    A cancelled file ends Canceled (19), Blocked, its unfinished engines
    reported as cancelled.
    """
    wire = Wire(EmulatorConfig(latency=2.0, shape=SHAPES[profile]))
    try:
        data_id = wire.upload(b"hello")
        wire.clock.advance(1.0)  # the first of two engines has finished
        wire.request("POST", f"/file/{data_id}/cancel")
        doc = wire.result(data_id).json()
        check_result(doc, profile)
        assert doc["scan_results"]["scan_all_result_i"] == 19
        assert doc["process_info"]["result"] == "Blocked"
        results = sorted(
            e["scan_result_i"] for e in doc["scan_results"]["scan_details"].values()
        )
        assert results == [0, 19]
    finally:
        wire.emulator.close()


class ProgressTests(SynchronousTestCase):
    """
    How progress looks while a file is processing, per version.
    """

    def docs(self, profile: str) -> list[dict[str, Any]]:
        wire = Wire(EmulatorConfig(latency=2.0, shape=SHAPES[profile]))
        self.addCleanup(wire.emulator.close)
        return stages(wire, wire.upload(b"hello"))

    def test_v4(self) -> None:
        """
        While processing: code 255 "In Progress", C{total_time} 0, only the
        engines that finished listed (and counted in C{total_avs}); then
        C{scan_results} reaches 100 one poll before C{process_info}; both
        percentages never go down.
        """
        docs = self.docs("v4")
        first = docs[0]["scan_results"]
        self.assertEqual(
            (first["scan_all_result_i"], first["scan_all_result_a"]),
            (255, "In Progress"),
        )
        self.assertEqual((first["total_time"], first["scan_details"]), (0, {}))
        self.assertEqual(first["total_avs"], 0)
        halfway = [d for d in docs if len(d["scan_results"]["scan_details"]) == 1]
        self.assertTrue(halfway)
        self.assertEqual(halfway[0]["scan_results"]["total_avs"], 1)
        scanned = [
            d
            for d in docs
            if d["scan_results"]["progress_percentage"] == 100
            and d["process_info"]["progress_percentage"] < 100
        ]
        self.assertEqual(len(scanned), 1)
        self.assertEqual(scanned[0]["process_info"]["result"], "Processing")
        self.assertEqual(docs[-1]["process_info"]["progress_percentage"], 100)
        for key in ("scan_results", "process_info"):
            percents = [d[key]["progress_percentage"] for d in docs]
            self.assertEqual(percents, sorted(percents))

    def test_early_v4(self) -> None:
        """
        The early 4.x servers: code 0 "Clean" and C{total_time} -1 while
        processing, no engine ids, the minimal C{process_info} of the 2016
        captures, "Clean" when done.
        """
        docs = self.docs("early-v4")
        first = docs[0]
        self.assertEqual(first["scan_results"]["scan_all_result_i"], 0)
        self.assertEqual(first["scan_results"]["scan_all_result_a"], "Clean")
        self.assertEqual(first["scan_results"]["total_time"], -1)
        self.assertEqual(
            set(first["process_info"]),
            {
                "blocked_reason",
                "file_type_skipped_scan",
                "profile",
                "progress_percentage",
                "result",
                "user_agent",
            },
        )
        final = docs[-1]
        self.assertEqual(final["scan_results"]["scan_all_result_a"], "Clean")
        (engine, *_) = final["scan_results"]["scan_details"].values()
        self.assertEqual(
            set(engine),
            {"def_time", "location", "scan_result_i", "scan_time", "threat_found"},
        )
        self.assertNotIn("post_processing", final["process_info"])

    def test_v5(self) -> None:
        """
        v5: C{blocked_reasons} instead of C{verdicts}, no 4.18-only fields.
        """
        final = self.docs("v5")[-1]["process_info"]
        self.assertEqual(final["blocked_reasons"], [])
        for key in ("verdicts", "username", "queue_time", "outdated_data"):
            self.assertNotIn(key, final)


@attrs.frozen
class ErrorCase:
    """
    One request and the exact answer Core documents for it.
    """

    name: str
    method: str
    path: str
    status: int
    body: Callable[[str], object]
    upload: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    config: dict[str, Any] = attrs.Factory(dict)
    chunked: bool = False


_UNKNOWN = "f" * 32
_DENIED = {"err": "Access denied"}
ERRORS = (
    ErrorCase(
        "no length",
        "POST",
        "/file",
        411,
        lambda _: {"err": "Missing Content-Length header."},
        b"x",
        chunked=True,
    ),
    ErrorCase("empty", "POST", "/file", 422, lambda _: {"err": "File is empty."}, b""),
    ErrorCase(
        "busy",
        "POST",
        "/file",
        503,
        lambda _: {"err": "Server is too busy. Try again later."},
        b"x",
        config={"queue_size": 0},
    ),
    ErrorCase(
        "too big",
        "POST",
        "/file",
        500,
        lambda _: {
            "err": "Failed to request scan. File size exceeded the maximum size"
            " permitted by your configuration."
        },
        b"xx",
        config={"max_file_size": 1},
    ),
    ErrorCase(
        "bad callback",
        "POST",
        "/file",
        400,
        lambda _: {"err": "Callback url is invalid."},
        b"x",
        headers=(("callbackurl", "nonsense"),),
    ),
    ErrorCase(
        "both body and link",
        "POST",
        "/file",
        400,
        lambda _: {"err": "Both body data and download link were given."},
        b"x",
        headers=(("downloadfrom", "http://h/f"),),
    ),
    ErrorCase(
        "upload denied",
        "POST",
        "/file",
        400,
        lambda _: _DENIED,
        b"x",
        config={"apikey": "k"},
    ),
    ErrorCase(
        "result denied",
        "GET",
        "/file/x",
        403,
        lambda _: _DENIED,
        config={"apikey": "k"},
    ),
    ErrorCase(
        "download denied",
        "GET",
        "/file/converted/x",
        405,
        lambda _: _DENIED,
        config={"apikey": "k"},
    ),
    ErrorCase(
        "cancel denied",
        "POST",
        "/file/x/cancel",
        405,
        lambda _: _DENIED,
        config={"apikey": "k"},
    ),
    ErrorCase(
        "logout denied",
        "POST",
        "/logout",
        403,
        lambda _: {"response": "Access denied"},
        b"",
        config={"apikey": "k"},
    ),
    ErrorCase(
        "unknown id", "GET", f"/file/{_UNKNOWN}", 404, lambda i: {i: "Not Found"}
    ),
    ErrorCase(
        "unknown id as 200",
        "GET",
        f"/file/{_UNKNOWN}",
        200,
        lambda i: {i: "Not Found"},
        config={"not_found_status": 200},
    ),
    ErrorCase(
        "unknown hash", "GET", "/hash/ABC123", 200, lambda _: {"ABC123": "Not Found"}
    ),
    ErrorCase(
        "no converted file",
        "GET",
        f"/file/converted/{_UNKNOWN}",
        404,
        lambda _: {"err": "File could not be found"},
    ),
    ErrorCase(
        "cancel unknown",
        "POST",
        f"/file/{_UNKNOWN}/cancel",
        404,
        lambda _: {"err": "Not found"},
    ),
    ErrorCase(
        "bad login",
        "POST",
        "/login",
        403,
        lambda _: {"err": "Failed to login"},
        b"{}",
    ),
)


@pytest.mark.parametrize("case", ERRORS, ids=lambda c: c.name)
def test_error_bodies(case: ErrorCase) -> None:
    """
    Each documented refusal comes with Core's status, JSON content type and
    exact body.
    """
    wire = Wire(EmulatorConfig(**case.config))
    try:
        answer = wire.request(
            case.method, case.path, case.upload, case.headers, chunked=case.chunked
        )
        assert answer.status == case.status
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == case.body(_UNKNOWN)
    finally:
        wire.emulator.close()


def test_accepted_and_sync_timeout_bodies() -> None:
    """
    An accepted upload answers C{{"data_id": <32 hex>}}; a sync upload past
    its timeout 408 with the same shape; a cancel C{{"<id>": "cancelled"}}.
    """
    wire = Wire(EmulatorConfig(latency=10.0, sync_timeout=1.0))
    try:
        accepted = wire.request("POST", "/file", b"x")
        assert accepted.status == 200
        (data_id,) = accepted.json().values()
        assert list(accepted.json()) == ["data_id"] and len(data_id) == 32
        transport = wire.send("POST", "/file/sync", b"y")
        wire.clock.advance(1.0)
        late = wire.answer(transport)
        assert late.status == 408 and list(late.json()) == ["data_id"]
        cancelled = wire.request("POST", f"/file/{data_id}/cancel")
        assert cancelled.json() == {data_id: "cancelled"}
    finally:
        wire.emulator.close()


def _keys(answer: Answer) -> Any:
    return answer.json()


def test_information_endpoints() -> None:
    """
    C{/version}, C{/file/rules}, C{/stat/engines}, C{/stat/nodes} and
    C{/login} have the documented keys and types.
    """
    wire = Wire()
    try:
        version = wire.request("GET", "/version").json()
        assert set(version) == {"product_id", "version"}
        assert version["product_id"] == "MSCL"
        rules = wire.request("GET", "/file/rules").json()
        for rule in rules:
            assert set(rule) == {"max_file_size", "name"}
            assert isinstance(rule["max_file_size"], int)
        for engine in wire.request("GET", "/stat/engines").json():
            assert set(engine) == {
                "active", "def_time", "download_progress", "download_time",
                "eng_id", "eng_name", "eng_type", "eng_ver", "engine_type",
                "state", "type",
            }  # fmt: skip
            assert engine["engine_type"] in ("av", "archive", "filetype")
        (node,) = wire.request("GET", "/stat/nodes").json()
        assert set(node) == {"external_nodes_allowed", "max_node_count", "statuses"}
        (status,) = node["statuses"]
        assert set(status) == {
            "address", "cpu_cores", "engines", "free_disk_space", "id", "issues",
            "load", "os", "scan_queue", "total_memory", "version",
        }  # fmt: skip
        login = wire.request("POST", "/login", b'{"user": "a", "password": "b"}')
        (session,) = login.json().values()
        assert list(login.json()) == ["session_id"] and len(session) == 32
    finally:
        wire.emulator.close()


def test_readyz_only_in_v5() -> None:
    """
    C{/readyz} exists in the v5 profile only, with its documented keys.
    """
    wire = Wire(EmulatorConfig(shape=SHAPES["v5"]))
    try:
        ready = wire.request("GET", "/readyz")
        assert ready.status == 200
        assert set(ready.json()) == {
            "database",
            "engines",
            "license",
            "number_active_av_engines",
            "scan_queue",
        }
        wire.emulator.config = EmulatorConfig()
        assert wire.request("GET", "/readyz").status == 404
    finally:
        wire.emulator.close()


def test_clean_verdicts_and_presence() -> None:
    """
    The presence rules of a plain clean file in the default profile:
    verdicts C{["No Threat Detected"]}, C{dlp_info} (DLP ran on text),
    C{post_processing} without C{sanitization_details} (Deep CDR did not
    run), no C{extracted_files}; a binary file has no C{dlp_info}.
    """
    wire = Wire()
    try:
        text = wire.final(wire.upload(b"hello", "a.txt"))
        assert text["process_info"]["verdicts"] == ["No Threat Detected"]
        assert "dlp_info" in text and "extracted_files" not in text
        assert "sanitization_details" not in text["process_info"]["post_processing"]
        binary = wire.final(wire.upload(b"\x00\x01", "a.bin"))
        assert "dlp_info" not in binary
        stored = zip_of({"a": b"x"}, zipfile.ZIP_STORED)
        assert "extracted_files" in wire.final(wire.upload(stored, "a.zip"))
    finally:
        wire.emulator.close()


def _mutations() -> dict[str, Callable[[dict[str, Any]], None]]:
    def clean_verdicts(doc: dict[str, Any]) -> None:
        doc["process_info"]["verdicts"] = []

    def dlp_everywhere(doc: dict[str, Any]) -> None:
        doc["dlp_info"] = {"verdict": 0}

    def unmasked_spaces(doc: dict[str, Any]) -> None:
        doc["dlp_info"]["hits"]["ccn"]["hits"][0]["hit"] = "XXXX XXXX XXXX 1111"

    def claims_redaction(doc: dict[str, Any]) -> None:
        doc["dlp_info"]["redact"]["result"] = "redacted"

    def unfinished_engine(doc: dict[str, Any]) -> None:
        doc["scan_results"]["scan_details"]["X"] = {
            "def_time": "2016-06-30T11:19:54.161Z",
            "eng_id": "x",
            "location": "local",
            "scan_result_i": 255,
            "scan_time": 0,
            "threat_found": "",
            "wait_time": 0,
        }
        doc["scan_results"]["total_avs"] += 1

    def arrays_for_actions(doc: dict[str, Any]) -> None:
        doc["process_info"]["post_processing"]["actions_ran"] = ["Sanitized"]

    def in_progress_minus_one(doc: dict[str, Any]) -> None:
        doc["scan_results"]["total_time"] = -1

    return {
        "clean verdicts empty": clean_verdicts,
        "dlp_info malformed": dlp_everywhere,
        "masked hit keeps spaces": unmasked_spaces,
        "redaction claimed": claims_redaction,
        "unfinished engine listed": unfinished_engine,
        "actions as array": arrays_for_actions,
        "total_time -1 in v4": in_progress_minus_one,
    }


@pytest.mark.parametrize("mutation", list(_mutations()))
def test_checker_catches_known_deviations(mutation: str) -> None:
    """
    The shape checker has teeth: each deviation the issue found in the old
    emulator, applied to a conforming document, is rejected.
    """
    wire = Wire(EmulatorConfig(latency=2.0))
    try:
        if mutation in ("unfinished engine listed", "total_time -1 in v4"):
            doc = wire.result(wire.upload(b"hello")).json()
        elif mutation == "actions as array":
            doc = wire.final(wire.upload(pdf(), "a.pdf"))
        elif mutation == "clean verdicts empty":
            doc = wire.final(wire.upload(b"hello"))
        else:
            doc = wire.final(wire.upload(b"card " + CARD, "c.txt"))
        check_result(doc)  # conforming as served
        _mutations()[mutation](doc)
        with pytest.raises(AssertionError):
            check_result(doc)
    finally:
        wire.emulator.close()
