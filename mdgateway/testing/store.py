# -*- test-case-name: tests.test_outbox -*-
"""
A store whose database can be made to fail, for tests of what the gateway
does during a store outage (and for programs that embed it).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from mdgateway.store.dialect import Tx
from mdgateway.store.sqlite import SqliteStore


class OutageSqliteStore(SqliteStore):
    """
    A real L{SqliteStore} with a switch: while C{down} is set, every call
    fails as an unreachable database does (the driver raises, the store
    raises L{mdgateway.store.StoreError}), and nothing is written.

    @ivar calls_while_down: calls that failed because of the switch.
    """

    down = False
    calls_while_down = 0

    @contextmanager
    def _transaction(self, write: bool, durable: bool) -> Iterator[Tx]:
        if self.down:
            self.calls_while_down += 1
            raise sqlite3.OperationalError("unable to open database file (outage)")
        with super()._transaction(write, durable) as tx:
            yield tx
