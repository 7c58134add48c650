# -*- test-case-name: tests.test_testing -*-
"""
Verified fakes of the receiving side's seams: a recipient verifier that
answers from a table (or when the test says).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mdgateway.policy.profiles import SmtpProfile
from mdgateway.receive.admission import (
    IRecipientVerifier,
)


@implementer(IRecipientVerifier)
class ScriptedVerifier:
    """
    A verifier answering from a table keyed by (profile name, recipient),
    recording every probe; unanswered probes stay pending in C{pending}.
    """

    def __init__(self, answers: dict[tuple[str, str], str] | None = None) -> None:
        self.answers = answers
        self.probes: list[tuple[str, str]] = []
        self.pending: list[Deferred[str]] = []

    def verify(
        self, profile: SmtpProfile, sender: str, recipient: str
    ) -> Deferred[str]:
        self.probes.append((profile.name, recipient))
        if self.answers is None:
            d: Deferred[str] = Deferred()
            self.pending.append(d)
            return d
        return succeed(self.answers[(profile.name, recipient)])
