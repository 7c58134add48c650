# -*- test-case-name: tests.test_core_emulator -*-
"""
The Core emulator on the network: a L{Site} over its resource tree, and
L{EmulatorServer}, which listens on loopback and can stop and start
listening to simulate a server that refuses connections.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web.server import Request, Site

from mdgateway.emulator.resources import EmulatorResource

if TYPE_CHECKING:
    from mdgateway.emulator.app import CoreEmulator

_log = Logger()

#: Pending connections the listener queues. Twisted's default (50) resets
#: connections when a few hundred clients upload at once; a real Core sits
#: behind a much longer queue.
BACKLOG = 1024


class EmulatorRequest(Request):
    """
    A request that can be cut short once its headers are in, before its
    body: a reset, or an early 503 (the emulator's C{reset_next} and
    C{early_busy_next} knobs, for uploads, which are the requests with a
    body).
    """

    _cut = False

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        emulator = getattr(getattr(self.channel, "site", None), "emulator", None)
        if emulator is None or not length:
            return
        transport: Any = self.channel.transport
        if transport is None:
            return
        if emulator.take("reset"):
            self._cut = True
            transport.abortConnection()
        elif emulator.take("early_busy"):
            self._cut = True
            body = b'{"err": "Server is too busy. Try again later."}'
            retry = emulator.config.retry_after
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\n"
                b"Content-Type: application/json\r\n"
                + (b"Retry-After: %d\r\n" % retry if retry is not None else b"")
                + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                + body
            )
            transport.loseConnection()

    def process(self) -> None:
        emulator = getattr(getattr(self.channel, "site", None), "emulator", None)
        if emulator is not None:
            emulator.counters["requests"] += 1
        if self._cut:
            return  # already answered or reset: the body is ignored
        super().process()


class EmulatorSite(Site):
    """
    The emulator's site: counts the connections it accepts (so tests can
    see a client keep its connections alive) and, when asked, keeps no
    access log (benchmarks run hundreds of requests a second).
    """

    noisy = False
    requestFactory = EmulatorRequest

    def __init__(
        self,
        emulator: CoreEmulator,
        *,
        access_log: bool = True,
        reactor: Any = None,
    ) -> None:
        super().__init__(EmulatorResource(emulator), reactor=reactor)
        self.emulator = emulator
        self._access_log = access_log

    def buildProtocol(self, addr: Any) -> Any:
        self.emulator.counters["connections"] += 1
        return super().buildProtocol(addr)

    def log(self, request: Any) -> None:
        if self._access_log:
            super().log(request)


def log_request_counts(emulator: CoreEmulator) -> None:
    """
    Log what the emulator served, by kind (see L{CoreEmulator.counters}),
    when it stops: benchmarks read the Core requests per scanned file from
    the event's C{emulator_counts}.
    """
    _log.info(
        "the Core emulator's request counts: {emulator_counts}",
        emulator_counts=dict(sorted(emulator.counters.items())),
    )


def build_site(
    emulator: CoreEmulator, *, access_log: bool = True, reactor: Any = None
) -> Site:
    """
    A L{Site} serving the emulator (without an access log when asked).
    """
    return EmulatorSite(emulator, access_log=access_log, reactor=reactor)


class EmulatorServer:
    """
    One emulator listening on loopback, able to stop and start listening on
    the same port to simulate a server that refuses connections.

    @ivar emulator: the state, for knobs and assertions.
    """

    def __init__(
        self,
        reactor: Any,
        emulator: CoreEmulator | None = None,
        *,
        interface: str = "127.0.0.1",
        access_log: bool = False,
        backlog: int = BACKLOG,
    ) -> None:
        if emulator is None:
            from mdgateway.emulator.app import CoreEmulator

            emulator = CoreEmulator(reactor)
        self._reactor = reactor
        self.emulator = emulator
        self._interface = interface
        self._backlog = backlog
        self._factory = WrappingFactory(
            build_site(self.emulator, access_log=access_log, reactor=reactor)
        )
        self._listening: IListeningPort | None = None
        self._port = 0

    def start(self, port: int | None = None) -> int:
        """
        Listen (on C{port}, else the previous port, else a free one) and
        return the port number.
        """
        if self._listening is None:
            number = self._port if port is None else port
            self._listening = self._reactor.listenTCP(
                number, self._factory, backlog=self._backlog, interface=self._interface
            )
            self._port = int(self._listening.getHost().port)  # type: ignore[union-attr]
        return self._port

    @property
    def port(self) -> int:
        """
        The port number (kept across L{stop}/L{start}).
        """
        return self._port

    @property
    def url(self) -> str:
        """
        Base URL for a L{mdgateway.policy.profiles.CoreServer}.
        """
        return f"http://{self._interface}:{self._port}"

    def stop(self) -> Deferred[None]:
        """
        Stop listening and abort every open connection: clients now get
        "connection refused".
        """
        waits: list[Deferred[Any]] = []
        if self._listening is not None:
            stopped = self._listening.stopListening()
            if stopped is not None:
                waits.append(stopped)
            self._listening = None
        for wrapper in list(self._connections()):
            wrapper.transport.abortConnection()
        done: Deferred[Any] = DeferredList(waits)
        return done.addCallback(lambda _: None)

    def close(self) -> Deferred[None]:
        """
        L{stop}, then drop the emulator's state and files.
        """
        return self.stop().addCallback(lambda _: self.emulator.close())

    def _connections(self) -> Iterator[Any]:
        yield from self._factory.protocols
