"""
Unit tests for the console's pure parts: secret masking of the
configuration view, scrypt passwords and the users file, sessions and the
login brake, the traffic chart, opening a quarantined original, the
dashboard overview, and the C{mdgateway users} command.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.web.template import flattenString
from zope.interface.verify import verifyClass

from mdgateway.message.view import PREVIEW_LIMIT, inspect_message
from mdgateway.ops.configview import MASK, configuration_view, mask_url
from mdgateway.ops.console.auth import LoginLimiter, Sessions, token_checker
from mdgateway.ops.console.chart import Window, traffic_chart, windows
from mdgateway.ops.console.pages.quarantine import infected_parts
from mdgateway.ops.console.passwords import (
    UsersFileError,
    hash_password,
    parse_users,
    read_users,
    remove_user,
    set_password,
    verify_password,
)
from mdgateway.ops.interfaces import IOperations, Readiness
from mdgateway.ops.operations import GatewayOperations
from mdgateway.ops.overview import (
    GatewayOverview,
    SpoolStatus,
    cluster_instances,
    snapshot_spools,
)
from mdgateway.store.interfaces import (
    InstanceActivity,
    PartVerdict,
    ScanVerdict,
    VerdictCount,
)
from tests.gatewayproc import REPO, environment

FAST = {"n": 2**10}


def test_gateway_operations_provides_interface() -> None:
    """
    The production L{GatewayOperations} declares and implements every
    method of L{IOperations}, the console's new ones included.
    """
    assert verifyClass(IOperations, GatewayOperations)


# --------------------------------------------------------------------------
# Configuration view


def test_configuration_view_masks_secrets() -> None:
    """
    Keys named as secrets are masked whatever they hold; URL passwords
    and secret query parameters are masked inside their URLs; C{*_file}
    keys and paths (like tls.key) are shown; arrays of tables get indexes.
    """
    view = configuration_view(
        {
            "sender_helo_domain": "gw.example",
            "tls": {"key": "tls/k.pem", "certificate": "tls/c.pem"},
            "admin": {"token_file": "/var/admin.token"},
            "store": {"location": "postgresql://gw:pa55@db:5432/m?sslmode=require"},
            "profiles": {
                "core": {
                    "a": {"servers": ["http://c1:8008?apikey=K1", "http://c2:8008"]}
                },
                "smtp": {"r": {"auth_password": "pw", "api_token": "t"}},
            },
            "rules": [{"name": "in", "enabled": True}, {"name": "out", "size": 1.5}],
        },
        "abc",
        "/etc/m.toml",
    )
    rows = {e.key: (e.value, e.masked) for e in view.entries}
    assert rows["sender_helo_domain"] == ('"gw.example"', False)
    assert rows["tls.key"] == ('"tls/k.pem"', False)
    assert rows["admin.token_file"] == ('"/var/admin.token"', False)
    assert rows["store.location"] == (
        f'"postgresql://gw:{MASK}@db:5432/m?sslmode=require"',
        True,
    )
    assert rows["profiles.core.a.servers"] == (
        f'["http://c1:8008?apikey={MASK}", "http://c2:8008"]',
        True,
    )
    assert rows["profiles.smtp.r.auth_password"] == (MASK, True)
    assert rows["profiles.smtp.r.api_token"] == (MASK, True)
    assert rows["rules[0].enabled"] == ("true", False)
    assert rows["rules[1].size"] == ("1.5", False)
    assert "pa55" not in str(view) and "K1" not in str(view)
    assert mask_url("smtp://relay:25") == ("smtp://relay:25", False)


# --------------------------------------------------------------------------
# Passwords and the users file


def test_password_hashes() -> None:
    """
    A hash verifies its password only; two hashes of one password differ
    (per-user salt); an unknown user (C{None}) and a malformed hash never
    verify.
    """
    first = hash_password("secret password", **FAST)
    second = hash_password("secret password", **FAST)
    assert first != second
    assert first.startswith("scrypt$1024$8$1$")
    assert verify_password("secret password", first)
    assert not verify_password("secret passwore", first)
    assert not verify_password("secret password", None)
    assert not verify_password("x", "scrypt$3$8$1$aa$bb")
    assert not verify_password("x", "md5$whatever")


def test_users_file(tmp_path: Path) -> None:
    """
    Adding writes the file 0600 and adds or changes a user; removing
    takes them out; bad names and short passwords are refused; a
    malformed file names its line.
    """
    path = str(tmp_path / "sub" / "users")
    assert read_users(path) == {}
    assert set_password(path, "alice", "password one", **FAST)
    assert not set_password(path, "alice", "password two", **FAST)
    assert set_password(path, "bob@example.org", "password bob", **FAST)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    users = read_users(path)
    assert sorted(users) == ["alice", "bob@example.org"]
    assert verify_password("password two", users["alice"])
    assert remove_user(path, "alice")
    assert not remove_user(path, "alice")
    with pytest.raises(ValueError, match="operator name"):
        set_password(path, "no spaces", "password one")
    with pytest.raises(ValueError, match="at least 8"):
        set_password(path, "carol", "short")
    with pytest.raises(UsersFileError, match="line 2"):
        parse_users("# comment\nalice:not-a-hash\n", "users")
    line = "alice:" + hash_password("password one", **FAST)
    with pytest.raises(UsersFileError, match="twice"):
        parse_users(f"{line}\n{line}\n")


def test_users_command(tmp_path: Path) -> None:
    """
    C{mdgateway users add} reads the password from standard input and
    writes the users file named by the configuration's
    C{[admin] users_file}; C{list} shows the names; C{remove} takes one
    out; an unknown name or a short password exits 1 with a message.
    """
    users = tmp_path / "ops.users"
    config = tmp_path / "gw.toml"
    config.write_text(
        f'[[listeners]]\nname = "s"\nendpoint = "tcp:2525"\n'
        f'[spool]\ndirectory = "{tmp_path / "spool"}"\n'
        f'[admin]\nusers_file = "{users}"\n'
    )

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mdgateway.ops.cli", "users", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=environment(),
            cwd=str(REPO),
            timeout=60,
        )

    added = run("add", "alice", "--config", str(config), stdin="long enough pw\n")
    assert added.returncode == 0, added.stderr
    assert f"added alice in {users}" in added.stdout
    assert verify_password("long enough pw", read_users(str(users))["alice"])
    listed = run("list", "--file", str(users))
    assert listed.stdout == "alice\n"
    short = run("add", "bob", "--file", str(users), stdin="short\n")
    assert short.returncode == 1 and "at least 8" in short.stderr
    missing = run("remove", "carol", "--file", str(users))
    assert missing.returncode == 1 and "no operator 'carol'" in missing.stderr
    assert run("remove", "alice", "--file", str(users)).returncode == 0
    assert read_users(str(users)) == {}


# --------------------------------------------------------------------------
# Sessions and the login brake


def test_sessions_expire_on_the_server() -> None:
    """
    A session is found until its lifetime has passed, then never again;
    ending it forgets it; each has its own CSRF token, compared exactly;
    beyond the limit the oldest session ends.
    """
    clock = Clock()
    sessions = Sessions(clock, lifetime=100, limit=2)
    one = sessions.create("alice", "password", "127.0.0.1")
    assert sessions.get(one.id) is one
    assert one.by == "console:alice"
    assert one.csrf_ok(one.csrf) and not one.csrf_ok(one.csrf + "x")
    assert not one.csrf_ok(None)
    clock.advance(99.9)
    assert sessions.get(one.id) is one
    clock.advance(0.1)
    assert sessions.get(one.id) is None
    two = sessions.create("bob", "token", "127.0.0.1")
    clock.advance(1)
    three = sessions.create("carol", "token", "127.0.0.1")
    four = sessions.create("dave", "token", "127.0.0.1")
    assert sessions.get(two.id) is None
    assert sessions.get(three.id) is three and sessions.get(four.id) is four
    assert two.csrf != three.csrf
    sessions.end(three.id)
    assert sessions.get(three.id) is None


def test_login_limiter() -> None:
    """
    Five failures in the window make an address wait until the oldest
    is a window old; other addresses are not affected; a success clears.
    """
    clock = Clock()
    limiter = LoginLimiter(clock, failures=5, window=300)
    for _ in range(4):
        limiter.failed("a")
        clock.advance(10)
    assert limiter.wait("a") == 0
    limiter.failed("a")
    assert limiter.wait("a") == pytest.approx(260)
    assert limiter.wait("b") == 0
    clock.advance(260)
    assert limiter.wait("a") == 0
    limiter.failed("a")
    limiter.succeeded("a")
    assert limiter.wait("a") == 0


def test_token_checker() -> None:
    """
    Each named token logs in as its name; anything else is refused.
    """
    check = token_checker({"admin": "t-one", "backup": "t-two"})
    assert check("t-one") == "admin"
    assert check("t-two") == "backup"
    assert check("t-on") is None and check("") is None


# --------------------------------------------------------------------------
# Chart, original, overview


async def _flat(tag: Any) -> str:
    out: list[bytes] = []
    flattenString(None, tag).addCallback(out.append)
    return out[0].decode()


def test_traffic_chart() -> None:
    """
    Bars stack per verdict at their minute; a quarter-hour bucket is drawn
    as messages per minute; counts outside the window are not drawn; the
    axis maximum is a round number at or above the highest bar.
    """
    window = Window("Last hour", 6000.0, 60.0, 60, 10)
    counts = [
        VerdictCount(6000.0, ScanVerdict.ALLOWED, 3),
        VerdictCount(6000.0, ScanVerdict.BLOCKED, 4),
        VerdictCount(6060.0, None, 1),
        VerdictCount(99999.0, ScanVerdict.ALLOWED, 50),
    ]
    import asyncio

    svg = asyncio.run(_flat(traffic_chart(window, counts, "c")))
    assert svg.count('class="bar ') == 3
    assert "01:40 UTC: 4 Blocked (4 per minute)" in svg
    assert "01:41 UTC: 1 No verdict" in svg
    assert ">10</text>" in svg
    assert "8 in all" in svg
    day = Window("Day", 0.0, 900.0, 96, 12)
    svg = asyncio.run(_flat(traffic_chart(day, [VerdictCount(0.0, None, 30)], "d")))
    assert "30 No verdict (2 per minute)" in svg
    hour, whole_day = windows(3600 * 10 + 30)
    assert hour.until == 3600 * 10 + 60 and hour.bars == 60
    assert whole_day.step == 900 and whole_day.until == hour.until


def test_inspect_message(tmp_path: Path) -> None:
    """
    The header block comes back as text; each MIME part with its type,
    file name and size; text parts decoded (base64, quoted-printable,
    charset) for the preview, cut at the limit; attachments get none.
    """
    long_text = b"x" * (PREVIEW_LIMIT + 10)
    original = (
        b"From: a@example.net\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9\r\n"
        b"--B\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"PGI+aGk8L2I+\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\n" + long_text + b"\r\n"
        b"--B\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="a.exe"\r\n\r\nMZ\r\n'
        b"--B--\r\n"
    )
    path = tmp_path / "o.eml"
    path.write_bytes(original)
    view = inspect_message(str(path))
    assert view.headers.startswith("From: a@example.net\r\nSubject: =?utf-8?q?")
    assert view.headers_complete and view.unreliable is None
    root, qp, b64, big, exe = view.parts
    assert root.content_type == "multipart/mixed" and root.preview is None
    assert qp.preview == "café"
    assert b64.preview == "<b>hi</b>"
    assert big.truncated and len(big.preview or "") == PREVIEW_LIMIT
    assert exe.filename == "a.exe" and exe.preview is None


def test_infected_parts() -> None:
    """
    Only parts Core blocked as malware count as infected; a part blocked
    for an encrypted archive or sensitive data does not.
    """
    parts = (
        PartVerdict("1.1", "text/plain", 1, "Allowed"),
        PartVerdict(
            "1.2",
            "application/zip",
            1,
            "Blocked",
            "a.zip",
            blocked_reason="Encrypted Archive",
        ),
        PartVerdict(
            "1.3",
            "application/x-msdos",
            1,
            "Blocked",
            "e.com",
            blocked_reason="Infected",
        ),
    )
    assert infected_parts(parts) == ("part 1.3 e.com: Infected",)
    assert infected_parts(parts[:2]) == ()


class _Runtime:
    def __init__(self, *servers: object) -> None:
        self.servers = servers

    def status(self) -> tuple[object, ...]:
        return self.servers


@pytest_twisted.ensureDeferred
async def test_overview_status_and_instances() -> None:
    """
    The overview lists every Core server of a configured profile (marking
    profiles no enabled rule uses) and every relay profile with its
    health, each process's spool, and the cluster with this instance
    first; worker spools come from their metric snapshots.
    """
    from mdgateway.config import parse_config
    from mdgateway.scan.runtime import ServerStatus

    config = parse_config(
        {
            "listeners": [{"name": "s", "endpoint": "tcp:2525"}],
            "spool": {"directory": "/tmp/x"},
            "store": {"instance": "gw-a"},
            "profiles": {
                "core": {
                    "used": {"servers": ["http://c1:8008?apikey=SECRET"]},
                    "idle": {"servers": ["http://c2:8008"]},
                },
                "smtp": {"out": {"servers": ["smtp://r:25"]}},
            },
            "rules": [
                {
                    "name": "r",
                    "client_networks": ["127.0.0.0/8"],
                    "core_profile": "used",
                    "relay_profile": "out",
                }
            ],
        },
        Path("/tmp"),
        version="v1",
        path="/tmp/gw.toml",
    )

    class Relay:
        def healthy(self, profile: object) -> bool:
            return False

        def throttled_until(self, profile: object) -> float:
            return 77.0

    class Spool:
        entry_count = 3

        def oldest_age(self) -> float:
            return 12.0

    snapshot = [
        {"samples": [["mdgateway_queue_depth", {}, 5.0]]},
        {"samples": [["mdgateway_queue_oldest_seconds", {}, 40.0]]},
    ]
    overview = GatewayOverview(
        config=lambda: config,
        runtimes=lambda: [
            ("used", _Runtime(ServerStatus("http://c1:8008", True, False, 1, 0, 0))),
            ("idle", _Runtime(ServerStatus("http://c2:8008", False, False, 0, 0, 4))),
            ("gone", _Runtime(ServerStatus("http://old:8008", True, False, 0, 0, 0))),
        ],
        relay=Relay(),
        spool=Spool(),
        worker_spools=lambda: snapshot_spools([snapshot]),
        readiness=lambda: succeed(Readiness(True, {"x": True})),
    )
    status = await overview.status()
    assert status.instance == "gw-a" and status.config_version == "v1"
    assert [(c.profile, c.up, c.in_use) for c in status.core] == [
        ("idle", False, False),
        ("used", True, True),
    ]
    (relay,) = status.relays
    assert (relay.profile, relay.healthy, relay.throttled_until, relay.in_use) == (
        "out",
        False,
        77.0,
        True,
    )
    assert status.spools == (SpoolStatus(0, 3, 12.0), SpoolStatus(1, 5, 40.0))
    instances = overview.instances(
        [
            InstanceActivity("gw-a", 4, 100.0, 1, 90.0),
            InstanceActivity("gw-b", 2, 50.0, 0, None),
        ]
    )
    assert [(i.name, i.this, i.received) for i in instances] == [
        ("gw-a", True, 4),
        ("gw-b", False, 2),
    ]
    assert instances[0].spools == status.spools
    alone = cluster_instances("gw-z", (), [])
    assert [(i.name, i.this) for i in alone] == [("gw-z", True)]
    assert "SECRET" not in str(overview.configuration())
