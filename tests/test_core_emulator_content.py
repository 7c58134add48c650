"""
What the Core emulator decides about content: archives (extracted with each
child reported, nested, compressed, encrypted, over the limits), Proactive
DLP in documents, Deep CDR of Office files with macros, and the file types
behind those decisions; plus C{POST /file/sync} and webhooks.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mdgateway.emulator.app import CoreEmulator, EmulatorConfig, EmulatorServer
from mdgateway.emulator.archives import Limits, extract
from mdgateway.emulator.config import SHAPES
from mdgateway.emulator.detect import SANITIZED_MARKER, scan_stream
from mdgateway.emulator.filetype import sniff
from tests.coresamples import (
    CARD,
    EICAR,
    bzipped,
    docx,
    encrypted_zip,
    gzipped,
    nested_zip,
    pdf,
    tar_of,
    xlsx,
    xzipped,
    zip_of,
)
from tests.listening import listen_local, stop_listening
from tests.test_core_emulator import Wire, temp_dir


def children(doc: dict[str, Any]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = doc["extracted_files"]["files_in_archive"]
    return entries


class ArchiveTests(SynchronousTestCase):
    """
    Archives are extracted with the standard library, every child is
    reported, and the archive's verdict comes from its children.
    """

    def setUp(self) -> None:
        self.workdir = temp_dir(self)
        self.wire = Wire(EmulatorConfig(latency=1.0), workdir=self.workdir)
        self.addCleanup(self.wire.emulator.close)

    def final(self, data: bytes, name: str, headers: Any = ()) -> dict[str, Any]:
        return self.wire.final(self.wire.upload(data, name, headers))

    def test_deflated_zip_with_eicar_blocked(self) -> None:
        """
        A compressed zip holding EICAR is Infected and Blocked; the child is
        listed with its own data_id, name, type and result, and is the
        worst child.
        """
        doc = self.final(zip_of({"readme.txt": b"hi", "eicar.com": EICAR}), "a.zip")
        self.assertEqual(doc["scan_results"]["scan_all_result_i"], 1)
        self.assertEqual(doc["process_info"]["result"], "Blocked")
        self.assertEqual(doc["process_info"]["blocked_reason"], "Infected")
        self.assertEqual(doc["file_info"]["file_type"], "application/zip")
        extracted = doc["extracted_files"]
        self.assertEqual(extracted["files_extracted_count"], 2)
        by_name = {c["display_name"]: c for c in children(doc)}
        infected = by_name["a.zip/eicar.com"]
        self.assertEqual(infected["scan_all_result_i"], 1)
        self.assertEqual(infected["scan_all_result_a"], "Infected")
        self.assertEqual(infected["process_info"]["result"], "Blocked")
        self.assertEqual(infected["detected_by"], 2)
        self.assertEqual(infected["file_type_description"], "EICAR virus test files")
        self.assertEqual(by_name["a.zip/readme.txt"]["scan_all_result_i"], 0)
        self.assertEqual(extracted["worst_data_id"], infected["data_id"])
        # The container's own engines saw nothing in the compressed bytes.
        engines = doc["scan_results"]["scan_details"].values()
        self.assertTrue(all(e["scan_result_i"] == 0 for e in engines))

    def test_child_result(self) -> None:
        """
        A child's full result is served at its own data_id, complete.
        """
        doc = self.final(zip_of({"eicar.com": EICAR}), "a.zip")
        (child,) = children(doc)
        answer = self.wire.result(child["data_id"]).json()
        self.assertEqual(answer["data_id"], child["data_id"])
        self.assertEqual(answer["file_info"]["display_name"], "a.zip/eicar.com")
        self.assertEqual(answer["process_info"]["result"], "Blocked")
        self.assertEqual(answer["process_info"]["progress_percentage"], 100)
        self.assertNotIn("extracted_files", answer)

    def test_clean_zip(self) -> None:
        """
        A zip of clean files is allowed, No Threat Detected.
        """
        doc = self.final(zip_of({"a.txt": b"x", "b/c.txt": b"y"}), "clean.zip")
        self.assertEqual(doc["process_info"]["result"], "Allowed")
        self.assertEqual(doc["process_info"]["verdicts"], ["No Threat Detected"])
        self.assertEqual(
            sorted(c["display_name"] for c in children(doc)),
            ["clean.zip/a.txt", "clean.zip/b/c.txt"],
        )

    def test_nested(self) -> None:
        """
        EICAR three zips deep is found: each level's archive is Infected,
        and the outer archive blocked.
        """
        doc = self.final(nested_zip(EICAR, 3), "outer.zip")
        self.assertEqual(doc["scan_results"]["scan_all_result_i"], 1)
        (level,) = children(doc)
        self.assertEqual(level["display_name"], "outer.zip/level2.zip")
        self.assertEqual(level["scan_all_result_i"], 1)
        inner = self.wire.result(level["data_id"]).json()
        (deeper,) = children(inner)
        self.assertEqual(deeper["display_name"], "outer.zip/level2.zip/level1.zip")

    def test_depth_limit(self) -> None:
        """
        Archives nested deeper than C{archive_depth} are not extracted: the
        archive is Exceeded Archive Depth (9) and blocked.
        """
        self.wire.emulator.config = EmulatorConfig(latency=1.0, archive_depth=2)
        doc = self.final(nested_zip(b"clean", 4), "deep.zip")
        self.assertEqual(doc["scan_results"]["scan_all_result_i"], 9)
        self.assertEqual(
            doc["scan_results"]["scan_all_result_a"], "Exceeded Archive Depth"
        )
        self.assertEqual(
            doc["process_info"]["blocked_reason"], "Exceeded Archive Depth"
        )
        ok = self.final(nested_zip(b"clean", 2), "ok.zip")
        self.assertEqual(ok["scan_results"]["scan_all_result_i"], 0)

    def test_compressed_formats(self) -> None:
        """
        tar, tar.gz, tar.bz2, tar.xz, and single gzip, bzip2 and xz files are
        extracted, and EICAR in any of them blocks the file.
        """
        tarred = {"dir/eicar.com": EICAR}
        cases = {
            "a.tar": tar_of(tarred),
            "a.tar.gz": tar_of(tarred, "w:gz"),
            "a.tar.bz2": tar_of(tarred, "w:bz2"),
            "a.tar.xz": tar_of(tarred, "w:xz"),
            "eicar.com.gz": gzipped(EICAR),
            "eicar.com.bz2": bzipped(EICAR),
            "eicar.com.xz": xzipped(EICAR),
        }
        for name, data in cases.items():
            doc = self.final(data, name)
            self.assertEqual(
                (name, doc["scan_results"]["scan_all_result_i"]), (name, 1)
            )
            self.assertEqual(doc["process_info"]["result"], "Blocked")
        tgz = self.final(tar_of(tarred, "w:gz"), "a.tgz")
        (tar,) = children(tgz)
        self.assertEqual(tar["display_name"], "a.tgz/a.tar")
        self.assertEqual(tar["file_type"], "application/x-tar")
        gz = self.final(gzipped(b"plain"), "notes.txt.gz")
        self.assertEqual(children(gz)[0]["display_name"], "notes.txt.gz/notes.txt")

    def test_encrypted(self) -> None:
        """
        A zip whose entries are encrypted (flag in its own structure) is
        Encrypted Archive (12) and blocked, with no children; with the
        right C{archivepwd} header it is extracted and its content judged;
        a wrong password is no better than none.
        """
        data = encrypted_zip({"eicar.com": EICAR}, b"s3cret pw")
        locked = self.final(data, "locked.zip")
        self.assertEqual(locked["scan_results"]["scan_all_result_i"], 12)
        self.assertEqual(locked["process_info"]["blocked_reason"], "Encrypted Archive")
        self.assertNotIn("extracted_files", locked)
        wrong = self.final(data, "locked.zip", [("archivepwd", "nope")])
        self.assertEqual(wrong["scan_results"]["scan_all_result_i"], 12)
        opened = self.final(
            data,
            "locked.zip",
            [("archivepwd", "nope"), ("archivepwd1", "s3cret%20pw")],
        )
        self.assertEqual(opened["scan_results"]["scan_all_result_i"], 1)
        (child,) = children(opened)
        self.assertEqual(child["scan_all_result_i"], 1)
        clean = self.final(
            encrypted_zip({"a.txt": b"fine"}, b"pw"), "c.zip", [("archivepwd", "pw")]
        )
        self.assertEqual(clean["process_info"]["result"], "Allowed")

    def test_lookalike_bytes_not_encrypted(self) -> None:
        """
        Bytes that only look like an encrypted local header (inside a
        stored member, or in a text file) do not make an archive
        encrypted: encryption is read from the real structure.
        """
        fake = b"PK\x03\x04\x14\x00\x01\x00" + b"\x00" * 30
        stored = zip_of({"data.bin": fake}, zipfile.ZIP_STORED)
        doc = self.final(stored, "s.zip")
        self.assertEqual(doc["scan_results"]["scan_all_result_i"], 0)
        text = self.final(b"text " + fake, "t.txt")
        self.assertEqual(text["scan_results"]["scan_all_result_i"], 0)

    def test_limits(self) -> None:
        """
        Too many files is Exceeded Archive File Number (14); too many bytes
        Exceeded Archive Size (13); both blocked.
        """
        self.wire.emulator.config = EmulatorConfig(
            latency=1.0, archive_files=2, archive_size=100
        )
        many = self.final(zip_of({f"{i}.txt": b"x" for i in range(3)}), "m.zip")
        self.assertEqual(many["scan_results"]["scan_all_result_i"], 14)
        big = self.final(zip_of({"big.txt": b"x" * 500}), "b.zip")
        self.assertEqual(big["scan_results"]["scan_all_result_i"], 13)
        self.assertEqual(big["process_info"]["result"], "Blocked")
        bomb = self.final(gzipped(b"\x00" * 10_000), "bomb.gz")
        self.assertEqual(bomb["scan_results"]["scan_all_result_i"], 13)

    def test_damaged_archive(self) -> None:
        """
        A zip that cannot be opened is scanned as a plain file by a v4
        Core, and is Extraction Failed (24) on a v5 Core.
        """
        damaged = zip_of({"a.txt": b"hello"})[:-30]
        v4 = self.final(damaged, "d.zip")
        self.assertEqual(v4["scan_results"]["scan_all_result_i"], 0)
        self.assertNotIn("extracted_files", v4)
        self.wire.emulator.config = EmulatorConfig(latency=1.0, shape=SHAPES["v5"])
        v5 = self.final(damaged, "d.zip")
        self.assertEqual(v5["scan_results"]["scan_all_result_i"], 24)
        self.assertEqual(v5["process_info"]["blocked_reasons"], ["Extraction Failed"])

    def test_paging(self) -> None:
        """
        C{?first=&size=} pages the children; the count stays the total.
        """
        data_id = self.wire.upload(
            zip_of({f"{i:02}.txt": b"x" for i in range(5)}), "p.zip"
        )
        self.wire.final(data_id)
        page = self.wire.request("GET", f"/file/{data_id}?first=1&size=2").json()
        extracted = page["extracted_files"]
        self.assertEqual(extracted["files_extracted_count"], 5)
        self.assertEqual((extracted["first_index"], extracted["page_size"]), (1, 2))
        self.assertEqual(
            [c["display_name"] for c in extracted["files_in_archive"]],
            ["p.zip/01.txt", "p.zip/02.txt"],
        )

    def test_children_by_hash_and_purged_together(self) -> None:
        """
        A child's hash finds the child's result; when the archive's result
        expires its children go too, and no temporary file is left.
        """
        wire = self.wire
        wire.emulator.config = EmulatorConfig(latency=1.0, retention=10.0)
        doc = self.final(zip_of({"x.txt": b"child bytes"}), "h.zip")
        (child,) = children(doc)
        found = wire.request("GET", f"/hash/{child['data_id']}").json()
        self.assertIn("Not Found", found.values())
        child_doc = wire.result(child["data_id"]).json()
        by_hash = wire.request("GET", f"/hash/{child_doc['file_info']['sha256']}")
        self.assertEqual(by_hash.json()["data_id"], child["data_id"])
        wire.clock.advance(11)
        self.assertEqual(wire.result(child["data_id"]).status, 404)
        self.assertEqual(wire.emulator.results, 0)
        self.assertEqual(os.listdir(self.workdir), [])


class DocumentTests(SynchronousTestCase):
    """
    Office documents: Deep CDR removes macros, DLP reads the text.
    """

    def setUp(self) -> None:
        self.workdir = temp_dir(self)
        self.wire = Wire(EmulatorConfig(latency=1.0), workdir=self.workdir)
        self.addCleanup(self.wire.emulator.close)

    def test_docm_sanitized(self) -> None:
        """
        A macro document is sanitized by default: its macro part is removed
        (and reported in C{sanitization_details}), the converted file is a
        valid package ending with the marker, named like Core's.
        """
        wire = self.wire
        data_id = wire.upload(docx(macros=True), "Invoice.docm")
        doc = wire.final(data_id)
        self.assertEqual(
            doc["file_info"]["file_type"],
            "application/vnd.ms-word.document.macroEnabled.12",
        )
        post = doc["process_info"]["post_processing"]
        self.assertEqual(post["actions_ran"], "Sanitized")
        self.assertEqual(post["converted_to"], "docm")
        self.assertEqual(
            post["converted_destination"],
            f"Invoice_sanitized_by_OPSWAT_MetaDefender_{data_id}.docm",
        )
        self.assertEqual(
            post["sanitization_details"],
            {
                "description": "Sanitized successfully.",
                "details": [{"action": "removed", "count": 1, "object_name": "macro"}],
            },
        )
        body = wire.request("GET", f"/file/converted/{data_id}").body
        self.assertTrue(body.endswith(SANITIZED_MARKER))
        names = zipfile.ZipFile(io.BytesIO(body)).namelist()
        self.assertIn("word/document.xml", names)
        self.assertNotIn("word/vbaProject.bin", names)

    def test_docx_and_xlsx_types(self) -> None:
        """
        Word and Excel packages are recognised from their parts.
        """
        doc = self.wire.final(self.wire.upload(docx(), "a.bin"))
        self.assertEqual(
            doc["file_info"]["file_type_description"], "Microsoft Word 2007+"
        )
        sheet = self.wire.final(self.wire.upload(xlsx(), "s.xlsx"))
        self.assertIn("spreadsheetml", sheet["file_info"]["file_type"])
        self.assertEqual(
            sheet["process_info"]["post_processing"]["actions_ran"], "Sanitized"
        )

    def test_damaged_docx_fails_sanitization(self) -> None:
        """
        A C{.docx} that is not a valid package fails Deep CDR: C{actions_failed}
        C{Sanitization Failed} with a failure category, no converted file.
        """
        wire = self.wire
        data_id = wire.upload(b"PK\x03\x04 not really a package", "broken.docx")
        post = wire.final(data_id)["process_info"]["post_processing"]
        self.assertEqual(post["actions_ran"], "")
        self.assertEqual(post["actions_failed"], "Sanitization Failed")
        self.assertEqual(
            post["sanitization_details"]["failure_category"], "invalid file structure"
        )
        self.assertEqual(wire.request("GET", f"/file/converted/{data_id}").status, 404)

    def test_card_in_docx(self) -> None:
        """
        DLP reads the text of a Word package (deflated, so not in its raw
        bytes); allowed with redaction, the copy's text is masked.
        """
        wire = self.wire
        blocked = wire.final(wire.upload(docx(b"pay " + CARD), "p.docx"))
        self.assertEqual(blocked["scan_results"]["scan_all_result_i"], 20)
        self.assertEqual(blocked["process_info"]["result"], "Blocked")
        wire.emulator.config = EmulatorConfig(latency=1.0, dlp_block=False)
        data_id = wire.upload(docx(b"pay " + CARD), "p.docx")
        doc = wire.final(data_id)
        self.assertEqual(doc["dlp_info"]["redact"]["result"], "redacted")
        body = wire.request("GET", f"/file/converted/{data_id}").body
        text = zipfile.ZipFile(io.BytesIO(body)).read("word/document.xml")
        self.assertIn(b"pay XXXXXXXXXXXXXXX1111", text)

    def test_dlp_only_when_it_ran(self) -> None:
        """
        C{dlp_info} appears for types DLP reads under a rule that runs DLP,
        not for binary data, archives, or a rule without DLP.
        """
        wire = self.wire
        self.assertIn("dlp_info", wire.final(wire.upload(b"text", "a.txt")))
        self.assertNotIn("dlp_info", wire.final(wire.upload(b"\x00\x01\x02", "a.bin")))
        self.assertNotIn(
            "dlp_info", wire.final(wire.upload(zip_of({"a": b"x"}), "a.zip"))
        )
        wire.emulator.config = EmulatorConfig(latency=1.0, dlp_rules=frozenset({"DLP"}))
        self.assertNotIn("dlp_info", wire.final(wire.upload(b"text", "a.txt")))
        with_dlp = wire.final(wire.upload(b"text", "a.txt", [("rule", "DLP")]))
        self.assertIn("dlp_info", with_dlp)

    def test_file_types(self) -> None:
        """
        The type is read from the bytes: PDF, OLE documents by their
        streams, HTML, RTF, archives, text and data.
        """
        cases = {
            pdf(): "application/pdf",
            b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + "Workbook".encode("utf-16-le"): (
                "application/vnd.ms-excel"
            ),
            b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 8: "application/msword",
            b"<!DOCTYPE html><html></html>": "text/html",
            b"{\\rtf1 hi}": "text/rtf",
            tar_of({"a": b"b"}): "application/x-tar",
            gzipped(b"x"): "application/gzip",
            "Grüße".encode(): "text/plain",
            b"\x00\x01\x02\x03": "application/octet-stream",
        }
        for data, mime in cases.items():
            found = sniff(scan_stream(io.BytesIO(data)), "")
            self.assertEqual((data[:12], found.mime), (data[:12], mime))


class ExtractTests(SynchronousTestCase):
    """
    L{extract} on its own.
    """

    def test_password_per_entry(self) -> None:
        """
        Each encrypted entry is opened with the first password that really
        decrypts it.
        """
        workdir = temp_dir(self)
        data = encrypted_zip({"a.txt": b"alpha", "b.txt": b"beta"}, b"two")
        entries = list(
            extract(
                io.BytesIO(data),
                "zip",
                outer_name="x.zip",
                passwords=(b"one", b"two"),
                limits=Limits(files=10, size=100),
                workdir=workdir,
            )
        )
        contents = []
        for entry in entries:
            with open(entry.path, "rb") as f:
                contents.append((entry.name, f.read()))
            os.unlink(entry.path)
        self.assertEqual(contents, [("a.txt", b"alpha"), ("b.txt", b"beta")])


class SyncTests(SynchronousTestCase):
    """
    C{POST /file/sync} holds the answer until the result is complete, or
    answers 408 with the C{data_id} when its timeout passes.
    """

    def setUp(self) -> None:
        self.wire = Wire(EmulatorConfig(latency=1.0, sync_timeout=5.0))
        self.addCleanup(self.wire.emulator.close)

    def test_complete(self) -> None:
        """
        The answer comes when processing is done: 200 with the complete
        result, as a poll would show it.
        """
        wire = self.wire
        transport = wire.send("POST", "/file/sync", EICAR, [("filename", "e.com")])
        self.assertEqual(transport.value(), b"")
        wire.clock.advance(1.0)
        self.assertEqual(transport.value(), b"")  # post-processing
        wire.clock.advance(wire.emulator.config.postprocess)
        answer = wire.answer(transport)
        self.assertEqual(answer.status, 200)
        doc = answer.json()
        self.assertEqual(doc["process_info"]["progress_percentage"], 100)
        self.assertEqual(doc["process_info"]["result"], "Blocked")
        self.assertEqual(wire.result(doc["data_id"]).json(), doc)

    def test_timeout(self) -> None:
        """
        Past the sync timeout the answer is 408 C{{"data_id": ...}}, and
        the file can then be polled to its end.
        """
        wire = self.wire
        wire.emulator.config = EmulatorConfig(latency=30.0, sync_timeout=5.0)
        transport = wire.send("POST", "/file/sync", b"hello")
        wire.clock.advance(5.0)
        answer = wire.answer(transport)
        self.assertEqual(answer.status, 408)
        data_id = answer.json()["data_id"]
        self.assertEqual(list(answer.json()), ["data_id"])
        self.assertEqual(wire.final(data_id)["process_info"]["result"], "Allowed")

    def test_errors_as_file(self) -> None:
        """
        Refusals are those of C{POST /file}: 411, 422, 503.
        """
        wire = self.wire
        self.assertEqual(
            wire.request("POST", "/file/sync", b"", chunked=True).status, 411
        )
        self.assertEqual(wire.request("POST", "/file/sync", b"").status, 422)
        wire.emulator.config = EmulatorConfig(queue_size=0)
        self.assertEqual(wire.request("POST", "/file/sync", b"x").status, 503)

    def test_not_in_early_versions(self) -> None:
        """
        An early 4.x Core has no C{/file/sync}.
        """
        self.wire.emulator.config = EmulatorConfig(shape=SHAPES["early-v4"])
        self.assertEqual(self.wire.request("POST", "/file/sync", b"x").status, 404)


class WebhookTests(SynchronousTestCase):
    """
    C{callbackurl}: the finished result is POSTed there, and
    C{GET /file/webhook/{data_id}} tells what came of it.
    """

    def setUp(self) -> None:
        self.posted: list[tuple[str, bytes, Deferred[int]]] = []

        def poster(url: str, body: bytes) -> Deferred[int]:
            d: Deferred[int] = Deferred()
            self.posted.append((url, body, d))
            return d

        self.wire = Wire(EmulatorConfig(latency=1.0))
        self.wire.emulator = CoreEmulator(
            self.wire.clock, EmulatorConfig(latency=1.0), poster=poster
        )
        self.wire.rebuild()
        self.addCleanup(self.wire.emulator.close)

    def test_delivered(self) -> None:
        """
        When the file is done its result JSON (sorted) is POSTed once to the
        URL, and the webhook status records the time and the answer.
        """
        wire = self.wire
        url = "http://127.0.0.1:9/hook?x=1"
        data_id = wire.upload(b"hello", "a.txt", [("callbackurl", url)])
        pending = wire.request("GET", f"/file/webhook/{data_id}").json()
        self.assertEqual(
            pending,
            {"data_id": data_id, "request_time": "", "status_code": 0, "url": url},
        )
        self.assertEqual(self.posted, [])
        wire.clock.advance(1.0)
        self.assertEqual(self.posted, [])  # post-processing still running
        wire.clock.advance(wire.emulator.config.postprocess)
        ((target, body, answer),) = self.posted
        self.assertEqual(target, url)
        doc = json.loads(body)
        self.assertEqual(body, json.dumps(doc, sort_keys=True).encode())
        self.assertEqual(doc["data_id"], data_id)
        self.assertEqual(doc["process_info"]["progress_percentage"], 100)
        answer.callback(200)
        status = wire.request("GET", f"/file/webhook/{data_id}").json()
        self.assertEqual(status["status_code"], 200)
        self.assertRegex(status["request_time"], r"^\d{4}-\d\d-\d\dT[\d:.]+Z$")

    def test_invalid_url(self) -> None:
        """
        An unusable C{callbackurl} is refused with Core's 400, and nothing
        is queued.
        """
        wire = self.wire
        for url in ("ftp://h/x", "not a url", "http:///nohost", "http://h:99999/"):
            answer = wire.request("POST", "/file", b"x", [("callbackurl", url)])
            self.assertEqual(
                (url, answer.status, answer.json()),
                (url, 400, {"err": "Callback url is invalid."}),
            )
        self.assertEqual(wire.emulator.results, 0)

    def test_unknown(self) -> None:
        """
        A file without a callback has no webhook status: 404.
        """
        data_id = self.wire.upload(b"hello")
        self.assertEqual(
            self.wire.request("GET", f"/file/webhook/{data_id}").status, 404
        )


class _Hook(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.arrived: Deferred[None] = Deferred()

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        self.bodies.append(request.content.read())
        if not self.arrived.called:
            self.arrived.callback(None)
        request.setResponseCode(204)
        return b""


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_webhook_over_http() -> None:
    """
    Over real HTTP on loopback the emulator POSTs the finished result to
    the callback URL and records the receiver's status.
    """
    hook = _Hook()
    listening, number = await listen_local(Site(hook))
    server = EmulatorServer(reactor)
    server.start()
    try:
        import treq

        url = f"http://127.0.0.1:{number}/hook"
        headers: dict[bytes | str, bytes | str] = {
            "callbackurl": url,
            "filename": "a.txt",
        }
        answer = await treq.post(
            f"{server.url}/file",
            data=b"hello",
            headers=headers,
            persistent=False,
        )
        data_id = (await answer.json())["data_id"]
        await hook.arrived
        (body,) = hook.bodies
        assert json.loads(body)["data_id"] == data_id
        for _ in range(100):
            status = server.emulator.webhook(data_id)[1]
            if status["status_code"]:
                break
            await succeed(None)
            from twisted.internet import task

            await task.deferLater(reactor, 0.02, lambda: None)
        assert status["status_code"] == 204
    finally:
        await server.close()
        await stop_listening(listening)


class DamagedInputTests(SynchronousTestCase):
    """
    Damaged files never make the examination fail (which would be a 500
    and an error in the log): truncated and corrupted archives and Office
    packages get a result, and no temporary file is left behind.
    """

    def test_truncated_and_flipped(self) -> None:
        """
        Every sample cut at several points and with bytes flipped at
        several places is examined to a result, in both DLP modes.
        """
        from mdgateway.emulator.examine import examine

        samples = {
            "p.docx": docx(b"pay " + CARD),
            "m.docm": docx(macros=True),
            "a.zip": zip_of({"a.txt": b"hello " * 100, "e.com": EICAR}),
            "t.tgz": tar_of({"a.txt": b"x" * 3000}, "w:gz"),
            "g.gz": gzipped(b"y" * 3000),
            "b.bz2": bzipped(b"y" * 3000),
            "x.xz": xzipped(b"y" * 3000),
            "e.zip": encrypted_zip({"a.txt": b"secret"}, b"pw"),
            "n.zip": nested_zip(EICAR, 3),
        }
        workdir = temp_dir(self)
        for name, data in samples.items():
            variants = [data[:cut] for cut in (10, len(data) // 3, len(data) - 5)]
            for at in (30, len(data) // 2, len(data) - 40):
                flipped = bytearray(data)
                flipped[at % len(data)] ^= 0xFF
                variants.append(bytes(flipped))
            for variant in variants:
                for block in (True, False):
                    config = EmulatorConfig(dlp_block=block)
                    node = examine(
                        io.BytesIO(variant),
                        display_name=name,
                        name=name,
                        rule="Default",
                        passwords=(b"pw",),
                        config=config,
                        workdir=workdir,
                    )
                    self.assertIsInstance(node.code, int)
                    leftovers = set(os.listdir(workdir)) - {node.data_id}
                    self.assertEqual(leftovers, set(), (name, variant[:20]))
                    for path in node.converted_files():
                        os.unlink(path)
