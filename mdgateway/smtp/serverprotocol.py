# -*- test-case-name: tests.test_smtp_protocol -*-
"""
The Twisted side of the SMTP server: framing, limits, timers, TLS and PROXY.

L{SMTPServerProtocol} turns bytes into lines and message content, feeds the
sans-IO L{ServerSession}, and carries out the actions it returns. Commands
are handled strictly one at a time: while a check is outstanding, later
pipelined input waits in the buffer, so replies always go out in order.
"""

from __future__ import annotations

import enum
import ipaddress
import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mdgateway.smtp import replies
from mdgateway.smtp.data import BodyChecker, DotDecoder
from mdgateway.smtp.interfaces import (
    ConnectionInfo,
    IEnvelopeHandler,
    IMessageSink,
    RecipientDecision,
)
from mdgateway.smtp.parse import MailFrom, RcptTo
from mdgateway.smtp.proxyprotocol import ProxyHeaderFactory, peer_address
from mdgateway.smtp.replies import Reply
from mdgateway.smtp.server import (
    Action,
    CheckCredentials,
    CheckRecipient,
    CheckSender,
    Close,
    ReceiveChunk,
    ReceiveData,
    ServerSession,
    SessionSettings,
    StartTLS,
)
from mdgateway.smtp.tls import (
    CurrentServerTLS,
    FailureLogLimit,
    ServerTLS,
    handshake_error,
    negotiated,
)

log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class ProtocolLimits:
    """
    Limits enforced while framing, before the session sees anything.
    """

    max_command_line: int = 2048
    max_line_length: int = 998
    max_received: int = 50
    idle_timeout: float = 300.0
    session_deadline: float = 3600.0
    max_connections: int = 1000
    max_connections_per_client: int = 50
    #: Pipelined input held while a check is outstanding before the client
    #: is paused.
    max_pending_input: int = 256 * 1024
    #: Over-long command lines tolerated before disconnecting.
    max_long_lines: int = 3
    proxy_header_timeout: float = 10.0


class _Mode(enum.Enum):
    COMMAND = "command"
    DATA = "data"
    BDAT = "bdat"
    DISCARD_LINE = "discard-line"
    CLOSED = "closed"


@implementer(IHandshakeListener)
class SMTPServerProtocol(Protocol):
    """
    One SMTP server connection; a thin shim over L{ServerSession}.
    """

    factory: SMTPServerFactory
    # A TCP, TLS or PROXY-wrapper transport; their shared surface is not
    # one Twisted interface, so it is not narrowed here.
    transport: Any

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory
        self.session = ServerSession(factory.settings)
        self.info: ConnectionInfo | None = None
        self._mode = _Mode.COMMAND
        self._buffer = b""
        self._waiting = False
        self._paused = False
        self._long_lines = 0
        self._decoder: DotDecoder | None = None
        self._checker: BodyChecker | None = None
        self._sink: IMessageSink | None = None
        self._chunk_left = 0
        self._chunk: ReceiveChunk | None = None
        self._idle: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._counted = False
        #: A TLS handshake has begun and not completed.
        self._tls_pending = False

    # -- connection life ---------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        factory = self.factory
        client = peer_address(self.transport.getPeer())
        self.info = ConnectionInfo(
            session_id=os.urandom(6).hex(),
            listener=factory.name,
            client=client,
            server=peer_address(self.transport.getHost()),
            proxied=getattr(self.transport, "proxied", False),
            config_version=factory.config_version,
        )
        if factory.implicit_tls:
            self.session.tls_active = True
            self._tls_pending = True
        refusal = factory.admit(client[0])
        if refusal is None:
            self._counted = True
            factory.sessions.add(self)
            refusal = factory.handler.connected(self.info)
        if refusal is not None:
            log.info(
                "refused connection from {client}: {reason}",
                session_id=self.info.session_id,
                client=client[0],
                reason=refusal.text,
            )
            self._report(refusal)
            self._mode = _Mode.CLOSED
            self.transport.write(refusal.to_bytes())
            self.transport.loseConnection()
            return
        log.debug(
            "connection from {client}",
            session_id=self.info.session_id,
            client=client[0],
            listener=factory.name,
        )
        clock = factory.clock
        self._deadline = clock.callLater(
            factory.limits.session_deadline, self._timed_out, replies.SESSION_DEADLINE
        )
        self._reset_idle()
        self.transport.write(self.session.greeting().to_bytes())

    def handshakeCompleted(self) -> None:
        assert self.info is not None and self.transport is not None
        self._tls_pending = False
        self.info.tls_version, self.info.tls_cipher = negotiated(self.transport)
        log.debug(
            "TLS established: {tls_version} {tls_cipher}",
            session_id=self.info.session_id,
            tls_version=self.info.tls_version,
            tls_cipher=self.info.tls_cipher,
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._mode = _Mode.CLOSED
        for call in (self._idle, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._deadline = None
        self._abort_message()
        if self.info is not None:
            self._report_tls_failure(reason)
            if self._counted:
                self.factory.release(self.info.client[0])
                self.factory.sessions.discard(self)
                self._counted = False
            self.factory.handler.disconnected(self.info)

    def _report_tls_failure(self, reason: Failure | None) -> None:
        """
        Log a handshake that failed (or a TLS error later on): at I{info}
        with the OpenSSL reason, a few times per client address, as a
        client that cannot agree on TLS may otherwise send in plaintext or
        not at all; a connection closed mid-handshake without a TLS error
        (a port scanner) only at I{debug}.
        """
        assert self.info is not None
        error = handshake_error(reason)
        if error is None:
            if self._tls_pending:
                log.debug(
                    "TLS handshake not completed on {listener} from {client}",
                    session_id=self.info.session_id,
                    listener=self.info.listener,
                    client=self.info.client[0],
                )
            return
        self.info.tls_error = error
        held = self.factory.tls_failures.admit(self.info.client[0])
        fields = {
            "session_id": self.info.session_id,
            "listener": self.info.listener,
            "client": self.info.client[0],
            "tls_error": error,
            "during_handshake": self._tls_pending,
        }
        if held is None:
            log.debug("TLS handshake failed from {client}: {tls_error}", **fields)
            return
        log.info(
            "TLS handshake failed on {listener} from {client}: {tls_error}"
            + (" ({held_back} more from this address not logged)" if held else ""),
            held_back=held,
            **fields,
        )

    def _reset_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.factory.limits.idle_timeout)
        else:
            self._idle = self.factory.clock.callLater(
                self.factory.limits.idle_timeout, self._timed_out, replies.IDLE_TIMEOUT
            )

    def _timed_out(self, reply: Reply) -> None:
        if self._mode is _Mode.CLOSED or self.transport is None:
            return
        assert self.info is not None
        log.info(
            "closing session from {client}: {reason}",
            session_id=self.info.session_id,
            client=self.info.client[0],
            reason=reply.text,
        )
        self._close_with(reply)

    def _close_with(self, reply: Reply) -> None:
        assert self.transport is not None
        self._report(reply, self._mail())
        self._mode = _Mode.CLOSED
        self._abort_message()
        self.transport.write(reply.to_bytes())
        self.transport.loseConnection()

    def drain(self) -> None:
        """
        The gateway is stopping: say so now if the client is idle between
        transactions; a transfer in progress may finish first.
        """
        if self._mode is _Mode.COMMAND and not self._waiting:
            if self.session.transaction is None:
                self._close_with(replies.SHUTTING_DOWN)

    def abort(self) -> None:
        """
        Drop the connection at once (the drain deadline passed).
        """
        if self.transport is not None:
            self._mode = _Mode.CLOSED
            self.transport.abortConnection()

    # -- input -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode is _Mode.CLOSED:
            return
        self._reset_idle()
        if self._buffer:
            self._buffer += data
        else:
            self._buffer = data
        self._process()

    def _process(self) -> None:
        # A check that answers at once (most do) calls back into here from
        # inside the loop below; the loop itself carries on, so a long
        # pipelined burst never nests one stack level per command.
        if self._processing:
            return
        self._processing = True
        try:
            self._consume()
        finally:
            self._processing = False
        self._flow_control()

    _processing = False

    def _consume(self) -> None:
        while self._buffer and not self._waiting:
            mode = self._mode
            if mode is _Mode.COMMAND:
                if not self._next_line():
                    break
            elif mode is _Mode.DATA:
                self._data()
            elif mode is _Mode.BDAT:
                self._bdat()
            elif mode is _Mode.DISCARD_LINE:
                end = self._buffer.find(b"\n")
                if end < 0:
                    self._buffer = b""
                    break
                self._buffer = self._buffer[end + 1 :]
                self._mode = _Mode.COMMAND
            else:
                self._buffer = b""

    def _flow_control(self) -> None:
        assert self.transport is not None
        sink_full = self._sink is not None and self._sink_paused
        too_much = (
            self._waiting and len(self._buffer) > self.factory.limits.max_pending_input
        )
        if (
            (sink_full or too_much)
            and not self._paused
            and self._mode is not _Mode.CLOSED
        ):
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and not (sink_full or too_much):
            self._paused = False
            self.transport.resumeProducing()

    _sink_paused = False

    def _next_line(self) -> bool:
        end = self._buffer.find(b"\n")
        limit = self.factory.limits.max_command_line
        if end < 0:
            if len(self._buffer) > limit:
                self._buffer = b""
                self._long_line()
                if self._mode is _Mode.COMMAND:
                    self._mode = _Mode.DISCARD_LINE
            return False
        line = self._buffer[:end]
        self._buffer = self._buffer[end + 1 :]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > limit:
            self._long_line()
            return True
        if not self.factory.handler.accepting and self.session.transaction is None:
            self._close_with(replies.SHUTTING_DOWN)
            return False
        mail = self._mail()
        self._run(self.session.line(line), mail)
        return True

    def _mail(self) -> MailFrom | None:
        """
        The sender of the transaction in progress, if any.
        """
        transaction = self.session.transaction
        return transaction.mail if transaction is not None else None

    def _long_line(self) -> None:
        self._long_lines += 1
        if self._long_lines >= self.factory.limits.max_long_lines:
            self._close_with(replies.TOO_MANY_LONG_LINES)
            return
        self._run(self.session.line_too_long(), self._mail())

    # -- actions -----------------------------------------------------------

    def _run(
        self,
        actions: Sequence[Action],
        mail: MailFrom | None = None,
        rcpt: RcptTo | None = None,
    ) -> None:
        """
        Carry out C{actions}; C{mail} and C{rcpt} are what a refusal among
        them refuses, for the refused log.
        """
        assert self.transport is not None and self.info is not None
        out = []
        for action in actions:
            if isinstance(action, Reply):
                self._report(action, mail, rcpt)
                out.append(action.to_bytes())
                continue
            if out:
                self.transport.write(b"".join(out))
                out = []
            if isinstance(action, CheckSender):
                self._ask(
                    self.factory.handler.check_sender,
                    (self.info, action.mail),
                    partial(self.session.sender_checked, action.mail),
                    action.mail,
                )
            elif isinstance(action, CheckRecipient):
                self._ask(
                    self.factory.handler.check_recipient,
                    (self.info, action.mail, action.rcpt),
                    partial(self._recipient, action.rcpt),
                    action.mail,
                    action.rcpt,
                )
            elif isinstance(action, CheckCredentials):
                self._ask(
                    self.factory.handler.authenticate,
                    (self.info, action.username, action.password),
                    self._authenticated,
                )
            elif isinstance(action, ReceiveData):
                self._begin_message()
                self._decoder = DotDecoder()
                self._mode = _Mode.DATA
            elif isinstance(action, ReceiveChunk):
                self._begin_chunk(action)
            elif isinstance(action, StartTLS):
                self._start_tls()
            elif isinstance(action, Close):
                self._mode = _Mode.CLOSED
                self._buffer = b""
                self.transport.loseConnection()
        if out:
            self.transport.write(b"".join(out))

    def _ask(
        self,
        function: Callable[..., Any],
        arguments: tuple[Any, ...],
        then: Callable[[Any], list[Action]],
        mail: MailFrom | None = None,
        rcpt: RcptTo | None = None,
    ) -> None:
        self._waiting = True
        d = maybeDeferred(function, *arguments)
        d.addCallback(then)
        d.addErrback(self._internal_error)
        d.addCallback(self._answered, mail, rcpt)

    def _report(
        self,
        reply: Reply,
        mail: MailFrom | None = None,
        rcpt: RcptTo | None = None,
    ) -> None:
        """
        Tell the handler of a negative reply about to be sent (for the
        refused log); a failing handler costs the record, not the session.
        """
        if reply.code < 400 or self.info is None:
            return
        self._sync_info()
        try:
            self.factory.handler.refusal_sent(self.info, reply, mail, rcpt)
        except Exception:
            log.failure(
                "recording a refusal failed in session {session_id}",
                session_id=self.info.session_id,
            )

    def _recipient(self, rcpt: RcptTo, decision: RecipientDecision) -> list[Action]:
        return self.session.recipient_checked(rcpt, decision.reply, decision.binding)

    def _authenticated(self, user: str | None) -> list[Action]:
        assert self.info is not None
        actions = self.session.credentials_checked(user)
        self.info.authenticated_user = self.session.authenticated_user
        return actions

    def _internal_error(self, failure: Failure) -> list[Action]:
        assert self.info is not None
        log.failure(
            "internal error in session {session_id}",
            failure,
            session_id=self.info.session_id,
        )
        self._abort_message()
        if self._mode in (_Mode.DATA, _Mode.BDAT):
            self._mode = _Mode.COMMAND
        return [replies.LOCAL_ERROR]

    def _answered(
        self,
        actions: list[Action],
        mail: MailFrom | None = None,
        rcpt: RcptTo | None = None,
    ) -> None:
        self._waiting = False
        if self._mode is _Mode.CLOSED:
            return
        self._sync_info()
        self._run(actions, mail or self._mail(), rcpt)
        self._reset_idle()
        self._process()

    def _sync_info(self) -> None:
        assert self.info is not None
        self.info.helo = self.session.helo
        self.info.esmtp = self.session.esmtp

    def _start_tls(self) -> None:
        assert self.transport is not None
        # Whatever the client sent after STARTTLS in plaintext is dropped:
        # acting on it would let an attacker inject commands into the TLS
        # session (CVE-2011-0411).
        self._buffer = b""
        self.session.tls_started()
        self._tls_pending = True
        self.transport.startTLS(self.factory.tls_options)

    # -- message content ---------------------------------------------------

    def _begin_message(self) -> None:
        assert self.info is not None
        self._sync_info()
        transaction = self.session.transaction
        assert transaction is not None
        limits = self.factory.limits
        self._checker = BodyChecker(
            self.factory.settings.max_message_size,
            limits.max_line_length,
            limits.max_received,
        )
        self._sink = self.factory.handler.open_message(
            self.info, transaction.mail, list(transaction.recipients)
        )
        self._sink_paused = False

    def _feed(self, content: bytes) -> None:
        checker, sink = self._checker, self._sink
        assert checker is not None
        if checker.feed(content):
            if sink is not None and not sink.write(content):
                self._sink_paused = True
                sink.on_drained(self._drained)
        elif sink is not None:
            sink.abort()
            self._sink = None

    def _drained(self) -> None:
        self._sink_paused = False
        if self._mode is not _Mode.CLOSED:
            self._flow_control()

    def _data(self) -> None:
        decoder = self._decoder
        assert decoder is not None
        content, rest = decoder.feed(self._buffer)
        self._buffer = b""
        if content:
            self._feed(content)
        if rest is not None:
            self._buffer = rest
            self._mode = _Mode.COMMAND
            self._decoder = None
            self._end_message()

    def _begin_chunk(self, action: ReceiveChunk) -> None:
        self._chunk = action
        self._chunk_left = action.size
        self._mode = _Mode.BDAT
        if action.refusal is None and action.first:
            self._begin_message()
        if action.size == 0:
            self._end_chunk()

    def _bdat(self) -> None:
        take = min(self._chunk_left, len(self._buffer))
        content = self._buffer[:take]
        self._buffer = self._buffer[take:]
        self._chunk_left -= take
        chunk = self._chunk
        assert chunk is not None
        if chunk.refusal is None and content:
            self._feed(content)
        if self._chunk_left == 0:
            self._end_chunk()

    def _end_chunk(self) -> None:
        chunk = self._chunk
        assert chunk is not None
        self._chunk = None
        self._mode = _Mode.COMMAND
        if chunk.refusal is not None:
            mail = self._mail()
            self._run(self.session.chunk_refused(chunk.refusal), mail)
            return
        if not chunk.last:
            checker = self._checker
            assert checker is not None
            if checker.refusal is not None:
                refusal = checker.refusal
                self._abort_message()
                mail = self._mail()
                self._run(self.session.chunk_refused(refusal), mail)
                return
            self._run([Reply.of(250, "2.0.0", f"{chunk.size} octets received")])
            return
        self._end_message()

    def _end_message(self) -> None:
        checker, sink = self._checker, self._sink
        assert checker is not None and self.info is not None
        self._checker = None
        self._sink = None
        if not checker.finish() or sink is None:
            refusal = checker.refusal or replies.LOCAL_ERROR
            if sink is not None:
                sink.abort()
            log.info(
                "refused message from {client}: {reason}",
                session_id=self.info.session_id,
                client=self.info.client[0],
                reason=refusal.text,
                code=refusal.code,
            )
            mail = self._mail()
            if mail is not None:
                self.factory.handler.message_refused(self.info, mail, refusal)
            self._run(self.session.message_received(refusal), mail)
            return
        self._waiting = True
        mail = self._mail()
        d: Deferred[Any] = maybeDeferred(sink.finish)
        d.addCallback(self.session.message_received)
        d.addErrback(self._internal_error)
        d.addCallback(self._answered, mail)

    def _abort_message(self) -> None:
        sink = self._sink
        self._sink = None
        self._checker = None
        if sink is not None:
            sink.abort()


class SMTPServerFactory(Factory):
    """
    Builds sessions for one listener and enforces its connection limits.

    Embedding programs construct this directly with their own handler and
    listen with any stream endpoint.
    """

    protocol = SMTPServerProtocol  # type: ignore[assignment]
    #: The gateway logs when a listener opens; Twisted's own lines add nothing.
    noisy = False

    def __init__(
        self,
        *,
        name: str,
        settings: SessionSettings,
        handler: IEnvelopeHandler,
        clock: IReactorTime,
        limits: ProtocolLimits | None = None,
        tls_options: ServerTLS | None = None,
        config_version: str = "",
    ) -> None:
        self.name = name
        self.settings = settings
        self.handler = IEnvelopeHandler(handler)
        self.clock = clock
        self.limits = limits or ProtocolLimits()
        self.tls_options = tls_options
        self.config_version = config_version
        self.implicit_tls = settings.tls_mode == "implicit"
        self.sessions: set[SMTPServerProtocol] = set()
        #: How often failed handshakes are logged, per client address.
        self.tls_failures = FailureLogLimit(clock)
        self._per_client: dict[str, int] = {}
        if settings.tls_mode != "none" and tls_options is None:
            raise ValueError(
                f"listener {name}: TLS mode {settings.tls_mode} needs TLS options"
            )

    def buildProtocol(self, addr: IAddress | None) -> Any:
        return SMTPServerProtocol(self)

    def admit(self, client: str) -> Reply | None:
        """
        Count a new connection, or say why it is one too many.
        """
        count = self._per_client.get(client, 0)
        if len(self.sessions) >= self.limits.max_connections:
            return Reply.of(421, "4.7.0", "Too many connections, try again later")
        if count >= self.limits.max_connections_per_client:
            return Reply.of(421, "4.7.0", "Too many connections from your address")
        self._per_client[client] = count + 1
        return None

    def release(self, client: str) -> None:
        count = self._per_client.get(client, 1) - 1
        if count <= 0:
            self._per_client.pop(client, None)
        else:
            self._per_client[client] = count


def listening_factory(
    factory: SMTPServerFactory,
    *,
    proxy_trusted: Sequence[Network] | None = None,
) -> Factory:
    """
    The factory to listen with: implicit TLS and PROXY handling wrapped
    around C{factory} as the listener asks.

    The PROXY header is plaintext even on an implicit-TLS port, so it is
    read outside the TLS layer.
    """
    wrapped: Factory[Any] = factory
    if factory.tls_options is not None and factory.implicit_tls:
        # The factory's options are read per connection: a reload that
        # replaces them (a renewed certificate) applies to the next one.
        wrapped = TLSMemoryBIOFactory(
            CurrentServerTLS(lambda: factory.tls_options),
            False,
            wrapped,
            clock=factory.clock,
        )
    if proxy_trusted is not None:
        wrapped = ProxyHeaderFactory(
            wrapped,
            trusted=proxy_trusted,
            clock=factory.clock,
            listener=factory.name,
            header_timeout=factory.limits.proxy_header_timeout,
        )
    return wrapped


__all__ = [
    "ProtocolLimits",
    "ProxyHeaderFactory",
    "SMTPServerFactory",
    "SMTPServerProtocol",
    "listening_factory",
]
