# -*- test-case-name: tests.test_store -*-
"""
The embedded store: one SQLite file per host, in WAL mode.

SQLite allows one writer at a time, so every write goes through one
connection, one transaction at a time (C{BEGIN IMMEDIATE}, which also makes
another process on the host wait up to C{busy_timeout} rather than fail).
Reads use their own connections and, thanks to WAL, neither wait for the
writer nor block it. Quarantined originals live in the database as chunks,
so an original and its metadata are committed (and purged) together and a
backup is one file.

Commits use C{synchronous=NORMAL} (in WAL mode: consistent after a crash; a
power loss may drop the last history lines), except a quarantine commit,
which is C{FULL}: the spool entry is removed after it, so the original must
be on disk.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mdgateway.store.dialect import SQLITE, Tx
from mdgateway.store.sqlstore import CHUNK_SIZE, PURGE_BATCH, SqlStore

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def default_connect(path: str) -> sqlite3.Connection:
    """
    Open C{path} the way L{SqliteStore} needs: usable from any pool thread
    (the store never shares one connection between two threads at once).
    """
    return sqlite3.connect(path, check_same_thread=False)


class SqliteStore(SqlStore):
    """
    L{mdgateway.store.interfaces.IStore} on a SQLite file.

    C{":memory:"} gives a private in-memory database (one connection for
    reads and writes), handy as a real store in other components' tests.
    """

    _log = Logger()

    def __init__(
        self,
        path: str | os.PathLike[str],
        reactor: IReactorTime,
        threadpool: ThreadPool,
        *,
        connect: Callable[[str], sqlite3.Connection] = default_connect,
        readers: int = 4,
        busy_timeout: float = 10.0,
        synchronous: str = "NORMAL",
        chunk_size: int = CHUNK_SIZE,
        purge_batch: int = PURGE_BATCH,
    ) -> None:
        """
        @param path: the database file, created if missing (its directory
            must exist).
        @param connect: opens a connection to a path; it must allow use from
            threads other than the creating one.
        @param readers: read connections (and read calls in the pool at
            once).
        @param busy_timeout: seconds to wait for another process's lock.
        @param synchronous: SQLite's C{synchronous} for ordinary commits.
        """
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}")
        self.path = os.fspath(path)
        self._memory = self.path == ":memory:"
        super().__init__(
            reactor,
            threadpool,
            SQLITE,
            read_slots=1 if self._memory else readers,
            write_slots=1,
            chunk_size=chunk_size,
            purge_batch=purge_batch,
        )
        self._connect = connect
        self._busy_ms = int(busy_timeout * 1000)
        self._synchronous = synchronous.upper()
        self._writer: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()
        self._idle_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._all: list[sqlite3.Connection] = []

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path}>"

    async def open(self) -> None:
        if not self._memory and not self._opened:
            await deferToThreadPool(
                self._threads, self._pool, private_database, self.path
            )
        await super().open()

    def _new_connection(self) -> sqlite3.Connection:
        conn = self._connect(self.path)
        conn.isolation_level = None  # we issue BEGIN and COMMIT ourselves
        conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        conn.execute("PRAGMA foreign_keys = ON")
        with self._readers_lock:
            self._all.append(conn)
        return conn

    def _writer_connection(self) -> sqlite3.Connection:
        if self._writer is None:
            conn = self._new_connection()
            if not self._memory:
                mode = self._switch_to_wal(conn)
                if str(mode).lower() != "wal":
                    self._log.warn(
                        "SQLite store {path} is in journal mode {mode}, not WAL",
                        path=self.path,
                        mode=mode,
                    )
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            self._writer = conn
        return self._writer

    def _switch_to_wal(self, conn: sqlite3.Connection) -> str:
        """
        C{PRAGMA journal_mode = WAL}, waiting like any other statement: when
        several processes open one new file at once (workers starting
        together) SQLite answers this one with SQLITE_BUSY at once instead
        of calling the busy handler, so retry it for up to C{busy_timeout}
        (pool thread: sleeping blocks nothing else).
        """
        deadline = time.monotonic() + self._busy_ms / 1000
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    @contextmanager
    def _transaction(self, write: bool, durable: bool) -> Iterator[Tx]:
        if write or self._memory:
            with self._write_lock:
                conn = self._writer_connection()
                if write and durable:
                    conn.execute("PRAGMA synchronous = FULL")
                try:
                    with _begun(conn, "BEGIN IMMEDIATE" if write else "BEGIN"):
                        yield Tx(conn, SQLITE)
                finally:
                    if write and durable:
                        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            return
        with self._readers_lock:
            reader = self._idle_readers.pop() if self._idle_readers else None
        if reader is None:
            reader = self._new_connection()
            reader.execute("PRAGMA query_only = ON")
        try:
            with _begun(reader, "BEGIN"):
                yield Tx(reader, SQLITE)
        finally:
            with self._readers_lock:
                self._idle_readers.append(reader)

    def _close_connections(self) -> None:
        with self._readers_lock:
            conns, self._all, self._idle_readers = self._all, [], []
        self._writer = None
        for conn in conns:
            with suppress(sqlite3.Error):
                conn.close()

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def _record_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.IntegrityError, sqlite3.DataError)


#: Permissions a database file may have at most: it holds mail (the
#: quarantined originals), so the owner, and perhaps a group that reads
#: it for backups.
_MOST_OPEN = 0o640


def private_database(path: str) -> None:
    """
    Create the database file 0600 if it is missing, and take away from an
    existing one (and its C{-wal} and C{-shm} files, which SQLite creates
    with the database's permissions) any permission beyond 0640. Blocking.
    """
    for name, create in ((path, True), (path + "-wal", False), (path + "-shm", False)):
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(name, flags, 0o600)
        except FileNotFoundError:
            continue
        try:
            mode = os.fstat(fd).st_mode & 0o777
            if mode & ~_MOST_OPEN:
                os.fchmod(fd, mode & _MOST_OPEN)
                Logger().warn(
                    "{file} was readable by other users (mode {mode:o}); now {new:o}",
                    file=name,
                    mode=mode,
                    new=mode & _MOST_OPEN,
                )
        finally:
            os.close(fd)


@contextmanager
def _begun(conn: sqlite3.Connection, begin: str) -> Iterator[None]:
    """
    A transaction on C{conn}: committed when the block completes, rolled
    back when it raises (or when the commit itself fails).
    """
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
