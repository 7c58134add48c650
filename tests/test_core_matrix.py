"""
The gateway's Core client (through the profile runtime, as the gateway
uses it) against the emulator over loopback, for every verdict, error,
latency and overload case the emulator can produce: each case says what
the emulator does and what the gateway must conclude (a verdict, or an
error condition and whether the server counts as busy or failing).

The same cases through the whole gateway are in
C{test_e2e_core_matrix}.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults

from mdgateway.emulator.app import CoreEmulator, EmulatorConfig, EmulatorServer
from mdgateway.emulator.config import SHAPES
from mdgateway.emulator.detect import (
    CDR_FAIL_MARKER,
    FAIL_MARKER,
    NOT_SCANNED_MARKER,
    SANITIZED_MARKER,
)
from mdgateway.policy.profiles import CoreProfile, CoreServer
from mdgateway.scan.errors import Condition, CoreError
from mdgateway.scan.runtime import CoreRuntime
from mdgateway.scan.verdict import Verdict
from tests.coresamples import (
    CARD,
    EICAR,
    docx,
    encrypted_zip,
    nested_zip,
    pdf,
    tar_of,
    zip_of,
)


@attrs.frozen
class Case:
    """
    One emulator behaviour and what the runtime must make of it.

    @ivar knobs: called with the emulator before the scan.
    @ivar result: the expected C{process_info.result} (or C{None}).
    @ivar reason: the expected blocked reason.
    @ivar condition: the expected error condition instead of a verdict.
    @ivar check: more assertions on the verdict (or error) and the
        emulator.
    """

    name: str
    data: bytes
    filename: str = "file.txt"
    config: dict[str, Any] = attrs.Factory(dict)
    knobs: Callable[[CoreEmulator], None] = lambda e: None
    result: str | None = None
    reason: str = ""
    condition: Condition | None = None
    check: Callable[[Any, CoreEmulator, CoreRuntime, Path], Any] | None = None
    profile: dict[str, Any] = attrs.Factory(dict)
    client: dict[str, Any] = attrs.Factory(dict)


async def _download(verdict: Verdict, runtime: CoreRuntime, tmp: Path) -> bytes:
    dest = tmp / "converted"
    await runtime.download_sanitized(verdict, str(dest))
    return dest.read_bytes()


async def _redacted(v: Verdict, e: CoreEmulator, r: CoreRuntime, tmp: Path) -> None:
    assert v.dlp is not None and v.dlp.redacted and not v.sanitized
    assert await _download(v, r, tmp) == b"card XXXXXXXXXXXXXXX1111"


async def _docm(v: Verdict, e: CoreEmulator, r: CoreRuntime, tmp: Path) -> None:
    assert v.sanitized and v.converted_name and v.converted_name.endswith(".docm")
    body = await _download(v, r, tmp)
    assert body.endswith(SANITIZED_MARKER)
    assert "word/vbaProject.bin" not in zipfile.ZipFile(io.BytesIO(body)).namelist()


async def _cdr_failed(v: Verdict, e: CoreEmulator, r: CoreRuntime, t: Path) -> None:
    assert v.actions_failed == ("Sanitization Failed",)
    assert not v.has_converted_file


async def _archive_child(v: Verdict, e: CoreEmulator, r: CoreRuntime, t: Path) -> None:
    assert [c.result for c in v.children] == ["Blocked"]


def _busy(seconds: float) -> Callable[..., Any]:
    async def check(e: CoreError, em: CoreEmulator, r: CoreRuntime, t: Path) -> None:
        assert "HTTP 503" in e.message
        (status,) = r.status()
        assert status.busy and status.up
        assert not r.available()
        await task.deferLater(reactor, seconds + 0.3, lambda: None)
        assert r.available()

    return check


async def _busy_long(e: CoreError, em: CoreEmulator, r: CoreRuntime, t: Path) -> None:
    assert "HTTP 503" in e.message
    assert not r.available()
    await task.deferLater(reactor, 1.5, lambda: None)
    assert not r.available()  # the default 1 s back-off would be over


async def _resubmitted(v: Verdict, e: CoreEmulator, r: CoreRuntime, t: Path) -> None:
    assert e.counters["submit"] == 2


async def _three_uploads(
    e: CoreError, em: CoreEmulator, r: CoreRuntime, t: Path
) -> None:
    assert em.counters["submit"] == 3
    assert "not found after 3 submissions" in e.message


async def _cancelled(e: CoreError, em: CoreEmulator, r: CoreRuntime, t: Path) -> None:
    assert em.counters["cancel"] == 1


async def _polled(v: Verdict, e: CoreEmulator, r: CoreRuntime, t: Path) -> None:
    assert e.counters["poll"] >= 3


async def _one_request(v: Verdict, e: CoreEmulator, r: CoreRuntime, t: Path) -> None:
    # The version, asked once per server, then one request for the file.
    assert (e.counters["version"], e.counters["sync"]) == (1, 1)
    assert e.counters["requests"] == 2
    assert e.counters["poll"] == 0


async def _polled_after_408(
    v: Verdict, e: CoreEmulator, r: CoreRuntime, t: Path
) -> None:
    assert (e.counters["sync"], e.counters["submit"]) == (1, 1)
    assert e.counters["poll"] >= 1


async def _not_synchronous(
    v: Verdict, e: CoreEmulator, r: CoreRuntime, t: Path
) -> None:
    assert e.counters["version"] == 1
    assert e.counters["sync"] == e.counters["no_sync"] == 0
    assert e.counters["poll"] >= 1


async def _sync_refused(v: Verdict, e: CoreEmulator, r: CoreRuntime, t: Path) -> None:
    # Tried once, then never again: the next file goes to POST /file.
    assert e.counters["no_sync"] == 1
    path = t / "again"
    path.write_bytes(b"again")
    assert (await r.scan(str(path), "again.txt")).allowed
    assert e.counters["no_sync"] == 1
    assert e.counters["submit"] == 2


async def _counted(e: CoreError, em: CoreEmulator, r: CoreRuntime, t: Path) -> None:
    (status,) = r.status()
    assert status.failures == 1 and not status.busy


async def _not_counted(e: CoreError, em: CoreEmulator, r: CoreRuntime, t: Path) -> None:
    (status,) = r.status()
    assert status.failures == 0 and not status.busy


BIG = b"x" * (4 << 20)

CASES = [
    Case(
        "clean, polled",
        b"hello",
        result="Allowed",
        check=_polled,
        config={"latency": 0.3},
        profile={"submit": "poll"},
    ),
    Case(
        "clean, synchronous",
        b"hello",
        result="Allowed",
        check=_one_request,
        config={"latency": 0.3},
    ),
    Case(
        "408, then polled",
        b"hello",
        result="Allowed",
        check=_polled_after_408,
        config={"latency": 0.5, "sync_timeout": 0.1},
    ),
    Case(
        "no /file/sync despite the version",
        b"hello",
        result="Allowed",
        check=_sync_refused,
        config={"shape": attrs.evolve(SHAPES["v4"], sync=False)},
    ),
    Case("infected", EICAR, "eicar.com", result="Blocked", reason="Infected"),
    Case(
        "zip with EICAR",
        zip_of({"eicar.com": EICAR}),
        "a.zip",
        result="Blocked",
        reason="Infected",
        check=_archive_child,
    ),
    Case(
        "nested archives",
        tar_of({"in.zip": nested_zip(EICAR, 2)}, "w:gz"),
        "a.tgz",
        result="Blocked",
        reason="Infected",
    ),
    Case(
        "encrypted archive",
        encrypted_zip({"a.txt": b"x"}, b"pw"),
        "e.zip",
        result="Blocked",
        reason="Encrypted Archive",
    ),
    Case(
        "DLP blocks", b"card " + CARD, result="Blocked", reason="Sensitive Data Found"
    ),
    Case(
        "DLP redacts",
        b"card " + CARD,
        config={"dlp_block": False},
        result="Allowed",
        check=_redacted,
    ),
    Case("Deep CDR", docx(macros=True), "m.docm", result="Allowed", check=_docm),
    Case(
        "Deep CDR fails",
        pdf(CDR_FAIL_MARKER),
        "x.pdf",
        result="Allowed",
        check=_cdr_failed,
    ),
    Case(
        "Failed",
        FAIL_MARKER,
        condition=Condition.PROCESSING_FAILED,
        check=_not_counted,
    ),
    Case(
        "Not Scanned",
        NOT_SCANNED_MARKER,
        condition=Condition.NOT_SCANNED,
        check=_not_counted,
    ),
    Case(
        "v5 extraction failed",
        zip_of({"a": b"b"})[:-30],
        "d.zip",
        config={"shape": SHAPES["v5"]},
        condition=Condition.PROCESSING_FAILED,
    ),
    Case(
        "early 4.x shapes",
        b"hello",
        config={"shape": SHAPES["early-v4"], "latency": 0.2},
        result="Allowed",
        check=_not_synchronous,
    ),
    Case(
        "v5 shapes",
        EICAR,
        config={"shape": SHAPES["v5"]},
        result="Blocked",
        reason="Infected",
    ),
    Case(
        "HTTP 500",
        b"x",
        knobs=lambda e: e.fail_next(1),
        condition=Condition.UNREACHABLE,
        check=_counted,
    ),
    Case(
        "503 without Retry-After",
        b"x",
        config={"queue_size": 0},
        condition=Condition.BUSY,
        check=_busy(1.0),
    ),
    Case(
        "503 with Retry-After",
        b"x",
        config={"queue_size": 0, "retry_after": 600},
        condition=Condition.BUSY,
        check=_busy_long,
    ),
    Case(
        "503 before the body",
        BIG,
        knobs=lambda e: e.early_busy_next(1),
        condition=Condition.BUSY,
        check=_busy(1.0),
    ),
    Case(
        "404 for a known id",
        b"x",
        knobs=lambda e: e.forget_next(1),
        result="Allowed",
        check=_resubmitted,
        profile={"submit": "poll"},
    ),
    Case(
        "200 not-found form",
        b"x",
        config={"not_found_status": 200},
        knobs=lambda e: e.forget_next(1),
        result="Allowed",
        check=_resubmitted,
        profile={"submit": "poll"},
    ),
    Case(
        "id never found",
        b"x",
        knobs=lambda e: e.forget_next(10),
        condition=Condition.UNREACHABLE,
        check=_three_uploads,
        profile={"submit": "poll"},
    ),
    Case(
        "id lost after a 408",
        b"x",
        config={"latency": 0.5, "sync_timeout": 0.1},
        knobs=lambda e: e.forget_next(1),
        result="Allowed",
        check=_resubmitted,
    ),
    Case(
        "hang",
        b"x",
        knobs=lambda e: e.hang_next(1),
        condition=Condition.UNREACHABLE,
        client={"request_timeout": 0.5},
        check=_counted,
    ),
    Case(
        "reset mid-upload",
        BIG,
        knobs=lambda e: e.reset_next(1),
        condition=Condition.UNREACHABLE,
        check=_counted,
    ),
    Case(
        "stalled poll",
        b"x",
        knobs=lambda e: e.stall_next(1),
        condition=Condition.UNREACHABLE,
        client={"body_timeout": 0.5},
        profile={"submit": "poll"},
    ),
    Case(
        "slower than scan_timeout",
        b"x",
        config={"latency": 30.0},
        profile={"scan_timeout": 1.0, "submit": "poll"},
        condition=Condition.SCAN_TIMEOUT,
        check=_cancelled,
    ),
    Case(
        "slower than scan_timeout, synchronous",
        b"x",
        config={"latency": 30.0},
        profile={"scan_timeout": 1.0},
        condition=Condition.SCAN_TIMEOUT,
        check=_counted,
    ),
]


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_matrix(tmp_path: Path, case: Case) -> None:
    """
    The runtime over one emulated server reaches the expected verdict or
    error condition for each behaviour of the server.
    """
    emulator = CoreEmulator(reactor, EmulatorConfig(**case.config))
    server = EmulatorServer(reactor, emulator)
    server.start()
    profile = CoreProfile(
        name="m",
        servers=(CoreServer(server.url),),
        poll_interval=0.05,
        **case.profile,
    )
    runtime = CoreRuntime.from_profile(
        profile, reactor, busy_backoff=1.0, **case.client
    )
    path = tmp_path / "in"
    path.write_bytes(case.data)
    case.knobs(emulator)
    try:
        try:
            outcome: Any = await runtime.scan(str(path), case.filename)
        except CoreError as e:
            outcome = e
        if case.condition is not None:
            assert isinstance(outcome, CoreError), outcome
            assert outcome.condition is case.condition, str(outcome)
        else:
            assert isinstance(outcome, Verdict), str(outcome)
            assert outcome.result == case.result
            assert outcome.blocked_reason == case.reason
        if case.check is not None:
            await case.check(outcome, emulator, runtime, tmp_path)
    finally:
        await runtime.close()
        await server.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_overload(tmp_path: Path) -> None:
    """
    40 scans at once against a queue of 5: some get through, the rest are
    I{busy} (never another condition), the queue limit holds (never more
    than 5 in flight), and the server is not counted as failing.
    """
    emulator = CoreEmulator(reactor, EmulatorConfig(latency=0.3, queue_size=5))
    server = EmulatorServer(reactor, emulator)
    server.start()
    profile = CoreProfile(
        name="o", servers=(CoreServer(server.url),), poll_interval=0.05, concurrency=40
    )
    runtime = CoreRuntime.from_profile(profile, reactor, queue_bound=100)
    peak = 0

    def watch() -> None:
        nonlocal peak
        peak = max(peak, emulator.in_flight)

    watcher = task.LoopingCall(watch)
    watcher.start(0.01)
    paths = []
    for i in range(40):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"file %d" % i)
        paths.append(str(path))

    async def one(path: str) -> str:
        try:
            return (await runtime.scan(path, "f.txt")).result
        except CoreError as e:
            return e.condition.value

    try:
        outcomes = await gatherResults([Deferred.fromCoroutine(one(p)) for p in paths])
        assert set(outcomes) == {"Allowed", "busy"}, outcomes
        assert peak <= 5
        assert runtime.status()[0].failures == 0
    finally:
        watcher.stop()
        await runtime.close()
        await server.close()
