# -*- test-case-name: tests.test_testing -*-
"""
Verified fakes of the delivery side: an MX resolver answering from a table,
and a relay (L{IRelay}) that records what it is given and answers as told.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mdgateway.policy.profiles import SmtpProfile
from mdgateway.relay.delivery import Outgoing, RecipientOutcome, Status
from mdgateway.relay.hosts import IMXResolver
from mdgateway.relay.interfaces import IRelay


@implementer(IMXResolver)
class TableResolver:
    """
    An MX resolver answering from a table; unknown domains fail lookup.
    """

    def __init__(self, table: dict[str, list[tuple[int, str]]]) -> None:
        self.table = table

    def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        if domain not in self.table:
            return fail(LookupError(f"{domain}: no such domain"))
        return succeed(self.table[domain])


@implementer(IRelay)
class FakeRelay:
    """
    A relay that records every delivery and answers each recipient as the
    test says: C{answers[address]} is a L{Status} (with a reply made up to
    fit), or a whole L{RecipientOutcome}; unnamed recipients are delivered.

    @ivar deliveries: C{(profile name, outgoing)} per call, in order.
    @ivar throttled: profile name to the time its throttling ends.
    @ivar unhealthy: names of profiles whose servers did not answer.
    """

    def __init__(self) -> None:
        self.answers: dict[str, Status | RecipientOutcome] = {}
        self.deliveries: list[tuple[str, Outgoing]] = []
        self.throttled: dict[str, float] = {}
        self.unhealthy: set[str] = set()
        self.helo: str | None = None
        self.closed = False

    async def deliver(
        self, profile: SmtpProfile, outgoing: Outgoing
    ) -> list[RecipientOutcome]:
        self.deliveries.append((profile.name, outgoing))
        return [self._outcome(r.address) for r in outgoing.recipients]

    def _outcome(self, address: str) -> RecipientOutcome:
        answer = self.answers.get(address, Status.DELIVERED)
        if isinstance(answer, RecipientOutcome):
            return answer
        code, enhanced, text = _REPLIES[answer]
        return RecipientOutcome(address, answer, code, enhanced, text, "fake://relay")

    def throttled_until(self, profile: SmtpProfile) -> float:
        return self.throttled.get(profile.name, 0.0)

    def healthy(self, profile: SmtpProfile, window: float = 60.0) -> bool:
        return profile.name not in self.unhealthy

    def reconfigure(self, helo: str) -> None:
        self.helo = helo

    async def close(self) -> None:
        self.closed = True


_REPLIES = {
    Status.DELIVERED: (250, "2.0.0", "Ok: queued as FAKE"),
    Status.DEFERRED: (451, "4.4.1", "try again later"),
    Status.FAILED: (550, "5.1.1", "no such user"),
}
