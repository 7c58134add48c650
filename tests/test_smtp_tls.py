"""
Server TLS: every client completes its handshake (with or without ALPN, TLS
1.2 and 1.3, STARTTLS and implicit) or is refused with a logged reason; the
cipher policy per listener; the rate limit on failure lines; our relay
client offers no ALPN and works with a server that selects one.
"""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.config import ListenerConfig
from mdgateway.smtp.tls import (
    INTERMEDIATE_CIPHERS,
    OPPORTUNISTIC_CIPHERS,
    FailureLogLimit,
    cipher_problem,
    default_cipher_policy,
    handshake_error,
    select_alpn,
    server_tls_options,
)
from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import ETC, GatewayProcess, default_toml, free_port

CERT = str(ETC / "tls" / "localhost.crt")
KEY = str(ETC / "tls" / "localhost.key")

MESSAGE = b"From: a@example.com\r\nTo: r@example.org\r\nSubject: tls\r\n\r\nhi\r\n"


class ALPNTests(SynchronousTestCase):
    def test_smtp_selected_when_offered(self) -> None:
        """
        A client that offers C{smtp} among others gets C{smtp}.
        """
        self.assertEqual(select_alpn(None, [b"h2", b"smtp"]), b"smtp")  # type: ignore[arg-type]

    def test_no_overlap_is_no_alpn_not_an_empty_protocol(self) -> None:
        """
        A client that offers only protocols we do not speak gets pyOpenSSL's
        "no overlap" answer (the handshake goes on without ALPN), never the
        empty selection that OpenSSL turns into alert 80.
        """
        answer = select_alpn(None, [b"h2", b"http/1.1"])  # type: ignore[arg-type]
        self.assertIs(answer, SSL.NO_OVERLAPPING_PROTOCOLS)
        self.assertNotEqual(answer, b"")


class CipherPolicyTests(SynchronousTestCase):
    def test_defaults_by_mode_and_auth(self) -> None:
        """
        TLS required or AUTH offered: intermediate; opportunistic STARTTLS
        without AUTH (port 25): the broader set.
        """
        self.assertEqual(default_cipher_policy("implicit", "off"), "intermediate")
        self.assertEqual(
            default_cipher_policy("starttls-required", "off"), "intermediate"
        )
        self.assertEqual(default_cipher_policy("starttls", "optional"), "intermediate")
        self.assertEqual(default_cipher_policy("starttls", "off"), "opportunistic")

    def test_listener_key_wins_then_tls_ciphers(self) -> None:
        """
        A listener's own C{tls_ciphers} wins over C{[tls] ciphers}, which
        wins over the default of its mode.
        """
        plain = ListenerConfig(name="mx", endpoint="tcp:25", tls="starttls")
        own = ListenerConfig(
            name="mx", endpoint="tcp:25", tls="starttls", tls_ciphers="intermediate"
        )
        self.assertEqual(plain.cipher_policy(), "opportunistic")
        self.assertEqual(plain.cipher_policy("HIGH"), "HIGH")
        self.assertEqual(own.cipher_policy("HIGH"), "intermediate")

    def test_intermediate_is_aead_only(self) -> None:
        """
        Every TLS 1.2 suite of the intermediate policy is AEAD with forward
        secrecy, as OpenSSL expands it.
        """
        context = server_tls_options(CERT, KEY, ciphers="intermediate").context
        names = [
            c
            for c in SSL.Connection(context, None).get_cipher_list()
            if not c.startswith("TLS_")
        ]
        self.assertTrue(names)
        for name in names:
            self.assertTrue(name.startswith("ECDHE-"), name)
            self.assertTrue("GCM" in name or "CHACHA20" in name, name)

    def test_opportunistic_is_broader(self) -> None:
        """
        The opportunistic policy keeps CBC and RSA key exchange suites
        besides the intermediate ones, and no export, NULL or RC4 suite.
        """
        context = server_tls_options(CERT, KEY, ciphers="opportunistic").context
        names = SSL.Connection(context, None).get_cipher_list()
        self.assertIn("ECDHE-ECDSA-AES128-GCM-SHA256", names)
        self.assertIn("ECDHE-RSA-AES128-SHA", names)
        self.assertIn("AES128-GCM-SHA256", names)
        for name in names:
            self.assertNotIn("NULL", name)
            self.assertNotIn("RC4", name)
            self.assertNotIn("DES-CBC3", name)
        self.assertTrue(OPPORTUNISTIC_CIPHERS.startswith(INTERMEDIATE_CIPHERS))

    def test_bad_cipher_string(self) -> None:
        """
        A cipher string that selects nothing is a problem naming the
        policies; a valid OpenSSL string and the policy names are not.
        """
        problem = cipher_problem("NOTACIPHER")
        assert problem is not None
        self.assertIn("intermediate", problem)
        self.assertIsNone(cipher_problem("intermediate"))
        self.assertIsNone(cipher_problem("ECDHE+AESGCM"))
        with self.assertRaises(ValueError):
            server_tls_options(CERT, KEY, ciphers="NOTACIPHER")


class ServerTLSTests(SynchronousTestCase):
    def test_one_context_for_every_connection(self) -> None:
        """
        Every connection, and any old-style caller of C{getContext}, uses
        the one context that carries the ALPN answer and cipher policy.
        """
        tls = server_tls_options(CERT, KEY)
        self.assertIs(tls.getContext(), tls.context)
        connection = tls.serverConnectionForTLS(None)
        self.assertIs(connection.get_context(), tls.context)


class HandshakeErrorTests(SynchronousTestCase):
    def test_reasons_from_openssl_error(self) -> None:
        """
        The reason strings of an OpenSSL error queue, joined; a plain
        connection loss is not a TLS error.
        """
        error = SSL.Error(
            [("SSL routines", "", "unsupported protocol"), ("x", "", "other")]
        )
        self.assertEqual(handshake_error(error), "unsupported protocol; other")
        self.assertIsNone(handshake_error(ConnectionError("closed")))
        self.assertIsNone(handshake_error(None))


class FailureLogLimitTests(SynchronousTestCase):
    def test_burst_then_debug_then_summary(self) -> None:
        """
        Three failures from one address are logged at info, the next ones
        are held back, and the first line after the window says how many.
        """
        clock = Clock()
        limit = FailureLogLimit(clock, window=60, burst=3)
        self.assertEqual([limit.admit("192.0.2.1") for _ in range(3)], [0, 0, 0])
        self.assertEqual([limit.admit("192.0.2.1") for _ in range(5)], [None] * 5)
        self.assertEqual(limit.admit("192.0.2.9"), 0)
        clock.advance(60)
        self.assertEqual(limit.admit("192.0.2.1"), 5)
        self.assertEqual(limit.admit("192.0.2.1"), 0)

    def test_bounded_memory(self) -> None:
        """
        With more addresses than it may remember, the oldest are forgotten:
        a forgotten address starts afresh.
        """
        limit = FailureLogLimit(Clock(), window=60, burst=1, max_clients=2)
        self.assertEqual(limit.admit("a"), 0)
        self.assertIsNone(limit.admit("a"))
        limit.admit("b")
        limit.admit("c")
        self.assertEqual(len(limit._seen), 2)
        self.assertEqual(limit.admit("a"), 0)


# -- against the running gateway --------------------------------------------


@pytest.fixture(scope="module")
def tls_gateway(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, int, int]]:
    """
    A gateway with a STARTTLS listener and an implicit-TLS listener, and
    its Core emulator, so the mail it takes is scanned and delivered.
    """
    tmp = tmp_path_factory.mktemp("tls")
    starttls, implicit, core = free_port(), free_port(), free_port()
    toml = default_toml(
        starttls,
        tmp / "spool",
        core_url=f"http://127.0.0.1:{core}",
        extra=f"""
[[listeners]]
name = "smtps"
endpoint = "tcp:{implicit}:interface=127.0.0.1"
tls = "implicit"
[emulator]
enabled = true
endpoint = "tcp:{core}:interface=127.0.0.1"
""",
    )
    config = tmp / "mdgateway.toml"
    config.write_text(toml)
    gw = GatewayProcess(config, tmp / "gateway.log")
    gw.start(starttls)
    try:
        yield gw, starttls, implicit
    finally:
        gw.kill()


def s_client(
    port: int, *options: str, starttls: bool
) -> subprocess.CompletedProcess[bytes]:
    """
    Run C{openssl s_client}, say EHLO and QUIT over TLS, and return what
    it printed.
    """
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"]
    if starttls:
        command += ["-starttls", "smtp"]
    return subprocess.run(
        [*command, "-ign_eof", *options],
        input=b"EHLO client.test\r\nQUIT\r\n",
        capture_output=True,
        timeout=20,
    )


needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl not installed"
)


@needs_openssl
@pytest.mark.timeout(120)
@pytest.mark.parametrize("starttls", [True, False], ids=["starttls", "implicit"])
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("alpn", [None, "h2", "smtp", "h2,smtp"])
def test_openssl_client_completes(
    tls_gateway: tuple[GatewayProcess, int, int],
    starttls: bool,
    version: str,
    alpn: str | None,
) -> None:
    """
    C{openssl s_client} completes its handshake whatever it offers over
    ALPN, with TLS 1.2 and 1.3, on STARTTLS and implicit TLS, and then
    speaks SMTP inside it; C{smtp} is selected when offered, nothing
    otherwise.
    """
    _, starttls_port, implicit_port = tls_gateway
    options = [version] + (["-alpn", alpn] if alpn else [])
    port = starttls_port if starttls else implicit_port
    result = s_client(port, *options, starttls=starttls)
    out = result.stdout.decode(errors="replace")
    err = result.stderr.decode(errors="replace")
    assert "alert" not in err, err
    expected = "TLSv1.2" if version == "-tls1_2" else "TLSv1.3"
    assert f"Protocol  : {expected}" in out or f"New, {expected}" in out, out
    assert "250-PIPELINING" in out and "221 2.0.0" in out, out
    if alpn and "smtp" in alpn:
        assert "ALPN protocol: smtp" in out, out
    else:
        assert "No ALPN negotiated" in out, out


@needs_openssl
@pytest.mark.timeout(120)
@pytest.mark.parametrize("old", ["-tls1", "-tls1_1"])
def test_old_tls_refused_and_logged(
    tls_gateway: tuple[GatewayProcess, int, int], old: str
) -> None:
    """
    A TLS 1.0 or 1.1 client gets a protocol-version alert (a clean
    refusal, not an internal error), the refusal is logged at info with the
    listener, client and OpenSSL's reason, and the gateway serves the next
    client as before.
    """
    gw, _, implicit = tls_gateway
    before = len(failures(gw))
    result = s_client(implicit, old, "-cipher", "DEFAULT@SECLEVEL=0", starttls=False)
    err = result.stderr.decode(errors="replace")
    assert result.returncode != 0
    assert "alert protocol version" in err, err
    event = wait_for(lambda: failures(gw)[before:])[0]
    assert event["listener"] == "smtps"
    assert event["client"] == "127.0.0.1"
    assert event["tls_error"] == "unsupported protocol"
    assert event["session_id"]
    good = s_client(implicit, "-tls1_2", starttls=False)
    assert b"250-PIPELINING" in good.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocols", [["h2"], ["smtp"], ["h2", "http/1.1"]])
def test_smtplib_with_alpn_delivers(
    tls_gateway: tuple[GatewayProcess, int, int], protocols: list[str]
) -> None:
    """
    smtplib with C{set_alpn_protocols} sends a message over STARTTLS and
    over implicit TLS.
    """
    _, starttls, implicit = tls_gateway
    context = ssl.create_default_context(cafile=CERT)
    context.set_alpn_protocols(protocols)
    with smtplib.SMTP("127.0.0.1", starttls, local_hostname="alpn.test") as client:
        client.starttls(context=context)
        refused = client.sendmail("a@example.com", ["r@example.org"], MESSAGE)
        assert refused == {}
    with smtplib.SMTP_SSL(
        "127.0.0.1", implicit, local_hostname="alpn.test", context=context
    ) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.selected_alpn_protocol() == (
            "smtp" if "smtp" in protocols else None
        )
        assert client.sendmail("a@example.com", ["r@example.org"], MESSAGE) == {}


def failures(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [
        e
        for e in gw.log_events()
        if str(e.get("msg", e.get("log_format", ""))).startswith("TLS handshake failed")
    ]


T = TypeVar("T")


def wait_for(probe: Callable[[], T], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found or time.monotonic() > deadline:
            assert found, "not logged in time"
            return found
        time.sleep(0.05)


# -- our relay client ---------------------------------------------------------


def _pump(client: SSL.Connection, server: SSL.Connection) -> None:
    """
    Run a handshake between two memory-BIO connections to its end.
    """
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(20):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        moved = False
        for source, sink in ((client, server), (server, client)):
            try:
                data = source.bio_read(65536)
            except SSL.WantReadError:
                continue
            sink.bio_write(data)
            moved = True
        if not moved:
            return


class RelayClientALPNTests(SynchronousTestCase):
    def test_client_offers_no_alpn(self) -> None:
        """
        The relay client, under every STARTTLS policy, completes a
        handshake with a server that would select C{smtp}, and offers no
        ALPN at all (a server that selects a protocol never sees an offer
        it could fail on).
        """
        from mdgateway.smtp.clientprotocol import client_tls_creator
        from tests.certs import make_test_pki

        pki = make_test_pki(self.mktemp())
        for policy in ("opportunistic", "required", "verify"):
            offers: list[list[bytes]] = []

            def record(
                connection: object,
                offered: list[bytes],
                offers: list[list[bytes]] = offers,
            ) -> bytes:
                offers.append(list(offered))
                return b"smtp"

            server_tls = server_tls_options(str(pki.server_cert), str(pki.server_key))
            server_tls.context.set_alpn_select_callback(record)
            creator = client_tls_creator(policy, "localhost", str(pki.ca_cert))
            # The TLS layer the client's transport builds around its protocol.
            tls = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol))
            client = creator.clientConnectionForTLS(tls.buildProtocol(None))
            server = server_tls.serverConnectionForTLS(None)
            _pump(client, server)
            self.assertIsNotNone(client.get_protocol_version_name(), policy)
            self.assertEqual(client.get_alpn_proto_negotiated(), b"", policy)
            self.assertEqual(offers, [], policy)


@pytest_twisted.ensureDeferred
async def test_relay_client_with_alpn_server(
    smtpd: Callable[..., _Controller], tmp_path: Path
) -> None:
    """
    The relay client delivers over implicit TLS and over STARTTLS to servers
    that select C{smtp} over ALPN when it is offered.
    """
    from twisted.internet import reactor

    from mdgateway.policy.profiles import RelayServer
    from mdgateway.relay.connect import ClientSettings, connect_server
    from mdgateway.smtp.clientmodel import ClientEnvelope, MessageBody, SmtpTimeouts
    from tests.certs import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    context = pki.server_ssl_context()
    context.set_alpn_protocols(["smtp"])
    for scheme, kwargs in (("smtps", "ssl_context"), ("smtp", "tls_context")):
        handler = RecordingHandler()
        controller = smtpd(handler, **{kwargs: context})
        settings = ClientSettings(
            helo="gw.example",
            tls="verify",
            ca_file=str(pki.ca_cert),
            tls_name="localhost",
            timeouts=SmtpTimeouts(*[20.0] * 8),
        )
        relay = RelayServer(scheme, "127.0.0.1", controller.port)
        client = await connect_server(reactor, relay, settings)
        assert client.info.tls_verified
        result = await client.send(
            ClientEnvelope("a@example.org", ("r@example.net",)),
            MessageBody.from_bytes(b"alpn\r\n"),
        )
        await client.quit()
        assert result.recipients[0].delivered, scheme
        assert handler.messages[0].content == b"alpn\r\n"
