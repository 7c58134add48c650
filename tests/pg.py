"""
A throwaway PostgreSQL server for tests.

L{postgres_server} (session scoped) finds the server binaries (Debian puts
them in C{/usr/lib/postgresql/<version>/bin}; C{PATH} is the fallback),
creates a cluster in a temporary directory, starts it on a free loopback
port with its unix socket in that directory and stops it at the end of the
session. L{postgres_dsn} is a database on it. Tests that want a clean
database each call L{PostgresServer.create_database}.

PostgreSQL refuses to run as root: as root, the cluster is owned by and run
as the C{postgres} user (which the Debian package creates) through
C{runuser}. Without binaries or such a user, tests that need the server are
skipped, unless C{MDGATEWAY_REQUIRE_POSTGRES=1} (as CI sets), which turns the
skip into a failure.

Durability is switched off (C{fsync=off} and friends): the data is thrown
away anyway, and start-up stays around a second.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import closing

import psycopg
import pytest

#: Set to C{1} to make a missing PostgreSQL server fail the tests.
REQUIRE_ENV = "MDGATEWAY_REQUIRE_POSTGRES"
_TOOLS = ("initdb", "pg_ctl", "postgres")
_SUPERUSER = "postgres"


def _version_key(path: str) -> tuple[int, ...]:
    version = os.path.basename(os.path.dirname(path))
    return tuple(int(n) for n in re.findall(r"\d+", version)) or (0,)


def find_bindir() -> str | None:
    """
    The directory holding C{initdb}, C{pg_ctl} and C{postgres}: the newest
    C{/usr/lib/postgresql/*/bin}, else the one C{initdb} on C{PATH} is in.
    """
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    for bindir in candidates:
        if all(os.access(os.path.join(bindir, t), os.X_OK) for t in _TOOLS):
            return bindir
    return None


def unavailable(reason: str) -> None:
    """
    Skip the test for C{reason}, or fail it when CI requires PostgreSQL.
    """
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    """
    One temporary cluster; L{start} it, L{stop} it.

    @ivar port: the loopback TCP port it listens on.
    @ivar socket_dir: where its unix socket is.
    """

    def __init__(self, bindir: str, run_as: pwd.struct_passwd | None) -> None:
        """
        @param run_as: the account to run the server as (when we are root).
        """
        self.bindir = bindir
        self.run_as = run_as
        self.base = tempfile.mkdtemp(prefix="mdgateway-pg-")
        self.data = os.path.join(self.base, "data")
        self.socket_dir = self.base
        self.log = os.path.join(self.base, "server.log")
        self.port = 0
        self._names = itertools.count(1)
        self._started = False
        if run_as is not None:
            os.chown(self.base, run_as.pw_uid, run_as.pw_gid)

    def _run(self, *args: str, timeout: float = 60) -> str:
        command = [os.path.join(self.bindir, args[0]), *args[1:]]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as.pw_name, "--", *command]
        result = subprocess.run(
            command,
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}\n{self._log_tail()}"
            )
        return result.stdout

    def _log_tail(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def start(self) -> None:
        """
        Create the cluster and start the server (retrying once on another
        port if the first one was taken meanwhile).
        """
        self._run(
            "initdb",
            "--pgdata",
            self.data,
            "--username",
            _SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        )
        for attempt in range(3):
            self.port = _free_port()
            try:
                self._start_server()
            except RuntimeError:
                if attempt == 2:
                    raise
                continue
            self._started = True
            return

    def _start_server(self) -> None:
        options = (
            f"-p {self.port} -k {self.socket_dir} "
            "-c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=100"
        )
        self._run(
            "pg_ctl",
            "--pgdata",
            self.data,
            "--log",
            self.log,
            "--wait",
            "--timeout",
            "30",
            "-o",
            options,
            "start",
        )

    def pause(self) -> None:
        """
        Stop the server (an outage), keeping its data for L{resume}.
        """
        self._run("pg_ctl", "--pgdata", self.data, "--mode", "fast", "stop")
        self._started = False

    def resume(self) -> None:
        """
        Start the server again after L{pause}, on the same port.
        """
        self._start_server()
        self._started = True

    def stop(self) -> None:
        """
        Stop the server at once and remove its directory.
        """
        try:
            if self._started:
                self._run(
                    "pg_ctl", "--pgdata", self.data, "--mode", "immediate", "stop"
                )
                self._started = False
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def dsn(self, dbname: str) -> str:
        """
        A C{postgresql://} URL for database C{dbname} over loopback TCP.
        """
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, prefix: str = "test") -> str:
        """
        Create a new, empty database and return its URL.
        """
        name = f"{prefix}_{next(self._names)}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


def _server_account() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        account = pwd.getpwnam(_SUPERUSER)
    except KeyError:
        unavailable(
            "running as root and there is no 'postgres' user to run the "
            "PostgreSQL server as"
        )
        raise
    if shutil.which("runuser") is None:
        unavailable("running as root and 'runuser' is missing")
    return account


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """
    A PostgreSQL server for the whole session; skipped (or, with
    C{MDGATEWAY_REQUIRE_POSTGRES=1}, failed) when none can be run.
    """
    bindir = find_bindir()
    if bindir is None:
        unavailable(
            "no PostgreSQL server binaries (initdb, pg_ctl, postgres) in "
            "/usr/lib/postgresql/*/bin or on PATH; install the 'postgresql' "
            "package"
        )
        raise AssertionError("unreachable")
    server = PostgresServer(bindir, _server_account())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """
    The URL of a database created once for the session.
    """
    return postgres_server.create_database("mdgateway")
