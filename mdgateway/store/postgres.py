# -*- test-case-name: tests.test_store -*-
"""
The shared store: PostgreSQL through psycopg 3, for several gateway
instances that share one history, refused log and quarantine.

Each instance keeps a small pool of connections (at most C{max_connections};
admission is gated on the reactor side, so no pool thread ever waits for a
connection). Quarantined originals are stored as C{bytea} chunks, so any
instance can release, forward or rescan what another one quarantined. Read
calls run in C{REPEATABLE READ, READ ONLY} transactions: a page and its total
count, or the chunks of one original, come from one snapshot. Concurrent
schema migrations at start-up are serialized with an advisory lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from twisted.internet.interfaces import IReactorTime
from twisted.python.threadpool import ThreadPool

from mdgateway.store.dialect import POSTGRESQL, Tx
from mdgateway.store.sqlstore import CHUNK_SIZE, PURGE_BATCH, SqlStore


def default_connect(dsn: str) -> psycopg.Connection[Any]:
    """
    Connect to C{dsn} (a libpq connection string or C{postgresql://} URL).
    """
    return psycopg.connect(dsn, connect_timeout=10, application_name="mdgateway")


class PostgresStore(SqlStore):
    """
    L{mdgateway.store.interfaces.IStore} on a PostgreSQL database.
    """

    def __init__(
        self,
        dsn: str,
        reactor: IReactorTime,
        threadpool: ThreadPool,
        *,
        connect: Callable[[str], Any] = default_connect,
        max_connections: int = 4,
        idle_check: float = 30.0,
        chunk_size: int = CHUNK_SIZE,
        purge_batch: int = PURGE_BATCH,
    ) -> None:
        """
        @param dsn: where the database is; may carry a password, so it is
            never logged or shown in C{repr}.
        @param connect: opens one psycopg connection to C{dsn}.
        @param max_connections: connections this instance opens at most;
            reads and writes share them.
        @param idle_check: a connection idle longer than this many seconds
            is tested with C{SELECT 1} before use, so a database restart
            costs a reconnect instead of a failed call.
        """
        super().__init__(
            reactor,
            threadpool,
            POSTGRESQL,
            read_slots=max_connections,
            write_slots=None,
            chunk_size=chunk_size,
            purge_batch=purge_batch,
        )
        self._dsn = dsn
        self._connect = connect
        self._idle_check = idle_check
        self._idle: list[tuple[Any, float]] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "<PostgresStore>"

    def _fresh(self) -> Any:
        conn = self._connect(self._dsn)
        conn.autocommit = True  # transactions are explicit, see _transaction
        return conn

    def _checkout(self) -> Any:
        with self._lock:
            conn, idle_since = self._idle.pop() if self._idle else (None, 0.0)
        if conn is None:
            return self._fresh()
        # Monotonic time only ages pooled connections; it is no event time.
        if time.monotonic() - idle_since > self._idle_check:
            try:
                conn.execute("SELECT 1")
            except psycopg.Error:
                with suppress(psycopg.Error):
                    conn.close()
                return self._fresh()
        return conn

    def _checkin(self, conn: Any) -> None:
        if conn.closed or conn.broken:
            with suppress(psycopg.Error):
                conn.close()
            return
        with self._lock:
            self._idle.append((conn, time.monotonic()))

    @contextmanager
    def _transaction(self, write: bool, durable: bool) -> Iterator[Tx]:
        conn = self._checkout()
        try:
            with conn.transaction():
                if not write:
                    conn.execute(
                        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                    )
                yield Tx(conn, POSTGRESQL)
        finally:
            self._checkin(conn)

    def _close_connections(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            with suppress(psycopg.Error):
                conn.close()

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (psycopg.Error,)

    def _record_errors(self) -> tuple[type[BaseException], ...]:
        return (psycopg.IntegrityError, psycopg.DataError)
