"""
Tests for L{mdgateway.store.outbox}: records kept on disk until the store
has them, through store outages, restarts and crashes, with a real SQLite
store whose database can be switched off (L{OutageSqliteStore}) and the
real reactor and thread pool.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from mdgateway.store import IStore, MessageStatus
from mdgateway.store.outbox import Outbox
from mdgateway.store.owed import (
    OwedEvent,
    OwedReceived,
    OwedStatus,
)
from mdgateway.testing.store import OutageSqliteStore
from tests.storefixtures import file_digest, received, write_file

pytestmark = pytest.mark.timeout(60)


async def until(check: Any, timeout: float = 10.0) -> None:
    """
    Poll C{check()} on the reactor until it is true (a bounded wait).
    """
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.async_yield_fixture
async def outage_store(
    tmp_path: Path, threadpool: ThreadPool
) -> AsyncIterator[OutageSqliteStore]:
    store = OutageSqliteStore(str(tmp_path / "history.sqlite"), reactor, threadpool)
    await store.open()
    yield store
    store.down = False
    await store.close()


def make_outbox(
    tmp_path: Path, store: IStore, threadpool: ThreadPool, **kw: Any
) -> Outbox:
    kw.setdefault("retry_first", 0.05)
    kw.setdefault("retry_max", 0.2)
    return Outbox(str(tmp_path / "spool" / "outbox"), store, reactor, threadpool, **kw)


def segments(outbox: Outbox) -> list[str]:
    return sorted(n for n in os.listdir(outbox.directory) if n.endswith(".jsonl"))


def history(n: int) -> list[Any]:
    """
    The records of C{n} copies: received (and processing), then final.
    """
    out: list[Any] = []
    for i in range(n):
        mid = f"M{i}.1"
        out.append(
            OwedReceived(
                received(mid, at=float(i)),
                "received",
                float(i),
                MessageStatus.PROCESSING,
                "processing",
            )
        )
        out.append(OwedStatus(mid, MessageStatus.DELIVERED, "delivered", i + 0.5))
    return out


async def timeline(store: IStore, message_id: str) -> list[str]:
    return [e.text for e in (await store.get_message(message_id)).timeline]


def test_fake_provides_the_store_interface(tmp_path: Path) -> None:
    """
    The outage store is a real store: it provides L{IStore}.
    """
    pool = ThreadPool(0, 1)
    verifyObject(IStore, OutageSqliteStore(str(tmp_path / "x.db"), reactor, pool))


@pytest_twisted.ensureDeferred
async def test_records_are_on_disk_before_append_fires(
    tmp_path: Path, outage_store: OutageSqliteStore, threadpool: ThreadPool
) -> None:
    """
    When an append's Deferred fires the record is in a segment file (so a
    crash from then on cannot lose it); then the drainer applies it and
    removes the file.
    """
    outage_store.down = True
    outbox = make_outbox(tmp_path, outage_store, threadpool)
    await outbox.open()
    await outbox.append(OwedEvent("nope.1", "x", 1.0))
    (name,) = segments(outbox)
    with open(os.path.join(outbox.directory, name), "rb") as f:
        (line,) = f.read().splitlines()
    assert json.loads(line)["text"] == "x"
    assert outbox.depth == 1
    outage_store.down = False
    for record in history(1):
        await outbox.append(record)
    await until(lambda: outbox.depth == 0)
    assert segments(outbox) == []
    assert await timeline(outage_store, "M0.1") == [
        "received",
        "processing",
        "delivered",
    ]
    # The record for a message that does not exist was kept aside.
    assert outbox.failed == 1
    assert len(os.listdir(os.path.join(outbox.directory, "failed"))) == 1
    await outbox.close()


@pytest_twisted.ensureDeferred
async def test_outage_then_recovery_in_order_without_duplicates(
    tmp_path: Path, outage_store: OutageSqliteStore, threadpool: ThreadPool
) -> None:
    """
    While the store is down records pile up on disk (depth, oldest age,
    full at the limit, the store reported unreachable); when it is back
    every record is applied once, in order.
    """
    outbox = make_outbox(tmp_path, outage_store, threadpool, limit=50)
    await outbox.open()
    outage_store.down = True
    for record in history(40):
        await outbox.append(record)
    await until(lambda: outbox.store_reachable is False)
    assert outbox.depth == 80
    assert outbox.full
    assert outbox.status().full
    await deferLater(reactor, 0.1, lambda: None)
    assert outbox.oldest_age() >= 0.1
    outage_store.down = False
    await until(lambda: outbox.depth == 0)
    assert outbox.store_reachable is True
    # Through status(): mypy keeps "outbox.full" narrowed to True from above.
    assert not outbox.status().full
    assert outbox.oldest_age() == 0.0
    page = await outage_store.search_messages()
    assert page.total == 40
    assert {m.status for m in page.items} == {MessageStatus.DELIVERED}
    assert await timeline(outage_store, "M7.1") == [
        "received",
        "processing",
        "delivered",
    ]
    await outbox.close()


@pytest_twisted.ensureDeferred
async def test_records_survive_a_restart(
    tmp_path: Path, outage_store: OutageSqliteStore, threadpool: ThreadPool
) -> None:
    """
    Records not applied when the outbox closes (the store is down) stay on
    disk; a new outbox on the same folder applies them at open.
    """
    outage_store.down = True
    first = make_outbox(tmp_path, outage_store, threadpool)
    await first.open()
    for record in history(5):
        await first.append(record)
    await until(lambda: first.store_reachable is False)
    await first.close(timeout=1.0)
    assert len(segments(first)) >= 1
    outage_store.down = False
    second = make_outbox(tmp_path, outage_store, threadpool)
    assert await second.open() == 10
    await until(lambda: second.depth == 0)
    assert (await outage_store.search_messages()).total == 5
    await second.close()


@pytest_twisted.ensureDeferred
async def test_replay_after_a_crash_mid_drain_duplicates_nothing(
    tmp_path: Path, outage_store: OutageSqliteStore, threadpool: ThreadPool
) -> None:
    """
    A crash after the store committed a segment but before the segment
    file was removed replays it at the next start; every record is found
    applied already and nothing is doubled.
    """
    outage_store.down = True
    outbox = make_outbox(tmp_path, outage_store, threadpool)
    await outbox.open()
    for record in history(3):
        await outbox.append(record)
    saved = tmp_path / "saved"
    shutil.copytree(outbox.directory, saved)
    outage_store.down = False
    await until(lambda: outbox.depth == 0)
    await outbox.close()
    before = await timeline(outage_store, "M1.1")
    # The "crash": the applied segments are back, as if never removed.
    shutil.rmtree(outbox.directory)
    shutil.copytree(saved, outbox.directory)
    again = make_outbox(tmp_path, outage_store, threadpool)
    assert await again.open() == 6
    await until(lambda: again.depth == 0)
    assert await timeline(outage_store, "M1.1") == before
    assert (await outage_store.search_messages()).total == 3
    assert again.failed == 0
    await again.close()


@pytest_twisted.ensureDeferred
async def test_quarantined_original_survives_its_spool_file(
    tmp_path: Path, outage_store: OutageSqliteStore, threadpool: ThreadPool
) -> None:
    """
    A quarantine record keeps the original's bytes in the outbox: the
    spool file may be removed at once, and when the store is back the
    quarantine holds the original, byte for byte; the outbox's copy goes.
    """
    outbox = make_outbox(tmp_path, outage_store, threadpool)
    await outbox.open()
    await outbox.append(OwedReceived(received("Q.1"), "received", 1.0))
    await until(lambda: outbox.depth == 0)
    outage_store.down = True
    spooled = tmp_path / "spooled.eml"
    digest = write_file(spooled, 3 * 1024 * 1024 + 17)
    await outbox.quarantine("Q.1", "blocked", str(spooled), 2.0, 99.0)
    spooled.unlink()
    kept = [n for n in os.listdir(outbox.directory) if n.endswith(".eml")]
    assert len(kept) == 1
    assert file_digest(os.path.join(outbox.directory, kept[0])) == digest
    await deferLater(reactor, 0.2, lambda: None)
    assert outbox.depth == 1
    outage_store.down = False
    await until(lambda: outbox.depth == 0)
    (item,) = (await outage_store.list_quarantine()).items
    assert item.sha256 == digest
    assert item.expires_at == 99.0
    out = tmp_path / "out.eml"
    await outage_store.read_quarantined(item.id, str(out))
    assert file_digest(out) == digest
    assert [n for n in os.listdir(outbox.directory) if n.endswith(".eml")] == []
    await outbox.close()


@pytest_twisted.ensureDeferred
async def test_refused_original_is_kept_for_an_operator(
    tmp_path: Path, outage_store: OutageSqliteStore, threadpool: ThreadPool
) -> None:
    """
    An original the store refuses for good (its history entry is
    missing) is never deleted: it moves to C{failed/} with its record and
    the reason, and the drain goes on.
    """
    outbox = make_outbox(tmp_path, outage_store, threadpool)
    await outbox.open()
    spooled = tmp_path / "spooled.eml"
    digest = write_file(spooled, 1000)
    await outbox.quarantine("missing.1", "blocked", str(spooled), 2.0)
    await outbox.append(OwedReceived(received("ok.1"), "received", 3.0))
    await until(lambda: outbox.depth == 0)
    failed = os.path.join(outbox.directory, "failed")
    names = sorted(os.listdir(failed))
    assert [n.rsplit(".", 1)[1] for n in names] == ["eml", "json"]
    assert file_digest(os.path.join(failed, names[0])) == digest
    with open(os.path.join(failed, names[1])) as f:
        kept = json.load(f)
    assert "NotFoundError" in kept["error"]
    assert kept["record"]["message_id"] == "missing.1"
    assert (await outage_store.search_messages()).total == 1
    await outbox.close()


@pytest_twisted.ensureDeferred
async def test_unwritable_outbox_fails_the_append(
    tmp_path: Path, outage_store: OutageSqliteStore, threadpool: ThreadPool
) -> None:
    """
    When the record cannot be written the append fails with the OS error
    (the step it records is not done and is tried again), and the depth
    does not count it.
    """
    outbox = make_outbox(tmp_path, outage_store, threadpool)
    await outbox.open()
    shutil.rmtree(outbox.directory)
    Path(outbox.directory).write_text("not a folder")
    with pytest.raises(OSError):
        await outbox.append(OwedEvent("x.1", "x", 1.0))
    assert outbox.depth == 0
    await outbox.close()


@pytest_twisted.ensureDeferred
async def test_adopts_the_outbox_of_a_retired_worker(
    tmp_path: Path, outage_store: OutageSqliteStore, threadpool: ThreadPool
) -> None:
    """
    The outbox of a spool root no process uses any more is moved into
    this one, originals included, and applied.
    """
    outage_store.down = True
    stale_root = tmp_path / "spool" / "workers" / "3"
    stale = Outbox(
        str(stale_root / "outbox"), outage_store, reactor, threadpool, retry_max=0.1
    )
    await stale.open()
    await stale.append(OwedReceived(received("W.1"), "received", 1.0))
    spooled = tmp_path / "w.eml"
    digest = write_file(spooled, 5000)
    await stale.quarantine("W.1", "blocked", str(spooled), 2.0)
    await stale.close(timeout=0.1)
    (stale_root / "lock").write_text("")
    outage_store.down = False
    outbox = make_outbox(tmp_path, outage_store, threadpool)
    await outbox.open()
    assert await outbox.adopt(str(stale_root)) == 2
    await until(lambda: outbox.depth == 0)
    assert not (stale_root / "outbox").exists()
    (item,) = (await outage_store.list_quarantine()).items
    assert item.sha256 == digest
    await outbox.close()


@pytest_twisted.ensureDeferred
async def test_close_does_not_wait_for_a_store_that_is_down(
    tmp_path: Path, outage_store: OutageSqliteStore, threadpool: ThreadPool
) -> None:
    """
    Closing while the store fails returns at once (the records stay on
    disk) rather than holding up the gateway's stop for the timeout.
    """
    outage_store.down = True
    outbox = make_outbox(tmp_path, outage_store, threadpool)
    await outbox.open()
    await outbox.append(OwedEvent("x.1", "x", 1.0))
    await until(lambda: outbox.store_reachable is False)
    started = reactor.seconds()
    closing: Deferred[None] = Deferred.fromCoroutine(outbox.close(timeout=30))
    await closing
    assert reactor.seconds() - started < 5
    assert outbox.depth == 1


@pytest_twisted.ensureDeferred
async def test_adoption_clears_an_outbox_with_only_leftovers(
    tmp_path: Path, outage_store: OutageSqliteStore, threadpool: ThreadPool
) -> None:
    """
    A retired worker's outbox holding only a half-written segment (a
    crash) and kept failures is emptied: the failures move here, the
    leftover goes, and the folder is removed so the spool root can be.
    """
    stale_root = tmp_path / "spool" / "workers" / "2"
    (stale_root / "outbox" / "failed").mkdir(parents=True)
    (stale_root / "outbox" / "0000000000000004.jsonl.tmp").write_text("{")
    (stale_root / "outbox" / "failed" / "k.json").write_text("{}")
    outbox = make_outbox(tmp_path, outage_store, threadpool)
    await outbox.open()
    assert await outbox.adopt(str(stale_root)) == 0
    assert not (stale_root / "outbox").exists()
    assert os.listdir(os.path.join(outbox.directory, "failed")) == ["adopted-k.json"]
    await outbox.close()
