# -*- test-case-name: tests.test_queue_tools -*-
"""
The queue tools of one process: what an operator asks of the messages its
queue manager holds (hold, release the hold, delete silently or with a
bounce, bounce now, retry now, flush).

Requests and answers are plain values with a JSON form, because they
travel: from the primary to the worker process whose spool holds the
message (L{mdgateway.run.supervisor}), and from one instance of a cluster
to another (L{mdgateway.ops.cluster}). Each process answers only for its
own queue manager; finding the process is the caller's job.

Every change goes through L{QueueManager.change}, so it lands in the saved
delivery state (a hold survives a restart) and never races an attempt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mdgateway.queue.entry import SpoolEntry
from mdgateway.queue.manager import EntryGoneError, QueueManager
from mdgateway.queue.planner import (
    NotApplicableError,
    cancelled,
    held,
    unheld,
)
from mdgateway.queue.state import DeliveryState
from mdgateway.store.interfaces import MessageStatus, copy_id

log = Logger()

_T = TypeVar("_T")

HOLD = "hold"
RELEASE_HOLD = "release-hold"
DELETE = "delete"
BOUNCE = "bounce"
RETRY = "retry"
FLUSH = "flush"
#: Every action a process carries out (flush needs no queue id).
ACTIONS = (HOLD, RELEASE_HOLD, DELETE, BOUNCE, RETRY, FLUSH)

#: What a deleted or bounced recipient's record (and so the DSN) says.
DELETED_TEXT = "deleted from the queue by the gateway's administrator"
BOUNCED_TEXT = "returned to the sender by the gateway's administrator"

#: Seconds an answer waits for a change to apply; longer (the entry is
#: being attempted) and the answer says it applies when the attempt ends.
PATIENCE = 10.0


class ToolFormatError(ValueError):
    """
    A request or answer that is not one.
    """


@attrs.frozen
class ToolRequest:
    """
    One operator's request to one process.

    @ivar bounce: for a delete, send the sender a bounce.
    """

    action: str
    queue_id: str = ""
    by: str = ""
    bounce: bool = False

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> ToolRequest:
        if not isinstance(data, Mapping):
            raise ToolFormatError("a queue tool request is not an object")
        action = data.get("action")
        if action not in ACTIONS:
            raise ToolFormatError(f"unknown queue action {action!r}")
        queue_id, by = data.get("queue_id", ""), data.get("by", "")
        bounce = data.get("bounce", False)
        if not (isinstance(queue_id, str) and isinstance(by, str)):
            raise ToolFormatError("queue_id and by must be text")
        if not isinstance(bounce, bool):
            raise ToolFormatError("bounce must be true or false")
        if action != FLUSH and not queue_id:
            raise ToolFormatError(f"{action} needs a queue id")
        return cls(action, queue_id, by, bounce)


@attrs.frozen
class ToolAnswer:
    """
    What one process did.

    @ivar changed: something changed (C{False}: it was so already).
    @ivar detail: what happened, in words, for the operator and the audit.
    @ivar refused: why the action does not apply to the message as it is
        now (nothing was changed), or L{None}.
    @ivar gone: the message is not in this process's queue (any more).
    @ivar later: accepted, but the message is being attempted: the change
        applies when that attempt ends.
    @ivar count: for a flush, how many messages are tried now.
    """

    changed: bool
    detail: str
    refused: str | None = None
    gone: bool = False
    later: bool = False
    count: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> ToolAnswer:
        if not isinstance(data, Mapping):
            raise ToolFormatError("a queue tool answer is not an object")
        try:
            answer = cls(
                changed=data["changed"],
                detail=data["detail"],
                refused=data.get("refused"),
                gone=data.get("gone", False),
                later=data.get("later", False),
                count=data.get("count", 0),
            )
        except KeyError as e:
            raise ToolFormatError(f"a queue tool answer lacks {e}") from None
        types = (
            (answer.changed, bool),
            (answer.detail, str),
            (answer.gone, bool),
            (answer.later, bool),
            (answer.count, int),
        )
        if not all(isinstance(v, t) for v, t in types) or not (
            answer.refused is None or isinstance(answer.refused, str)
        ):
            raise ToolFormatError("a queue tool answer has a field of the wrong type")
        return answer


def gone(queue_id: str) -> ToolAnswer:
    return ToolAnswer(
        False,
        f"{queue_id} is not in the queue (any more): delivered, bounced or "
        "deleted meanwhile, or never queued here",
        gone=True,
    )


class QueueTools:
    """
    Carries out L{ToolRequest}s on one process's queue manager.

    @param patience: seconds an answer waits for a change to apply.
    """

    def __init__(
        self,
        manager: QueueManager,
        clock: IReactorTime,
        patience: float = PATIENCE,
    ) -> None:
        self.manager = manager
        self.clock = clock
        self.patience = patience

    async def run(self, request: ToolRequest) -> ToolAnswer:
        manager = self.manager
        if request.action == FLUSH:
            count = manager.flush()
            log.info(
                "queue flushed by {by}: {count} message(s) tried now",
                by=request.by,
                count=count,
            )
            return ToolAnswer(count > 0, f"{count} message(s) tried now", count=count)
        queue_id = request.queue_id
        entry = manager.entry(queue_id)
        if entry is None:
            return gone(queue_id)
        if request.action == RETRY:
            return self._retry(request)
        return await self._change(entry, request)

    def _retry(self, request: ToolRequest) -> ToolAnswer:
        manager, queue_id = self.manager, request.queue_id
        holder = manager.held_by(queue_id)
        if holder is not None:
            return ToolAnswer(
                False,
                "",
                refused=f"{queue_id} is on hold (by {holder}): release the hold "
                "to try it",
            )
        if manager.attempting(queue_id):
            return ToolAnswer(False, f"{queue_id} is being tried right now")
        if not manager.retry_now(queue_id):
            return gone(queue_id)
        log.info(
            "retry now of {message_id} by {by}", message_id=queue_id, by=request.by
        )
        return ToolAnswer(True, f"{queue_id} is tried now")

    async def _change(self, entry: SpoolEntry, request: ToolRequest) -> ToolAnswer:
        by, action = request.by, request.action
        seen: list[DeliveryState] = []

        def change(state: DeliveryState, now: float) -> DeliveryState:
            seen.append(state)
            if action == HOLD:
                return held(state, by, now)
            if action == RELEASE_HOLD:
                return unheld(state, now)
            if action == BOUNCE:
                return cancelled(state, now, BOUNCED_TEXT, True)
            if request.bounce:
                try:
                    return cancelled(state, now, DELETED_TEXT, True)
                except NotApplicableError:
                    raise NotApplicableError(
                        "nothing is left to deliver, so nothing to bounce; "
                        "delete it without a bounce"
                    ) from None
            return cancelled(state, now, DELETED_TEXT, False)

        changed = self.manager.change(entry.queue_id, change)

        async def settled() -> ToolAnswer:
            return await self._changed(entry, request, seen, await changed)

        try:
            answer = await _first(
                Deferred.fromCoroutine(settled()), self.clock, self.patience
            )
        except EntryGoneError:
            return gone(entry.queue_id)
        except NotApplicableError as e:
            return ToolAnswer(False, "", refused=f"{entry.queue_id}: {e}")
        if answer is None:
            return ToolAnswer(
                True,
                f"{entry.queue_id} is being tried right now; the {action} applies "
                "when that attempt ends",
                later=True,
            )
        return answer

    async def _changed(
        self,
        entry: SpoolEntry,
        request: ToolRequest,
        seen: list[DeliveryState],
        after: DeliveryState,
    ) -> ToolAnswer:
        """
        Say what the change did, in the log and in the message's history.
        """
        before = seen[-1]
        queue_id, by = entry.queue_id, request.by
        pending = len(before.pending)
        if request.action == HOLD:
            if before.held_by is not None:
                return ToolAnswer(
                    False, f"{queue_id} was on hold already (by {before.held_by})"
                )
            answer = ToolAnswer(True, f"{queue_id} is on hold (by {by})")
            status, text = MessageStatus.DEFERRED, f"held by {by}"
        elif request.action == RELEASE_HOLD:
            if before.held_by is None:
                return ToolAnswer(False, f"{queue_id} was not on hold")
            answer = ToolAnswer(True, f"{queue_id}: hold released by {by}; tried now")
            status, text = MessageStatus.DEFERRED, f"hold released by {by}"
        elif request.action == BOUNCE or request.bounce:
            what = "bounced" if request.action == BOUNCE else "deleted"
            answer = ToolAnswer(
                True,
                f"{queue_id} {what} by {by}: the sender gets a bounce for "
                f"{pending} recipient(s)",
            )
            status, text = MessageStatus.BOUNCED, f"{what} by {by}, sender notified"
        else:
            undelivered = f"{pending} recipient(s) undelivered"
            answer = ToolAnswer(
                True, f"{queue_id} deleted by {by} ({undelivered}, no bounce)"
            )
            status, text = MessageStatus.FAILED, f"deleted by {by}, no bounce"
        log.info("{message_id}: {detail}", message_id=queue_id, detail=answer.detail)
        await self._history(entry, before, status, text)
        return answer

    async def _history(
        self,
        entry: SpoolEntry,
        before: DeliveryState,
        status: MessageStatus,
        text: str,
    ) -> None:
        """
        Put the change in the history of each copy with pending
        recipients (copies never attempted have no history yet).
        """
        if not before.attempts:
            return
        pending = set(before.pending)
        names = list(dict.fromkeys(r.rule or "" for r in entry.envelope.recipients))
        copies = {
            copy_id(entry.queue_id, names.index(r.rule or "") + 1)
            for r in entry.envelope.recipients
            if r.address in pending
        }
        for security_id in sorted(copies):
            try:
                await self.manager.history.status(entry, security_id, status, text)
            except Exception:
                log.failure(
                    "{message_id}: the history of an operator's change was not "
                    "recorded",
                    message_id=security_id,
                )


def _first(d: Deferred[_T], clock: IReactorTime, seconds: float) -> Deferred[_T | None]:
    """
    C{d}'s result if it comes within C{seconds}, else L{None} then (C{d}
    goes on; a failure after that is logged).
    """
    out: Deferred[_T | None] = Deferred()

    def timeout() -> None:
        if not out.called:
            out.callback(None)

    timer = clock.callLater(seconds, timeout)

    def settled(result: object) -> None:
        if timer.active():
            timer.cancel()
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)  # type: ignore[arg-type]
        elif isinstance(result, Failure) and not result.check(
            EntryGoneError, NotApplicableError
        ):
            log.failure("an operator's change failed after its answer", result)

    d.addBoth(settled)
    return out
