"""
Tests for loading and validating the gateway configuration file.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.config import ConfigError, load_config, parse_config
from mdgateway.endpoints import client_endpoint, endpoint_address
from mdgateway.tomlreader import parse_duration, parse_size

ETC = Path(__file__).resolve().parent.parent / "etc"

MINIMAL = """
sender_helo_domain = "gw.test"
[[listeners]]
name = "smtp"
endpoint = "tcp:10025:interface=127.0.0.1"
[spool]
directory = "spool"
"""


def problems(text: str) -> list[str]:
    try:
        parse_config(tomllib.loads(text), base=ETC)
    except ConfigError as e:
        return list(e.problems)
    return []


class ExampleFileTests(SynchronousTestCase):
    """
    The shipped configuration files.
    """

    def test_default_config_loads(self) -> None:
        """
        etc/mdgateway.toml loads as-is: loopback listener on 10025 with
        STARTTLS, the example certificate, one rule, paths made absolute.
        """
        config = load_config(ETC / "mdgateway.toml")
        (listener,) = config.listeners
        self.assertEqual(listener.endpoint, "tcp:10025:interface=127.0.0.1")
        self.assertEqual(listener.tls, "starttls")
        self.assertTrue(Path(config.tls.certificate or "").is_file())
        self.assertTrue(Path(config.spool.directory).is_absolute())
        self.assertEqual([r.name for r in config.policy.rules], ["local"])
        self.assertEqual(len(config.version), 12)

    def test_examples_load_for_another_host(self) -> None:
        """
        The Office 365 and perimeter examples load without problems when the
        files they name (certificates on the real host) are not checked.
        """
        for name in ("office365.toml", "perimeter.toml"):
            config = load_config(ETC / name, check_files=False)
            self.assertEqual(
                [r.name for r in config.policy.rules], ["inbound", "outbound"]
            )

    def test_unreadable_and_invalid_files(self) -> None:
        """
        A missing file, invalid TOML and non-UTF-8 bytes each give one clear
        problem line naming the file.
        """
        missing = self.mktemp()
        with self.assertRaises(ConfigError) as caught:
            load_config(missing)
        self.assertIn("cannot read", caught.exception.problems[0])
        bad = Path(self.mktemp())
        bad.write_text("a = [")
        with self.assertRaises(ConfigError) as caught:
            load_config(bad)
        self.assertIn("invalid TOML", caught.exception.problems[0])
        bad.write_bytes(b"a = '\xff'")
        with self.assertRaises(ConfigError) as caught:
            load_config(bad)
        self.assertIn("not UTF-8", caught.exception.problems[0])


class ValidationTests(SynchronousTestCase):
    """
    Every mistake is reported with its key path, all at once.
    """

    def test_minimal_is_valid(self) -> None:
        """
        A listener and a spool directory are all that is required.
        """
        self.assertEqual(problems(MINIMAL), [])

    def test_lanes(self) -> None:
        """
        The big-message lane reads sizes with units, defaults to 4 MiB and
        two at a time, and a bad value names its key.
        """
        config = parse_config(tomllib.loads(MINIMAL), base=ETC)
        self.assertEqual(
            (config.delivery.big_message, config.delivery.big_concurrency),
            (4 << 20, 2),
        )
        config = parse_config(
            tomllib.loads(
                MINIMAL + '[delivery]\nbig_message = "10MiB"\nbig_concurrency = 3\n'
            ),
            base=ETC,
        )
        self.assertEqual(
            (config.delivery.big_message, config.delivery.big_concurrency),
            (10 << 20, 3),
        )
        lines = problems(MINIMAL + "[delivery]\nbig_concurrency = 0\n")
        self.assertTrue(
            any(line.startswith("delivery.big_concurrency:") for line in lines), lines
        )

    def test_unknown_tls_mode(self) -> None:
        """
        A misspelt TLS mode names the key and the allowed modes.
        """
        lines = problems(
            MINIMAL
            + '\n[[listeners]]\nname = "b"\nendpoint = "tcp:1"\ntls = "startls"\n'
        )
        self.assertIn(
            'listeners[1].tls: unknown mode "startls" (choose from none, starttls, '
            "starttls-required, implicit)",
            lines,
        )

    def test_many_problems_at_once(self) -> None:
        """
        Several mistakes in one file are all reported, each with its path:
        bad host name, unknown key, bad size, bad duration, out-of-range
        integer, missing required key, TLS mode without a certificate.
        """
        text = """
sender_helo_domain = "not a host"
colour = "blue"
[[listeners]]
endpoint = "tcp:25"
tls = "implicit"
[limits]
message_size = "lots"
idle_timeout = "soon"
recipients = 0
[spool]
"""
        lines = problems(text)
        for expected in (
            "sender_helo_domain: not a host name: 'not a host'",
            "colour: unknown key",
            "listeners[0].name: is required",
            "listeners[0].tls: mode 'implicit' needs tls.certificate and tls.key",
            "limits.message_size: not a size: 'lots'",
            "limits.idle_timeout: not a duration: 'soon'",
            "limits.recipients: must be at least 1",
            "spool.directory: is required",
        ):
            self.assertIn(expected, lines)

    def test_relay_once_max_age(self) -> None:
        """
        C{delivery.relay_once_max_age} defaults to an hour, takes a
        duration (0 turns the relay-once pass off) and may not exceed
        C{marker_max_age}, which it names.
        """
        config = parse_config(tomllib.loads(MINIMAL), base=ETC)
        self.assertEqual(config.delivery.relay_once_max_age, 3600.0)
        config = parse_config(
            tomllib.loads(MINIMAL + '[delivery]\nrelay_once_max_age = "0s"\n'),
            base=ETC,
        )
        self.assertEqual(config.delivery.relay_once_max_age, 0.0)
        lines = problems(
            MINIMAL + '[delivery]\nrelay_once_max_age = "2d"\nmarker_max_age = "1d"\n'
        )
        self.assertIn(
            "delivery.relay_once_max_age: must be at most marker_max_age", lines
        )
        lines = problems(MINIMAL + '[delivery]\nrelay_once_max_age = "soon"\n')
        self.assertIn("delivery.relay_once_max_age: not a duration: 'soon'", lines)

    def test_type_errors(self) -> None:
        """
        A value of the wrong type names the expected and the given type.
        """
        lines = problems(MINIMAL + '[limits]\nrecipients = "many"\nerrors = true\n')
        self.assertIn("limits.recipients: expected an integer, got a string", lines)
        self.assertIn("limits.errors: expected an integer, got a boolean", lines)

    def test_proxy_needs_trusted_networks(self) -> None:
        """
        proxy_protocol without trusted_proxies is refused; a bad network is
        named with its index.
        """
        text = MINIMAL.replace(
            'endpoint = "tcp:10025:interface=127.0.0.1"',
            'endpoint = "tcp:10025"\nproxy_protocol = true',
        )
        self.assertIn(
            "listeners[0].trusted_proxies: proxy_protocol needs at least one "
            "trusted proxy network",
            problems(text),
        )
        bad = text.replace(
            "proxy_protocol = true",
            'proxy_protocol = true\ntrusted_proxies = ["10.0.0.0/33"]',
        )
        self.assertIn(
            "listeners[0].trusted_proxies[0]: not an IP network: '10.0.0.0/33'",
            problems(bad),
        )

    def test_endpoint_checks(self) -> None:
        """
        TLS and PROXY endpoint types are refused in favour of the listener
        keys; a malformed endpoint is named.
        """
        ssl = MINIMAL.replace('"tcp:10025:interface=127.0.0.1"', '"ssl:465"')
        self.assertTrue(
            any(
                line.startswith(
                    "listeners[0].endpoint: unsupported endpoint type 'ssl'"
                )
                for line in problems(ssl)
            )
        )

    def test_endpoints_that_cannot_bind(self) -> None:
        """
        Every listener endpoint that cannot bind is one problem line naming
        its key and saying why: port out of range, an interface that is not
        an IP address, a UNIX socket in a folder that does not exist, a
        systemd endpoint without a valid domain or index, an unknown option
        and a misspelt type.
        """
        cases = {
            "tcp:99999": "port must be 0 to 65535, not '99999'",
            "tcp:-1": "port must be 0 to 65535, not '-1'",
            "tcp:": "no port",
            "tcp:25:interface=999.1.1.1": "interface must be an IP address",
            "tcp:25:interface=localhost": "interface must be an IP address",
            "tcp6:25:interface=127.0.0.1": "tcp6 needs an IPv6 interface",
            "tcp:25:backlog=lots": "backlog must be 1 to 65535",
            "tcp:25:interfce=::1": "unknown option 'interfce' for tcp",
            "tcp:25:26": "unexpected parameter '26'",
            "unix:/nonexistent/dir/gw.sock": "the socket's folder does not exist",
            "unix:/tmp/gw.sock:mode=rw": "mode must be octal",
            "systemd:domain=INET": "index (or name) of the inherited socket",
            "systemd:domain=IPX:index=0": "domain must be one of INET, INET6, UNIX",
            "systemd:domain=INET:index=x": "index must be 0 to 1023",
            "tcpp:25": "unknown endpoint type 'tcpp'",
            "ssl:465": "unsupported endpoint type 'ssl'",
        }
        for endpoint, why in cases.items():
            text = MINIMAL.replace("tcp:10025:interface=127.0.0.1", endpoint)
            lines = problems(text)
            self.assertEqual(len(lines), 1, (endpoint, lines))
            self.assertTrue(
                lines[0].startswith("listeners[0].endpoint: "), (endpoint, lines)
            )
            self.assertIn(why, lines[0], endpoint)
            self.assertIn(repr(endpoint), lines[0])

    def test_endpoints_that_can_bind(self) -> None:
        """
        Well-formed endpoints of every supported kind pass.
        """
        for endpoint in (
            "tcp:25",
            "tcp:port=2525:interface=0.0.0.0:backlog=100",
            "tcp:25:interface=\\:\\:1",
            "tcp6:25:interface=\\:\\:",
            "unix:/tmp/gw.sock:mode=660",
            "systemd:domain=INET6:index=0",
            "systemd:domain=INET:name=smtp",
        ):
            toml = endpoint.replace("\\", "\\\\")  # a TOML basic string
            text = MINIMAL.replace("tcp:10025:interface=127.0.0.1", toml)
            self.assertEqual(problems(text), [], endpoint)

    def test_admin_and_emulator_endpoints(self) -> None:
        """
        The admin and emulator endpoints are checked the same way, each
        naming its own key; the emulator must be TCP.
        """
        text = (
            MINIMAL
            + '[admin]\nendpoint = "tcp:70000"\n'
            + '[emulator]\nendpoint = "unix:/tmp/core.sock"\n'
        )
        lines = problems(text)
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith("admin.endpoint: port must be"), lines)
        self.assertTrue(
            lines[1].startswith("emulator.endpoint: unsupported endpoint type 'unix'"),
            lines,
        )

    def test_emulator_instant(self) -> None:
        """
        C{[emulator] instant} is off unless set; it must be a boolean.
        """
        self.assertFalse(
            parse_config(tomllib.loads(MINIMAL), base=ETC).emulator.instant
        )
        text = MINIMAL + "[emulator]\nenabled = true\ninstant = true\n"
        self.assertTrue(parse_config(tomllib.loads(text), base=ETC).emulator.instant)
        lines = problems(MINIMAL + '[emulator]\ninstant = "yes"\n')
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("emulator.instant"), lines)

    def test_auth_needs_tls_and_users(self) -> None:
        """
        AUTH on a listener needs TLS and a users file.
        """
        text = MINIMAL.replace(
            'endpoint = "tcp:10025:interface=127.0.0.1"',
            'endpoint = "tcp:10025"\nauth = "required"',
        )
        lines = problems(text)
        self.assertIn(
            "listeners[0].auth_users_file: auth 'required' needs auth_users_file", lines
        )
        self.assertIn(
            "listeners[0].auth: AUTH is offered only under TLS: set tls", lines
        )

    def test_bad_certificate(self) -> None:
        """
        A certificate file that is not PEM is reported under tls.
        """
        junk = Path(self.mktemp()).resolve()
        junk.write_text("not a certificate")
        text = MINIMAL + f'[tls]\ncertificate = "{junk}"\nkey = "{junk}"\n'
        self.assertTrue(
            any(line.startswith("tls: not valid PEM") for line in problems(text))
        )

    def test_duplicate_listener_names(self) -> None:
        """
        Two listeners with one name are refused.
        """
        text = MINIMAL + '[[listeners]]\nname = "smtp"\nendpoint = "tcp:10026"\n'
        self.assertIn(
            "listeners[1].name: duplicate listener name 'smtp'", problems(text)
        )


class ProcessesTests(SynchronousTestCase):
    """
    C{[processes] workers}.
    """

    def test_workers(self) -> None:
        """
        One process by default; a count; C{"auto"} is one per CPU this
        process may run on (its affinity); anything else is refused naming
        the key.
        """
        base = tomllib.loads(MINIMAL)
        self.assertEqual(parse_config(base, base=ETC).workers, 1)
        three = {**base, "processes": {"workers": 3}}
        self.assertEqual(parse_config(three, base=ETC).workers, 3)
        auto = {**base, "processes": {"workers": "auto"}}
        self.assertEqual(
            parse_config(auto, base=ETC).workers, min(64, len(os.sched_getaffinity(0)))
        )
        for bad, message in (
            ("0", "processes.workers: must be at least 1"),
            ("65", "processes.workers: must be at most 64"),
            ('"many"', "processes.workers: expected a count or 'auto', got 'many'"),
        ):
            self.assertEqual(
                problems(MINIMAL + f"[processes]\nworkers = {bad}\n"), [message]
            )

    def test_umask(self) -> None:
        """
        The processes' umask is 027 by default, any octal mask when given,
        and anything else is refused naming the key.
        """
        base = tomllib.loads(MINIMAL)
        self.assertEqual(parse_config(base, base=ETC).umask, 0o027)
        tight = {**base, "processes": {"umask": "0077"}}
        self.assertEqual(parse_config(tight, base=ETC).umask, 0o077)
        self.assertEqual(
            problems(MINIMAL + '[processes]\numask = "0928"\n'),
            ["processes.umask: expected an octal mask such as '0027', got '0928'"],
        )


class StoreSettingsTests(SynchronousTestCase):
    """
    C{[store] outbox_limit}.
    """

    def test_outbox_limit(self) -> None:
        """
        100000 records by default; at least 100.
        """
        base = tomllib.loads(MINIMAL)
        self.assertEqual(parse_config(base, base=ETC).store.outbox_limit, 100_000)
        self.assertEqual(
            problems(MINIMAL + "[store]\noutbox_limit = 5\n"),
            ["store.outbox_limit: must be at least 100"],
        )


class EndpointAddressTests(SynchronousTestCase):
    """
    What an endpoint description binds.
    """

    def test_endpoint_address(self) -> None:
        """
        TCP descriptions give their interface and port (C{""} for all
        interfaces); others give their kind and port 0.
        """
        self.assertEqual(
            endpoint_address("tcp:8008:interface=127.0.0.1"), ("TCP", "127.0.0.1", 8008)
        )
        self.assertEqual(endpoint_address("tcp:port=25"), ("TCP", "", 25))
        self.assertEqual(endpoint_address("unix:/run/gw.sock"), ("UNIX", "", 0))
        self.assertEqual(
            endpoint_address("tcp6:25:interface=\\:\\:1"), ("TCP6", "::1", 25)
        )


class UnitParsingTests(SynchronousTestCase):
    """
    Sizes and durations in the config file.
    """

    def test_sizes(self) -> None:
        """
        Sizes accept bytes and binary units; garbage is None.
        """
        self.assertEqual(parse_size("512"), 512)
        self.assertEqual(parse_size("10k"), 10240)
        self.assertEqual(parse_size("25MiB"), 25 * 1024 * 1024)
        self.assertEqual(parse_size("1 GB"), 1024**3)
        self.assertIsNone(parse_size("lots"))

    def test_durations(self) -> None:
        """
        Durations accept seconds and ms/s/m/h/d units.
        """
        self.assertEqual(parse_duration("250ms"), 0.25)
        self.assertEqual(parse_duration("5m"), 300)
        self.assertEqual(parse_duration("1.5h"), 5400)
        self.assertEqual(parse_duration("30"), 30)
        self.assertIsNone(parse_duration("soon"))


class ClientEndpointTests(SynchronousTestCase):
    """
    Client endpoints: addresses without a lookup, names through one.
    """

    def test_addresses_and_names(self) -> None:
        """
        An IPv4 or IPv6 address (bracketed or not) connects directly, with
        the timeout and bind address given; a host name is looked up.
        """
        reactor = MemoryReactorClock()
        four = client_endpoint(reactor, "127.0.0.1", 25, 7.0, ("127.0.0.2", 0))
        self.assertIsInstance(four, TCP4ClientEndpoint)
        four.connect(Factory.forProtocol(Protocol))
        host, port, _, timeout, bind = reactor.tcpClients[0]
        self.assertEqual(
            (host, port, timeout, bind), ("127.0.0.1", 25, 7.0, ("127.0.0.2", 0))
        )
        for six in ("::1", "[::1]"):
            self.assertIsInstance(
                client_endpoint(reactor, six, 25, 7.0), TCP6ClientEndpoint
            )
        self.assertIsInstance(
            client_endpoint(reactor, "relay.example.com", 25, 7.0), HostnameEndpoint
        )
