# -*- test-case-name: tests.test_queue_ops -*-
"""
Requests from one instance of a cluster to another, through the notice
board in the shared store (L{mdgateway.store.board}).

Why the store: every instance of a cluster already shares it (history,
quarantine, audit), so a request needs no address, port, certificate or
credential of its own, crosses no firewall the instances do not already
cross, and is refused by nothing but a down instance.

How: each instance's L{ClusterLink} says it is alive (a heartbeat every
few seconds), looks at the board for requests addressed to it several
times a second, carries each out with C{serve} and posts the answer. An
instance that asks posts its request, and waits for the answer; a request
not taken within a few seconds is withdrawn (withdrawing and taking
exclude each other in the store, so a withdrawn request is never carried
out later) and the asker is told the instance did not answer. An instance
that has not been seen lately, or stopped in order, is not asked at all.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from mdgateway.ops.interfaces import OperationError
from mdgateway.store.board import ANSWERED, PENDING, Command, ICommandBoard

log = Logger()

#: Seconds between two looks at the board for requests to this instance.
POLL_EVERY = 0.5
#: Seconds between two heartbeats.
HEARTBEAT_EVERY = 5.0
#: An instance not seen for this long is taken for down: not asked.
SILENT_AFTER = 30.0
#: Seconds a request may wait to be taken before it is withdrawn.
TAKE_WITHIN = 10.0
#: Seconds a taken request may take to be answered.
ANSWER_WITHIN = 30.0
#: Seconds between two looks at the board for an answer.
ANSWER_POLL = 0.2
#: Requests are removed from the board this long after they were posted.
KEEP_FOR = 3600.0
#: Members not seen for this long are no longer listed.
FORGET_AFTER = 7 * 86400.0


@attrs.frozen
class MemberStatus:
    """
    One instance of the cluster as the board shows it now.

    @ivar alive: seen lately and not stopped: it can be asked.
    @ivar why: why it cannot be asked, if it cannot.
    """

    name: str
    this: bool
    alive: bool
    seen_at: float
    why: str | None = None


Serve = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ClusterLink:
    """
    This instance's end of the board: it serves requests addressed to
    C{instance} with C{serve}, and asks other instances.

    @param serve: carries out one request (a JSON object) and answers with
        a JSON object; an L{OperationError} it raises goes back as such.
    """

    def __init__(
        self,
        *,
        board: ICommandBoard,
        clock: IReactorTime,
        instance: str,
        serve: Serve,
        poll_every: float = POLL_EVERY,
        heartbeat_every: float = HEARTBEAT_EVERY,
        take_within: float = TAKE_WITHIN,
        answer_within: float = ANSWER_WITHIN,
    ) -> None:
        self.board = board
        self.clock = clock
        self.instance = instance
        self.serve = serve
        self.poll_every = poll_every
        self.heartbeat_every = heartbeat_every
        self.take_within = take_within
        self.answer_within = answer_within
        self._loop = LoopingCall(self._poll)
        self._loop.clock = clock
        self._last_beat = float("-inf")
        self._last_purge = float("-inf")
        self._serving: set[Deferred[None]] = set()
        self._failing = False
        self._joined = False

    # -- this instance's side ------------------------------------------------------

    async def start(self) -> None:
        """
        Join the board and begin to serve it.
        """
        now = self.clock.seconds()
        await self.board.join(self.instance, now)
        self._joined = True
        self._last_beat = now
        self._loop.start(self.poll_every, now=True).addErrback(
            lambda f: log.failure("the cluster link stopped", f)
        )

    async def stop(self) -> None:
        """
        Stop serving, let the requests in hand finish, and say this
        instance stopped (so others do not wait for it).
        """
        if self._loop.running:
            self._loop.stop()
        for serving in list(self._serving):
            await serving
        if not self._joined:
            # A start that failed before joining has nothing to take back.
            return
        self._joined = False
        try:
            await self.board.leave(self.instance, self.clock.seconds())
        except Exception as e:
            # The store is down: the others see this instance's heartbeat
            # age and stop waiting for it; nothing is lost.
            log.warn(
                "could not tell the cluster this instance stopped: {error}",
                error=str(e) or type(e).__name__,
            )

    async def _poll(self) -> None:
        now = self.clock.seconds()
        try:
            if now - self._last_beat >= self.heartbeat_every:
                await self.board.heartbeat(self.instance, now)
                self._last_beat = now
            if now - self._last_purge >= KEEP_FOR / 10:
                await self.board.purge_commands(now - KEEP_FOR)
                self._last_purge = now
            commands = await self.board.take_commands(self.instance)
        except Exception as e:
            if not self._failing:
                log.warn(
                    "cannot look at the cluster's requests in the store: {error}",
                    error=str(e),
                )
            self._failing = True
            return
        if self._failing:
            log.info("the cluster's requests in the store can be read again")
            self._failing = False
        for command in commands:
            serving = Deferred.fromCoroutine(self._serve(command))
            self._serving.add(serving)
            serving.addBoth(self._served, serving)

    def _served(self, result: object, serving: Deferred[None]) -> None:
        self._serving.discard(serving)

    async def _serve(self, command: Command) -> None:
        try:
            request = json.loads(command.request)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError:
            answer: dict[str, Any] = {
                "error": {"status": 400, "message": "a malformed request"}
            }
        else:
            try:
                answer = {"result": await self.serve(request)}
            except OperationError as e:
                answer = {"error": {"status": e.status, "message": e.message}}
            except Exception as e:
                log.failure("a request from {sender} failed", sender=command.sender)
                answer = {"error": {"status": 500, "message": f"failed: {e}"}}
        try:
            await self.board.answer_command(
                command.id, json.dumps(answer), self.clock.seconds()
            )
        except Exception:
            log.failure(
                "the answer to a request from {sender} could not be posted",
                sender=command.sender,
            )

    # -- asking others ---------------------------------------------------------------

    async def members(self) -> tuple[MemberStatus, ...]:
        """
        The instances of the cluster (this one first), each with whether
        it can be asked now.
        """
        now = self.clock.seconds()
        out = [MemberStatus(self.instance, True, True, now)]
        for member in await self.board.members():
            if member.name == self.instance or now - member.seen_at > FORGET_AFTER:
                continue
            why = None
            if member.stopped_at is not None:
                why = f"stopped {_ago(now - member.stopped_at)}"
            elif now - member.seen_at > SILENT_AFTER:
                why = f"not seen for {_ago(now - member.seen_at, '')}; down?"
            out.append(
                MemberStatus(member.name, False, why is None, member.seen_at, why)
            )
        return tuple(out)

    async def ask(self, instance: str, request: dict[str, Any]) -> dict[str, Any]:
        """
        Have C{instance} carry out C{request}; its answer.

        @raise OperationError: the other instance's own refusal (its
            status); 404 an instance the cluster does not know; 503 when it
            is down or did not take the request in time (then nothing was
            done); 504 when it took it but did not answer in time (then it
            may still be done).
        """
        status = {m.name: m for m in await self.members()}.get(instance)
        if status is None:
            raise OperationError(404, f"no instance {instance!r} in this cluster")
        if not status.alive:
            raise OperationError(
                503, f"instance {instance} cannot be asked: {status.why}"
            )
        posted_at = self.clock.seconds()
        command_id = await self.board.post_command(
            instance, self.instance, json.dumps(request), posted_at
        )
        command = await self._answered(command_id, posted_at, instance)
        assert command.answer is not None
        try:
            answer = json.loads(command.answer)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise OperationError(502, f"instance {instance} sent a malformed answer")
        error = answer.get("error")
        if isinstance(error, dict):
            raise OperationError(
                int(error.get("status", 502)), f"{instance}: {error.get('message')}"
            )
        result = answer.get("result")
        if not isinstance(result, dict):
            raise OperationError(502, f"instance {instance} sent a malformed answer")
        return result

    async def _answered(
        self, command_id: int, posted_at: float, instance: str
    ) -> Command:
        while True:
            await deferLater(self.clock, ANSWER_POLL, lambda: None)
            command = await self.board.get_command(command_id)
            if command.state == ANSWERED:
                return command
            waited = self.clock.seconds() - posted_at
            if command.state == PENDING and waited >= self.take_within:
                if await self.board.withdraw_command(command_id):
                    raise OperationError(
                        503,
                        f"instance {instance} did not take the request within "
                        f"{self.take_within:g}s (is it running?); nothing was done",
                    )
            elif waited >= self.take_within + self.answer_within:
                raise OperationError(
                    504,
                    f"instance {instance} took the request but did not answer "
                    f"within {self.answer_within:g}s; it may still be done",
                )


def _ago(seconds: float, suffix: str = " ago") -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s{suffix}"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min{suffix}"
    return f"{seconds / 3600:.1f} h{suffix}"
