"""
Protocol tests for the SMTP server shim: framing, ordering, limits, timers,
STARTTLS and PROXY, with StringTransport, task.Clock and iosim.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mdgateway.smtp.interfaces import IEnvelopeHandler, IMessageSink
from mdgateway.smtp.replies import Reply
from mdgateway.smtp.server import SessionSettings
from mdgateway.smtp.serverprotocol import (
    ProtocolLimits,
    ProxyHeaderFactory,
    SMTPServerFactory,
    listening_factory,
)
from mdgateway.smtp.tls import server_tls_options
from mdgateway.testing import FakeEnvelopeHandler, MemorySink
from tests.gatewayproc import ETC


class TLSStringTransport(StringTransport):
    """
    A StringTransport that records startTLS calls.
    """

    tls_started: Any = None

    def startTLS(self, options: Any) -> None:
        self.tls_started = options


def connect(
    handler: FakeEnvelopeHandler | None = None,
    clock: Clock | None = None,
    limits: ProtocolLimits | None = None,
    peer: str = "192.0.2.10",
    **settings: Any,
) -> tuple[Any, TLSStringTransport, FakeEnvelopeHandler, Clock]:
    handler = handler or FakeEnvelopeHandler()
    clock = clock or Clock()
    tls = None
    if settings.get("tls_mode", "none") != "none":
        tls = server_tls_options(
            str(ETC / "tls" / "localhost.crt"), str(ETC / "tls" / "localhost.key")
        )
    factory = SMTPServerFactory(
        name="test",
        settings=SessionSettings(hostname="gw.test", **settings),
        handler=handler,
        clock=clock,
        limits=limits,
        tls_options=tls,
    )
    protocol = factory.buildProtocol(None)
    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", peer, 5555))
    protocol.makeConnection(transport)
    return protocol, transport, handler, clock


def replies(transport: StringTransport) -> list[bytes]:
    lines = transport.value().split(b"\r\n")
    transport.clear()
    return [line for line in lines if line]


def codes(transport: StringTransport) -> list[int]:
    return [int(line[:3]) for line in replies(transport) if line[3:4] == b" "]


class FakeTests(SynchronousTestCase):
    """
    The fakes used here provide the real interfaces.
    """

    def test_verified(self) -> None:
        """
        FakeEnvelopeHandler provides IEnvelopeHandler; MemorySink IMessageSink.
        """
        verifyObject(IEnvelopeHandler, FakeEnvelopeHandler())
        verifyObject(IMessageSink, MemorySink())


class FramingTests(SynchronousTestCase):
    """
    Bytes to commands and content.
    """

    def test_greeting_and_connect_event(self) -> None:
        """
        The banner goes out on connect and the handler learns the client.
        """
        protocol, transport, handler, _ = connect()
        self.assertEqual(replies(transport), [b"220 gw.test ESMTP mdgateway"])
        self.assertEqual(handler.events, [("connected", ("192.0.2.10", 5555))])

    def test_refused_connection(self) -> None:
        """
        A connect-time refusal is sent instead of the banner and the
        connection closed.
        """
        handler = FakeEnvelopeHandler()
        handler.refuse_connection = Reply.of(421, "4.3.2", "going away")
        protocol, transport, _, _ = connect(handler)
        self.assertEqual(replies(transport), [b"421 4.3.2 going away"])
        self.assertTrue(transport.disconnecting)

    def test_pipelined_with_async_checks_stays_in_order(self) -> None:
        """
        With checks that answer later, a pipelined burst gets its replies in
        order: nothing after MAIL is answered until MAIL's check returns.
        """
        handler = FakeEnvelopeHandler()
        handler.hold_checks = True
        protocol, transport, _, _ = connect(handler)
        replies(transport)
        protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
            b"RCPT TO:<c@y.example>\r\nDATA\r\n"
        )
        self.assertEqual(codes(transport), [250])  # EHLO only
        handler.pending.pop(0).callback(None)  # MAIL
        self.assertEqual(codes(transport), [250])
        handler.pending.pop(0).callback(None)  # first RCPT
        self.assertEqual(codes(transport), [250])
        handler.pending.pop(0).callback(None)  # second RCPT, then DATA
        self.assertEqual(codes(transport), [250, 354])

    def test_long_burst_of_immediate_checks_does_not_nest(self) -> None:
        """
        Checks that answer at once (the common case) do not make the loop
        recurse per command: MAIL and 2,000 RCPTs pipelined in one write
        (far past the interpreter's recursion limit) all get their 250s.
        """
        protocol, transport, _, _ = connect(max_recipients=5000)
        replies(transport)
        burst = b"EHLO c\r\nMAIL FROM:<a@x.example>\r\n" + b"".join(
            b"RCPT TO:<r%d@y.example>\r\n" % n for n in range(2000)
        )
        protocol.dataReceived(burst)
        self.assertEqual(codes(transport), [250] * 2002)

    def test_data_content_and_queue_reply(self) -> None:
        """
        DATA content reaches the sink dot-unstuffed and CRLF intact; the
        final reply comes from the sink; pipelined QUIT after the dot is
        answered only after it (so the client learns the queue id).
        """
        handler = FakeEnvelopeHandler()
        handler.hold_finish = True
        protocol, transport, _, _ = connect(handler)
        protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n"
        )
        replies(transport)
        protocol.dataReceived(b"Subject: s\r\n\r\n..dot\r\nx\r\n.\r\nQUIT\r\n")
        (sink,) = handler.sinks
        self.assertEqual(sink.content, b"Subject: s\r\n\r\n.dot\r\nx\r\n")
        self.assertEqual(replies(transport), [])
        assert sink.pending is not None
        sink.pending.callback(Reply.of(250, "2.0.0", "Ok: queued as Q1"))
        self.assertEqual(
            replies(transport), [b"250 2.0.0 Ok: queued as Q1", b"221 2.0.0 Bye"]
        )

    def test_bdat(self) -> None:
        """
        BDAT chunks are read by count (no dot-unstuffing), each non-last
        chunk acknowledged, the last one committed.
        """
        protocol, transport, handler, _ = connect()
        protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
        )
        replies(transport)
        protocol.dataReceived(b"BDAT 5\r\n.a\r\nbBDAT 3 LAST\r\nc\r\n")
        self.assertEqual(
            replies(transport),
            [b"250 2.0.0 5 octets received", b"250 2.0.0 Ok: queued as ID0"],
        )
        self.assertEqual(handler.sinks[0].content, b".a\r\nbc\r\n")

    def test_sink_backpressure_pauses_client(self) -> None:
        """
        When the sink asks for a pause, the transport stops reading until
        the sink drains.
        """
        protocol, transport, handler, _ = connect()
        protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n"
        )
        protocol.dataReceived(b"Subject: x\r\n")
        (sink,) = handler.sinks
        sink.paused = True
        protocol.dataReceived(b"more\r\n")
        self.assertEqual(transport.producerState, "paused")
        sink.drain()
        self.assertEqual(transport.producerState, "producing")

    def test_long_command_line(self) -> None:
        """
        A command line over the limit gets 500 5.5.2 without buffering it
        whole; the third gets 421 4.7.0 and the connection is closed.
        """
        protocol, transport, _, _ = connect(limits=ProtocolLimits(max_command_line=600))
        replies(transport)
        protocol.dataReceived(b"X" * 700)
        protocol.dataReceived(b"Y" * 700 + b"\r\nNOOP\r\n")
        self.assertEqual(codes(transport), [500, 250])
        self.assertLessEqual(len(protocol._buffer), 700)
        protocol.dataReceived(b"Z" * 700 + b"\r\n")
        protocol.dataReceived(b"Z" * 700 + b"\r\n")
        self.assertEqual(codes(transport), [500, 421])
        self.assertTrue(transport.disconnecting)

    def test_drain_refuses_new_commands(self) -> None:
        """
        While draining, a command outside a transaction gets 421 4.3.2.
        """
        protocol, transport, handler, _ = connect()
        replies(transport)
        handler.accepting = False
        protocol.dataReceived(b"EHLO c\r\n")
        self.assertEqual(
            replies(transport), [b"421 4.3.2 Service shutting down, try again later"]
        )
        self.assertTrue(transport.disconnecting)


class TimerTests(SynchronousTestCase):
    """
    Idle timeout and whole-session deadline, with an injected clock.
    """

    def test_idle_timeout(self) -> None:
        """
        Silence longer than the idle timeout gets 421 4.4.2 and a close;
        each packet resets the timer.
        """
        protocol, transport, _, clock = connect(limits=ProtocolLimits(idle_timeout=10))
        replies(transport)
        clock.advance(9)
        protocol.dataReceived(b"NOOP\r\n")
        clock.advance(9)
        self.assertFalse(transport.disconnecting)
        clock.advance(2)
        self.assertEqual(codes(transport), [250, 421])
        self.assertTrue(transport.disconnecting)

    def test_session_deadline(self) -> None:
        """
        A session that keeps talking is closed with 421 4.4.2 at the
        deadline, and its open message is aborted.
        """
        protocol, transport, handler, clock = connect(
            limits=ProtocolLimits(idle_timeout=10, session_deadline=25)
        )
        protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n"
        )
        for _ in range(5):
            clock.advance(6)
            protocol.dataReceived(b"line\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIn(b"421 4.4.2 Session time limit exceeded", transport.value())
        self.assertTrue(handler.sinks[0].aborted)

    def test_connection_lost_cancels_timers(self) -> None:
        """
        After the connection is lost no timer is left and the handler hears
        of it.
        """
        protocol, transport, handler, clock = connect()
        protocol.connectionLost(None)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(handler.events[-1][0], "disconnected")


class LimitTests(SynchronousTestCase):
    """
    Connection limits per listener and per client.
    """

    def test_per_client_limit(self) -> None:
        """
        A client over its connection limit gets 421 4.7.0 at connect; when
        one of its connections ends it may connect again.
        """
        handler = FakeEnvelopeHandler()
        clock = Clock()
        factory = SMTPServerFactory(
            name="t",
            settings=SessionSettings(hostname="gw.test"),
            handler=handler,
            clock=clock,
            limits=ProtocolLimits(max_connections_per_client=2),
        )
        transports = []
        protocols = []
        for _ in range(3):
            p = factory.buildProtocol(None)
            t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1))
            p.makeConnection(t)
            protocols.append(p)
            transports.append(t)
        self.assertTrue(transports[2].value().startswith(b"421 4.7.0"))
        protocols[2].connectionLost(None)
        protocols[0].connectionLost(None)
        p = factory.buildProtocol(None)
        t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1))
        p.makeConnection(t)
        self.assertTrue(t.value().startswith(b"220 "))


class StartTLSTests(SynchronousTestCase):
    """
    STARTTLS in the shim.
    """

    def test_injected_commands_discarded(self) -> None:
        """
        Plaintext pipelined after STARTTLS is dropped, not executed after
        the handshake (CVE-2011-0411).
        """
        protocol, transport, handler, _ = connect(tls_mode="starttls")
        protocol.dataReceived(b"EHLO c\r\n")
        replies(transport)
        protocol.dataReceived(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\n")
        self.assertEqual(replies(transport), [b"220 2.0.0 Ready to start TLS"])
        self.assertIsNotNone(transport.tls_started)
        self.assertNotIn(("sender", "evil@x.example"), handler.events)
        protocol.dataReceived(b"MAIL FROM:<a@x.example>\r\n")
        self.assertEqual(codes(transport), [503])

    def test_real_handshake_in_memory(self) -> None:
        """
        Over iosim, an implicit-TLS listener (the factory stack that
        listening_factory builds) completes a real, verified TLS handshake in
        memory with a client; the banner and EHLO reply arrive inside TLS and
        the session records the negotiated TLS version and cipher.
        """
        handler = FakeEnvelopeHandler()
        clock = Clock()
        factory = SMTPServerFactory(
            name="t",
            settings=SessionSettings(hostname="gw.test", tls_mode="implicit"),
            handler=handler,
            clock=clock,
            tls_options=server_tls_options(
                str(ETC / "tls" / "localhost.crt"), str(ETC / "tls" / "localhost.key")
            ),
        )
        trust = Certificate.loadPEM((ETC / "tls" / "localhost.crt").read_bytes())

        class Client(Protocol):
            received = b""

            def dataReceived(self, data: bytes) -> None:
                self.received += data
                if data.startswith(b"220 gw.test"):
                    assert self.transport is not None
                    self.transport.write(b"EHLO c\r\n")

        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS("localhost", trustRoot=trust),
            True,
            ClientFactory.forProtocol(Client),
            clock=clock,
        )
        server_factory = listening_factory(factory)
        client, server, pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            clock=clock,
        )
        for _ in range(5):
            pump.flush()
        assert isinstance(client.wrappedProtocol, Client)
        received = client.wrappedProtocol.received
        self.assertTrue(received.startswith(b"220 gw.test ESMTP mdgateway\r\n"))
        self.assertIn(b"250-gw.test", received)
        self.assertNotIn(b"STARTTLS", received)
        (info,) = handler.infos
        self.assertTrue((info.tls_version or "").startswith("TLSv1."))
        self.assertTrue(info.tls_cipher)


class ProxyHeaderTests(SynchronousTestCase):
    """
    The PROXY header wrapper.
    """

    def wrapped(
        self, trusted: str = "127.0.0.1/32"
    ) -> tuple[ProxyHeaderFactory, FakeEnvelopeHandler, Clock]:
        handler = FakeEnvelopeHandler()
        clock = Clock()
        inner = SMTPServerFactory(
            name="p",
            settings=SessionSettings(hostname="gw.test"),
            handler=handler,
            clock=clock,
        )
        outer = ProxyHeaderFactory(
            inner, trusted=[ipaddress.ip_network(trusted)], clock=clock, listener="p"
        )
        return outer, handler, clock

    def test_banner_waits_for_header(self) -> None:
        """
        No banner until the header is complete; then the SMTP session sees
        the client named in the header, even when the header arrives in
        pieces and commands follow in the same packet.
        """
        outer, handler, _ = self.wrapped()
        protocol = outer.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"PROXY TCP4 203.0.113.9 ")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(handler.events, [])
        protocol.dataReceived(b"10.0.0.1 4000 25\r\nNOOP\r\n")
        self.assertEqual(handler.events, [("connected", ("203.0.113.9", 4000))])
        self.assertEqual(
            replies(transport), [b"220 gw.test ESMTP mdgateway", b"250 2.0.0 Ok"]
        )

    def test_untrusted_peer_dropped(self) -> None:
        """
        A connection from outside the trusted networks is aborted at once,
        with no banner, and counted as a PROXY error (reported to metrics too).
        """
        outer, handler, _ = self.wrapped("10.0.0.0/8")
        reported: list[str] = []
        outer.on_error = lambda: reported.append("error")
        protocol = outer.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(outer.proxy_errors, 1)
        self.assertEqual(reported, ["error"])

    def test_bad_header_and_timeout(self) -> None:
        """
        Garbage instead of a header aborts the connection; a proxy that
        sends nothing is dropped after the header timeout.
        """
        outer, _, clock = self.wrapped()
        protocol = outer.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"EHLO hello\r\n")
        self.assertTrue(transport.disconnecting)
        silent = outer.buildProtocol(None)
        quiet = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 2))
        silent.makeConnection(quiet)
        clock.advance(11)
        self.assertTrue(quiet.disconnecting)
        self.assertEqual(outer.proxy_errors, 2)


class RefusalReportTests(SynchronousTestCase):
    """
    Every negative reply the server sends is reported to the handler once
    (for the refused log), whether the handler decided it or the session,
    the limits, the timers or the drain did.
    """

    def test_session_refusals_are_reported(self) -> None:
        """
        Syntax errors, SIZE over the limit at MAIL, DATA without valid
        recipients and an unknown command never reach the handler's
        checks, yet each is reported with what it refused.
        """
        protocol, transport, handler, _ = connect(max_message_size=1000)
        handler.refused_recipients["nobody@example.org"] = Reply.of(
            550, "5.7.1", "No security rule"
        )
        protocol.dataReceived(
            b"EHLO client.example\r\n"
            b"MAIL FROM:<a@example.org> SIZE=5000\r\n"
            b"MAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<bad address>\r\n"
            b"RCPT TO:<nobody@example.org>\r\n"
            b"DATA\r\n"
            b"FROB\r\n"
        )
        self.assertEqual(codes(transport)[1:], [250, 552, 250, 501, 550, 554, 502])
        self.assertEqual(
            handler.refusals,
            [
                (552, None, None),
                (501, "a@example.org", None),
                (550, "a@example.org", "nobody@example.org"),
                (554, "a@example.org", None),
                (502, "a@example.org", None),
            ],
        )

    def test_draining_and_limits_are_reported(self) -> None:
        """
        The 421 a draining gateway answers with, and the 421 of a session
        that made too many errors, are reported like any refusal.
        """
        protocol, transport, handler, _ = connect(max_errors=2)
        protocol.dataReceived(b"EHLO c\r\nFROB\r\nFROB\r\n")
        self.assertEqual(codes(transport)[-3:], [502, 502, 421])
        self.assertEqual([r[0] for r in handler.refusals], [502, 502, 421])
        protocol, transport, handler, _ = connect()
        handler.accepting = False
        protocol.dataReceived(b"EHLO c\r\n")
        self.assertEqual(codes(transport)[-1], 421)
        self.assertEqual(handler.refusals, [(421, None, None)])

    def test_connection_limit_and_timeout_are_reported(self) -> None:
        """
        A connection over the per-client limit, refused before the
        handler ever sees it, and an idle timeout are reported too.
        """
        handler = FakeEnvelopeHandler()
        clock = Clock()
        limits = ProtocolLimits(max_connections_per_client=1, idle_timeout=5)
        first, transport, _, _ = connect(handler, clock, limits)
        factory = first.factory
        second = factory.buildProtocol(None)
        other = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 6))
        second.makeConnection(other)
        self.assertEqual(codes(other), [421])
        clock.advance(6)
        self.assertEqual(codes(transport)[-1], 421)
        self.assertEqual([r[0] for r in handler.refusals], [421, 421])

    def test_content_refusal_is_reported_once(self) -> None:
        """
        Content refused by the server itself (a bare LF) is told to the
        handler as refused content and reported once, with its sender.
        """
        protocol, transport, handler, _ = connect()
        protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
            b"DATA\r\n"
        )
        protocol.dataReceived(b"Subject: x\r\n\r\nbare\nline\r\n.\r\n")
        self.assertEqual(codes(transport)[-1], 550)
        self.assertIn(("message refused", 550), handler.events)
        self.assertEqual(handler.refusals, [(550, "a@example.org", None)])
