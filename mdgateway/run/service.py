# -*- test-case-name: tests.test_embedding -*-
"""
The running gateway as a Twisted service: ordered start (spool recovery,
Core runtimes, the store, the queue, then listeners), reload, readiness,
and an orderly drain in the reverse order.
"""

from __future__ import annotations

import os
import socket
import sys
from contextlib import suppress
from functools import partial
from typing import Any, cast

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IListeningPort, IReactorSocket
from twisted.internet.protocol import Factory, ServerFactory
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from mdgateway.config import ConfigError, GatewayConfig, ListenerConfig, load_config
from mdgateway.ops.admin import AdminAPI
from mdgateway.ops.console import Console, mount
from mdgateway.ops.health import Dependencies, StoreWatch
from mdgateway.ops.interfaces import OperationError, ReloadResult
from mdgateway.ops.operations import GatewayOperations
from mdgateway.ops.overview import GatewayOverview, SpoolStatus, snapshot_spools
from mdgateway.ops.tokens import load_or_create_tokens, load_tokens
from mdgateway.queue.entry import SpoolInUseError
from mdgateway.receive.listeners import apply_settings, listener_tls_options
from mdgateway.run.binding import (
    AddressInUseError,
    StartError,
    exit_after_shutdown,
    listen_now,
    listening_socket,
    retrying,
)
from mdgateway.run.compose import Gateway, cluster_link, retry_policy
from mdgateway.run.notify import SystemdNotifier
from mdgateway.run.reloadkeys import RESTART_KEYS, changed_keys, keep, needs_restart
from mdgateway.run.supervisor import (
    ChildNotReadyError,
    Supervisor,
    stale_worker_spools,
    worker_command,
    worker_environment,
    worker_spool,
)
from mdgateway.smtp.serverprotocol import ProxyHeaderFactory

log = Logger()


class GatewayService(MultiService):
    """
    One gateway process at run time.

    @param listen: bind the configured listeners (the primary), or adopt the
        sockets the primary passed down (a worker). An embedder that serves
        L{Gateway.smtp_factory} on endpoints of its own passes C{False}.
    @param exit_on_failure: the process is this gateway (the plugin): a
        start that fails ends it with status 1; before the reactor runs, at
        once by C{SystemExit} with one line naming the key at fault.
    @param notifier: tells systemd when the gateway is ready, reloading
        and stopping (C{Type=notify}).
    """

    def __init__(
        self,
        gateway: Gateway,
        *,
        listen: bool = True,
        exit_on_failure: bool = False,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        super().__init__()
        self.gateway = gateway
        self.reactor = gateway.reactor
        self.listen = listen
        self.exit_on_failure = exit_on_failure
        self._bound_now = False
        self.notifier = notifier
        #: The emulator's listening socket, bound here and served by it.
        self.emulator_socket: socket.socket | None = None
        self.supervisor: Supervisor | None = None
        self.emulator: Supervisor | None = None
        self.store_watch = StoreWatch(gateway.store, self.reactor)
        #: The way to the other instances of a cluster (the primary's).
        self.cluster = cluster_link(self)
        self.dependencies = Dependencies(
            policy=gateway.live.policy,
            core_status=self._core_status,
            relay_healthy=gateway.relay.healthy,
            relay_throttled_until=gateway.relay.throttled_until,
            store=self.store_watch,
        )
        self.operations = GatewayOperations(
            reactor=self.reactor,
            spool=gateway.spool,
            pipeline=gateway.queue,
            store=gateway.store,
            metrics=gateway.metrics,
            policy=gateway.live.policy,
            reload=self.reload_notified,
            checks=self.checks,
            details=self.details,
            worker_spools=self._worker_spools,
            threadpool=gateway.threads.spool,
            instance=lambda: self.config.store.instance,
            ask_worker=self._ask_worker,
            cluster=self.cluster,
            overview=GatewayOverview(
                config=lambda: gateway.live.current,
                runtimes=gateway.runtimes.items,
                relay=gateway.relay,
                spool=gateway.spool,
                worker_spools=self._worker_spool_status,
                readiness=lambda: self.operations.readiness(),
                restart_keys=RESTART_KEYS,
            ),
            dependencies=self.dependencies.report,
        )
        self._watch_metrics()
        self.admin_port: IListeningPort | None = None
        self.admin_api: AdminAPI | None = None
        self.admin_site: Any = None
        self.purger = LoopingCall(self._purge)
        self.purger.clock = self.reactor
        #: The listening ports by listener name.
        self.listener_ports: dict[str, IListeningPort] = {}
        self.ready: Deferred[None] = Deferred()
        self.draining = False

    @property
    def config(self) -> GatewayConfig:
        return self.gateway.live.current

    @property
    def ports(self) -> list[IListeningPort]:
        """
        The listeners' ports, in configuration order.
        """
        return [
            self.listener_ports[listener.name]
            for listener in self.config.listeners
            if listener.name in self.listener_ports
        ]

    # -- readiness and metrics -------------------------------------------------

    def _watch_metrics(self) -> None:
        gateway = self.gateway
        metrics = gateway.metrics
        metrics.watch_queue_depth(lambda: gateway.spool.entry_count)
        metrics.watch_queue_oldest_seconds(gateway.spool.oldest_age)
        metrics.watch_core_servers_up(gateway.runtimes.servers_up)
        metrics.watch_outbox(lambda: gateway.outbox.depth, gateway.outbox.oldest_age)
        metrics.watch_relay_up(
            lambda: {
                profile.name: gateway.relay.healthy(profile)
                for profile in self.config.policy.smtp_profiles_in_use()
            }
        )
        metrics.watch_store_up(lambda: self.store_watch.ok)
        metrics.watch_relay_throttled(
            lambda: {
                name: bool(gateway.relay.throttled_until(profile))
                for name, profile in self.config.policy.smtp_profiles.items()
            }
        )

    def checks(self) -> Deferred[dict[str, bool]]:
        """
        Readiness: what this instance alone can fix. Core servers, relays
        and the store are shared by every instance; their state is in
        L{Dependencies}, not here (see L{mdgateway.ops.health}).
        """
        return Deferred.fromCoroutine(self._checks())

    async def _checks(self) -> dict[str, bool]:
        gateway = self.gateway
        listening = (
            bool(self.ports) and len(self.ports) == len(self.config.listeners)
            if self.listen
            else gateway.handler.ready
        )
        return {
            "listening": listening and gateway.handler.ready,
            # A fresh reading (at most a second old), not the last probe's.
            "spool_writable": await gateway.spool.refresh_space(),
            "not_draining": not self.draining,
            "outbox_not_full": not gateway.outbox.full,
        }

    def details(self) -> dict[str, Any]:
        """
        What readiness shows beside its checks: the outbox of records for
        the store (depth, limit, oldest age, whether the store answers).
        """
        return {"outbox": attrs.asdict(self.gateway.outbox.status())}

    def _core_status(self, profile: str) -> Any:
        runtimes = self.gateway.runtimes
        return runtimes[profile].status() if profile in runtimes else None

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

    def privilegedStartService(self) -> None:
        # twistd calls this before it drops privileges: bind port 25 here.
        self._bind_now()
        super().privilegedStartService()

    def startService(self) -> None:
        self._bind_now()
        super().startService()
        self.gateway.threads.start()
        d = Deferred.fromCoroutine(self._start())
        d.addErrback(self._failed_start)

    def _bind_now(self) -> None:
        """
        Before the reactor runs (twist, twistd), bind the emulator's port,
        every listener and the admin API synchronously, so a port that
        cannot be had stops the start before anything else happens. An
        address in use is left for L{_start} to wait for.
        """
        gateway = self.gateway
        if (
            self.reactor.running
            or not gateway.role.primary
            or not self.listen
            or self._bound_now
        ):
            return
        # Once: twistd calls privilegedStartService, then startService.
        self._bound_now = True
        try:
            if self.config.emulator.enabled:
                with suppress(AddressInUseError):
                    self.emulator_socket = listening_socket(
                        self.config.emulator.endpoint, key="emulator.endpoint"
                    )
            for index, listener in enumerate(self.config.listeners):
                with suppress(AddressInUseError):
                    self._listening(listener, self._listen_once(index, listener))
            if self.config.admin.endpoint:
                self._listen_admin(load_or_create_tokens(self.config.admin.token_file))
        except StartError as e:
            self._unbind()
            if self.exit_on_failure:
                raise SystemExit(f"mdgateway: cannot start: {e}") from None
            raise

    def _unbind(self) -> None:
        for port in [*self.ports, self.admin_port]:
            if port is not None:
                port.stopListening()
        self.listener_ports = {}
        self.admin_port = None
        if self.emulator_socket is not None:
            self.emulator_socket.close()
            self.emulator_socket = None

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
            self.store_watch.start()
        if primary:
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
        if primary and self.cluster is not None:
            await self.cluster.start()
        gateway.handler.ready = True
        if self.listen:
            await self._start_listeners()
        if primary and config.admin.endpoint:
            if self.admin_port is None:
                await self._start_admin()
            await self._mount_console()
        if primary and self.listen and config.workers > 1:
            self._start_workers()
        if primary:
            self.purger.start(3600, now=True).addErrback(
                lambda f: log.failure("retention job failed", f)
            )
        log.info(
            "ready: config {config_version}, {listeners} listener(s)",
            config_version=config.version,
            listeners=len(self.ports),
            gateway_ready=True,
        )
        if self.notifier is not None:
            self.notifier.ready(
                f"ready: config {config.version}, {len(self.ports)} listener(s)"
            )
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

    def _listener_factory(self, name: str) -> Factory:
        wrapped = self.gateway.smtp_factory(name)
        if isinstance(wrapped, ProxyHeaderFactory):
            wrapped.on_error = partial(self.gateway.metrics.proxy_error, name)
        # "Starting factory" lines say nothing the listening line does not.
        wrapped.noisy = False
        return wrapped

    def _listening(self, listener: ListenerConfig, port: IListeningPort) -> None:
        self.listener_ports[listener.name] = port
        host = port.getHost()
        log.info(
            "listening on {listener}: {host}:{port} (tls {tls}, proxy {proxy})",
            listener=listener.name,
            host=getattr(host, "host", host),
            port=getattr(host, "port", ""),
            tls=listener.tls,
            proxy=listener.proxy_protocol,
        )

    def _listen_once(self, index: int, listener: ListenerConfig) -> IListeningPort:
        return listen_now(
            self.reactor,
            listener.endpoint,
            self._listener_factory(listener.name),
            key=f"listeners[{index}].endpoint ({listener.name})",
        )

    async def _start_listeners(self) -> None:
        """
        Open the listeners not bound yet: an address in use is tried again
        for as long as a predecessor may take to drain (after a crash its
        workers still hold the old socket until they have finished).
        """
        gateway = self.gateway
        for index, listener in enumerate(self.config.listeners):
            if listener.name in self.listener_ports:
                continue
            if gateway.role.primary:
                wait = self.config.drain_timeout + 5
                port = await retrying(
                    self.reactor,
                    partial(self._listen_once, index, listener),
                    wait,
                    waiting=listener.endpoint,
                    holder=f" (still, after {wait:g}s)",
                )
            else:
                port = adopt_listener(
                    self.reactor,
                    gateway.role.listen_fds[listener.name],
                    self._listener_factory(listener.name),
                )
            self._listening(listener, port)

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

    def _admin_site(self, tokens: dict[str, str]) -> Any:
        self.admin_api = AdminAPI(self.operations, tokens, self.reactor)
        self.admin_site = self.admin_api.site()
        self.admin_site.noisy = False
        return self.admin_site

    def _listen_admin(self, tokens: dict[str, str]) -> None:
        self.admin_port = listen_now(
            self.reactor,
            self.config.admin.endpoint,
            self._admin_site(tokens),
            key="admin.endpoint",
        )
        self._admin_listening()

    async def _start_admin(self) -> None:
        tokens = await deferToThreadPool(
            self.reactor,
            self.gateway.threads.spool,
            load_or_create_tokens,
            self.config.admin.token_file,
        )
        self._listen_admin(tokens)

    async def _mount_console(self) -> None:
        """
        Serve the web console on the admin listener (its templates are read
        in a thread, so it joins the API once the gateway is starting).
        """
        assert self.admin_api is not None and self.admin_site is not None
        settings = self.config.admin
        console = await Console.create(
            operations=self.operations,
            reactor=self.reactor,
            threadpool=self.gateway.threads.work,
            users_file=settings.users_file,
            token_name=self.admin_api.token_name,
            session_lifetime=settings.session_lifetime,
            secure_cookies=settings.tls,
            instance=self.config.store.instance,
        )
        self.admin_site.resource = mount(self.admin_site.resource, console)

    def _admin_listening(self) -> None:
        settings = self.config.admin
        log.info(
            "admin API listening on {endpoint} (token in {token_file})",
            endpoint=settings.endpoint,
            token_file=settings.token_file,
        )

    async def _start_emulator(self) -> None:
        """
        Start the built-in Core emulator as a process of its own (kept
        alive like a worker) on the socket bound for it, and wait until it
        says it serves.
        """
        settings = self.config.emulator
        if self.emulator_socket is None:
            # A predecessor's emulator may take a moment to go.
            self.emulator_socket = await retrying(
                self.reactor,
                partial(listening_socket, settings.endpoint, key="emulator.endpoint"),
                5.0,
                waiting=settings.endpoint,
                holder=" (another program holds it)",
            )
        command = [
            sys.executable,
            "-m",
            "mdgateway.run.emulator",
            "--endpoint",
            settings.endpoint,
            "--latency",
            repr(settings.latency),
            *(["--instant"] if settings.instant else []),
        ]
        self.emulator = Supervisor(
            reactor=self.reactor,
            clock=self.reactor,
            children=1,
            command=lambda index, fds: [*command, "--fd", str(fds["core"])],
            listen_fds={"core": self.emulator_socket.fileno()},
            observer=globalLogPublisher,
            environment=worker_environment(),
            name="emulator",
            ready_when=lambda event: event.get("emulator_listening") is True,
        )
        self.emulator.start()
        try:
            await self.emulator.wait_ready(timeout=30)
        except ChildNotReadyError as e:
            raise StartError(
                f"emulator: the Core emulator did not start: {e}"
            ) from None

    def _failed_start(self, failure: Failure) -> None:
        self.ready.addErrback(lambda _: None)
        if self.draining:
            # Told to stop while still starting (SIGTERM, Ctrl-C): the stop
            # closed what the start was using; nothing failed.
            log.info("start abandoned: stopping")
            self.ready.errback(failure)
            return
        log.critical(
            "mdgateway failed to start: {error}", error=failure.getErrorMessage()
        )
        self.ready.addErrback(lambda _: None)
        self.ready.errback(failure)
        if self.reactor.running:
            if self.exit_on_failure:
                # Exit non-zero, so a supervisor (systemd, a test) sees it.
                exit_after_shutdown(self.reactor, 1)
            self.reactor.stop()

    # -- stop ----------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        gateway = self.gateway
        config = self.config
        self.draining = True
        if self.notifier is not None:
            self.notifier.stopping()
        for children in (self.supervisor, self.emulator):
            if children is not None:
                children.stopping()
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
        if self.cluster is not None:
            await self.cluster.stop()
        await gateway.queue.stop()
        await workers_stopped
        if self.admin_port is not None:
            await maybeDeferred(self.admin_port.stopListening)
        if self.purger.running:
            self.purger.stop()
        gateway.refusals.stop()
        await gateway.outbox.close(timeout=min(10.0, config.drain_timeout))
        self.store_watch.stop()
        await gateway.store.close()
        await gateway.runtimes.close()
        if self.emulator is not None:
            await self.emulator.stop(10)
        if self.emulator_socket is not None:
            self.emulator_socket.close()
            self.emulator_socket = None
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
        restart = tuple(k for k in changed if needs_restart(k))
        applied = tuple(k for k in changed if not needs_restart(k))
        if restart:
            log.warn(
                "configuration reload: {keys} changed, but take effect only "
                "after a restart",
                keys=", ".join(restart),
            )
        kept = keep(new, old, RESTART_KEYS)
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
        listeners = {listener.name: listener for listener in kept.listeners}
        for factory in gateway.factories:
            apply_settings(factory, old.listeners, kept)
            listener = listeners.get(factory.name)
            if factory.tls_options is None or listener is None:
                continue
            try:
                tls_options = listener_tls_options(listener, kept)
            except Exception as e:  # pyOpenSSL's own errors included
                log.error(
                    "TLS certificate not reloaded on {listener}: {error}",
                    listener=factory.name,
                    error=str(e),
                )
                continue
            if tls_options is not None:
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

    def reload_notified(self) -> ReloadResult:
        """
        L{reload}, with systemd told (C{RELOADING=1}, then C{READY=1} and
        the configuration in force, whether or not the new one loaded).
        """
        if self.notifier is not None:
            self.notifier.reloading()
        result = self.reload()
        if self.notifier is not None:
            state = "loaded" if result.loaded else "refused, the previous one stays"
            self.notifier.ready(f"ready: config {self.config.version} (reload {state})")
        return result

    def _ask_worker(self, index: int, request: dict[str, Any]) -> Deferred[Any]:
        if self.supervisor is None:
            return fail(OperationError(503, f"worker {index} is not running"))
        return self.supervisor.ask(index, request)

    def _worker_spools(self) -> list[tuple[int, str]]:
        if not self.gateway.role.primary:
            return []
        root = self.config.spool.directory
        return [(k, worker_spool(root, k)) for k in range(1, self.config.workers)]


def adopt_listener(
    reactor: IReactorSocket, fd: int, factory: Factory
) -> IListeningPort:
    """
    Serve C{factory} on the listening socket inherited as C{fd} (a worker
    shares the primary's sockets).
    """
    import socket

    sock = socket.socket(fileno=fd)
    try:
        # Every factory we listen with is a server factory (the SMTP one,
        # or the TLS and PROXY wrappers around it); Factory is its type here.
        port: IListeningPort = reactor.adoptStreamPort(
            sock.fileno(), sock.family, cast(ServerFactory, factory)
        )
    finally:
        sock.close()  # adoptStreamPort keeps a duplicate
    return port
