# -*- test-case-name: tests.test_e2e_receive -*-
"""
The server-side delivery hooks: who may send what to whom, and how the
content of an accepted message reaches the spool.

L{EnvelopeHandler} is the L{IEnvelopeHandler} of every listener. It asks an
L{IRecipientPolicy} about each recipient and streams each message into a
spool writer, answering C{250} only once the spool has made it durable.
"""

from __future__ import annotations

import email.utils
import ipaddress
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from mdgateway.message.digest import ContentHasher
from mdgateway.queue.entry import SpoolEntry, SpoolError, SpoolFullError
from mdgateway.queue.envelope import Envelope, Recipient
from mdgateway.queue.spool import Spool
from mdgateway.queue.writer import SpoolWriter
from mdgateway.receive.tenant import TenantGate
from mdgateway.smtp import replies
from mdgateway.smtp.interfaces import (
    ConnectionInfo,
    IEnvelopeHandler,
    IMessageSink,
    RecipientDecision,
)
from mdgateway.smtp.parse import MailFrom, RcptTo
from mdgateway.smtp.replies import Reply

log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SENDER_OK = Reply.of(250, "2.1.0", "Ok")
#: C{Envelope.extra} key of the message's content digest (hex, see
#: L{mdgateway.message.digest}), computed as the message streams in so the
#: pipeline need not read the file again.
CONTENT_DIGEST = "content_digest"
RECIPIENT_OK = Reply.of(250, "2.1.5", "Ok")
RELAY_DENIED = Reply.of(550, "5.7.1", "Relaying denied")


class IRecipientPolicy(Interface):
    """
    Decides whether a recipient is accepted and binds it to what will
    process it (the security rule).
    """

    def decide(info: ConnectionInfo, mail: MailFrom, rcpt: RcptTo) -> object:  # noqa: N805
        """
        @return: a L{RecipientDecision} or a L{Deferred} firing with one; a
            refusal carries the reason in its reply text.
        """


@implementer(IRecipientPolicy)
@attrs.frozen
class AcceptListPolicy:
    """
    The policy before security rules exist: accept a recipient when the
    client is in C{networks} or the recipient's domain is in C{domains}.
    Everything else is relaying denied, so the default is never an open relay.
    """

    networks: tuple[Network, ...]
    domains: tuple[str, ...]

    def decide(
        self, info: ConnectionInfo, mail: MailFrom, rcpt: RcptTo
    ) -> RecipientDecision:
        if rcpt.recipient.domain_key in self.domains:
            return RecipientDecision(RECIPIENT_OK, None)
        try:
            client = ipaddress.ip_address(info.client[0])
        except ValueError:
            client = None
        if client is not None and any(client in net for net in self.networks):
            return RecipientDecision(RECIPIENT_OK, None)
        return RecipientDecision(RELAY_DENIED, None)


def received_header(
    info: ConnectionInfo,
    hostname: str,
    queue_id: str,
    recipients: Sequence[str],
    now: float,
    smtputf8: bool = False,
) -> bytes:
    """
    The C{Received:} trace header (RFC 5321 4.4) for a message we accept.

    The recipient is named only when there is exactly one, as Postfix does,
    so a copy never discloses the other recipients.
    """
    helo = info.helo or "unknown"
    client = info.client[0]
    literal = f"IPv6:{client}" if ":" in client else client
    with_ = info.protocol_for(smtputf8)
    tls = ""
    if info.tls_version:
        tls = f" (using {info.tls_version} with cipher {info.tls_cipher})"
    config = f" config {info.config_version}" if info.config_version else ""
    date = email.utils.format_datetime(datetime.fromtimestamp(now, UTC))
    lines = [
        f"Received: from {helo} ([{literal}])",
        f"\tby {hostname} (mdgateway{config}) with {with_}{tls}",
        f"\tid {queue_id}",
    ]
    if len(recipients) == 1:
        lines[-1] += f"\n\tfor <{recipients[0]}>"
    lines[-1] += f"; {date}"
    text = "\r\n".join("\r\n".join(line.split("\n")) for line in lines) + "\r\n"
    return text.encode("utf-8", "replace")


@implementer(IEnvelopeHandler)
class EnvelopeHandler:
    """
    Every listener's envelope handler.

    @ivar accepting: cleared when draining; sessions then refuse new work.
    """

    def __init__(
        self,
        *,
        hostname: str,
        spool: Spool,
        policy: IRecipientPolicy,
        clock: IReactorTime,
        checker: ICredentialsChecker | None = None,
        looped: Callable[[bytes, bytes | None], bool] | None = None,
        on_queued: Callable[[SpoolEntry], object] | None = None,
        on_refused: Callable[..., object] | None = None,
        max_queue: int = 0,
        ready: bool = True,
        records_full: Callable[[], bool] | None = None,
    ) -> None:
        """
        @param looped: given the top-level header block of a message and
            its content digest (L{None} when the block is too large to
            bind), whether it has already been through this gateway twice
            (two valid processed markers): such a message is refused.
        @param on_queued: called with each committed spool entry.
        @param on_refused: called as C{(info, sender, recipient, reply)} for
            every negative reply a session sends (see L{refusal_sent}), for the
            refused log.
        @param ready: whether sessions may start at once; a gateway being
            built sets it when its spool has been recovered.
        @param max_queue: spool entries at which new mail is refused with
            C{452 4.3.1} (back-pressure when delivery falls behind); 0: none.
        @param records_full: whether the records of new mail could not be
            kept (the outbox for the store is full): new mail then gets
            C{451 4.3.0} at MAIL and at the end of DATA.
        """
        self.hostname = hostname
        self.spool = spool
        self.policy = IRecipientPolicy(policy)
        self.clock = clock
        self.checker = checker
        self.looped = looped
        self.on_queued = on_queued
        self.on_refused = on_refused
        self.max_queue = max_queue
        self._queue_full = False
        self.records_full = records_full
        self._records_full = False
        #: Called as C{(info, opened)} when a session starts and ends.
        self.on_connection: Callable[[ConnectionInfo, bool], object] | None = None
        self.accepting = True
        self.ready = ready
        self.accepted = 0
        self.refused = 0

    def connected(self, info: ConnectionInfo) -> Reply | None:
        log.info(
            "connect from {client} on {listener}",
            session_id=info.session_id,
            client=info.client[0],
            listener=info.listener,
            proxied=info.proxied,
        )
        if not self.accepting:
            return replies.SHUTTING_DOWN
        if not self.ready:
            return replies.NOT_READY
        info.context = self.policy
        if self.on_connection is not None:
            self.on_connection(info, True)
        return None

    def message_refused(
        self, info: ConnectionInfo, mail: MailFrom, reply: Reply
    ) -> None:
        self.refused += 1

    def refusal_sent(
        self,
        info: ConnectionInfo,
        reply: Reply,
        mail: MailFrom | None,
        rcpt: RcptTo | None,
    ) -> None:
        # Every negative reply of every session, once: the refused log.
        if self.on_refused is not None:
            self.on_refused(
                info,
                None if mail is None else mail.sender_text,
                None if rcpt is None else str(rcpt.recipient),
                reply,
            )

    def disconnected(self, info: ConnectionInfo) -> None:
        log.debug("disconnect", session_id=info.session_id, client=info.client[0])
        if self.on_connection is not None and info.context is not None:
            self.on_connection(info, False)

    def check_sender(self, info: ConnectionInfo, mail: MailFrom) -> Reply:
        if not self.spool.writable():
            return replies.SPOOL_FULL
        if self._queue_is_full():
            return replies.QUEUE_FULL
        if self.cannot_record():
            return replies.RECORDS_BACKLOG
        return SENDER_OK

    def cannot_record(self) -> bool:
        """
        Whether new mail must wait because its records could not be kept.
        """
        full = self.records_full is not None and self.records_full()
        if full != self._records_full:
            self._records_full = full
            if full:
                log.warn(
                    "the outbox of records for the store is full: new mail gets "
                    "451 4.3.0 until the store catches up"
                )
            else:
                log.info("the outbox has room again: accepting mail")
        return full

    def _queue_is_full(self) -> bool:
        full = bool(self.max_queue) and self.spool.entry_count >= self.max_queue
        if full != self._queue_full:
            self._queue_full = full
            if full:
                log.warn(
                    "queue full ({count} messages): new mail gets 452 4.3.1 "
                    "until delivery catches up",
                    count=self.spool.entry_count,
                )
            else:
                log.info("queue below its limit again: accepting mail")
        return full

    def check_recipient(
        self, info: ConnectionInfo, mail: MailFrom, rcpt: RcptTo
    ) -> Deferred[RecipientDecision]:
        policy = IRecipientPolicy(info.context, self.policy)
        decide: Any = policy.decide
        d: Deferred[RecipientDecision] = maybeDeferred(decide, info, mail, rcpt)

        def logged(decision: RecipientDecision) -> RecipientDecision:
            if not decision.reply.is_positive:
                self.refused += 1
                log.info(
                    "refused recipient {recipient} from {client}: {reason}",
                    session_id=info.session_id,
                    client=info.client[0],
                    sender=mail.sender_text,
                    recipient=str(rcpt.recipient),
                    reason=decision.reply.text,
                    code=decision.reply.code,
                    config_version=info.config_version,
                )
            return decision

        return d.addCallback(logged)

    def authenticate(
        self, info: ConnectionInfo, username: str, password: str
    ) -> Deferred[str | None]:
        if self.checker is None:
            return Deferred.fromCoroutine(_none())
        d = maybeDeferred(
            self.checker.requestAvatarId,
            UsernamePassword(username.encode("utf-8"), password.encode("utf-8")),
        )

        def ok(avatar: Any) -> str:
            log.info("authenticated {user}", session_id=info.session_id, user=username)
            return username

        def refused(failure: Failure) -> None:
            failure.trap(UnauthorizedLogin)
            log.info(
                "authentication failed for {user} from {client}",
                session_id=info.session_id,
                user=username,
                client=info.client[0],
            )
            return None

        return d.addCallbacks(ok, refused)

    def open_message(
        self,
        info: ConnectionInfo,
        mail: MailFrom,
        recipients: list[tuple[RcptTo, object]],
    ) -> IMessageSink:
        writer = self.spool.open_writer()
        addresses = [str(rcpt.recipient) for rcpt, _ in recipients]
        writer.write(
            received_header(
                info,
                self.hostname,
                writer.queue_id,
                addresses,
                self.clock.seconds(),
                mail.smtputf8,
            )
        )
        return SpoolSink(self, info, mail, recipients, writer)


async def _none() -> None:
    return None


def _binding_fields(binding: object) -> dict[str, Any]:
    """
    What a recipient's binding (a security rule, once rules exist) records
    in the envelope.
    """
    return {
        "rule": getattr(binding, "name", None),
        "direction": getattr(binding, "direction", None),
    }


@implementer(IMessageSink)
class SpoolSink:
    """
    Streams one message into the spool and commits it with its envelope.
    """

    def __init__(
        self,
        gateway: EnvelopeHandler,
        info: ConnectionInfo,
        mail: MailFrom,
        recipients: list[tuple[RcptTo, object]],
        writer: SpoolWriter,
    ) -> None:
        self.gateway = gateway
        self.info = info
        self.mail = mail
        self.recipients = recipients
        self.writer = writer
        self.content = ContentHasher()
        self.tenant = TenantGate.for_message(
            (binding for _, binding in recipients), info.client[0]
        )

    def write(self, data: bytes) -> bool:
        self.content.feed(data)
        if self.tenant is not None:
            self.tenant.feed(data)
        return self.writer.write(data)

    def on_drained(self, callback: Any) -> None:
        self.writer.on_drained(callback)

    def abort(self) -> None:
        self.writer.abort()

    def finish(self) -> Deferred[Reply]:
        return Deferred.fromCoroutine(self._commit())

    def envelope(self) -> Envelope:
        info = self.info
        return Envelope(
            queue_id=self.writer.queue_id,
            received_at=self.gateway.clock.seconds(),
            sender=self.mail.sender_text,
            mail_parameters=dict(self.mail.parameters),
            recipients=tuple(
                Recipient(
                    address=str(rcpt.recipient),
                    parameters=dict(rcpt.parameters),
                    **_binding_fields(binding),
                )
                for rcpt, binding in self.recipients
            ),
            client_address=info.client[0],
            client_port=info.client[1],
            client_helo=info.helo or "",
            tls=info.tls_version is not None,
            tls_version=info.tls_version,
            tls_cipher=info.tls_cipher,
            authenticated_user=info.authenticated_user,
            protocol=info.protocol_for(self.mail.smtputf8),
            listener=info.listener,
            config_version=info.config_version,
            extra=self._extra(),
        )

    def _extra(self) -> dict[str, Any]:
        digest = self.content.digest()
        return {} if digest is None else {CONTENT_DIGEST: digest.hex()}

    async def _refuse(self, reply: Reply) -> Reply:
        """
        Discard the message and count the refusal (the SMTP layer reports the
        reply itself to L{EnvelopeHandler.refusal_sent}, for the refused log).
        """
        await self.writer.abort()
        self.gateway.message_refused(self.info, self.mail, reply)
        return reply

    async def _commit(self) -> Reply:
        if self.tenant is not None:
            refusal = self.tenant.refusal()
            if refusal is not None:
                log.warn(
                    "message {message_id} from {client} refused: rule {rule} "
                    "takes mail only from its Office 365 tenants ({cause})",
                    session_id=self.info.session_id,
                    message_id=self.writer.queue_id,
                    client=self.info.client[0],
                    sender=self.mail.sender_text,
                    recipients=[str(rcpt.recipient) for rcpt, _ in self.recipients],
                    rule=refusal.rule.name,
                    cause=refusal.verdict.cause,
                    tenant=refusal.verdict.tenant,
                )
                return await self._refuse(refusal.reply)
        looped = self.gateway.looped
        if looped is not None and looped(self.content.header(), self.content.digest()):
            log.warn(
                "message {message_id} from {client} refused: it has been through "
                "this gateway twice (mail loop)",
                session_id=self.info.session_id,
                message_id=self.writer.queue_id,
                client=self.info.client[0],
                sender=self.mail.sender_text,
            )
            return await self._refuse(replies.TOO_MANY_HOPS)
        if self.gateway.cannot_record():
            return await self._refuse(replies.RECORDS_BACKLOG)
        try:
            entry = await self.writer.commit(self.envelope())
        except SpoolFullError:
            log.error(
                "spool full: message from {client} refused",
                session_id=self.info.session_id,
                client=self.info.client[0],
            )
            return replies.SPOOL_FULL
        except SpoolError as e:
            log.error(
                "spool error: message from {client} refused: {error}",
                session_id=self.info.session_id,
                client=self.info.client[0],
                error=str(e),
            )
            return replies.LOCAL_ERROR
        self.gateway.accepted += 1
        if self.gateway.on_queued is not None:
            self.gateway.on_queued(entry)
        log.info(
            "queued {message_id} from {sender} for {count} recipient(s), {size} bytes",
            session_id=self.info.session_id,
            message_id=entry.queue_id,
            client=self.info.client[0],
            sender=self.mail.sender_text,
            count=len(self.recipients),
            size=self.writer.size,
            config_version=self.info.config_version,
        )
        return Reply.of(250, "2.0.0", f"Ok: queued as {entry.queue_id}")
