"""
Tests for the emulator's instant stand-in (C{EmulatorConfig.instant},
C{mdcore-emulator --instant}): a Core for benchmarks that answers at once
without reading the upload, and otherwise speaks Core's API. Also the
request and connection counters of the emulator's site.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mdgateway.emulator.app import EmulatorConfig
from mdgateway.emulator.detect import EICAR
from tests.coresamples import CARD, docx, zip_of
from tests.test_core_emulator import Wire, temp_dir


class InstantTests(SynchronousTestCase):
    """
    Every upload is a clean file, complete at the first answer.
    """

    def setUp(self) -> None:
        self.workdir = temp_dir(self)
        self.wire = Wire(
            EmulatorConfig(instant=True, latency=30.0, postprocess=5.0),
            workdir=self.workdir,
        )

    def test_complete_at_first_poll(self) -> None:
        """
        C{POST /file} gives a C{data_id} whose first poll is the complete
        clean result, with no timer left running (latency and
        post-processing do not apply).
        """
        wire = self.wire
        data_id = wire.upload(b"x" * 1234, "a.txt")
        self.assertEqual(wire.clock.getDelayedCalls(), [])
        doc = wire.result(data_id).json()
        process = doc["process_info"]
        self.assertEqual(
            (process["progress_percentage"], process["result"]), (100, "Allowed")
        )
        self.assertEqual(process["blocked_reason"], "")
        scan = doc["scan_results"]
        self.assertEqual(
            (scan["progress_percentage"], scan["scan_all_result_i"]), (100, 0)
        )
        self.assertEqual(scan["scan_all_result_a"], "No Threat Detected")
        info = doc["file_info"]
        self.assertEqual((info["display_name"], info["file_size"]), ("a.txt", 1234))
        self.assertEqual(info["sha256"], "")
        self.assertNotIn("dlp_info", doc)
        self.assertNotIn("extracted_files", doc)

    def test_content_not_read(self) -> None:
        """
        What the content would have given (EICAR, an archive, a card
        number, a document Deep CDR sanitizes) does not count: all clean,
        nothing extracted, no converted file, no hash to look up.
        """
        wire = self.wire
        for body, name in (
            (EICAR, "e.com"),
            (zip_of({"eicar.com": EICAR}), "e.zip"),
            (b"card " + CARD, "c.txt"),
            (docx(macros=True), "m.docm"),
        ):
            data_id = wire.upload(body, name)
            doc = wire.result(data_id).json()
            self.assertEqual(doc["process_info"]["result"], "Allowed", name)
            self.assertEqual(doc["scan_results"]["scan_all_result_i"], 0, name)
            post = doc["process_info"]["post_processing"]
            self.assertEqual(post["actions_ran"], "", name)
            converted = wire.request("GET", f"/file/converted/{data_id}")
            self.assertEqual(converted.status, 404, name)
        self.assertEqual(wire.emulator.results, 4)
        lookup = wire.request("GET", "/hash/" + "0" * 64).json()
        self.assertEqual(list(lookup.values()), ["Not Found"])

    def test_sync_answers_at_once(self) -> None:
        """
        C{POST /file/sync} answers 200 with the complete result at once.
        """
        answer = self.wire.request(
            "POST", "/file/sync", b"hello", [("filename", "a.txt")]
        )
        self.assertEqual(answer.status, 200)
        doc = answer.json()
        self.assertEqual(doc["process_info"]["progress_percentage"], 100)
        self.assertEqual(doc["process_info"]["result"], "Allowed")

    def test_limits_still_apply(self) -> None:
        """
        The API's refusals are Core's as before: an empty upload is 422,
        a full queue (size 0) 503.
        """
        wire = self.wire
        empty = wire.request("POST", "/file", b"", [("filename", "e")])
        self.assertEqual(empty.status, 422)
        full = Wire(EmulatorConfig(instant=True, queue_size=0), workdir=self.workdir)
        busy = full.request("POST", "/file", b"x", [("filename", "a")])
        self.assertEqual(busy.status, 503)

    def test_scanning_emulator_unchanged(self) -> None:
        """
        Without C{instant}, the same EICAR upload is still found and
        blocked (a positive control for the tests above).
        """
        wire = Wire(EmulatorConfig(), workdir=self.workdir)
        data_id = wire.upload(EICAR, "e.com")
        doc = wire.final(data_id)
        self.assertEqual(doc["process_info"]["result"], "Blocked")


class CounterTests(SynchronousTestCase):
    """
    The site counts every HTTP request and every connection.
    """

    def test_requests_and_connections(self) -> None:
        """
        Each request on its own connection counts one of each; requests
        refused before their route (a wrong method) count too.
        """
        wire = Wire(EmulatorConfig(), workdir=temp_dir(self))
        wire.request("GET", "/version")
        wire.request("DELETE", "/version")
        data_id = wire.upload(b"x", "a.txt")
        wire.result(data_id)
        counters = wire.emulator.counters
        self.assertEqual((counters["requests"], counters["connections"]), (4, 4))
        self.assertEqual(counters["version"], 1)
