"""
Run the real gateway as a C{twist mdgateway} subprocess for end-to-end tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ETC = REPO / "etc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"gateway exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def default_toml(
    port: int,
    spool: Path,
    extra: str = "",
    listener_extra: str = "",
    rule_filters: str = 'client_networks = ["127.0.0.0/8"]',
    core_url: str = "http://127.0.0.1:8008",
) -> str:
    """
    A test configuration: one STARTTLS listener on C{port}, one rule that
    scans with the Core at C{core_url} and delivers into C{spool}/../delivered.
    """
    return f"""
sender_helo_domain = "gw.test"
[[listeners]]
name = "smtp"
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "starttls"
{listener_extra}
[tls]
certificate = "{ETC / "tls" / "localhost.crt"}"
key = "{ETC / "tls" / "localhost.key"}"
[spool]
directory = "{spool}"
[profiles.core.local]
servers = ["{core_url}"]
[profiles.smtp.delivered]
servers = ["maildir:{spool.parent / "delivered"}"]
[[rules]]
name = "local"
{rule_filters}
core_profile = "local"
relay_profile = "delivered"
{extra}
"""


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class GatewayProcess:
    """
    A running C{twist mdgateway}; its JSON log is kept in C{log_path}.
    """

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int | None = None) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "twisted",
                "--log-format=json",
                f"--log-file={self.log_path}",
                "mdgateway",
                "--config",
                str(self.config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment(),
            cwd=str(REPO),
        )
        log.close()
        if port is not None:
            wait_for_port(port, proc=self.proc)
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """
        Wait for the log line that says the gateway serves (its listeners
        open before, answering C{421} while the spool is recovered).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited early with {self.proc.returncode}")
            if any(e.get("gateway_ready") for e in self.log_events()):
                return
            time.sleep(0.05)
        raise TimeoutError("the gateway did not log that it is ready")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def memory_kib(self, field: str = "VmRSS") -> int:
        """
        C{VmRSS} (resident now) or C{VmHWM} (peak resident) of the process.
        """
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def log_events(self) -> list[dict[str, Any]]:
        """
        The events of the JSON Lines log: C{time}, C{level}, C{logger},
        C{msg} and the structured fields.
        """
        return log_events(self.log_text())

    def log_text(self) -> str:
        return (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )


def log_events(source: str | Path) -> list[dict[str, Any]]:
    """
    The events of a JSON Lines log (its text, or the path of its file).

    Each also carries C{log_format} and C{log_level} (the rendered text and
    C{{"name": level}}), the names tests written against Twisted's own JSON
    used; new tests read C{msg} and C{level}.
    """
    if isinstance(source, Path):
        source = source.read_text(errors="replace") if source.exists() else ""
    events = []
    for line in source.splitlines():
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event.setdefault("log_format", event.get("msg", ""))
            event.setdefault("log_level", {"name": event.get("level")})
            events.append(event)
    return events


@contextmanager
def running_gateway(
    tmp_path: Path,
    extra: str = "",
    listener_extra: str = "",
    toml: str | None = None,
    port: int | None = None,
) -> Iterator[tuple[GatewayProcess, int]]:
    """
    Start a gateway; with C{toml}, pass the C{port} its listener uses.
    """
    port = port or free_port()
    spool = tmp_path / "spool"
    config = tmp_path / "mdgateway.toml"
    config.write_text(
        toml if toml is not None else default_toml(port, spool, extra, listener_extra)
    )
    gw = GatewayProcess(config, tmp_path / "gateway.log")
    gw.start(port)
    try:
        yield gw, port
    finally:
        gw.kill()


def queued_files(spool: Path) -> list[Path]:
    queue = spool / "queue"
    return sorted(queue.glob("*.eml")) if queue.exists() else []
