# -*- test-case-name: tests.test_embedding -*-
"""
The composition root: every long-lived piece of one gateway process, built
from a configuration and wired together in one place.

L{build_gateway} is used alike by the twistd plugin, by each worker process
and by programs that embed the gateway. It only builds: nothing touches the
disk or the network until L{mdgateway.run.service.GatewayService} starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
from twisted.cred.checkers import FilePasswordDB
from twisted.internet.protocol import Factory
from twisted.python.threadpool import ThreadPool

from mdgateway.config import GatewayConfig
from mdgateway.ops.cluster import ClusterLink
from mdgateway.ops.metrics import Metrics
from mdgateway.policy.rules import Policy
from mdgateway.queue.bounces import DsnWriter
from mdgateway.queue.history import LogHistory, TeeHistory
from mdgateway.queue.loopguard import MarkerLoopGuard
from mdgateway.queue.manager import QueueManager
from mdgateway.queue.planner import RetryPolicy
from mdgateway.queue.processing import CopyProcessor
from mdgateway.queue.report import MetricsHistory, StoreHistory
from mdgateway.queue.spool import Spool
from mdgateway.receive.admission import CachingVerifier, RulePolicy
from mdgateway.receive.handler import EnvelopeHandler, IRecipientPolicy
from mdgateway.receive.listeners import build_listener_factory
from mdgateway.receive.refusals import RefusalRecorder
from mdgateway.receive.verification import SmtpRecipientVerifier, read_password
from mdgateway.relay.delivery import MaildirWriter, Relay
from mdgateway.relay.hosts import DNSPythonResolver
from mdgateway.run.reactor import IGatewayReactor
from mdgateway.run.supervisor import WorkerRole, worker_spool
from mdgateway.scan.registry import CoreRuntimes
from mdgateway.smtp.interfaces import ConnectionInfo
from mdgateway.smtp.serverprotocol import SMTPServerFactory
from mdgateway.store import store_for
from mdgateway.store.board import ICommandBoard
from mdgateway.store.interfaces import IStore
from mdgateway.store.outbox import Outbox


@attrs.define
class LiveConfig:
    """
    The configuration in force: replaced whole by a reload. Pieces that
    must follow a reload read it through here at each use.
    """

    current: GatewayConfig

    def policy(self) -> Policy:
        return self.current.policy

    def hostname(self) -> str:
        return self.current.sender_helo_domain


@attrs.frozen
class Threads:
    """
    The process's thread pools, one per kind of blocking work, so that a
    slow kind (a 25 MB rebuild, a DNS wait, a store outage) never holds up
    another (the spool's fsyncs before a C{250}).
    """

    spool: ThreadPool
    work: ThreadPool
    dns: ThreadPool
    store: ThreadPool

    @classmethod
    def for_config(cls, config: GatewayConfig) -> Threads:
        return cls(
            spool=ThreadPool(
                minthreads=1, maxthreads=config.spool.threads, name="mdgateway-spool"
            ),
            # Big messages' decomposing and rebuilding may hold at most
            # big_concurrency threads: two more stay free for small ones.
            work=ThreadPool(
                minthreads=0,
                maxthreads=max(4, config.delivery.big_concurrency + 2),
                name="mdgateway-work",
            ),
            dns=ThreadPool(minthreads=0, maxthreads=4, name="mdgateway-dns"),
            store=ThreadPool(minthreads=0, maxthreads=5, name="mdgateway-store"),
        )

    def all(self) -> tuple[ThreadPool, ...]:
        return (self.spool, self.work, self.dns, self.store)

    def start(self) -> None:
        for pool in self.all():
            pool.start()

    def stop(self) -> None:
        for pool in self.all():
            pool.stop()


@attrs.frozen
class Gateway:
    """
    The pieces of one gateway process: receive into the spool, scan with
    Core, relay, and the records and metrics of all three.

    The set is fixed once built; what a reload changes goes through
    L{live} and L{apply}.
    """

    live: LiveConfig
    role: WorkerRole
    reactor: IGatewayReactor
    threads: Threads
    spool: Spool
    store: IStore
    metrics: Metrics
    runtimes: CoreRuntimes
    loop_guard: MarkerLoopGuard
    verifier: CachingVerifier
    #: The recipient probe behind L{verifier} (its EHLO name follows a
    #: reload).
    probe: SmtpRecipientVerifier
    relay: Relay
    outbox: Outbox
    history: StoreHistory
    refusals: RefusalRecorder
    processor: CopyProcessor
    queue: QueueManager
    handler: EnvelopeHandler
    #: An embedder's own recipient policy, kept across reloads.
    policy_override: IRecipientPolicy | None = None
    #: The SMTP factories made by L{smtp_factory}, so a reload reaches them.
    factories: list[SMTPServerFactory] = attrs.field(factory=list)

    @property
    def config(self) -> GatewayConfig:
        return self.live.current

    def smtp_factory(self, listener_name: str) -> Factory:
        """
        The factory that serves the configured listener C{listener_name}
        (TLS and PROXY wrapping as configured): listen with it on any
        endpoint. Sessions get C{451 4.3.2} until the service has started.
        """
        for listener in self.config.listeners:
            if listener.name == listener_name:
                factory, wrapped = build_listener_factory(
                    listener, self.config, self.handler, self.reactor
                )
                self.factories.append(factory)
                return wrapped
        names = ", ".join(listener.name for listener in self.config.listeners)
        raise KeyError(f"no listener {listener_name!r} (configured: {names})")

    def recipient_policy(self, config: GatewayConfig) -> IRecipientPolicy:
        """
        The RCPT-time rule decision under C{config}.
        """
        if self.policy_override is not None:
            return self.policy_override
        return RulePolicy(config.policy, self.verifier, self.runtimes.unavailable)


def retry_policy(config: GatewayConfig) -> RetryPolicy:
    delivery = config.delivery
    return RetryPolicy(
        first=delivery.retry_first,
        maximum=delivery.retry_max,
        lifetime=delivery.lifetime,
        delay_warning=delivery.delay_warning,
    )


def _auth_checker(config: GatewayConfig) -> FilePasswordDB | None:
    files = sorted({listener.auth_users_file or "" for listener in config.listeners})
    files = [f for f in files if f]
    return FilePasswordDB(files[0], cache=True) if files else None


def build_gateway(
    config: GatewayConfig,
    reactor: IGatewayReactor,
    *,
    role: WorkerRole | None = None,
    recipient_policy: IRecipientPolicy | None = None,
) -> Gateway:
    """
    Build (but do not start) every piece of a gateway process.

    @param role: which process of a several-process gateway this is
        (default: the only one).
    @param recipient_policy: decide recipients some other way than by the
        configuration's security rules (an embedder's own policy).
    """
    role = role or WorkerRole()
    live = LiveConfig(config)
    threads = Threads.for_config(config)
    metrics = Metrics()
    spool = Spool(
        worker_spool(config.spool.directory, role.index),
        reactor,
        threads.spool,
        min_free_bytes=config.spool.min_free,
    )
    resolver = DNSPythonResolver(reactor, threads.dns)
    probe = SmtpRecipientVerifier(
        reactor, config.sender_helo_domain, resolver, threads.work
    )
    verifier = CachingVerifier(probe, reactor)
    store = store_for(config.store.location, reactor, threads.store)
    runtimes = CoreRuntimes(reactor, threads.work, on_cache=metrics.core_cache)
    loop_guard = MarkerLoopGuard(
        reactor,
        config.delivery.loop_secret_file,
        lambda: live.current.delivery.marker_max_age,
        lambda: live.current.delivery.relay_once_max_age,
    )
    relay = Relay(
        reactor=reactor,
        helo=config.sender_helo_domain,
        resolver=resolver,
        threadpool=threads.work,
        maildir_writer=MaildirWriter(reactor, live.hostname),
        password_reader=read_password,
    )
    outbox = Outbox(
        os.path.join(spool.root, "outbox"),
        store,
        reactor,
        threads.spool,
        limit=config.store.outbox_limit,
    )
    outbox.on_failed = metrics.outbox_failed
    history = StoreHistory(
        outbox,
        reactor,
        threads.work,
        instance=config.store.instance,
        quarantine_days=config.store.quarantine_days,
    )
    refusals = RefusalRecorder(outbox, metrics, reactor)
    processor = CopyProcessor(
        reactor=reactor,
        threadpool=threads.work,
        scanner_for=runtimes.__getitem__,
        hostname=config.sender_helo_domain,
        metrics=metrics,
    )
    queue = QueueManager(
        spool=spool,
        policy=live.policy,
        processor=processor,
        relay=relay,
        reactor=reactor,
        threadpool=threads.work,
        loop_guard=loop_guard,
        bounces=DsnWriter(
            reactor, live.hostname, lambda: live.current.delivery.lifetime
        ),
        retry=retry_policy(config),
        concurrency=config.delivery.concurrency,
        big_message=config.delivery.big_message,
        big_concurrency=config.delivery.big_concurrency,
        history=TeeHistory(
            history,
            LogHistory(lambda: live.current.version),
            MetricsHistory(metrics),
        ),
    )
    queue.on_bounce = metrics.bounce

    def queued(entry: object) -> None:
        envelope = entry.envelope  # type: ignore[attr-defined]
        metrics.message_accepted(envelope.listener)
        for recipient in envelope.recipients:
            metrics.rule_matched(recipient.rule, recipient.direction)
        queue.accept(entry)  # type: ignore[arg-type]

    handler = EnvelopeHandler(
        hostname=config.sender_helo_domain,
        spool=spool,
        policy=recipient_policy
        or RulePolicy(config.policy, verifier, runtimes.unavailable),
        clock=reactor,
        checker=_auth_checker(config),
        looped=loop_guard.looped,
        on_queued=queued,
        on_refused=refusals,
        max_queue=config.spool.max_queue,
        ready=False,
        records_full=lambda: outbox.full,
    )
    handler.on_connection = _session_metrics(metrics)
    return Gateway(
        live=live,
        role=role,
        reactor=reactor,
        threads=threads,
        spool=spool,
        store=store,
        metrics=metrics,
        runtimes=runtimes,
        loop_guard=loop_guard,
        verifier=verifier,
        probe=probe,
        relay=relay,
        outbox=outbox,
        history=history,
        refusals=refusals,
        processor=processor,
        queue=queue,
        handler=handler,
        policy_override=recipient_policy,
    )


def _session_metrics(metrics: Metrics) -> Callable[[ConnectionInfo, bool], None]:
    def connection(info: ConnectionInfo, opened: bool) -> None:
        if opened:
            metrics.session_opened(info.listener)
            return
        metrics.session_closed(info.listener)
        if info.tls_version:
            metrics.tls_established(info.listener, info.tls_version)
        if info.tls_error:
            metrics.tls_failed(info.listener)

    return connection


def cluster_link(service: Any) -> ClusterLink | None:
    """
    The primary's link to the other instances of its cluster, through the
    shared store's notice board (L{mdgateway.ops.cluster}); L{None} for a
    worker, or a store that has no board (an embedder's own).
    """
    gateway = service.gateway
    if not gateway.role.primary or not ICommandBoard.providedBy(gateway.store):
        return None
    return ClusterLink(
        board=gateway.store,
        clock=gateway.reactor,
        instance=gateway.live.current.store.instance,
        serve=lambda request: service.operations.queue_tools.serve(request),
    )
