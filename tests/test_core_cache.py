"""
Tests for the verdict cache (L{mdgateway.scan.cache}): what is kept and
for how long (with a L{task.Clock}), its bounds, identical files scanned
once, and the cache in the profile runtime against the emulator over
loopback (uploads counted at the emulator), with its metric and history
line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.emulator.app import EmulatorConfig
from mdgateway.emulator.detect import EICAR
from mdgateway.ops.metrics import Metrics
from mdgateway.policy.profiles import CoreServer
from mdgateway.queue.copies import PartReport
from mdgateway.queue.report import reused_verdicts
from mdgateway.scan.cache import (
    HIT,
    MAX_WEIGHT,
    MISS,
    SHARED,
    CacheKey,
    VerdictCache,
    cacheable,
)
from mdgateway.scan.errors import Condition, CoreError
from mdgateway.scan.verdict import (
    FROM_CORE_HASH,
    FROM_VERDICT_CACHE,
    ArchiveChild,
    DlpHit,
    DlpResult,
    EngineResult,
    Outcome,
    Verdict,
)
from mdgateway.testing.core import clean_verdict
from tests.corerig import CoreRig
from tests.coresamples import docx
from tests.test_metrics import value

SERVER = CoreServer("http://core:8008")
KEY = CacheKey("ab" * 32, "a.pdf", "Default")


def blocked_verdict() -> Verdict:
    return attrs.evolve(
        clean_verdict(SERVER, "1" * 32),
        outcome=Outcome.BLOCKED,
        result="Blocked",
        blocked_reason="Infected",
        scan_all_result_i=1,
        scan_all_result_a="Infected",
        engines=(EngineResult("AV", 1, "EICAR"),),
    )


class CacheableTests(SynchronousTestCase):
    """
    Only verdicts that would come out the same again, and need nothing
    from Core later, are kept.
    """

    def test_allowed_and_blocked(self) -> None:
        """
        A clean Allowed and an Infected Blocked verdict are kept.
        """
        self.assertTrue(cacheable(clean_verdict(SERVER)))
        self.assertTrue(cacheable(blocked_verdict()))

    def test_not_definitive(self) -> None:
        """
        An unknown result, a processing failure (Failed, Not Scanned), a
        failed post-processing action and a failed DLP run are not kept.
        """
        clean = clean_verdict(SERVER)
        for name, verdict in (
            ("other", attrs.evolve(clean, outcome=Outcome.OTHER, result="Odd")),
            ("failed", attrs.evolve(clean, scan_all_result_i=3)),
            ("not scanned", attrs.evolve(clean, scan_all_result_i=10)),
            (
                "cdr failed",
                attrs.evolve(clean, actions_failed=("Sanitization Failed",)),
            ),
            ("dlp failed", attrs.evolve(clean, dlp=DlpResult(verdict=3))),
        ):
            self.assertFalse(cacheable(verdict), name)

    def test_converted_files_not_kept(self) -> None:
        """
        A sanitized or DLP-redacted or watermarked verdict needs its
        converted file from Core (under its own data_id): not kept.
        """
        clean = clean_verdict(SERVER)
        for name, verdict in (
            (
                "sanitized",
                attrs.evolve(
                    clean,
                    sanitized=True,
                    actions_ran=("Sanitized",),
                    converted_name="a_sanitized.pdf",
                ),
            ),
            ("redacted", attrs.evolve(clean, dlp=DlpResult(1, redacted=True))),
            ("watermarked", attrs.evolve(clean, dlp=DlpResult(0, watermarked=True))),
        ):
            self.assertFalse(cacheable(verdict), name)
        hits = DlpResult(1, hits=(DlpHit("ccn", "Card", "XXXX1111"),))
        self.assertTrue(cacheable(attrs.evolve(blocked_verdict(), dlp=hits)))

    def test_too_big(self) -> None:
        """
        A verdict listing more than L{MAX_WEIGHT} lines is not kept.
        """
        child = ArchiveChild("c" * 32, "a.zip/x", 0)
        fits = attrs.evolve(clean_verdict(SERVER), children=(child,) * (MAX_WEIGHT - 1))
        self.assertTrue(cacheable(fits))
        self.assertFalse(cacheable(attrs.evolve(fits, children=(child,) * MAX_WEIGHT)))


class VerdictCacheTests(SynchronousTestCase):
    """
    Keeping, expiring and bounding.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = VerdictCache(self.clock, ttl=60.0, size=3)

    def test_kept_for_ttl(self) -> None:
        """
        A verdict is there until C{ttl} seconds after it was put, then
        gone.
        """
        verdict = clean_verdict(SERVER)
        self.assertTrue(self.cache.put(KEY, verdict))
        self.clock.advance(59.9)
        self.assertEqual(self.cache.get(KEY), verdict)
        self.clock.advance(0.1)
        self.assertIsNone(self.cache.get(KEY))
        self.assertEqual(len(self.cache), 0)
        self.assertEqual(self.cache.weight, 0)

    def test_key_parts(self) -> None:
        """
        Another content, name or rule is another file.
        """
        self.cache.put(KEY, clean_verdict(SERVER))
        for other in (
            attrs.evolve(KEY, sha256="cd" * 32),
            attrs.evolve(KEY, filename="a.exe"),
            attrs.evolve(KEY, rule="Email Security"),
        ):
            self.assertIsNone(self.cache.get(other), other)
        self.assertIsNotNone(self.cache.get(KEY))

    def test_uncacheable_not_put(self) -> None:
        """
        L{VerdictCache.put} refuses what is not L{cacheable}.
        """
        failed = attrs.evolve(clean_verdict(SERVER), scan_all_result_i=3)
        self.assertFalse(self.cache.put(KEY, failed))
        self.assertIsNone(self.cache.get(KEY))

    def test_size_bound(self) -> None:
        """
        Beyond C{size} verdicts the oldest goes first.
        """
        keys = [attrs.evolve(KEY, sha256=f"{i:064x}") for i in range(4)]
        for key in keys:
            self.cache.put(key, clean_verdict(SERVER))
            self.clock.advance(1)
        self.assertEqual(len(self.cache), 3)
        self.assertIsNone(self.cache.get(keys[0]))
        self.assertTrue(all(self.cache.get(k) is not None for k in keys[1:]))

    def test_weight_bound(self) -> None:
        """
        Together the kept verdicts list at most 16 lines per verdict of
        the size bound: heavy verdicts push the oldest out sooner.
        """
        heavy = attrs.evolve(
            clean_verdict(SERVER), engines=(EngineResult("AV", 0),) * 30
        )
        first, second = attrs.evolve(KEY, sha256="1" * 64), KEY
        self.cache.put(first, heavy)
        self.cache.put(second, heavy)
        self.assertLessEqual(self.cache.weight, 3 * 16)
        self.assertIsNone(self.cache.get(first))
        self.assertIsNotNone(self.cache.get(second))

    def test_put_again_replaces(self) -> None:
        """
        Putting a key again replaces its verdict and restarts its time,
        without counting its weight twice.
        """
        self.cache.put(KEY, clean_verdict(SERVER))
        self.clock.advance(50)
        newer = clean_verdict(SERVER, "9" * 32)
        self.cache.put(KEY, newer)
        self.assertEqual(self.cache.weight, 1)
        self.clock.advance(50)
        self.assertEqual(self.cache.get(KEY), newer)

    def test_bad_settings(self) -> None:
        """
        A cache needs a positive ttl and size.
        """
        self.assertRaises(ValueError, VerdictCache, self.clock, 0, 10)
        self.assertRaises(ValueError, VerdictCache, self.clock, 10, 0)


class ThroughTests(SynchronousTestCase):
    """
    L{VerdictCache.through}: reuse, sharing a scan in progress, and what
    is not shared.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = VerdictCache(self.clock, ttl=60.0, size=100)
        self.scans: list[Deferred[Verdict]] = []
        self.reports: list[str] = []

    def scan(self) -> Deferred[Verdict]:
        d: Deferred[Verdict] = Deferred()
        self.scans.append(d)
        return d

    def through(self, key: CacheKey = KEY) -> Deferred[Verdict]:
        async def scan() -> Verdict:
            return await self.scan()

        return Deferred.fromCoroutine(
            self.cache.through(key, scan, self.reports.append)
        )

    def test_hit_marked(self) -> None:
        """
        The second file is answered from the cache without a scan, and
        its verdict says it came from the verdict cache.
        """
        first = self.through()
        verdict = clean_verdict(SERVER)
        self.scans[0].callback(verdict)
        self.assertEqual(self.successResultOf(first), verdict)
        again = self.successResultOf(self.through())
        self.assertEqual(len(self.scans), 1)
        self.assertEqual(again.cache, FROM_VERDICT_CACHE)
        self.assertEqual(again.data_id, verdict.data_id)
        self.assertEqual(self.reports, [MISS, HIT])

    def test_identical_files_share_one_scan(self) -> None:
        """
        Five identical files at once start one scan; the other four get
        its verdict when it ends.
        """
        results = [self.through() for _ in range(5)]
        self.assertEqual(len(self.scans), 1)
        self.assertNoResult(results[1])
        self.scans[0].callback(blocked_verdict())
        verdicts = [self.successResultOf(r) for r in results]
        self.assertTrue(all(v.blocked for v in verdicts))
        self.assertEqual([v.cache for v in verdicts], [""] + [FROM_VERDICT_CACHE] * 4)
        self.assertEqual(sorted(self.reports), sorted([MISS] + [SHARED] * 4))

    def test_failure_not_shared(self) -> None:
        """
        When the first scan fails, the files that waited for it are
        scanned each on their own, and nothing is kept.
        """
        first, second = self.through(), self.through()
        self.scans[0].errback(CoreError(Condition.BUSY, "busy"))
        self.failureResultOf(first, CoreError)
        self.assertEqual(len(self.scans), 2)
        self.scans[1].callback(clean_verdict(SERVER))
        self.assertEqual(self.successResultOf(second).cache, "")
        self.assertEqual(self.reports, [MISS])

    def test_uncacheable_not_shared(self) -> None:
        """
        A verdict that cannot be kept (a sanitized file) is not handed to
        the files that waited: they are scanned themselves.
        """
        first, second = self.through(), self.through()
        sanitized = attrs.evolve(
            clean_verdict(SERVER), sanitized=True, converted_name="x.pdf"
        )
        self.scans[0].callback(sanitized)
        self.assertEqual(self.successResultOf(first), sanitized)
        self.assertEqual(len(self.scans), 2)
        self.scans[1].callback(sanitized)
        self.assertEqual(self.successResultOf(second).cache, "")
        self.assertIsNone(self.cache.get(KEY))

    def test_other_key_not_shared(self) -> None:
        """
        A different file scanned at the same time starts its own scan.
        """
        self.through()
        self.through(attrs.evolve(KEY, filename="b.pdf"))
        self.assertEqual(len(self.scans), 2)


# -- in the runtime, against the emulator --------------------------------------


class Rig(CoreRig):
    """
    The Core rig with a verdict cache's reports counted in metrics.
    """

    def __init__(
        self, tmp_path: Path, config: EmulatorConfig | None = None, **profile: Any
    ) -> None:
        self.metrics = Metrics()
        super().__init__(
            tmp_path, config, name="c", on_cache=self.metrics.core_cache, **profile
        )

    def counted(self, result: str) -> float:
        """
        What C{mdgateway_core_cache_total} counts for C{result} (0 when it
        has no sample).
        """
        counted = value(
            self.metrics, "mdgateway_core_cache_total", profile="c", result=result
        )
        return counted or 0.0


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_mass_mail_scanned_once(tmp_path: Path) -> None:
    """
    The same attachment in 20 messages at once, then in 5 more: Core gets
    one upload; every verdict after the first says it came from the
    cache, and the metric counts 1 miss, 19 shared, 5 hits.
    """
    rig = Rig(tmp_path)
    try:
        paths = [rig.file(f"copy{i}", b"the same newsletter") for i in range(25)]
        first = await gatherResults(
            [
                Deferred.fromCoroutine(rig.runtime.scan(p, "news.pdf"))
                for p in paths[:20]
            ]
        )
        later = [await rig.runtime.scan(p, "news.pdf") for p in paths[20:]]
        verdicts = [*first, *later]
        assert all(v.allowed for v in verdicts)
        assert rig.emulator.counters["submit"] == 1
        assert sum(1 for v in verdicts if v.cache == FROM_VERDICT_CACHE) == 24
        assert len({v.data_id for v in verdicts}) == 1
        assert (rig.counted(MISS), rig.counted(SHARED), rig.counted(HIT)) == (
            1.0,
            19.0,
            5.0,
        )
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_blocked_reused(tmp_path: Path) -> None:
    """
    A Blocked verdict (EICAR) is reused for the same file: blocked again,
    without an upload.
    """
    rig = Rig(tmp_path)
    try:
        path = rig.file("e.com", EICAR)
        assert (await rig.runtime.scan(path, "e.com")).blocked
        again = await rig.runtime.scan(path, "e.com")
        assert again.blocked and again.blocked_reason == "Infected"
        assert again.cache == FROM_VERDICT_CACHE
        assert rig.emulator.counters["submit"] == 1
    finally:
        await rig.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_what_is_scanned_again(tmp_path: Path) -> None:
    """
    Scanned again: the same bytes under another name, a sanitized
    document (its converted file belongs to its own scan), and anything
    once the profile's cache is off.
    """
    rig = Rig(tmp_path)
    try:
        path = rig.file("a", b"content")
        await rig.runtime.scan(path, "a.txt")
        await rig.runtime.scan(path, "a.exe")
        document = rig.file("d.docx", docx())
        one = await rig.runtime.scan(document, "d.docx")
        two = await rig.runtime.scan(document, "d.docx")
        assert one.sanitized and two.sanitized and two.cache == ""
        assert one.data_id != two.data_id
        assert rig.emulator.counters["submit"] == 4
    finally:
        await rig.close()
    off = Rig(tmp_path, verdict_cache=0.0)
    try:
        assert off.runtime.cache is None
        path = off.file("b", b"content")
        await off.runtime.scan(path, "b.txt")
        await off.runtime.scan(path, "b.txt")
        assert off.emulator.counters["submit"] == 2
        assert off.counted(MISS) == 0.0
    finally:
        await off.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_errors_not_kept(tmp_path: Path) -> None:
    """
    A scan that failed (Core's 500) leaves nothing in the cache: the same
    file is uploaded again and then gets its verdict.
    """
    rig = Rig(tmp_path, submit="poll")
    try:
        path = rig.file("a", b"content")
        rig.emulator.fail_next(1)
        with pytest.raises(CoreError):
            await rig.runtime.scan(path, "a.txt")
        assert (await rig.runtime.scan(path, "a.txt")).allowed
        assert rig.emulator.counters["submit"] == 1  # the 500 came before it
        assert rig.runtime.cache is not None and len(rig.runtime.cache) == 1
    finally:
        await rig.close()


def test_history_line() -> None:
    """
    A part whose verdict was reused gets one history line saying where
    from (and which Core scan it was); a new scan gets none.
    """
    parts = [
        PartReport("1", "body.txt", "text/plain", 10, "Allowed"),
        PartReport(
            "2",
            "news.pdf",
            "application/pdf",
            99,
            "Allowed",
            data_id="d" * 32,
            cache=FROM_VERDICT_CACHE,
        ),
        PartReport(
            "3", "x.doc", "application/msword", 5, "Allowed", cache=FROM_CORE_HASH
        ),
    ]
    assert reused_verdicts(parts) == (
        f"verdict of part 2 (news.pdf) reused from the verdict cache"
        f" (Core data_id {'d' * 32})",
        "verdict of part 3 (x.doc) from Core's hash lookup",
    )
