"""
No file that holds mail, keys or records is open to other users: the real
gateway (the twistd plugin) is run with the shell's usual umask of 022,
handles clean, infected and undeliverable mail, and every file and folder
it created is then checked.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import pytest

from tests.gatewayproc import GatewayProcess, free_port, wait_for_port
from tests.test_e2e_pipeline import EICAR, message, send, wait_for

pytestmark = pytest.mark.timeout(120)


def config_toml(tmp: Path, port: int, admin: int, core: int, closed: int) -> str:
    return f"""
sender_helo_domain = "gw.test"
[[listeners]]
name = "smtp"
endpoint = "tcp:{port}:interface=127.0.0.1"
[spool]
directory = "{tmp / "spool"}"
[admin]
endpoint = "tcp:{admin}:interface=127.0.0.1"
token_file = "{tmp / "secrets" / "admin.token"}"
[delivery]
retry_first = "60s"
[emulator]
enabled = true
endpoint = "tcp:{core}:interface=127.0.0.1"
[profiles.core.emulator]
servers = ["http://127.0.0.1:{core}"]
poll_interval = "50ms"
[profiles.smtp.mailbox]
servers = ["maildir:{tmp / "maildir"}"]
[profiles.smtp.nowhere]
servers = ["smtp://127.0.0.1:{closed}"]
tls = "none"
[[rules]]
name = "held"
client_networks = ["127.0.0.0/8"]
recipients = ["held@example.net"]
core_profile = "emulator"
relay_profile = "nowhere"
[[rules]]
name = "local"
client_networks = ["127.0.0.0/8"]
core_profile = "emulator"
relay_profile = "mailbox"
blocked_action = "block"
quarantine_blocked = true
"""


def created(root: Path, ours: set[Path]) -> list[Path]:
    """
    Everything under C{root} but the files the test wrote itself.
    """
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if path not in ours:
                found.append(path)
    return found


def test_every_file_the_gateway_creates_is_private(tmp_path: Path) -> None:
    """
    Run under umask 022, the gateway (umask 027 from its configuration)
    creates no file or folder that other users may read, write or enter:
    spool entries and their state, the SQLite history with its -wal and
    -shm files, the admin token, the loop secret, the outbox and maildir
    deliveries; the files that hold mail, records or keys are 0600.
    """
    port, admin, core = free_port(), free_port(), free_port()
    with ClosedPort() as closed:
        config = tmp_path / "mdgateway.toml"
        config.write_text(config_toml(tmp_path, port, admin, core, closed))
        log = tmp_path / "gateway.log"
        ours = {config, log}
        gw = GatewayProcess(config, log)
        old = os.umask(0o022)
        try:
            gw.start(port)
        finally:
            os.umask(old)
        try:
            wait_for_port(admin)
            send(port, message("clean"))
            send(port, message("infected", (EICAR, "eicar.com")))
            send(port, message("held"), recipients=("held@example.net",))
            spool = tmp_path / "spool"
            wait_for(lambda: list((tmp_path / "maildir" / "new").glob("*")))
            wait_for(lambda: list((spool / "state").glob("*.json")))
            wait_for(lambda: quarantined(spool / "history.sqlite"))
            files = created(tmp_path, ours)
            names = {p.name for p in files}
            assert {"history.sqlite", "history.sqlite-wal", "history.sqlite-shm"} <= (
                names
            )
            assert {"admin.token", "loop.secret", "outbox", "lock"} <= names
            assert list((spool / "queue").glob("*.eml"))
            open_to_others = [
                f"{p} {stat.S_IMODE(p.stat().st_mode):o}"
                for p in files
                if p.stat().st_mode & 0o007
            ]
            assert open_to_others == []
            private = [
                *spool.glob("queue/*"),
                *spool.glob("state/*"),
                spool / "history.sqlite",
                spool / "history.sqlite-wal",
                spool / "loop.secret",
                tmp_path / "secrets" / "admin.token",
                *(tmp_path / "maildir" / "new").glob("*"),
            ]
            modes = {str(p): stat.S_IMODE(p.stat().st_mode) for p in private}
            assert set(modes.values()) == {0o600}, modes
        finally:
            gw.kill()


def quarantined(database: Path) -> bool:
    """
    Whether the history database holds a quarantined original.
    """
    try:
        with closing(sqlite3.connect(database, timeout=5)) as conn:
            row = conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()
    except sqlite3.Error:
        return False
    return bool(row and row[0])


class ClosedPort:
    """
    A loopback port nothing listens on (bound, not listening), for a relay
    that refuses connections; released at the end.
    """

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
