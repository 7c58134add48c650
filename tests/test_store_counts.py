"""
Tests for the dashboard's aggregate store queries (L{mdgateway.store.counts}),
on SQLite and on a real PostgreSQL.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from mdgateway.store import MessageStatus, PartVerdict, ScanVerdict
from mdgateway.store.interfaces import InstanceActivity, VerdictCount
from mdgateway.store.sqlstore import SqlStore
from tests.storefixtures import Backend, received

pytestmark = pytest.mark.timeout(60)

T0 = 1_800_000_000.0


# The store fixtures (tests/storefixtures.py, through conftest.py) run every
# test on SQLite and on PostgreSQL.
@pytest_twisted.async_fixture
async def db(backend: Backend) -> SqlStore:
    return await backend.open()


async def _copy(
    db: SqlStore,
    message_id: str,
    at: float,
    result: str | None,
    instance: str = "gw1",
    status: MessageStatus = MessageStatus.DELIVERED,
) -> None:
    await db.record_received(received(message_id, at, instance=instance))
    if result is not None:
        sanitized = result == "Sanitized"
        outcome = "Allowed" if sanitized else result
        part = PartVerdict("1", "text/plain", 10, outcome, sanitized=sanitized)
        await db.record_verdicts(message_id, [part], at=at + 1)
    await db.update_status(message_id, status, status.value, at + 2)


@pytest_twisted.ensureDeferred
async def test_count_by_verdict_buckets(db: SqlStore) -> None:
    """
    Copies are counted per bucket and verdict, bucket edges inclusive at
    the start (a copy at exactly C{since + 60} is in the second bucket,
    one at C{since + 59.9} in the first: the floor, not rounding, on both
    databases); copies without a verdict count under C{None}; copies
    outside C{[since, until)} do not count; empty buckets are left out.
    """
    await _copy(db, "A.1", T0, "Allowed")
    await _copy(db, "A.2", T0 + 59.9, "Allowed")
    await _copy(db, "A.3", T0 + 30, "Blocked")
    await _copy(db, "B.1", T0 + 60, "Allowed")
    await _copy(db, "B.2", T0 + 61, "Sanitized")
    await _copy(db, "B.3", T0 + 100, None, status=MessageStatus.QUEUED)
    await _copy(db, "D.1", T0 + 200, "Blocked")
    await _copy(db, "X.1", T0 - 0.5, "Allowed")
    await _copy(db, "X.2", T0 + 240, "Allowed")

    counts = await db.count_by_verdict(T0, T0 + 240, 60)

    assert set(counts) == {
        VerdictCount(T0, ScanVerdict.ALLOWED, 2),
        VerdictCount(T0, ScanVerdict.BLOCKED, 1),
        VerdictCount(T0 + 60, ScanVerdict.ALLOWED, 1),
        VerdictCount(T0 + 60, ScanVerdict.SANITIZED, 1),
        VerdictCount(T0 + 60, None, 1),
        VerdictCount(T0 + 180, ScanVerdict.BLOCKED, 1),
    }
    assert await db.count_by_verdict(T0 + 1000, T0 + 2000, 60) == ()
    with pytest.raises(ValueError):
        await db.count_by_verdict(T0, T0, 60)
    with pytest.raises(ValueError):
        await db.count_by_verdict(T0, T0 + 60, 0)


@pytest_twisted.ensureDeferred
async def test_instance_activity(db: SqlStore) -> None:
    """
    Each instance is listed with what it received since the time asked
    for and what is still pending in its spool (however old, with the
    oldest's time); an instance with only old finished mail is not listed.
    """
    await _copy(db, "A.1", T0 + 10, "Allowed", "gw-a")
    await _copy(db, "A.2", T0 + 20, None, "gw-a", MessageStatus.DEFERRED)
    await _copy(db, "B.1", T0 - 500, None, "gw-b", MessageStatus.QUEUED)
    await _copy(db, "B.2", T0 - 400, None, "gw-b", MessageStatus.PROCESSING)
    await _copy(db, "C.1", T0 - 900, "Allowed", "gw-c")

    activity = await db.instance_activity(T0)

    assert activity == (
        InstanceActivity("gw-a", 2, T0 + 20, 1, T0 + 20),
        InstanceActivity("gw-b", 0, None, 2, T0 - 500),
    )
