"""
Tests for the RCPT-time decision: rule binding, recipient verification with
automatic rule selection, and the probe cache.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mdgateway.config import parse_config
from mdgateway.policy.profiles import SmtpProfile
from mdgateway.receive.admission import (
    ACCEPTED,
    REFUSED,
    UNREACHABLE,
    CachingVerifier,
    IRecipientVerifier,
    RulePolicy,
)
from mdgateway.receive.handler import IRecipientPolicy
from mdgateway.smtp.interfaces import ConnectionInfo
from mdgateway.smtp.parse import parse_mail_from, parse_rcpt_to
from mdgateway.testing.receive import ScriptedVerifier

BASE = """
sender_helo_domain = "gw.test"
[[listeners]]
name = "smtp"
endpoint = "tcp:10025:interface=127.0.0.1"
[spool]
directory = "/tmp/unused"
[profiles.core.c]
servers = ["http://127.0.0.1:8008"]
[profiles.smtp.a]
servers = ["smtp://10.0.0.1:25"]
[profiles.smtp.b]
servers = ["smtp://10.0.0.2:25"]
"""


def policy_from(rules: str):
    import tomllib

    config = parse_config(tomllib.loads(BASE + rules), base=Path("/tmp"))
    return config.policy


def info(client: str = "192.0.2.1") -> ConnectionInfo:
    return ConnectionInfo("s1", "smtp", (client, 1000), ("127.0.0.1", 25))


def decide(policy: RulePolicy, sender: str, rcpt: str, client: str = "192.0.2.1"):
    mail = parse_mail_from(f"FROM:<{sender}>")
    result = policy.decide(info(client), mail, parse_rcpt_to(f"TO:<{rcpt}>", False))
    return result


class RulePolicyTests(SynchronousTestCase):
    """
    Binding recipients to rules.
    """

    RULES = """
[[rules]]
name = "inbound"
recipients = ["example.org"]
core_profile = "c"
relay_profile = "a"
[[rules]]
name = "outbound"
direction = "outbound"
client_networks = ["10.0.0.0/8"]
core_profile = "c"
relay_profile = "b"
"""

    def test_verified_fakes(self) -> None:
        """
        RulePolicy provides IRecipientPolicy; the scripted verifier and the
        caching verifier provide IRecipientVerifier.
        """
        verifyObject(IRecipientPolicy, RulePolicy(policy_from(self.RULES)))
        verifyObject(IRecipientVerifier, ScriptedVerifier({}))
        verifyObject(IRecipientVerifier, CachingVerifier(ScriptedVerifier({}), Clock()))

    def test_first_matching_rule_binds(self) -> None:
        """
        A recipient for the inbound domain binds the inbound rule; mail from
        the internal network to elsewhere binds the outbound rule.
        """
        rules = RulePolicy(policy_from(self.RULES))
        inbound = decide(rules, "x@partner.example", "bob@example.org")
        self.assertEqual(inbound.reply.code, 250)
        self.assertEqual(inbound.binding.name, "inbound")
        outbound = decide(rules, "bob@example.org", "x@partner.example", "10.1.2.3")
        self.assertEqual(outbound.binding.name, "outbound")
        self.assertEqual(outbound.binding.direction, "outbound")

    def test_no_rule_is_refused(self) -> None:
        """
        A relay attempt from an unlisted client to an outside domain gets
        550 5.7.1 No security rule and no binding.
        """
        rules = RulePolicy(policy_from(self.RULES))
        refused = decide(rules, "spam@evil.example", "victim@elsewhere.example")
        self.assertEqual(
            (refused.reply.code, refused.reply.status, refused.reply.text),
            (550, "5.7.1", "No security rule"),
        )
        self.assertIsNone(refused.binding)

    def test_disabled_rule_skipped(self) -> None:
        """
        A disabled rule never binds a recipient.
        """
        rules = RulePolicy(
            policy_from(
                self.RULES.replace(
                    'name = "inbound"', 'name = "inbound"\nenabled = false'
                )
            )
        )
        self.assertEqual(
            decide(rules, "a@b.example", "bob@example.org").reply.code, 550
        )


class CoreOutageTests(SynchronousTestCase):
    """
    A rule whose Core profile is out, at RCPT: answered as its C{on_error}
    says, so a shared outage is a clear SMTP answer rather than a closed
    connection.
    """

    RULES = """
[[rules]]
name = "inbound"
recipients = ["example.org"]
core_profile = "c"
relay_profile = "a"
"""

    def decide_with(self, condition: str | None, on_error: str = "") -> object:
        rules = self.RULES + (f"[rules.on_error]\n{on_error}\n" if on_error else "")
        seen: list[str] = []

        def unavailable(rule: object) -> str | None:
            seen.append(rule.name)  # type: ignore[attr-defined]
            return condition

        policy = RulePolicy(policy_from(rules), unavailable=unavailable)
        decision = decide(policy, "x@partner.example", "bob@example.org")
        self.assertEqual(seen, ["inbound"])
        return decision

    def test_retry_answers_451(self) -> None:
        """
        With the default C{retry}, an unreachable Core profile gets C{451
        4.3.2} saying it is not reachable, a busy one saying it is busy.
        """
        down = self.decide_with("core_unreachable")
        self.assertEqual(
            (down.reply.code, down.reply.status, down.reply.text),  # type: ignore[attr-defined]
            (
                451,
                "4.3.2",
                "Scanning service unavailable: not reachable, try again later",
            ),
        )
        self.assertIsNone(down.binding)  # type: ignore[attr-defined]
        busy = self.decide_with("core_busy")
        self.assertEqual(
            busy.reply.text,  # type: ignore[attr-defined]
            "Scanning service unavailable: busy, try again later",
        )

    def test_bypass_or_fail_take_the_recipient(self) -> None:
        """
        A rule that bypasses (or fails) on the condition takes the
        recipient: processing applies its choice.
        """
        for action in ("bypass", "fail"):
            decision = self.decide_with(
                "core_unreachable", f'core_unreachable = "{action}"'
            )
            self.assertEqual(decision.reply.code, 250, action)  # type: ignore[attr-defined]
            self.assertEqual(decision.binding.name, "inbound")  # type: ignore[attr-defined]
        busy = self.decide_with("core_busy", 'core_unreachable = "bypass"')
        self.assertEqual(busy.reply.code, 451)  # type: ignore[attr-defined]

    def test_available_takes_the_recipient(self) -> None:
        """
        A Core profile that can take work changes nothing.
        """
        self.assertEqual(self.decide_with(None).reply.code, 250)  # type: ignore[attr-defined]


class RecipientVerificationTests(SynchronousTestCase):
    """
    Probing the rule's relay before accepting.
    """

    RULES = """
[[rules]]
name = "first"
recipients = ["example.org"]
recipient_verification = true
core_profile = "c"
relay_profile = "a"
[[rules]]
name = "plain"
recipients = ["example.org"]
core_profile = "c"
relay_profile = "a"
[[rules]]
name = "second"
recipients = ["example.org"]
recipient_verification = true
core_profile = "c"
relay_profile = "b"
"""

    def run_decision(self, answers: dict[tuple[str, str], str]):
        verifier = ScriptedVerifier(answers)
        rules = RulePolicy(policy_from(self.RULES), verifier)
        return self.successResultOf(
            decide(rules, "s@x.example", "bob@example.org")
        ), verifier

    def test_accepted_by_first_relay(self) -> None:
        """
        When the first rule's relay accepts the probe, that rule binds.
        """
        decision, verifier = self.run_decision({("a", "bob@example.org"): ACCEPTED})
        self.assertEqual(decision.binding.name, "first")
        self.assertEqual(verifier.probes, [("a", "bob@example.org")])

    def test_refused_tries_next_verifying_rule(self) -> None:
        """
        A 5xx from the first relay moves on to the next rule that also
        verifies (skipping rules that do not), which binds when its relay
        accepts: automatic rule selection.
        """
        decision, verifier = self.run_decision(
            {("a", "bob@example.org"): REFUSED, ("b", "bob@example.org"): ACCEPTED}
        )
        self.assertEqual(decision.binding.name, "second")
        self.assertEqual(
            verifier.probes, [("a", "bob@example.org"), ("b", "bob@example.org")]
        )

    def test_refused_everywhere(self) -> None:
        """
        When no verifying rule's relay accepts: 550 5.1.1 No policy for
        recipient.
        """
        decision, _ = self.run_decision(
            {("a", "bob@example.org"): REFUSED, ("b", "bob@example.org"): REFUSED}
        )
        self.assertEqual(
            (decision.reply.code, decision.reply.status, decision.reply.text),
            (550, "5.1.1", "No policy for recipient"),
        )

    def test_unreachable_accepts(self) -> None:
        """
        A relay that cannot be reached means accept under that rule, as the
        product does.
        """
        decision, _ = self.run_decision({("a", "bob@example.org"): UNREACHABLE})
        self.assertEqual((decision.reply.code, decision.binding.name), (250, "first"))


class CachingVerifierTests(SynchronousTestCase):
    """
    The probe cache.
    """

    def profile(self, name: str = "a") -> SmtpProfile:
        return SmtpProfile(name=name, servers=())

    def test_burst_costs_one_probe(self) -> None:
        """
        Concurrent checks of one recipient share a single probe in flight,
        and later checks within the TTL use its result.
        """
        inner = ScriptedVerifier()
        clock = Clock()
        cache = CachingVerifier(inner, clock, ttl=60)
        first = cache.verify(self.profile(), "s", "Bob@example.org")
        second = cache.verify(self.profile(), "s", "bob@EXAMPLE.org")
        self.assertEqual(len(inner.probes), 1)
        self.assertNoResult(first)
        inner.pending[0].callback(ACCEPTED)
        self.assertEqual(self.successResultOf(first), ACCEPTED)
        self.assertEqual(self.successResultOf(second), ACCEPTED)
        clock.advance(59)
        self.assertEqual(
            self.successResultOf(cache.verify(self.profile(), "s", "bob@example.org")),
            ACCEPTED,
        )
        self.assertEqual(len(inner.probes), 1)
        clock.advance(2)
        cache.verify(self.profile(), "s", "bob@example.org")
        self.assertEqual(len(inner.probes), 2)

    def test_unreachable_not_cached(self) -> None:
        """
        An unreachable result is not remembered: the next check probes again.
        """
        inner = ScriptedVerifier({("a", "bob@example.org"): UNREACHABLE})
        cache = CachingVerifier(inner, Clock())
        self.assertEqual(
            self.successResultOf(cache.verify(self.profile(), "s", "bob@example.org")),
            UNREACHABLE,
        )
        cache.verify(self.profile(), "s", "bob@example.org")
        self.assertEqual(len(inner.probes), 2)

    def test_failure_counts_as_unreachable(self) -> None:
        """
        A verifier that fails unexpectedly yields UNREACHABLE, never an error
        to the SMTP session.
        """
        inner = ScriptedVerifier()
        cache = CachingVerifier(inner, Clock())
        d = cache.verify(self.profile(), "s", "bob@example.org")
        inner.pending[0].errback(RuntimeError("boom"))
        self.assertEqual(self.successResultOf(d), UNREACHABLE)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_profiles_cached_separately(self) -> None:
        """
        The same recipient through two relay profiles is probed once each.
        """
        inner = ScriptedVerifier(
            {("a", "r@x.example"): ACCEPTED, ("b", "r@x.example"): REFUSED}
        )
        cache = CachingVerifier(inner, Clock())
        self.assertEqual(
            self.successResultOf(cache.verify(self.profile("a"), "s", "r@x.example")),
            ACCEPTED,
        )
        self.assertEqual(
            self.successResultOf(cache.verify(self.profile("b"), "s", "r@x.example")),
            REFUSED,
        )
