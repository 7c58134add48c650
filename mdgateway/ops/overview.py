# -*- test-case-name: tests.test_console_units -*-
"""
What the console's dashboard shows about the running gateway: the health
of every Core server and relay profile, each process's spool, the
instances of a cluster and the configuration in force.

L{GatewayOverview} reads it from the live pieces of one instance (only
in-memory state: cheap, never blocking); the instances of a cluster come
from the shared store's history (L{IStore.instance_activity}), since each
instance records which copies it spooled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import attrs

from mdgateway.ops.configview import ConfigurationView, configuration_view
from mdgateway.ops.interfaces import Readiness
from mdgateway.store.interfaces import InstanceActivity


@attrs.frozen
class SpoolStatus:
    """
    One process's spool.

    @ivar process: 0 for the primary, 1.. for worker processes.
    @ivar oldest_age: seconds since the oldest message was received (0
        when empty).
    """

    process: int
    depth: int
    oldest_age: float


@attrs.frozen
class CoreServerHealth:
    """
    One MetaDefender Core server of a profile.

    @ivar in_use: an enabled rule scans with the profile.
    """

    profile: str
    url: str
    up: bool
    busy: bool
    in_flight: int
    queued: int
    failures: int
    in_use: bool


@attrs.frozen
class RelayHealth:
    """
    One SMTP relay profile.

    @ivar healthy: some server of the profile answered lately.
    @ivar throttled_until: the next hop asked us to slow down until then
        (0: it did not).
    """

    profile: str
    servers: tuple[str, ...]
    healthy: bool
    throttled_until: float
    in_use: bool


@attrs.frozen
class GatewayStatus:
    """
    This instance now.

    @ivar instance: its name in the shared history (C{[store] instance}).
    @ivar config_version: the running configuration's version.
    """

    instance: str
    config_version: str
    config_path: str
    spools: tuple[SpoolStatus, ...]
    core: tuple[CoreServerHealth, ...]
    relays: tuple[RelayHealth, ...]
    readiness: Readiness


@attrs.frozen
class InstanceStatus:
    """
    One gateway instance of the cluster, as the dashboard lists it.

    @ivar this: the instance serving the console.
    @ivar received: copies it received in the period asked for.
    @ivar pending: copies the history shows as still in its spool.
    @ivar spools: for this instance, each process's spool as it is now.
    """

    name: str
    this: bool
    received: int
    last_received: float | None
    pending: int
    oldest_pending: float | None
    spools: tuple[SpoolStatus, ...] = ()


class _Runtime(Protocol):
    def status(self) -> Iterable[Any]: ...


class _Relay(Protocol):
    def healthy(self, profile: Any) -> bool: ...

    def throttled_until(self, profile: Any) -> float: ...


class _Spool(Protocol):
    @property
    def entry_count(self) -> int: ...

    def oldest_age(self) -> float: ...


class GatewayOverview:
    """
    The dashboard's view of one running instance.

    @param config: the configuration in force (a reload replaces it).
    @param runtimes: Core profile name to its runtime (C{items()}).
    @param relay: the relay (health and throttling per profile).
    @param spool: this process's spool.
    @param worker_spools: the worker processes' spools, as their last
        metric snapshots report them.
    @param readiness: this instance's readiness.
    @param restart_keys: top-level configuration keys a reload leaves as
        they are until a restart.
    """

    def __init__(
        self,
        *,
        config: Callable[[], Any],
        runtimes: Callable[[], Iterable[tuple[str, _Runtime]]],
        relay: _Relay,
        spool: _Spool,
        worker_spools: Callable[[], Iterable[SpoolStatus]],
        readiness: Callable[[], Awaitable[Readiness]],
        restart_keys: tuple[str, ...] = (),
    ) -> None:
        self._config = config
        self._runtimes = runtimes
        self._relay = relay
        self._spool = spool
        self._worker_spools = worker_spools
        self._readiness = readiness
        self._restart_keys = restart_keys

    def spools(self) -> tuple[SpoolStatus, ...]:
        """
        The primary's spool, then each worker's.
        """
        primary = SpoolStatus(0, self._spool.entry_count, self._spool.oldest_age())
        return (primary, *self._worker_spools())

    async def status(self) -> GatewayStatus:
        config = self._config()
        policy = config.policy
        core_in_use = {p.name for p in policy.core_profiles_in_use()}
        relays_in_use = {p.name for p in policy.smtp_profiles_in_use()}
        core = tuple(
            CoreServerHealth(
                profile=name,
                url=server.url,
                up=server.up,
                busy=server.busy,
                in_flight=server.in_flight,
                queued=server.queued,
                failures=server.failures,
                in_use=name in core_in_use,
            )
            for name, runtime in sorted(self._runtimes(), key=lambda r: r[0])
            if name in policy.core_profiles
            for server in runtime.status()
        )
        relays = tuple(
            RelayHealth(
                profile=name,
                servers=tuple(str(s) for s in profile.servers),
                healthy=self._relay.healthy(profile),
                throttled_until=self._relay.throttled_until(profile),
                in_use=name in relays_in_use,
            )
            for name, profile in sorted(policy.smtp_profiles.items())
        )
        return GatewayStatus(
            instance=config.store.instance,
            config_version=config.version,
            config_path=config.path,
            spools=self.spools(),
            core=core,
            relays=relays,
            readiness=await self._readiness(),
        )

    def instances(
        self, activity: Iterable[InstanceActivity]
    ) -> tuple[InstanceStatus, ...]:
        """
        The cluster's instances from the shared history's C{activity}.
        """
        return cluster_instances(self._config().store.instance, self.spools(), activity)

    def configuration(self) -> ConfigurationView:
        config = self._config()
        return configuration_view(
            config.document, config.version, config.path, self._restart_keys
        )


def cluster_instances(
    this: str, spools: tuple[SpoolStatus, ...], activity: Iterable[InstanceActivity]
) -> tuple[InstanceStatus, ...]:
    """
    The instances the shared history's C{activity} names, with the one
    called C{this} always listed, first, with its C{spools}.
    """
    out = [InstanceStatus(this, True, 0, None, 0, None, spools)]
    for a in activity:
        status = InstanceStatus(
            a.instance,
            a.instance == this,
            a.received,
            a.last_received,
            a.pending,
            a.oldest_pending,
        )
        if status.this:
            out[0] = attrs.evolve(status, spools=spools)
        else:
            out.append(status)
    return tuple(out)


def snapshot_spools(snapshots: Iterable[list[dict[str, Any]]]) -> list[SpoolStatus]:
    """
    Each worker's spool from its last metric snapshot (see
    L{mdgateway.ops.metrics.Metrics.snapshot}), numbered from 1.
    """
    out = []
    for number, snapshot in enumerate(snapshots, start=1):
        values: dict[str, float] = {}
        for family in snapshot:
            for name, _labels, value in family.get("samples", ()):
                values[name] = float(value)
        out.append(
            SpoolStatus(
                number,
                int(values.get("mdgateway_queue_depth", 0)),
                values.get("mdgateway_queue_oldest_seconds", 0.0),
            )
        )
    return out
