# -*- test-case-name: tests.test_e2e_admin -*-
"""
L{IOperations} for the running gateway: the queue, quarantine release,
rescan and forward, configuration reload and readiness.

Released, rescanned and forwarded originals go through the spool like any
other message, so they are as durable as received mail and retried the
same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mdgateway.message.headers import format_field
from mdgateway.ops.interfaces import (
    IOperations,
    OperationError,
    QueueEntry,
    QueueRecipient,
    Readiness,
)
from mdgateway.queue.entry import SpoolEntry
from mdgateway.queue.envelope import Envelope, Recipient
from mdgateway.queue.manager import GENERATED_RELEASE, QueueManager, copy_file_into
from mdgateway.queue.spool import Spool
from mdgateway.smtp.parse import ParseError, parse_mailbox
from mdgateway.store.interfaces import IStore, NotFoundError, QuarantineItem

log = Logger()


@implementer(IOperations)
class GatewayOperations:
    """
    The operator's view of one gateway instance.

    @param policy: the configuration's policy now in force.
    @param checks: readiness checks by name.
    """

    def __init__(
        self,
        *,
        reactor: Any,
        spool: Spool,
        pipeline: QueueManager,
        store: IStore,
        metrics: Any,
        policy: Callable[[], Any],
        reload: Callable[[], tuple[bool, list[str]]],
        checks: Callable[[], Any],
        worker_spools: Callable[[], list[tuple[int, str]]] = list,
        dependencies: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.reactor = reactor
        self.spool = spool
        self.pipeline = pipeline
        self.store = store
        self.metrics = metrics
        self._policy = policy
        self._reload = reload
        self._checks = checks
        self._worker_spools = worker_spools
        self._dependencies = dependencies

    # -- the queue -------------------------------------------------------------

    def queue(self) -> Deferred[list[QueueEntry]]:
        return Deferred.fromCoroutine(self._queue())

    async def _queue(self) -> list[QueueEntry]:
        out = []
        for entry in await self.spool.list_entries():
            state = await self.spool.read_state(entry) or {}
            out.append(
                _queue_entry(entry, state, self.pipeline.next_attempt(entry.queue_id))
            )
        # With [processes] workers, each worker's spool is read (never
        # changed) from here; its own process schedules its retries.
        for worker, root in self._worker_spools():
            for entry, held in await self.spool.list_root(root):
                out.append(_queue_entry(entry, held or {}, None, worker))
        out.sort(key=lambda e: e.received_at)
        return out

    def retry_now(self, queue_id: str) -> Deferred[None]:
        if not self.pipeline.retry_now(queue_id):
            raise OperationError(
                404,
                f"no queued message {queue_id} in this process's spool "
                "(a worker process retries its own messages)",
            )
        log.info("retry now requested for {message_id}", message_id=queue_id)
        return Deferred.fromCoroutine(nothing())

    # -- quarantine ------------------------------------------------------------

    def release(self, item_id: str, by: str) -> Deferred[str]:
        return Deferred.fromCoroutine(self._requeue(item_id, by, "release", None))

    def rescan(self, item_id: str, by: str) -> Deferred[str]:
        return Deferred.fromCoroutine(self._requeue(item_id, by, "rescan", None))

    def forward(self, item_id: str, addresses: list[str], by: str) -> Deferred[str]:
        for address in addresses:
            try:
                parse_mailbox(address, utf8=True)
            except ParseError:
                raise OperationError(400, f"not an address: {address!r}") from None
        if not addresses:
            raise OperationError(400, "no addresses to forward to")
        return Deferred.fromCoroutine(self._requeue(item_id, by, "forward", addresses))

    async def _item(self, item_id: str) -> QuarantineItem:
        try:
            return await self.store.get_quarantined(item_id)
        except NotFoundError:
            raise OperationError(404, f"no quarantined message {item_id}") from None

    async def _requeue(
        self, item_id: str, by: str, how: str, addresses: list[str] | None
    ) -> str:
        """
        Put a quarantined original back into the spool: as it was
        (release, forward: delivered unscanned, marked as the original
        copy) or to be processed again (rescan) under its first rule,
        even if that rule is disabled since.
        """
        item = await self._item(item_id)
        summary = item.message
        if summary.rule is None or self._policy().rule_named(summary.rule) is None:
            raise OperationError(
                409, f"the rule {summary.rule!r} of {item_id} no longer exists"
            )
        recipients = tuple(addresses) if addresses else summary.recipients
        writer = self.spool.open_writer()
        path = os.path.join(self.spool.root, "work", f"{writer.queue_id}.original")
        try:
            await self.store.read_quarantined(item_id, path)
            if how != "rescan":
                writer.write(
                    format_field("X-Metadefender-EmailSecurity-OriginalCopy", "True")
                )
            await copy_file_into(writer, path)
            extra: dict[str, Any] = {"about": summary.queue_id, how: item_id}
            if how != "rescan":
                extra["generated"] = GENERATED_RELEASE
            entry = await writer.commit(
                Envelope(
                    queue_id=writer.queue_id,
                    received_at=self.reactor.seconds(),
                    sender=summary.sender,
                    recipients=tuple(
                        Recipient(r, {}, summary.rule, summary.direction)
                        for r in recipients
                    ),
                    client_address=summary.client_address,
                    client_helo=summary.helo,
                    extra=extra,
                )
            )
        except BaseException:
            await writer.abort()
            raise
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if how == "release":
            await self.store.mark_released(item_id, by)
        else:
            await self.store.add_event(summary.id, f"{how} by {by} as {entry.queue_id}")
        log.info(
            "quarantined {item_id}: {how} by {by}, queued as {message_id}",
            item_id=item_id,
            how=how,
            by=by,
            message_id=entry.queue_id,
        )
        self.pipeline.submit(entry)
        return entry.queue_id

    # -- configuration and health ----------------------------------------------

    def reload(self) -> tuple[bool, list[str]]:
        return self._reload()

    def readiness(self) -> Deferred[Readiness]:
        return Deferred.fromCoroutine(self._readiness())

    async def _readiness(self) -> Readiness:
        checks = self._checks()
        if isinstance(checks, Deferred) or hasattr(checks, "__await__"):
            checks = await checks
        reasons = tuple(name for name, ok in checks.items() if not ok)
        return Readiness(not reasons, checks, reasons, self._dependencies())


def _reply(record: dict[str, Any]) -> str:
    if not record.get("code"):
        return str(record.get("text", ""))
    parts = (record.get("code"), record.get("enhanced", ""), record.get("text", ""))
    return " ".join(str(p) for p in parts if p)


def _queue_entry(
    entry: SpoolEntry,
    state: dict[str, Any],
    next_attempt: float | None,
    worker: int = 0,
) -> QueueEntry:
    """
    The queue view of one spooled message and its delivery state.
    """
    records = state.get("recipients", {})
    recipients = tuple(
        QueueRecipient(
            r.address,
            records.get(r.address, {}).get("status", "pending"),
            r.rule,
            _reply(records.get(r.address, {})),
        )
        for r in entry.envelope.recipients
    )
    errors = [
        q.last_reply for q in recipients if q.status == "pending" and q.last_reply
    ]
    return QueueEntry(
        queue_id=entry.queue_id,
        received_at=entry.envelope.received_at,
        sender=entry.envelope.sender,
        size=entry.size,
        recipients=recipients,
        attempts=int(state.get("attempts", 0)),
        next_attempt=next_attempt,
        last_error=errors[-1] if errors else "",
        generated=entry.envelope.extra.get("generated"),
        worker=worker,
    )


async def nothing() -> None:
    return None
