"""
Tests for L{mdgateway.scan.verdict}: the result parser against every
document shape of the Core v4 reference.
"""

from __future__ import annotations

import copy
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.scan.errors import Condition, error_message
from mdgateway.scan.verdict import (
    DocumentState,
    MalformedResultError,
    Outcome,
    document_state,
    failure_condition,
    filename_from_disposition,
    is_not_found,
    parse_verdict,
    split_actions,
)

URL = "http://core.example:8008"
DATA_ID = "61dffeaa728844adbf49eb090e4ece0e"


def engine(result: int = 0, threat: str = "") -> dict[str, Any]:
    return {
        "def_time": "2024-05-01T10:00:00.000Z",
        "eng_id": "engine_1_linux",
        "location": "local",
        "scan_result_i": result,
        "scan_time": 3,
        "threat_found": threat,
        "wait_time": 1,
    }


def clean() -> dict[str, Any]:
    """
    A complete Allowed result of an AV + CDR + DLP rule, 4.18 style.
    """
    return {
        "data_id": DATA_ID,
        "dlp_info": {
            "certainty": "",
            "errors": {},
            "filename": "",
            "hits": {},
            "metadata_removal": {"result": "not removed"},
            "redact": {"result": "not redacted"},
            "severity": 0,
            "verdict": 0,
            "watermark": {"result": "not added"},
        },
        "file_info": {
            "display_name": "report%20Q1.txt",
            "file_size": 1234,
            "file_type": "text/plain",
            "file_type_description": "ASCII text",
            "md5": "0" * 32,
            "sha1": "0" * 40,
            "sha256": "AB" * 32,
            "upload_timestamp": "2024-05-01T10:00:00.000Z",
        },
        "process_info": {
            "blocked_reason": "",
            "file_type_skipped_scan": False,
            "outdated_data": [],
            "post_processing": {
                "actions_failed": "",
                "actions_ran": "",
                "converted_destination": "",
                "converted_to": "",
                "copy_move_destination": "",
            },
            "processing_time": 40,
            "profile": "Email Security",
            "progress_percentage": 100,
            "queue_time": 2,
            "result": "Allowed",
            "user_agent": "mdemailsecurity",
            "username": "LOCAL/admin",
            "verdicts": [],
        },
        "scan_results": {
            "data_id": DATA_ID,
            "progress_percentage": 100,
            "scan_all_result_a": "No Threat Detected",
            "scan_all_result_i": 0,
            "scan_details": {"Bitdefender": engine(), "ClamAV": engine()},
            "start_time": "2024-05-01T10:00:00.000Z",
            "total_avs": 2,
            "total_time": 40,
        },
    }


def infected() -> dict[str, Any]:
    doc = clean()
    doc["process_info"].update(
        result="Blocked", blocked_reason="Infected", verdicts=["Infected"]
    )
    doc["scan_results"].update(scan_all_result_i=1, scan_all_result_a="Infected")
    doc["scan_results"]["scan_details"]["ClamAV"] = engine(1, "Eicar-Test-Signature")
    doc["scan_results"]["scan_details"]["Bitdefender"] = engine(1, "EICAR-Test-File")
    return doc


def sanitized() -> dict[str, Any]:
    doc = clean()
    name = f"invoice_sanitized_by_OPSWAT_MetaDefender_{DATA_ID}.docx"
    doc["process_info"]["post_processing"] = {
        "actions_failed": "",
        "actions_ran": "Sanitized | PAscript",
        "converted_destination": name,
        "converted_to": "docx",
        "copy_move_destination": "",
    }
    return doc


def dlp() -> dict[str, Any]:
    doc = clean()
    doc["process_info"].update(
        result="Blocked",
        blocked_reason="Sensitive Data Found",
        verdicts=["Sensitive Data Found"],
    )
    doc["scan_results"].update(
        scan_all_result_i=20, scan_all_result_a="Sensitive Data Found"
    )
    doc["dlp_info"] = {
        "certainty": "Very High",
        "errors": {},
        "filename": "card_redacted.txt",
        "hits": {
            "ccn": {
                "display_name": "Credit Card Number",
                "hits": [
                    {
                        "after": " thanks",
                        "before": "card: ",
                        "certainty": "Very High",
                        "certainty_score": 100,
                        "hit": "XXXXXXXXXXXX1111",
                        "isRedacted": True,
                        "severity": 0,
                    }
                ],
            }
        },
        "metadata_removal": {"result": "not removed"},
        "redact": {"result": "redacted"},
        "severity": 0,
        "verdict": 1,
        "watermark": {"result": "not added"},
    }
    return doc


def encrypted() -> dict[str, Any]:
    doc = clean()
    doc["process_info"].update(result="Blocked", blocked_reason="Encrypted Archive")
    doc["scan_results"].update(
        scan_all_result_i=12, scan_all_result_a="Encrypted Archive"
    )
    doc["file_info"]["file_type"] = "application/zip"
    return doc


def archive_with_infected_child() -> dict[str, Any]:
    doc = infected()
    doc["file_info"]["display_name"] = "bundle.zip"
    doc["extracted_files"] = {
        "files_extracted_count": 2,
        "first_index": 0,
        "page_size": 50,
        "worst_data_id": "b" * 32,
        "files_in_archive": [
            {
                "data_id": "a" * 32,
                "detected_by": 0,
                "display_name": "bundle.zip/readme.txt",
                "file_size": 10,
                "file_type": "text/plain",
                "file_type_description": "ASCII text",
                "process_info": {
                    "blocked_reason": "",
                    "progress_percentage": 100,
                    "result": "Allowed",
                },
                "progress_percentage": 100,
                "scan_all_result_a": "No Threat Detected",
                "scan_all_result_i": 0,
                "scanned_with": 2,
            },
            {
                "data_id": "b" * 32,
                "detected_by": 2,
                "display_name": "bundle.zip/inner/eicar.com",
                "file_size": 68,
                "file_type": "text/plain",
                "file_type_description": "EICAR virus test files",
                "progress_percentage": 100,
                "scan_all_result_i": 1,
                "scanned_with": 2,
            },
        ],
    }
    return doc


def in_progress(scan: int, process: int) -> dict[str, Any]:
    doc = clean()
    del doc["dlp_info"]
    del doc["process_info"]["post_processing"]
    doc["process_info"].update(progress_percentage=process, result="Processing")
    doc["scan_results"].update(
        progress_percentage=scan,
        scan_all_result_i=0 if scan == 100 else 255,
        scan_all_result_a="No Threat Detected" if scan == 100 else "In Progress",
    )
    return doc


class DocumentStateTests(SynchronousTestCase):
    """
    L{document_state} tells complete, in-progress and not-found apart.
    """

    def test_complete(self) -> None:
        """
        A result with C{process_info.progress_percentage} 100 is complete.
        """
        self.assertIs(document_state(clean()), DocumentState.COMPLETE)

    def test_scan_done_but_processing_not(self) -> None:
        """
        C{scan_results} at 100 while C{process_info} is below 100 is still in
        progress: Deep CDR and DLP have not finished.
        """
        self.assertIs(document_state(in_progress(100, 90)), DocumentState.IN_PROGRESS)

    def test_early_progress(self) -> None:
        """
        A document with both percentages low is in progress.
        """
        self.assertIs(document_state(in_progress(30, 27)), DocumentState.IN_PROGRESS)

    def test_hundred_but_still_processing(self) -> None:
        """
        100 percent with C{result} still C{Processing} is not complete.
        """
        doc = clean()
        doc["process_info"]["result"] = "Processing"
        self.assertIs(document_state(doc), DocumentState.IN_PROGRESS)

    def test_without_process_info(self) -> None:
        """
        Without C{process_info} (AV-only, early 4.x) C{scan_results} decides.
        """
        doc = in_progress(100, 90)
        del doc["process_info"]
        self.assertIs(document_state(doc), DocumentState.COMPLETE)
        doc["scan_results"]["progress_percentage"] = 50
        self.assertIs(document_state(doc), DocumentState.IN_PROGRESS)

    def test_not_found_shapes(self) -> None:
        """
        C{{"<id>": "Not Found"}} in any case is the not-found shape; a hash
        key works too.
        """
        self.assertIs(document_state({DATA_ID: "Not Found"}), DocumentState.NOT_FOUND)
        self.assertIs(document_state({"ABCDEF": "Not found"}), DocumentState.NOT_FOUND)
        self.assertTrue(is_not_found({"123": "not found"}))

    def test_not_found_needs_single_value(self) -> None:
        """
        A real result, or an object with other keys, is not "not found".
        """
        self.assertFalse(is_not_found(clean()))
        self.assertFalse(is_not_found({"a": "Not Found", "b": "x"}))
        self.assertFalse(is_not_found([DATA_ID]))

    def test_garbage(self) -> None:
        """
        Something that is neither a result nor the not-found shape is
        malformed.
        """
        self.assertRaises(MalformedResultError, document_state, {"err": "x", "y": 1})
        self.assertRaises(MalformedResultError, document_state, [])
        doc = clean()
        doc["process_info"] = "oops"
        self.assertRaises(MalformedResultError, document_state, doc)


class ParseVerdictTests(SynchronousTestCase):
    """
    L{parse_verdict} builds a frozen L{Verdict} from each shape.
    """

    def test_clean(self) -> None:
        """
        A clean result is Allowed with code 0, not sanitized, with both
        engines, the decoded display name and the Core URL.
        """
        verdict = parse_verdict(clean(), URL)
        self.assertIs(verdict.outcome, Outcome.ALLOWED)
        self.assertTrue(verdict.allowed)
        self.assertFalse(verdict.blocked)
        self.assertEqual(verdict.scan_all_result_i, 0)
        self.assertEqual(verdict.scan_all_result_a, "No Threat Detected")
        self.assertEqual(verdict.blocked_reason, "")
        self.assertFalse(verdict.sanitized)
        self.assertFalse(verdict.has_converted_file)
        self.assertEqual(verdict.data_id, DATA_ID)
        self.assertEqual(verdict.core_url, URL)
        self.assertEqual(verdict.display_name, "report Q1.txt")
        self.assertEqual(verdict.sha256, "ab" * 32)
        self.assertEqual(verdict.rule, "Email Security")
        self.assertEqual([e.name for e in verdict.engines], ["Bitdefender", "ClamAV"])
        self.assertEqual(verdict.dlp and verdict.dlp.verdict, 0)
        self.assertEqual(verdict.threats, ())
        self.assertIsNone(failure_condition(verdict))

    def test_old_clean_wording(self) -> None:
        """
        Early 4.x wording C{"Clean"} for code 0 parses the same.
        """
        doc = clean()
        doc["scan_results"]["scan_all_result_a"] = "Clean"
        del doc["dlp_info"]
        verdict = parse_verdict(doc, URL)
        self.assertEqual(verdict.scan_all_result_a, "Clean")
        self.assertIsNone(verdict.dlp)
        self.assertTrue(verdict.allowed)

    def test_infected(self) -> None:
        """
        An infected file is Blocked with reason Infected, code 1, and the
        engines' threat names.
        """
        verdict = parse_verdict(infected(), URL)
        self.assertTrue(verdict.blocked)
        self.assertEqual(verdict.blocked_reason, "Infected")
        self.assertEqual(verdict.scan_all_result_i, 1)
        self.assertEqual(verdict.threats, ("EICAR-Test-File", "Eicar-Test-Signature"))
        self.assertIsNone(failure_condition(verdict))

    def test_sanitized(self) -> None:
        """
        C{Sanitized} in the pipe-separated C{actions_ran} marks the verdict
        sanitized, with the converted file name.
        """
        verdict = parse_verdict(sanitized(), URL)
        self.assertTrue(verdict.sanitized)
        self.assertTrue(verdict.has_converted_file)
        self.assertEqual(verdict.actions_ran, ("Sanitized", "PAscript"))
        self.assertEqual(
            verdict.converted_name,
            f"invoice_sanitized_by_OPSWAT_MetaDefender_{DATA_ID}.docx",
        )

    def test_sanitized_partially_and_skipped(self) -> None:
        """
        C{Sanitized Partially} counts as sanitized; C{Sanitization Skipped}
        does not.
        """
        doc = sanitized()
        doc["process_info"]["post_processing"]["actions_ran"] = "Sanitized Partially"
        self.assertTrue(parse_verdict(doc, URL).sanitized)
        doc["process_info"]["post_processing"]["actions_ran"] = "Sanitization Skipped"
        self.assertFalse(parse_verdict(doc, URL).sanitized)

    def test_sanitization_purged(self) -> None:
        """
        C{outdated_data} containing C{sanitization} means the converted file
        is gone.
        """
        doc = sanitized()
        doc["process_info"]["outdated_data"] = ["sanitization"]
        verdict = parse_verdict(doc, URL)
        self.assertTrue(verdict.sanitized)
        self.assertFalse(verdict.has_converted_file)

    def test_sanitization_failed(self) -> None:
        """
        C{actions_failed} is split like C{actions_ran}.
        """
        doc = clean()
        doc["process_info"]["post_processing"]["actions_failed"] = "Sanitization Failed"
        verdict = parse_verdict(doc, URL)
        self.assertEqual(verdict.actions_failed, ("Sanitization Failed",))
        self.assertFalse(verdict.sanitized)

    def test_dlp(self) -> None:
        """
        A DLP hit gives code 20, Blocked with reason Sensitive Data Found,
        the masked hit, and a redacted converted file.
        """
        verdict = parse_verdict(dlp(), URL)
        self.assertTrue(verdict.blocked)
        self.assertEqual(verdict.blocked_reason, "Sensitive Data Found")
        self.assertEqual(verdict.scan_all_result_i, 20)
        assert verdict.dlp is not None
        self.assertEqual(verdict.dlp.verdict, 1)
        self.assertTrue(verdict.dlp.redacted)
        self.assertEqual(verdict.dlp.filename, "card_redacted.txt")
        (hit,) = verdict.dlp.hits
        self.assertEqual(
            (hit.rule, hit.display_name, hit.hit, hit.certainty, hit.redacted),
            ("ccn", "Credit Card Number", "XXXXXXXXXXXX1111", "Very High", True),
        )
        self.assertTrue(verdict.has_converted_file)
        self.assertFalse(verdict.sanitized)

    def test_dlp_nested_shape(self) -> None:
        """
        The 4.18 OpenAPI file's nested C{dlp_info.dlp_info} is read too.
        """
        doc = dlp()
        doc["dlp_info"] = {"dlp_info": doc["dlp_info"]}
        verdict = parse_verdict(doc, URL)
        assert verdict.dlp is not None
        self.assertEqual(verdict.dlp.verdict, 1)
        self.assertEqual(len(verdict.dlp.hits), 1)

    def test_encrypted_archive(self) -> None:
        """
        An encrypted archive is Blocked with code 12.
        """
        verdict = parse_verdict(encrypted(), URL)
        self.assertTrue(verdict.blocked)
        self.assertEqual(verdict.scan_all_result_i, 12)
        self.assertEqual(verdict.blocked_reason, "Encrypted Archive")
        self.assertIsNone(failure_condition(verdict))

    def test_archive_with_infected_child(self) -> None:
        """
        Archive children are listed with their own codes; children without
        C{process_info} or C{scan_all_result_a} (older captures) parse too.
        """
        verdict = parse_verdict(archive_with_infected_child(), URL)
        self.assertTrue(verdict.blocked)
        self.assertEqual(len(verdict.children), 2)
        readme, eicar = verdict.children
        self.assertEqual(
            (readme.display_name, readme.scan_all_result_i, readme.result),
            ("bundle.zip/readme.txt", 0, "Allowed"),
        )
        self.assertEqual(
            (eicar.data_id, eicar.scan_all_result_i, eicar.result, eicar.detected_by),
            ("b" * 32, 1, "", 2),
        )

    def test_v5_blocked_reasons(self) -> None:
        """
        v5's C{blocked_reasons} list fills an empty C{blocked_reason}.
        """
        doc = infected()
        doc["process_info"]["blocked_reason"] = ""
        doc["process_info"]["blocked_reasons"] = ["Infected", "Sensitive Data Found"]
        self.assertEqual(parse_verdict(doc, URL).blocked_reason, "Infected")

    def test_other_result(self) -> None:
        """
        A C{result} that is neither Allowed nor Blocked is OTHER, raw value
        kept.
        """
        doc = clean()
        doc["process_info"]["result"] = "Allowed with warnings"
        verdict = parse_verdict(doc, URL)
        self.assertIs(verdict.outcome, Outcome.OTHER)
        self.assertEqual(verdict.result, "Allowed with warnings")
        self.assertFalse(verdict.allowed)
        self.assertFalse(verdict.blocked)

    def test_key_order_irrelevant(self) -> None:
        """
        The parser does not depend on key order.
        """
        doc = infected()
        reversed_doc = {k: doc[k] for k in reversed(list(doc))}
        self.assertEqual(parse_verdict(reversed_doc, URL), parse_verdict(doc, URL))

    def test_frozen(self) -> None:
        """
        Verdicts are immutable values.
        """
        verdict = parse_verdict(clean(), URL)
        with self.assertRaises(attrs.exceptions.FrozenInstanceError):
            verdict.result = "Blocked"  # type: ignore[misc]

    def test_in_progress_refused(self) -> None:
        """
        Parsing an in-progress or not-found document is an error.
        """
        self.assertRaises(
            MalformedResultError, parse_verdict, in_progress(100, 90), URL
        )
        self.assertRaises(
            MalformedResultError, parse_verdict, {DATA_ID: "Not Found"}, URL
        )

    def test_wrong_types(self) -> None:
        """
        Wrong field types are reported as malformed, not crashes.
        """
        for path, value in [
            (("scan_results", "scan_all_result_i"), "x1"),
            (("scan_results", "scan_details"), []),
            (("process_info", "post_processing", "actions_ran"), 5),
            (("dlp_info", "hits"), "none"),
        ]:
            doc = copy.deepcopy(clean())
            target = doc
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            self.assertRaises(MalformedResultError, parse_verdict, doc, URL)


class FailureConditionTests(SynchronousTestCase):
    """
    L{failure_condition} maps result codes to the product's conditions.
    """

    def verdict_with(self, code: int, text: str) -> Any:
        doc = clean()
        doc["scan_results"].update(scan_all_result_i=code, scan_all_result_a=text)
        return parse_verdict(doc, URL)

    def test_failed(self) -> None:
        """
        C{Failed} (3), C{Canceled} (19) and C{Extraction Failed} (24) are
        I{processing failed}.
        """
        for code in (3, 19, 24):
            self.assertIs(
                failure_condition(self.verdict_with(code, "x")),
                Condition.PROCESSING_FAILED,
            )

    def test_not_scanned(self) -> None:
        """
        C{Not Scanned} (10) is I{not scanned}.
        """
        self.assertIs(
            failure_condition(self.verdict_with(10, "Not Scanned")),
            Condition.NOT_SCANNED,
        )

    def test_global_timeout(self) -> None:
        """
        v5's C{Global Timeout Exceeded} (31) is I{scan timeout}.
        """
        self.assertIs(
            failure_condition(self.verdict_with(31, "Global Timeout Exceeded")),
            Condition.SCAN_TIMEOUT,
        )

    def test_verdicts_are_not_failures(self) -> None:
        """
        Threat and policy verdicts are not error conditions.
        """
        for code in (0, 1, 2, 7, 8, 9, 12, 13, 15, 18, 20, 21, 22, 23):
            self.assertIsNone(failure_condition(self.verdict_with(code, "x")))


class HelperTests(SynchronousTestCase):
    """
    Small parsers used by the client.
    """

    def test_split_actions(self) -> None:
        """
        Actions are a pipe-separated string; a list is accepted as well.
        """
        self.assertEqual(
            split_actions("Sanitized | PAscript"), ("Sanitized", "PAscript")
        )
        self.assertEqual(split_actions(""), ())
        self.assertEqual(split_actions(None), ())
        self.assertEqual(split_actions(["Sanitized"]), ("Sanitized",))

    def test_busy_body(self) -> None:
        """
        The 503 body's message is extracted.
        """
        self.assertEqual(
            error_message(b'{"err": "Server is too busy. Try again later."}'),
            "Server is too busy. Try again later.",
        )

    def test_other_error_bodies(self) -> None:
        """
        Logout's C{response} key, the id-as-key shape and plain text are
        shown as messages.
        """
        self.assertEqual(
            error_message(b'{"response": "Access denied"}'), "Access denied"
        )
        self.assertEqual(error_message(b'{"abc": "Not Found"}'), "abc: Not Found")
        self.assertEqual(
            error_message(b"<html>Bad Gateway</html>"), "<html>Bad Gateway</html>"
        )

    def test_disposition(self) -> None:
        """
        Content-Disposition names are unquoted and percent-decoded; RFC 5987
        C{filename*} wins.
        """
        self.assertEqual(
            filename_from_disposition('attachment; filename="a%20b%C3%A9.docx"'),
            "a bé.docx",
        )
        self.assertEqual(
            filename_from_disposition(
                "attachment; filename=plain.pdf; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf"
            ),
            "résumé.pdf",
        )
        self.assertEqual(
            filename_from_disposition("attachment; filename=x.txt"), "x.txt"
        )
        self.assertIsNone(filename_from_disposition("attachment"))
        self.assertIsNone(filename_from_disposition(None))

    def test_disposition_path_stripped(self) -> None:
        """
        Directory parts and control characters never survive.
        """
        self.assertEqual(
            filename_from_disposition('attachment; filename="../../etc/passwd"'),
            "passwd",
        )
        self.assertEqual(
            filename_from_disposition(
                'attachment; filename="..%5C..%5Cevil%0D%0A.exe"'
            ),
            "evil.exe",
        )
        self.assertIsNone(filename_from_disposition('attachment; filename=".."'))
