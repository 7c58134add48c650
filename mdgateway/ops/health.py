# -*- test-case-name: tests.test_health -*-
"""
What a gateway instance reports about itself and about what it shares with
the others.

Readiness (C{/readyz}) answers one question for a load balancer: should
this instance get new connections? Only what this instance alone can fix
may say no (not listening, spool not writable, draining). Core servers,
relays and the store are shared by every instance: when one of them is out,
every instance would turn red together and the balancer would have nowhere
to send a client, which then gets a closed connection instead of an SMTP
answer. So they are reported beside readiness (L{Dependencies}), in
metrics and in C{/api/health}, and answered in SMTP (C{451 4.3.2} at RCPT
where a rule's policy says to retry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mdgateway.policy.profiles import SmtpProfile
from mdgateway.policy.rules import Policy

log = Logger()


class Checkable(Protocol):
    """
    What L{StoreWatch} asks of a store (L{IStore.check}).
    """

    async def check(self) -> None: ...


def _when(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


class StoreWatch:
    """
    Checks the store with one cheap round trip every C{interval} seconds,
    so its state is known without waiting for a write to fail, and is
    reported the moment it changes.
    """

    def __init__(
        self, store: Checkable, clock: IReactorTime, interval: float = 5.0
    ) -> None:
        self._store = store
        self._clock = clock
        self._interval = interval
        self._loop = LoopingCall(self._check)
        self._loop.clock = clock
        self.ok: bool | None = None
        self.error: str | None = None
        self.since: float | None = None

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self._interval, now=True).addErrback(
                lambda f: log.failure("store check loop failed", f)
            )

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    async def _check(self) -> None:
        try:
            await self._store.check()
        except Exception as e:
            self._set(False, str(e) or type(e).__name__)
        else:
            self._set(True, None)

    def _set(self, ok: bool, error: str | None) -> None:
        if ok != self.ok:
            self.since = self._clock.seconds()
            if ok and self.ok is not None:
                log.info("store reachable again")
            elif not ok:
                log.error("store unreachable: {error}", error=error)
        self.ok, self.error = ok, error

    def state(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "since": _when(self.since)}


class Dependencies:
    """
    The state of the shared services this instance uses, for C{/readyz}'s
    details and C{/api/health}.

    @param policy: the policy in force (its Core and relay profiles in use).
    @param core_status: a Core profile's server statuses (C{ServerStatus})
        by profile name, or C{None} before its runtime exists.
    @param relay_healthy: whether some server of a relay profile answered
        lately.
    @param relay_throttled_until: until when a relay profile gets no mail.
    """

    def __init__(
        self,
        *,
        policy: Callable[[], Policy],
        core_status: Callable[[str], Iterable[Any] | None],
        relay_healthy: Callable[[SmtpProfile], bool],
        relay_throttled_until: Callable[[SmtpProfile], float],
        store: StoreWatch,
    ) -> None:
        self._policy = policy
        self._core_status = core_status
        self._relay_healthy = relay_healthy
        self._relay_throttled_until = relay_throttled_until
        self.store = store

    def report(self) -> dict[str, Any]:
        """
        C{core}: each Core profile in use, whether it can take work (and
        why not: C{core_unreachable}, C{core_busy}) and its servers;
        C{relay}: each relay profile in use, healthy and throttled;
        C{store}: reachable, since when, the last error.
        """
        policy = self._policy()
        core: dict[str, Any] = {}
        for profile in policy.core_profiles_in_use():
            statuses = list(self._core_status(profile.name) or ())
            servers = [
                {
                    "url": s.url,
                    "up": s.up,
                    "busy": s.busy,
                    "in_flight": s.in_flight,
                    "queued": s.queued,
                    "failures": s.failures,
                }
                for s in statuses
            ]
            condition = None
            if statuses and not any(s.up and not s.busy for s in statuses):
                up = any(s.up for s in statuses)
                condition = "core_busy" if up else "core_unreachable"
            core[profile.name] = {
                "available": condition is None,
                "condition": condition,
                "servers": servers,
            }
        relay: dict[str, Any] = {}
        for smtp in policy.smtp_profiles_in_use():
            until = self._relay_throttled_until(smtp)
            relay[smtp.name] = {
                "healthy": self._relay_healthy(smtp),
                "throttled_until": _when(until) if until else None,
            }
        return {"core": core, "relay": relay, "store": self.store.state()}


def summary(dependencies: Mapping[str, Any]) -> dict[str, Any]:
    """
    The short form for C{/readyz}: each Core and relay profile and the
    store as ok or not (C{/api/health} has the details).
    """
    core = dependencies.get("core", {})
    relay = dependencies.get("relay", {})
    store = dependencies.get("store", {})
    return {
        "core": {name: bool(state.get("available")) for name, state in core.items()},
        "relay": {
            name: bool(state.get("healthy")) and not state.get("throttled_until")
            for name, state in relay.items()
        },
        "store": store.get("ok") is not False,
    }
