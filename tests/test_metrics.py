"""
Tests for L{mdgateway.ops.metrics}: every value is read back by scraping
C{render()} and parsing it with prometheus-client's own parser.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.ops.metrics import (
    MAX_NAME,
    REFUSAL_REASONS,
    Metrics,
)
from mdgateway.receive import admission
from mdgateway.receive import handler as gateway
from mdgateway.scan.errors import Condition
from mdgateway.smtp import replies
from mdgateway.smtp.categories import categorize, refusal_category
from mdgateway.smtp.replies import Reply
from mdgateway.store import ScanVerdict

Labels = tuple[tuple[str, str], ...]


def scrape(metrics: Metrics) -> dict[tuple[str, Labels], float]:
    """
    Every sample of one scrape, keyed by sample name and sorted labels.
    """
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return scrape(metrics).get((name, tuple(sorted(labels.items()))))


class RegistryTests(SynchronousTestCase):
    def test_private_registries(self) -> None:
        """
        Each L{Metrics} counts in its own registry: two instances do not see
        each other's counts, and prometheus-client's global registry holds
        none of them.
        """
        one, two = Metrics(), Metrics()
        one.bounce()
        one.bounce()
        two.bounce()
        self.assertEqual(value(one, "mdgateway_bounces_total"), 2.0)
        self.assertEqual(value(two, "mdgateway_bounces_total"), 1.0)
        self.assertIsNone(REGISTRY.get_sample_value("mdgateway_bounces_total"))

    def test_content_types(self) -> None:
        """
        Without an Accept header the scrape is Prometheus text 0.0.4; a
        scraper asking for OpenMetrics gets OpenMetrics, ending in C{# EOF}.
        """
        metrics = Metrics()
        body, content_type = metrics.render()
        self.assertEqual(content_type, "text/plain; version=0.0.4; charset=utf-8")
        self.assertIn(b"mdgateway_bounces_total 0.0", body)
        body, content_type = metrics.render(
            "application/openmetrics-text; version=1.0.0"
        )
        self.assertTrue(content_type.startswith("application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))


class SmtpEdgeTests(SynchronousTestCase):
    def test_sessions(self) -> None:
        """
        Opened sessions are counted per listener; the active gauge goes up
        on open and down on close.
        """
        m = Metrics()
        m.session_opened("smtp")
        m.session_opened("smtp")
        m.session_opened("submission")
        m.session_closed("smtp")
        self.assertEqual(
            value(m, "mdgateway_smtp_sessions_total", listener="smtp"), 2.0
        )
        self.assertEqual(
            value(m, "mdgateway_smtp_sessions_active", listener="smtp"), 1.0
        )
        self.assertEqual(
            value(m, "mdgateway_smtp_sessions_active", listener="submission"), 1.0
        )

    def test_tls_versions_bounded(self) -> None:
        """
        TLS handshakes are counted by version; anything that is not a known
        TLS version name is counted as C{other}.
        """
        m = Metrics()
        m.tls_established("smtp", "TLSv1.3")
        m.tls_established("smtp", "TLSv1.3")
        m.tls_established("smtp", "garbage-from-a-peer")
        m.tls_established("smtp", None)
        self.assertEqual(
            value(m, "mdgateway_smtp_tls_total", listener="smtp", version="TLSv1.3"),
            2.0,
        )
        self.assertEqual(
            value(m, "mdgateway_smtp_tls_total", listener="smtp", version="other"),
            2.0,
        )

    def test_tls_failures(self) -> None:
        """
        Failed TLS handshakes are counted per listener.
        """
        m = Metrics()
        m.tls_failed("smtps")
        m.tls_failed("smtps")
        self.assertEqual(
            value(m, "mdgateway_smtp_tls_failures_total", listener="smtps"), 2.0
        )

    def test_proxy_errors_and_accepted(self) -> None:
        """
        PROXY errors and accepted messages are counted per listener.
        """
        m = Metrics()
        m.proxy_error("lb")
        m.message_accepted("lb")
        m.message_accepted("lb")
        self.assertEqual(
            value(m, "mdgateway_smtp_proxy_errors_total", listener="lb"), 1.0
        )
        self.assertEqual(
            value(m, "mdgateway_smtp_messages_accepted_total", listener="lb"), 2.0
        )

    def test_refusal_reasons_of_our_replies(self) -> None:
        """
        The gateway's own refusal replies map to their short reasons, and
        the counter counts them under that reason.
        """
        cases = {
            admission.NO_RULE: "no_rule",
            admission.NO_POLICY: "no_policy",
            admission.SCANNER_BUSY: "scanner_busy",
            gateway.RELAY_DENIED: "relay_denied",
            replies.MESSAGE_TOO_BIG: "too_big",
            replies.TOO_MANY_HOPS: "loop",
            replies.SPOOL_FULL: "spool_full",
            replies.QUEUE_FULL: "queue_full",
            replies.TOO_MANY_LONG_LINES: "line_too_long",
            replies.BARE_LINEFEED: "smuggling",
            replies.DATA_LINE_TOO_LONG: "line_too_long",
            replies.TOO_MANY_RECIPIENTS: "too_many_recipients",
            replies.TLS_REQUIRED: "tls_required",
            replies.SHUTTING_DOWN: "shutting_down",
            replies.IDLE_TIMEOUT: "timeout",
            replies.TOO_MANY_ERRORS: "too_many_errors",
            replies.LOCAL_ERROR: "local_error",
        }
        m = Metrics()
        for reply, reason in cases.items():
            self.assertEqual(m.refused(refusal_category(reply)), reason, reply)
        for reason in set(cases.values()):
            self.assertEqual(
                value(m, "mdgateway_smtp_refused_total", reason=reason),
                float(list(cases.values()).count(reason)),
            )

    def test_unknown_refusals(self) -> None:
        """
        A reply nothing recognises is C{other_4xx} or C{other_5xx} by its
        code, so the label never carries reply text; a category outside the
        vocabulary is counted as C{other}.
        """
        m = Metrics()
        self.assertEqual(categorize(450, "4.2.0", "Mailbox busy"), "other_4xx")
        self.assertEqual(categorize(554, None, "Go away, spammer"), "other_5xx")
        m.refused("other_5xx")
        self.assertEqual(
            value(m, "mdgateway_smtp_refused_total", reason="other_5xx"), 1.0
        )
        self.assertEqual(m.refused("made up"), "other")

    def test_protocol_refusal_categories(self) -> None:
        """
        Replies the SMTP server makes without asking the handler get the
        categories the refused log documents: address syntax, SIZE over
        the limit, no valid recipients, draining, too many errors, and a
        category a reply carries itself wins over its text.
        """
        cases = {
            Reply.of(501, "5.1.3", "Bad recipient address syntax"): "syntax",
            Reply.of(501, "5.1.7", "Bad address syntax"): "syntax",
            Reply.of(501, "5.5.4", "Syntax: HELO hostname"): "syntax",
            replies.MESSAGE_TOO_BIG: "too_big",
            Reply.of(554, "5.5.1", "Error: no valid recipients"): "bad_sequence",
            replies.SHUTTING_DOWN: "shutting_down",
            replies.NOT_READY: "not_ready",
            replies.TOO_MANY_ERRORS: "too_many_errors",
            replies.RECORDS_BACKLOG: "outbox_full",
            Reply.of(535, "5.7.8", "Authentication credentials invalid"): (
                "auth_failed"
            ),
            Reply.of(550, "5.7.1", "Refused by tenant restrictions"): "tenant",
            Reply.of(550, "5.7.1", "Not today", category="tenant"): "tenant",
            Reply.of(550, "5.7.1", "Sender blocked"): "policy",
        }
        for reply, category in cases.items():
            self.assertEqual(refusal_category(reply), category, reply)

    @given(
        code=st.integers(min_value=400, max_value=599),
        enhanced=st.one_of(st.none(), st.text(max_size=12)),
        text=st.text(max_size=200),
    )
    def test_refusal_reason_bounded(
        self, code: int, enhanced: str | None, text: str
    ) -> None:
        """
        Whatever the reply, the reason is one of L{REFUSAL_REASONS}.
        """
        self.assertIn(categorize(code, enhanced, text), REFUSAL_REASONS)

    def test_rules(self) -> None:
        """
        Rule matches are counted by rule and direction; internally generated
        mail (no rule) is C{none}, and an overlong name is cut.
        """
        m = Metrics()
        m.rule_matched("Inbound", "inbound")
        m.rule_matched(None, None)
        m.rule_matched("r" * 500, "outbound")
        self.assertEqual(
            value(
                m, "mdgateway_rule_matches_total", rule="Inbound", direction="inbound"
            ),
            1.0,
        )
        self.assertEqual(
            value(m, "mdgateway_rule_matches_total", rule="none", direction="none"),
            1.0,
        )
        self.assertEqual(
            value(
                m,
                "mdgateway_rule_matches_total",
                rule="r" * MAX_NAME,
                direction="outbound",
            ),
            1.0,
        )


class CoreTests(SynchronousTestCase):
    def test_scan_histogram(self) -> None:
        """
        Core scan times go into a histogram per profile and outcome, with
        count, sum and cumulative buckets; an unknown outcome is C{other}.
        """
        m = Metrics()
        m.core_scan("local", 0.2, "allowed")
        m.core_scan("local", 3.0, "allowed")
        m.core_scan("local", 1.0, "Blocked")
        m.core_scan("local", 1.0, "exploded")
        name = "mdgateway_core_scan_seconds"
        labels = {"profile": "local", "outcome": "allowed"}
        self.assertEqual(value(m, f"{name}_count", **labels), 2.0)
        self.assertAlmostEqual(value(m, f"{name}_sum", **labels) or 0, 3.2)
        self.assertEqual(value(m, f"{name}_bucket", le="0.25", **labels), 1.0)
        self.assertEqual(value(m, f"{name}_bucket", le="5.0", **labels), 2.0)
        self.assertEqual(
            value(m, f"{name}_count", profile="local", outcome="blocked"), 1.0
        )
        self.assertEqual(
            value(m, f"{name}_count", profile="local", outcome="other"), 1.0
        )

    def test_core_errors(self) -> None:
        """
        Core errors are counted by profile and condition; a L{Condition}
        is taken by value and an unknown condition is C{other}.
        """
        m = Metrics()
        m.core_error("local", Condition.BUSY)
        m.core_error("local", "scan_timeout")
        m.core_error("local", "a surprising text")
        name = "mdgateway_core_errors_total"
        self.assertEqual(value(m, name, profile="local", condition="busy"), 1.0)
        self.assertEqual(value(m, name, profile="local", condition="scan_timeout"), 1.0)
        self.assertEqual(value(m, name, profile="local", condition="other"), 1.0)

    def test_core_cache(self) -> None:
        """
        Files through a verdict cache are counted by profile and result;
        an unknown result is C{other}.
        """
        m = Metrics()
        m.core_cache("local", "hit")
        m.core_cache("local", "hit")
        m.core_cache("local", "miss")
        m.core_cache("local", "evicted?")
        name = "mdgateway_core_cache_total"
        self.assertEqual(value(m, name, profile="local", result="hit"), 2.0)
        self.assertEqual(value(m, name, profile="local", result="miss"), 1.0)
        self.assertEqual(value(m, name, profile="local", result="other"), 1.0)
        self.assertIsNone(value(m, name, profile="local", result="shared"))

    def test_verdicts(self) -> None:
        """
        Verdicts are counted in the product's spelling whatever the case
        given; a L{ScanVerdict} works too; unknown ones are C{other}.
        """
        m = Metrics()
        m.verdict("allowed")
        m.verdict(ScanVerdict.ALLOWED)
        m.verdict("Bypassed")
        m.verdict("SKIPPED")
        m.verdict("Mystery")
        name = "mdgateway_verdicts_total"
        self.assertEqual(value(m, name, result="Allowed"), 2.0)
        self.assertEqual(value(m, name, result="Bypassed"), 1.0)
        self.assertEqual(value(m, name, result="Skipped"), 1.0)
        self.assertEqual(value(m, name, result="other"), 1.0)

    def test_cdr_and_dlp(self) -> None:
        """
        Deep CDR and DLP outcomes are counted from their vocabularies;
        anything else is C{other}.
        """
        m = Metrics()
        m.cdr("sanitized")
        m.cdr("exploded")
        m.dlp("hits")
        m.dlp("redacted")
        self.assertEqual(value(m, "mdgateway_cdr_total", outcome="sanitized"), 1.0)
        self.assertEqual(value(m, "mdgateway_cdr_total", outcome="other"), 1.0)
        self.assertEqual(value(m, "mdgateway_dlp_total", outcome="hits"), 1.0)
        self.assertEqual(value(m, "mdgateway_dlp_total", outcome="redacted"), 1.0)


class RelayTests(SynchronousTestCase):
    def test_deliveries(self) -> None:
        """
        Deliveries are counted by profile, reply class and code; no reply
        is C{connection}, an impossible code is C{other}.
        """
        m = Metrics()
        m.delivery("o365", 250)
        m.delivery("o365", 250)
        m.delivery("o365", 451)
        m.delivery("o365", 550)
        m.delivery("o365", None)
        m.delivery("o365", 999)
        name = "mdgateway_deliveries_total"
        for klass, code, expected in (
            ("2xx", "250", 2.0),
            ("4xx", "451", 1.0),
            ("5xx", "550", 1.0),
            ("connection", "connection", 1.0),
            ("other", "other", 1.0),
        ):
            self.assertEqual(
                value(m, name, profile="o365", code=code, **{"class": klass}),
                expected,
            )

    def test_bounces(self) -> None:
        """
        Bounces are counted.
        """
        m = Metrics()
        m.bounce()
        self.assertEqual(value(m, "mdgateway_bounces_total"), 1.0)


class GaugeTests(SynchronousTestCase):
    def test_unwatched_gauges_absent(self) -> None:
        """
        Gauges without a callback are not exposed at all (rather than as a
        misleading zero).
        """
        names = {name for name, _ in scrape(Metrics())}
        self.assertNotIn("mdgateway_queue_depth", names)
        self.assertNotIn("mdgateway_core_servers_up", names)

    def test_callbacks_read_at_scrape(self) -> None:
        """
        Callback gauges take the callbacks' values at each scrape; an empty
        spool's oldest age is 0, throttled flags are 1 or 0, and a later
        registration replaces the callback.
        """
        m = Metrics()
        depth = [3]
        m.watch_queue_depth(lambda: depth[0])
        m.watch_queue_oldest_seconds(lambda: None)
        m.watch_core_servers_up(lambda: {"local": 2, "cloud": 0})
        m.watch_relay_throttled(lambda: {"o365": True, "maildir": False})
        self.assertEqual(value(m, "mdgateway_queue_depth"), 3.0)
        depth[0] = 7
        self.assertEqual(value(m, "mdgateway_queue_depth"), 7.0)
        self.assertEqual(value(m, "mdgateway_queue_oldest_seconds"), 0.0)
        self.assertEqual(value(m, "mdgateway_core_servers_up", profile="local"), 2.0)
        self.assertEqual(value(m, "mdgateway_core_servers_up", profile="cloud"), 0.0)
        self.assertEqual(value(m, "mdgateway_relay_throttled", profile="o365"), 1.0)
        self.assertEqual(value(m, "mdgateway_relay_throttled", profile="maildir"), 0.0)
        m.watch_queue_oldest_seconds(lambda: 42.5)
        self.assertEqual(value(m, "mdgateway_queue_oldest_seconds"), 42.5)
        m.watch_workers(lambda: 3)
        self.assertEqual(value(m, "mdgateway_workers_running"), 3.0)

    def test_failing_callback(self) -> None:
        """
        A callback that raises costs only its own gauge: the scrape still
        succeeds with every other metric, and the failure is logged.
        """
        m = Metrics()
        m.watch_queue_depth(lambda: 1 // 0)
        m.watch_core_servers_up(lambda: {"local": 1})
        samples = scrape(m)
        self.assertNotIn(("mdgateway_queue_depth", ()), samples)
        self.assertEqual(
            samples[("mdgateway_core_servers_up", (("profile", "local"),))], 1.0
        )
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
