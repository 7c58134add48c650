"""
A test server on a free loopback port, typed: the listening port and the
number it got, and stopping it again.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory


async def listen_local(factory: IProtocolFactory) -> tuple[IListeningPort, int]:
    """
    Listen with C{factory} on a free port of 127.0.0.1.

    @return: the listening port and its number.
    """
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(factory)
    address = port.getHost()
    assert isinstance(address, IPv4Address), address
    return port, address.port


async def stop_listening(port: IListeningPort) -> None:
    """
    Stop C{port} and wait until it is closed.
    """
    stopped = port.stopListening()
    if stopped is not None:
        await stopped
