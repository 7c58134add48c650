"""
Tests for L{mdgateway.store}: one suite run against both backends.

Every test taking the C{backend} fixture runs twice, on SQLite (always) and
on PostgreSQL (a throwaway server from L{tests.pg}; skipped when none can be
run, failed instead when C{MDGATEWAY_REQUIRE_POSTGRES=1}). Each run gets a
new, empty database and a real L{ThreadPool}, on the real reactor.
"""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mdgateway.store import (
    CorruptOriginalError,
    DeliveryStatus,
    IStore,
    MessageFilter,
    MessageStatus,
    NotFoundError,
    PageRequest,
    PartVerdict,
    PurgeCounts,
    QuarantineFilter,
    RecipientDelivery,
    Refusal,
    RefusalFilter,
    ScanVerdict,
    SchemaVersionError,
    SqliteStore,
    StoreError,
    copy_id,
    overall_verdict,
    parse_upstream_queue_id,
    store_for,
)
from mdgateway.store.dialect import like_pattern
from mdgateway.store.postgres import PostgresStore
from mdgateway.store.schema import SCHEMA_VERSION
from mdgateway.store.sqlstore import SqlStore
from tests.storefixtures import Backend, file_digest, received, write_file

pytestmark = pytest.mark.timeout(60)

DAY = 86400.0
MB = 1024 * 1024


# --------------------------------------------------------------------------
# Fixtures: threadpool, location, backend and store are in
# tests/storefixtures.py (shared through conftest.py).


# --------------------------------------------------------------------------
# Schema


@pytest_twisted.ensureDeferred
async def test_migrations_from_empty_and_reopen(backend: Backend) -> None:
    """
    Opening an empty database applies every migration and records it in
    C{schema_version}; opening it again applies nothing and keeps the data.
    """
    first = await backend.open()
    assert first.applied_migrations == list(range(1, SCHEMA_VERSION + 1))
    assert await first.schema_version() == SCHEMA_VERSION
    await first.record_received(received())
    await first.close()

    again = await backend.open()
    assert again.applied_migrations == []
    assert await again.schema_version() == SCHEMA_VERSION
    assert (await again.get_message("Q1.1")).summary.sender == "alice@example.net"
    rows = backend.raw("SELECT version FROM schema_version ORDER BY version")
    assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))


@pytest_twisted.ensureDeferred
async def test_concurrent_opens_migrate_once(backend: Backend) -> None:
    """
    Three stores opening one empty database at the same moment (three
    instances starting together) all succeed, and the schema is applied
    exactly once.
    """
    stores = [backend.make() for _ in range(3)]
    await gatherResults([Deferred.fromCoroutine(s.open()) for s in stores])
    applied = [s.applied_migrations for s in stores]
    assert sorted(applied, key=len) == [[], [], list(range(1, SCHEMA_VERSION + 1))]
    rows = backend.raw("SELECT COUNT(*) FROM schema_version")
    assert rows[0][0] == SCHEMA_VERSION


@pytest_twisted.ensureDeferred
async def test_newer_schema_refused(backend: Backend) -> None:
    """
    A database migrated by a newer mdgateway is not opened: L{open}
    raises L{SchemaVersionError} and calls keep failing.
    """
    await (await backend.open()).close()
    backend.raw(
        "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
        (SCHEMA_VERSION + 1, "from the future", 0.0),
    )
    newer = backend.make()
    with pytest.raises(SchemaVersionError):
        await newer.open()
    with pytest.raises(StoreError):
        await newer.get_message("Q1.1")


# --------------------------------------------------------------------------
# History


@pytest_twisted.ensureDeferred
async def test_record_and_fetch_message(store: SqlStore) -> None:
    """
    A copy's received data, status timeline, part verdicts, actions and
    per-recipient deliveries come back from L{get_message} as recorded,
    with the upstream queue id parsed from a 2xx reply, attempts counted
    and the timings set.
    """
    msg = received(
        recipients=("bob@example.org", "carol@example.org", "bob@example.org"),
        subject="Quarterly report",
        instance="gw-1",
    )
    assert await store.record_received(msg) is True
    await store.update_status("Q1.1", MessageStatus.PROCESSING, "scanning", at=1001.0)
    parts = [
        PartVerdict(
            part_id="1",
            content_type="text/plain",
            size=120,
            result="Allowed",
            data_id="d1",
            core_url="http://core:8008/file/d1",
        ),
        PartVerdict(
            part_id="1.2",
            content_type="application/pdf",
            size=5000,
            result="Allowed",
            filename="report.pdf",
            data_id="d2",
            sanitized=True,
            dlp_hits=("credit card x3",),
        ),
    ]
    await store.record_verdicts(
        "Q1.1", parts, actions=["sanitized part 1.2"], at=1002.5
    )
    await store.record_delivery(
        "Q1.1",
        RecipientDelivery(
            "bob@example.org",
            DeliveryStatus.DELIVERED,
            code=250,
            enhanced="2.0.0",
            text="Ok: queued as 4XkB2c1",
            server="relay.example.org:25",
            at=1003.0,
        ),
    )
    await store.record_delivery(
        "Q1.1",
        RecipientDelivery(
            "carol@example.org",
            DeliveryStatus.DEFERRED,
            code=451,
            enhanced="4.7.500",
            text="Server busy",
            at=1003.0,
        ),
    )
    await store.record_delivery(
        "Q1.1",
        RecipientDelivery(
            "carol@example.org",
            DeliveryStatus.BOUNCED,
            code=550,
            enhanced="5.1.1",
            text="No such user",
            at=1065.0,
        ),
    )
    await store.add_event("Q1.1", "bounce sent to alice@example.net", at=1065.5)
    await store.update_status(
        "Q1.1", MessageStatus.PARTIALLY_DELIVERED, "done", at=1066.0
    )

    record = await store.get_message("Q1.1")
    s = record.summary
    assert (s.id, s.queue_id, s.instance) == ("Q1.1", "Q1", "gw-1")
    assert s.recipients == ("bob@example.org", "carol@example.org")
    assert (s.client_address, s.helo, s.sender) == (
        "192.0.2.10",
        "mx.example.net",
        "alice@example.net",
    )
    assert (s.rule, s.direction, s.size) == ("Inbound", "inbound", 1234)
    assert (s.subject, s.message_id_header) == (
        "Quarterly report",
        "<Q1.1@example.net>",
    )
    assert s.status is MessageStatus.PARTIALLY_DELIVERED
    assert s.verdict is ScanVerdict.SANITIZED
    assert (s.received_at, s.processed_at, s.delivered_at, s.finished_at) == (
        1000.0,
        1002.5,
        1003.0,
        1066.0,
    )
    assert record.parts == tuple(parts)
    assert record.actions == ("sanitized part 1.2",)
    bob, carol = record.deliveries
    assert bob == RecipientDelivery(
        "bob@example.org",
        DeliveryStatus.DELIVERED,
        code=250,
        enhanced="2.0.0",
        text="Ok: queued as 4XkB2c1",
        upstream_queue_id="4XkB2c1",
        server="relay.example.org:25",
        at=1003.0,
        attempts=1,
    )
    assert (carol.status, carol.code, carol.enhanced, carol.attempts) == (
        DeliveryStatus.BOUNCED,
        550,
        "5.1.1",
        2,
    )
    assert carol.upstream_queue_id is None
    timeline = [(e.at, e.status) for e in record.timeline]
    assert timeline == [
        (1000.0, MessageStatus.QUEUED),
        (1001.0, MessageStatus.PROCESSING),
        (1003.0, None),
        (1003.0, None),
        (1065.0, None),
        (1065.5, None),
        (1066.0, MessageStatus.PARTIALLY_DELIVERED),
    ]
    texts = [e.text for e in record.timeline]
    assert texts[0] == "received from mx.example.net [192.0.2.10]"
    assert "delivered bob@example.org via relay.example.org:25: 250 2.0.0" in texts[2]
    assert texts[5] == "bounce sent to alice@example.net"


@pytest_twisted.ensureDeferred
async def test_record_received_is_idempotent(store: SqlStore) -> None:
    """
    Recording the same copy twice (a pipeline restarted after a crash)
    returns C{False} the second time and changes nothing.
    """
    assert await store.record_received(received(subject="first")) is True
    assert await store.record_received(received(subject="second")) is False
    record = await store.get_message("Q1.1")
    assert record.summary.subject == "first"
    assert len(record.timeline) == 1


@pytest_twisted.ensureDeferred
async def test_record_delivery_adds_unlisted_recipient(store: SqlStore) -> None:
    """
    A delivery result for a recipient the copy did not list is kept as a
    new recipient after the others; verdicts recorded again replace the
    previous ones.
    """
    await store.record_received(received())
    await store.record_delivery(
        "Q1.1", RecipientDelivery("extra@example.org", DeliveryStatus.DELIVERED, 250)
    )
    await store.record_verdicts(
        "Q1.1", [PartVerdict("1", "text/plain", 1, "Blocked", blocked_reason="x")]
    )
    await store.record_verdicts("Q1.1", [PartVerdict("1", "text/plain", 1, "Allowed")])
    record = await store.get_message("Q1.1")
    assert [d.recipient for d in record.deliveries] == [
        "bob@example.org",
        "extra@example.org",
    ]
    assert [d.status for d in record.deliveries] == [
        DeliveryStatus.PENDING,
        DeliveryStatus.DELIVERED,
    ]
    assert [p.result for p in record.parts] == ["Allowed"]
    assert record.summary.verdict is ScanVerdict.ALLOWED


@pytest_twisted.ensureDeferred
async def test_unknown_ids_raise_not_found(store: SqlStore, tmp_path: Path) -> None:
    """
    Every call naming a history entry or quarantine item that does not exist
    raises L{NotFoundError}; deleting one returns C{False}.
    """
    out = tmp_path / "out"
    out.mkdir()
    calls = [
        store.get_message("nope"),
        store.update_status("nope", MessageStatus.DELIVERED, "x"),
        store.add_event("nope", "x"),
        store.record_verdicts("nope", []),
        store.record_delivery("nope", RecipientDelivery("a@b", DeliveryStatus.PENDING)),
        store.quarantine("nope", "malware", b"data"),
        store.get_quarantined("nope"),
        store.read_quarantined("nope", str(out / "out.eml")),
        store.pin("nope", True),
        store.mark_released("nope", "admin"),
    ]
    for call in calls:
        with pytest.raises(NotFoundError):
            await call
    assert await store.delete_quarantined("nope") is False
    assert list(out.iterdir()) == []


async def _search_corpus(store: SqlStore) -> None:
    messages = [
        received(
            "A.1",
            at=100.0,
            sender="Alice@Example.net",
            recipients=("bob@example.org",),
            subject="Über Straße",
            rule="Inbound",
            direction="inbound",
        ),
        received(
            "A.2",
            at=100.0,
            sender="alice@example.net",
            recipients=("ops@corp.example",),
            subject="100% off",
            rule="Outbound",
            direction="outbound",
        ),
        received(
            "B.1",
            at=200.0,
            sender="mallory@evil.example",
            recipients=("bob@example.org", "carol@example.org"),
            subject="Invoice_2024",
        ),
        received(
            "C.1",
            at=300.0,
            sender="",
            recipients=("Carol@Example.org",),
            subject="Delivery Status Notification",
            rule=None,
            direction=None,
        ),
    ]
    for m in messages:
        await store.record_received(m)
    await store.record_verdicts(
        "A.1", [PartVerdict("1", "text/plain", 1, "Allowed", sanitized=True)]
    )
    await store.record_verdicts("A.2", [PartVerdict("1", "text/plain", 1, "Allowed")])
    await store.record_verdicts(
        "B.1", [PartVerdict("1", "application/zip", 1, "Blocked", blocked_reason="x")]
    )
    await store.update_status("A.1", MessageStatus.DELIVERED, "ok", at=101.0)
    await store.update_status("B.1", MessageStatus.QUARANTINED, "blocked", at=201.0)
    await store.update_status("C.1", MessageStatus.DEFERRED, "relay down", at=301.0)


@pytest_twisted.ensureDeferred
async def test_search_by_each_filter(store: SqlStore) -> None:
    """
    Each history filter selects exactly the matching copies, newest first:
    time range (since inclusive, until exclusive), sender, recipient and
    subject as case-insensitive substrings (beyond ASCII, with C{%} and
    C{_} taken literally), statuses, rule, direction, verdicts, queue id
    and Message-ID.
    """
    await _search_corpus(store)

    async def ids(**kw: Any) -> list[str]:
        page = await store.search_messages(MessageFilter(**kw))
        assert page.total == len(page.items)
        return [m.id for m in page.items]

    assert await ids() == ["C.1", "B.1", "A.2", "A.1"]
    assert await ids(since=100.0, until=300.0) == ["B.1", "A.2", "A.1"]
    assert await ids(since=200.0) == ["C.1", "B.1"]
    assert await ids(sender="ALICE@example") == ["A.2", "A.1"]
    assert await ids(recipient="carol@EXAMPLE.ORG") == ["C.1", "B.1"]
    assert await ids(recipient="bob") == ["B.1", "A.1"]
    assert await ids(subject="über") == ["A.1"]
    assert await ids(subject="STRASSE") == ["A.1"]
    assert await ids(subject="100%") == ["A.2"]
    assert await ids(subject="e_2") == ["B.1"]
    assert await ids(subject="%") == ["A.2"]
    assert await ids(statuses=MessageStatus.QUEUED) == ["A.2"]
    assert await ids(statuses=[MessageStatus.DELIVERED, MessageStatus.QUARANTINED]) == [
        "B.1",
        "A.1",
    ]
    assert await ids(rule="Outbound") == ["A.2"]
    assert await ids(direction="inbound") == ["B.1", "A.1"]
    assert await ids(verdicts=ScanVerdict.BLOCKED) == ["B.1"]
    assert await ids(verdicts=["Sanitized", "Allowed"]) == ["A.2", "A.1"]
    assert await ids(queue_id="A") == ["A.2", "A.1"]
    assert await ids(message_id_header="<B.1@example.net>") == ["B.1"]
    assert await ids(sender="alice", statuses="delivered") == ["A.1"]
    assert await ids(sender="nobody") == []
    [c1] = (await store.search_messages(MessageFilter(queue_id="C"))).items
    assert c1.recipients == ("Carol@Example.org",)
    assert (c1.sender, c1.rule, c1.verdict) == ("", None, None)


@pytest_twisted.ensureDeferred
async def test_pagination_is_stable(store: SqlStore) -> None:
    """
    Paging through the history with the cursor yields every matching row
    once, newest first (ties in time broken by id), with the total on every
    page; rows added while paging do not shift or repeat rows; a foreign or
    garbled cursor is refused.
    """
    for n in range(23):
        await store.record_received(received(f"P{n:02d}.1", at=1000.0 + n // 3))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await store.search_messages(
            MessageFilter(queue_id=None), PageRequest(limit=5, cursor=cursor)
        )
        assert page.total == 23 + (1 if pages >= 2 else 0)
        seen.extend(m.id for m in page.items)
        pages += 1
        if pages == 2:
            await store.record_received(received("NEW.1", at=5000.0))
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    expected = sorted(
        (f"P{n:02d}.1" for n in range(23)),
        key=lambda i: (1000.0 + int(i[1:3]) // 3, i),
        reverse=True,
    )
    assert seen == expected
    assert pages == 5
    filtered = await store.search_messages(
        MessageFilter(since=1005.0, until=2000.0), PageRequest(limit=2)
    )
    assert [m.id for m in filtered.items] == ["P22.1", "P21.1"]
    assert filtered.total == 8
    for _ in range(2):
        await store.record_refusal(Refusal(1.0, "l", "192.0.2.1", 550, "x"))
    refusal_page = await store.search_refusals(page=PageRequest(limit=1))
    assert refusal_page.next_cursor is not None
    for bad in ("garbage!", "W10", refusal_page.next_cursor):
        with pytest.raises(ValueError):
            await store.search_messages(page=PageRequest(cursor=bad))
    with pytest.raises(ValueError):
        PageRequest(limit=0)


# --------------------------------------------------------------------------
# Refused log


@pytest_twisted.ensureDeferred
async def test_refusals(store: SqlStore) -> None:
    """
    Refusals are logged with an id and searched by time, client, sender,
    recipient, listener and code, newest first, paginated.
    """
    logged = []
    for n in range(7):
        logged.append(
            await store.record_refusal(
                Refusal(
                    at=100.0 + n,
                    listener="public" if n % 2 else "submission",
                    client_address=f"198.51.100.{n}",
                    code=550 if n < 5 else 421,
                    enhanced="5.7.1" if n < 5 else "4.3.2",
                    reason="No security rule" if n < 5 else "draining",
                    helo="spam.example" if n else None,
                    sender=f"S{n}@Spam.example" if n else None,
                    recipient="victim@example.org" if n else None,
                )
            )
        )
    assert len({r.id for r in logged}) == 7
    assert all(r.id is not None for r in logged)

    async def ids(**kw: Any) -> list[int | None]:
        page = await store.search_refusals(RefusalFilter(**kw))
        assert page.total == len(page.items)
        return [r.id for r in page.items]

    newest_first = [r.id for r in reversed(logged)]
    assert await ids() == newest_first
    assert await ids(since=102.0, until=104.0) == [logged[3].id, logged[2].id]
    assert await ids(client_address="198.51.100.4") == [logged[4].id]
    assert await ids(sender="s3@spam") == [logged[3].id]
    assert await ids(recipient="VICTIM") == newest_first[:-1]
    assert await ids(listener="public") == [logged[n].id for n in (5, 3, 1)]
    assert await ids(code=421) == [logged[6].id, logged[5].id]
    page = await store.search_refusals(page=PageRequest(limit=4))
    assert page.next_cursor is not None and page.total == 7
    rest = await store.search_refusals(
        page=PageRequest(limit=4, cursor=page.next_cursor)
    )
    assert [r.id for r in page.items + rest.items] == newest_first
    assert rest.next_cursor is None
    assert page.items[-1] == logged[3]
    assert rest.items[-1] == logged[0]


# --------------------------------------------------------------------------
# Quarantine


@pytest_twisted.ensureDeferred
async def test_quarantine_5mb_byte_identical(store: SqlStore, tmp_path: Path) -> None:
    """
    A 5 MB original stored from a file reads back byte-identical through
    L{read_quarantined}, with its size, digest, reason and message; the
    same works from a binary stream and from bytes.
    """
    original = os.urandom(5 * MB)
    source = tmp_path / "original.eml"
    source.write_bytes(original)
    await store.record_received(received(subject="Payload"))
    item = await store.quarantine(
        "Q1.1", "Blocked: Infected", str(source), expires_at=9999.0, at=1010.0
    )
    assert len(item.id) == 32
    assert (item.size, item.sha256) == (
        len(original),
        hashlib.sha256(original).hexdigest(),
    )
    assert (item.reason, item.quarantined_at, item.expires_at) == (
        "Blocked: Infected",
        1010.0,
        9999.0,
    )
    assert (item.pinned, item.released_at, item.released_by) == (False, None, None)
    assert item.message.subject == "Payload"
    assert item.message.recipients == ("bob@example.org",)
    assert await store.get_quarantined(item.id) == item

    out = tmp_path / "out" / "copy.eml"
    out.parent.mkdir()
    assert await store.read_quarantined(item.id, str(out)) == item
    assert out.read_bytes() == original
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.eml"]

    streamed = await store.quarantine("Q1.1", "sanitized", io.BytesIO(b"x" * 700_001))
    assert await store.read_quarantined(streamed.id, str(out)) == streamed
    assert out.read_bytes() == b"x" * 700_001
    small = await store.quarantine("Q1.1", "sanitized", b"tiny")
    empty = await store.quarantine("Q1.1", "sanitized", b"")
    await store.read_quarantined(small.id, str(out))
    assert out.read_bytes() == b"tiny"
    await store.read_quarantined(empty.id, str(out))
    assert out.read_bytes() == b""
    timeline = (await store.get_message("Q1.1")).timeline
    assert f"original quarantined ({5 * MB} bytes)" in timeline[1].text


@pytest_twisted.ensureDeferred
async def test_quarantine_25mb_memory_bounded(store: SqlStore, tmp_path: Path) -> None:
    """
    Storing and reading back a 25 MB original never holds more than a few
    chunks in Python memory (traced across all threads): the peak stays
    far below the message size, and the copy is identical.
    """
    source = tmp_path / "big.eml"
    digest = write_file(source, 25 * MB)
    await store.record_received(received())
    out = tmp_path / "big-out.eml"
    tracemalloc.start()
    try:
        item = await store.quarantine("Q1.1", "Blocked", str(source))
        await store.read_quarantined(item.id, str(out))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MB, f"peak {peak} bytes"
    assert item.size == 25 * MB
    assert item.sha256 == digest == file_digest(out)


@pytest_twisted.ensureDeferred
async def test_quarantine_corruption_detected(
    backend: Backend, store: SqlStore, tmp_path: Path
) -> None:
    """
    An original whose stored bytes changed is refused on read with
    L{CorruptOriginalError}, and no file is left at the destination.
    """
    await store.record_received(received())
    item = await store.quarantine("Q1.1", "Blocked", b"original bytes")
    backend.raw(
        "UPDATE quarantine_chunks SET data = ? WHERE item_id = ?",
        (b"tampered bytes", item.id),
    )
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CorruptOriginalError):
        await store.read_quarantined(item.id, str(out / "out.eml"))
    assert list(out.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_pin_release_delete_and_list(
    backend: Backend, store: SqlStore, tmp_path: Path
) -> None:
    """
    Pinning and unpinning, release marking (with a timeline line) and
    deletion (with a timeline line) show in L{get_quarantined} and in the
    quarantine list's filters; a deleted item is gone.
    """
    await store.record_received(received("M.1", at=10.0, subject="Invoice"))
    await store.record_received(
        received("M.2", at=20.0, sender="eve@bad.example", rule="Outbound")
    )
    one = await store.quarantine("M.1", "Blocked: Infected", b"one", at=11.0)
    two = await store.quarantine("M.2", "Sanitized original", b"two", at=21.0)

    await store.pin(one.id, True)
    assert (await store.get_quarantined(one.id)).pinned is True
    released = await store.mark_released(two.id, "admin@example.org", at=30.0)
    assert (released.released_at, released.released_by) == (30.0, "admin@example.org")

    async def ids(**kw: Any) -> list[str]:
        page = await store.list_quarantine(QuarantineFilter(**kw))
        assert page.total == len(page.items)
        return [i.id for i in page.items]

    assert await ids() == [two.id, one.id]
    assert await ids(pinned=True) == [one.id]
    assert await ids(pinned=False) == [two.id]
    assert await ids(released=True) == [two.id]
    assert await ids(released=False) == [one.id]
    assert await ids(sender="EVE") == [two.id]
    assert await ids(recipient="bob@") == [two.id, one.id]
    assert await ids(subject="invoice") == [one.id]
    assert await ids(reason="infected") == [one.id]
    assert await ids(rule="Outbound") == [two.id]
    assert await ids(message_id="M.1") == [one.id]
    assert await ids(since=15.0) == [two.id]
    assert await ids(until=15.0) == [one.id]
    first = await store.list_quarantine(page=PageRequest(limit=1))
    second = await store.list_quarantine(
        page=PageRequest(limit=1, cursor=first.next_cursor)
    )
    assert [i.id for i in first.items + second.items] == [two.id, one.id]
    assert second.next_cursor is None

    await store.pin(one.id, False)
    assert (await store.get_quarantined(one.id)).pinned is False
    assert await store.delete_quarantined(one.id) is True
    assert await store.delete_quarantined(one.id) is False
    with pytest.raises(NotFoundError):
        await store.get_quarantined(one.id)
    with pytest.raises(NotFoundError):
        await store.read_quarantined(one.id, str(tmp_path / "x.eml"))
    chunks = "SELECT COUNT(*) FROM quarantine_chunks WHERE item_id = ?"
    assert backend.raw(chunks, (one.id,)) == [(0,)]
    texts = [e.text for e in (await store.get_message("M.1")).timeline]
    assert texts[-1] == "quarantined original deleted"
    texts = [e.text for e in (await store.get_message("M.2")).timeline]
    assert texts[-1] == "original released from quarantine by admin@example.org"


@pytest_twisted.ensureDeferred
async def test_purge_respects_pins_and_retention(
    backend: Backend, store: SqlStore
) -> None:
    """
    L{purge} removes unpinned items past their own expiry or, without one,
    older than C{quarantine_days} (with their bytes), then history and
    refusals older than C{history_days}, keeping history that a remaining
    item still refers to; a second run removes nothing; C{None} disables
    each part.
    """
    now = 2_000_000_000.0
    old, recent = now - 40 * DAY, now - 20 * DAY
    for message_id, at in [
        ("OLD.1", old),
        ("PINNED.1", old),
        ("EXPIRED.1", old),
        ("RECENT.1", recent),
        ("FUTURE.1", old),
        ("NEW.1", now - DAY),
    ]:
        await store.record_received(received(message_id, at=at))
    pinned = await store.quarantine("PINNED.1", "x", b"a" * 10, now - DAY, at=old)
    await store.pin(pinned.id, True)
    expired = await store.quarantine("EXPIRED.1", "x", b"b" * 20, now - DAY, at=old)
    undated = await store.quarantine("RECENT.1", "x", b"c" * 30, None, at=recent)
    future = await store.quarantine("FUTURE.1", "x", b"d" * 40, now + DAY, at=old)
    await store.record_refusal(Refusal(old, "public", "192.0.2.1", 550, "no rule"))
    kept_refusal = await store.record_refusal(
        Refusal(now - DAY, "public", "192.0.2.2", 550, "no rule")
    )

    explicit_only = await store.purge(now, None, None)
    assert explicit_only == PurgeCounts(quarantined=1, quarantined_bytes=20)

    counts = await store.purge(now, history_days=30, quarantine_days=10)
    assert counts == PurgeCounts(
        messages=2, refusals=1, quarantined=1, quarantined_bytes=30
    )
    remaining = await store.list_quarantine()
    assert {i.id for i in remaining.items} == {pinned.id, future.id}
    history = await store.search_messages()
    assert sorted(m.id for m in history.items) == [
        "FUTURE.1",
        "NEW.1",
        "PINNED.1",
        "RECENT.1",
    ]
    refusals = await store.search_refusals()
    assert [r.id for r in refusals.items] == [kept_refusal.id]
    chunk_items = backend.raw("SELECT DISTINCT item_id FROM quarantine_chunks")
    assert {r[0] for r in chunk_items} == {pinned.id, future.id}
    assert backend.raw(
        "SELECT COUNT(*) FROM message_events WHERE message_id = ?", ("OLD.1",)
    ) == [(0,)]
    for gone in (expired.id, undated.id):
        with pytest.raises(NotFoundError):
            await store.get_quarantined(gone)

    assert await store.purge(now, 30, 10) == PurgeCounts()
    await store.pin(pinned.id, False)
    assert await store.purge(now, 30, 10) == PurgeCounts(
        messages=1, quarantined=1, quarantined_bytes=10
    )
    with pytest.raises(NotFoundError):
        await store.get_message("PINNED.1")


@pytest_twisted.ensureDeferred
async def test_purge_in_batches(backend: Backend) -> None:
    """
    A purge larger than one batch runs batch after batch until everything
    due is gone.
    """
    store = await backend.open(purge_batch=3)
    for n in range(10):
        await store.record_received(received(f"B{n}.1", at=10.0))
        await store.record_refusal(Refusal(10.0, "l", "192.0.2.1", 550, "x"))
    for n in range(7):
        await store.quarantine(f"B{n}.1", "x", b"q", expires_at=20.0)
    counts = await store.purge(100.0 * DAY, history_days=1, quarantine_days=None)
    assert counts == PurgeCounts(
        messages=10, refusals=10, quarantined=7, quarantined_bytes=7
    )
    assert (await store.search_messages()).total == 0


# --------------------------------------------------------------------------
# Sharing and threads


@pytest_twisted.ensureDeferred
async def test_two_instances_share_history_and_quarantine(
    backend: Backend, tmp_path: Path
) -> None:
    """
    Two stores on one database (two gateway instances) see each other's
    writes: a copy recorded and quarantined by one is found, read back and
    released by the other, and the first sees the release.
    """
    first = await backend.open()
    second = await backend.open()
    original = os.urandom(300_000)
    await first.record_received(received())
    item = await first.quarantine("Q1.1", "Blocked", original)
    found = await second.list_quarantine(QuarantineFilter(message_id="Q1.1"))
    assert [i.id for i in found.items] == [item.id]
    out = tmp_path / "released.eml"
    await second.read_quarantined(item.id, str(out))
    assert out.read_bytes() == original
    await second.mark_released(item.id, "ops", at=2000.0)
    await second.update_status("Q1.1", MessageStatus.QUARANTINED, "held", at=1500.0)
    seen = await first.get_quarantined(item.id)
    assert (seen.released_by, seen.released_at) == ("ops", 2000.0)
    assert (await first.get_message("Q1.1")).summary.status is MessageStatus.QUARANTINED


@pytest_twisted.ensureDeferred
async def test_concurrent_writes(store: SqlStore) -> None:
    """
    Many calls issued at once (more than there are threads and
    connections) all complete: SQLite's single writer serializes them,
    PostgreSQL spreads them over its pool.
    """
    await gatherResults(
        [
            Deferred.fromCoroutine(store.record_received(received(f"C{n}.1", at=n)))
            for n in range(40)
        ]
    )
    mixed: list[Deferred[Any]] = [
        Deferred.fromCoroutine(
            store.update_status(f"C{n}.1", MessageStatus.DELIVERED, "ok", at=n + 1)
        )
        for n in range(40)
    ]
    mixed += [Deferred.fromCoroutine(store.search_messages()) for _ in range(10)]
    await gatherResults(mixed)
    page = await store.search_messages(
        MessageFilter(statuses=MessageStatus.DELIVERED), PageRequest(limit=100)
    )
    assert page.total == 40


@pytest_twisted.ensureDeferred
async def test_grouped_writes_fail_alone(store: SqlStore) -> None:
    """
    Writes issued together are committed together, yet one that fails (an
    event for an unknown message, here in the middle of the group) fails
    alone with its own error and leaves no trace, while the writes before
    and after it are kept.
    """
    await store.record_received(received("G0.1", at=1))
    calls: list[Deferred[bool | None]] = [
        Deferred.fromCoroutine(store.add_event("G0.1", f"event {n}", at=10 + n))
        for n in range(3)
    ]
    calls.append(Deferred.fromCoroutine(store.add_event("NOPE.1", "lost", at=20)))
    calls += [
        Deferred.fromCoroutine(store.record_received(received(f"G{n}.1", at=n)))
        for n in range(1, 4)
    ]
    results = await DeferredList(calls, consumeErrors=True)
    # Twisted types each second item as a result; a failed call gives a Failure.
    failed: list[object] = [r for ok, r in results if not ok]
    assert len(failed) == 1
    assert isinstance(failed[0], Failure)
    assert failed[0].check(NotFoundError)
    record = await store.get_message("G0.1")
    texts = [e.text for e in record.timeline]
    assert [t for t in texts if t.startswith("event")] == [
        "event 0",
        "event 1",
        "event 2",
    ]
    for n in range(1, 4):
        assert (await store.get_message(f"G{n}.1")).summary.id == f"G{n}.1"


def _thread_recording_connect(backend: Backend, seen: list[threading.Thread]) -> Any:
    if backend.name == "sqlite":

        class RecordingSqlite(sqlite3.Connection):
            def execute(self, *args: Any) -> Any:
                seen.append(threading.current_thread())
                return super().execute(*args)

        def connect_sqlite(path: str) -> sqlite3.Connection:
            seen.append(threading.current_thread())
            return sqlite3.connect(
                path, factory=RecordingSqlite, check_same_thread=False
            )

        return connect_sqlite

    class RecordingPg(psycopg.Connection[Any]):
        def execute(self, *args: Any, **kwargs: Any) -> Any:
            seen.append(threading.current_thread())
            return super().execute(*args, **kwargs)

    def connect_pg(dsn: str) -> Any:
        seen.append(threading.current_thread())
        return RecordingPg.connect(dsn)

    return connect_pg


@pytest_twisted.ensureDeferred
async def test_calls_run_off_the_reactor_thread(
    backend: Backend, tmp_path: Path
) -> None:
    """
    Every connection is opened, and every statement executed, in a pool
    thread: never in the reactor's thread (the main thread here).
    """
    assert threading.current_thread() is threading.main_thread()
    seen: list[threading.Thread] = []
    store = await backend.open(connect=_thread_recording_connect(backend, seen))
    await store.record_received(received())
    await store.update_status("Q1.1", MessageStatus.PROCESSING, "scan")
    await store.record_verdicts("Q1.1", [PartVerdict("1", "text/plain", 1, "Allowed")])
    await store.record_delivery(
        "Q1.1", RecipientDelivery("bob@example.org", DeliveryStatus.DELIVERED, 250)
    )
    await store.get_message("Q1.1")
    await store.search_messages(MessageFilter(sender="alice"))
    await store.record_refusal(Refusal(1.0, "l", "192.0.2.1", 550, "x"))
    await store.search_refusals()
    item = await store.quarantine("Q1.1", "x", b"data" * 1000)
    await store.read_quarantined(item.id, str(tmp_path / "o.eml"))
    await store.list_quarantine()
    await store.pin(item.id, True)
    await store.mark_released(item.id, "ops")
    await store.purge(10**10, 1, 1)
    await store.check()
    assert len(seen) > 30
    assert threading.main_thread() not in seen
    assert all("test-store" in t.name for t in seen)


@pytest_twisted.ensureDeferred
async def test_closed_store_refuses_calls(backend: Backend) -> None:
    """
    L{close} waits for calls in flight, which complete; calls made after it
    raise L{StoreError}, as do calls before L{open}.
    """
    unopened = backend.make()
    with pytest.raises(StoreError):
        await unopened.check()
    store = await backend.open()
    in_flight = Deferred.fromCoroutine(store.record_received(received()))
    await store.close()
    assert in_flight.called
    assert await in_flight is True
    with pytest.raises(StoreError):
        await store.get_message("Q1.1")
    other = await backend.open()
    assert (await other.get_message("Q1.1")).id == "Q1.1"


@pytest_twisted.ensureDeferred
async def test_postgres_reconnects_after_server_side_disconnect(
    backend: Backend,
) -> None:
    """
    (PostgreSQL) When the server drops the store's pooled connections (a
    restart, an idle timeout), the next call reconnects instead of failing.
    """
    if backend.name != "postgresql":
        pytest.skip("PostgreSQL connection pool only")
    store = await backend.open(idle_check=0.0)
    await store.record_received(received())
    killed = backend.raw(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND application_name = 'mdgateway'"
    )
    assert killed and all(r[0] for r in killed)
    assert (await store.get_message("Q1.1")).id == "Q1.1"


@pytest_twisted.ensureDeferred
async def test_sqlite_memory_store(threadpool: ThreadPool) -> None:
    """
    C{SqliteStore(":memory:")} is a complete private store (one connection
    for reads and writes), usable as a real store in other tests.
    """
    store = SqliteStore(":memory:", reactor, threadpool)
    await store.open()
    try:
        await store.record_received(received())
        item = await store.quarantine("Q1.1", "x", b"abc")
        assert (await store.get_quarantined(item.id)).size == 3
        assert (await store.search_messages()).total == 1
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_uses_wal(threadpool: ThreadPool, tmp_path: Path) -> None:
    """
    The SQLite database file is put in WAL mode, so readers never wait for
    the writer.
    """
    path = tmp_path / "wal.db"
    store = SqliteStore(path, reactor, threadpool)
    await store.open()
    try:
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()
    finally:
        await store.close()


# --------------------------------------------------------------------------
# Pure parts


class PureTests(SynchronousTestCase):
    """
    Value classes and helpers that need no database.
    """

    def test_stores_provide_istore(self) -> None:
        """
        Both backends provide L{IStore} with matching signatures, and
        L{store_for} picks the backend from the location.
        """
        pool = ThreadPool()
        sqlite_store = SqliteStore(":memory:", reactor, pool)
        pg_store = PostgresStore("postgresql://u:secret@h/db", reactor, pool)
        self.assertTrue(verifyObject(IStore, sqlite_store))
        self.assertTrue(verifyObject(IStore, pg_store))
        self.assertNotIn("secret", repr(pg_store))
        self.assertIsInstance(
            store_for("postgresql://h/db", reactor, pool), PostgresStore
        )
        self.assertIsInstance(
            store_for("postgres://h/db", reactor, pool), PostgresStore
        )
        by_url = store_for("sqlite:///var/lib/x.db", reactor, pool)
        assert isinstance(by_url, SqliteStore)
        self.assertEqual(by_url.path, "/var/lib/x.db")
        plain = store_for("history.db", reactor, pool)
        assert isinstance(plain, SqliteStore)
        self.assertEqual(plain.path, "history.db")
        self.assertRaises(ValueError, store_for, "sqlite://", reactor, pool)

    def test_upstream_queue_id(self) -> None:
        """
        The relay's queue id is found in the common 2xx reply shapes
        (Postfix, Exim, Exchange, Sendmail) and not invented otherwise.
        """
        cases = {
            "Ok: queued as 4XkB2c1": "4XkB2c1",
            "2.0.0 Ok: queued as <ABC123>": "ABC123",
            "OK id=1rXabc-000Abc-12": "1rXabc-000Abc-12",
            "<m@x> [InternalId=1234567, Hostname=AM0PR01MB] Queued mail for delivery": (
                "1234567"
            ),
            "x8ABC123 Message accepted for delivery": "x8ABC123",
            "2.0.0 Message accepted for delivery": None,
            "OK": None,
            "": None,
        }
        for text, expected in cases.items():
            self.assertEqual(parse_upstream_queue_id(text), expected, text)

    def test_copy_id_and_verdict(self) -> None:
        """
        Copy ids are C{<queue_id>.<n>} from 1; the overall verdict is blocked
        over sanitized over allowed, and none without parts.
        """
        self.assertEqual(copy_id("01ABC", 2), "01ABC.2")
        self.assertRaises(ValueError, copy_id, "01ABC", 0)
        allowed = PartVerdict("1", "text/plain", 1, "Allowed")
        clean = PartVerdict("2", "text/plain", 1, "Allowed", sanitized=True)
        blocked = PartVerdict("3", "text/plain", 1, "Blocked")
        self.assertIsNone(overall_verdict([]))
        self.assertEqual(overall_verdict([allowed]), ScanVerdict.ALLOWED)
        self.assertEqual(overall_verdict([allowed, clean]), ScanVerdict.SANITIZED)
        self.assertEqual(overall_verdict([clean, blocked]), ScanVerdict.BLOCKED)

    def test_values_validate(self) -> None:
        """
        Ids, page limits and filter values are checked when the value is
        made, and single statuses or verdicts become sets.
        """
        self.assertRaises(ValueError, received, "")
        self.assertRaises(ValueError, received, "x" * 201)
        self.assertRaises(TypeError, received, recipients="bob@example.org")
        self.assertRaises(ValueError, PageRequest, limit=1001)
        self.assertRaises(ValueError, MessageFilter, statuses="lost")
        self.assertEqual(
            MessageFilter(statuses="queued").statuses, frozenset({MessageStatus.QUEUED})
        )
        self.assertEqual(
            MessageFilter(verdicts=[ScanVerdict.BLOCKED, "Allowed"]).verdicts,
            frozenset({ScanVerdict.BLOCKED, ScanVerdict.ALLOWED}),
        )
        self.assertTrue(MessageStatus.BOUNCED.final)
        self.assertFalse(MessageStatus.DEFERRED.final)

    def test_like_pattern_escapes(self) -> None:
        """
        Search text is case-folded and its C{LIKE} wildcards escaped.
        """
        self.assertEqual(like_pattern("A_b%C\\"), "%a\\_b\\%c\\\\%")
        self.assertEqual(like_pattern("Straße"), "%strasse%")
