# -*- test-case-name: tests.test_testing -*-
"""
Verified fakes of the queue's seams: message processing that answers as the
test scripts it, a history and a bounce writer that record, and a loop
guard that trusts what it is told. With L{mdgateway.testing.relay.FakeRelay}
and the real spool, they let a test drive the queue manager on a clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mdgateway.message.dsn import DsnMessage
from mdgateway.message.marker import MarkerCheck, MarkerCount, Stamp
from mdgateway.policy.rules import Rule
from mdgateway.queue.bounces import DsnWriter, IBounceWriter
from mdgateway.queue.copies import (
    CopyJob,
    CopyOutcome,
    Decision,
    Delivery,
    ICopyProcessor,
)
from mdgateway.queue.entry import SpoolEntry
from mdgateway.queue.envelope import Envelope
from mdgateway.queue.history import IHistory
from mdgateway.queue.loopguard import ILoopGuard
from mdgateway.relay.delivery import RecipientOutcome
from mdgateway.store.interfaces import MessageStatus


def allowed(job: CopyJob) -> CopyOutcome:
    """
    What a clean copy comes to: the original delivered as it is.
    """
    return CopyOutcome(Decision.DELIVER, "Allowed", (Delivery(job.message_path),))


@implementer(ICopyProcessor)
class ScriptedProcessor:
    """
    Processing that answers with C{script(job)} (default: L{allowed}) and
    records every job it is given.

    @ivar jobs: C{(kind, copy id)} per call: C{process}, C{generated} or
        C{relay_once}.
    """

    def __init__(self, script: Callable[[CopyJob], CopyOutcome] = allowed) -> None:
        self.script = script
        self.jobs: list[tuple[str, str]] = []

    async def process(self, job: CopyJob) -> CopyOutcome:
        self.jobs.append(("process", job.security_id))
        return self.script(job)

    async def generated(self, job: CopyJob) -> CopyOutcome:
        self.jobs.append(("generated", job.security_id))
        return allowed(job)

    async def relay_once(self, job: CopyJob, check: MarkerCheck) -> CopyOutcome:
        self.jobs.append(("relay_once", job.security_id))
        return allowed(job)


@implementer(IHistory)
class RecordingHistory:
    """
    A history that keeps every event as C{(name, copy id, detail)}.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []

    async def received(self, entry: SpoolEntry, rule: Rule, copy_id: str) -> None:
        self.events.append(("received", copy_id, rule.name))

    async def copy_processed(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, outcome: CopyOutcome
    ) -> None:
        self.events.append(("processed", copy_id, outcome.result))

    async def delivered(
        self,
        entry: SpoolEntry,
        rule: Rule,
        copy_id: str,
        delivery: Delivery,
        outcomes: list[RecipientOutcome],
    ) -> None:
        self.events.append(("delivered", copy_id, [o.status.name for o in outcomes]))

    async def quarantine(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, reason: str
    ) -> None:
        self.events.append(("quarantine", copy_id, reason))

    async def status(
        self, entry: SpoolEntry, copy_id: str, status: MessageStatus, text: str
    ) -> None:
        self.events.append(("status", copy_id, status))

    def named(self, name: str) -> list[tuple[str, str, Any]]:
        return [e for e in self.events if e[0] == name]


@attrs.frozen
class Report:
    """
    One report L{RecordingBounces} was asked to write.

    @ivar about: the queue id of the message reported on.
    """

    about: str
    recipients: tuple[str, ...]
    delayed: bool
    records: Mapping[str, Mapping[str, Any]]


@implementer(IBounceWriter)
class RecordingBounces:
    """
    The real DSN writer (L{DsnWriter}), recording what it was asked to
    report.

    @ivar reports: one L{Report} per call, written or not.
    """

    def __init__(
        self,
        clock: IReactorTime,
        hostname: str = "gw.test",
        lifetime: float = 5 * 86400.0,
    ) -> None:
        self._writer = DsnWriter(clock, lambda: hostname, lambda: lifetime)
        self.reports: list[Report] = []

    def write(
        self,
        message_path: str,
        envelope: Envelope,
        results: Mapping[str, Mapping[str, Any]],
        path: str,
        delayed: bool,
    ) -> DsnMessage | None:
        self.reports.append(
            Report(envelope.queue_id, tuple(results), delayed, dict(results))
        )
        return self._writer.write(message_path, envelope, results, path, delayed)


@implementer(ILoopGuard)
class FakeLoopGuard:
    """
    Markers that say what the test wants: C{count} is what L{check} finds
    on every message (default: none); minted markers are recorded.
    """

    def __init__(self, count: MarkerCount | None = None) -> None:
        self.count = count or MarkerCount(valid=0, checks=(), complete=True)
        self.minted: list[str] = []
        self.max_age = 3600.0

    def make(self, copy_id: str, now: float, digest: bytes, stamp: Stamp) -> str:
        self.minted.append(copy_id)
        return f"{copy_id}; t={int(now)}; mac=fake"

    def check(self, path: str, now: float, digest: bytes | None) -> MarkerCount:
        return self.count

    def relay_once_max_age(self) -> float:
        return self.max_age
