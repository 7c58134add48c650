# -*- test-case-name: tests.test_store_board -*-
"""
The cluster's notice board in the shared store: which gateway instances
are running, and requests one instance posts for another (an operator's
queue action on a message only that instance's spool holds).

Instances already share the store, so this needs no address, credential
or port of its own: the instance a request is for takes it (an atomic
C{pending} to C{taken}), carries it out and posts the answer; the
instance that asked waits for the answer, or withdraws the request if it
was not taken in time (withdrawing and taking exclude each other, so a
withdrawn request is never carried out). Requests and answers are JSON
text; what they mean is the caller's business (see
L{mdgateway.ops.cluster}).

Tables (schema version 3)::

    cluster_members   one row per instance name: started, last seen,
                      stopped (an orderly stop)
    cluster_commands  the requests, their state and answer
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import Interface

from mdgateway.store.dialect import Tx
from mdgateway.store.interfaces import NotFoundError

#: L{Command.state}: posted, not taken yet.
PENDING = "pending"
#: Taken by its instance, which is carrying it out.
TAKEN = "taken"
#: Carried out; the answer is there.
ANSWERED = "answered"
#: Withdrawn by the instance that posted it before it was taken: never
#: carried out.
WITHDRAWN = "withdrawn"

#: Most requests one L{ICommandBoard.take_commands} hands out.
TAKE_LIMIT = 20


@attrs.frozen
class Member:
    """
    One gateway instance as the board knows it.

    @ivar seen_at: its last sign of life (it looks at the board every
        fraction of a second and says so every few seconds).
    @ivar stopped_at: when it stopped in order, if it is stopped.
    """

    name: str
    started_at: float
    seen_at: float
    stopped_at: float | None = None


@attrs.frozen
class Command:
    """
    One request on the board.

    @ivar instance: the instance it is for.
    @ivar sender: the instance that posted it.
    @ivar request: its JSON text.
    @ivar answer: the answer's JSON text, once L{ANSWERED}.
    """

    id: int
    instance: str
    sender: str
    request: str
    posted_at: float
    state: str
    answer: str | None = None
    answered_at: float | None = None


class ICommandBoard(Interface):
    """
    The cluster's members and the requests between them. Every method is
    a coroutine; database failures raise L{mdgateway.store.StoreError}.
    """

    async def join(instance: str, at: float) -> None:  # noqa: N805
        """
        C{instance} started (or started again) at C{at}.
        """

    async def heartbeat(instance: str, at: float) -> None:  # noqa: N805
        """
        C{instance} is alive at C{at}.
        """

    async def leave(instance: str, at: float) -> None:  # noqa: N805
        """
        C{instance} stopped in order at C{at}.
        """

    async def members() -> tuple[Member, ...]:  # noqa: N805
        """
        Every instance that ever joined, by name.
        """

    async def post_command(
        instance: str,  # noqa: N805
        sender: str,
        request: str,
        at: float,
    ) -> int:
        """
        Post a request for C{instance}; its id.
        """

    async def take_commands(
        instance: str,  # noqa: N805
        limit: int = TAKE_LIMIT,
    ) -> tuple[Command, ...]:
        """
        The pending requests for C{instance}, oldest first, now marked
        L{TAKEN} (by this caller alone: two takers never get the same one).
        """

    async def answer_command(command_id: int, answer: str, at: float) -> None:  # noqa: N805
        """
        Post the answer to a taken request.
        """

    async def get_command(command_id: int) -> Command:  # noqa: N805
        """
        One request as it stands. @raise NotFoundError: no such request.
        """

    async def withdraw_command(command_id: int) -> bool:  # noqa: N805
        """
        Withdraw a request not taken yet; C{False} (nothing changed) when
        it was taken meanwhile.
        """

    async def purge_commands(before: float) -> int:  # noqa: N805
        """
        Remove the requests posted before C{before}; how many.
        """


# -- jobs (pool threads) -----------------------------------------------------------


def job_join(tx: Tx, instance: str, at: float) -> None:
    tx.execute(
        "INSERT INTO cluster_members (name, started_at, seen_at, stopped_at) "
        "VALUES (?, ?, ?, NULL) ON CONFLICT (name) DO UPDATE SET "
        "started_at = excluded.started_at, seen_at = excluded.seen_at, "
        "stopped_at = NULL",
        (instance, at, at),
    )


def job_heartbeat(tx: Tx, instance: str, at: float) -> None:
    if not tx.rowcount(
        "UPDATE cluster_members SET seen_at = ?, stopped_at = NULL WHERE name = ?",
        (at, instance),
    ):
        job_join(tx, instance, at)


def job_leave(tx: Tx, instance: str, at: float) -> None:
    tx.execute(
        "UPDATE cluster_members SET stopped_at = ?, seen_at = ? WHERE name = ?",
        (at, at, instance),
    )


def job_members(tx: Tx) -> tuple[Member, ...]:
    rows = tx.all(
        "SELECT name, started_at, seen_at, stopped_at FROM cluster_members "
        "ORDER BY name"
    )
    return tuple(Member(*row) for row in rows)


def job_post_command(
    tx: Tx, instance: str, sender: str, request: str, at: float
) -> int:
    row = tx.one(
        "INSERT INTO cluster_commands (instance, sender, request, posted_at, state) "
        "VALUES (?, ?, ?, ?, ?) RETURNING id",
        (instance, sender, request, at, PENDING),
    )
    assert row is not None
    return int(row[0])


_COLUMNS = "id, instance, sender, request, posted_at, state, answer, answered_at"


def _command(row: tuple[Any, ...]) -> Command:
    return Command(int(row[0]), *row[1:])


def job_take_commands(tx: Tx, instance: str, limit: int) -> tuple[Command, ...]:
    rows = tx.all(
        f"SELECT {_COLUMNS} FROM cluster_commands "
        "WHERE instance = ? AND state = ? ORDER BY id LIMIT ?",
        (instance, PENDING, limit),
    )
    taken = []
    for row in rows:
        # Only one of two takers (or a taker and a withdrawal) changes it.
        if tx.rowcount(
            "UPDATE cluster_commands SET state = ? WHERE id = ? AND state = ?",
            (TAKEN, row[0], PENDING),
        ):
            taken.append(attrs.evolve(_command(row), state=TAKEN))
    return tuple(taken)


def job_pending_for(tx: Tx, instance: str) -> bool:
    return (
        tx.one(
            "SELECT 1 FROM cluster_commands WHERE instance = ? AND state = ? LIMIT 1",
            (instance, PENDING),
        )
        is not None
    )


def job_answer_command(tx: Tx, command_id: int, answer: str, at: float) -> None:
    if not tx.rowcount(
        "UPDATE cluster_commands SET state = ?, answer = ?, answered_at = ? "
        "WHERE id = ? AND state = ?",
        (ANSWERED, answer, at, command_id, TAKEN),
    ):
        raise NotFoundError(f"no taken cluster request {command_id}")


def job_get_command(tx: Tx, command_id: int) -> Command:
    row = tx.one(f"SELECT {_COLUMNS} FROM cluster_commands WHERE id = ?", (command_id,))
    if row is None:
        raise NotFoundError(f"no cluster request {command_id}")
    return _command(row)


def job_withdraw_command(tx: Tx, command_id: int) -> bool:
    return bool(
        tx.rowcount(
            "UPDATE cluster_commands SET state = ? WHERE id = ? AND state = ?",
            (WITHDRAWN, command_id, PENDING),
        )
    )


def job_purge_commands(tx: Tx, before: float) -> int:
    return tx.rowcount("DELETE FROM cluster_commands WHERE posted_at < ?", (before,))
