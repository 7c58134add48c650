# -*- test-case-name: tests.test_queue_ops -*-
"""
The queue tools across processes and instances: listings of every spool
with its instance named, the content view of a queued message, and hold,
release, delete, bounce, retry and flush wherever the message is.

A message is in exactly one spool: that of the process that accepted it
(the primary, or worker I{k} of C{[processes] workers}), on the instance
that accepted it. Only that process's queue manager may change it, so:

 - in this instance's primary, the action runs here (L{QueueTools});
 - in a worker, it is sent to that worker over its pipes
   (L{mdgateway.run.control}); listing and reading its spool needs no
   one's help (its files are renamed into place whole);
 - on another instance, it is sent there through the shared store
   (L{mdgateway.ops.cluster}), whose primary routes it the same way.

Every action is audited (in the shared store) by the instance the
operator asked, with the operator's name, whether it was done, refused or
failed.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mdgateway.fileops import OSFileOps
from mdgateway.message.view import inspect_message
from mdgateway.ops.cluster import ClusterLink
from mdgateway.ops.interfaces import (
    QUEUE_ACTIONS,
    FlushResult,
    InstanceQueue,
    OperationError,
    QueueAction,
    QueueActionResult,
    QueuedMessage,
    QueuedPart,
    QueueEntry,
    QueueListing,
    QueueRecipient,
)
from mdgateway.ops.queuewire import (
    WireFormatError,
    entry_from_json,
    entry_json,
    message_from_json,
    message_json,
    result_from_json,
    result_json,
)
from mdgateway.queue.entry import SpoolEntry, SpoolPaths
from mdgateway.queue.envelope import EnvelopeFormatError
from mdgateway.queue.ids import is_queue_id
from mdgateway.queue.jobs import job_read_entry
from mdgateway.queue.manager import QueueManager
from mdgateway.queue.spool import Spool
from mdgateway.queue.tools import FLUSH, QueueTools, ToolAnswer, ToolRequest
from mdgateway.store.audit import DONE, FAILED, REFUSED, AuditEntry
from mdgateway.store.interfaces import IStore, MessageFilter, PageRequest, StoreError

log = Logger()

#: Sends a request to worker I{k} and fires with its answer (see
#: L{mdgateway.run.supervisor.Supervisor.ask}).
AskWorker = Callable[[int, dict[str, Any]], Awaitable[dict[str, Any]]]

#: Most entries of another instance one listing shows.
REMOTE_LISTING = 1000

#: The audit's name for each queue action (a quarantine item has its own
#: "delete").
AUDIT_NAMES = {
    "hold": "hold",
    "release-hold": "release-hold",
    "delete": "delete-queued",
    "bounce": "bounce",
    "retry": "retry",
}


def gone(queue_id: str, where: str) -> OperationError:
    return OperationError(
        409,
        f"{queue_id} is not in the queue {where} (any more): delivered, bounced "
        "or deleted meanwhile, or never queued there",
    )


def _recipients(entry: SpoolEntry, state: dict[str, Any]) -> tuple[QueueRecipient, ...]:
    records = state.get("recipients", {})
    if not isinstance(records, dict):
        records = {}
    return tuple(
        QueueRecipient(
            r.address,
            str(records.get(r.address, {}).get("status", "pending")),
            r.rule,
            _reply(records.get(r.address, {})),
        )
        for r in entry.envelope.recipients
    )


def _reply(record: dict[str, Any]) -> str:
    if not record.get("code"):
        return str(record.get("text", ""))
    parts = (record.get("code"), record.get("enhanced", ""), record.get("text", ""))
    return " ".join(str(p) for p in parts if p)


def queue_entry(
    entry: SpoolEntry,
    state: dict[str, Any],
    next_attempt: float | None,
    worker: int = 0,
    instance: str = "",
) -> QueueEntry:
    """
    The queue view of one spooled message and its delivery state.
    """
    recipients = _recipients(entry, state)
    errors = [
        q.last_reply for q in recipients if q.status == "pending" and q.last_reply
    ]
    held_by = state.get("held_by")
    held_at = state.get("held_at")
    attempts = state.get("attempts", 0)
    if next_attempt is None and not held_by:
        wanted = state.get("next_attempt_at")
        next_attempt = float(wanted) if isinstance(wanted, int | float) else None
    return QueueEntry(
        queue_id=entry.queue_id,
        received_at=entry.envelope.received_at,
        sender=entry.envelope.sender,
        size=entry.size,
        recipients=recipients,
        attempts=attempts if type(attempts) is int else 0,
        next_attempt=None if held_by else next_attempt,
        last_error=errors[-1] if errors else "",
        generated=entry.envelope.extra.get("generated"),
        worker=worker,
        instance=instance,
        held_by=held_by if isinstance(held_by, str) else None,
        held_at=float(held_at) if isinstance(held_at, int | float) else None,
    )


def _read_queued(
    root: str, queue_id: str
) -> tuple[SpoolEntry, dict[str, Any], Any] | None:
    """
    One entry of the spool C{root}, its state and its content (blocking).
    """
    try:
        found = job_read_entry(OSFileOps(), SpoolPaths.under(root), queue_id)
        if found is None:
            return None
        entry, state = found
        return entry, state or {}, inspect_message(entry.message_path)
    except FileNotFoundError:
        return None  # removed while it was read


class QueueOperations:
    """
    The queue tools of one instance, and its way to the others.

    @param instance: this instance's name, read at each use.
    @param worker_spools: the worker processes' spool roots, by index.
    @param ask_worker: sends a request to a worker (L{None}: no workers).
    @param cluster: the way to other instances (L{None}: none).
    @param threadpool: runs the blocking reads of spool files.
    """

    def __init__(
        self,
        *,
        reactor: Any,
        threadpool: ThreadPool,
        spool: Spool,
        manager: QueueManager,
        store: IStore,
        instance: Callable[[], str],
        worker_spools: Callable[[], list[tuple[int, str]]] = list,
        ask_worker: AskWorker | None = None,
        cluster: ClusterLink | None = None,
    ) -> None:
        self.reactor = reactor
        self.threadpool = threadpool
        self.spool = spool
        self.manager = manager
        self.tools = QueueTools(manager, reactor)
        self.store = store
        self.instance = instance
        self.worker_spools = worker_spools
        self.ask_worker = ask_worker
        self.cluster = cluster

    def _thread(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.threadpool, function, *args)

    # -- listings ----------------------------------------------------------------

    async def local(self) -> list[QueueEntry]:
        """
        This instance's queue: the primary's spool and each worker's.
        """
        here = self.instance()
        out = []
        for entry in await self.spool.list_entries():
            state = await self.spool.read_state(entry) or {}
            out.append(
                queue_entry(
                    entry, state, self.manager.next_attempt(entry.queue_id), 0, here
                )
            )
        # Each worker's spool is read (never changed) from here; its own
        # process schedules its retries.
        for worker, root in self.worker_spools():
            for entry, held in await self.spool.list_root(root):
                out.append(queue_entry(entry, held or {}, None, worker, here))
        out.sort(key=lambda e: e.received_at)
        return out

    async def listing(self, instance: str | None = None) -> QueueListing:
        """
        The queue of every instance, or of C{instance}.
        """
        here = self.instance()
        entries: list[QueueEntry] = []
        parts: list[InstanceQueue] = []
        if instance in (None, here):
            mine = await self.local()
            entries.extend(mine)
            parts.append(InstanceQueue(here, True, len(mine), len(mine)))
        if instance != here and self.cluster is not None:
            members = [m for m in await self.cluster.members() if not m.this]
            if instance is not None:
                members = [m for m in members if m.name == instance]
            asked = [
                Deferred.fromCoroutine(self._remote_listing(m.name))
                for m in members
                if m.alive
            ]
            for result in await gatherResults(asked):
                listed, part = result
                entries.extend(listed)
                parts.append(part)
            parts.extend(
                InstanceQueue(m.name, False, problem=m.why)
                for m in members
                if not m.alive
            )
        if instance is not None and not parts:
            raise OperationError(404, f"no instance {instance!r} in this cluster")
        entries.sort(key=lambda e: e.received_at)
        return QueueListing(tuple(entries), tuple(parts))

    async def _remote_listing(
        self, name: str
    ) -> tuple[list[QueueEntry], InstanceQueue]:
        assert self.cluster is not None
        try:
            answer = await self.cluster.ask(
                name, {"op": "list", "limit": REMOTE_LISTING}
            )
            listed = [entry_from_json(e) for e in answer.get("entries", ())]
            total = answer.get("total", len(listed))
        except (OperationError, WireFormatError, StoreError) as e:
            why = e.message if isinstance(e, OperationError) else str(e)
            return [], InstanceQueue(name, False, problem=why)
        return listed, InstanceQueue(name, False, len(listed), int(total))

    # -- the content view ------------------------------------------------------------

    async def content(
        self, queue_id: str, instance: str | None = None
    ) -> QueuedMessage:
        _check_id(queue_id)
        here = self.instance()
        if instance not in (None, here):
            return await self._remote_content(instance, queue_id)
        for worker, root in [(0, self.spool.root), *self.worker_spools()]:
            try:
                found = await self._thread(_read_queued, root, queue_id)
            except EnvelopeFormatError as e:
                raise OperationError(
                    409, f"{queue_id}: its envelope is unreadable ({e})"
                ) from None
            if found is None:
                continue
            entry, state, view = found
            next_attempt = self.manager.next_attempt(queue_id) if worker == 0 else None
            return QueuedMessage(
                entry=queue_entry(entry, state, next_attempt, worker, here),
                client_address=entry.envelope.client_address,
                client_helo=entry.envelope.client_helo,
                headers=view.headers,
                headers_complete=view.headers_complete,
                parts=tuple(QueuedPart(**_fields(p)) for p in view.parts),
                unreliable=view.unreliable,
            )
        other = await self._received_by(queue_id) if instance is None else None
        if other is not None:
            return await self._remote_content(other, queue_id)
        raise gone(queue_id, f"of {here}")

    async def _remote_content(self, instance: str, queue_id: str) -> QueuedMessage:
        answer = await self._ask(instance, {"op": "show", "queue_id": queue_id})
        try:
            return message_from_json(answer.get("message"))
        except WireFormatError as e:
            raise OperationError(502, f"{instance}: {e}") from None

    # -- actions -------------------------------------------------------------------

    async def action(self, action: QueueAction) -> QueueActionResult:
        """
        Carry out C{action} wherever the message is, and audit it.
        """
        if action.action not in QUEUE_ACTIONS:
            raise OperationError(400, f"unknown queue action {action.action!r}")
        name = AUDIT_NAMES[action.action]
        try:
            _check_id(action.queue_id)
            result = await self.route(action)
        except OperationError as e:
            result_word = REFUSED if e.status in (400, 404, 409) else FAILED
            await self._audit(
                action.by, name, action.queue_id, result_word, e.message, action.origin
            )
            raise
        where = f"on {result.instance}" + (
            f", worker {result.process}" if result.process else ""
        )
        await self._audit(
            action.by,
            name,
            action.queue_id,
            DONE,
            f"{result.detail} ({where})",
            action.origin,
        )
        return result

    async def route(self, action: QueueAction) -> QueueActionResult:
        """
        Carry out C{action} in the process (of the instance) that holds the
        message; not audited (L{action} is).
        """
        here = self.instance()
        if action.instance not in (None, here):
            return await self._remote_action(action.instance, action)
        process = await self._process_of(action.queue_id)
        if process is None:
            other = (
                await self._received_by(action.queue_id)
                if action.instance is None
                else None
            )
            if other is not None:
                return await self._remote_action(other, action)
            raise gone(action.queue_id, f"of {here}")
        request = ToolRequest(action.action, action.queue_id, action.by, action.bounce)
        answer = await self._run_in(process, request)
        if answer.gone:
            raise gone(action.queue_id, f"of {here}")
        if answer.refused is not None:
            raise OperationError(409, answer.refused)
        return QueueActionResult(
            queue_id=action.queue_id,
            action=action.action,
            instance=here,
            process=process,
            changed=answer.changed,
            detail=answer.detail,
            later=answer.later,
        )

    async def _remote_action(
        self, instance: str, action: QueueAction
    ) -> QueueActionResult:
        request = {
            "op": "action",
            "action": action.action,
            "queue_id": action.queue_id,
            "by": action.by,
            "bounce": action.bounce,
        }
        answer = await self._ask(instance, request)
        try:
            return result_from_json(answer.get("result"))
        except WireFormatError as e:
            raise OperationError(502, f"{instance}: {e}") from None

    async def flush(
        self, by: str, instance: str | None = None, origin: str = ""
    ) -> FlushResult:
        """
        Try everything now (not what is on hold), on every instance or on
        C{instance}; audited.
        """
        here = self.instance()
        tried: dict[str, int] = {}
        problems: dict[str, str] = {}
        if instance in (None, here):
            tried[here] = await self.flush_here(by)
        if instance != here and self.cluster is not None:
            members = [m for m in await self.cluster.members() if not m.this]
            if instance is not None:
                members = [m for m in members if m.name == instance]
                if not members:
                    raise OperationError(
                        404, f"no instance {instance!r} in this cluster"
                    )
            for member in members:
                if not member.alive:
                    problems[member.name] = member.why or "down"
                    continue
                try:
                    answer = await self._ask(member.name, {"op": "flush", "by": by})
                    tried[member.name] = int(answer.get("tried", 0))
                except OperationError as e:
                    problems[member.name] = e.message
        elif instance not in (None, here):
            raise OperationError(404, f"no instance {instance!r} in this cluster")
        detail = ", ".join(f"{n} tried now on {i}" for i, n in tried.items())
        if problems:
            detail += "; not asked: " + ", ".join(
                f"{i} ({w})" for i, w in problems.items()
            )
        await self._audit(
            by, "flush", instance or "all instances", DONE, detail, origin
        )
        return FlushResult(tried, problems)

    async def flush_here(self, by: str) -> int:
        """
        Flush this instance's processes; how many messages are tried now.
        """
        request = ToolRequest(FLUSH, by=by)
        total = (await self.tools.run(request)).count
        for worker, _ in self.worker_spools():
            try:
                total += (await self._run_in(worker, request)).count
            except OperationError as e:
                log.warn(
                    "flush: worker {worker} not flushed: {why}",
                    worker=worker,
                    why=e.message,
                )
        return total

    # -- requests from other instances ------------------------------------------------

    async def serve(self, request: dict[str, Any]) -> dict[str, Any]:
        """
        Carry out a request another instance posted for this one (see
        L{ClusterLink}); only this instance's processes are looked at.
        """
        op = request.get("op")
        here = self.instance()
        if op == "list":
            limit = request.get("limit", REMOTE_LISTING)
            entries = await self.local()
            shown = entries[
                : limit if type(limit) is int and limit >= 0 else REMOTE_LISTING
            ]
            return {"entries": [entry_json(e) for e in shown], "total": len(entries)}
        if op == "show":
            queue_id = request.get("queue_id")
            if not isinstance(queue_id, str):
                raise OperationError(400, "show needs a queue id")
            return {"message": message_json(await self.content(queue_id, here))}
        if op == "flush":
            by = request.get("by")
            return {"tried": await self.flush_here(by if isinstance(by, str) else "")}
        if op == "action":
            try:
                action = QueueAction(
                    action=str(request["action"]),
                    queue_id=str(request["queue_id"]),
                    by=str(request.get("by", "")),
                    instance=here,
                    bounce=request.get("bounce") is True,
                )
            except KeyError as e:
                raise OperationError(400, f"an action request lacks {e}") from None
            if action.action not in QUEUE_ACTIONS:
                raise OperationError(400, f"unknown queue action {action.action!r}")
            _check_id(action.queue_id)
            return {"result": result_json(await self.route(action))}
        raise OperationError(400, f"unknown request {op!r}")

    # -- finding the message -------------------------------------------------------

    async def _process_of(self, queue_id: str) -> int | None:
        """
        The process of this instance whose spool holds C{queue_id}.
        """
        if self.manager.entry(queue_id) is not None:
            return 0
        for worker, root in self.worker_spools():
            path = os.path.join(root, "queue", f"{queue_id}.json")
            if await self._thread(os.path.exists, path):
                return worker
        return None

    async def _received_by(self, queue_id: str) -> str | None:
        """
        The other instance the shared history says received C{queue_id}.
        """
        if self.cluster is None:
            return None
        try:
            page = await self.store.search_messages(
                MessageFilter(queue_id=queue_id), PageRequest(limit=5)
            )
        except StoreError:
            return None
        here = self.instance()
        for summary in page.items:
            if summary.instance and summary.instance != here:
                return str(summary.instance)
        return None

    async def _run_in(self, process: int, request: ToolRequest) -> ToolAnswer:
        if process == 0:
            return await self.tools.run(request)
        if self.ask_worker is None:
            raise OperationError(503, f"worker {process} cannot be asked")
        try:
            answer = await self.ask_worker(process, {"queue": request.to_json()})
            return ToolAnswer.from_json(answer)
        except OperationError:
            raise
        except Exception as e:
            raise OperationError(503, f"worker {process}: {e}") from None

    async def _ask(self, instance: str, request: dict[str, Any]) -> dict[str, Any]:
        if self.cluster is None:
            raise OperationError(
                404, f"no instance {instance!r}: this gateway is not in a cluster"
            )
        try:
            return await self.cluster.ask(instance, request)
        except StoreError as e:
            raise OperationError(
                503, f"the shared store cannot be reached: {e}"
            ) from None

    async def _audit(
        self, by: str, action: str, target: str, result: str, detail: str, origin: str
    ) -> None:
        now = self.reactor.seconds()
        entry = AuditEntry(
            at=now,
            actor=by,
            action=action,
            target=target,
            result=result,
            detail=f"{detail}; from {origin}" if origin else detail,
            finished_at=now,
        )
        try:
            await self.store.record_audit(entry)
        except StoreError:
            log.failure("could not record the audit of {action}", action=action)


def _check_id(queue_id: str) -> None:
    if not is_queue_id(queue_id):
        raise OperationError(400, f"not a queue id: {queue_id!r}")


def _fields(part: Any) -> dict[str, Any]:
    return {
        name: getattr(part, name)
        for name in (
            "part_id",
            "depth",
            "content_type",
            "filename",
            "disposition",
            "charset",
            "transfer_encoding",
            "size",
            "preview",
            "truncated",
        )
    }
