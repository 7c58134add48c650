"""
Tests for L{mdgateway.ops.cli}: the blocking CLI runs in a worker thread
against the real admin API served on loopback by the test reactor (the
C{admin} fixture, built with L{tests.test_admin}'s helpers over a seeded
SQLite store), and C{check-config} on real files.
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.ops.adminjson import iso
from mdgateway.ops.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAUTHORIZED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    human_size,
    local_time,
    main,
    table,
)
from mdgateway.ops.interfaces import Readiness, ReloadResult
from tests.test_admin import NOW, T0, TOKEN, Env, entry, start_env, stop_env

pytestmark = pytest.mark.timeout(60)

ETC = Path(__file__).resolve().parent.parent / "etc"


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-cli")
    pool.start()
    yield pool
    pool.stop()


@pytest_twisted.async_yield_fixture
async def admin(threadpool: ThreadPool, tmp_path: Path) -> Any:
    """
    The admin API of L{tests.test_admin} on loopback, over a seeded store.
    """
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    e = await start_env(threadpool, scratch)
    yield e
    await stop_env(e)


@attrs.frozen
class Run:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


def run(argv: list[str], environ: dict[str, str] | None = None) -> Run:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err, environ=environ or {})
    return Run(code, out.getvalue(), err.getvalue())


async def cli(env: Env, *argv: str, token: str | None = TOKEN, **kw: Any) -> Run:
    """
    Run the CLI against C{env} in a thread (it blocks), with the URL and
    token in its environment.
    """
    environ = {"MDGATEWAY_ADMIN_URL": env.url}
    if token is not None:
        environ["MDGATEWAY_ADMIN_TOKEN"] = token
    result: Run = await deferToThread(run, list(argv), environ)
    return result


# --------------------------------------------------------------------------
# Formatting helpers


class FormattingTests(SynchronousTestCase):
    def test_table_aligns_and_cuts(self) -> None:
        """
        Columns line up under their headers, a long cell is cut with
        C{...} to its column's width, whitespace runs collapse, and no line
        ends in spaces.
        """
        text = table(
            ("ID", "SUBJECT", "N"),
            [("a", "short", 1), ("bbbb", "a  very\tlong subject line", 22)],
            (10, 12, 3),
        )
        self.assertEqual(
            text.splitlines(),
            [
                "ID    SUBJECT       N",
                "a     short         1",
                "bbbb  a very lo...  22",
            ],
        )

    def test_human_size(self) -> None:
        """
        Sizes are shown in bytes below 1 KiB, then with one decimal.
        """
        self.assertEqual(human_size(512), "512B")
        self.assertEqual(human_size(1536), "1.5K")
        self.assertEqual(human_size(25 * 1024 * 1024), "25.0M")
        self.assertEqual(human_size(None), "-")

    def test_local_time(self) -> None:
        """
        API times are shown in the local time zone to the second, C{-} for
        none.
        """
        from datetime import datetime

        expected = datetime.fromtimestamp(1700000000).isoformat(timespec="seconds")
        self.assertEqual(local_time("2023-11-14T22:13:20.250Z"), expected)
        self.assertEqual(local_time(None), "-")


# --------------------------------------------------------------------------
# check-config (no API)


class CheckConfigTests(SynchronousTestCase):
    def test_example_config_ok(self) -> None:
        """
        The shipped example configuration checks out: "ok", its listeners,
        rules and profiles, exit 0.
        """
        result = run(["check-config", str(ETC / "mdgateway.toml")])
        self.assertEqual(result.code, EXIT_OK, result.err)
        self.assertTrue(result.lines[0].startswith("ok: "))
        self.assertIn("  rules: 1 (local)", result.lines)
        self.assertIn("  core profiles: local", result.lines)

    def test_example_config_json(self) -> None:
        """
        With C{--json} the summary is JSON with C{ok} true.
        """
        result = run(["--json", "check-config", str(ETC / "mdgateway.toml")])
        data = json.loads(result.out)
        self.assertEqual(result.code, EXIT_OK)
        self.assertIs(data["ok"], True)
        self.assertEqual([r["name"] for r in data["rules"]], ["local"])

    def broken(self) -> str:
        path = Path(self.mktemp())
        path.mkdir()
        config = path / "broken.toml"
        config.write_text(
            'sender_helo_domain = "bad name!"\n'
            "[[listeners]]\n"
            'name = "smtp"\n'
            'endpoint = "tcp:10025:interface=127.0.0.1"\n'
            'tls = "sometimes"\n'
            "[limits]\n"
            'message_size = "huge"\n'
            'colour = "red"\n'
            "[spool]\n"
            'directory = "spool"\n'
        )
        return str(config)

    def test_broken_config(self) -> None:
        """
        A broken file exits 1 and prints every problem with its key path.
        """
        config = self.broken()
        result = run(["check-config", config])
        self.assertEqual(result.code, EXIT_FAILED)
        self.assertEqual(result.lines[0], f"{config}: 4 problems")
        paths = [line.strip().split(":")[0] for line in result.lines[1:]]
        self.assertEqual(
            paths,
            [
                "sender_helo_domain",
                "listeners[0].tls",
                "limits.message_size",
                "limits.colour",
            ],
        )

    def test_broken_config_json(self) -> None:
        """
        With C{--json} the problems come as a JSON list, exit 1.
        """
        result = run(["--json", "check-config", self.broken()])
        data = json.loads(result.out)
        self.assertEqual(result.code, EXIT_FAILED)
        self.assertIs(data["ok"], False)
        self.assertIn("limits.colour: unknown key", data["problems"])

    def test_missing_file(self) -> None:
        """
        A file that cannot be read is a problem line, exit 1.
        """
        result = run(["check-config", "/nonexistent/mdgateway.toml"])
        self.assertEqual(result.code, EXIT_FAILED)
        self.assertIn("cannot read", result.out)

    def test_usage_error(self) -> None:
        """
        An unknown command or a missing argument exits 2 with the usage.
        """
        for argv in (["bogus"], ["quarantine", "show"], []):
            result = run(argv)
            self.assertEqual(result.code, EXIT_USAGE, argv)
            self.assertIn("usage: mdgateway", result.err)


# --------------------------------------------------------------------------
# Against a live admin API


@pytest_twisted.ensureDeferred
async def test_queue_list_table(admin: Env) -> None:
    """
    C{queue list} prints an aligned table, oldest first, with local times
    and a count.
    """
    admin.ops.entries = [entry("QB", NOW - 100), entry("QA", NOW - 500)]
    result = await cli(admin, "queue", "list")
    assert result.code == EXIT_OK, result.err
    header, first, second, count = result.lines
    assert header.split() == [
        "QUEUE",
        "ID",
        "RECEIVED",
        "SENDER",
        "RCPTS",
        "SIZE",
        "TRIES",
        "NEXT",
        "TRY",
        "LAST",
        "ERROR",
    ]
    assert first.startswith("QA ")
    assert second.startswith("QB ")
    assert local_time(iso(NOW - 500)) in first
    assert "2.0K" in first
    assert first.index("alice@") == header.index("SENDER")
    assert count == "2 queued"


@pytest_twisted.ensureDeferred
async def test_queue_list_json(admin: Env) -> None:
    """
    C{--json} prints the API's JSON unchanged.
    """
    admin.ops.entries = [entry("QA", NOW - 500)]
    result = await cli(admin, "--json", "queue", "list")
    data = json.loads(result.out)
    assert data["total"] == 1
    assert data["items"][0]["queue_id"] == "QA"
    assert data["items"][0]["received_at"] == iso(NOW - 500)


@pytest_twisted.ensureDeferred
async def test_queue_empty_and_retry(admin: Env) -> None:
    """
    An empty queue says so; C{queue retry} reaches the gateway, and an
    unknown id exits 1 with the API's reason.
    """
    result = await cli(admin, "queue", "list")
    assert result.out == "the queue is empty\n"
    admin.ops.entries = [entry("QA", NOW - 500)]
    result = await cli(admin, "queue", "retry", "QA")
    assert (result.code, result.out) == (EXIT_OK, "retry of QA by admin\n")
    assert ("queue_action", "retry", "QA", "admin", False) in admin.ops.calls
    result = await cli(admin, "queue", "retry", "QZ")
    assert result.code == EXIT_FAILED
    assert result.err == "mdgateway: QZ is not in the queue (HTTP 409)\n"


@pytest_twisted.ensureDeferred
async def test_quarantine_list_and_show(admin: Env) -> None:
    """
    C{quarantine list} cuts the long subject and ends with the count;
    C{quarantine show} prints the item's fields.
    """
    item_id = admin.seeded.item_id
    result = await cli(admin, "quarantine", "list")
    assert result.code == EXIT_OK, result.err
    assert result.lines[1].startswith(item_id)
    assert "Invoice with a very long subject line..." in result.lines[1]
    assert result.lines[-1] == "1 of 1 quarantined"
    result = await cli(admin, "quarantine", "show", item_id)
    assert result.code == EXIT_OK
    fields = {line[:12].strip(): line[12:].strip() for line in result.lines}
    assert fields["id"] == item_id
    assert fields["reason"] == "blocked"
    assert fields["message"] == "Q2.1"
    assert fields["verdict"] == "Blocked"
    assert fields["pinned"] == "no"


@pytest_twisted.ensureDeferred
async def test_quarantine_actions(admin: Env) -> None:
    """
    Release, rescan, forward, pin and delete reach the gateway; afterwards
    the item is gone and C{show} exits 1 with the reason.
    """
    item_id = admin.seeded.item_id
    result = await cli(admin, "quarantine", "release", item_id)
    assert result.out == f"{item_id}: released (queued as FAKEQ0001)\n"
    result = await cli(admin, "quarantine", "rescan", item_id)
    assert result.out == f"{item_id}: rescanning (queued as FAKEQ0002)\n"
    result = await cli(admin, "quarantine", "forward", item_id, "soc@example.org")
    assert result.code == EXIT_OK
    result = await cli(admin, "quarantine", "pin", item_id)
    assert result.out == f"{item_id}: pinned\n"
    assert (await admin.store.get_quarantined(item_id)).pinned
    result = await cli(admin, "quarantine", "delete", item_id)
    assert result.out == f"{item_id}: deleted\n"
    assert [c[0] for c in admin.ops.calls] == ["release", "rescan", "forward"]
    assert admin.ops.calls[2][2] == ["soc@example.org"]
    result = await cli(admin, "quarantine", "show", item_id)
    assert result.code == EXIT_FAILED
    assert result.err == (f"mdgateway: no quarantine item {item_id!r} (HTTP 404)\n")


@pytest_twisted.ensureDeferred
async def test_quarantine_download(admin: Env, tmp_path: Path) -> None:
    """
    C{quarantine download} saves the original byte for byte.
    """
    target = tmp_path / "copy.eml"
    result = await cli(
        admin, "quarantine", "download", admin.seeded.item_id, "-o", str(target)
    )
    assert result.code == EXIT_OK, result.err
    assert target.read_bytes() == admin.seeded.original
    assert result.out == f"{target}: {len(admin.seeded.original)} bytes\n"
    assert not (tmp_path / "copy.eml.part").exists()


@pytest_twisted.ensureDeferred
async def test_messages_search(admin: Env) -> None:
    """
    C{messages search} passes its filters and prints matching entries
    newest first; repeated C{--status} means any of them.
    """
    result = await cli(admin, "messages", "search")
    assert result.code == EXIT_OK, result.err
    assert [line.split()[0] for line in result.lines[1:-1]] == [
        "Q3.1",
        "Q2.1",
        "Q1.1",
    ]
    assert result.lines[-1] == "3 of 3 messages"
    result = await cli(
        admin, "messages", "search", "--status", "delivered", "--status", "deferred"
    )
    assert [line.split()[0] for line in result.lines[1:-1]] == ["Q3.1", "Q1.1"]
    result = await cli(
        admin, "messages", "search", "--sender", "carol", "--rule", "Outbound"
    )
    assert [line.split()[0] for line in result.lines[1:-1]] == ["Q2.1"]
    assert "Blocked" in result.lines[1]


@pytest_twisted.ensureDeferred
async def test_messages_search_paging_and_times(admin: Env) -> None:
    """
    C{--limit} pages and the footer names the next cursor, which
    C{--cursor} follows; C{--since} takes a local ISO time.
    """
    result = await cli(admin, "messages", "search", "--limit", "2")
    footer = result.lines[-1]
    assert footer.startswith("2 of 3 messages; next page: --cursor ")
    cursor = footer.rsplit(" ", 1)[1]
    result = await cli(admin, "messages", "search", "--limit", "2", "--cursor", cursor)
    assert [line.split()[0] for line in result.lines[1:-1]] == ["Q1.1"]
    since = local_time(iso(T0 + 150))
    result = await cli(admin, "messages", "search", "--since", since)
    assert [line.split()[0] for line in result.lines[1:-1]] == ["Q3.1", "Q2.1"]
    result = await cli(admin, "messages", "search", "--since", "yesterday-ish")
    assert result.code == EXIT_USAGE


@pytest_twisted.ensureDeferred
async def test_messages_search_json(admin: Env) -> None:
    """
    C{messages search --json} prints the page as the API sent it.
    """
    result = await cli(admin, "--json", "messages", "search", "--subject", "report")
    data = json.loads(result.out)
    assert data["total"] == 1
    assert data["items"][0]["id"] == "Q3.1"
    assert data["next_cursor"] is None


@pytest_twisted.ensureDeferred
async def test_messages_show_and_refused(admin: Env) -> None:
    """
    C{messages show} prints the entry, its parts and timeline; C{refused
    list} prints the refused log.
    """
    result = await cli(admin, "messages", "show", "Q2.1")
    assert result.code == EXIT_OK, result.err
    assert "parts:" in result.lines
    assert any("invoice.zip" in line and "Blocked" in line for line in result.lines)
    assert f"quarantine  {admin.seeded.item_id}" in result.out
    result = await cli(admin, "refused", "list", "--listener", "smtp")
    assert result.lines[-1] == "2 of 2 refusals"
    assert "550 5.7.1" in result.out


@pytest_twisted.ensureDeferred
async def test_reload_and_status(admin: Env) -> None:
    """
    C{reload} says it reloaded (exit 0) or prints the problems (exit 1);
    C{status} says ready (exit 0) or not, with the reasons (exit 1).
    """
    result = await cli(admin, "reload")
    assert (result.code, result.out) == (EXIT_OK, "configuration reloaded\n")
    admin.ops.reload_result = ReloadResult(False, ("rules[0].name: duplicate",))
    result = await cli(admin, "reload")
    assert result.code == EXIT_FAILED
    assert "  rules[0].name: duplicate" in result.lines
    result = await cli(admin, "status")
    assert (result.code, result.lines[0]) == (EXIT_OK, "ready")
    admin.ops.ready = Readiness(False, {"spool": False}, ("spool not writable",))
    result = await cli(admin, "status")
    assert result.code == EXIT_FAILED
    assert result.lines == ["NOT ready", "  spool: failing", "  spool not writable"]


@pytest_twisted.ensureDeferred
async def test_token_refused(admin: Env, tmp_path: Path) -> None:
    """
    A wrong token exits 4 with "token refused"; no token at all says how
    to give one; a token file is read and used.
    """
    result = await cli(admin, "queue", "list", token="wrong")
    assert result.code == EXIT_UNAUTHORIZED
    assert "token refused" in result.err
    result = await cli(admin, "queue", "list", token=None)
    assert result.code == EXIT_UNAUTHORIZED
    assert "MDGATEWAY_ADMIN_TOKEN" in result.err
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    result = await cli(
        admin, "--token-file", str(token_file), "queue", "list", token=None
    )
    assert result.code == EXIT_OK, result.err
    result = await cli(
        admin, "--token-file", str(tmp_path / "missing"), "queue", "list", token=None
    )
    assert result.code == EXIT_USAGE
    assert "cannot read token file" in result.err


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_unreachable() -> None:
    """
    When nothing listens at the URL, the CLI exits 3 saying it cannot
    reach the admin API there.
    """
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    url = f"http://127.0.0.1:{port}"
    result: Run = await deferToThread(
        run, ["--url", url, "queue", "list"], {"MDGATEWAY_ADMIN_TOKEN": TOKEN}
    )
    assert result.code == EXIT_UNREACHABLE
    assert result.err.startswith(f"mdgateway: cannot reach the admin API at {url}")


@pytest_twisted.ensureDeferred
async def test_force_key_and_audit(admin: Env, tmp_path: Path) -> None:
    """
    C{quarantine release ID --force --key K} sends both; repeating it says
    nothing was done again; C{--token-name} picks a token from a file of
    named tokens, and C{audit list} shows what that operator did.
    """
    item_id = admin.seeded.item_id
    admin.api.set_tokens({"alice": "alice-token", "bob": "bob-token"})
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-token\nbob:bob-token\n")
    base = ["--token-file", str(tokens)]
    result = await cli(admin, *base, "quarantine", "pin", item_id, token=None)
    assert result.code == EXIT_USAGE
    assert "several tokens" in result.err
    bob = [*base, "--token-name", "bob"]
    argv = [*bob, "quarantine", "release", item_id, "--force", "--key", "K1"]
    result = await cli(admin, *argv, token=None)
    assert result.out == f"{item_id}: released (queued as FAKEQ0001)\n"
    assert admin.ops.calls[-1] == ("release", item_id, "bob", True, "K1")
    result = await cli(admin, *argv, token=None)
    assert result.out == (
        f"{item_id}: released before with this key (queued as FAKEQ0001); "
        "nothing done again\n"
    )
    result = await cli(admin, *bob, "quarantine", "pin", item_id, token=None)
    assert result.code == EXIT_OK
    result = await cli(admin, *bob, "audit", "list", "--actor", "bob", token=None)
    assert result.code == EXIT_OK, result.err
    assert result.lines[0].split() == [
        "AT",
        "WHO",
        "ACTION",
        "TARGET",
        "RESULT",
        "DETAIL",
    ]
    assert "bob" in result.lines[1] and "pin" in result.lines[1]
    assert result.lines[-1] == "1 of 1 audit entries"


# --------------------------------------------------------------------------
# No flags on the gateway's host


def admin_config(tmp_path: Path, endpoint: str, token_file: str | None) -> Path:
    """
    A gateway configuration whose [admin] table names C{endpoint} and
    C{token_file}; the rest need not even be valid for the command.
    """
    config = tmp_path / "mdgateway.toml"
    token = f'token_file = "{token_file}"\n' if token_file else ""
    config.write_text(
        "[[listeners]]\nname = 1\n"  # wrong, and not the command's business
        f'[spool]\ndirectory = "spool"\n[admin]\nendpoint = "{endpoint}"\n{token}'
    )
    return config


@pytest_twisted.ensureDeferred
async def test_no_flags_with_the_configuration(admin: Env, tmp_path: Path) -> None:
    """
    With only the configuration file (named by C{$MDGATEWAY_CONFIG} or
    C{--config}), C{queue list} finds the admin API from C{[admin]
    endpoint} and its token from C{[admin] token_file}; without
    C{token_file} the token is looked for in the spool folder, as the
    gateway writes it.
    """
    port = admin.url.rsplit(":", 1)[1]
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    config = admin_config(
        tmp_path, f"tcp:{port}:interface=127.0.0.1", str(tmp_path / "admin.token")
    )
    result = await deferToThread(
        run, ["queue", "list"], {"MDGATEWAY_CONFIG": str(config)}
    )
    assert result.code == EXIT_OK, result.err
    result = await deferToThread(run, ["--config", str(config), "status"], {})
    assert (result.code, result.lines[0]) == (EXIT_OK, "ready"), result.err
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "admin.token").write_text(TOKEN + "\n")
    config = admin_config(tmp_path, f"tcp:{port}:interface=0.0.0.0", None)
    result = await deferToThread(run, ["--config", str(config), "queue", "list"], {})
    assert result.code == EXIT_OK, result.err


@pytest_twisted.ensureDeferred
async def test_environment_overrides_configuration(admin: Env, tmp_path: Path) -> None:
    """
    C{$MDGATEWAY_ADMIN_URL} and C{$MDGATEWAY_ADMIN_TOKEN_FILE} win over the
    configuration's C{[admin]} table.
    """
    (tmp_path / "good.token").write_text(TOKEN + "\n")
    config = admin_config(tmp_path, "tcp:1:interface=127.0.0.1", "/nonexistent/token")
    environ = {
        "MDGATEWAY_CONFIG": str(config),
        "MDGATEWAY_ADMIN_URL": admin.url,
        "MDGATEWAY_ADMIN_TOKEN_FILE": str(tmp_path / "good.token"),
    }
    result = await deferToThread(run, ["queue", "list"], environ)
    assert result.code == EXIT_OK, result.err


class SettingsTests(SynchronousTestCase):
    def test_url_for_admin_endpoints(self) -> None:
        """
        The URL that reaches an admin endpoint from this host: the
        interface, loopback for a wildcard, brackets for IPv6, https for
        C{ssl:}; a UNIX or systemd endpoint asks for C{--url}.
        """
        from mdgateway.ops.clisettings import url_for

        self.assertEqual(
            url_for("tcp:10080:interface=127.0.0.1"), "http://127.0.0.1:10080"
        )
        self.assertEqual(url_for("tcp:10080"), "http://127.0.0.1:10080")
        self.assertEqual(url_for("tcp:8080:interface=0.0.0.0"), "http://127.0.0.1:8080")
        self.assertEqual(url_for("tcp6:8080:interface=\\:\\:"), "http://[::1]:8080")
        self.assertEqual(
            url_for("ssl:8443:interface=10.0.0.5:privateKey=k.pem"),
            "https://10.0.0.5:8443",
        )
        for endpoint in (
            "unix:/run/mdgateway/admin.sock",
            "systemd:domain=INET:index=1",
        ):
            with self.assertRaises(Exception) as caught:
                url_for(endpoint)
            self.assertIn("pass --url", str(caught.exception))

    def test_problems_name_the_way_out(self) -> None:
        """
        A named configuration that cannot be read, one without an admin
        API, and a token file the user may not read each exit 2 with a
        line that says what to do.
        """
        folder = Path(self.mktemp())
        folder.mkdir()
        result = run(["--config", str(folder / "missing.toml"), "queue", "list"])
        assert result.code == EXIT_USAGE
        assert "cannot read the admin settings" in result.err
        config = folder / "noadmin.toml"
        config.write_text('[spool]\ndirectory = "s"\n')
        result = run(["--config", str(config), "status"])
        assert result.code == EXIT_USAGE
        assert "has no admin API ([admin] endpoint is empty)" in result.err
        token = folder / "secret.token"
        token.write_text("x")
        token.chmod(0o000)
        config = admin_config(folder, "tcp:1:interface=127.0.0.1", str(token))
        import os

        if os.geteuid() == 0:  # root reads anything: check the message alone
            from mdgateway.ops.clisettings import read_token

            token.chmod(0o600)
            token.write_text("")
            with self.assertRaises(Exception) as caught:
                read_token(str(token))
            self.assertIn("is empty", str(caught.exception))
            return
        result = run(["--config", str(config), "status"])
        assert result.code == EXIT_USAGE
        assert "permission denied" in result.err

    def test_help_texts(self) -> None:
        """
        The help names the configuration, the environment variables and
        says C{--token-file} takes a path.
        """
        import contextlib

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["--help"]) == 0
        text = " ".join(out.getvalue().split())
        assert "--token-file PATH path of the file holding the admin API token" in text
        assert "$MDGATEWAY_ADMIN_TOKEN_FILE" in text
        assert "--config FILE" in text and "$MDGATEWAY_CONFIG" in text
        assert "/etc/mdgateway/mdgateway.toml" in text

    def test_check_config_defaults_to_the_configuration(self) -> None:
        """
        C{check-config} without a file checks the one C{--config} (or
        C{$MDGATEWAY_CONFIG}) names.
        """
        result = run(
            ["check-config", "--no-check-files"],
            {"MDGATEWAY_CONFIG": str(ETC / "mdgateway.toml")},
        )
        assert result.code == EXIT_OK, result.err
        assert result.lines[0].startswith(f"ok: {ETC / 'mdgateway.toml'}")
