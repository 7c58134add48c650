# -*- test-case-name: tests.test_tap -*-
"""
twistd/twist wiring: options, the gateway service, ordered start and drain.

This is one way of putting the pieces together; L{build_listener_factory}
and the classes it uses can be wired by any other Twisted program.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.application.service import IService, MultiService
from twisted.cred.checkers import FilePasswordDB
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from mdgateway.admission import CachingVerifier, IRecipientVerifier, RulePolicy
from mdgateway.config import ConfigError, GatewayConfig, ListenerConfig, load_config
from mdgateway.gateway import Gateway, IRecipientPolicy
from mdgateway.relayhosts import DNSPythonResolver
from mdgateway.smtp.server import SessionSettings
from mdgateway.smtp.serverprotocol import (
    ProtocolLimits,
    SMTPServerFactory,
    listening_factory,
)
from mdgateway.smtp.tls import server_tls_options
from mdgateway.spool import Spool
from mdgateway.verification import SmtpRecipientVerifier

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
    gateway: Gateway,
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


def recipient_policy(
    config: GatewayConfig, verifier: IRecipientVerifier | None = None
) -> IRecipientPolicy:
    """
    The RCPT-time decision under C{config}: its security rules, verifying
    recipients with C{verifier} where a rule asks for it.
    """
    return RulePolicy(config.policy, verifier)


class GatewayService(MultiService):
    """
    The running gateway: spool recovery, then listeners; on stop, drain.
    """

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        policy: IRecipientPolicy | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.threadpool = ThreadPool(
            minthreads=1, maxthreads=config.spool.threads, name="mdgateway-spool"
        )
        self.spool = Spool(config.spool.directory, reactor, self.threadpool)
        # DNS waits can last seconds: they get their own threads, so they
        # never hold up the spool's fsyncs.
        self.dns_threadpool = ThreadPool(
            minthreads=0, maxthreads=4, name="mdgateway-dns"
        )
        self.resolver = DNSPythonResolver(reactor, self.dns_threadpool)
        self.verifier = CachingVerifier(
            SmtpRecipientVerifier(reactor, config.sender_helo_domain, self.resolver),
            reactor,
        )
        checker = None
        auth_files = {
            listener.auth_users_file
            for listener in config.listeners
            if listener.auth_users_file
        }
        if auth_files:
            checker = FilePasswordDB(sorted(auth_files)[0], cache=True)
        self.gateway = Gateway(
            hostname=config.sender_helo_domain,
            spool=self.spool,
            policy=policy or recipient_policy(config, self.verifier),
            clock=reactor,
            checker=checker,
        )
        self.factories: list[SMTPServerFactory] = []
        self.ports: list[IListeningPort] = []
        self.ready: Deferred[None] = Deferred()
        self.draining = False

    def startService(self) -> None:
        super().startService()
        self.threadpool.start()
        self.dns_threadpool.start()
        d = Deferred.fromCoroutine(self._start())
        d.addErrback(self._failed_start)

    async def _start(self) -> None:
        entries = await self.spool.recover()
        log.info(
            "spool {directory}: {count} message(s) recovered",
            directory=self.config.spool.directory,
            count=len(entries),
        )
        for listener in self.config.listeners:
            factory, wrapped = build_listener_factory(
                listener, self.config, self.gateway, self.reactor
            )
            endpoint = serverFromString(self.reactor, listener.endpoint)
            port = await endpoint.listen(wrapped)
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
        self.ready.callback(None)

    def _failed_start(self, failure: Any) -> None:
        log.failure("mdgateway failed to start", failure)
        self.ready.errback(failure)
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.draining = True
        self.gateway.accepting = False
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
        await self.spool.close()
        self.threadpool.stop()
        self.dns_threadpool.stop()
        await super().stopService()
        log.info("stopped")

    def reload(self) -> bool:
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
            return False
        old = self.config
        if (new.listeners, new.tls, new.spool) != (old.listeners, old.tls, old.spool):
            log.warn(
                "listener, TLS and spool changes take effect after a restart; "
                "rules and limits are applied now"
            )
        self.gateway.policy = recipient_policy(new, self.verifier)
        self.gateway.hostname = new.sender_helo_domain
        for factory in self.factories:
            for listener in old.listeners:
                if listener.name == factory.name:
                    factory.settings = session_settings(listener, new)
                    factory.limits = protocol_limits(listener, new)
                    factory.config_version = new.version
        self.config = attrs.evolve(
            new, listeners=old.listeners, tls=old.tls, spool=old.spool
        )
        log.info(
            "configuration {config_version} loaded from {path}",
            config_version=new.version,
            path=new.path,
            rules=len(new.policy.rules),
        )
        return True

    def _live_sessions(self) -> int:
        return sum(len(f.sessions) for f in self.factories)


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
