"""
The Core emulator as a process of its own (C{python -m twisted
mdcore-emulator}), for end-to-end tests that stop and start it, or give it
knobs the gateway's built-in emulator does not take.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.gatewayproc import REPO, environment, free_port, wait_for_port


class EmulatorProcess:
    """
    A running C{mdcore-emulator}; L{stop} and L{start} keep its port.
    """

    def __init__(self, log_path: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *args: str) -> None:
        """
        Start it (with C{args} instead of the original knobs, if given) and
        wait until it listens.
        """
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "twisted",
                "mdcore-emulator",
                "--port",
                str(self.port),
                "--quiet",
                *(args or self.args),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment(),
            cwd=str(REPO),
        )
        log.close()
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        """
        Stop it (SIGKILL: a crash, no goodbye) and wait until the port is
        closed.
        """
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        time.sleep(0.05)

    def log_text(self) -> str:
        return (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )
