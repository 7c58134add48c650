"""
Tests for L{mdgateway.policy.rules}: security rules, server profiles, their
validation and rule selection.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.policy.parse import parse_policy
from mdgateway.policy.patterns import ANY_ADDRESS, AddressFilter
from mdgateway.policy.profiles import CoreProfile, CoreServer, RelayServer, SmtpProfile
from mdgateway.policy.rules import (
    ERROR_CONDITIONS,
    ErrorHandling,
    Policy,
    Rule,
    covers_every_client,
)
from mdgateway.policy.servers import (
    ServerUriError,
    loops_back,
    parse_core_server,
    parse_relay_server,
)
from mdgateway.tomlreader import Problems, Section

ETC = Path(__file__).resolve().parent.parent / "etc"

CORE = CoreProfile("local", (CoreServer("http://127.0.0.1:8008"),))
RELAY = SmtpProfile("mail", (RelayServer("smtp", "10.0.0.9"),))
OUTSIDE = SmtpProfile("out", (RelayServer("smtp", "10.0.0.1"),))

PROFILES = """
[profiles.core.local]
servers = ["http://127.0.0.1:8008"]

[profiles.smtp.mail]
servers = ["smtp://10.0.0.9:25"]
"""

RULE = """
[[rules]]
name = "inbound"
client_networks = ["192.0.2.0/24"]
core_profile = "local"
relay_profile = "mail"
"""

OWN = (("0.0.0.0", 25),)


def load(
    text: str,
    own: Sequence[tuple[str, int]] = OWN,
    check_files: bool = True,
    base: str | None = None,
) -> tuple[Policy, list[str]]:
    """
    Parse a TOML document's policy; return it and its problem lines.
    """
    problems = Problems()
    root = Section(tomllib.loads(text), "", problems)
    policy = parse_policy(root, own, check_files=check_files, base=base)
    return policy, problems.lines


def ip(text: str) -> IPv4Address | IPv6Address:
    """
    An IP address from text.
    """
    return ip_address(text)


class ProblemAssertions(SynchronousTestCase):
    def assertProblem(self, lines: Sequence[str], path: str, fragment: str) -> None:
        """
        Assert one problem line is about C{path} and contains C{fragment}.
        """
        found = [line for line in lines if line.startswith(f"{path}: ")]
        self.assertTrue(found, f"no problem for {path!r} in {lines!r}")
        self.assertTrue(
            any(fragment in line for line in found),
            f"{fragment!r} not in {found!r}",
        )

    def assertOnlyProblem(
        self, text: str, path: str, fragment: str, **kw: object
    ) -> None:
        """
        Assert loading C{text} gives exactly one problem, about C{path}.
        """
        _, lines = load(text, **kw)  # type: ignore[arg-type]
        self.assertEqual(len(lines), 1, lines)
        self.assertProblem(lines, path, fragment)


# -- selection ----------------------------------------------------------------


class SelectTests(SynchronousTestCase):
    """
    First-match selection over the enabled rules.
    """

    def setUp(self) -> None:
        self.partner = Rule(
            "partner",
            CORE,
            RELAY,
            client_networks=(ip_network("192.0.2.0/24"),),
            senders=AddressFilter.of("*@partner.example"),
            recipients=AddressFilter.of("example.com"),
        )
        self.disabled = Rule(
            "disabled",
            CORE,
            OUTSIDE,
            enabled=False,
            client_networks=(ip_network("192.0.2.0/24"),),
            recipients=AddressFilter.of("example.com"),
        )
        self.inbound = Rule(
            "inbound",
            CORE,
            RELAY,
            client_networks=(ip_network("192.0.2.0/24"),),
            recipients=AddressFilter.of("example.com", "*.example.com"),
        )
        self.bounces = Rule(
            "bounces",
            CORE,
            RELAY,
            client_networks=(ip_network("192.0.2.0/24"),),
            senders=AddressFilter.of("<>"),
        )
        self.outbound = Rule(
            "outbound",
            CORE,
            OUTSIDE,
            direction="outbound",
            client_networks=(ip_network("10.0.0.9/32"), ip_network("2001:db8::/32")),
        )
        self.policy = Policy(
            {"local": CORE},
            {"mail": RELAY, "out": OUTSIDE},
            (self.partner, self.disabled, self.inbound, self.bounces, self.outbound),
        )

    def test_first_match(self) -> None:
        """
        The first rule whose filters all match is selected.
        """
        selected = self.policy.select(
            ip("192.0.2.7"), "a@partner.example", "b@example.com"
        )
        self.assertIs(selected, self.partner)

    def test_later_rule_when_earlier_filter_fails(self) -> None:
        """
        When one filter of a rule fails, later rules are tried.
        """
        selected = self.policy.select(
            ip("192.0.2.7"), "a@other.example", "b@example.com"
        )
        self.assertIs(selected, self.inbound)

    def test_candidates_in_order(self) -> None:
        """
        L{Policy.candidates} lists every enabled matching rule, in order.
        """
        self.assertEqual(
            self.policy.candidates(
                ip("192.0.2.7"), "a@partner.example", "b@example.com"
            ),
            (self.partner, self.inbound),
        )

    def test_disabled_skipped(self) -> None:
        """
        A disabled rule is never selected, even when it would match first.
        """
        candidates = self.policy.candidates(ip("192.0.2.7"), "", "b@example.com")
        self.assertNotIn(self.disabled, candidates)
        self.assertEqual(
            self.policy.enabled_rules,
            (self.partner, self.inbound, self.bounces, self.outbound),
        )

    def test_null_sender(self) -> None:
        """
        The null reverse-path (C{""}) matches C{<>} and unfiltered senders.
        """
        self.assertEqual(
            self.policy.candidates(ip("192.0.2.7"), "", "b@sub.example.com"),
            (self.inbound, self.bounces),
        )
        self.assertIs(
            self.policy.select(ip("192.0.2.7"), "", "x@elsewhere.example"), self.bounces
        )

    def test_no_match(self) -> None:
        """
        No rule matching gives L{None}.
        """
        self.assertIsNone(self.policy.select(ip("198.51.100.1"), "a@b.c", "d@e.f"))
        self.assertEqual(
            self.policy.candidates(ip("198.51.100.1"), "a@b.c", "d@e.f"), ()
        )

    def test_ipv6_client(self) -> None:
        """
        IPv6 clients match IPv6 networks.
        """
        selected = self.policy.select(
            ip("2001:db8::25"), "a@example.com", "x@y.example"
        )
        self.assertIs(selected, self.outbound)

    def test_ipv4_mapped_client(self) -> None:
        """
        An IPv4-mapped IPv6 client address matches as its IPv4 address.
        """
        selected = self.policy.select(
            ip("::ffff:10.0.0.9"), "a@example.com", "x@y.example"
        )
        self.assertIs(selected, self.outbound)

    def test_ipv4_mapped_network(self) -> None:
        """
        An IPv4-mapped network in a rule is stored and matched as IPv4.
        """
        rule = Rule(
            "r", CORE, RELAY, client_networks=(ip_network("::ffff:10.0.0.0/120"),)
        )
        self.assertEqual(rule.client_networks, (IPv4Network("10.0.0.0/24"),))
        self.assertTrue(rule.from_client(ip("10.0.0.200")))
        self.assertTrue(rule.from_client(ip("::ffff:10.0.0.200")))

    def test_case_insensitive(self) -> None:
        """
        Selection ignores the case of sender and recipient.
        """
        selected = self.policy.select(
            ip("192.0.2.7"), "A@PARTNER.example", "B@Example.COM"
        )
        self.assertIs(selected, self.partner)

    def test_rule_named_includes_disabled(self) -> None:
        """
        L{Policy.rule_named} finds disabled rules too (rescans apply them).
        """
        self.assertIs(self.policy.rule_named("disabled"), self.disabled)
        self.assertIs(self.policy.rule_named("inbound"), self.inbound)
        self.assertIsNone(self.policy.rule_named("nonesuch"))

    def test_profiles_in_use(self) -> None:
        """
        Profiles in use are those of enabled rules, in order of first use;
        a profile only a disabled rule uses is not among them.
        """
        self.assertEqual(self.policy.core_profiles_in_use(), (CORE,))
        self.assertEqual(self.policy.smtp_profiles_in_use(), (RELAY, OUTSIDE))
        only_disabled = Policy({"local": CORE}, {"out": OUTSIDE}, (self.disabled,))
        self.assertEqual(only_disabled.smtp_profiles_in_use(), ())

    def test_rule_matches_ignores_enabled(self) -> None:
        """
        L{Rule.matches} reports the filters only; C{enabled} is the policy's
        business.
        """
        self.assertTrue(self.disabled.matches(ip("192.0.2.1"), "", "a@example.com"))

    def test_empty_policy_refuses_everything(self) -> None:
        """
        A policy without rules selects nothing.
        """
        self.assertIsNone(Policy().select(ip("127.0.0.1"), "", "a@example.com"))

    def test_mappings_read_only(self) -> None:
        """
        The policy's profile mappings cannot be changed.
        """
        with self.assertRaises(TypeError):
            self.policy.core_profiles["x"] = CORE  # type: ignore[index]

    @given(
        st.lists(st.booleans(), min_size=1, max_size=6),
        st.integers(min_value=0, max_value=255),
    )
    def test_select_is_first_candidate(self, enabled: list[bool], octet: int) -> None:
        """
        L{Policy.select} is always the first of L{Policy.candidates}.
        """
        rules = [
            Rule(
                f"r{index}",
                CORE,
                RELAY,
                enabled=on,
                client_networks=(
                    ip_network(f"10.{index}.0.0/16"),
                    ip_network("10.0.0.0/8"),
                ),
            )
            for index, on in enumerate(enabled)
        ]
        policy = Policy({}, {}, rules)
        client = ip(f"10.{octet % 8}.1.1")
        candidates = policy.candidates(client, "", "a@b.example")
        self.assertEqual(
            policy.select(client, "", "a@b.example"), (candidates or [None])[0]
        )
        self.assertEqual(candidates, tuple(r for r in rules if r.enabled))


class ErrorHandlingTests(SynchronousTestCase):
    """
    Error handling defaults fail closed.
    """

    def test_defaults(self) -> None:
        """
        Core outages retry; failures that will not go away fail.
        """
        handling = ErrorHandling()
        self.assertEqual(
            [handling.action_for(c) for c in ERROR_CONDITIONS],
            ["retry", "retry", "retry", "fail", "fail", "fail"],
        )

    def test_unknown_condition(self) -> None:
        """
        Asking for an unknown condition is a programming error.
        """
        self.assertRaises(KeyError, ErrorHandling().action_for, "spam")


class CoversEveryClientTests(SynchronousTestCase):
    """
    Which previous-hop filters admit everyone.
    """

    def test_cases(self) -> None:
        """
        Empty, C{0.0.0.0/0}, C{::/0} and halves that add up to everything
        admit everyone; a real network does not.
        """
        self.assertTrue(covers_every_client(()))
        self.assertTrue(covers_every_client((IPv4Network("0.0.0.0/0"),)))
        self.assertTrue(
            covers_every_client((IPv6Network("::/0"), IPv4Network("10.0.0.0/8")))
        )
        self.assertTrue(
            covers_every_client((IPv4Network("0.0.0.0/1"), IPv4Network("128.0.0.0/1")))
        )
        self.assertFalse(covers_every_client((IPv4Network("0.0.0.0/1"),)))
        self.assertFalse(covers_every_client((IPv4Network("10.0.0.0/8"),)))


# -- server URIs --------------------------------------------------------------


class CoreServerUriTests(SynchronousTestCase):
    """
    MetaDefender Core server URIs.
    """

    def test_http_default_port(self) -> None:
        """
        C{http://host} gets port 8008 and no apikey.
        """
        self.assertEqual(
            parse_core_server("http://core"), CoreServer("http://core:8008")
        )

    def test_https_port_apikey(self) -> None:
        """
        The apikey query parameter is split off the URL.
        """
        server = parse_core_server("https://Core2:8058/?apikey=24a5d6c6")
        self.assertEqual(server.url, "https://core2:8058")
        self.assertEqual(server.apikey, "24a5d6c6")
        self.assertNotIn("24a5", repr(server))

    def test_ipv6(self) -> None:
        """
        IPv6 literals keep their brackets in the URL.
        """
        self.assertEqual(
            parse_core_server("http://[::1]:8008").url, "http://[::1]:8008"
        )

    def test_idn_host(self) -> None:
        """
        Internationalised host names are stored as A-labels.
        """
        self.assertEqual(
            parse_core_server("http://bücher.example").url,
            "http://xn--bcher-kva.example:8008",
        )

    def test_refused(self) -> None:
        """
        Malformed Core URIs are refused with a reason.
        """
        for uri, fragment in [
            ("ftp://core", "unknown scheme 'ftp'"),
            ("smtp://core", "unknown scheme 'smtp'"),
            ("core:8008", "unknown scheme"),
            ("127.0.0.1", "missing scheme"),
            ("http:core", "expected http://host"),
            ("http://", "missing host"),
            ("http://:8008", "missing host"),
            ("http://core:99999", "not a server URI"),
            ("http://core:x", "not a server URI"),
            ("http://core:0", "port 0"),
            ("http://core/file", "no path"),
            ("http://core#x", "fragment"),
            ("http://user:pw@core", "credentials"),
            ("http://core?key=1", "unknown query parameter 'key'"),
            ("http://core?apikey=", "empty apikey"),
            ("http://core?apikey=a&apikey=b", "twice"),
            ("http://core?apikey", "bad query"),
            ("http://co re", "white space"),
            ("http://bad_host!", "not a host name"),
        ]:
            with self.subTest(uri=uri):
                with self.assertRaises(ServerUriError) as caught:
                    parse_core_server(uri)
                self.assertIn(fragment, str(caught.exception))


class RelayServerUriTests(SynchronousTestCase):
    """
    SMTP relay server URIs.
    """

    def test_forms(self) -> None:
        """
        Every relay URI form parses to its server, with default ports.
        """
        for uri, server in [
            ("smtp://10.0.0.9", RelayServer("smtp", "10.0.0.9", 25)),
            (
                "smtp://mail.example.com:2525",
                RelayServer("smtp", "mail.example.com", 2525),
            ),
            ("SMTP://Mail.Example.com/", RelayServer("smtp", "mail.example.com", 25)),
            (
                "smtps://relay.example.com",
                RelayServer("smtps", "relay.example.com", 465),
            ),
            (
                "smtps://relay.example.com:587",
                RelayServer("smtps", "relay.example.com", 587),
            ),
            ("smtp://[2001:db8::9]:25", RelayServer("smtp", "2001:db8::9", 25)),
            ("mx://example.com", RelayServer("mx", "example.com", 25)),
            (
                "maildir:/var/lib/mdgateway/out",
                RelayServer("maildir", "/var/lib/mdgateway/out", 0),
            ),
            ("maildir:/var/lib/x/../y", RelayServer("maildir", "/var/lib/y", 0)),
        ]:
            with self.subTest(uri=uri):
                self.assertEqual(parse_relay_server(uri), server)

    def test_str_round_trip(self) -> None:
        """
        A parsed server's text form parses back to the same server.
        """
        for uri in (
            "smtp://[2001:db8::9]:26",
            "smtps://a.example:465",
            "mx://a.example",
            "maildir:/x",
        ):
            with self.subTest(uri=uri):
                server = parse_relay_server(uri)
                self.assertEqual(parse_relay_server(str(server)), server)

    def test_refused(self) -> None:
        """
        Malformed relay URIs are refused with a reason.
        """
        for uri, fragment in [
            ("http://relay", "unknown scheme 'http'"),
            ("lmtp://relay", "unknown scheme 'lmtp'"),
            ("smtp://", "missing host"),
            ("smtp://relay:70000", "not a server URI"),
            ("smtp://relay?apikey=abc", "apikey is only for MetaDefender Core"),
            ("smtp://relay?x=1", "no query parameters"),
            ("smtp://u:p@relay", "credentials"),
            ("mx://example.com:25", "takes no port"),
            ("mx://192.0.2.1", "needs a domain"),
            ("maildir:var/mail", "must be absolute"),
            ("maildir://var/mail", "one slash"),
            ("maildir:", "needs a folder"),
        ]:
            with self.subTest(uri=uri):
                with self.assertRaises(ServerUriError) as caught:
                    parse_relay_server(uri)
                self.assertIn(fragment, str(caught.exception))


class LoopsBackTests(SynchronousTestCase):
    """
    Relays that are the gateway's own listener.
    """

    def test_loops(self) -> None:
        """
        Loopback, unspecified and equal addresses on a listener's port loop.
        """
        for uri, own in [
            ("smtp://127.0.0.1:25", ("0.0.0.0", 25)),
            ("smtp://127.0.0.5:25", ("", 25)),
            ("smtp://localhost:25", ("0.0.0.0", 25)),
            ("smtp://[::1]:25", ("::", 25)),
            ("smtp://127.0.0.1:25", ("0:0::0", 25)),
            ("smtp://127.0.0.1:25", ("::", 25)),
            ("smtp://0.0.0.0:25", ("0.0.0.0", 25)),
            ("smtps://10.0.0.5:465", ("10.0.0.5", 465)),
            ("smtp://[::ffff:10.0.0.5]:2525", ("10.0.0.5", 2525)),
            ("smtp://localhost:10025", ("127.0.0.1", 10025)),
            ("smtp://0.0.0.0:10025", ("127.0.0.1", 10025)),
            ("smtp://10.0.0.5:25", ("[10.0.0.5]", 25)),
        ]:
            with self.subTest(uri=uri, own=own):
                self.assertIsNotNone(loops_back(parse_relay_server(uri), [own]))

    def test_no_loop(self) -> None:
        """
        Other ports, other addresses, other families, names and non-SMTP
        servers are not loops.
        """
        for uri, own in [
            ("smtp://127.0.0.1:2525", ("0.0.0.0", 25)),
            ("smtp://10.0.0.9:25", ("0.0.0.0", 25)),
            ("smtp://[::1]:25", ("0.0.0.0", 25)),
            ("smtp://127.0.0.1:25", ("10.0.0.5", 25)),
            ("smtp://127.0.0.2:25", ("127.0.0.1", 25)),
            ("smtp://mail.example.com:25", ("0.0.0.0", 25)),
            ("mx://example.com", ("0.0.0.0", 25)),
            ("maildir:/tmp/x", ("0.0.0.0", 25)),
        ]:
            with self.subTest(uri=uri, own=own):
                self.assertIsNone(loops_back(parse_relay_server(uri), [own]))


# -- parsing profiles ---------------------------------------------------------


class CoreProfileParseTests(ProblemAssertions):
    """
    C{[profiles.core.NAME]} tables.
    """

    def test_every_key(self) -> None:
        """
        Every key is read into the profile.
        """
        policy, lines = load(
            f"""
            [profiles.core.local]
            servers = ["https://127.0.0.1:8008", "https://core2:8008?apikey=k"]
            strategy = "round_robin"
            rule = "Email DLP"
            user_agent = "agent/1"
            poll_interval = "250ms"
            scan_timeout = "2m"
            concurrency = 5
            ca_file = "{__file__}"
            hash_lookup = true
            failure_threshold = 5
            retry_after = "1m"
            submit = "poll"
            verdict_cache = "5m"
            verdict_cache_size = 50
            """
        )
        self.assertEqual(lines, [])
        self.assertEqual(
            policy.core_profiles["local"],
            CoreProfile(
                name="local",
                servers=(
                    CoreServer("https://127.0.0.1:8008"),
                    CoreServer("https://core2:8008", "k"),
                ),
                strategy="round_robin",
                rule="Email DLP",
                user_agent="agent/1",
                poll_interval=0.25,
                scan_timeout=120.0,
                concurrency=5,
                ca_file=__file__,
                hash_lookup=True,
                failure_threshold=5,
                retry_after=60.0,
                submit="poll",
                verdict_cache=300.0,
                verdict_cache_size=50,
            ),
        )

    def test_submit_and_cache_checked(self) -> None:
        """
        An unknown submit mode, a verdict cache over an hour or a size
        below 1 is a problem naming the key.
        """
        base = PROFILES.replace(
            'servers = ["http://127.0.0.1:8008"]',
            'servers = ["http://127.0.0.1:8008"]\n{extra}',
        )
        self.assertOnlyProblem(
            base.format(extra='submit = "webhook"'),
            "profiles.core.local.submit",
            'unknown submit mode "webhook"',
        )
        self.assertOnlyProblem(
            base.format(extra='verdict_cache = "2h"'),
            "profiles.core.local.verdict_cache",
            "must be at most 1h",
        )
        self.assertOnlyProblem(
            base.format(extra="verdict_cache_size = 0"),
            "profiles.core.local.verdict_cache_size",
            "must be at least 1",
        )
        policy, lines = load(base.format(extra='verdict_cache = "0s"'))
        self.assertEqual(lines, [])
        self.assertEqual(policy.core_profiles["local"].verdict_cache, 0.0)

    def test_defaults(self) -> None:
        """
        Only C{servers} is required; the rest has the product's defaults.
        """
        policy, lines = load(PROFILES)
        self.assertEqual(lines, [])
        self.assertEqual(policy.core_profiles["local"], CORE)

    def test_bad_uri(self) -> None:
        """
        A bad server URI is reported at its index.
        """
        self.assertOnlyProblem(
            PROFILES.replace("http://127.0.0.1:8008", "gopher://core"),
            "profiles.core.local.servers[0]",
            "unknown scheme 'gopher'",
        )

    def test_unknown_query(self) -> None:
        """
        Query parameters other than apikey are refused.
        """
        self.assertOnlyProblem(
            PROFILES.replace("http://127.0.0.1:8008", "http://core?rule=x"),
            "profiles.core.local.servers[0]",
            "unknown query parameter 'rule'",
        )

    def test_apikey_masked(self) -> None:
        """
        A problem line never shows an apikey.
        """
        _, lines = load(
            PROFILES.replace("http://127.0.0.1:8008", "http://core/x?apikey=SECRET123")
        )
        self.assertEqual(len(lines), 1, lines)
        self.assertNotIn("SECRET123", lines[0])
        self.assertIn("apikey=...", lines[0])

    def test_no_servers(self) -> None:
        """
        A profile without servers, or with an empty list, is refused.
        """
        self.assertOnlyProblem(
            "[profiles.core.local]\nrule = 'x'\n",
            "profiles.core.local.servers",
            "is required",
        )
        self.assertOnlyProblem(
            "[profiles.core.local]\nservers = []\n",
            "profiles.core.local.servers",
            "at least one server",
        )

    def test_duplicate_server(self) -> None:
        """
        The same server twice in a profile is refused.
        """
        self.assertOnlyProblem(
            "[profiles.core.local]\nservers = ['http://core', 'http://CORE:8008']\n",
            "profiles.core.local.servers[1]",
            "listed twice",
        )

    def test_unknown_strategy(self) -> None:
        """
        An unknown strategy is refused.
        """
        self.assertOnlyProblem(
            PROFILES.replace(
                'servers = ["http', 'strategy = "random"\nservers = ["http'
            ),
            "profiles.core.local.strategy",
            "random",
        )

    def test_ca_file_without_https(self) -> None:
        """
        C{ca_file} on a profile with no https server is refused.
        """
        self.assertOnlyProblem(
            PROFILES.replace(
                'servers = ["http://127.0.0.1:8008"]',
                f'servers = ["http://127.0.0.1:8008"]\nca_file = "{__file__}"',
            ),
            "profiles.core.local.ca_file",
            "https://",
        )

    def test_bad_values(self) -> None:
        """
        Out-of-range numbers, bad durations and multi-line strings are
        reported at their keys.
        """
        _, lines = load(
            """
            [profiles.core.local]
            servers = ["http://core"]
            concurrency = 0
            poll_interval = "soon"
            rule = "a\\nb"
            user_agent = ""
            scan_timeout = "0s"
            """
        )
        self.assertProblem(lines, "profiles.core.local.concurrency", "at least 1")
        self.assertProblem(lines, "profiles.core.local.poll_interval", "not a duration")
        self.assertProblem(lines, "profiles.core.local.rule", "printable")
        self.assertProblem(lines, "profiles.core.local.user_agent", "printable")
        self.assertProblem(lines, "profiles.core.local.scan_timeout", "at least 1")
        self.assertEqual(len(lines), 5, lines)

    def test_unknown_key(self) -> None:
        """
        Unknown keys in a profile are reported.
        """
        self.assertOnlyProblem(
            PROFILES.replace(
                "[profiles.core.local]", '[profiles.core.local]\nurl = "x"'
            ),
            "profiles.core.local.url",
            "unknown key",
        )

    def test_unknown_profile_type(self) -> None:
        """
        Profile types other than core and smtp are reported.
        """
        self.assertOnlyProblem(
            PROFILES + "[profiles.vault.v]\nservers = []\n",
            "profiles.vault",
            "unknown key",
        )


class SmtpProfileParseTests(ProblemAssertions):
    """
    C{[profiles.smtp.NAME]} tables.
    """

    def test_every_key(self) -> None:
        """
        Every key is read into the profile, including the timeouts table.
        """
        policy, lines = load(
            f"""
            [profiles.smtp.tenant]
            servers = ["smtp://10.0.0.9:25", "smtps://relay.example.com:465",
                       "mx://example.com", "maildir:/var/lib/mdgateway/delivered"]
            strategy = "round_robin"
            tls = "verify"
            ca_file = "{__file__}"
            tls_name = "relay.example.com"
            auth_user = "gateway"
            auth_password_file = "{__file__}"
            [profiles.smtp.tenant.timeouts]
            connect = "10s"
            data_term = "20m"
            """
        )
        self.assertEqual(lines, [])
        profile = policy.smtp_profiles["tenant"]
        self.assertEqual(
            profile.servers,
            (
                RelayServer("smtp", "10.0.0.9", 25),
                RelayServer("smtps", "relay.example.com", 465),
                RelayServer("mx", "example.com", 25),
                RelayServer("maildir", "/var/lib/mdgateway/delivered", 0),
            ),
        )
        self.assertEqual(
            (profile.strategy, profile.tls, profile.ca_file, profile.tls_name),
            ("round_robin", "verify", __file__, "relay.example.com"),
        )
        self.assertEqual(
            (profile.auth_user, profile.auth_password_file), ("gateway", __file__)
        )
        self.assertEqual(
            (profile.timeouts.connect, profile.timeouts.data_term), (10.0, 1200.0)
        )
        self.assertEqual(profile.timeouts.greeting, 300.0)

    def test_defaults(self) -> None:
        """
        Only C{servers} is required.
        """
        policy, lines = load(PROFILES)
        self.assertEqual(lines, [])
        self.assertEqual(policy.smtp_profiles["mail"], RELAY)

    def test_bad_uri(self) -> None:
        """
        A bad relay URI is reported at its index.
        """
        self.assertOnlyProblem(
            PROFILES.replace("smtp://10.0.0.9:25", "smtp://10.0.0.9:99999"),
            "profiles.smtp.mail.servers[0]",
            "not a server URI",
        )

    def test_apikey_on_relay(self) -> None:
        """
        An apikey on an SMTP server URI is refused.
        """
        self.assertOnlyProblem(
            PROFILES.replace("smtp://10.0.0.9:25", "smtp://10.0.0.9:25?apikey=k"),
            "profiles.smtp.mail.servers[0]",
            "apikey is only for MetaDefender Core",
        )

    def test_maildir_relative(self) -> None:
        """
        A relative maildir path is refused.
        """
        self.assertOnlyProblem(
            PROFILES.replace("smtp://10.0.0.9:25", "maildir:out"),
            "profiles.smtp.mail.servers[0]",
            "must be absolute",
        )

    def test_no_servers(self) -> None:
        """
        A relay profile without servers is refused.
        """
        self.assertOnlyProblem(
            "[profiles.smtp.mail]\ntls = 'none'\n",
            "profiles.smtp.mail.servers",
            "is required",
        )

    def test_loop(self) -> None:
        """
        A relay server that is one of the gateway's own listeners is refused.
        """
        self.assertOnlyProblem(
            PROFILES.replace("smtp://10.0.0.9:25", "smtp://127.0.0.1:25"),
            "profiles.smtp.mail.servers[0]",
            "loop",
        )

    def test_loop_specific_listener(self) -> None:
        """
        A relay at a listener's own address and port is refused, whichever
        listener it is.
        """
        self.assertOnlyProblem(
            PROFILES.replace("smtp://10.0.0.9:25", "smtp://10.0.0.5:10025"),
            "profiles.smtp.mail.servers[0]",
            "10.0.0.5:10025",
            own=[("0.0.0.0", 25), ("10.0.0.5", 10025)],
        )

    def test_no_loop_other_port(self) -> None:
        """
        A local relay on another port (a local MTA, say) is fine.
        """
        _, lines = load(
            PROFILES.replace("smtp://10.0.0.9:25", "smtp://127.0.0.1:10026")
        )
        self.assertEqual(lines, [])

    def test_unknown_tls(self) -> None:
        """
        An unknown TLS mode is refused.
        """
        self.assertOnlyProblem(
            PROFILES.replace('servers = ["smtp', 'tls = "yes"\nservers = ["smtp'),
            "profiles.smtp.mail.tls",
            "yes",
        )

    def test_smtps_with_tls_none(self) -> None:
        """
        C{tls = "none"} with an smtps:// server is a contradiction.
        """
        self.assertOnlyProblem(
            "[profiles.smtp.mail]\nservers = ['smtps://relay']\ntls = 'none'\n",
            "profiles.smtp.mail.tls",
            "contradicts",
        )

    def test_verify_only_settings(self) -> None:
        """
        C{tls_name} and C{ca_file} apply only with C{tls = "verify"}.
        """
        _, lines = load(
            "[profiles.smtp.mail]\nservers = ['smtp://relay']\ntls = 'required'\n"
            f"tls_name = 'relay.example'\nca_file = '{__file__}'\n"
        )
        self.assertProblem(lines, "profiles.smtp.mail.tls_name", 'tls = "verify"')
        self.assertProblem(lines, "profiles.smtp.mail.ca_file", 'tls = "verify"')
        self.assertEqual(len(lines), 2, lines)

    def test_auth_user_without_file(self) -> None:
        """
        C{auth_user} needs C{auth_password_file}.
        """
        self.assertOnlyProblem(
            "[profiles.smtp.mail]\nservers = ['smtp://relay']\ntls = 'verify'\n"
            "auth_user = 'gw'\n",
            "profiles.smtp.mail.auth_password_file",
            "is required with auth_user",
        )

    def test_auth_file_without_user(self) -> None:
        """
        C{auth_password_file} needs C{auth_user}.
        """
        self.assertOnlyProblem(
            "[profiles.smtp.mail]\nservers = ['smtp://relay']\ntls = 'verify'\n"
            f"auth_password_file = '{__file__}'\n",
            "profiles.smtp.mail.auth_user",
            "is required with auth_password_file",
        )

    def test_inline_password(self) -> None:
        """
        A password written into the config is refused, with the way out.
        """
        self.assertOnlyProblem(
            "[profiles.smtp.mail]\nservers = ['smtp://relay']\n"
            "auth_password = 's3cret'\n",
            "profiles.smtp.mail.auth_password",
            "auth_password_file",
        )

    def test_auth_without_tls(self) -> None:
        """
        AUTH over a connection that may be unencrypted is refused.
        """
        self.assertOnlyProblem(
            "[profiles.smtp.mail]\nservers = ['smtp://relay']\ntls = 'opportunistic'\n"
            f"auth_user = 'gw'\nauth_password_file = '{__file__}'\n",
            "profiles.smtp.mail.auth_user",
            "unprotected",
        )

    def test_auth_with_smtps_only(self) -> None:
        """
        AUTH to smtps:// servers is always protected, whatever C{tls} says.
        """
        _, lines = load(
            "[profiles.smtp.mail]\nservers = ['smtps://relay']\ntls = 'opportunistic'\n"
            f"auth_user = 'gw'\nauth_password_file = '{__file__}'\n"
        )
        self.assertEqual(lines, [])

    def test_missing_file(self) -> None:
        """
        A password file that cannot be read is refused when files are checked,
        and accepted when they are not.
        """
        text = (
            "[profiles.smtp.mail]\nservers = ['smtp://relay']\ntls = 'verify'\n"
            "auth_user = 'gw'\nauth_password_file = '/nonexistent/mdgateway/pw'\n"
        )
        self.assertOnlyProblem(
            text, "profiles.smtp.mail.auth_password_file", "cannot read"
        )
        self.assertEqual(load(text, check_files=False)[1], [])

    def test_relative_file(self) -> None:
        """
        Relative file names are refused without a base folder and taken from
        it with one.
        """
        text = (
            "[profiles.smtp.mail]\nservers = ['smtp://relay']\ntls = 'verify'\n"
            f"ca_file = '{os.path.basename(__file__)}'\n"
        )
        self.assertOnlyProblem(text, "profiles.smtp.mail.ca_file", "absolute path")
        policy, lines = load(text, base=os.path.dirname(__file__))
        self.assertEqual(lines, [])
        self.assertEqual(policy.smtp_profiles["mail"].ca_file, __file__)

    def test_bad_timeout(self) -> None:
        """
        Bad and unknown timeouts are reported in the timeouts table.
        """
        _, lines = load(
            PROFILES + "[profiles.smtp.mail.timeouts]\nconnect = 'never'\nquit = '1s'\n"
        )
        self.assertProblem(
            lines, "profiles.smtp.mail.timeouts.connect", "not a duration"
        )
        self.assertProblem(lines, "profiles.smtp.mail.timeouts.quit", "unknown key")
        self.assertEqual(len(lines), 2, lines)


# -- parsing rules ------------------------------------------------------------


class RuleParseTests(ProblemAssertions):
    """
    C{[[rules]]} tables and the checks that protect operators.
    """

    def test_every_key(self) -> None:
        """
        Every key is read into the rule.
        """
        policy, lines = load(
            PROFILES
            + """
            [[rules]]
            name = "inbound"
            description = "from the partner"
            enabled = false
            direction = "outbound"
            client_networks = ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"]
            senders = ["*@partner.example", "re:bounce-.*@.*", "<>"]
            recipients = ["example.com", "*.example.com", "alice@example.net"]
            core_profile = "local"
            relay_profile = "mail"
            recipient_verification = true
            blocked_action = "strip"
            apply_sanitized = false
            quarantine_blocked = false
            quarantine_sanitized = true
            external_quarantine = true
            notify_recipient = true
            custom_headers = { "X-Scanned-By" = "mdgateway", "X-Tenant" = "a" }
            subject_tag_blocked = "[BLOCKED]"
            subject_tag_sanitized = "[SANITIZED]"
            modify_smime = true
            allow_open_relay = true
            [rules.on_error]
            core_unreachable = "bypass"
            core_busy = "fail"
            scan_timeout = "bypass"
            processing_failed = "retry"
            not_scanned = "bypass"
            modification_failure = "retry"
            """
        )
        self.assertEqual(lines, [])
        (rule,) = policy.rules
        self.assertEqual(
            rule,
            Rule(
                name="inbound",
                core_profile=CORE,
                relay_profile=RELAY,
                enabled=False,
                description="from the partner",
                direction="outbound",
                client_networks=(
                    ip_network("203.0.113.0/24"),
                    ip_network("2001:db8::/32"),
                    ip_network("198.51.100.7/32"),
                ),
                senders=AddressFilter.of("*@partner.example", "re:bounce-.*@.*", "<>"),
                recipients=AddressFilter.of(
                    "example.com", "*.example.com", "alice@example.net"
                ),
                recipient_verification=True,
                blocked_action="strip",
                apply_sanitized=False,
                quarantine_blocked=False,
                quarantine_sanitized=True,
                external_quarantine=True,
                notify_recipient=True,
                custom_headers=(("X-Scanned-By", "mdgateway"), ("X-Tenant", "a")),
                subject_tag_blocked="[BLOCKED]",
                subject_tag_sanitized="[SANITIZED]",
                modify_smime=True,
                allow_open_relay=True,
                on_error=ErrorHandling(
                    "bypass", "fail", "bypass", "retry", "bypass", "retry"
                ),
            ),
        )

    def test_defaults(self) -> None:
        """
        A minimal rule gets fail-closed, product-like defaults.
        """
        policy, lines = load(PROFILES + RULE)
        self.assertEqual(lines, [])
        self.assertEqual(
            policy.rules,
            (
                Rule(
                    "inbound",
                    CORE,
                    RELAY,
                    client_networks=(ip_network("192.0.2.0/24"),),
                ),
            ),
        )

    def test_unknown_core_profile(self) -> None:
        """
        A rule naming an undefined Core profile is refused.
        """
        self.assertOnlyProblem(
            PROFILES
            + RULE.replace('core_profile = "local"', 'core_profile = "remote"'),
            "rules[0].core_profile",
            "unknown MetaDefender Core profile 'remote' (defined: local)",
        )

    def test_unknown_relay_profile(self) -> None:
        """
        A rule naming an undefined relay profile is refused.
        """
        self.assertOnlyProblem(
            PROFILES
            + RULE.replace('relay_profile = "mail"', 'relay_profile = "tenant"'),
            "rules[0].relay_profile",
            "unknown SMTP relay profile 'tenant'",
        )

    def test_missing_profiles(self) -> None:
        """
        A rule must name both profiles.
        """
        _, lines = load(
            PROFILES + '[[rules]]\nname = "x"\nclient_networks = ["10.0.0.1"]\n'
        )
        self.assertProblem(lines, "rules[0].core_profile", "is required")
        self.assertProblem(lines, "rules[0].relay_profile", "is required")

    def test_missing_name(self) -> None:
        """
        A rule must have a name.
        """
        self.assertOnlyProblem(
            PROFILES + RULE.replace('name = "inbound"', ""),
            "rules[0].name",
            "is required",
        )

    def test_bad_cidr(self) -> None:
        """
        A malformed network is refused at its index.
        """
        self.assertOnlyProblem(
            PROFILES
            + RULE.replace('["192.0.2.0/24"]', '["192.0.2.0/24", "192.0.2.300/32"]'),
            "rules[0].client_networks[1]",
            "not an IP network",
        )

    def test_host_bits(self) -> None:
        """
        A network with host bits set is refused with both readings offered.
        """
        self.assertOnlyProblem(
            PROFILES + RULE.replace('"192.0.2.0/24"', '"192.0.2.7/24"'),
            "rules[0].client_networks[0]",
            "did you mean 192.0.2.0/24 or 192.0.2.7/32?",
        )

    def test_invalid_regex(self) -> None:
        """
        An invalid regular expression is refused at its index.
        """
        self.assertOnlyProblem(
            PROFILES + RULE + 'recipients = ["example.com", "re:[a-z"]\n',
            "rules[0].recipients[1]",
            "invalid regular expression",
        )

    def test_catastrophic_regex(self) -> None:
        """
        A catastrophic regular expression is refused at its index.
        """
        self.assertOnlyProblem(
            PROFILES + RULE + 'senders = ["re:(a+)+@example\\\\.com"]\n',
            "rules[0].senders[0]",
            "nested quantifiers",
        )

    def test_bad_pattern(self) -> None:
        """
        A malformed address pattern is refused at its index.
        """
        self.assertOnlyProblem(
            PROFILES + RULE + 'recipients = [".example.com"]\n',
            "rules[0].recipients[0]",
            "*.example.com",
        )

    def test_duplicate_name(self) -> None:
        """
        Two rules with the same name (ignoring case) are refused.
        """
        self.assertOnlyProblem(
            PROFILES + RULE + RULE.replace('"inbound"', '"INBOUND"'),
            "rules[1].name",
            "duplicate rule name 'INBOUND' (also rules[0].name)",
        )

    def test_bad_name(self) -> None:
        """
        An empty or multi-line rule name is refused.
        """
        self.assertOnlyProblem(
            PROFILES + RULE.replace('name = "inbound"', 'name = ""'),
            "rules[0].name",
            "printable",
        )

    def test_unknown_direction(self) -> None:
        """
        An unknown direction is refused.
        """
        self.assertOnlyProblem(
            PROFILES + RULE + 'direction = "sideways"\n',
            "rules[0].direction",
            "sideways",
        )

    def test_unknown_blocked_action(self) -> None:
        """
        An unknown blocked action is refused.
        """
        self.assertOnlyProblem(
            PROFILES + RULE + 'blocked_action = "drop"\n',
            "rules[0].blocked_action",
            "drop",
        )

    def test_unknown_error_action(self) -> None:
        """
        An unknown error-handling action is refused at its condition.
        """
        self.assertOnlyProblem(
            PROFILES + RULE + '[rules.on_error]\ncore_busy = "ignore"\n',
            "rules[0].on_error.core_busy",
            "ignore",
        )

    def test_unknown_error_condition(self) -> None:
        """
        An unknown error condition is reported.
        """
        self.assertOnlyProblem(
            PROFILES + RULE + '[rules.on_error]\nspam_failed = "retry"\n',
            "rules[0].on_error.spam_failed",
            "unknown key",
        )

    def test_unknown_key(self) -> None:
        """
        Unknown keys in a rule are reported.
        """
        self.assertOnlyProblem(
            PROFILES + RULE + "recipient = ['example.com']\n",
            "rules[0].recipient",
            "unknown key",
        )

    def test_wrong_type(self) -> None:
        """
        A filter given as a string instead of a list is reported.
        """
        self.assertOnlyProblem(
            PROFILES + RULE + "recipients = 'example.com'\n",
            "rules[0].recipients",
            "expected an array",
        )

    def test_open_relay(self) -> None:
        """
        A rule without client or recipient filters is an open relay.
        """
        self.assertOnlyProblem(
            PROFILES + RULE.replace('client_networks = ["192.0.2.0/24"]', ""),
            "rules[0]",
            "open relay",
        )

    def test_open_relay_covering_filters(self) -> None:
        """
        Filters that cover everything are as open as no filters.
        """
        for networks, recipients in [
            ('["0.0.0.0/0"]', '["*"]'),
            ('["::/0", "10.0.0.0/8"]', '["example.com", "*@*"]'),
            ('["0.0.0.0/1", "128.0.0.0/1"]', '["re:.*@.*"]'),
            ("[]", '["*.com"]'),
        ]:
            with self.subTest(networks=networks, recipients=recipients):
                self.assertOnlyProblem(
                    PROFILES
                    + RULE.replace('["192.0.2.0/24"]', networks)
                    + f"recipients = {recipients}\n",
                    "rules[0]",
                    "allow_open_relay = true",
                )

    def test_open_relay_allowed(self) -> None:
        """
        C{allow_open_relay = true} lets an open rule load.
        """
        _, lines = load(
            PROFILES
            + RULE.replace('client_networks = ["192.0.2.0/24"]', "")
            + "allow_open_relay = true\n"
        )
        self.assertEqual(lines, [])

    def test_recipient_filter_closes(self) -> None:
        """
        A rule for any client is fine when it names its recipient domains.
        """
        _, lines = load(
            PROFILES
            + RULE.replace('client_networks = ["192.0.2.0/24"]', "")
            + 'recipients = ["example.com", "*.example.com"]\n'
        )
        self.assertEqual(lines, [])

    def test_open_relay_sender_filter_no_help(self) -> None:
        """
        A sender filter does not close an open relay: senders are forged.
        """
        self.assertOnlyProblem(
            PROFILES
            + RULE.replace('client_networks = ["192.0.2.0/24"]', "")
            + 'senders = ["example.com"]\n',
            "rules[0]",
            "open relay",
        )

    def test_disabled_rule_validated(self) -> None:
        """
        A disabled rule is validated like an enabled one.
        """
        _, lines = load(
            PROFILES
            + RULE.replace('client_networks = ["192.0.2.0/24"]', "")
            + "enabled = false\nblocked_action = 'shred'\n"
        )
        self.assertProblem(lines, "rules[0]", "open relay")
        self.assertProblem(lines, "rules[0].blocked_action", "shred")

    def test_reserved_header(self) -> None:
        """
        Custom headers may not fake the gateway's verdict headers or replace
        structural ones.
        """
        for name in (
            "X-Metadefender-Core-Result",
            "x-md-email-security-id",
            "Received",
            "FROM",
        ):
            with self.subTest(name=name):
                self.assertOnlyProblem(
                    PROFILES + RULE + f'custom_headers = {{ "{name}" = "x" }}\n',
                    f"rules[0].custom_headers.{name}",
                    "set by the gateway",
                )

    def test_bad_header_name(self) -> None:
        """
        A header name with a colon or space is refused.
        """
        self.assertOnlyProblem(
            PROFILES + RULE + 'custom_headers = { "X Bad" = "x" }\n',
            "rules[0].custom_headers.X Bad",
            "header name",
        )

    def test_header_injection(self) -> None:
        """
        A header value with a line break is refused.
        """
        self.assertOnlyProblem(
            PROFILES
            + RULE
            + 'custom_headers = { "X-A" = "x\\r\\nBcc: evil@example" }\n',
            "rules[0].custom_headers.X-A",
            "one line",
        )

    def test_duplicate_header(self) -> None:
        """
        The same header twice (ignoring case) is refused.
        """
        self.assertOnlyProblem(
            PROFILES + RULE + 'custom_headers = { "X-A" = "1", "x-a" = "2" }\n',
            "rules[0].custom_headers.x-a",
            "twice",
        )

    def test_subject_tag_control(self) -> None:
        """
        A subject tag with a line break is refused.
        """
        self.assertOnlyProblem(
            PROFILES + RULE + 'subject_tag_blocked = "[X]\\n"\n',
            "rules[0].subject_tag_blocked",
            "one line",
        )

    def test_external_quarantine_without_quarantine(self) -> None:
        """
        External quarantine with nothing quarantined is refused.
        """
        self.assertOnlyProblem(
            PROFILES
            + RULE
            + "external_quarantine = true\nquarantine_blocked = false\n",
            "rules[0].external_quarantine",
            "nothing to apply to",
        )

    def test_verification_needs_smtp(self) -> None:
        """
        Recipient verification through a maildir-only relay is refused.
        """
        self.assertOnlyProblem(
            PROFILES.replace("smtp://10.0.0.9:25", "maildir:/tmp/out")
            + RULE
            + "recipient_verification = true\n",
            "rules[0].recipient_verification",
            "no SMTP server",
        )

    def test_no_rules_allowed(self) -> None:
        """
        A configuration without rules, or with only disabled ones, loads: it
        refuses all mail.
        """
        policy, lines = load(PROFILES)
        self.assertEqual((lines, policy.rules), ([], ()))
        policy, lines = load(PROFILES + RULE + "enabled = false\n")
        self.assertEqual((lines, policy.enabled_rules), ([], ()))

    def test_all_problems_at_once(self) -> None:
        """
        One pass reports every mistake in the file.
        """
        _, lines = load(
            """
            [profiles.core.local]
            servers = ["ftp://core"]
            [profiles.smtp.mail]
            servers = ["smtp://localhost:25"]
            [[rules]]
            name = "a"
            core_profile = "nope"
            relay_profile = "mail"
            client_networks = ["10.0.0.1/8"]
            [[rules]]
            name = "b"
            core_profile = "local"
            relay_profile = "mail"
            recipients = ["re:(x|x)*"]
            direction = "up"
            """
        )
        for path in (
            "profiles.core.local.servers[0]",
            "profiles.smtp.mail.servers[0]",
            "rules[0].core_profile",
            "rules[0].client_networks[0]",
            "rules[1].recipients[0]",
            "rules[1].direction",
        ):
            self.assertProblem(lines, path, "")
        self.assertEqual(len(lines), 6, lines)


# -- the examples -------------------------------------------------------------


class ExampleTests(SynchronousTestCase):
    """
    The example configurations load and behave as their comments say.
    """

    def load_example(self, name: str) -> tuple[dict[str, object], Policy, list[str]]:
        """
        Load an example's policy for its own listener (port 25, all
        interfaces), without checking files that live on the target host.
        """
        data = tomllib.loads((ETC / name).read_text(encoding="utf-8"))
        problems = Problems()
        policy = parse_policy(
            Section(data, "", problems), [("0.0.0.0", 25)], check_files=False
        )
        return data, policy, problems.lines

    def test_office365_loads(self) -> None:
        """
        C{etc/office365.toml} has no policy problems and only the loader's
        other sections besides.
        """
        data, policy, lines = self.load_example("office365.toml")
        self.assertEqual(lines, [])
        self.assertEqual(
            set(data) - {"profiles", "rules"},
            {"sender_helo_domain", "listeners", "tls", "spool", "processes"},
        )
        self.assertEqual([r.name for r in policy.rules], ["inbound", "outbound"])

    def test_office365_behaviour(self) -> None:
        """
        Mail from Office 365 to the tenant is inbound (full scanning with
        the Core rule the integration guide names), everything else from
        Office 365 is outbound (the DLP-only Core rule, limited to the
        mdemailsecurity user agent), null senders included; both rules are
        bound to the placeholder tenant, which is what keeps other tenants
        out; strangers match nothing.
        """
        _, policy, _ = self.load_example("office365.toml")
        o365 = ip("40.107.1.2")
        inbound = policy.select(o365, "someone@elsewhere.example", "user@example.com")
        assert inbound is not None
        self.assertEqual(inbound.name, "inbound")
        self.assertEqual(inbound.relay_profile.tls, "verify")
        self.assertEqual(
            inbound.core_profile.rule, "MetaDefender Email Gateway Security"
        )
        outbound = policy.select(o365, "user@example.com", "someone@elsewhere.example")
        assert outbound is not None
        self.assertEqual(
            (
                outbound.name,
                outbound.core_profile.rule,
                outbound.core_profile.user_agent,
            ),
            ("outbound", "MetaDefender Email Gateway Security DLP", "mdemailsecurity"),
        )
        bounce = policy.select(o365, "", "someone@elsewhere.example")
        self.assertIs(bounce, outbound)
        placeholder = ("11111111-2222-3333-4444-555555555555",)
        self.assertEqual(
            [(r.name, r.tenant_ids) for r in policy.rules],
            [("inbound", placeholder), ("outbound", placeholder)],
        )
        self.assertEqual([r.senders for r in policy.rules], [ANY_ADDRESS] * 2)
        self.assertIsNone(
            policy.select(ip("198.51.100.1"), "a@b.example", "user@example.com")
        )
        self.assertIsNone(policy.select(ip("198.51.100.1"), "", "x@elsewhere.example"))

    def test_perimeter_loads(self) -> None:
        """
        C{etc/perimeter.toml} has no policy problems.
        """
        data, policy, lines = self.load_example("perimeter.toml")
        self.assertEqual(lines, [])
        self.assertEqual(
            set(data) - {"profiles", "rules"},
            {"sender_helo_domain", "listeners", "tls", "spool", "processes"},
        )
        self.assertEqual([r.name for r in policy.rules], ["inbound", "outbound"])

    def test_perimeter_behaviour(self) -> None:
        """
        Mail from the perimeter gateway goes to Exchange, mail from Exchange
        to the perimeter gateway, bounces included; other clients get nothing.
        """
        _, policy, _ = self.load_example("perimeter.toml")
        inbound = policy.select(ip("10.0.0.1"), "", "user@example.com")
        assert inbound is not None
        self.assertEqual(inbound.relay_profile.name, "exchange")
        outbound = policy.select(
            ip("10.0.0.10"), "user@example.com", "x@elsewhere.example"
        )
        assert outbound is not None
        self.assertEqual(outbound.relay_profile.name, "perimeter")
        self.assertIsNone(
            policy.select(ip("10.0.0.7"), "a@b.example", "user@example.com")
        )

    def test_examples_checked_by_loop_guard(self) -> None:
        """
        The examples pass the loop guard for their own listener, and a
        listener on the relay's address would be caught.
        """
        data = tomllib.loads((ETC / "perimeter.toml").read_text(encoding="utf-8"))
        problems = Problems()
        parse_policy(Section(data, "", problems), [("10.0.0.9", 25)], check_files=False)
        self.assertEqual(len(problems.lines), 1, problems.lines)
        self.assertTrue(
            problems.lines[0].startswith("profiles.smtp.exchange.servers[0]: ")
        )


class RelativeMaildirTests(SynchronousTestCase):
    """
    A relative maildir folder is taken from the config file's folder.
    """

    def test_relative_maildir_uses_base(self) -> None:
        """
        maildir:delivered with base /etc/mdgw resolves to /etc/mdgw/delivered;
        without a base it is refused.
        """
        server = parse_relay_server("maildir:../var/delivered", base="/etc/mdgw")
        self.assertEqual(server.host, "/etc/var/delivered")
        with self.assertRaises(ServerUriError):
            parse_relay_server("maildir:delivered")
