# -*- test-case-name: tests.test_admin -*-
"""
A verified fake of L{IOperations}, for tests of the admin API, the CLI and
programs that embed them.

It works over a real store (so history, refusals and quarantine behave as
they do in production, e.g. a SQLite store on C{":memory:"}) and keeps the
queue in memory. Every call is recorded in C{calls}, so tests assert on
what reached the gateway instead of patching it.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mdgateway.ops.configview import ConfigurationView, configuration_view
from mdgateway.ops.interfaces import (
    ActionResult,
    IOperations,
    OperationError,
    QueueEntry,
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
    @ivar error: when set, C{retry_now}, C{release}, C{rescan},
        C{forward}, C{pin} and C{delete} fail with it (after recording the
        call), as the gateway does for an item in the wrong state (409)
        and the like.
    @ivar gateway_status: what L{status} answers (its readiness is
        L{ready}'s at each call).
    @ivar spools: this instance's spools, as L{instances} lists them.
    @ivar config: what L{configuration} answers.
    """

    def __init__(self, store: IStore, metrics: Metrics | None = None) -> None:
        self.store = store
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
        #: Queue ids by the idempotency key that got them: a call with a
        #: key seen before answers the same id, marked replayed.
        self.answered: dict[str, str] = {}

    def queue(self) -> Deferred[list[QueueEntry]]:
        self.calls.append(("queue",))
        return succeed(sorted(self.entries, key=lambda e: e.received_at))

    def retry_now(self, queue_id: str) -> Deferred[None]:
        self.calls.append(("retry_now", queue_id))
        if self.error is not None:
            return fail(self.error)
        if not any(e.queue_id == queue_id for e in self.entries):
            return fail(OperationError(404, f"no queued message {queue_id!r}"))
        return succeed(None)

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
