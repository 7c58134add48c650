"""
Tests for the MetaDefender Core emulator's API (L{mdgateway.emulator.app}
and its resource tree) and its content checks (L{mdgateway.emulator.detect}).
Archives, DLP and Deep CDR are in C{test_core_emulator_content}; the shapes
of every answer in C{test_core_conformance}; the twist plugin in
C{test_core_emulator_tap}.

Most tests drive the real C{twisted.web} tree synchronously: raw HTTP bytes
into an C{HTTPChannel} over a L{StringTransport}, time from a L{Clock}.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.emulator.app import (
    DEFAULT_SANITIZE_TYPES,
    CoreEmulator,
    EmulatorConfig,
    build_site,
)
from mdgateway.emulator.detect import (
    EICAR,
    FAIL_MARKER,
    NOT_SCANNED_MARKER,
    SANITIZED_MARKER,
    copy_masked,
    luhn_valid,
    mask_card,
    scan_stream,
)
from tests.coresamples import CARD, docx, pdf, zip_of

REPO_ROOT = Path(__file__).resolve().parent.parent


def temp_dir(case: SynchronousTestCase) -> str:
    """
    A temporary directory removed after the test (not under the cwd).
    """
    path = tempfile.mkdtemp(prefix="mdgw-test-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(raw: bytes) -> Answer:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        rest = body
    return Answer(status, headers, rest)


def plain_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "hello")
    return buffer.getvalue()


class Wire:
    """
    Speaks raw HTTP/1.1 to the emulator's site, synchronously.
    """

    def __init__(
        self, config: EmulatorConfig | None = None, workdir: str | None = None
    ) -> None:
        self.clock = Clock()
        self.emulator = CoreEmulator(self.clock, config, workdir=workdir, seed=1)
        self.site = build_site(self.emulator, access_log=False, reactor=self.clock)
        self.transports: list[StringTransport] = []

    def rebuild(self) -> None:
        """
        Serve C{self.emulator} again (after replacing it).
        """
        self.site = build_site(self.emulator, access_log=False, reactor=self.clock)

    def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Sequence[tuple[str, str]] = (),
        *,
        chunked: bool = False,
    ) -> StringTransport:
        """
        Send one request on a new connection and run what is due; return
        the transport the answer is (or will be) written to.
        """
        lines = [f"{method} {path} HTTP/1.1", "Host: core", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers]
        payload = body or b""
        if chunked:
            lines.append("Transfer-Encoding: chunked")
            payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
        elif body is not None:
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + payload
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert channel is not None
        transport = StringTransport()
        self.transports.append(transport)
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        self.turns()
        return transport

    def answer(self, transport: StringTransport) -> Answer:
        """
        The answer written to C{transport} so far.
        """
        self.turns()
        return parse_response(transport.value())

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Sequence[tuple[str, str]] = (),
        *,
        chunked: bool = False,
    ) -> Answer:
        transport = self.send(method, path, body, headers, chunked=chunked)
        return parse_response(transport.value())

    def turns(self) -> None:
        """
        Run what is due now (what the reactor would do next), repeatedly.
        """
        for _ in range(1000):
            now = self.clock.seconds()
            if not any(c.getTime() <= now for c in self.clock.getDelayedCalls()):
                return
            self.clock.advance(0)

    def upload(
        self, body: bytes, filename: str = "file.txt", headers: Sequence[Any] = ()
    ) -> str:
        answer = self.request("POST", "/file", body, [("filename", filename), *headers])
        assert answer.status == 200, answer
        data_id: str = answer.json()["data_id"]
        return data_id

    def result(self, data_id: str, headers: Sequence[Any] = ()) -> Answer:
        return self.request("GET", f"/file/{data_id}", headers=headers)

    def final(self, data_id: str) -> dict[str, Any]:
        """
        Poll until C{process_info} reaches 100 (advancing past the latency).
        """
        self.clock.advance(self.emulator.config.latency)
        self.turns()
        for _ in range(5):
            doc: dict[str, Any] = self.result(data_id).json()
            if doc["process_info"]["progress_percentage"] == 100:
                return doc
        raise AssertionError("never complete")


class ContentScanTests(SynchronousTestCase):
    """
    L{scan_stream} and L{write_converted}: what the emulator detects.
    """

    def test_luhn(self) -> None:
        """
        Luhn-valid numbers pass, a changed digit fails.
        """
        self.assertTrue(luhn_valid("4111111111111111"))
        self.assertTrue(luhn_valid("5500005555555559"))
        self.assertFalse(luhn_valid("4111111111111112"))

    def test_hashes_and_size(self) -> None:
        """
        The stream is hashed and measured in one pass.
        """
        found = scan_stream(io.BytesIO(b"abc"))
        self.assertEqual(found.size, 3)
        self.assertEqual(
            found.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        )
        self.assertEqual(found.md5, "900150983cd24fb0d6963f7d28e17f72")

    def test_patterns_across_reads(self) -> None:
        """
        EICAR and a card number split across two reads are found, and the
        card exactly once.
        """
        data = b"x" * 50 + EICAR + b" pay " + CARD + b" end"
        found = scan_stream(io.BytesIO(data), chunk_size=60)
        self.assertTrue(found.infected)
        (card,) = found.cards
        self.assertEqual(card.offset, data.index(CARD))
        self.assertEqual(card.masked, b"XXXXXXXXXXXXXXX1111")

    def test_mask_card(self) -> None:
        """
        Masking keeps the length and the last four digits, and masks the
        separators too, as Core shows a hit.
        """
        self.assertEqual(mask_card("4111 1111 1111 1938"), "XXXXXXXXXXXXXXX1938")
        self.assertEqual(mask_card("4111-1111-1111-1111"), "XXXXXXXXXXXXXXX1111")
        self.assertEqual(mask_card("4111111111111111"), "XXXXXXXXXXXX1111")

    def test_non_luhn_and_long_digit_runs(self) -> None:
        """
        A 16-digit number failing Luhn, or digits inside a longer run, is not
        a card.
        """
        found = scan_stream(io.BytesIO(b"id 4111111111111112 and 94111111111111111"))
        self.assertEqual(found.cards, ())

    def test_markers(self) -> None:
        """
        The failure and not-scanned markers are detected.
        """
        self.assertTrue(scan_stream(io.BytesIO(b"a " + FAIL_MARKER)).fail)
        self.assertTrue(scan_stream(io.BytesIO(NOT_SCANNED_MARKER)).not_scanned)

    def test_copy_masked_across_blocks(self) -> None:
        """
        The redacted copy masks the card even when it spans copy blocks.
        """
        data = b"a" * 10 + CARD + b"b" * 10
        found = scan_stream(io.BytesIO(data))
        out = io.BytesIO()
        copy_masked(io.BytesIO(data), out, found.cards, chunk_size=7)
        self.assertEqual(out.getvalue(), b"a" * 10 + b"XXXXXXXXXXXXXXX1111" + b"b" * 10)


class EmulatorApiTests(SynchronousTestCase):
    """
    The emulated endpoints answer like Core v4.
    """

    def setUp(self) -> None:
        self.workdir = temp_dir(self)
        self.wire = Wire(EmulatorConfig(latency=2.0), workdir=self.workdir)
        self.addCleanup(self.wire.emulator.close)

    def test_keys_sorted(self) -> None:
        """
        JSON keys come back sorted at every level.
        """
        data_id = self.wire.upload(b"hello")
        body = self.wire.result(data_id).body
        self.assertEqual(body, json.dumps(json.loads(body), sort_keys=True).encode())

    def test_latency_is_a_timer(self) -> None:
        """
        Processing time is a C{callLater} on the injected clock, not a sleep.
        """
        self.wire.upload(b"hello")
        self.assertEqual(
            [c.getTime() for c in self.wire.clock.getDelayedCalls()], [2.0]
        )
        self.assertEqual(self.wire.emulator.in_flight, 1)

    def test_staged_progress(self) -> None:
        """
        While processing both percentages rise; after the latency the first
        poll shows C{scan_results} at 100 but C{process_info} below 100 and
        still C{Processing}; the next poll is complete.
        """
        wire = self.wire
        data_id = wire.upload(b"hello")
        first = wire.result(data_id).json()
        self.assertEqual(first["scan_results"]["scan_all_result_i"], 255)
        self.assertEqual(first["scan_results"]["scan_all_result_a"], "In Progress")
        self.assertEqual(first["process_info"]["result"], "Processing")
        wire.clock.advance(1.0)
        middle = wire.result(data_id).json()
        self.assertEqual(middle["scan_results"]["progress_percentage"], 50)
        self.assertEqual(middle["process_info"]["progress_percentage"], 45)
        wire.clock.advance(1.0)
        scanned = wire.result(data_id).json()
        self.assertEqual(scanned["scan_results"]["progress_percentage"], 100)
        self.assertEqual(scanned["scan_results"]["scan_all_result_i"], 0)
        self.assertEqual(scanned["process_info"]["progress_percentage"], 90)
        self.assertEqual(scanned["process_info"]["result"], "Processing")
        self.assertNotIn("post_processing", scanned["process_info"])
        done = wire.result(data_id).json()
        self.assertEqual(done["process_info"]["progress_percentage"], 100)
        self.assertEqual(done["process_info"]["result"], "Allowed")
        self.assertEqual(
            done["scan_results"]["scan_all_result_a"], "No Threat Detected"
        )
        self.assertEqual(done["process_info"]["post_processing"]["actions_ran"], "")
        self.assertEqual(done["dlp_info"]["verdict"], 0)

    def test_echoes(self) -> None:
        """
        The C{filename} header is echoed as sent, C{rule} (URL-decoded) as
        the profile, C{user_agent} as sent; the default rule is the first.
        """
        wire = self.wire
        data_id = wire.upload(
            b"hello",
            "a%20b%C3%A9.txt",
            [("rule", "Email%20Security"), ("user_agent", "mdemailsecurity")],
        )
        doc = wire.final(data_id)
        self.assertEqual(doc["file_info"]["display_name"], "a%20b%C3%A9.txt")
        self.assertEqual(doc["process_info"]["profile"], "Email Security")
        self.assertEqual(doc["process_info"]["user_agent"], "mdemailsecurity")
        submission = wire.emulator.submissions[-1]
        self.assertEqual(submission.filename, "a bé.txt")
        self.assertEqual(submission.rule, "Email Security")
        other = wire.final(wire.upload(b"hello"))
        self.assertEqual(other["process_info"]["profile"], "Default")

    def test_eicar(self) -> None:
        """
        EICAR is Infected and Blocked with code 1, and engines name it.
        """
        doc = self.wire.final(self.wire.upload(EICAR, "eicar.com"))
        self.assertEqual(doc["scan_results"]["scan_all_result_i"], 1)
        self.assertEqual(doc["scan_results"]["scan_all_result_a"], "Infected")
        self.assertEqual(doc["process_info"]["result"], "Blocked")
        self.assertEqual(doc["process_info"]["blocked_reason"], "Infected")
        details = doc["scan_results"]["scan_details"].values()
        self.assertTrue(all(e["scan_result_i"] == 1 for e in details))
        self.assertTrue(all(e["threat_found"] for e in details))

    def test_eicar_in_big_upload(self) -> None:
        """
        An upload bigger than one read, with EICAR across the read boundary,
        is still infected (the body is scanned in blocks, not whole).
        """
        body = b"\x00" * ((1 << 20) - 30) + EICAR + b"\x00" * 5000
        doc = self.wire.final(self.wire.upload(body, "big.bin"))
        self.assertEqual(doc["scan_results"]["scan_all_result_i"], 1)
        self.assertEqual(doc["file_info"]["file_size"], len(body))

    def test_card_number(self) -> None:
        """
        A Luhn-valid card number is Sensitive Data Found (20), Blocked, with
        a masked DLP hit that says it was not redacted, and no converted
        file (a blocked file gets no redacted copy).
        """
        wire = self.wire
        data_id = wire.upload(b"card " + CARD + b" thanks", "note.txt")
        doc = wire.final(data_id)
        self.assertEqual(doc["scan_results"]["scan_all_result_i"], 20)
        self.assertEqual(doc["process_info"]["blocked_reason"], "Sensitive Data Found")
        self.assertEqual(doc["process_info"]["result"], "Blocked")
        self.assertEqual(doc["process_info"]["verdicts"], ["Sensitive Data Found"])
        dlp = doc["dlp_info"]
        self.assertEqual(dlp["verdict"], 1)
        self.assertEqual(dlp["redact"]["result"], "not redacted")
        self.assertEqual(dlp["filename"], "")
        (hit,) = dlp["hits"]["ccn"]["hits"]
        self.assertEqual(hit["hit"], "XXXXXXXXXXXXXXX1111")
        self.assertIs(hit["isRedacted"], False)
        self.assertEqual(doc["process_info"]["post_processing"]["actions_ran"], "")
        download = wire.request("GET", f"/file/converted/{data_id}")
        self.assertEqual(download.status, 404)

    def test_card_number_allowed(self) -> None:
        """
        With C{dlp_block} off the file is Allowed, Proactive DLP redacts it
        and names its output C{*_proactive-dlp-processed_by_*}; Deep CDR
        does not claim it (no C{Sanitized}).
        """
        wire = self.wire
        wire.emulator.config = EmulatorConfig(latency=2.0, dlp_block=False)
        data_id = wire.upload(b"card " + CARD + b" thanks", "note.txt")
        doc = wire.final(data_id)
        self.assertEqual(doc["scan_results"]["scan_all_result_i"], 20)
        self.assertEqual(doc["process_info"]["result"], "Allowed")
        self.assertEqual(doc["process_info"]["blocked_reason"], "")
        self.assertEqual(doc["process_info"]["verdicts"], ["Sensitive Data Found"])
        dlp = doc["dlp_info"]
        name = f"note_proactive-dlp-processed_by_OPSWAT_MetaDefender_{data_id}.txt"
        self.assertEqual(dlp["redact"]["result"], "redacted")
        self.assertEqual(dlp["filename"], name)
        self.assertIs(dlp["hits"]["ccn"]["hits"][0]["isRedacted"], True)
        post = doc["process_info"]["post_processing"]
        self.assertEqual((post["actions_ran"], post["converted_destination"]), ("", ""))
        download = wire.request("GET", f"/file/converted/{data_id}")
        self.assertEqual(download.body, b"card XXXXXXXXXXXXXXX1111 thanks")
        self.assertIn(name.replace(" ", "%20"), download.headers["content-disposition"])

    def test_pdf_with_card_not_sanitized(self) -> None:
        """
        A PDF with a card number is a DLP hit, not a Deep CDR result: no
        C{Sanitized}, blocked, and no converted copy.
        """
        doc = self.wire.final(self.wire.upload(pdf(b"card " + CARD), "a.pdf"))
        self.assertEqual(doc["process_info"]["post_processing"]["actions_ran"], "")
        self.assertEqual(doc["process_info"]["result"], "Blocked")
        self.assertNotIn("sanitization_details", doc["process_info"]["post_processing"])

    def test_non_luhn_number(self) -> None:
        """
        A 16-digit number that fails Luhn is clean.
        """
        doc = self.wire.final(self.wire.upload(b"4111 1111 1111 1112", "n.txt"))
        self.assertEqual(doc["scan_results"]["scan_all_result_i"], 0)
        self.assertEqual(doc["dlp_info"]["verdict"], 0)

    def test_sanitized_types(self) -> None:
        """
        A configured type gets C{Sanitized} in C{actions_ran}, a converted
        name like Core's, and the download is the original plus a marker
        with that name in C{Content-Disposition}.
        """
        wire = self.wire
        data_id = wire.upload(b"%PDF-1.4 body", "Q1%20report.PDF")
        doc = wire.final(data_id)
        post = doc["process_info"]["post_processing"]
        expected = f"Q1 report_sanitized_by_OPSWAT_MetaDefender_{data_id}.pdf"
        self.assertEqual(post["actions_ran"], "Sanitized")
        self.assertEqual(post["converted_destination"], expected)
        self.assertEqual(post["converted_to"], "pdf")
        self.assertEqual(
            post["sanitization_details"],
            {"description": "Sanitized successfully.", "details": []},
        )
        self.assertEqual(doc["process_info"]["result"], "Allowed")
        self.assertEqual(doc["file_info"]["file_type"], "application/pdf")
        download = wire.request("GET", f"/file/converted/{data_id}")
        self.assertEqual(download.status, 200)
        self.assertEqual(download.body, b"%PDF-1.4 body" + SANITIZED_MARKER)
        self.assertEqual(download.headers["content-type"], "application/octet-stream")
        self.assertEqual(
            download.headers["content-disposition"],
            f'attachment; filename="Q1%20report_sanitized_by_OPSWAT_MetaDefender_'
            f'{data_id}.pdf"',
        )
        self.assertEqual(
            int(download.headers["content-length"]),
            len(b"%PDF-1.4 body" + SANITIZED_MARKER),
        )

    def test_default_sanitize_types(self) -> None:
        """
        The default types are the Office formats (with and without macros),
        PDF, HTML and RTF.
        """
        self.assertEqual(
            DEFAULT_SANITIZE_TYPES,
            {
                "doc", "docm", "docx", "htm", "html", "pdf", "ppt", "pptm",
                "pptx", "rtf", "xls", "xlsm", "xlsx",
            },
        )  # fmt: skip

    def test_type_from_content(self) -> None:
        """
        Deep CDR goes by the content, not the name: text named C{.docx} is
        not sanitized, a PDF named C{.bin} is (its converted file gets the
        C{pdf} extension).
        """
        wire = self.wire
        text = wire.final(wire.upload(b"just words", "a.docx"))
        self.assertEqual(text["process_info"]["post_processing"]["actions_ran"], "")
        self.assertEqual(text["file_info"]["file_type"], "text/plain")
        data_id = wire.upload(pdf(), "scan.bin")
        post = wire.final(data_id)["process_info"]["post_processing"]
        self.assertEqual(post["actions_ran"], "Sanitized")
        self.assertEqual(post["converted_to"], "pdf")
        self.assertTrue(post["converted_destination"].endswith(".pdf"))

    def test_not_sanitized(self) -> None:
        """
        Other types have no converted file: 404 C{File could not be found};
        so does a sanitized file before processing is done.
        """
        wire = self.wire
        clean = wire.final(wire.upload(b"hello", "a.txt"))
        answer = wire.request("GET", f"/file/converted/{clean['data_id']}")
        self.assertEqual(answer.status, 404)
        self.assertEqual(answer.json(), {"err": "File could not be found"})
        early = wire.upload(docx(), "a.docx")
        self.assertEqual(wire.request("GET", f"/file/converted/{early}").status, 404)

    def test_infected_office_file_not_sanitized(self) -> None:
        """
        An infected file of a sanitized type is blocked, not sanitized.
        """
        stored = zip_of(
            {"[Content_Types].xml": b"<Types/>", "word/document.xml": EICAR},
            zipfile.ZIP_STORED,
        )
        data_id = self.wire.upload(stored, "macro.docx")
        doc = self.wire.final(data_id)
        self.assertEqual(doc["process_info"]["post_processing"]["actions_ran"], "")
        self.assertEqual(doc["process_info"]["result"], "Blocked")
        self.assertEqual(doc["process_info"]["blocked_reason"], "Infected")
        converted = self.wire.request("GET", f"/file/converted/{data_id}")
        self.assertEqual(converted.status, 404)
        self.assertEqual(os.listdir(self.workdir), [])

    def test_failure_markers(self) -> None:
        """
        The fail marker gives Failed (3); the not-scanned marker Not Scanned
        (10).
        """
        failed = self.wire.final(self.wire.upload(FAIL_MARKER))
        self.assertEqual(failed["scan_results"]["scan_all_result_i"], 3)
        skipped = self.wire.final(self.wire.upload(NOT_SCANNED_MARKER))
        self.assertEqual(skipped["scan_results"]["scan_all_result_i"], 10)
        self.assertEqual(skipped["scan_results"]["scan_all_result_a"], "Not Scanned")

    def test_missing_content_length(self) -> None:
        """
        A chunked upload (no Content-Length) is refused with 411.
        """
        answer = self.wire.request("POST", "/file", b"hello", chunked=True)
        self.assertEqual(answer.status, 411)
        self.assertEqual(answer.json(), {"err": "Missing Content-Length header."})

    def test_empty_file(self) -> None:
        """
        A zero-length upload is refused with 422, before the queue limit is
        looked at and without writing anything.
        """
        wire = self.wire
        wire.emulator.config = EmulatorConfig(queue_size=0)
        answer = wire.request("POST", "/file", b"", [("filename", "a.pdf")])
        self.assertEqual(answer.status, 422)
        self.assertEqual(answer.json(), {"err": "File is empty."})
        self.assertEqual(os.listdir(self.workdir), [])

    def test_too_big(self) -> None:
        """
        An upload over the rule's C{max_file_size} gets Core's 500 size
        message, which C{/file/rules} announces.
        """
        wire = self.wire
        wire.emulator.config = EmulatorConfig(max_file_size=10)
        rules = wire.request("GET", "/file/rules").json()
        self.assertEqual(rules[0]["max_file_size"], 10)
        answer = wire.request("POST", "/file", b"x" * 11)
        self.assertEqual(answer.status, 500)
        self.assertEqual(
            answer.json(),
            {
                "err": "Failed to request scan. File size exceeded the maximum"
                " size permitted by your configuration."
            },
        )
        self.assertEqual(wire.request("POST", "/file", b"x" * 10).status, 200)

    def test_link_and_body(self) -> None:
        """
        C{downloadfrom} or C{filepath} together with a body is refused with
        Core's 400; a C{downloadfrom} that is not http(s) too.
        """
        wire = self.wire
        for header in ("downloadfrom", "filepath"):
            answer = wire.request("POST", "/file", b"x", [(header, "http://h/f")])
            self.assertEqual(
                (answer.status, answer.json()),
                (400, {"err": "Both body data and download link were given."}),
            )
        answer = wire.request("POST", "/file", b"", [("downloadfrom", "ftp://h/f")])
        self.assertEqual(answer.status, 400)
        self.assertIn("must start with http", answer.json()["err"])

    def test_queue_full(self) -> None:
        """
        With the queue full C{POST /file} answers 503 "Server is too busy",
        until a file finishes.
        """
        wire = self.wire
        wire.emulator.config = EmulatorConfig(latency=2.0, queue_size=1)
        wire.upload(b"one")
        busy = wire.request("POST", "/file", b"two")
        self.assertEqual(busy.status, 503)
        self.assertEqual(busy.json(), {"err": "Server is too busy. Try again later."})
        wire.clock.advance(2.0)
        self.assertEqual(wire.request("POST", "/file", b"two").status, 200)
        self.assertEqual(wire.emulator.counters["busy"], 1)

    def test_unknown_data_id(self) -> None:
        """
        An unknown id answers 404 C{{"<id>": "Not Found"}}, or 200 with the
        same body when configured.
        """
        answer = self.wire.result("f" * 32)
        self.assertEqual(answer.status, 404)
        self.assertEqual(answer.json(), {"f" * 32: "Not Found"})
        self.wire.emulator.config = EmulatorConfig(not_found_status=200)
        answer = self.wire.result("f" * 32)
        self.assertEqual((answer.status, answer.json()), (200, {"f" * 32: "Not Found"}))

    def test_forget_next(self) -> None:
        """
        C{forget_next} makes a known id answer "Not Found" (and drops it).
        """
        data_id = self.wire.upload(b"hello")
        self.wire.emulator.forget_next(1)
        self.assertEqual(self.wire.result(data_id).status, 404)
        self.assertEqual(self.wire.result(data_id).status, 404)
        self.assertEqual(self.wire.emulator.in_flight, 0)

    def test_hash_lookup(self) -> None:
        """
        C{/hash/} finds a processed file by md5, sha1 or sha256; an unknown
        hash answers 200 C{{"<hash>": "Not Found"}}.
        """
        wire = self.wire
        doc = wire.final(wire.upload(b"hello", "h.txt"))
        for key in ("md5", "sha1", "sha256"):
            digest = doc["file_info"][key]
            found = wire.request("GET", f"/hash/{digest.upper()}")
            self.assertEqual(found.status, 200)
            self.assertEqual(found.json()["data_id"], doc["data_id"])
        missing = wire.request("GET", "/hash/ABCDEF")
        self.assertEqual(
            (missing.status, missing.json()), (200, {"ABCDEF": "Not Found"})
        )

    def test_cancel(self) -> None:
        """
        Cancelling answers C{{"<id>": "cancelled"}} and the result becomes
        Canceled (19); an unknown id is 404.
        """
        wire = self.wire
        data_id = wire.upload(b"hello")
        answer = wire.request("POST", f"/file/{data_id}/cancel")
        self.assertEqual(answer.json(), {data_id: "cancelled"})
        doc = wire.result(data_id).json()
        self.assertEqual(doc["scan_results"]["scan_all_result_i"], 19)
        self.assertEqual(doc["process_info"]["progress_percentage"], 100)
        self.assertEqual(wire.emulator.in_flight, 0)
        unknown = wire.request("POST", "/file/nope/cancel")
        self.assertEqual((unknown.status, unknown.json()), (404, {"err": "Not found"}))

    def test_info_endpoints(self) -> None:
        """
        C{/version}, C{/file/rules}, C{/stat/engines} and C{/stat/nodes}
        answer with Core's shapes; C{scan_queue} counts files processing.
        """
        wire = self.wire
        self.assertEqual(
            wire.request("GET", "/version").json(),
            {"product_id": "MSCL", "version": "4.21.1"},
        )
        rules = wire.request("GET", "/file/rules").json()
        self.assertEqual([r["name"] for r in rules], ["Default", "Email Security"])
        engines = wire.request("GET", "/stat/engines").json()
        self.assertEqual({e["engine_type"] for e in engines}, {"av"})
        wire.upload(b"hello")
        (node,) = wire.request("GET", "/stat/nodes").json()
        self.assertEqual(node["statuses"][0]["scan_queue"], 1)

    def test_login_logout(self) -> None:
        """
        C{/login} with a user gives a session id; without, 403.
        """
        ok = self.wire.request("POST", "/login", b'{"user": "admin", "password": "x"}')
        self.assertEqual(len(ok.json()["session_id"]), 32)
        self.assertEqual(self.wire.request("POST", "/login", b"{}").status, 403)
        out = self.wire.request("POST", "/logout", b"")
        self.assertEqual(out.json(), {"response": "Logout success"})
        self.wire.emulator.config = EmulatorConfig(apikey="k")
        denied = self.wire.request("POST", "/logout", b"", [("apikey", "x")])
        self.assertEqual(
            (denied.status, denied.json()), (403, {"response": "Access denied"})
        )

    def test_unknown_route_and_method(self) -> None:
        """
        Unknown paths are JSON 404s, wrong methods JSON 405s.
        """
        self.assertEqual(self.wire.request("GET", "/nothing").status, 404)
        self.assertEqual(self.wire.request("GET", "/file").status, 405)
        self.assertEqual(self.wire.request("DELETE", "/file/abc").status, 405)

    def test_expiry(self) -> None:
        """
        Finished results and converted files are dropped after the
        retention time.
        """
        wire = self.wire
        wire.emulator.config = EmulatorConfig(latency=2.0, retention=60.0)
        data_id = wire.upload(docx(), "a.docx")
        wire.final(data_id)
        self.assertEqual(os.listdir(self.workdir), [data_id])
        wire.clock.advance(61)
        self.assertEqual(wire.result(data_id).status, 404)
        self.assertEqual(os.listdir(self.workdir), [])
        self.assertEqual(wire.emulator.results, 0)

    def test_max_results(self) -> None:
        """
        No more than C{max_results} finished results are kept.
        """
        wire = self.wire
        wire.emulator.config = EmulatorConfig(max_results=2)
        ids = []
        for i in range(4):
            ids.append(wire.upload(b"file %d" % i))
            wire.clock.advance(1.0)  # processed and post-processed
        wire.upload(b"one more")
        self.assertLessEqual(wire.emulator.results, 3)
        self.assertEqual(wire.result(ids[0]).status, 404)

    def test_fail_next(self) -> None:
        """
        C{fail_next(n)} answers the next n requests with 500.
        """
        self.wire.emulator.fail_next(2)
        self.assertEqual(self.wire.request("GET", "/version").status, 500)
        self.assertEqual(self.wire.request("POST", "/file", b"x").status, 500)
        self.assertEqual(self.wire.request("GET", "/version").status, 200)

    def test_fail_rate(self) -> None:
        """
        C{fail_rate} 1 fails every request; 0 none.
        """
        self.wire.emulator.config = EmulatorConfig(fail_rate=1.0)
        answer = self.wire.request("GET", "/version")
        self.assertEqual(answer.status, 500)
        self.assertIn("err", answer.json())

    def test_stall(self) -> None:
        """
        A stalled poll sends headers and part of the body, then nothing;
        closing the emulator drops the connection.
        """
        wire = self.wire
        data_id = wire.upload(b"hello")
        wire.emulator.stall_next(1)
        answer = wire.result(data_id)
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.body, b'{"data_id": "')
        transport = wire.transports[-1]
        self.assertFalse(transport.disconnecting)
        wire.emulator.close()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(wire.result(data_id).status, 404)


class BlockingScanTests(SynchronousTestCase):
    """
    The content scan of an upload can run off the reactor thread.
    """

    def test_upload_answered_when_scan_done(self) -> None:
        """
        With a C{blocking} runner the upload's scan is handed to it, and
        the HTTP answer (with the data_id of the registered job) is written
        only when the runner's result arrives.
        """
        wire = Wire()
        handed: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

        def runner(function: Any, *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            handed.append((function, args, d))
            return d

        wire.emulator = CoreEmulator(wire.clock, blocking=runner, seed=1)
        self.addCleanup(wire.emulator.close)
        wire.site = build_site(wire.emulator, access_log=False, reactor=wire.clock)
        channel = wire.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        body = b"hello"
        channel.dataReceived(
            b"POST /file HTTP/1.1\r\nHost: core\r\nfilename: a.txt\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.assertEqual(transport.value(), b"")
        # The upload holds its place in the queue while it is examined.
        self.assertEqual(wire.emulator.in_flight, 1)
        ((function, args, d),) = handed
        # The worker got the body itself, not the request's content file
        # (which the request closes if the client goes away).
        args[0].seek(0)
        self.assertEqual(args[0].read(), b"hello")
        d.callback(function(*args))
        self.assertTrue(args[0].closed)
        answer = parse_response(transport.value())
        self.assertEqual(answer.status, 200)
        data_id = answer.json()["data_id"]
        self.assertEqual(wire.emulator.in_flight, 1)  # now processing
        self.assertEqual(wire.final(data_id)["scan_results"]["scan_all_result_i"], 0)

    def test_queue_counts_uploads_being_examined(self) -> None:
        """
        Uploads being examined hold their place in the queue: with
        C{queue_size} 2 and two uploads still in the worker, a third is
        refused with 503 at once (the limit was once checked before the
        examination and counted only after it, letting a burst through).
        """
        wire = Wire()
        handed: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

        def runner(function: Any, *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            handed.append((function, args, d))
            return d

        wire.emulator = CoreEmulator(
            wire.clock, EmulatorConfig(latency=5.0, queue_size=2), blocking=runner
        )
        self.addCleanup(wire.emulator.close)
        wire.rebuild()
        pending = [
            wire.send("POST", "/file", b"one"),
            wire.send("POST", "/file", b"two"),
        ]
        self.assertEqual(len(handed), 2)
        self.assertEqual(wire.request("POST", "/file", b"three").status, 503)
        for function, args, d in handed:
            d.callback(function(*args))
        self.assertEqual([wire.answer(t).status for t in pending], [200, 200])
        self.assertEqual(wire.request("POST", "/file", b"four").status, 503)
        self.assertEqual(wire.emulator.in_flight, 2)

    def test_failed_examination_frees_its_place(self) -> None:
        """
        An examination that fails answers 500 and gives its queue place
        back.
        """
        wire = Wire()

        def runner(function: Any, *args: Any) -> Deferred[Any]:
            return fail(OSError("disk gone"))

        wire.emulator = CoreEmulator(
            wire.clock, EmulatorConfig(queue_size=1), blocking=runner
        )
        self.addCleanup(wire.emulator.close)
        wire.rebuild()
        self.assertEqual(wire.request("POST", "/file", b"x").status, 500)
        self.assertEqual(wire.emulator.in_flight, 0)
        self.flushLoggedErrors(OSError)


class ApiKeyTests(SynchronousTestCase):
    """
    With an API key configured, calls without it are denied as Core does.
    """

    def setUp(self) -> None:
        self.wire = Wire(EmulatorConfig(apikey="s3cret"))
        self.addCleanup(self.wire.emulator.close)

    def test_denied(self) -> None:
        """
        Wrong or missing keys: upload 400, result 403, converted 405, all
        with C{Access denied}.
        """
        wire = self.wire
        for method, path, status in [
            ("POST", "/file", 400),
            ("GET", "/file/abc", 403),
            ("GET", "/file/converted/abc", 405),
            ("GET", "/version", 403),
            ("GET", "/stat/nodes", 403),
        ]:
            answer = wire.request(method, path, b"x", [("apikey", "wrong")])
            self.assertEqual(
                (answer.status, answer.json()), (status, {"err": "Access denied"})
            )
        self.assertEqual(wire.request("GET", "/version").status, 403)

    def test_allowed(self) -> None:
        """
        The right key works as a header, and as C{?apikey=} for downloads.
        """
        wire = self.wire
        key = [("apikey", "s3cret")]
        data_id = wire.upload(docx(), "a.docx", key)
        wire.turns()
        wire.result(data_id, key)
        wire.result(data_id, key)
        answer = wire.request("GET", f"/file/converted/{data_id}?apikey=s3cret")
        self.assertEqual(answer.status, 200)

    def test_key_not_in_repr(self) -> None:
        """
        The configured key is not shown in the config's repr.
        """
        self.assertNotIn("s3cret", repr(self.wire.emulator.config))


class EmulatorCloseTests(SynchronousTestCase):
    """
    L{CoreEmulator.close} leaves nothing behind.
    """

    def test_close(self) -> None:
        """
        Closing cancels timers and removes the temporary directory the
        emulator made for converted files.
        """
        wire = Wire(EmulatorConfig(latency=5.0))
        wire.upload(docx(), "a.docx")
        workdir = wire.emulator._workdir
        assert workdir is not None
        self.assertTrue(os.path.isdir(workdir))
        wire.emulator.close()
        self.assertFalse(os.path.exists(workdir))
        self.assertEqual(
            [c for c in wire.clock.getDelayedCalls() if c.getTime() == 5.0], []
        )
