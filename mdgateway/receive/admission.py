# -*- test-case-name: tests.test_admission -*-
"""
The RCPT-time decision: which security rule takes a recipient, if any.

This is also what keeps the gateway from being an open relay: a recipient no
enabled rule matches is refused with C{550 5.7.1 No security rule}. Rules
with recipient verification first ask their relay whether it would take the
recipient, as the product does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from mdgateway.policy.profiles import SmtpProfile
from mdgateway.policy.rules import Policy, Rule
from mdgateway.receive.handler import IRecipientPolicy
from mdgateway.smtp.interfaces import ConnectionInfo, RecipientDecision
from mdgateway.smtp.parse import MailFrom, RcptTo
from mdgateway.smtp.replies import Reply

log = Logger()

RECIPIENT_OK = Reply.of(250, "2.1.5", "Ok")
NO_RULE = Reply.of(550, "5.7.1", "No security rule")
NO_POLICY = Reply.of(550, "5.1.1", "No policy for recipient")
SCANNER_BUSY = Reply.of(
    451, "4.3.2", "Scanning service unavailable: busy, try again later"
)
SCANNER_DOWN = Reply.of(
    451, "4.3.2", "Scanning service unavailable: not reachable, try again later"
)
#: The RCPT answer while a rule's Core profile is out, by error condition.
SCANNER_OUT = {"core_busy": SCANNER_BUSY, "core_unreachable": SCANNER_DOWN}

#: Verification outcomes.
ACCEPTED = "accepted"
REFUSED = "refused"
UNREACHABLE = "unreachable"


class IRecipientVerifier(Interface):
    """
    Asks a relay profile whether it would accept a recipient.
    """

    def verify(profile: SmtpProfile, sender: str, recipient: str) -> Any:  # noqa: N805
        """
        Probe with MAIL/RCPT and abort the probe.

        @return: a L{Deferred} firing with L{ACCEPTED}, L{REFUSED} (a 5xx to
            RCPT) or L{UNREACHABLE} (no server answered usefully).
        """


@attrs.define
class _CacheEntry:
    expires: float
    result: str | None = None
    waiters: list[Deferred[str]] = attrs.Factory(list)


@implementer(IRecipientVerifier)
class CachingVerifier:
    """
    Remembers probe results briefly, and shares a probe in flight, so a
    burst of mail for one recipient costs one probe. An unreachable relay
    is not remembered: the next message asks again.
    """

    def __init__(
        self, verifier: IRecipientVerifier, clock: IReactorTime, ttl: float = 60.0
    ) -> None:
        self._verifier = verifier
        self._clock = clock
        self._ttl = ttl
        self._cache: dict[tuple[str, str], _CacheEntry] = {}

    def verify(
        self, profile: SmtpProfile, sender: str, recipient: str
    ) -> Deferred[str]:
        now = self._clock.seconds()
        key = (profile.name, recipient.casefold())
        entry = self._cache.get(key)
        if entry is not None and entry.expires > now and entry.result is not None:
            return succeed(entry.result)
        waiter: Deferred[str] = Deferred()
        if entry is not None and entry.expires > now:
            entry.waiters.append(waiter)
            return waiter
        if len(self._cache) > 10000:
            self._expire(now)
        entry = _CacheEntry(now + self._ttl, None, [waiter])
        self._cache[key] = entry
        Deferred.fromCoroutine(self._probe(key, entry, profile, sender, recipient))
        return waiter

    async def _probe(
        self,
        key: tuple[str, str],
        entry: _CacheEntry,
        profile: SmtpProfile,
        sender: str,
        recipient: str,
    ) -> None:
        try:
            result: str = await self._verifier.verify(profile, sender, recipient)
        except Exception:
            log.failure("recipient verification failed", profile=profile.name)
            result = UNREACHABLE
        entry.result = result
        if result == UNREACHABLE and self._cache.get(key) is entry:
            del self._cache[key]
        waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            waiter.callback(result)

    def _expire(self, now: float) -> None:
        for key in [k for k, e in self._cache.items() if e.expires <= now]:
            del self._cache[key]


@implementer(IRecipientPolicy)
class RulePolicy:
    """
    Binds each recipient to the first enabled rule whose filters match.
    """

    def __init__(
        self,
        policy: Policy,
        verifier: IRecipientVerifier | None = None,
        unavailable: Callable[[Rule], str | None] | None = None,
    ) -> None:
        """
        @param unavailable: why the rule's Core profile cannot take work
            now (C{core_unreachable}, C{core_busy}) or C{None}. When the
            rule's C{on_error} says to retry for that condition, new
            recipients get C{451 4.3.2} instead of piling up mail that
            cannot be scanned; a rule that fails or bypasses on it takes
            them, and processing applies its choice.
        """
        self.policy = policy
        self.verifier = verifier
        self.unavailable = unavailable

    def decide(
        self, info: ConnectionInfo, mail: MailFrom, rcpt: RcptTo
    ) -> RecipientDecision | Deferred[RecipientDecision]:
        try:
            client = ipaddress.ip_address(info.client[0])
        except ValueError:
            return RecipientDecision(NO_RULE)
        sender = mail.sender_text
        recipient = str(rcpt.recipient)
        candidates = self.policy.candidates(client, sender, recipient)
        if not candidates:
            return RecipientDecision(NO_RULE)
        first = candidates[0]
        condition = self.unavailable(first) if self.unavailable is not None else None
        if condition is not None and first.on_error.action_for(condition) == "retry":
            return RecipientDecision(SCANNER_OUT[condition])
        if not first.recipient_verification or self.verifier is None:
            return RecipientDecision(RECIPIENT_OK, first)
        verifying = tuple(rule for rule in candidates if rule.recipient_verification)
        return Deferred.fromCoroutine(
            self._verified(info, verifying, sender, recipient)
        )

    async def _verified(
        self,
        info: ConnectionInfo,
        rules: tuple[Rule, ...],
        sender: str,
        recipient: str,
    ) -> RecipientDecision:
        assert self.verifier is not None
        for rule in rules:
            result = await self.verifier.verify(rule.relay_profile, sender, recipient)
            log.debug(
                "recipient verification of {recipient} via {profile}: {result}",
                session_id=info.session_id,
                recipient=recipient,
                profile=rule.relay_profile.name,
                rule=rule.name,
                result=result,
            )
            if result == ACCEPTED:
                return RecipientDecision(RECIPIENT_OK, rule)
            if result == UNREACHABLE:
                # The product accepts when the relay cannot be asked: the
                # message is still scanned, and delivery retries later.
                log.info(
                    "relay {profile} unreachable for verification; accepting "
                    "{recipient} under rule {rule}",
                    session_id=info.session_id,
                    profile=rule.relay_profile.name,
                    recipient=recipient,
                    rule=rule.name,
                )
                return RecipientDecision(RECIPIENT_OK, rule)
        return RecipientDecision(NO_POLICY)
