# -*- test-case-name: tests.test_admin -*-
"""
A verified fake of L{IOperations}, for tests of the admin API, the CLI and
programs that embed them.

It works over a real store (so history, refusals, quarantine and the audit
behave as they do in production, e.g. a SQLite store on C{":memory:"}) and
keeps the queue in memory: one instance, whose queue actions change it as
the gateway's do (a hold marks the entry, a delete or bounce removes it)
and are audited under the operator's name. Every call is recorded in
C{calls}, so tests assert on what reached the gateway instead of patching
it.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mdgateway.ops.configview import ConfigurationView, configuration_view
from mdgateway.ops.interfaces import (
    QUEUE_ACTIONS,
    ActionResult,
    FlushResult,
    InstanceQueue,
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
from mdgateway.ops.metrics import Metrics
from mdgateway.ops.overview import (
    GatewayStatus,
    InstanceStatus,
    SpoolStatus,
    cluster_instances,
)
from mdgateway.ops.queueops import AUDIT_NAMES
from mdgateway.store.audit import DONE, REFUSED, AuditEntry
from mdgateway.store.interfaces import IStore, NotFoundError

READY = Readiness(ready=True, checks={"listeners": True, "spool": True})

#: The instance name the fake reports for itself.
FAKE_INSTANCE = "fake-gw"


@implementer(IOperations)
class FakeOperations:
    """
    Operations over C{store} and an in-memory queue.

    @ivar entries: the queue, as L{queue} reports it (oldest first).
    @ivar calls: C{(method, *arguments)} per call, in order.
    @ivar reload_result: what L{reload} answers.
    @ivar ready: what L{readiness} answers.
    @ivar new_queue_ids: the queue ids handed out by release, rescan and
        forward, in order (they answer with an L{ActionResult}).
    @ivar error: when set, C{queue_action}, C{release}, C{rescan},
        C{forward}, C{pin} and C{delete} fail with it (after recording the
        call), as the gateway does for an item in the wrong state (409)
        and the like.
    @ivar clock: the time of its audit entries (default: the wall clock).
    @ivar contents: what L{queued_message} answers for a queue id (else a
        view of the entry without headers or parts).
    @ivar gateway_status: what L{status} answers (its readiness is
        L{ready}'s at each call).
    @ivar spools: this instance's spools, as L{instances} lists them.
    @ivar config: what L{configuration} answers.
    """

    def __init__(
        self,
        store: IStore,
        metrics: Metrics | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.metrics = metrics if metrics is not None else Metrics()
        self.entries: list[QueueEntry] = []
        self.calls: list[tuple[Any, ...]] = []
        self.reload_result = ReloadResult(True)
        self.ready = READY
        self.new_queue_ids: list[str] = []
        self.error: OperationError | None = None
        self.spools: tuple[SpoolStatus, ...] = (SpoolStatus(0, 0, 0.0),)
        self.gateway_status = GatewayStatus(
            instance=FAKE_INSTANCE,
            config_version="fakeversion0",
            config_path="/etc/mdgateway/mdgateway.toml",
            spools=self.spools,
            core=(),
            relays=(),
            readiness=READY,
        )
        self.config: ConfigurationView = configuration_view(
            {}, "fakeversion0", "/etc/mdgateway/mdgateway.toml"
        )
        self.contents: dict[str, QueuedMessage] = {}
        #: Queue ids by the idempotency key that got them: a call with a
        #: key seen before answers the same id, marked replayed.
        self.answered: dict[str, str] = {}

    def queue(self) -> Deferred[list[QueueEntry]]:
        self.calls.append(("queue",))
        return succeed(sorted(self.entries, key=lambda e: e.received_at))

    def cluster_queue(self, instance: str | None = None) -> Deferred[QueueListing]:
        self.calls.append(("cluster_queue", instance))
        if instance not in (None, FAKE_INSTANCE):
            return fail(OperationError(404, f"no instance {instance!r}"))
        entries = tuple(sorted(self.entries, key=lambda e: e.received_at))
        here = InstanceQueue(FAKE_INSTANCE, True, len(entries), len(entries))
        return succeed(QueueListing(entries, (here,)))

    def queue_action(self, action: QueueAction) -> Deferred[QueueActionResult]:
        self.calls.append(
            ("queue_action", action.action, action.queue_id, action.by, action.bounce)
        )
        return Deferred.fromCoroutine(self._queue_action(action))

    async def _queue_action(self, action: QueueAction) -> QueueActionResult:
        name = AUDIT_NAMES.get(action.action, action.action)
        try:
            result = self._act(action)
        except OperationError as e:
            await self._audit(
                action.by, name, action.queue_id, REFUSED, e.message, action.origin
            )
            raise
        await self._audit(
            action.by, name, action.queue_id, DONE, result.detail, action.origin
        )
        return result

    def _act(self, action: QueueAction) -> QueueActionResult:
        if action.action not in QUEUE_ACTIONS:
            raise OperationError(400, f"unknown queue action {action.action!r}")
        if self.error is not None:
            raise self.error
        if action.instance not in (None, FAKE_INSTANCE):
            raise OperationError(404, f"no instance {action.instance!r}")
        found = [i for i, e in enumerate(self.entries) if e.queue_id == action.queue_id]
        if not found:
            raise OperationError(409, f"{action.queue_id} is not in the queue")
        index = found[0]
        entry = self.entries[index]
        changed = True
        if action.action == "hold":
            changed = entry.held_by is None
            if changed:
                self.entries[index] = attrs.evolve(
                    entry, held_by=action.by, next_attempt=None
                )
        elif action.action == "release-hold":
            changed = entry.held_by is not None
            self.entries[index] = attrs.evolve(entry, held_by=None, held_at=None)
        elif action.action == "retry" and entry.held_by is not None:
            raise OperationError(409, f"{action.queue_id} is on hold")
        elif action.action in ("delete", "bounce"):
            del self.entries[index]
        return QueueActionResult(
            action.queue_id,
            action.action,
            FAKE_INSTANCE,
            entry.worker,
            changed,
            f"{action.action} of {action.queue_id} by {action.by}",
        )

    def flush(
        self, by: str, instance: str | None = None, origin: str = ""
    ) -> Deferred[FlushResult]:
        self.calls.append(("flush", by, instance))
        return Deferred.fromCoroutine(self._flush(by, instance, origin))

    async def _flush(self, by: str, instance: str | None, origin: str) -> FlushResult:
        if instance not in (None, FAKE_INSTANCE):
            raise OperationError(404, f"no instance {instance!r}")
        tried = sum(1 for e in self.entries if e.held_by is None)
        await self._audit(
            by, "flush", instance or "all instances", DONE, f"{tried}", origin
        )
        return FlushResult({FAKE_INSTANCE: tried})

    def queued_message(
        self, queue_id: str, instance: str | None = None
    ) -> Deferred[QueuedMessage]:
        self.calls.append(("queued_message", queue_id, instance))
        if queue_id in self.contents:
            return succeed(self.contents[queue_id])
        for entry in self.entries:
            if entry.queue_id == queue_id:
                return succeed(QueuedMessage(entry, "", "", "", True, ()))
        return fail(OperationError(409, f"{queue_id} is not in the queue"))

    async def _audit(
        self, by: str, action: str, target: str, result: str, detail: str, origin: str
    ) -> None:
        at = self.clock.seconds() if self.clock is not None else time.time()
        await self.store.record_audit(
            AuditEntry(
                at=at,
                actor=by,
                action=action,
                target=target,
                result=result,
                detail=f"{detail}; from {origin}" if origin else detail,
            )
        )

    def release(
        self,
        item_id: str,
        by: str,
        force: bool = False,
        key: str | None = None,
        origin: str = "",
    ) -> Deferred[ActionResult]:
        self.calls.append(("release", item_id, by, force, key))
        return Deferred.fromCoroutine(self._release(item_id, by, key))

    async def _release(self, item_id: str, by: str, key: str | None) -> ActionResult:
        await self._known(item_id)
        if key is not None and key in self.answered:
            return ActionResult(self.answered[key], replayed=True)
        await self.store.mark_released(item_id, by)
        return self._new_queue_id(key)

    def rescan(
        self,
        item_id: str,
        by: str,
        force: bool = False,
        key: str | None = None,
        origin: str = "",
    ) -> Deferred[ActionResult]:
        self.calls.append(("rescan", item_id, by, force, key))
        return Deferred.fromCoroutine(self._queued(item_id, key))

    def forward(
        self,
        item_id: str,
        addresses: list[str],
        by: str,
        force: bool = False,
        key: str | None = None,
        origin: str = "",
    ) -> Deferred[ActionResult]:
        self.calls.append(("forward", item_id, list(addresses), by, force, key))
        return Deferred.fromCoroutine(self._queued(item_id, key))

    async def _queued(self, item_id: str, key: str | None) -> ActionResult:
        await self._known(item_id)
        if key is not None and key in self.answered:
            return ActionResult(self.answered[key], replayed=True)
        return self._new_queue_id(key)

    async def _known(self, item_id: str) -> None:
        if self.error is not None:
            raise self.error
        try:
            await self.store.get_quarantined(item_id)
        except NotFoundError:
            raise OperationError(404, f"no quarantine item {item_id!r}") from None

    def _new_queue_id(self, key: str | None = None) -> ActionResult:
        queue_id = f"FAKEQ{len(self.new_queue_ids) + 1:04d}"
        self.new_queue_ids.append(queue_id)
        if key is not None:
            self.answered[key] = queue_id
        return ActionResult(queue_id)

    def pin(self, item_id: str, pinned: bool, by: str) -> Deferred[None]:
        self.calls.append(("pin", item_id, pinned, by))
        return Deferred.fromCoroutine(self._pin(item_id, pinned))

    async def _pin(self, item_id: str, pinned: bool) -> None:
        await self._known(item_id)
        await self.store.pin(item_id, pinned)

    def delete(self, item_id: str, by: str) -> Deferred[None]:
        self.calls.append(("delete", item_id, by))
        return Deferred.fromCoroutine(self._delete(item_id))

    async def _delete(self, item_id: str) -> None:
        await self._known(item_id)
        await self.store.delete_quarantined(item_id)

    def status(self) -> Deferred[GatewayStatus]:
        self.calls.append(("status",))
        return succeed(attrs.evolve(self.gateway_status, readiness=self.ready))

    def instances(self, since: float) -> Deferred[tuple[InstanceStatus, ...]]:
        self.calls.append(("instances", since))
        return Deferred.fromCoroutine(self._instances(since))

    async def _instances(self, since: float) -> tuple[InstanceStatus, ...]:
        activity = await self.store.instance_activity(since)
        return cluster_instances(FAKE_INSTANCE, self.spools, activity)

    def configuration(self) -> ConfigurationView:
        self.calls.append(("configuration",))
        return self.config

    def reload(self) -> ReloadResult:
        self.calls.append(("reload",))
        return self.reload_result

    def readiness(self) -> Readiness:
        self.calls.append(("readiness",))
        return self.ready
