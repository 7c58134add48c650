# -*- test-case-name: tests.test_core_runtime -*-
"""
The circuit breaker of one Core server, as a pure state machine.

It counts what the server's answers say about its health, across every
file and message it scans: a server fault (no connection, no answer in
time, a 5xx, a wrong API key, a scan that never completed) or a healthy
answer (a verdict, a download, a good probe). Answers about the file
itself (Failed, Not Scanned, an empty file, a 503 busy) say nothing about
health and are not counted at all, so they neither trip the breaker nor
hide a run of faults.

The server goes down when at least C{threshold} of its last
C{2 x threshold} counted outcomes of the last C{window} seconds were
faults: C{threshold} faults in a row trip it as before, and so does a
failure rate of one half or more, which a consecutive count would miss
while other files still get through. A down server gets work again only
after a probe succeeds, and then on trial: its next fault takes it down
at once.

Times are passed in, never read, so the runtime decides which clock counts
and tests need no reactor at all.
"""

from __future__ import annotations

import collections

import attrs

#: Seconds an outcome counts for.
WINDOW = 60.0


@attrs.define
class CircuitBreaker:
    """
    The health of one server.

    @ivar down_since: when the server went down (or the last probe failed),
        C{None} while up.
    @ivar on_trial: the server came back after a probe and has not answered
        well since; one fault takes it down again.
    """

    threshold: int
    retry_after: float
    window: float = WINDOW
    down_since: float | None = None
    on_trial: bool = False
    _outcomes: collections.deque[tuple[float, bool]] = attrs.field(
        factory=collections.deque, init=False, repr=False
    )
    _probe_failures: int = attrs.field(default=0, init=False)

    @property
    def up(self) -> bool:
        """
        Whether the server may get work.
        """
        return self.down_since is None

    @property
    def failures(self) -> int:
        """
        Faults that currently count: those in the window, plus failed
        probes while down.
        """
        return sum(1 for _, ok in self._outcomes if not ok) + self._probe_failures

    def _keep(self, now: float) -> None:
        horizon = now - self.window
        outcomes = self._outcomes
        while outcomes and (
            outcomes[0][0] < horizon or len(outcomes) > 2 * max(1, self.threshold)
        ):
            outcomes.popleft()

    def failure(self, now: float) -> bool:
        """
        Count a server fault; return C{True} if it took the server down.
        """
        self._outcomes.append((now, False))
        self._keep(now)
        if self.down_since is not None:
            return False
        faults = sum(1 for _, ok in self._outcomes if not ok)
        if self.on_trial or faults >= max(1, self.threshold):
            self.down_since = now
            self.on_trial = False
            return True
        return False

    def success(self, now: float) -> None:
        """
        Count a healthy answer. It ends a trial but never brings a down
        server back: only a probe does (a scan that started before the
        outage may still finish well).
        """
        self._outcomes.append((now, True))
        self._keep(now)
        if self.down_since is None:
            self.on_trial = False

    def probe_succeeded(self) -> bool:
        """
        The probe answered: the server is up, on trial, with a clean slate.
        Return C{True} if it was down.
        """
        was_down = self.down_since is not None
        self.down_since = None
        self._outcomes.clear()
        self._probe_failures = 0
        self.on_trial = was_down
        return was_down

    def probe_failed(self, now: float) -> None:
        """
        The probe failed: wait C{retry_after} again.
        """
        self._probe_failures += 1
        self.down_since = now

    def probe_due(self, now: float) -> bool:
        """
        Whether a down server should be probed now.
        """
        return self.down_since is not None and now >= self.down_since + self.retry_after

    def next_probe(self) -> float | None:
        """
        When the next probe is due, or C{None} while up.
        """
        if self.down_since is None:
            return None
        return self.down_since + self.retry_after
