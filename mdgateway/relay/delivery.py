# -*- test-case-name: tests.test_relay -*-
"""
Delivery through a rule's SMTP relay server profile.

L{Relay.deliver} hands one prepared message to the profile's servers in
order (failover, or starting at the next server for round robin), moving
on when a server cannot be reached, fails TLS or greets with 4xx, and
reports an outcome per recipient. It keeps idle connections briefly so a
burst of messages to one server reuses them, and slows down a profile that
Office 365 throttles with C{451 4.7.500}.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mdgateway.policy.profiles import RelayServer, SmtpProfile
from mdgateway.relay import maildir
from mdgateway.relay.connect import ClientSettings, connect_server
from mdgateway.relay.hosts import IMXResolver, NullMXError, expand
from mdgateway.relay.interfaces import IRelay
from mdgateway.smtp.clientmodel import (
    ClientEnvelope,
    ClientRecipient,
    MessageBody,
    SmtpSessionError,
    Stage,
    TransactionResult,
)
from mdgateway.smtp.clientprotocol import SmtpClient

log = Logger()

_QUEUED_AS = re.compile(r"(?:queued as|id[= ])\s*<?([A-Za-z0-9._@-]{4,})>?", re.I)


class Status(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@attrs.frozen
class RecipientOutcome:
    """
    What happened to one recipient in one delivery attempt.
    """

    address: str
    status: Status
    code: int
    enhanced: str
    text: str
    server: str = ""
    queue_id: str = ""

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".strip()


@attrs.frozen
class RelayRecipient:
    """
    A recipient with its DSN parameters (xtext as received).
    """

    address: str
    notify: str | None = None
    orcpt: str | None = None


@attrs.frozen
class Outgoing:
    """
    One message to relay: the envelope and where its bytes are.
    """

    sender: str
    recipients: tuple[RelayRecipient, ...]
    path: str
    prefix: bytes = b""
    offset: int = 0
    eight_bit: bool = False
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None


def queue_id_from(text: str) -> str:
    """
    The next hop's queue id from its reply to the message, if it says one.
    """
    match = _QUEUED_AS.search(text)
    return match.group(1) if match else ""


def _default_status(code: int) -> str:
    """
    An enhanced status for a server that sent none (RFC 3463 x.0.0).
    """
    return f"{code // 100}.0.0"


def _all(
    outgoing: Outgoing,
    status: Status,
    code: int,
    enhanced: str,
    text: str,
    server: str = "",
) -> list[RecipientOutcome]:
    return [
        RecipientOutcome(r.address, status, code, enhanced, text, server)
        for r in outgoing.recipients
    ]


def _from_result(result: TransactionResult, server: str) -> list[RecipientOutcome]:
    outcomes = []
    for r in result.recipients:
        if r.delivered:
            status = Status.DELIVERED
        elif r.permanent:
            status = Status.FAILED
        else:
            status = Status.DEFERRED
        queue_id = queue_id_from(r.text) if status is Status.DELIVERED else ""
        outcomes.append(
            RecipientOutcome(
                r.address,
                status,
                r.code,
                r.enhanced or _default_status(r.code),
                r.text,
                server,
                queue_id,
            )
        )
    return outcomes


@attrs.define
class _Idle:
    client: SmtpClient
    timer: IDelayedCall


@implementer(IRelay)
class Relay:
    """
    Delivers prepared messages through SMTP relay profiles.

    @param maildir_writer: delivers into a C{maildir:} folder (blocking, run
        in C{threadpool}); C{(folder, outgoing) -> path}.
    @param password_reader: reads a profile's password file (blocking).
    """

    def __init__(
        self,
        *,
        reactor: IReactorTime,
        helo: str,
        resolver: IMXResolver,
        threadpool: ThreadPool,
        maildir_writer: Callable[[str, Outgoing], str],
        password_reader: Callable[[str], str],
        idle_keep: float = 5.0,
        throttle_base: float = 60.0,
    ) -> None:
        self.reactor = reactor
        self._threads = IReactorFromThreads(reactor)
        self.helo = helo
        self.resolver = resolver
        self.threadpool = threadpool
        self.maildir_writer = maildir_writer
        self.password_reader = password_reader
        self.idle_keep = idle_keep
        self.throttle_base = throttle_base
        self._idle: dict[tuple[str, str], list[_Idle]] = {}
        self._next: dict[str, int] = {}
        self._throttled_until: dict[str, float] = {}
        self._throttle_step: dict[str, float] = {}
        self._settings: dict[str, ClientSettings] = {}
        self._unreachable_at: dict[str, float] = {}

    # -- throttling ----------------------------------------------------------

    def throttled_until(self, profile: SmtpProfile) -> float:
        """
        Until when the profile should get no new messages (0 if not).
        """
        until = self._throttled_until.get(profile.name, 0.0)
        return until if until > self.reactor.seconds() else 0.0

    def _throttle(self, profile: SmtpProfile) -> None:
        step = min(
            self._throttle_step.get(profile.name, 0.0) * 2 or self.throttle_base, 3600.0
        )
        self._throttle_step[profile.name] = step
        self._throttled_until[profile.name] = self.reactor.seconds() + step
        log.warn(
            "relay profile {profile} throttled by the next hop; pausing {seconds:.0f}s",
            profile=profile.name,
            seconds=step,
        )

    # -- delivery ------------------------------------------------------------

    async def _client_settings(self, profile: SmtpProfile) -> ClientSettings:
        settings = self._settings.get(profile.name)
        if settings is None:
            password = None
            if profile.auth_password_file:
                password = await deferToThreadPool(
                    self._threads,
                    self.threadpool,
                    self.password_reader,
                    profile.auth_password_file,
                )
            settings = ClientSettings.from_profile(profile, self.helo, password)
            self._settings[profile.name] = settings
        return settings

    def _order(self, profile: SmtpProfile) -> list[RelayServer]:
        servers = list(profile.servers)
        if profile.strategy == "round_robin" and servers:
            start = self._next.get(profile.name, 0) % len(servers)
            self._next[profile.name] = start + 1
            servers = servers[start:] + servers[:start]
        return servers

    async def deliver(
        self, profile: SmtpProfile, outgoing: Outgoing
    ) -> list[RecipientOutcome]:
        """
        Try the profile's servers until one takes the message (or refuses
        it for good); never raises for delivery problems.
        """
        last = "no server of the relay profile could be reached"
        for configured in self._order(profile):
            if configured.scheme == "maildir":
                return await self._maildir(configured, outgoing)
            try:
                servers = await expand(configured, self.resolver)
            except NullMXError as e:
                return _all(
                    outgoing, Status.FAILED, 556, "5.1.10", str(e), str(configured)
                )
            except LookupError as e:
                last = str(e)
                continue
            for server in servers:
                outcome = await self._attempt(profile, server, outgoing)
                if isinstance(outcome, str):
                    last = outcome
                    continue
                self._unreachable_at.pop(profile.name, None)
                return outcome
        self._unreachable_at[profile.name] = self.reactor.seconds()
        return _all(outgoing, Status.DEFERRED, 451, "4.4.1", last)

    def healthy(self, profile: SmtpProfile, window: float = 60.0) -> bool:
        """
        Whether some server of the profile answered lately (it is not
        healthy when the last attempt, within C{window}, reached none).
        """
        failed = self._unreachable_at.get(profile.name)
        return failed is None or self.reactor.seconds() - failed > window

    async def _maildir(
        self, server: RelayServer, outgoing: Outgoing
    ) -> list[RecipientOutcome]:
        try:
            path = await deferToThreadPool(
                self._threads,
                self.threadpool,
                self.maildir_writer,
                server.host,
                outgoing,
            )
        except OSError as e:
            return _all(
                outgoing,
                Status.DEFERRED,
                451,
                "4.3.0",
                f"maildir: {e.strerror or e}",
                str(server),
            )
        name = path.rsplit("/", 1)[-1]
        return _all(
            outgoing,
            Status.DELIVERED,
            250,
            "2.0.0",
            f"Ok: stored as {name}",
            str(server),
        )

    async def _attempt(
        self, profile: SmtpProfile, server: RelayServer, outgoing: Outgoing
    ) -> list[RecipientOutcome] | str:
        """
        One server: the outcomes, or why the next server should be tried.
        """
        settings = await self._client_settings(profile)
        client = self._take_idle(profile, server)
        if client is None:
            try:
                client = await connect_server(self.reactor, server, settings)
            except SmtpSessionError as e:
                failure = e.failure
                if (
                    failure.reply is not None
                    and failure.reply.code >= 500
                    and not failure.next_server
                ):
                    # A permanent refusal of the session itself (e.g. AUTH
                    # refused): no other server of the profile will differ.
                    return _all(
                        outgoing,
                        Status.DEFERRED,
                        failure.reply.code,
                        failure.reply.enhanced or _default_status(failure.reply.code),
                        str(failure),
                        str(server),
                    )
                log.info(
                    "relay {server}: {failure}",
                    server=str(server),
                    failure=str(failure),
                )
                return f"{server}: {failure}"
            except OSError as e:
                return f"{server}: {e}"
        envelope = ClientEnvelope(
            outgoing.sender,
            tuple(
                ClientRecipient(r.address, r.notify, r.orcpt)
                for r in outgoing.recipients
            ),
            eight_bit=outgoing.eight_bit,
            smtputf8=outgoing.smtputf8,
            ret=outgoing.ret,
            envid=outgoing.envid,
        )
        body = MessageBody.from_file(
            outgoing.path, outgoing.offset, prefix=outgoing.prefix
        )
        try:
            result = await client.send(envelope, body)
        except SmtpSessionError as e:
            failure = e.failure
            client.abort()
            refused = {r.address: r for r in failure.recipients}
            outcomes = []
            for r in outgoing.recipients:
                earlier = refused.get(r.address)
                if earlier is not None and earlier.permanent:
                    outcomes.append(
                        RecipientOutcome(
                            r.address,
                            Status.FAILED,
                            earlier.code,
                            earlier.enhanced or _default_status(earlier.code),
                            earlier.text,
                            str(server),
                        )
                    )
                else:
                    code = failure.reply.code if failure.reply is not None else 451
                    outcomes.append(
                        RecipientOutcome(
                            r.address,
                            Status.DEFERRED,
                            code if 400 <= code < 500 else 451,
                            "4.4.2",
                            str(failure),
                            str(server),
                        )
                    )
            if failure.stage is Stage.DATA_END:
                log.warn(
                    "relay {server}: connection lost after the message was sent; "
                    "it will be sent again (the next hop may get it twice)",
                    server=str(server),
                )
            return outcomes
        except OSError as e:
            client.abort()
            return _all(
                outgoing, Status.DEFERRED, 451, "4.3.0", f"cannot read message: {e}"
            )
        outcomes = _from_result(result, str(server))
        if any(o.enhanced == "4.7.500" or "4.7.500" in o.text for o in outcomes):
            self._throttle(profile)
        self._keep_idle(profile, server, client)
        return outcomes

    # -- connection reuse ----------------------------------------------------

    def _key(self, profile: SmtpProfile, server: RelayServer) -> tuple[str, str]:
        return (profile.name, str(server))

    def _take_idle(
        self, profile: SmtpProfile, server: RelayServer
    ) -> SmtpClient | None:
        idle = self._idle.get(self._key(profile, server), [])
        while idle:
            entry = idle.pop()
            if entry.timer.active():
                entry.timer.cancel()
            if entry.client.usable:
                return entry.client
            entry.client.abort()
        return None

    def _keep_idle(
        self, profile: SmtpProfile, server: RelayServer, client: SmtpClient
    ) -> None:
        if not client.usable or self.idle_keep <= 0:
            client.abort()
            return
        key = self._key(profile, server)
        entries = self._idle.setdefault(key, [])

        def expire() -> None:
            for entry in list(entries):
                if entry.client is client:
                    entries.remove(entry)
            Deferred.fromCoroutine(_quit(client))

        entries.append(_Idle(client, self.reactor.callLater(self.idle_keep, expire)))

    def reconfigure(self, helo: str) -> None:
        """
        A configuration reload: new connections greet with C{helo} and
        read their profile's settings afresh; idle connections, which
        greeted with the old name and settings, are closed.
        """
        self.helo = helo
        self._settings.clear()
        idle, self._idle = self._idle, {}
        for entries in idle.values():
            for entry in entries:
                if entry.timer.active():
                    entry.timer.cancel()
                Deferred.fromCoroutine(_quit(entry.client))

    async def close(self) -> None:
        """
        Say QUIT on every idle connection.
        """
        idle, self._idle = self._idle, {}
        for entries in idle.values():
            for entry in entries:
                if entry.timer.active():
                    entry.timer.cancel()
                await _quit(entry.client)


async def _quit(client: SmtpClient) -> None:
    try:
        await client.quit()
    except SmtpSessionError:
        pass
    finally:
        client.abort()


class MaildirWriter:
    """
    Delivers an L{Outgoing} into a C{maildir:} folder (blocking: the relay
    runs it in a worker thread).

    @param hostname: the name in the delivered file's names and
        C{Received} line, read at each delivery so a reload applies.
    """

    def __init__(self, clock: IReactorTime, hostname: Callable[[], str]) -> None:
        self._clock = clock
        self._hostname = hostname

    def __call__(self, folder: str, outgoing: Outgoing) -> str:
        return maildir.deliver(
            folder,
            outgoing.path,
            sender=outgoing.sender,
            recipients=[r.address for r in outgoing.recipients],
            now=self._clock.seconds(),
            prefix=outgoing.prefix,
            offset=outgoing.offset,
            hostname=self._hostname(),
        )
