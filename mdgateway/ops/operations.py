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
from typing import Any, NoReturn

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mdgateway.message.headers import format_field
from mdgateway.ops.cluster import ClusterLink
from mdgateway.ops.configview import ConfigurationView
from mdgateway.ops.interfaces import (
    ActionResult,
    FlushResult,
    IOperations,
    OperationError,
    QueueAction,
    QueueActionResult,
    QueuedMessage,
    QueueEntry,
    QueueListing,
    Readiness,
    ReloadResult,
)
from mdgateway.ops.overview import GatewayOverview, GatewayStatus, InstanceStatus
from mdgateway.ops.queueops import AskWorker, QueueOperations
from mdgateway.queue.attempt import GENERATED_RELEASE
from mdgateway.queue.envelope import Envelope, Recipient
from mdgateway.queue.manager import QueueManager, copy_file_into
from mdgateway.queue.spool import Spool
from mdgateway.smtp.parse import ParseError, parse_mailbox
from mdgateway.store.audit import (
    DONE,
    FAILED,
    REFUSED,
    REPLAYED,
    STARTED,
    AuditEntry,
)
from mdgateway.store.interfaces import (
    IStore,
    NotFoundError,
    QuarantineItem,
    ScanVerdict,
    StoreError,
)

log = Logger()


@implementer(IOperations)
class GatewayOperations:
    """
    The operator's view of one gateway instance.

    @param policy: the configuration's policy now in force.
    @param checks: readiness checks by name.
    @param instance: this instance's name (C{[store] instance}).
    @param ask_worker: sends a request to a worker process (see
        L{mdgateway.ops.queueops}).
    @param cluster: the way to the other instances of a cluster.
    """

    def __init__(
        self,
        *,
        reactor: IReactorTime,
        spool: Spool,
        pipeline: QueueManager,
        store: IStore,
        metrics: Any,
        policy: Callable[[], Any],
        reload: Callable[[], ReloadResult],
        checks: Callable[[], Any],
        worker_spools: Callable[[], list[tuple[int, str]]] = list,
        overview: GatewayOverview | None = None,
        details: Callable[[], dict[str, Any]] = dict,
        dependencies: Callable[[], dict[str, Any]] = dict,
        threadpool: ThreadPool | None = None,
        instance: Callable[[], str] = str,
        ask_worker: AskWorker | None = None,
        cluster: ClusterLink | None = None,
    ) -> None:
        self.reactor = reactor
        self.spool = spool
        self.pipeline = pipeline
        self.store = store
        self.metrics = metrics
        self._policy = policy
        self._reload = reload
        self._checks = checks
        self._details = details
        self._worker_spools = worker_spools
        self._overview = overview
        self._dependencies = dependencies
        #: The queue tools, across processes and instances.
        self.queue_tools = QueueOperations(
            reactor=reactor,
            threadpool=threadpool or pipeline.threadpool,
            spool=spool,
            manager=pipeline,
            store=store,
            instance=instance,
            worker_spools=worker_spools,
            ask_worker=ask_worker,
            cluster=cluster,
        )

    # -- the queue (see mdgateway.ops.queueops) ------------------------------------

    def queue(self) -> Deferred[list[QueueEntry]]:
        return Deferred.fromCoroutine(self.queue_tools.local())

    def cluster_queue(self, instance: str | None = None) -> Deferred[QueueListing]:
        return Deferred.fromCoroutine(self.queue_tools.listing(instance))

    def queue_action(self, action: QueueAction) -> Deferred[QueueActionResult]:
        return Deferred.fromCoroutine(self.queue_tools.action(action))

    def flush(
        self, by: str, instance: str | None = None, origin: str = ""
    ) -> Deferred[FlushResult]:
        return Deferred.fromCoroutine(self.queue_tools.flush(by, instance, origin))

    def queued_message(
        self, queue_id: str, instance: str | None = None
    ) -> Deferred[QueuedMessage]:
        return Deferred.fromCoroutine(self.queue_tools.content(queue_id, instance))

    # -- quarantine ------------------------------------------------------------

    def release(
        self,
        item_id: str,
        by: str,
        force: bool = False,
        key: str | None = None,
        origin: str = "",
    ) -> Deferred[ActionResult]:
        request = _Request("release", item_id, by, force, key, origin, None)
        return Deferred.fromCoroutine(self._claimed(request))

    def rescan(
        self,
        item_id: str,
        by: str,
        force: bool = False,
        key: str | None = None,
        origin: str = "",
    ) -> Deferred[ActionResult]:
        request = _Request("rescan", item_id, by, force, key, origin, None)
        return Deferred.fromCoroutine(self._claimed(request))

    def forward(
        self,
        item_id: str,
        addresses: list[str],
        by: str,
        force: bool = False,
        key: str | None = None,
        origin: str = "",
    ) -> Deferred[ActionResult]:
        for address in addresses:
            try:
                parse_mailbox(address, utf8=True)
            except ParseError:
                raise OperationError(400, f"not an address: {address!r}") from None
        if not addresses:
            raise OperationError(400, "no addresses to forward to")
        request = _Request("forward", item_id, by, force, key, origin, addresses)
        return Deferred.fromCoroutine(self._claimed(request))

    async def _item(self, item_id: str) -> QuarantineItem:
        try:
            return await self.store.get_quarantined(item_id)
        except NotFoundError:
            raise OperationError(404, f"no quarantined message {item_id}") from None

    async def _refuse(self, request: _Request, status: int, why: str) -> NoReturn:
        """
        Record a refused attempt in the audit, then refuse it.
        """
        detail = f"{why}; from {request.origin}"
        await self._audit(request.entry(self.reactor.seconds(), REFUSED, detail))
        raise OperationError(status, why)

    async def _audit(self, entry: AuditEntry) -> None:
        try:
            await self.store.record_audit(entry)
        except StoreError:
            log.failure("could not record the audit of {action}", action=entry.action)

    async def _claimed(self, request: _Request) -> ActionResult:
        """
        Do a quarantine action at most once: check that it may be done,
        claim it in the audit (which refuses a second claim of the same
        action across every instance sharing the store), do it, and
        record how it ended.
        """
        item = await self._item(request.item_id)
        if needs_force(item) and request.how != "rescan" and not request.force:
            await self._refuse(
                request,
                409,
                f"{request.item_id} was blocked by Core ({item.reason}); "
                f"to {request.how} it anyway, pass force",
            )
        entry, claimed = await self.store.claim_audit(
            request.entry(
                self.reactor.seconds(), STARTED, f"requested from {request.origin}"
            )
        )
        if not claimed:
            if entry.result == DONE and request.key and entry.key == request.key:
                await self._audit(
                    request.entry(
                        self.reactor.seconds(),
                        REPLAYED,
                        f"same key as audit entry {entry.id}, queued as "
                        f"{entry.outcome}; nothing done again, from {request.origin}",
                    )
                )
                return ActionResult(entry.outcome, replayed=True)
            if entry.result == STARTED:
                why = (
                    f"the same {request.how} of {request.item_id} by {entry.actor} "
                    "started and has not finished (or the gateway stopped "
                    "meanwhile: check the queue and history first); "
                    "to do it again, pass force"
                )
            else:
                queued = f" (queued as {entry.outcome})" if entry.outcome else ""
                why = (
                    f"{request.item_id} was {_DONE[request.how]} already by "
                    f"{entry.actor}{queued}; to {request.how} it again, pass force"
                )
            await self._refuse(request, 409, why)
        assert entry.id is not None
        if (
            request.how == "release"
            and item.released_at is not None
            and not request.force
        ):
            # Released before claims were kept (an earlier version).
            why = (
                f"{request.item_id} was released already by {item.released_by}; "
                "to release it again, pass force"
            )
            await self._finish(entry.id, REFUSED, why, "")
            raise OperationError(409, why)
        try:
            queue_id = await self._requeue(
                item, request.by, request.how, request.addresses
            )
        except BaseException as e:
            await self._finish(entry.id, FAILED, f"failed: {e}", "")
            raise
        await self._finish(
            entry.id, DONE, f"queued as {queue_id}, from {request.origin}", queue_id
        )
        return ActionResult(queue_id)

    async def _finish(
        self, entry_id: int, result: str, detail: str, outcome: str
    ) -> None:
        try:
            await self.store.finish_audit(entry_id, result, detail, outcome)
        except StoreError:
            # The claim stays "started": a repeat is refused, never redone.
            log.failure("could not record the end of audited action {id}", id=entry_id)

    async def _requeue(
        self, item: QuarantineItem, by: str, how: str, addresses: list[str] | None
    ) -> str:
        """
        Put a quarantined original back into the spool: as it was
        (release, forward: delivered unscanned, marked as the original
        copy) or to be processed again (rescan) under its first rule,
        even if that rule is disabled since.
        """
        item_id = item.id
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

    def pin(self, item_id: str, pinned: bool, by: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._pin(item_id, pinned, by))

    async def _pin(self, item_id: str, pinned: bool, by: str) -> None:
        item = await self._item(item_id)
        await self.store.pin(item_id, pinned)
        what = "pinned" if pinned else "unpinned"
        await self.store.add_event(
            item.message.id, f"quarantined original {what} by {by}"
        )
        log.info(
            "quarantined {item_id}: {what} by {by}", item_id=item_id, what=what, by=by
        )

    def delete(self, item_id: str, by: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._delete(item_id, by))

    async def _delete(self, item_id: str, by: str) -> None:
        item = await self._item(item_id)
        if not await self.store.delete_quarantined(item_id):
            raise OperationError(404, f"no quarantined message {item_id}")
        await self.store.add_event(item.message.id, f"deleted by {by}")
        log.info("quarantined {item_id}: deleted by {by}", item_id=item_id, by=by)

    # -- configuration and health ----------------------------------------------

    def _require_overview(self) -> GatewayOverview:
        if self._overview is None:
            raise OperationError(503, "no overview of this gateway is available")
        return self._overview

    def status(self) -> Deferred[GatewayStatus]:
        return Deferred.fromCoroutine(self._require_overview().status())

    def instances(self, since: float) -> Deferred[tuple[InstanceStatus, ...]]:
        overview = self._require_overview()

        async def instances() -> tuple[InstanceStatus, ...]:
            return overview.instances(await self.store.instance_activity(since))

        return Deferred.fromCoroutine(instances())

    def configuration(self) -> ConfigurationView:
        return self._require_overview().configuration()

    def reload(self) -> ReloadResult:
        return self._reload()

    def readiness(self) -> Deferred[Readiness]:
        return Deferred.fromCoroutine(self._readiness())

    async def _readiness(self) -> Readiness:
        checks = self._checks()
        if isinstance(checks, Deferred) or hasattr(checks, "__await__"):
            checks = await checks
        reasons = tuple(name for name, ok in checks.items() if not ok)
        return Readiness(
            not reasons,
            checks,
            reasons,
            details=self._details(),
            dependencies=self._dependencies(),
        )


_DONE = {"release": "released", "rescan": "rescanned", "forward": "forwarded"}


@attrs.frozen
class _Request:
    """
    One quarantine action as asked for.
    """

    how: str
    item_id: str
    by: str
    force: bool
    key: str | None
    origin: str
    addresses: list[str] | None

    @property
    def claim(self) -> str | None:
        """
        What makes this action happen at most once: the action on the item
        (and, for a forward, the addresses), or when forced only the
        client's idempotency key (C{None} without one).
        """
        if self.force:
            return f"key:{self.key}" if self.key else None
        target = f"{self.how}:{self.item_id}"
        if self.addresses is not None:
            target += ":" + ",".join(sorted(a.casefold() for a in self.addresses))
        return target

    def entry(self, at: float, result: str, detail: str) -> AuditEntry:
        to = f" to {', '.join(self.addresses)}" if self.addresses else ""
        forced = " (forced)" if self.force else ""
        return AuditEntry(
            at=at,
            actor=self.by,
            action=self.how,
            target=self.item_id,
            result=result,
            detail=f"{detail}{to}{forced}",
            claim=self.claim if result == STARTED else None,
            key=self.key,
        )


def needs_force(item: QuarantineItem) -> bool:
    """
    Whether releasing or forwarding C{item} takes an explicit C{force}:
    Core blocked it (malware, or whatever the rule blocks), so delivering it
    sends that content to people.
    """
    return item.reason == "blocked" or item.message.verdict is ScanVerdict.BLOCKED
