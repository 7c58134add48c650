# -*- test-case-name: tests.test_store_counts -*-
"""
The store's aggregate jobs for the console's dashboard: traffic per time
bucket and verdict, and what each gateway instance of a cluster is doing.

Each runs inside one read transaction in a pool thread, written once for
SQLite and PostgreSQL; the databases count, so only a few rows per bucket
cross the wire however much mail there was.
"""

from __future__ import annotations

from mdgateway.store.dialect import Tx
from mdgateway.store.interfaces import (
    InstanceActivity,
    MessageStatus,
    ScanVerdict,
    VerdictCount,
)

_PENDING = tuple(
    s.value
    for s in (MessageStatus.QUEUED, MessageStatus.PROCESSING, MessageStatus.DEFERRED)
)


def _bucket(tx: Tx) -> str:
    """
    The bucket number of a row, C{floor((received_at - since) / step)}.

    The difference is never negative (rows start at C{since}), so SQLite's
    C{CAST} (which truncates) is a floor; PostgreSQL's C{CAST} rounds, so
    it floors first. SQLite's own C{FLOOR} is missing from some builds.
    """
    ratio = "(m.received_at - ?) / ?"
    if tx.dialect.name == "postgresql":
        return f"CAST(FLOOR({ratio}) AS BIGINT)"
    return f"CAST({ratio} AS INTEGER)"


def job_count_by_verdict(
    tx: Tx, since: float, until: float, step: float
) -> tuple[VerdictCount, ...]:
    bucket = _bucket(tx)
    rows = tx.all(
        f"SELECT {bucket} AS b, m.verdict, COUNT(*) FROM messages m "
        "WHERE m.received_at >= ? AND m.received_at < ? "
        "GROUP BY b, m.verdict ORDER BY b",
        (since, step, since, until),
    )
    return tuple(
        VerdictCount(
            start=since + int(b) * step,
            verdict=None if verdict is None else ScanVerdict(verdict),
            count=int(count),
        )
        for b, verdict, count in rows
    )


def job_instance_activity(tx: Tx, since: float) -> tuple[InstanceActivity, ...]:
    recent = {
        str(instance): (int(count), float(last))
        for instance, count, last in tx.all(
            "SELECT m.instance, COUNT(*), MAX(m.received_at) FROM messages m "
            "WHERE m.received_at >= ? GROUP BY m.instance",
            (since,),
        )
    }
    marks = ", ".join("?" for _ in _PENDING)
    pending = {
        str(instance): (int(count), float(oldest))
        for instance, count, oldest in tx.all(
            "SELECT m.instance, COUNT(*), MIN(m.received_at) FROM messages m "
            f"WHERE m.status IN ({marks}) GROUP BY m.instance",
            _PENDING,
        )
    }
    out = []
    for name in sorted(recent.keys() | pending.keys()):
        received, last = recent.get(name, (0, None))
        waiting, oldest = pending.get(name, (0, None))
        out.append(InstanceActivity(name, received, last, waiting, oldest))
    return tuple(out)
