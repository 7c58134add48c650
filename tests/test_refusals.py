"""
Tests for L{mdgateway.receive.refusals}: every refusal counted, each
recorded with its category through the outbox into a real store, and a
flood summarised instead of written row by row.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.python.threadpool import ThreadPool

from mdgateway.ops.metrics import Metrics
from mdgateway.receive.refusals import RefusalRecorder
from mdgateway.smtp import replies
from mdgateway.smtp.interfaces import ConnectionInfo
from mdgateway.smtp.replies import Reply
from mdgateway.store import PageRequest, RefusalFilter, SqliteStore
from mdgateway.store.outbox import Outbox
from tests.test_metrics import value

pytestmark = pytest.mark.timeout(60)


@pytest_twisted.async_yield_fixture
async def env(tmp_path: Path, threadpool: ThreadPool) -> AsyncIterator[Any]:
    store = SqliteStore(str(tmp_path / "h.sqlite"), reactor, threadpool)
    await store.open()
    outbox = Outbox(str(tmp_path / "outbox"), store, reactor, threadpool)
    await outbox.open()
    yield store, outbox
    await outbox.close()
    await store.close()


def info(client: str = "192.0.2.1") -> ConnectionInfo:
    return ConnectionInfo("s1", "smtp", (client, 1234), ("127.0.0.1", 25), helo="c")


async def settled(outbox: Outbox) -> None:
    deadline = reactor.seconds() + 10
    while outbox.depth:
        assert reactor.seconds() < deadline
        await deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_each_refusal_recorded_with_its_category(env: Any) -> None:
    """
    A refusal becomes one row with its reply, client, sender, recipient
    and category, and one count under that category.
    """
    store, outbox = env
    metrics = Metrics()
    recorder = RefusalRecorder(outbox, metrics, Clock())
    recorder(info(), "a@example.org", "b@example.org", replies.MESSAGE_TOO_BIG)
    recorder(info(), None, None, Reply.of(501, "5.1.3", "Bad address syntax"))
    await settled(outbox)
    page = await store.search_refusals()
    rows = {(r.code, r.category, r.sender, r.recipient, r.repeats) for r in page.items}
    assert rows == {
        (552, "too_big", "a@example.org", "b@example.org", 1),
        (501, "syntax", None, None, 1),
    }
    assert value(metrics, "mdgateway_smtp_refused_total", reason="syntax") == 1.0


@pytest_twisted.ensureDeferred
async def test_a_flood_is_summarised_not_written_row_by_row(env: Any) -> None:
    """
    Beyond the per-client budget a minute's refusals of one kind from one
    client become one summary row saying how many it stands for; the
    counter still counts every one, and the next minute starts afresh.
    """
    store, outbox = env
    metrics = Metrics()
    clock = Clock()
    recorder = RefusalRecorder(outbox, metrics, clock, per_client=3)
    for _ in range(50):
        recorder(info(), None, None, replies.UNKNOWN_COMMAND)
    recorder(info("192.0.2.2"), None, None, replies.UNKNOWN_COMMAND)
    assert recorder.rows == 4
    clock.advance(60)
    assert recorder.rows == 5
    recorder(info(), None, None, replies.UNKNOWN_COMMAND)
    await settled(outbox)
    page = await store.search_refusals(page=PageRequest(limit=100))
    assert page.total == 6
    summary = [r for r in page.items if r.repeats > 1]
    assert len(summary) == 1
    assert summary[0].repeats == 47
    assert summary[0].client_address == "192.0.2.1"
    assert "47 refusals like this" in summary[0].reason
    assert sum(r.repeats for r in page.items) == 52
    assert value(metrics, "mdgateway_smtp_refused_total", reason="syntax") == 52.0


@pytest_twisted.ensureDeferred
async def test_many_clients_are_bounded_overall(env: Any) -> None:
    """
    Refusals from more clients than the budgets allow are written as at
    most the overall budget of rows, a bounded number of client summaries
    and one summary per category for the rest: every refusal is accounted
    for, and the number of rows does not grow with the clients.
    """
    store, outbox = env
    clock = Clock()
    recorder = RefusalRecorder(
        outbox, Metrics(), clock, per_client=2, per_minute=20, summaries=5
    )
    for n in range(200):
        recorder(info(f"198.51.100.{n}"), None, None, replies.TOO_MANY_ERRORS)
    recorder.stop()
    await settled(outbox)
    page = await store.search_refusals(page=PageRequest(limit=1000))
    assert page.total == recorder.rows <= 20 + 5 + 1
    assert sum(r.repeats for r in page.items) == 200
    star = await store.search_refusals(RefusalFilter(client_address="*"))
    assert star.total == 1
    assert star.items[0].category == "too_many_errors"
