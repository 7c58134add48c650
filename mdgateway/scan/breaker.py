# -*- test-case-name: tests.test_core_runtime -*-
"""
The circuit breaker of one Core server, as a pure state machine.

Times are passed in, never read, so the runtime decides which clock counts
and tests need no reactor at all.
"""

from __future__ import annotations

import attrs


@attrs.define
class CircuitBreaker:
    """
    Up until C{threshold} consecutive failures, then down until a probe
    succeeds; a probe is due C{retry_after} seconds after the server went
    down or after the last failed probe.

    @ivar failures: consecutive failures so far.
    @ivar down_since: when the server went down (or the last probe failed),
        C{None} while up.
    """

    threshold: int
    retry_after: float
    failures: int = 0
    down_since: float | None = None

    @property
    def up(self) -> bool:
        """
        Whether the server may get work.
        """
        return self.down_since is None

    def failure(self, now: float) -> bool:
        """
        Count a failure; return C{True} if it took the server down.
        """
        self.failures += 1
        if self.down_since is None and self.failures >= max(1, self.threshold):
            self.down_since = now
            return True
        return False

    def success(self) -> bool:
        """
        Reset the count (a good answer or a good probe); return C{True} if
        the server came back up.
        """
        was_down = self.down_since is not None
        self.failures = 0
        self.down_since = None
        return was_down

    def probe_failed(self, now: float) -> None:
        """
        The probe failed: wait C{retry_after} again.
        """
        self.failures += 1
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
