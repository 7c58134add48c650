# -*- test-case-name: tests.test_embedding -*-
"""
The running gateway as a Twisted service: ordered start (spool recovery,
Core runtimes, the store, the queue, then listeners), reload, readiness,
and an orderly drain in the reverse order.
"""

from __future__ import annotations

import errno
import os
import sys
from functools import partial
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from mdgateway.config import ConfigError, GatewayConfig, endpoint_address, load_config
from mdgateway.ops.admin import AdminAPI
from mdgateway.ops.console import Console, mount
from mdgateway.ops.interfaces import ReloadResult
from mdgateway.ops.operations import GatewayOperations
from mdgateway.ops.overview import GatewayOverview, SpoolStatus, snapshot_spools
from mdgateway.ops.tokens import load_or_create_tokens, load_tokens
from mdgateway.queue.entry import SpoolInUseError
from mdgateway.receive.listeners import apply_settings, listener_tls_options
from mdgateway.run.compose import Gateway, retry_policy
from mdgateway.run.supervisor import (
    Supervisor,
    stale_worker_spools,
    worker_command,
    worker_environment,
    worker_spool,
)
from mdgateway.smtp.serverprotocol import ProxyHeaderFactory

log = Logger()

#: The settings a reload leaves as they are until a restart (dotted keys
#: of the configuration); everything else a reload applies at once.
RESTART_KEYS = (
    "listeners",
    "spool.directory",
    "spool.threads",
    "spool.min_free",
    "store.location",
    "store.instance",
    "admin.endpoint",
    "admin.tls",
    "delivery.concurrency",
    "delivery.loop_secret_file",
    "emulator",
    "workers",
    "umask",
)

#: The sections whose settings are compared one by one for the reload
#: answer; other top-level keys count as one setting each.
_SECTIONS = ("tls", "limits", "spool", "delivery", "store", "admin")


class GatewayService(MultiService):
    """
    One gateway process at run time.

    @param listen: bind the configured listeners (the primary), or adopt the
        sockets the primary passed down (a worker). An embedder that serves
        L{Gateway.smtp_factory} on endpoints of its own passes C{False}.
    """

    def __init__(self, gateway: Gateway, *, listen: bool = True) -> None:
        super().__init__()
        self.gateway = gateway
        self.reactor = gateway.reactor
        self.listen = listen
        self.supervisor: Supervisor | None = None
        self.emulator: Supervisor | None = None
        self.operations = GatewayOperations(
            reactor=self.reactor,
            spool=gateway.spool,
            pipeline=gateway.queue,
            store=gateway.store,
            metrics=gateway.metrics,
            policy=gateway.live.policy,
            reload=self.reload,
            checks=self.checks,
            details=self.details,
            worker_spools=self._worker_spools,
            overview=GatewayOverview(
                config=lambda: gateway.live.current,
                runtimes=gateway.runtimes.items,
                relay=gateway.relay,
                spool=gateway.spool,
                worker_spools=self._worker_spool_status,
                readiness=lambda: self.operations.readiness(),
                restart_keys=RESTART_KEYS,
            ),
        )
        self._watch_metrics()
        self.admin_port: IListeningPort | None = None
        self.admin_api: AdminAPI | None = None
        self.purger = LoopingCall(self._purge)
        self.purger.clock = self.reactor
        self.ports: list[IListeningPort] = []
        self.ready: Deferred[None] = Deferred()
        self.draining = False

    @property
    def config(self) -> GatewayConfig:
        return self.gateway.live.current

    # -- readiness and metrics -------------------------------------------------

    def _watch_metrics(self) -> None:
        gateway = self.gateway
        metrics = gateway.metrics
        metrics.watch_queue_depth(lambda: gateway.spool.entry_count)
        metrics.watch_queue_oldest_seconds(gateway.spool.oldest_age)
        metrics.watch_core_servers_up(gateway.runtimes.servers_up)
        metrics.watch_outbox(lambda: gateway.outbox.depth, gateway.outbox.oldest_age)
        metrics.watch_relay_throttled(
            lambda: {
                name: bool(gateway.relay.throttled_until(profile))
                for name, profile in self.config.policy.smtp_profiles.items()
            }
        )

    def checks(self) -> dict[str, bool]:
        """
        Readiness: listeners up, spool writable, a healthy server in every
        Core and relay profile in use, not draining.
        """
        gateway = self.gateway
        policy = self.config.policy
        core = all(
            any(s.up for s in gateway.runtimes[p.name].status())
            for p in policy.core_profiles_in_use()
            if p.name in gateway.runtimes
        )
        relay = all(gateway.relay.healthy(p) for p in policy.smtp_profiles_in_use())
        listening = (
            bool(self.ports) and len(self.ports) == len(self.config.listeners)
            if self.listen
            else gateway.handler.ready
        )
        return {
            "listening": listening,
            "spool_writable": gateway.spool.writable(),
            "core": core,
            "relay": relay,
            "not_draining": not self.draining,
            "outbox_not_full": not gateway.outbox.full,
        }

    def details(self) -> dict[str, Any]:
        """
        What readiness shows beside its checks: the outbox of records for
        the store (depth, limit, oldest age, whether the store answers).
        """
        return {"outbox": attrs.asdict(self.gateway.outbox.status())}

    async def _purge(self) -> None:
        counts = await self.gateway.store.purge(
            self.reactor.seconds(),
            self.config.store.history_days,
            self.config.store.quarantine_days,
        )
        log.info(
            "retention: removed {messages} messages, {refusals} refusals, "
            "{quarantined} quarantined originals",
            messages=counts.messages,
            refusals=counts.refusals,
            quarantined=counts.quarantined,
        )

    # -- start -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.gateway.threads.start()
        d = Deferred.fromCoroutine(self._start())
        d.addErrback(self._failed_start)

    async def _start(self) -> None:
        gateway = self.gateway
        config = self.config
        primary = gateway.role.primary
        await gateway.loop_guard.load(self.reactor, gateway.threads.spool)
        if primary and config.emulator.enabled:
            await self._start_emulator()
        gateway.runtimes.sync(config.policy.core_profiles)
        await gateway.store.open()
        if primary:
            self.purger.start(3600, now=True).addErrback(
                lambda f: log.failure("retention job failed", f)
            )
            await gateway.spool.acquire()
            await gateway.outbox.open()
            await self._adopt_stale_spools()
        else:
            # A predecessor of this worker may still be draining.
            await gateway.spool.acquire(wait=config.drain_timeout + 30)
            await gateway.outbox.open()
        entries = await gateway.spool.recover()
        log.info(
            "spool {directory}: {count} message(s) recovered",
            directory=gateway.spool.root,
            count=len(entries),
        )
        await gateway.queue.clear_scratch()
        gateway.queue.start(entries)
        gateway.handler.ready = True
        if self.listen:
            await self._start_listeners()
        if primary and config.admin.endpoint:
            await self._start_admin()
        if primary and self.listen and config.workers > 1:
            self._start_workers()
        self.ready.callback(None)

    async def _adopt_stale_spools(self) -> None:
        stale_spools = await deferToThreadPool(
            self.reactor,
            self.gateway.threads.spool,
            stale_worker_spools,
            self.config.spool.directory,
            self.config.workers,
        )
        for stale in stale_spools:
            try:
                await self.gateway.outbox.adopt(stale)
                await self.gateway.spool.adopt(stale)
            except SpoolInUseError as e:
                # A retired worker still draining: its messages are safe
                # where they are; the next start adopts them.
                log.warn("not adopted yet: {error}", error=str(e))

    async def _start_listeners(self) -> None:
        gateway = self.gateway
        for listener in self.config.listeners:
            wrapped = gateway.smtp_factory(listener.name)
            if isinstance(wrapped, ProxyHeaderFactory):
                wrapped.on_error = partial(gateway.metrics.proxy_error, listener.name)
            if gateway.role.primary:
                port = await self._listen(listener.endpoint, wrapped)
            else:
                port = adopt_listener(
                    self.reactor, gateway.role.listen_fds[listener.name], wrapped
                )
            self.ports.append(port)
            host = port.getHost()
            log.info(
                "listening on {listener}: {host}:{port} (tls {tls}, proxy {proxy})",
                listener=listener.name,
                host=getattr(host, "host", host),
                port=getattr(host, "port", ""),
                tls=listener.tls,
                proxy=listener.proxy_protocol,
            )

    async def _listen(self, description: str, factory: Factory) -> IListeningPort:
        """
        Listen on C{description}; while the address is in use, keep trying
        for as long as a predecessor may take to drain (after a crash its
        workers still hold the old socket until they have finished).
        """
        deadline = self.reactor.seconds() + self.config.drain_timeout + 5
        warned = False
        while True:
            try:
                port: IListeningPort = await serverFromString(
                    self.reactor, description
                ).listen(factory)
                return port
            except CannotListenError as e:
                in_use = getattr(e.socketError, "errno", None) == errno.EADDRINUSE
                if not in_use or self.reactor.seconds() >= deadline:
                    raise
                if not warned:
                    warned = True
                    log.warn(
                        "{endpoint} is in use (a predecessor draining?); "
                        "retrying until {seconds:g}s have passed",
                        endpoint=description,
                        seconds=self.config.drain_timeout + 5,
                    )
                await deferLater(self.reactor, 0.25, lambda: None)

    def _start_workers(self) -> None:
        fds = {
            listener.name: port.fileno()  # type: ignore[attr-defined]
            for listener, port in zip(self.config.listeners, self.ports, strict=True)
        }
        self.supervisor = Supervisor(
            reactor=self.reactor,
            clock=self.reactor,
            children=self.config.workers - 1,
            command=partial(worker_command, os.path.abspath(self.config.path)),
            listen_fds=fds,
            observer=globalLogPublisher,
            environment=worker_environment(),
        )
        metrics = self.gateway.metrics
        metrics.remote = self.supervisor.snapshots
        supervisor = self.supervisor
        metrics.watch_workers(lambda: supervisor.running)
        self.supervisor.start()

    async def _start_admin(self) -> None:
        settings = self.config.admin
        tokens = await deferToThreadPool(
            self.reactor,
            self.gateway.threads.spool,
            load_or_create_tokens,
            settings.token_file,
        )
        api = AdminAPI(self.operations, tokens, self.reactor)
        self.admin_api = api
        site = api.site()
        site.noisy = False
        console = await Console.create(
            operations=self.operations,
            reactor=self.reactor,
            threadpool=self.gateway.threads.work,
            users_file=settings.users_file,
            token_name=api.token_name,
            session_lifetime=settings.session_lifetime,
            secure_cookies=settings.tls,
        )
        site.resource = mount(site.resource, console)
        endpoint = serverFromString(self.reactor, settings.endpoint)
        self.admin_port = await endpoint.listen(site)
        log.info(
            "admin API listening on {endpoint} (token in {token_file})",
            endpoint=settings.endpoint,
            token_file=settings.token_file,
        )

    async def _start_emulator(self) -> None:
        """
        Start the built-in Core emulator as a process of its own (kept
        alive like a worker) and wait until it listens.
        """
        settings = self.config.emulator
        command = [
            sys.executable,
            "-m",
            "mdgateway.run.emulator",
            "--endpoint",
            settings.endpoint,
            "--latency",
            repr(settings.latency),
        ]
        self.emulator = Supervisor(
            reactor=self.reactor,
            clock=self.reactor,
            children=1,
            command=lambda index, fds: command,
            listen_fds={},
            observer=globalLogPublisher,
            environment=worker_environment(),
            name="emulator",
        )
        self.emulator.start()
        await self._wait_listening(settings.endpoint, timeout=30)

    async def _wait_listening(self, description: str, timeout: float) -> None:
        """
        Connect to the TCP server endpoint C{description} until it answers.
        """
        kind, interface, port = endpoint_address(description)
        if kind != "TCP":
            return
        host = interface or "127.0.0.1"
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        endpoint = HostnameEndpoint(self.reactor, host.encode(), port, timeout=1)
        deadline = self.reactor.seconds() + timeout
        while True:
            try:
                protocol = await endpoint.connect(Factory.forProtocol(Protocol))
            except Exception:
                if self.reactor.seconds() >= deadline:
                    raise RuntimeError(
                        f"nothing listens on {description} after {timeout:g}s"
                    ) from None
                await deferLater(self.reactor, 0.1, lambda: None)
            else:
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.loseConnection()
                return

    def _failed_start(self, failure: Failure) -> None:
        log.critical(
            "mdgateway failed to start: {error}", error=failure.getErrorMessage()
        )
        self.ready.addErrback(lambda _: None)
        self.ready.errback(failure)
        if self.reactor.running:
            # Exit non-zero, so a supervisor (systemd, a test) sees it.
            self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self.reactor.stop()

    # -- stop ----------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        gateway = self.gateway
        config = self.config
        self.draining = True
        if config.drain_grace and gateway.role.primary and self.listen:
            # Readiness is red now; give the load balancer time to notice
            # before the listener goes away.
            log.info(
                "draining: not ready; listeners close in {grace}s",
                grace=config.drain_grace,
            )
            await deferLater(self.reactor, config.drain_grace, lambda: None)
        gateway.handler.accepting = False
        workers_stopped: Deferred[None] = succeed(None)
        if self.supervisor is not None:
            workers_stopped = Deferred.fromCoroutine(
                self.supervisor.stop(config.drain_timeout + 30)
            )
        log.info("draining: listeners closed, sessions finishing")
        await DeferredList([succeed(p.stopListening()) for p in self.ports])
        for factory in gateway.factories:
            for session in list(factory.sessions):
                session.drain()
        deadline = self.reactor.seconds() + config.drain_timeout
        while self._live_sessions() and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.1, lambda: None)
        for factory in gateway.factories:
            for session in list(factory.sessions):
                session.abort()
        await gateway.queue.stop()
        await workers_stopped
        if self.admin_port is not None:
            await maybeDeferred(self.admin_port.stopListening)
        if self.purger.running:
            self.purger.stop()
        gateway.refusals.stop()
        await gateway.outbox.close(timeout=min(10.0, config.drain_timeout))
        await gateway.store.close()
        await gateway.runtimes.close()
        if self.emulator is not None:
            await self.emulator.stop(10)
        await gateway.spool.close()
        gateway.threads.stop()
        await super().stopService()
        log.info("stopped")

    def _live_sessions(self) -> int:
        return sum(len(f.sessions) for f in self.gateway.factories)

    # -- reload ----------------------------------------------------------------------

    def reload(self) -> ReloadResult:
        """
        Load the configuration file again. If it is valid, everything it
        changes applies now (new sessions use its rules, limits, names and
        certificate; sessions in progress keep theirs) except the settings
        of L{RESTART_KEYS}, which the answer names; if not, the running
        configuration stays and every problem is logged.
        """
        old = self.config
        try:
            new = load_config(old.path)
        except ConfigError as e:
            for problem in e.problems:
                log.error("configuration reload refused: {problem}", problem=problem)
            return ReloadResult(False, tuple(e.problems))
        changed = changed_keys(old, new)
        restart = tuple(k for k in changed if _needs_restart(k))
        applied = tuple(k for k in changed if not _needs_restart(k))
        if restart:
            log.warn(
                "configuration reload: {keys} changed, but take effect only "
                "after a restart",
                keys=", ".join(restart),
            )
        kept = _keep(new, old, RESTART_KEYS)
        gateway = self.gateway
        gateway.runtimes.sync(kept.policy.core_profiles)
        if self.supervisor is not None:
            self.supervisor.signal_all("HUP")
        gateway.handler.policy = gateway.recipient_policy(kept)
        gateway.handler.hostname = kept.sender_helo_domain
        gateway.handler.max_queue = kept.spool.max_queue
        gateway.relay.reconfigure(kept.sender_helo_domain)
        gateway.probe.helo = kept.sender_helo_domain
        gateway.processor.hostname = kept.sender_helo_domain
        gateway.queue.retry = retry_policy(kept)
        gateway.history.quarantine_days = kept.store.quarantine_days
        gateway.outbox.limit = kept.store.outbox_limit
        try:
            tls_options = listener_tls_options(kept)
        except Exception as e:  # pyOpenSSL's own errors included
            log.error("TLS certificate not reloaded: {error}", error=str(e))
            tls_options = None
        for factory in gateway.factories:
            apply_settings(factory, old.listeners, kept)
            if factory.tls_options is not None and tls_options is not None:
                factory.tls_options = tls_options
        self._reload_tokens(kept)
        gateway.live.current = kept
        log.info(
            "configuration {config_version} loaded from {path}",
            config_version=new.version,
            path=new.path,
            rules=len(new.policy.rules),
            applied=list(applied),
        )
        return ReloadResult(True, (), applied, restart)

    def _reload_tokens(self, config: GatewayConfig) -> None:
        """
        Read the admin token file again (names may have been added or
        removed); a file with problems leaves the tokens in force.
        """
        if self.admin_api is None:
            return
        try:
            self.admin_api.set_tokens(load_tokens(config.admin.token_file))
        except (OSError, ValueError) as e:
            log.error(
                "admin tokens not reloaded, the old ones stay: {error}", error=str(e)
            )

    def _worker_spool_status(self) -> list[SpoolStatus]:
        if self.supervisor is None:
            return []
        return snapshot_spools(self.supervisor.snapshots())

    def _worker_spools(self) -> list[tuple[int, str]]:
        if not self.gateway.role.primary:
            return []
        root = self.config.spool.directory
        return [(k, worker_spool(root, k)) for k in range(1, self.config.workers)]


def _get(config: Any, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _needs_restart(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RESTART_KEYS)


def changed_keys(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """
    The settings (dotted keys) that differ between two configurations.
    """
    changed: list[str] = []
    for field in attrs.fields(GatewayConfig):
        name = field.name
        if name in ("version", "path") or not field.eq:
            # Where it came from, and what only describes it (the document
            # as loaded), are not settings.
            continue
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if name in _SECTIONS:
            changed.extend(
                f"{name}.{inner.name}"
                for inner in attrs.fields(type(before))
                if getattr(before, inner.name) != getattr(after, inner.name)
            )
        else:
            changed.append(name)
    return changed


def _keep(new: GatewayConfig, old: GatewayConfig, keys: tuple[str, ...]) -> Any:
    """
    C{new} with the settings named by C{keys} as they are in C{old}.
    """
    top: dict[str, Any] = {}
    for key in keys:
        section, _, inner = key.partition(".")
        if not inner:
            top[section] = getattr(old, section)
            continue
        current = top.get(section, getattr(new, section))
        top[section] = attrs.evolve(current, **{inner: _get(old, key)})
    return attrs.evolve(new, **top)


def adopt_listener(reactor: Any, fd: int, factory: Factory) -> IListeningPort:
    """
    Serve C{factory} on the listening socket inherited as C{fd} (a worker
    shares the primary's sockets).
    """
    import socket

    sock = socket.socket(fileno=fd)
    try:
        port: IListeningPort = reactor.adoptStreamPort(
            sock.fileno(), sock.family, factory
        )
    finally:
        sock.close()  # adoptStreamPort keeps a duplicate
    return port
