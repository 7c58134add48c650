"""
Store fixtures shared by the store's test modules (through conftest.py):
a real thread pool, and an empty database per test on each backend.

Every test taking the C{backend} (or C{store}) fixture runs twice, on
SQLite (always) and on PostgreSQL (a throwaway server from L{tests.pg};
skipped when none can be run, failed instead when
C{MDGATEWAY_REQUIRE_POSTGRES=1}).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from mdgateway.store import ReceivedMessage, SqliteStore
from mdgateway.store.postgres import PostgresStore
from mdgateway.store.sqlstore import SqlStore

MB = 1024 * 1024


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-store")
    pool.start()
    yield pool
    pool.stop()


@attrs.define
class Backend:
    """
    One empty database of one kind, and the stores opened on it.
    """

    name: str
    location: str
    threadpool: ThreadPool
    opened: list[SqlStore] = attrs.Factory(list)

    def make(self, **kwargs: Any) -> SqlStore:
        store: SqlStore
        if self.name == "sqlite":
            store = SqliteStore(self.location, reactor, self.threadpool, **kwargs)
        else:
            store = PostgresStore(self.location, reactor, self.threadpool, **kwargs)
        self.opened.append(store)
        return store

    async def open(self, **kwargs: Any) -> SqlStore:
        store = self.make(**kwargs)
        await store.open()
        return store

    def raw(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """
        Run one statement with the driver, outside any store (test set-up).
        """
        if self.name == "sqlite":
            conn = sqlite3.connect(self.location)
            try:
                rows = conn.execute(query, params).fetchall()
                conn.commit()
                return rows
            finally:
                conn.close()
        with psycopg.connect(self.location, autocommit=True) as pg:
            cursor = pg.execute(query.replace("?", "%s"), params)
            return list(cursor.fetchall()) if cursor.description else []


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres_server")
        return "postgresql", server.create_database()
    return "sqlite", str(tmp_path / "store.db")


@pytest_twisted.async_yield_fixture
async def backend(location: tuple[str, str], threadpool: ThreadPool) -> Any:
    b = Backend(location[0], location[1], threadpool)
    yield b
    for store in b.opened:
        await store.close()


@pytest_twisted.async_fixture
async def store(backend: Backend) -> SqlStore:
    return await backend.open()


def received(
    message_id: str = "Q1.1", at: float = 1000.0, **kw: Any
) -> ReceivedMessage:
    fields: dict[str, Any] = {
        "id": message_id,
        "queue_id": message_id.split(".")[0],
        "received_at": at,
        "client_address": "192.0.2.10",
        "helo": "mx.example.net",
        "sender": "alice@example.net",
        "recipients": ("bob@example.org",),
        "rule": "Inbound",
        "direction": "inbound",
        "size": 1234,
        "subject": "Hello",
        "message_id_header": f"<{message_id}@example.net>",
    }
    fields.update(kw)
    return ReceivedMessage(**fields)


def write_file(path: Path, size: int, seed: bytes = b"x") -> str:
    """
    Write C{size} pseudo-random bytes to C{path} 1 MB at a time; return
    their SHA-256.
    """
    digest = hashlib.sha256()
    block = hashlib.sha256(seed).digest() * (MB // 32)
    with open(path, "wb") as f:
        written = 0
        n = 0
        while written < size:
            chunk = (n.to_bytes(8, "big") + block)[: min(MB, size - written)]
            f.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            n += 1
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MB):
            digest.update(block)
    return digest.hexdigest()
