# -*- test-case-name: tests.test_verification -*-
"""
Recipient verification: asking a rule's relay whether it would take a
recipient, with our own SMTP client (MAIL and RCPT, then QUIT; no message).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mdgateway.policy.profiles import RelayServer, SmtpProfile
from mdgateway.receive.admission import (
    ACCEPTED,
    REFUSED,
    UNREACHABLE,
    IRecipientVerifier,
)
from mdgateway.relay.connect import ClientSettings, connect_server
from mdgateway.relay.hosts import IMXResolver, NullMXError, expand
from mdgateway.smtp.clientmodel import ClientEnvelope, SmtpSessionError

log = Logger()


def read_password(path: str) -> str:
    """
    The first line of a password file.
    """
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\r\n")


@implementer(IRecipientVerifier)
class SmtpRecipientVerifier:
    """
    Probes the servers of a relay profile in order until one answers the
    RCPT: 2xx is L{ACCEPTED}, 5xx L{REFUSED}; a 4xx, or no server that can
    be reached, is L{UNREACHABLE} (the product then accepts the mail).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        helo: str,
        resolver: IMXResolver,
        threadpool: ThreadPool,
    ) -> None:
        self.reactor = reactor
        self._threads = IReactorFromThreads(reactor)
        self.helo = helo
        self.resolver = resolver
        self.threadpool = threadpool

    async def _settings(self, profile: SmtpProfile) -> ClientSettings:
        password = None
        if profile.auth_password_file:
            password = await deferToThreadPool(
                self._threads,
                self.threadpool,
                read_password,
                profile.auth_password_file,
            )
        return ClientSettings.from_profile(profile, self.helo, password)

    def verify(self, profile: SmtpProfile, sender: str, recipient: str) -> Any:
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(self._verify(profile, sender, recipient))

    async def _verify(self, profile: SmtpProfile, sender: str, recipient: str) -> str:
        try:
            settings = await self._settings(profile)
        except OSError as e:
            log.error(
                "relay profile {profile}: cannot read password file: {error}",
                profile=profile.name,
                error=str(e),
            )
            return UNREACHABLE
        for configured in profile.servers:
            if configured.scheme == "maildir":
                continue
            try:
                servers = await expand(configured, self.resolver)
            except NullMXError:
                return REFUSED
            except LookupError as e:
                log.info("verification: {error}", error=str(e))
                continue
            for server in servers:
                result = await self._probe(server, settings, sender, recipient)
                if result is not None:
                    return result
        return UNREACHABLE

    async def _probe(
        self, server: RelayServer, settings: ClientSettings, sender: str, recipient: str
    ) -> str | None:
        try:
            client = await connect_server(self.reactor, server, settings)
        except (SmtpSessionError, OSError) as e:
            log.info(
                "verification: {server} not usable: {error}",
                server=str(server),
                error=str(e),
            )
            return None
        try:
            result = await client.probe(ClientEnvelope(sender, [recipient]))
            (outcome,) = result.recipients
            try:
                await client.quit()
            except SmtpSessionError:
                pass
        except SmtpSessionError as e:
            log.info(
                "verification via {server} failed: {error}",
                server=str(server),
                error=str(e),
            )
            return None
        finally:
            client.abort()
        if outcome.code // 100 == 2:
            return ACCEPTED
        if outcome.code // 100 == 5:
            return REFUSED
        return UNREACHABLE
