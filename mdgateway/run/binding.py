# -*- test-case-name: tests.test_e2e_start -*-
"""
Binding what the gateway serves, before anything else starts, and saying
which configuration key is at fault when it cannot.

A gateway that cannot open one of its listeners, its admin API or its
emulator's port must not half-start (accepting mail it cannot scan, or
sending message parts to whatever else listens on the emulator's port).
Under twist and twistd the service starts before the reactor runs, so these
binds are tried then, synchronously, and a failure ends the process with
one line and a non-zero status before any mail is taken. An address in use
is the exception: a predecessor's workers may hold it while they drain, so
it is tried again once the reactor runs, for as long as a drain may take
(logged), and then fails the start.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorCore, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mdgateway.emulator.server import BACKLOG
from mdgateway.endpoints import parse_endpoint

log = Logger()


class StartError(Exception):
    """
    The gateway cannot start; the message names the configuration key.
    """


def reason_of(error: BaseException) -> str:
    """
    The operating system's words for a listen failure.
    """
    socket_error = getattr(error, "socketError", error)
    text = getattr(socket_error, "strerror", None)
    return str(text or socket_error or error).rstrip(".")


def address_in_use(error: BaseException) -> bool:
    socket_error = getattr(error, "socketError", error)
    return getattr(socket_error, "errno", None) == errno.EADDRINUSE


class AddressInUseError(StartError):
    """
    The address is held, maybe by a predecessor still draining: worth
    waiting for, unlike the other reasons a bind fails.
    """


def listen_now(
    reactor: IReactorCore, description: str, factory: Factory, *, key: str
) -> IListeningPort:
    """
    Listen on C{description} at once: the reactor need not run (TCP, UNIX,
    systemd and SSL endpoints bind synchronously).

    @param key: the configuration key, for the error.
    @raise AddressInUseError: the address is in use.
    @raise StartError: naming C{key} and the reason, for any other failure.
    """
    result: list[Any] = []
    serverFromString(reactor, description).listen(factory).addBoth(result.append)
    if not result:
        raise StartError(f"{key}: {description} does not bind at once")
    outcome = result[0]
    if not isinstance(outcome, Failure):
        port: IListeningPort = outcome
        return port
    error = outcome.value or Exception("unknown")
    text = f"{key}: cannot listen on {description}: {reason_of(error)}"
    if address_in_use(error):
        raise AddressInUseError(text)
    raise StartError(text)


#: The listen backlog of the built-in emulator's socket.
EMULATOR_BACKLOG = BACKLOG


def listening_socket(description: str, *, key: str) -> socket.socket:
    """
    A listening TCP socket for a child process to serve (the built-in Core
    emulator): bound here, so a port another program holds stops the start
    instead of being mistaken for the child, and a restarted child serves
    the same socket.

    @raise AddressInUseError: the address is in use.
    @raise StartError: naming C{key} and the reason, for any other failure.
    """
    endpoint = parse_endpoint(description)
    host = endpoint.interface or ("::" if endpoint.kind == "tcp6" else "0.0.0.0")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, endpoint.port))
        # As deep as the emulator's own listener: bursts of uploads from a
        # busy gateway must queue, not be refused (see emulator.server).
        sock.listen(EMULATOR_BACKLOG)
    except OSError as e:
        sock.close()
        text = f"{key}: cannot listen on {description}: {reason_of(e)}"
        if e.errno == errno.EADDRINUSE:
            raise AddressInUseError(text) from None
        raise StartError(text) from None
    # Non-blocking, as the child's reactor expects of a socket it adopts
    # (the flag belongs to the socket, which both processes share).
    sock.setblocking(False)
    os.set_inheritable(sock.fileno(), True)
    return sock


async def retrying(
    clock: IReactorTime,
    attempt: Callable[[], Any],
    seconds: float,
    *,
    waiting: str,
    holder: str = "",
) -> Any:
    """
    C{attempt()} until it does not raise L{AddressInUseError}, for at most
    C{seconds} of C{clock} (every 0.25 s), logging the wait once; then the
    last error, with C{holder} added to its text.
    """
    deadline = clock.seconds() + seconds
    warned = False
    while True:
        try:
            return attempt()
        except AddressInUseError as e:
            if clock.seconds() >= deadline:
                raise AddressInUseError(f"{e}{holder}") from None
            if not warned:
                warned = True
                log.warn(
                    "{what} is in use (a predecessor draining?); retrying for "
                    "{seconds:g}s",
                    what=waiting,
                    seconds=seconds,
                )
        await deferLater(clock, 0.25, lambda: None)


def exit_after_shutdown(reactor: IReactorCore, status: int) -> None:
    """
    End the process with C{status} once the reactor has shut down in order.

    twist and twistd have no way for a service to set the exit status, so
    this is done last, after every other shutdown step and after the
    standard streams (where the log goes) are flushed.
    """

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)

    def last() -> None:
        # Registered now, it runs after the triggers registered before it.
        reactor.addSystemEventTrigger("after", "shutdown", leave)

    reactor.addSystemEventTrigger("during", "shutdown", last)
