"""
The embedding guide runs as written: each Python block of
docs/embedding.md is started as a program of its own, a message is sent to
the endpoint it serves, and the message is found delivered.

Only the port numbers (and, for the first block, the folder the default
configuration is copied into) are changed, so that the test never collides
with a gateway running on this machine.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.gatewayproc import REPO, free_port, wait_for_port

DOC = REPO / "docs" / "embedding.md"


def python_blocks() -> list[str]:
    """
    The fenced Python blocks of the guide, in order.
    """
    text = DOC.read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def with_ports(text: str, ports: dict[int, int]) -> str:
    """
    C{text} with each documented port number replaced by a free one.
    """
    for old, new in ports.items():
        text = re.sub(rf"(?<![\d]){old}(?![\d])", str(new), text)
    return text


@pytest.fixture
def program(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start(code: str, cwd: Path, started: list[subprocess.Popen[bytes]]) -> Path:
    script = cwd / "embedded.py"
    script.write_text(code, encoding="utf-8")
    log = cwd / "embedded.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    started.append(proc)
    return log


def send(port: int, subject: str, timeout: float = 60.0) -> None:
    """
    Send one message, trying again while the service is still starting
    (C{421 4.3.2 Service starting}).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _send_once(port, subject)
        except smtplib.SMTPConnectError as e:
            if e.smtp_code != 421 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _send_once(port: int, subject: str) -> None:
    message = EmailMessage()
    message["From"] = "alice@example.com"
    message["To"] = "bob@example.org"
    message["Subject"] = subject
    message.set_content("Hello from an embedding program.\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.send_message(message)


def delivered(
    folder: Path, subject: str, timeout: float = 60.0
) -> email.message.Message:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in folder.glob("*"):
            parsed = email.message_from_bytes(path.read_bytes())
            if parsed["Subject"] == subject:
                return parsed
        time.sleep(0.1)
    raise AssertionError(f"{subject!r} was not delivered into {folder}")


def refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


def test_documented_blocks_are_the_ones_tested() -> None:
    """
    The guide has exactly the two runnable blocks this module runs, so a
    new or removed example cannot go untested.
    """
    blocks = python_blocks()
    assert len(blocks) == 2
    assert 'load_config("etc/mdgateway.toml")' in blocks[0]
    assert "parse_config(values" in blocks[1]


def test_from_configuration_file(
    tmp_path: Path, program: list[subprocess.Popen[bytes]]
) -> None:
    """
    The first block serves the default configuration's gateway on an
    endpoint of its own: a message sent there is scanned and delivered into
    the configured maildir, and the configured listener itself is not bound
    (the service was told not to listen).
    """
    smtp, listener, core, admin = (free_port() for _ in range(4))
    shutil.copytree(REPO / "etc", tmp_path / "etc")
    config = tmp_path / "etc" / "mdgateway.toml"
    config.write_text(
        with_ports(config.read_text(), {10025: listener, 8008: core, 10080: admin})
    )
    log = start(with_ports(python_blocks()[0], {2525: smtp}), tmp_path, program)
    wait_for_port(smtp, timeout=60, proc=program[0])
    send(smtp, "embedded from a file")
    message = delivered(tmp_path / "var" / "delivered" / "new", "embedded from a file")
    assert message["X-Metadefender-Core-Result"] == "Allowed", log.read_text()
    assert refuses(listener)


def test_from_values(tmp_path: Path, program: list[subprocess.Popen[bytes]]) -> None:
    """
    The second block builds the gateway from values, without a file: a
    message sent to its endpoint is scanned by the emulator it starts and
    delivered into the maildir folder under its base.
    """
    smtp, core = free_port(), free_port()
    log = start(
        with_ports(python_blocks()[1], {2526: smtp, 18008: core}), tmp_path, program
    )
    wait_for_port(smtp, timeout=60, proc=program[0])
    send(smtp, "embedded from values")
    folder = tmp_path / "embedded-gateway" / "delivered" / "new"
    message = delivered(folder, "embedded from values")
    assert message["X-Metadefender-Core-Result"] == "Allowed", log.read_text()
    assert message["X-MD-Email-Security-Id"]
