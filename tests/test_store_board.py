"""
The cluster's notice board in the store, on SQLite and PostgreSQL: members
joining, living and leaving; requests posted, taken by exactly one taker,
answered, withdrawn (never both taken and withdrawn) and purged.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from zope.interface.verify import verifyObject

from mdgateway.store import NotFoundError
from mdgateway.store.board import (
    ANSWERED,
    PENDING,
    TAKEN,
    WITHDRAWN,
    ICommandBoard,
    Member,
)
from mdgateway.store.sqlstore import SqlStore
from tests.storefixtures import Backend


@pytest_twisted.ensureDeferred
async def test_the_store_is_a_board(store: SqlStore) -> None:
    """
    The SQL stores provide the board's interface.
    """
    assert verifyObject(ICommandBoard, store)


@pytest_twisted.ensureDeferred
async def test_members(store: SqlStore) -> None:
    """
    A member that joins is listed with its start; a heartbeat moves its
    last sign of life; leaving marks it stopped until it joins again (or
    shows a sign of life).
    """
    await store.join("gw2", 100.0)
    await store.join("gw1", 110.0)
    await store.heartbeat("gw1", 115.0)
    assert await store.members() == (
        Member("gw1", 110.0, 115.0, None),
        Member("gw2", 100.0, 100.0, None),
    )
    await store.leave("gw2", 120.0)
    assert (await store.members())[1] == Member("gw2", 100.0, 120.0, 120.0)
    await store.heartbeat("gw2", 130.0)
    assert (await store.members())[1] == Member("gw2", 100.0, 130.0, None)
    await store.join("gw2", 140.0)
    assert (await store.members())[1] == Member("gw2", 140.0, 140.0, None)
    # A heartbeat from a name never joined adds it.
    await store.heartbeat("gw3", 150.0)
    assert (await store.members())[2] == Member("gw3", 150.0, 150.0, None)


@pytest_twisted.ensureDeferred
async def test_request_and_answer(store: SqlStore) -> None:
    """
    A request posted for gw2 is taken by gw2 only, once, oldest first;
    its answer is read back by its id.
    """
    first = await store.post_command("gw2", "gw1", '{"n": 1}', 10.0)
    second = await store.post_command("gw2", "gw1", '{"n": 2}', 11.0)
    other = await store.post_command("gw3", "gw1", '{"n": 3}', 12.0)
    assert await store.take_commands("gw1") == ()
    taken = await store.take_commands("gw2")
    assert [(c.id, c.request, c.state, c.sender) for c in taken] == [
        (first, '{"n": 1}', TAKEN, "gw1"),
        (second, '{"n": 2}', TAKEN, "gw1"),
    ]
    assert await store.take_commands("gw2") == ()
    await store.answer_command(first, '{"ok": true}', 20.0)
    answered = await store.get_command(first)
    assert (answered.state, answered.answer, answered.answered_at) == (
        ANSWERED,
        '{"ok": true}',
        20.0,
    )
    assert (await store.get_command(other)).state == PENDING
    with pytest.raises(NotFoundError):
        await store.answer_command(first, "{}", 21.0)  # answered already
    with pytest.raises(NotFoundError):
        await store.get_command(9999)


@pytest_twisted.ensureDeferred
async def test_withdraw_and_take_exclude_each_other(store: SqlStore) -> None:
    """
    A request withdrawn before it is taken is never handed out; one taken
    first cannot be withdrawn (the withdrawer is told so).
    """
    early = await store.post_command("gw2", "gw1", "{}", 10.0)
    late = await store.post_command("gw2", "gw1", "{}", 11.0)
    assert await store.withdraw_command(early)
    assert (await store.get_command(early)).state == WITHDRAWN
    (taken,) = await store.take_commands("gw2")
    assert taken.id == late
    assert not await store.withdraw_command(late)
    with pytest.raises(NotFoundError):
        await store.answer_command(early, "{}", 12.0)


@pytest_twisted.ensureDeferred
async def test_two_takers_never_share(backend: Backend) -> None:
    """
    Two stores on one database (two processes believing they are gw2)
    taking at once each get a request at most once between them.
    """
    one, two = await backend.open(), await backend.open()
    ids = [await one.post_command("gw2", "gw1", "{}", float(n)) for n in range(10)]
    got = await gatherResults(
        [
            Deferred.fromCoroutine(s.take_commands("gw2", limit=10))
            for s in (one, two, one, two)
        ]
    )
    taken = [c.id for batch in got for c in batch]
    assert sorted(taken) == ids


@pytest_twisted.ensureDeferred
async def test_purge(store: SqlStore) -> None:
    """
    Requests posted before the cut are removed, whatever their state.
    """
    old = await store.post_command("gw2", "gw1", "{}", 10.0)
    new = await store.post_command("gw2", "gw1", "{}", 100.0)
    assert await store.purge_commands(50.0) == 1
    with pytest.raises(NotFoundError):
        await store.get_command(old)
    assert (await store.get_command(new)).state == PENDING
