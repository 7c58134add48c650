"""
What an instance reports about the services it shares with the others:
the store check, the dependency report and its summary for C{/readyz}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.config import parse_config
from mdgateway.ops.health import Dependencies, StoreWatch, summary
from mdgateway.store.interfaces import StoreError

CONFIG = """
sender_helo_domain = "gw.test"
[[listeners]]
name = "smtp"
endpoint = "tcp:10025:interface=127.0.0.1"
[spool]
directory = "/tmp/unused"
[profiles.core.c]
servers = ["http://127.0.0.1:8008", "http://127.0.0.2:8008"]
[profiles.core.idle]
servers = ["http://127.0.0.3:8008"]
[profiles.smtp.a]
servers = ["smtp://10.0.0.1:25"]
[[rules]]
name = "inbound"
recipients = ["example.org"]
core_profile = "c"
relay_profile = "a"
"""


class SwitchableStore:
    """
    A store whose check succeeds or fails as the test says.
    """

    def __init__(self) -> None:
        self.down = False
        self.checks = 0

    async def check(self) -> None:
        self.checks += 1
        if self.down:
            raise StoreError("connection refused")


@attrs.frozen
class Status:
    url: str
    up: bool
    busy: bool = False
    in_flight: int = 0
    queued: int = 0
    failures: int = 0


class StoreWatchTests(SynchronousTestCase):
    def test_checks_every_interval_and_logs_changes(self) -> None:
        """
        The store is checked at start and every interval; a change is
        logged once (error when it goes, info when it is back) with the
        time it changed.
        """
        clock = Clock()
        store = SwitchableStore()
        watch = StoreWatch(store, clock, interval=5)
        self.assertEqual(watch.state(), {"ok": None, "error": None, "since": None})
        with capturedLogs() as events:
            watch.start()
            self.assertEqual((store.checks, watch.ok), (1, True))
            store.down = True
            clock.advance(5)
            self.assertEqual(watch.state()["error"], "connection refused")
            self.assertIs(watch.ok, False)
            clock.advance(5)
            store.down = False
            clock.advance(5)
        self.assertIs(watch.ok, True)
        self.assertEqual(watch.state()["since"], "1970-01-01T00:00:15+00:00")
        self.assertEqual(
            [e["log_level"].name for e in events], ["error", "info"], events
        )
        watch.stop()
        clock.advance(60)
        self.assertEqual(store.checks, 4)


class DependenciesTests(SynchronousTestCase):
    def report(self, statuses: dict[str, list[Status]], healthy: bool = True) -> Any:
        import tomllib

        policy = parse_config(tomllib.loads(CONFIG), base=Path("/tmp")).policy
        store = StoreWatch(SwitchableStore(), Clock())
        dependencies = Dependencies(
            policy=lambda: policy,
            core_status=statuses.get,
            relay_healthy=lambda profile: healthy,
            relay_throttled_until=lambda profile: 0.0,
            store=store,
        )
        return dependencies.report()

    def test_profiles_in_use_only(self) -> None:
        """
        Only the Core and relay profiles enabled rules use are reported,
        each Core profile with its servers.
        """
        report = self.report({"c": [Status("http://127.0.0.1:8008", True)]})
        self.assertEqual(set(report["core"]), {"c"})
        self.assertEqual(set(report["relay"]), {"a"})
        self.assertEqual(report["core"]["c"]["available"], True)
        self.assertEqual(
            report["core"]["c"]["servers"][0]["url"], "http://127.0.0.1:8008"
        )

    def test_conditions(self) -> None:
        """
        No server up is C{core_unreachable}; servers up but all busy is
        C{core_busy}; one server up and free is available.
        """
        down = self.report({"c": [Status("u1", False), Status("u2", False)]})
        self.assertEqual(down["core"]["c"]["condition"], "core_unreachable")
        busy = self.report({"c": [Status("u1", True, busy=True), Status("u2", False)]})
        self.assertEqual(busy["core"]["c"]["condition"], "core_busy")
        one = self.report({"c": [Status("u1", False), Status("u2", True)]})
        self.assertIsNone(one["core"]["c"]["condition"])

    def test_summary(self) -> None:
        """
        C{/readyz}'s short form says ok or not per profile and for the
        store (an unchecked store is not reported as down).
        """
        report = self.report({"c": [Status("u1", False)]}, healthy=False)
        self.assertEqual(
            summary(report),
            {"core": {"c": False}, "relay": {"a": False}, "store": True},
        )
