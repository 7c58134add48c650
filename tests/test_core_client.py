"""
Tests for L{mdgateway.scan.client} (against the emulator over real HTTP on
loopback) and the error mapping of L{mdgateway.scan.errors}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from mdgateway.emulator.app import CoreEmulator, EmulatorConfig, EmulatorServer
from mdgateway.emulator.detect import (
    EICAR,
    FAIL_MARKER,
    NOT_SCANNED_MARKER,
    SANITIZED_MARKER,
)
from mdgateway.policy.profiles import CoreProfile, CoreServer
from mdgateway.scan.client import CoreClient, build_http_client
from mdgateway.scan.errors import (
    Condition,
    CoreError,
    error_for_response,
    parse_retry_after,
)
from mdgateway.scan.interfaces import ICoreServerClient
from mdgateway.scan.verdict import Outcome
from tests.coresamples import CARD, docx, encrypted_zip, zip_of


class ErrorMappingTests(SynchronousTestCase):
    """
    L{error_for_response} maps Core's HTTP errors to conditions.
    """

    def map(self, status: int, body: dict[str, str] | bytes) -> CoreError:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return error_for_response(status, raw, server="http://core", what="upload")

    def test_busy(self) -> None:
        """
        503 "Server is too busy" is I{busy}, not the server's fault; a
        proxy's 429 too.
        """
        error = self.map(503, {"err": "Server is too busy. Try again later."})
        self.assertIs(error.condition, Condition.BUSY)
        self.assertFalse(error.server_fault)
        self.assertTrue(error.retry_elsewhere)
        self.assertEqual(error.status, 503)
        self.assertIn("too busy", str(error))
        self.assertIs(self.map(429, b"").condition, Condition.BUSY)

    def test_retry_after(self) -> None:
        """
        A busy answer keeps the seconds of its C{Retry-After} (seconds or an
        HTTP date); an unreadable header counts as none.
        """
        now = 1_700_000_000.0
        self.assertEqual(parse_retry_after("30", now), 30.0)
        self.assertEqual(parse_retry_after("Tue, 14 Nov 2023 22:14:20 GMT", now), 60.0)
        self.assertEqual(parse_retry_after("Tue, 14 Nov 2000 22:13:20 GMT", now), 0)
        self.assertIsNone(parse_retry_after("soon", now))
        self.assertIsNone(parse_retry_after(None, now))
        error = error_for_response(503, b"{}", server="http://core", retry_after=30.0)
        self.assertEqual(error.retry_after, 30.0)

    def test_access_denied(self) -> None:
        """
        C{Access denied} with 400, 403 or 405 (and any 401) is
        I{access denied}, a server-level fault.
        """
        for status in (400, 403, 405):
            error = self.map(status, {"err": "Access denied"})
            self.assertIs(error.condition, Condition.ACCESS_DENIED)
            self.assertTrue(error.server_fault)
        self.assertIs(self.map(401, b"").condition, Condition.ACCESS_DENIED)

    def test_disk_full(self) -> None:
        """
        Core's "insufficient disk space" refusal is I{busy}: retry later.
        """
        error = self.map(
            400, {"err": "File upload rejected due to insufficient disk space"}
        )
        self.assertIs(error.condition, Condition.BUSY)

    def test_empty_file(self) -> None:
        """
        422 "File is empty" is I{not scanned}, and not retried elsewhere.
        """
        error = self.map(422, {"err": "File is empty."})
        self.assertIs(error.condition, Condition.NOT_SCANNED)
        self.assertFalse(error.retry_elsewhere)

    def test_size_limit(self) -> None:
        """
        The size-limit 500 is I{processing failed}, the file's fault.
        """
        too_big = self.map(
            500,
            {
                "err": "Failed to request scan. File size exceeded the maximum size"
                " permitted by your configuration."
            },
        )
        self.assertIs(too_big.condition, Condition.PROCESSING_FAILED)
        self.assertFalse(too_big.server_fault)
        self.assertFalse(too_big.retry_elsewhere)

    def test_server_not_working(self) -> None:
        """
        Any other answer (500, a proxy's 502/504, a 404 from a wrong URL, an
        unexpected 400) means the server is not working: I{unreachable},
        its fault, so mail is retried instead of bounced.
        """
        cases: list[tuple[int, dict[str, str] | bytes]] = [
            (500, {"err": "Failed to request scan. Try again later."}),
            (502, b"<html>Bad Gateway</html>"),
            (504, b""),
            (404, b"<html>Not Found</html>"),
            (400, {"err": "Callback url is invalid."}),
        ]
        for status, body in cases:
            error = self.map(status, body)
            self.assertIs(error.condition, Condition.UNREACHABLE)
            self.assertTrue(error.server_fault)
            self.assertEqual(error.status, status)
            self.assertIn(f"HTTP {status}", str(error))


# -- against the emulator over loopback --------------------------------------


class Rig:
    """
    An emulator on loopback and a L{CoreClient} for it.
    """

    def __init__(
        self,
        tmp_path: Path,
        config: EmulatorConfig | None = None,
        *,
        apikey: str | None = None,
        client_options: dict[str, Any] | None = None,
        **profile_options: Any,
    ) -> None:
        self.tmp_path = tmp_path
        self.server = EmulatorServer(reactor, CoreEmulator(reactor, config))
        self.server.start()
        self.emulator = self.server.emulator
        profile_options.setdefault("poll_interval", 0.01)
        self.profile = CoreProfile(
            name="test",
            servers=(CoreServer(self.server.url, apikey=apikey),),
            **profile_options,
        )
        self.http, self.pool = build_http_client(reactor, self.profile)
        self.client = CoreClient(
            self.profile.servers[0],
            self.profile,
            self.http,
            reactor,
            **(client_options or {}),
        )

    def file(self, name: str, data: bytes) -> str:
        path = self.tmp_path / name
        path.write_bytes(data)
        return str(path)

    async def close(self) -> None:
        await self.pool.closeCachedConnections()
        await self.server.close()


async def expect_error(coro: Any) -> CoreError:
    try:
        await coro
    except CoreError as e:
        return e
    raise AssertionError("no CoreError raised")


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_provides_interface(tmp_path: Path) -> None:
    """
    L{CoreClient} provides L{ICoreServerClient}.
    """
    rig = Rig(tmp_path)
    try:
        assert verifyObject(ICoreServerClient, rig.client)
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_clean_scan(tmp_path: Path) -> None:
    """
    A clean file scans to an Allowed verdict carrying the data_id, the
    decoded display name and the Core URL; the URL-encoded name and the
    user agent were sent, and no C{rule} header for C{Automatic}.
    """
    rig = Rig(tmp_path)
    try:
        path = rig.file("a.txt", b"hello world")
        verdict = await rig.client.scan(path, "résumé 2024.txt")
        assert verdict.outcome is Outcome.ALLOWED
        assert verdict.scan_all_result_i == 0
        assert verdict.display_name == "résumé 2024.txt"
        assert verdict.core_url == rig.server.url
        assert len(verdict.data_id) == 32
        submission = rig.emulator.submissions[-1]
        assert submission.raw_filename == "r%C3%A9sum%C3%A9%202024.txt"
        assert submission.rule is None
        assert submission.user_agent == "mdemailsecurity"
        assert submission.size == 11
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_waits_for_processing_not_scan(tmp_path: Path) -> None:
    """
    The client keeps polling after C{scan_results} reaches 100 until
    C{process_info} does, so it sees the Deep CDR outcome.
    """
    rig = Rig(tmp_path, EmulatorConfig(latency=0.05), submit="poll")
    try:
        path = rig.file("a.docx", docx())
        verdict = await rig.client.scan(path, "a.docx")
        assert verdict.sanitized
        assert verdict.actions_ran == ("Sanitized",)
        assert verdict.converted_name is not None
        assert rig.emulator.counters["poll"] >= 2
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_rule_and_apikey(tmp_path: Path) -> None:
    """
    A named rule is sent (URL-encoded) and echoed; the API key is sent but
    never part of the verdict's Core URL.
    """
    rig = Rig(
        tmp_path,
        EmulatorConfig(apikey="s3cret"),
        apikey="s3cret",
        rule="Email Security",
    )
    try:
        verdict = await rig.client.scan(rig.file("a.txt", b"hi"), "a.txt")
        assert verdict.rule == "Email Security"
        assert rig.emulator.submissions[-1].rule == "Email Security"
        assert "s3cret" not in verdict.core_url
        assert "s3cret" not in repr(verdict)
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_infected(tmp_path: Path) -> None:
    """
    EICAR is a Blocked verdict (Infected, code 1) with the threat names,
    not an error.
    """
    rig = Rig(tmp_path)
    try:
        verdict = await rig.client.scan(rig.file("e.com", EICAR), "e.com")
        assert verdict.blocked
        assert (verdict.scan_all_result_i, verdict.blocked_reason) == (1, "Infected")
        assert verdict.threats
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_encrypted_archive(tmp_path: Path) -> None:
    """
    An encrypted zip is Blocked as Encrypted Archive (12); a compressed
    zip with EICAR inside is Blocked as Infected, its child listed.
    """
    rig = Rig(tmp_path)
    try:
        locked = encrypted_zip({"a.txt": b"x"}, b"pw")
        verdict = await rig.client.scan(rig.file("s.zip", locked), "s.zip")
        assert (verdict.scan_all_result_i, verdict.blocked) == (12, True)
        packed = zip_of({"eicar.com": EICAR})
        verdict = await rig.client.scan(rig.file("e.zip", packed), "e.zip")
        assert (verdict.blocked_reason, verdict.blocked) == ("Infected", True)
        (child,) = verdict.children
        assert (child.display_name, child.result) == ("e.zip/eicar.com", "Blocked")
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_sanitized_download(tmp_path: Path) -> None:
    """
    The converted file streams to disk under the name from
    C{Content-Disposition}.
    """
    rig = Rig(tmp_path)
    try:
        original = b"%PDF-1.7 " + b"x" * 200_000
        verdict = await rig.client.scan(rig.file("in.pdf", original), "Q1 plan.pdf")
        assert verdict.has_converted_file
        dest = str(tmp_path / "out.bin")
        name = await rig.client.download_converted(verdict, dest)
        assert name == f"Q1 plan_sanitized_by_OPSWAT_MetaDefender_{verdict.data_id}.pdf"
        assert Path(dest).read_bytes() == original + SANITIZED_MARKER
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_dlp_redacted_download(tmp_path: Path) -> None:
    """
    A card number gives Sensitive Data Found with a masked hit: blocked and
    not redacted by default; allowed with DLP's redacted copy, named by
    DLP, when the rule redacts.
    """
    rig = Rig(tmp_path)
    try:
        data = b"pay with " + CARD + b" please"
        verdict = await rig.client.scan(rig.file("n.txt", data), "n.txt")
        assert verdict.scan_all_result_i == 20
        assert verdict.blocked_reason == "Sensitive Data Found"
        assert verdict.dlp is not None and not verdict.dlp.redacted
        assert not verdict.has_converted_file
        assert [h.hit for h in verdict.dlp.hits] == ["XXXXXXXXXXXXXXX1111"]
        rig.emulator.config = EmulatorConfig(dlp_block=False)
        verdict = await rig.client.scan(rig.file("n.txt", data), "n.txt")
        assert verdict.allowed and not verdict.sanitized
        assert verdict.dlp is not None and verdict.dlp.redacted
        dest = str(tmp_path / "redacted")
        name = await rig.client.download_converted(verdict, dest)
        assert name == (
            f"n_proactive-dlp-processed_by_OPSWAT_MetaDefender_{verdict.data_id}.txt"
        )
        assert Path(dest).read_bytes() == b"pay with XXXXXXXXXXXXXXX1111 please"
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_download_missing(tmp_path: Path) -> None:
    """
    A download of a file that has no converted copy is I{processing failed}
    (HTTP 404), not the server's fault, and leaves no file behind.
    """
    rig = Rig(tmp_path)
    try:
        verdict = await rig.client.scan(rig.file("a.txt", b"hi"), "a.txt")
        dest = tmp_path / "none"
        error = await expect_error(rig.client.download_converted(verdict, str(dest)))
        assert error.condition is Condition.PROCESSING_FAILED
        assert (error.status, error.server_fault) == (404, False)
        assert not dest.exists()
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_unreachable(tmp_path: Path) -> None:
    """
    A refused connection is I{unreachable}, the server's fault.
    """
    rig = Rig(tmp_path)
    try:
        await rig.server.stop()
        error = await expect_error(rig.client.scan(rig.file("a.txt", b"hi"), "a.txt"))
        assert error.condition is Condition.UNREACHABLE
        assert error.server_fault
        assert error.server == rig.server.url
        probe_error = await expect_error(rig.client.probe())
        assert probe_error.condition is Condition.UNREACHABLE
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_busy(tmp_path: Path) -> None:
    """
    A full queue (503) is I{busy}.
    """
    rig = Rig(tmp_path, EmulatorConfig(queue_size=0))
    try:
        error = await expect_error(rig.client.scan(rig.file("a.txt", b"hi"), "a.txt"))
        assert (error.condition, error.status) == (Condition.BUSY, 503)
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_access_denied_logged(tmp_path: Path) -> None:
    """
    A wrong API key is I{access denied}, logged at error level without the
    key.
    """
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    rig = Rig(
        tmp_path, EmulatorConfig(apikey="right"), apikey="wrong-key-123", submit="poll"
    )
    try:
        error = await expect_error(rig.client.scan(rig.file("a.txt", b"hi"), "a.txt"))
        assert (error.condition, error.status) == (Condition.ACCESS_DENIED, 400)
        events = list(observer)
        loud = [e for e in events if e.get("log_level") is LogLevel.error]
        assert loud and "denied access" in loud[0]["log_format"]
        assert "wrong-key-123" not in repr(events)
        assert "wrong-key-123" not in str(error)
    finally:
        globalLogPublisher.removeObserver(observer)
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_server_error(tmp_path: Path) -> None:
    """
    An HTTP 500 is I{unreachable}, the server's fault.
    """
    rig = Rig(tmp_path)
    try:
        rig.emulator.fail_next(1)
        error = await expect_error(rig.client.scan(rig.file("a.txt", b"hi"), "a.txt"))
        assert error.condition is Condition.UNREACHABLE
        assert (error.status, error.server_fault) == (500, True)
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_scan_timeout(tmp_path: Path) -> None:
    """
    A scan not complete within the profile's C{scan_timeout} is
    I{scan timeout}, and the client asks Core to cancel it.
    """
    rig = Rig(tmp_path, EmulatorConfig(latency=30), scan_timeout=0.2, submit="poll")
    try:
        error = await expect_error(rig.client.scan(rig.file("a.txt", b"hi"), "a.txt"))
        assert error.condition is Condition.SCAN_TIMEOUT
        assert not error.server_fault
        assert rig.emulator.counters["cancel"] == 1
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_stalled_body(tmp_path: Path) -> None:
    """
    A response body that stops arriving hits the body timeout (treq's own
    timeout ends at the headers) and is I{unreachable}.
    """
    rig = Rig(tmp_path, client_options={"body_timeout": 0.2}, submit="poll")
    try:
        rig.emulator.stall_next(1)
        error = await expect_error(rig.client.scan(rig.file("a.txt", b"hi"), "a.txt"))
        assert error.condition is Condition.UNREACHABLE
        assert "body not received" in error.message
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_stalled_download(tmp_path: Path) -> None:
    """
    A stalled download times out as I{unreachable} and the partial file is
    removed.
    """
    rig = Rig(tmp_path, client_options={"body_timeout": 0.2})
    try:
        verdict = await rig.client.scan(rig.file("a.docx", b"doc"), "a.docx")
        rig.emulator.stall_next(1)
        dest = tmp_path / "partial"
        error = await expect_error(rig.client.download_converted(verdict, str(dest)))
        assert error.condition is Condition.UNREACHABLE
        assert not dest.exists()
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("status", [404, 200])
async def test_lost_data_id_resubmits(tmp_path: Path, status: int) -> None:
    """
    When Core forgets the data_id (404, or 200 C{{"<id>": "Not Found"}}),
    the file is submitted again and the scan succeeds.
    """
    rig = Rig(tmp_path, EmulatorConfig(not_found_status=status), submit="poll")
    try:
        rig.emulator.forget_next(1)
        verdict = await rig.client.scan(rig.file("a.txt", b"hi"), "a.txt")
        assert verdict.allowed
        assert rig.emulator.counters["submit"] == 2
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_resubmissions_bounded(tmp_path: Path) -> None:
    """
    Resubmissions stop after C{max_resubmissions}: then the server counts
    as not working (I{unreachable}, its fault).
    """
    rig = Rig(tmp_path, client_options={"max_resubmissions": 1}, submit="poll")
    try:
        rig.emulator.forget_next(10)
        error = await expect_error(rig.client.scan(rig.file("a.txt", b"hi"), "a.txt"))
        assert error.condition is Condition.UNREACHABLE
        assert error.server_fault
        assert rig.emulator.counters["submit"] == 2
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_failed_and_not_scanned_results(tmp_path: Path) -> None:
    """
    A Failed result is I{processing failed} and a Not Scanned result
    I{not scanned}, each with the verdict attached and not the server's
    fault.
    """
    rig = Rig(tmp_path)
    try:
        failed = await expect_error(
            rig.client.scan(rig.file("f.txt", FAIL_MARKER), "f.txt")
        )
        assert failed.condition is Condition.PROCESSING_FAILED
        assert failed.verdict is not None and failed.verdict.scan_all_result_i == 3
        assert not failed.server_fault
        skipped = await expect_error(
            rig.client.scan(rig.file("n.txt", NOT_SCANNED_MARKER), "n.txt")
        )
        assert skipped.condition is Condition.NOT_SCANNED
        assert skipped.verdict is not None
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_empty_file(tmp_path: Path) -> None:
    """
    An empty file (Core's 422) is I{not scanned}.
    """
    rig = Rig(tmp_path)
    try:
        error = await expect_error(rig.client.scan(rig.file("e", b""), "empty.txt"))
        assert (error.condition, error.status) == (Condition.NOT_SCANNED, 422)
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_hash_lookup(tmp_path: Path) -> None:
    """
    With C{hash_lookup} a file Core already processed is not uploaded
    again; the cached verdict says so.
    """
    rig = Rig(tmp_path, hash_lookup=True)
    try:
        path = rig.file("a.txt", b"same bytes")
        first = await rig.client.scan(path, "a.txt")
        second = await rig.client.scan(path, "a.txt")
        assert (first.from_cache, second.from_cache) == (False, True)
        assert second.data_id == first.data_id
        assert rig.emulator.counters["submit"] == 1
        assert rig.emulator.counters["hash"] == 2
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_hash_lookup_other_rule(tmp_path: Path) -> None:
    """
    A cached result of another rule is not reused.
    """
    rig = Rig(tmp_path, hash_lookup=True, rule="Email Security")
    try:
        path = rig.file("a.txt", b"same bytes")
        default_rule = attrs.evolve(rig.profile, rule="Default", hash_lookup=False)
        other = CoreClient(rig.profile.servers[0], default_rule, rig.http, reactor)
        first = await other.scan(path, "a.txt")
        assert first.rule == "Default"
        again = await rig.client.scan(path, "a.txt")
        assert not again.from_cache
        assert again.rule == "Email Security"
        assert rig.emulator.counters["submit"] == 2
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_probe(tmp_path: Path) -> None:
    """
    The health probe succeeds against a running server.
    """
    rig = Rig(tmp_path)
    try:
        await rig.client.probe()
        assert rig.emulator.counters["version"] == 1
    finally:
        await rig.close()


class _Recorder(Resource):
    """
    Records the upload's headers and answers with a fixed body.
    """

    isLeaf = True

    def __init__(self, answer: bytes) -> None:
        super().__init__()
        self.answer = answer
        self.headers: dict[bytes, Sequence[bytes]] = {}
        self.bodies: list[bytes] = []

    def render(self, request: Request) -> bytes:
        self.headers = dict(request.requestHeaders.getAllRawHeaders())
        assert request.content is not None
        self.bodies.append(request.content.read())
        return self.answer


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_upload_headers_and_garbage_answer(tmp_path: Path) -> None:
    """
    The upload carries Content-Length (no chunking), an octet-stream type,
    C{apikey}, C{rule}, C{user_agent} and the URL-encoded C{filename}; an
    answer that is not JSON is I{unreachable}, the server's fault.
    """
    recorder = _Recorder(b"<html>not json</html>")
    port = reactor.listenTCP(0, Site(recorder), interface="127.0.0.1")  # type: ignore[arg-type]
    host = port.getHost()
    assert isinstance(host, IPv4Address)
    url = f"http://127.0.0.1:{host.port}"
    profile = CoreProfile(
        name="rec",
        servers=(CoreServer(url, apikey="k1"),),
        rule="Mail rule/ä",
        user_agent="gw-test",
    )
    http, pool = build_http_client(reactor, profile)
    client = CoreClient(profile.servers[0], profile, http, reactor)
    try:
        data = os.urandom(150_000)
        path = tmp_path / "up.bin"
        path.write_bytes(data)
        error = await expect_error(client.submit(str(path), "a b+c.bin"))
        assert error.condition is Condition.UNREACHABLE
        assert error.server_fault
        headers = recorder.headers
        assert headers[b"Content-Length"] == [str(len(data)).encode()]
        assert b"Transfer-Encoding" not in headers
        assert headers[b"Content-Type"] == [b"application/octet-stream"]
        assert headers[b"Apikey"] == [b"k1"]
        assert headers[b"Rule"] == [b"Mail%20rule%2F%C3%A4"]
        assert headers[b"User_agent"] == [b"gw-test"]
        assert headers[b"Filename"] == [b"a%20b%2Bc.bin"]
        assert recorder.bodies == [data]
    finally:
        await pool.closeCachedConnections()
        stopped = port.stopListening()
        if stopped is not None:
            await stopped


class _Redirect(Resource):
    """
    Answers every request with a redirect to C{location}.
    """

    isLeaf = True

    def __init__(self, location: bytes) -> None:
        super().__init__()
        self.location = location

    def render(self, request: Request) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"location", self.location)
        return b""


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_redirect_not_followed() -> None:
    """
    A redirect from a Core server is an error of that server, never
    followed: the request (with its API key) does not go to the place it
    points at.
    """
    elsewhere = _Recorder(b"{}")
    other = reactor.listenTCP(0, Site(elsewhere), interface="127.0.0.1")  # type: ignore[arg-type]
    other_host = other.getHost()
    assert isinstance(other_host, IPv4Address)
    target = f"http://127.0.0.1:{other_host.port}/file/abc".encode()
    port = reactor.listenTCP(0, Site(_Redirect(target)), interface="127.0.0.1")  # type: ignore[arg-type]
    host = port.getHost()
    assert isinstance(host, IPv4Address)
    profile = CoreProfile(
        name="redir", servers=(CoreServer(f"http://127.0.0.1:{host.port}", apikey="k"),)
    )
    http, pool = build_http_client(reactor, profile)
    client = CoreClient(profile.servers[0], profile, http, reactor)
    try:
        error = await expect_error(client.fetch("abc"))
        assert "302" in str(error)
        assert elsewhere.headers == {}
    finally:
        await pool.closeCachedConnections()
        for listening in (port, other):
            stopped = listening.stopListening()
            if stopped is not None:
                await stopped


class _Silent(Resource):
    """
    Never answers.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> int:
        self.requests.append(request)
        return NOT_DONE_YET


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_no_answer(tmp_path: Path) -> None:
    """
    A server that accepts the request but never answers is I{unreachable}
    after the request timeout.
    """
    silent = _Silent()
    port = reactor.listenTCP(0, Site(silent), interface="127.0.0.1")  # type: ignore[arg-type]
    host = port.getHost()
    assert isinstance(host, IPv4Address)
    profile = CoreProfile(
        name="s", servers=(CoreServer(f"http://127.0.0.1:{host.port}"),)
    )
    http, pool = build_http_client(reactor, profile)
    client = CoreClient(profile.servers[0], profile, http, reactor, request_timeout=0.2)
    try:
        error = await expect_error(client.probe())
        assert error.condition is Condition.UNREACHABLE
        assert "no answer within 0.2s" in error.message
        assert len(silent.requests) == 1
    finally:
        await pool.closeCachedConnections()
        stopped = port.stopListening()
        if stopped is not None:
            await stopped


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_caller_cancel_stays_cancel(tmp_path: Path) -> None:
    """
    Cancelling a scan (say, at shutdown) fails it with L{CancelledError},
    not a Core error condition, while it is polling or uploading.
    """
    rig = Rig(tmp_path, EmulatorConfig(latency=30))
    try:
        scanning = Deferred.fromCoroutine(
            rig.client.scan(rig.file("a.txt", b"hi"), "a.txt")
        )
        for _ in range(500):
            if rig.emulator.counters["poll"]:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        scanning.cancel()
        with pytest.raises(CancelledError):
            await scanning
        stalled = Deferred.fromCoroutine(rig.client.probe())
        stalled.cancel()
        with pytest.raises(CancelledError):
            await stalled
    finally:
        await rig.close()
