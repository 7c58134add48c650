# -*- test-case-name: tests.test_smtp_protocol -*-
"""
The PROXY protocol (v1 and v2) in front of a listener: a wrapper that reads
the header from a trusted load balancer before the SMTP session sees the
connection, so the banner, limits, rules and logs use the real client.

The header itself is parsed by the sans-IO L{ProxyHeaderParser}.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mdgateway.smtp.proxy import ProxyHeaderError, ProxyHeaderParser

log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_address(address: IAddress) -> tuple[str, int]:
    """
    The (host, port) of a transport address; C{("unknown", 0)} for an
    address without them (a UNIX socket).
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", 0)
    return (str(host) if host is not None else "unknown", int(port or 0))


@implementer(IHandshakeListener)
class ProxyHeaderProtocol(ProtocolWrapper):
    """
    Reads a PROXY v1/v2 header from a trusted proxy before the wrapped
    protocol sees the connection at all, so its C{connectionMade} (and the
    banner) happen with the real client's address.
    """

    factory: ProxyHeaderFactory
    transport: Any

    def __init__(self, factory: ProxyHeaderFactory, wrapped: Protocol) -> None:
        super().__init__(factory, wrapped)  # type: ignore[arg-type]
        self._parser: ProxyHeaderParser | None = ProxyHeaderParser()
        self._peer: tuple[str, int] | None = None
        self._host: tuple[str, int] | None = None
        self._timer: IDelayedCall | None = None
        self.proxied = False

    def makeConnection(self, transport: Any) -> None:
        # Do not start the wrapped protocol yet: that waits for the header.
        self.connected = 1
        self.transport = transport
        self.factory.registerProtocol(self)
        peer = peer_address(transport.getPeer())
        if not self.factory.trusts(peer[0]):
            log.warn(
                "PROXY listener {listener}: connection from untrusted {peer} dropped",
                listener=self.factory.listener,
                peer=peer[0],
            )
            self.factory.proxy_error()
            transport.abortConnection()
            return
        self._timer = self.factory.clock.callLater(
            self.factory.header_timeout, self._no_header
        )

    def _no_header(self) -> None:
        self._timer = None
        self.factory.proxy_error()
        log.info("PROXY header timed out", listener=self.factory.listener)
        assert self.transport is not None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            self.wrappedProtocol.dataReceived(data)
            return
        try:
            result = parser.feed(data)
        except ProxyHeaderError as e:
            self.factory.proxy_error()
            log.warn(
                "bad PROXY header on {listener}: {error}",
                listener=self.factory.listener,
                error=str(e),
            )
            self._cancel_timer()
            self._parser = None
            assert self.transport is not None
            self.transport.abortConnection()
            return
        if result is None:
            return
        addresses, rest = result
        self._parser = None
        self._cancel_timer()
        if addresses.client is not None:
            self._peer, self._host = addresses.client, addresses.server
            self.proxied = True
        ProtocolWrapper.makeConnection(self, self.transport)
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def handshakeCompleted(self) -> None:
        listener = IHandshakeListener(self.wrappedProtocol, None)
        if listener is not None:
            listener.handshakeCompleted()

    def getPeer(self) -> IAddress:
        if self._peer is not None:
            return _IPAddress(*self._peer)
        peer: IAddress = super().getPeer()
        return peer

    def getHost(self) -> IAddress:
        if self._host is not None:
            return _IPAddress(*self._host)
        host: IAddress = super().getHost()
        return host

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_timer()
        if self._parser is None:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


@implementer(IAddress)
@attrs.frozen
class _IPAddress:
    host: str
    port: int
    type: str = "TCP"


class ProxyHeaderFactory(WrappingFactory):
    """
    Wraps a listener's factory with PROXY protocol handling.
    """

    protocol = ProxyHeaderProtocol

    def __init__(
        self,
        wrapped: Factory,
        *,
        trusted: Sequence[Network],
        clock: IReactorTime,
        listener: str,
        header_timeout: float = 10.0,
    ) -> None:
        super().__init__(wrapped)
        self.trusted = tuple(trusted)
        self.clock = clock
        self.listener = listener
        self.header_timeout = header_timeout
        self.proxy_errors = 0
        #: Called for each connection dropped for a missing, bad or
        #: untrusted PROXY header (metrics).
        self.on_error: Callable[[], object] | None = None

    def proxy_error(self) -> None:
        self.proxy_errors += 1
        if self.on_error is not None:
            self.on_error()

    def trusts(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)


__all__ = ["ProxyHeaderFactory", "ProxyHeaderProtocol", "peer_address"]
