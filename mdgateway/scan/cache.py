# -*- test-case-name: tests.test_core_cache -*-
"""
The verdict cache: a definitive verdict reused, for a short time, for a
file with the same content, name and Core rule.

Mass mail carries one attachment to many recipients, often as many
messages at once; each would be uploaded and scanned again for the same
answer. L{VerdictCache.through} keeps what a scan decided for C{ttl}
seconds, keyed by the file's SHA-256, its name (Core's verdict can depend
on it: a type that does not match the extension) and the profile's rule,
and lets identical files that arrive while the first is being scanned wait
for that scan instead of starting their own.

Only verdicts that would come out the same again are kept: Allowed or
Blocked, no processing failure, no failed post-processing or DLP, and no
converted file (a sanitized or redacted part needs that file from Core,
under the C{data_id} of its own scan). The price is that content Core
learns to be malicious within the C{ttl} of a clean verdict passes for
that long as clean, which is why the time is short: a message arriving a
moment before the update would have passed all the same.

Memory is bounded twice: at most C{size} verdicts, and in all at most
L{WEIGHT_PER_ENTRY} times as many lines (engines, archive entries, DLP
hits) as that; a verdict with more than L{MAX_WEIGHT} is not kept.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mdgateway.scan.verdict import (
    FROM_VERDICT_CACHE,
    Outcome,
    Verdict,
    failure_condition,
)

#: Lines (engines, archive entries, DLP hits) one cached verdict may list.
MAX_WEIGHT = 256
#: The lines all cached verdicts may list together, per verdict of the
#: size bound (a verdict with a dozen engines weighs about 13).
WEIGHT_PER_ENTRY = 16

#: What L{VerdictCache.through} reports: a kept verdict reused, a verdict
#: shared with an identical file scanned at the same time, a new scan.
HIT = "hit"
SHARED = "shared"
MISS = "miss"

#: C{dlp_info.verdict} of a DLP run that failed.
_DLP_FAILED = 3


@attrs.frozen
class CacheKey:
    """
    What makes two files the same for Core: content, name and rule.
    """

    sha256: str
    filename: str
    rule: str


def weight(verdict: Verdict) -> int:
    """
    The lines a verdict holds, a measure of its memory.
    """
    hits = len(verdict.dlp.hits) if verdict.dlp is not None else 0
    return 1 + len(verdict.engines) + len(verdict.children) + hits


def cacheable(verdict: Verdict) -> bool:
    """
    Whether C{verdict} would be the same for the same file again, and
    needs nothing from Core later: Allowed or Blocked, not a failure, no
    failed post-processing or DLP, no converted file, and not too big.
    """
    if verdict.outcome not in (Outcome.ALLOWED, Outcome.BLOCKED):
        return False
    if failure_condition(verdict) is not None or verdict.actions_failed:
        return False
    dlp = verdict.dlp
    if dlp is not None and (
        dlp.redacted or dlp.watermarked or dlp.verdict == _DLP_FAILED
    ):
        return False
    if verdict.sanitized or verdict.converted_name:
        return False
    return weight(verdict) <= MAX_WEIGHT


class VerdictCache:
    """
    Verdicts of recent scans by L{CacheKey}, kept for C{ttl} seconds.

    @param clock: tells the time (injected, so tests control expiry).
    @param ttl: seconds a verdict is reused after its scan ended.
    @param size: verdicts kept at most; the oldest go first.
    """

    def __init__(self, clock: IReactorTime, ttl: float, size: int) -> None:
        if ttl <= 0 or size < 1:
            raise ValueError("a verdict cache needs a positive ttl and size")
        self._clock = clock
        self._ttl = ttl
        self._size = size
        self._max_weight = size * WEIGHT_PER_ENTRY
        self._weight = 0
        # Insertion order is expiry order: every entry lives ttl seconds.
        self._entries: collections.OrderedDict[CacheKey, tuple[float, Verdict]] = (
            collections.OrderedDict()
        )
        self._scanning: dict[CacheKey, list[Deferred[Verdict | None]]] = {}

    def __len__(self) -> int:
        self._expire(self._clock.seconds())
        return len(self._entries)

    @property
    def weight(self) -> int:
        """
        The lines of all kept verdicts together.
        """
        return self._weight

    def get(self, key: CacheKey) -> Verdict | None:
        """
        The kept verdict for C{key}, unless it has expired.
        """
        self._expire(self._clock.seconds())
        entry = self._entries.get(key)
        return entry[1] if entry is not None else None

    def put(self, key: CacheKey, verdict: Verdict) -> bool:
        """
        Keep C{verdict} for C{key} if it is L{cacheable}; whether it was.
        """
        if not cacheable(verdict):
            return False
        now = self._clock.seconds()
        self._expire(now)
        self._drop(key)
        self._entries[key] = (now + self._ttl, verdict)
        self._weight += weight(verdict)
        while len(self._entries) > self._size or self._weight > self._max_weight:
            oldest = next(iter(self._entries))
            self._drop(oldest)
        return True

    async def through(
        self,
        key: CacheKey,
        scan: Callable[[], Awaitable[Verdict]],
        report: Callable[[str], None] = lambda result: None,
    ) -> Verdict:
        """
        The kept verdict for C{key}; else the verdict of the scan of an
        identical file already running; else C{scan()}'s, kept if it can
        be. A reused verdict says so (C{cache} is L{FROM_VERDICT_CACHE});
        C{report} is told which of L{HIT}, L{SHARED}, L{MISS} it was.

        A failed scan (or one whose verdict cannot be kept) is not shared:
        the files that waited for it are scanned each on their own.
        """
        kept = self.get(key)
        if kept is not None:
            report(HIT)
            return attrs.evolve(kept, cache=FROM_VERDICT_CACHE)
        waiting = self._scanning.get(key)
        if waiting is not None:
            shared: Deferred[Verdict | None] = Deferred()
            waiting.append(shared)
            verdict = await shared
            if verdict is not None:
                report(SHARED)
                return attrs.evolve(verdict, cache=FROM_VERDICT_CACHE)
            report(MISS)
            return await scan()
        waiters: list[Deferred[Verdict | None]] = []
        self._scanning[key] = waiters
        kept_verdict: Verdict | None = None
        try:
            verdict = await scan()
            if self.put(key, verdict):
                kept_verdict = verdict
        finally:
            del self._scanning[key]
            # Each waiter runs on to its own next step in turn.
            for shared in waiters:
                shared.callback(kept_verdict)
        report(MISS)
        return verdict

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._weight -= weight(entry[1])

    def _expire(self, now: float) -> None:
        while self._entries:
            key, (expires, _) = next(iter(self._entries.items()))
            if expires > now:
                return
            self._drop(key)
