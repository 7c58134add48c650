# -*- test-case-name: tests.test_tap -*-
"""
twistd/twist wiring: options, the gateway service, ordered start and drain.

This is one way of putting the pieces together; L{build_listener_factory}
and the classes it uses can be wired by any other Twisted program.
"""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import socket
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import attrs
from twisted.application.service import IService, MultiService
from twisted.cred.checkers import FilePasswordDB
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, globalLogPublisher
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from mdgateway.config import (
    ConfigError,
    GatewayConfig,
    ListenerConfig,
    endpoint_address,
    load_config,
)
from mdgateway.message.dsn import (
    DsnMessage,
    DsnSuppressedError,
    RecipientResult,
    write_dsn,
)
from mdgateway.message.marker import (
    load_or_create_secret,
    make_marker,
    read_markers,
    scan_markers,
)
from mdgateway.ops.admin import AdminAPI
from mdgateway.ops.metrics import Metrics
from mdgateway.ops.operations import GatewayOperations
from mdgateway.policy.rules import Rule
from mdgateway.queue.entry import SpoolEntry, SpoolInUseError
from mdgateway.queue.manager import (
    BounceMaker,
    LogHistory,
    LoopGuard,
    Pipeline,
    RetryPolicy,
    TeeHistory,
)
from mdgateway.queue.processing import CopyProcessor
from mdgateway.queue.report import MetricsHistory, StoreHistory
from mdgateway.queue.spool import Spool
from mdgateway.receive.admission import CachingVerifier, RulePolicy
from mdgateway.receive.handler import EnvelopeHandler, IRecipientPolicy
from mdgateway.receive.verification import SmtpRecipientVerifier, read_password
from mdgateway.relay import maildir
from mdgateway.relay.delivery import Outgoing, Relay
from mdgateway.relay.hosts import DNSPythonResolver
from mdgateway.run.supervisor import (
    Supervisor,
    WorkerRole,
    stale_worker_spools,
    worker_command,
    worker_environment,
    worker_spool,
)
from mdgateway.scan.runtime import CoreRuntime
from mdgateway.smtp.server import SessionSettings
from mdgateway.smtp.serverprotocol import (
    ProtocolLimits,
    ProxyHeaderFactory,
    SMTPServerFactory,
    listening_factory,
)
from mdgateway.smtp.tls import server_tls_options
from mdgateway.store import store_for
from mdgateway.store.interfaces import Refusal

log = Logger()


class Options(usage.Options):
    """
    C{twist mdgateway --config FILE}.
    """

    synopsis = "--config FILE"
    optParameters = [
        ["config", "c", "etc/mdgateway.toml", "the TOML configuration file"],
    ]

    def postOptions(self) -> None:
        try:
            self["gateway_config"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(
                "invalid configuration:\n  " + "\n  ".join(e.problems)
            ) from None


def session_settings(
    listener: ListenerConfig, config: GatewayConfig
) -> SessionSettings:
    """
    What a listener's sessions offer and enforce under C{config}.
    """
    limits = config.limits
    return SessionSettings(
        hostname=config.sender_helo_domain,
        tls_mode=listener.tls,
        max_message_size=limits.message_size,
        max_recipients=limits.recipients,
        max_errors=limits.errors,
        auth_mechanisms=("PLAIN", "LOGIN") if listener.auth != "off" else (),
        auth_required=listener.auth == "required",
    )


def protocol_limits(listener: ListenerConfig, config: GatewayConfig) -> ProtocolLimits:
    """
    The framing limits of a listener's sessions under C{config}.
    """
    limits = config.limits
    return ProtocolLimits(
        max_command_line=limits.command_line_length,
        max_line_length=limits.data_line_length,
        max_received=limits.received_headers,
        idle_timeout=limits.idle_timeout,
        session_deadline=limits.session_deadline,
        max_connections=listener.max_connections,
        max_connections_per_client=listener.max_connections_per_client,
    )


def build_listener_factory(
    listener: ListenerConfig,
    config: GatewayConfig,
    gateway: EnvelopeHandler,
    clock: IReactorTime,
) -> tuple[SMTPServerFactory, Any]:
    """
    The SMTP factory for one configured listener, and the factory to listen
    with (the first wrapped for implicit TLS and PROXY as configured).
    """
    tls_options = None
    if listener.tls != "none" and config.tls.certificate and config.tls.key:
        tls_options = server_tls_options(
            config.tls.certificate,
            config.tls.key,
            config.tls.chain,
            config.tls.min_version,
            config.tls.ciphers,
        )
    factory = SMTPServerFactory(
        name=listener.name,
        settings=session_settings(listener, config),
        handler=gateway,
        clock=clock,
        limits=protocol_limits(listener, config),
        tls_options=tls_options,
        config_version=config.version,
    )
    wrapped = listening_factory(
        factory,
        proxy_trusted=listener.trusted_proxies if listener.proxy_protocol else None,
    )
    return factory, wrapped


def load_or_create_token(path: str) -> str:
    """
    The admin bearer token from C{path}; on first start a random one is
    written there (mode 0600). Blocking: run it in a thread.
    """
    import secrets

    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path) or ".", 0o700, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token


def _dsn_result(
    address: str, record: dict[str, Any], delayed: bool, retry_until: float
) -> RecipientResult:
    """
    One recipient's pipeline state as a DSN entry.
    """
    code = record.get("code")
    enhanced = str(record.get("enhanced") or "")
    text = str(record.get("text") or "")
    valid = re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", enhanced) is not None
    if delayed:
        status = enhanced if valid and enhanced.startswith("4.") else "4.0.0"
    else:
        status = enhanced if valid and enhanced[:2] in ("4.", "5.") else "5.0.0"
    server = str(record.get("server") or "")
    remote = server.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]") or None
    return RecipientResult(
        address,
        "delayed" if delayed else "failed",
        status,
        remote_mta=remote if server and not server.startswith("maildir") else None,
        diagnostic_code=f"smtp; {code} {enhanced} {text}".strip()
        if code
        else text or None,
        last_attempt=record.get("at"),
        will_retry_until=retry_until if delayed else None,
    )


def _retry_policy(config: GatewayConfig) -> RetryPolicy:
    delivery = config.delivery
    return RetryPolicy(
        first=delivery.retry_first,
        maximum=delivery.retry_max,
        lifetime=delivery.lifetime,
        delay_warning=delivery.delay_warning,
    )


class GatewayService(MultiService):
    """
    The running gateway: spool recovery, the Core runtimes and pipeline,
    then listeners; on stop, drain in the reverse order.
    """

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        policy: IRecipientPolicy | None = None,
        role: WorkerRole | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.role = role or WorkerRole()
        self.supervisor: Supervisor | None = None
        self.threadpool = ThreadPool(
            minthreads=1, maxthreads=config.spool.threads, name="mdgateway-spool"
        )
        # Decomposing and rebuilding large messages is slow work of its own;
        # DNS waits can last seconds. Each has its own threads, so neither
        # holds up the spool's fsyncs.
        self.work_threadpool = ThreadPool(
            minthreads=0, maxthreads=4, name="mdgateway-work"
        )
        self.dns_threadpool = ThreadPool(
            minthreads=0, maxthreads=4, name="mdgateway-dns"
        )
        self.spool = Spool(
            worker_spool(config.spool.directory, self.role.index),
            reactor,
            self.threadpool,
            min_free_bytes=config.spool.min_free,
        )
        self.resolver = DNSPythonResolver(reactor, self.dns_threadpool)
        self.verifier = CachingVerifier(
            SmtpRecipientVerifier(reactor, config.sender_helo_domain, self.resolver),
            reactor,
        )
        self.metrics = Metrics()
        self.store_threadpool = ThreadPool(
            minthreads=0, maxthreads=5, name="mdgateway-store"
        )
        self.store = store_for(config.store.location, reactor, self.store_threadpool)
        self.runtimes: dict[str, CoreRuntime] = {}
        self.secret = b""
        checker = None
        auth_files = {
            listener.auth_users_file
            for listener in config.listeners
            if listener.auth_users_file
        }
        if auth_files:
            checker = FilePasswordDB(sorted(auth_files)[0], cache=True)
        self.relay = Relay(
            reactor=reactor,
            helo=config.sender_helo_domain,
            resolver=self.resolver,
            threadpool=self.work_threadpool,
            maildir_writer=self._write_maildir,
            password_reader=read_password,
        )
        self.store_history = StoreHistory(
            self.store,
            reactor,
            self.work_threadpool,
            instance=config.store.instance,
            quarantine_days=config.store.quarantine_days,
        )
        self.processor = CopyProcessor(
            reactor=reactor,
            threadpool=self.work_threadpool,
            scanner_for=self._scanner,
            hostname=config.sender_helo_domain,
            metrics=self.metrics,
        )
        self.pipeline = Pipeline(
            spool=self.spool,
            policy=lambda: self.config.policy,
            processor=self.processor,
            relay=self.relay,
            reactor=reactor,
            threadpool=self.work_threadpool,
            loop_guard=LoopGuard(self._marker, self._count_markers),
            bounces=BounceMaker(self._write_bounce),
            retry=_retry_policy(config),
            concurrency=config.delivery.concurrency,
            history=TeeHistory(
                self.store_history,
                LogHistory(),
                MetricsHistory(self.metrics),
            ),
        )
        self.pipeline.on_bounce = self.metrics.bounce
        self.gateway = EnvelopeHandler(
            hostname=config.sender_helo_domain,
            spool=self.spool,
            policy=policy or self._recipient_policy(config),
            clock=reactor,
            checker=checker,
            looped=self._looped,
            on_queued=self._queued,
            on_refused=self._refused,
            max_queue=config.spool.max_queue,
        )
        self.gateway.on_connection = self._connection
        self.operations = GatewayOperations(
            reactor=reactor,
            spool=self.spool,
            pipeline=self.pipeline,
            store=self.store,
            metrics=self.metrics,
            policy=lambda: self.config.policy,
            reload=self.reload,
            checks=self._checks,
            worker_spools=self._worker_spools,
        )
        self._watch_metrics()
        self.admin_port: IListeningPort | None = None
        self.purger = LoopingCall(self._purge)
        self.purger.clock = reactor
        self.emulator: Supervisor | None = None
        self.factories: list[SMTPServerFactory] = []
        self.ports: list[IListeningPort] = []
        self.ready: Deferred[None] = Deferred()
        self.draining = False

    # -- seams handed to the pieces ------------------------------------------

    def _recipient_policy(self, config: GatewayConfig) -> IRecipientPolicy:
        return RulePolicy(config.policy, self.verifier, self._scanning)

    def _queued(self, entry: SpoolEntry) -> None:
        self.metrics.message_accepted(entry.envelope.listener)
        for recipient in entry.envelope.recipients:
            self.metrics.rule_matched(recipient.rule, recipient.direction)
        self.pipeline.submit(entry)

    def _connection(self, info: Any, opened: bool) -> None:
        if opened:
            self.metrics.session_opened(info.listener)
            return
        self.metrics.session_closed(info.listener)
        if info.tls_version:
            self.metrics.tls_established(info.listener, info.tls_version)

    def _watch_metrics(self) -> None:
        metrics = self.metrics
        metrics.watch_queue_depth(lambda: self.spool.entry_count)
        metrics.watch_queue_oldest_seconds(self.spool.oldest_age)
        metrics.watch_core_servers_up(
            lambda: {
                name: sum(1 for s in runtime.status() if s.up)
                for name, runtime in self.runtimes.items()
            }
        )
        metrics.watch_relay_throttled(
            lambda: {
                name: bool(self.relay.throttled_until(profile))
                for name, profile in self.config.policy.smtp_profiles.items()
            }
        )

    def _checks(self) -> dict[str, bool]:
        """
        Readiness: listeners up, spool writable, a healthy server in every
        Core and relay profile in use, not draining.
        """
        policy = self.config.policy
        core = all(
            any(s.up for s in self.runtimes[p.name].status())
            for p in policy.core_profiles_in_use()
            if p.name in self.runtimes
        )
        relay = all(self.relay.healthy(p) for p in policy.smtp_profiles_in_use())
        return {
            "listening": bool(self.ports)
            and len(self.ports) == len(self.config.listeners),
            "spool_writable": self.spool.writable(),
            "core": core,
            "relay": relay,
            "not_draining": not self.draining,
        }

    def _refused(
        self, info: Any, sender: str | None, recipient: str | None, reply: Any
    ) -> None:
        self.metrics.refused(reply.code, reply.status or None, reply.text)
        refusal = Refusal(
            at=self.reactor.seconds(),
            listener=info.listener,
            client_address=info.client[0],
            code=reply.code,
            reason=reply.text,
            enhanced=reply.status or None,
            helo=info.helo,
            sender=sender,
            recipient=recipient,
        )
        d = Deferred.fromCoroutine(self.store.record_refusal(refusal))
        d.addErrback(lambda f: log.failure("could not record a refusal", f))

    async def _purge(self) -> None:
        counts = await self.store.purge(
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

    def _scanner(self, profile_name: str) -> CoreRuntime:
        return self.runtimes[profile_name]

    def _scanning(self, rule: Rule) -> bool:
        runtime = self.runtimes.get(rule.core_profile.name)
        return runtime is None or runtime.available()

    def _marker(self, message_id: str, now: float, body: bytes) -> str:
        return make_marker(self.secret, message_id, now, body)[1]

    def _count_markers(self, path: str, now: float, body: bytes | None) -> int:
        max_age = self.config.delivery.marker_max_age
        if body is None:
            count = read_markers(path, self.secret, now, max_age=max_age)
        else:
            with open(path, "rb") as f:
                count = scan_markers(f, self.secret, now, max_age=max_age, body=body)
        for check in count.invalid:
            log.info(
                "ignoring a {reason} loop marker for {marker_id}",
                reason=check.reason,
                marker_id=check.message_id,
            )
        return count.valid

    def _looped(self, head: bytes, body: bytes) -> bool:
        count = scan_markers(
            io.BytesIO(head),
            self.secret,
            self.reactor.seconds(),
            max_age=self.config.delivery.marker_max_age,
            body=body,
        )
        return count.looped

    def _write_maildir(self, folder: str, outgoing: Outgoing) -> str:
        return maildir.deliver(
            folder,
            outgoing.path,
            sender=outgoing.sender,
            recipients=[r.address for r in outgoing.recipients],
            now=self.reactor.seconds(),
            prefix=outgoing.prefix,
            offset=outgoing.offset,
            hostname=self.config.sender_helo_domain,
        )

    def _write_bounce(
        self,
        message_path: str,
        envelope: Any,
        results: dict[str, dict[str, Any]],
        path: str,
        delayed: bool,
    ) -> DsnMessage | None:
        """
        Write the DSN for C{results} (blocking); L{None} when none is due.
        """
        retry_until = envelope.received_at + self.config.delivery.lifetime
        try:
            return write_dsn(
                path,
                message_path,
                envelope,
                [_dsn_result(a, r, delayed, retry_until) for a, r in results.items()],
                reporting_mta=self.config.sender_helo_domain,
                now=self.reactor.seconds(),
                arrival_date=envelope.received_at,
            )
        except DsnSuppressedError as e:
            log.info(
                "no DSN for {queue_id}: {reason}",
                queue_id=envelope.queue_id,
                reason=str(e),
            )
            return None

    # -- life cycle ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.threadpool.start()
        self.work_threadpool.start()
        self.dns_threadpool.start()
        self.store_threadpool.start()
        d = Deferred.fromCoroutine(self._start())
        d.addErrback(self._failed_start)

    async def _start(self) -> None:
        self.secret = await deferToThreadPool(
            self.reactor,
            self.threadpool,
            load_or_create_secret,
            self.config.delivery.loop_secret_file,
        )
        primary = self.role.primary
        if primary and self.config.emulator.enabled:
            await self._start_emulator()
        self._sync_runtimes(self.config)
        await self.store.open()
        if primary:
            self.purger.start(3600, now=True).addErrback(
                lambda f: log.failure("retention job failed", f)
            )
            await self.spool.acquire()
            stale_spools = await deferToThreadPool(
                self.reactor,
                self.threadpool,
                stale_worker_spools,
                self.config.spool.directory,
                self.config.workers,
            )
            for stale in stale_spools:
                try:
                    await self.spool.adopt(stale)
                except SpoolInUseError as e:
                    # A retired worker still draining: its messages are
                    # safe where they are; the next start adopts them.
                    log.warn("not adopted yet: {error}", error=str(e))
        else:
            # A predecessor of this worker may still be draining.
            await self.spool.acquire(wait=self.config.drain_timeout + 30)
        entries = await self.spool.recover()
        log.info(
            "spool {directory}: {count} message(s) recovered",
            directory=self.spool.root,
            count=len(entries),
        )
        await self.pipeline.clear_scratch()
        self.pipeline.start(entries)
        for listener in self.config.listeners:
            factory, wrapped = build_listener_factory(
                listener, self.config, self.gateway, self.reactor
            )
            if isinstance(wrapped, ProxyHeaderFactory):
                wrapped.on_error = partial(self.metrics.proxy_error, listener.name)
            if primary:
                port = await self._listen(listener.endpoint, wrapped)
            else:
                port = adopt_listener(
                    self.reactor, self.role.listen_fds[listener.name], wrapped
                )
            self.factories.append(factory)
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
        if primary and self.config.admin.endpoint:
            await self._start_admin()
        if primary and self.config.workers > 1:
            self._start_workers()
        self.ready.callback(None)

    async def _listen(self, description: str, factory: Any) -> IListeningPort:
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
        self.metrics.remote = self.supervisor.snapshots
        supervisor = self.supervisor
        self.metrics.watch_workers(lambda: supervisor.running)
        self.supervisor.start()

    async def _start_admin(self) -> None:
        settings = self.config.admin
        token = await deferToThreadPool(
            self.reactor, self.threadpool, load_or_create_token, settings.token_file
        )
        api = AdminAPI(self.operations, token, self.reactor)
        site = api.site()
        site.noisy = False
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

    def _sync_runtimes(self, config: GatewayConfig) -> None:
        """
        One Core runtime per Core profile; a changed profile gets a new one.
        """
        for name, profile in config.policy.core_profiles.items():
            runtime = self.runtimes.get(name)
            if runtime is not None and runtime.profile == profile:
                continue
            if runtime is not None:
                runtime.close()
            self.runtimes[name] = CoreRuntime.from_profile(profile, self.reactor)

    def _failed_start(self, failure: Any) -> None:
        log.critical(
            "mdgateway failed to start: {error}", error=failure.getErrorMessage()
        )
        self.ready.addErrback(lambda _: None)
        self.ready.errback(failure)
        if self.reactor.running:
            # Exit non-zero, so a supervisor (systemd, a test) sees it.
            self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self.reactor.stop()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.draining = True
        if self.config.drain_grace and self.role.primary:
            # Readiness is red now; give the load balancer time to notice
            # before the listener goes away.
            log.info(
                "draining: not ready; listeners close in {grace}s",
                grace=self.config.drain_grace,
            )
            await deferLater(self.reactor, self.config.drain_grace, lambda: None)
        self.gateway.accepting = False
        workers_stopped: Deferred[None] = succeed(None)
        if self.supervisor is not None:
            workers_stopped = Deferred.fromCoroutine(
                self.supervisor.stop(self.config.drain_timeout + 30)
            )
        log.info("draining: listeners closed, sessions finishing")
        await DeferredList([succeed(p.stopListening()) for p in self.ports])
        sessions = [s for f in self.factories for s in f.sessions]
        for session in sessions:
            session.drain()
        deadline = self.reactor.seconds() + self.config.drain_timeout
        while self._live_sessions() and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.1, lambda: None)
        for factory in self.factories:
            for session in list(factory.sessions):
                session.abort()
        await self.pipeline.stop()
        await workers_stopped
        if self.admin_port is not None:
            await maybeDeferred(self.admin_port.stopListening)
        if self.purger.running:
            self.purger.stop()
        await self.store_history.drain()
        await self.store.close()
        for runtime in self.runtimes.values():
            await runtime.close()
        if self.emulator is not None:
            await self.emulator.stop(10)
        await self.spool.close()
        self.threadpool.stop()
        self.work_threadpool.stop()
        self.dns_threadpool.stop()
        self.store_threadpool.stop()
        await super().stopService()
        log.info("stopped")

    def reload(self) -> tuple[bool, list[str]]:
        """
        Load the configuration file again. If it is valid, new sessions use
        its rules and limits while sessions in progress keep theirs; if not,
        the running configuration stays and every problem is logged.
        Listener, TLS and spool changes need a restart.
        """
        try:
            new = load_config(self.config.path)
        except ConfigError as e:
            for problem in e.problems:
                log.error("configuration reload refused: {problem}", problem=problem)
            return False, list(e.problems)
        old = self.config
        kept = ("listeners", "tls", "spool", "workers")
        if any(getattr(new, k) != getattr(old, k) for k in kept):
            log.warn(
                "listener, TLS, spool and process count changes take effect "
                "after a restart; rules and limits are applied now"
            )
        self._sync_runtimes(new)
        if self.supervisor is not None:
            self.supervisor.signal_all("HUP")
        self.gateway.policy = self._recipient_policy(new)
        self.gateway.hostname = new.sender_helo_domain
        for factory in self.factories:
            for listener in old.listeners:
                if listener.name == factory.name:
                    factory.settings = session_settings(listener, new)
                    factory.limits = protocol_limits(listener, new)
                    factory.config_version = new.version
        self.config = attrs.evolve(new, **{k: getattr(old, k) for k in kept})
        log.info(
            "configuration {config_version} loaded from {path}",
            config_version=new.version,
            path=new.path,
            rules=len(new.policy.rules),
        )
        return True, []

    def _worker_spools(self) -> list[tuple[int, str]]:
        if not self.role.primary:
            return []
        root = self.config.spool.directory
        return [(k, worker_spool(root, k)) for k in range(1, self.config.workers)]

    def _live_sessions(self) -> int:
        return sum(len(f.sessions) for f in self.factories)


def adopt_listener(reactor: Any, fd: int, factory: Any) -> IListeningPort:
    """
    Serve C{factory} on the listening socket inherited as C{fd} (a worker
    shares the primary's sockets).
    """
    sock = socket.socket(fileno=fd)
    try:
        port: IListeningPort = reactor.adoptStreamPort(
            sock.fileno(), sock.family, factory
        )
    finally:
        sock.close()  # adoptStreamPort keeps a duplicate
    return port


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config: GatewayConfig = options["gateway_config"]
    service = GatewayService(config, reactor)
    _install_signals(reactor, service)
    return service


def _install_signals(reactor: Any, service: GatewayService) -> None:
    # twistd and twist handle SIGTERM and SIGINT (orderly stop); SIGHUP
    # reloads the configuration, as operators expect of a daemon.
    if os.name == "posix":
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(service.reload))


__all__: Sequence[str] = ["GatewayService", "Options", "build_listener_factory"]
