# -*- test-case-name: tests.test_notify -*-
"""
Telling systemd how the gateway is doing (C{Type=notify}): C{READY=1}
once it serves, C{RELOADING=1} and C{READY=1} around a reload,
C{STOPPING=1} when it drains, and a C{STATUS=} line for C{systemctl status}.

The protocol is one datagram per message on the UNIX socket named in
C{$NOTIFY_SOCKET} (an abstract socket when it starts with C{@}); a few
lines are all it takes, so no dependency.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, MutableMapping

from twisted.logger import Logger

log = Logger()

NOTIFY_ENV = "NOTIFY_SOCKET"


class SystemdNotifier:
    """
    Sends state changes to systemd's notification socket.

    @param address: the socket, as C{$NOTIFY_SOCKET} names it.
    @param monotonic: the clock systemd's C{MONOTONIC_USEC} is read from.
    """

    def __init__(
        self,
        address: str,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._monotonic = monotonic
        self._warned = False

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None
    ) -> SystemdNotifier | None:
        """
        A notifier for C{$NOTIFY_SOCKET}, or C{None} when not run by systemd
        as C{Type=notify}. The variable is removed, so no child process
        (a worker, the emulator) speaks for the service.
        """
        env = os.environ if environ is None else environ
        address = env.pop(NOTIFY_ENV, "")
        return cls(address) if address else None

    def send(self, **fields: str) -> bool:
        """
        Send C{KEY=value} lines; C{False} (logged once) when systemd cannot
        be told.
        """
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self._address)
                sock.sendall(message.encode("utf-8"))
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warn("cannot notify systemd: {error}", error=str(e))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status)

    def reloading(self) -> bool:
        usec = int(self._monotonic() * 1_000_000)
        return self.send(
            RELOADING="1",
            MONOTONIC_USEC=str(usec),
            STATUS="reloading the configuration",
        )

    def stopping(self) -> bool:
        return self.send(STOPPING="1", STATUS="draining")

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)
