"""
How files reach Core: one C{POST /file/sync} per file where Core has it,
polling after a 408 or where it has not, chosen per server from its
C{GET /version} (L{mdgateway.scan.client}, L{mdgateway.scan.versions}),
over keep-alive connections of the plain HTTP layer
(L{mdgateway.scan.http}). Against the emulator over real HTTP on loopback;
requests and connections are counted at the emulator.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mdgateway.emulator.app import CoreEmulator, EmulatorConfig
from mdgateway.emulator.config import SHAPES
from mdgateway.emulator.detect import EICAR
from mdgateway.emulator.resources import EmulatorResource, Fixed
from mdgateway.policy.profiles import CoreProfile, CoreServer
from mdgateway.scan.client import CoreClient, build_http_client
from mdgateway.scan.errors import Condition, CoreError
from mdgateway.scan.runtime import CoreRuntime
from mdgateway.scan.versions import has_sync, parse_version, reported_version
from tests.corerig import CoreRig
from tests.listening import listen_local, stop_listening


class VersionTests(SynchronousTestCase):
    """
    Reading C{GET /version}.
    """

    def test_parse(self) -> None:
        """
        The leading dotted numbers count; anything else is no version.
        """
        self.assertEqual(parse_version("4.21.1"), (4, 21, 1))
        self.assertEqual(parse_version("v5.6.1-beta"), (5, 6, 1))
        self.assertEqual(parse_version("4.21"), (4, 21))
        self.assertIsNone(parse_version("unknown"))

    def test_has_sync(self) -> None:
        """
        C{POST /file/sync} came with 4.21.0; earlier, unknown and missing
        versions are assumed not to have it.
        """
        self.assertTrue(has_sync("4.21.0"))
        self.assertTrue(has_sync("4.21.1"))
        self.assertTrue(has_sync("5.6.1"))
        self.assertFalse(has_sync("4.20.9"))
        self.assertFalse(has_sync("4.3.0"))
        self.assertFalse(has_sync("4"))
        self.assertFalse(has_sync("garbage"))
        self.assertFalse(has_sync(None))

    def test_reported(self) -> None:
        """
        Only a JSON object with a string C{version} gives a version.
        """
        self.assertEqual(
            reported_version(b'{"product_id": "MSCL", "version": "4.18.0"}'), "4.18.0"
        )
        self.assertIsNone(reported_version(b"<html>"))
        self.assertIsNone(reported_version(b'["4.18.0"]'))
        self.assertIsNone(reported_version(b'{"version": 4}'))


#: The rig of these tests: an emulator, a profile named C{t}, a runtime.
Rig = CoreRig


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_one_request_per_part(tmp_path: Path) -> None:
    """
    With C{submit = "sync"} each clean file costs exactly one HTTP request
    (C{POST /file/sync}, answered with the result), and the files share
    one kept-alive connection.
    """
    rig = Rig(tmp_path, submit="sync")
    try:
        for i in range(5):
            verdict = await rig.runtime.scan(rig.file(f"f{i}", b"part %d" % i), "a.txt")
            assert verdict.allowed
        counters = rig.emulator.counters
        assert counters["requests"] == 5
        assert counters["sync"] == 5
        assert counters["connections"] == 1
        assert counters["poll"] == counters["version"] == 0
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_auto_asks_the_version_once(tmp_path: Path) -> None:
    """
    C{submit = "auto"} (the default) asks a server's version once, even
    for files that start at the same time, and then sends each file in
    one request to a 4.21 server.
    """
    rig = Rig(tmp_path)
    try:
        paths = [rig.file(f"f{i}", b"part %d" % i) for i in range(8)]
        verdicts = await gatherResults(
            [Deferred.fromCoroutine(rig.runtime.scan(p, "a.txt")) for p in paths]
        )
        assert all(v.allowed for v in verdicts)
        await rig.runtime.scan(rig.file("later", b"later"), "b.txt")
        counters = rig.emulator.counters
        assert counters["version"] == 1
        assert counters["requests"] == 1 + 9
        assert counters["sync"] == 9
        assert counters["poll"] == 0
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_408_continues_by_polling(tmp_path: Path) -> None:
    """
    When Core's sync timeout passes first it answers 408 with the
    C{data_id}: the client polls that id (no second upload) and gets the
    verdict.
    """
    rig = Rig(tmp_path, EmulatorConfig(latency=0.4, sync_timeout=0.05), submit="sync")
    try:
        verdict = await rig.runtime.scan(rig.file("f", b"slow"), "a.txt")
        assert verdict.allowed
        counters = rig.emulator.counters
        assert (counters["sync"], counters["submit"]) == (1, 1)
        assert counters["poll"] >= 1
        assert verdict.data_id == rig.emulator.submissions[-1].data_id
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_poll_mode_never_asks(tmp_path: Path) -> None:
    """
    C{submit = "poll"} uploads with C{POST /file} and polls, even on a
    server that has the synchronous submit, and never asks the version.
    """
    rig = Rig(tmp_path, submit="poll")
    try:
        assert (await rig.runtime.scan(rig.file("f", b"x"), "a.txt")).allowed
        counters = rig.emulator.counters
        assert (counters["submit"], counters["sync"], counters["version"]) == (1, 0, 0)
        assert counters["poll"] >= 1
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_early_core_is_polled(tmp_path: Path) -> None:
    """
    A Core older than 4.21 (the early 4.x shapes, version 4.3.0) gets
    C{POST /file} and polls: the synchronous submit is never tried.
    """
    rig = Rig(tmp_path, EmulatorConfig(shape=SHAPES["early-v4"]))
    try:
        for i in range(2):
            assert (await rig.runtime.scan(rig.file(f"f{i}", b"x%d" % i), "a")).allowed
        counters = rig.emulator.counters
        assert counters["version"] == 1
        assert counters["sync"] == counters["no_sync"] == 0
        assert counters["submit"] == 2
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_asks_again_after_the_server_was_down(tmp_path: Path) -> None:
    """
    A server that could not be reached may come back as another version:
    its version is asked again, and an older Core is then polled.
    """
    rig = Rig(tmp_path, failure_threshold=100)
    try:
        assert (await rig.runtime.scan(rig.file("a", b"a"), "a")).allowed
        assert rig.emulator.counters["sync"] == 1
        await rig.server.stop()
        with pytest.raises(CoreError) as caught:
            await rig.runtime.scan(rig.file("b", b"b"), "b")
        assert caught.value.condition is Condition.UNREACHABLE
        rig.emulator.config = EmulatorConfig(shape=SHAPES["early-v4"])
        rig.server.start()
        assert (await rig.runtime.scan(rig.file("c", b"c"), "c")).allowed
        counters = rig.emulator.counters
        assert counters["version"] == 2
        assert counters["sync"] == 1
        assert counters["submit"] == 2
    finally:
        await rig.close()


class _NoSyncMethod(Resource):
    """
    The emulator behind a router that answers C{POST /file/sync} with 405,
    as a Core without it does when the path is read as C{/file/{data_id}}.
    """

    def __init__(self, inner: EmulatorResource) -> None:
        super().__init__()
        self.inner = inner
        self.refused = 0

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if request.method == b"POST" and request.path == b"/file/sync":
            self.refused += 1
            return Fixed((405, {"err": "Method not allowed"}))
        child: Resource = self.inner.getChildWithDefault(path, request)
        return child


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_405_falls_back_to_polling(tmp_path: Path) -> None:
    """
    A server that says it is 4.21 but answers C{POST /file/sync} with 405
    gets the file again with C{POST /file} and polls; the synchronous
    submit is not tried there again.
    """
    emulator = CoreEmulator(reactor)
    router = _NoSyncMethod(EmulatorResource(emulator))
    port, number = await listen_local(Site(router))
    profile = CoreProfile(
        name="t",
        servers=(CoreServer(f"http://127.0.0.1:{number}"),),
        poll_interval=0.01,
    )
    runtime = CoreRuntime.from_profile(profile, reactor)
    try:
        for i in range(3):
            path = tmp_path / f"f{i}"
            path.write_bytes(b"x%d" % i)
            assert (await runtime.scan(str(path), "a.txt")).allowed
        assert router.refused == 1
        assert emulator.counters["submit"] == 3
        assert emulator.counters["poll"] >= 3
    finally:
        await runtime.close()
        await stop_listening(port)
        emulator.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_version_hidden(tmp_path: Path) -> None:
    """
    A server whose C{/version} answers 404 (a proxy that hides it) is
    polled, and not asked again; one whose C{/version} fails with a 500
    fails the scan as I{unreachable}, and is asked again next time.
    """
    rig = Rig(tmp_path)
    try:
        rig.emulator.fail_next(1)
        with pytest.raises(CoreError) as caught:
            await rig.runtime.scan(rig.file("a", b"a"), "a")
        assert caught.value.condition is Condition.UNREACHABLE
        assert (await rig.runtime.scan(rig.file("b", b"b"), "b")).allowed
        assert rig.emulator.counters["version"] == 1  # the 500 was not counted
        assert rig.emulator.counters["sync"] == 1
    finally:
        await rig.close()
    emulator = CoreEmulator(reactor)
    inner = EmulatorResource(emulator)
    inner.putChild(b"version", Fixed((404, {"err": "Not found"})))
    port, number = await listen_local(Site(inner))
    profile = CoreProfile(
        name="t",
        servers=(CoreServer(f"http://127.0.0.1:{number}"),),
        poll_interval=0.01,
    )
    http, pool = build_http_client(reactor, profile)
    client = CoreClient(profile.servers[0], profile, http, reactor)
    try:
        for name in ("c", "d"):
            path = tmp_path / name
            path.write_bytes(name.encode())
            assert (await client.scan(str(path), name)).allowed
        assert client.synchronous is False
        assert emulator.counters["submit"] == 2
        assert emulator.counters["sync"] == 0
    finally:
        await pool.closeCachedConnections()
        await stop_listening(port)
        emulator.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_instant_stand_in(tmp_path: Path) -> None:
    """
    Against the instant stand-in every file is clean at the first answer,
    whatever its content (EICAR too: it is not read), in one request.
    """
    rig = Rig(tmp_path, EmulatorConfig(instant=True, latency=5.0), submit="sync")
    try:
        verdict = await rig.runtime.scan(rig.file("e.com", EICAR), "e.com")
        assert verdict.allowed
        assert verdict.scan_all_result_i == 0
        assert not verdict.has_converted_file
        assert rig.emulator.counters["requests"] == 1
        polled = attrs.evolve(rig.profile, submit="poll")
        runtime = CoreRuntime.from_profile(polled, reactor)
        try:
            again = await runtime.scan(rig.file("f", b"x" * 100), "f.txt")
            assert again.allowed and again.file_size == 100
            assert rig.emulator.counters["poll"] == 1
        finally:
            await runtime.close()
    finally:
        await rig.close()
