# -*- test-case-name: tests.test_smtp_client -*-
"""
The Twisted side of the SMTP client.

L{SmtpClientProtocol} is a thin shim that carries out what
L{mdgateway.smtp.client.ClientSession} decides: it writes, starts TLS, runs
the one session timer on an injected clock and streams the body from disk
with back-pressure. L{connect} and L{SmtpClient} are the coroutine API
that L{mdgateway.relay.connect} builds on; every failure (refused, reset,
hang-up at any point, timeout, TLS) ends in a L{SmtpSessionError}, never in
a Deferred that does not fire.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from OpenSSL import SSL
from service_identity.exceptions import CertificateError, VerificationError
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mdgateway.smtp.client import ClientSession
from mdgateway.smtp.clientmodel import (
    Action,
    ArmTimer,
    CancelTimer,
    Chunks,
    ClientEnvelope,
    CloseConnection,
    FailureKind,
    FileRegion,
    MessageBody,
    QuitDone,
    ResumeBody,
    Send,
    ServerInfo,
    SessionConfig,
    SessionFailed,
    SessionFailure,
    SessionReady,
    SmtpSessionError,
    Stage,
    StartBody,
    StartClientTLS,
    StopBody,
    TransactionDone,
    TransactionResult,
)

if TYPE_CHECKING:
    # For the annotation only: twisted.internet.ssl does not re-export it.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

log = Logger()

#: Bytes read from the body source per chunk.
DEFAULT_CHUNK_SIZE = 64 * 1024

_T = TypeVar("_T")
_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


# Body sources --------------------------------------------------------------


def body_size(body: MessageBody) -> int | None:
    """
    The body's size in bytes for C{SIZE=}, or C{None} if a part of unknown
    size makes it unknowable.

    @raise OSError: a file cannot be examined.
    """
    total = 0
    for part in body.parts:
        if isinstance(part, bytes):
            total += len(part)
        elif isinstance(part, FileRegion):
            if part.length is not None:
                total += part.length
            else:
                total += max(0, os.stat(part.path).st_size - part.offset)
        elif part.size is None:
            return None
        else:
            total += part.size
    return total


class BodyReader:
    """
    Read a L{MessageBody} front to back in chunks of at most C{chunk_size}
    bytes; only one chunk is ever held.
    """

    def __init__(self, body: MessageBody, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self._parts = iter(body.parts)
        self._chunk_size = chunk_size
        self._current: Generator[bytes, None, None] | None = None

    def read(self) -> bytes:
        """
        Return the next chunk, C{b""} at the end.

        @raise OSError: a file cannot be read.
        """
        while True:
            if self._current is None:
                part = next(self._parts, None)
                if part is None:
                    return b""
                self._current = self._iterate(part)
            chunk = next(self._current, None)
            if chunk is None:
                self._current = None
            elif chunk:
                return chunk

    def close(self) -> None:
        """
        Release the open file, if any.
        """
        if self._current is not None:
            self._current.close()
            self._current = None
        self._parts = iter(())

    def _iterate(
        self, part: bytes | FileRegion | Chunks
    ) -> Generator[bytes, None, None]:
        size = self._chunk_size
        if isinstance(part, bytes):
            for start in range(0, len(part), size):
                yield part[start : start + size]
        elif isinstance(part, FileRegion):
            with open(part.path, "rb") as f:
                f.seek(part.offset)
                remaining = part.length
                while remaining is None or remaining > 0:
                    wanted = size if remaining is None else min(size, remaining)
                    data = f.read(wanted)
                    if not data:
                        return
                    if remaining is not None:
                        remaining -= len(data)
                    yield data
        else:
            chunks: Iterator[bytes] = iter(part.chunks)
            yield from chunks


# TLS -------------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class UncheckedClientTLS:
    """
    Client TLS without any certificate check, for the C{opportunistic} and
    C{required} policies; still sends the server name (SNI) so a server
    with several certificates picks the right one.
    """

    def __init__(self, server_name: str | None) -> None:
        self._options = ssl.CertificateOptions()
        self._sni: bytes | None = None
        if server_name and not (isIPAddress(server_name) or isIPv6Address(server_name)):
            try:
                self._sni = server_name.encode("idna")
            except UnicodeError:
                self._sni = None

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """
        Make the OpenSSL connection for one handshake.
        """
        connection = SSL.Connection(self._options.getContext(), None)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


def load_trust_root(ca_file: str) -> IOpenSSLTrustRoot:
    """
    Trust exactly the CA certificates in a PEM file (one or several).

    Reads a small file; call it when a profile is loaded, or accept the
    few microseconds per connection.

    @raise OSError: the file cannot be read.
    @raise ValueError: it holds no certificate.
    """
    pem = Path(ca_file).read_bytes()
    certificates = [ssl.Certificate.loadPEM(m) for m in _PEM_CERT.findall(pem)]
    if not certificates:
        raise ValueError(f"{ca_file}: no PEM certificate found")
    root: IOpenSSLTrustRoot = ssl.trustRootFromCertificates(certificates)
    return root


def client_tls_creator(
    policy: str, name: str, ca_file: str | None = None
) -> IOpenSSLClientConnectionCreator:
    """
    TLS options for one server under a profile's policy: C{verify} checks
    the chain (against C{ca_file}, or the platform's roots) and the name
    with service_identity; any other policy encrypts without checking.

    @param name: the name the certificate must carry (the profile's
        C{tls_name}, else the server's host).
    """
    if policy == "verify":
        trust = load_trust_root(ca_file) if ca_file else ssl.platformTrust()
        return ssl.optionsForClientTLS(name, trustRoot=trust)
    return UncheckedClientTLS(name)


# The protocol ----------------------------------------------------------------


@implementer(IPushProducer)
class _BodyProducer:
    """
    Streams the body into the transport: runs until the transport pauses
    it, the body ends or the session stops wanting chunks.
    """

    def __init__(self, protocol: SmtpClientProtocol) -> None:
        self._protocol = protocol
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._protocol._pump()

    def stopProducing(self) -> None:
        self._protocol._drop_body(unregister=False)


def _describe(reason: Failure) -> str:
    message = reason.getErrorMessage()
    name = reason.type.__name__ if isinstance(reason.type, type) else "error"
    return f"{name}: {message}"


@implementer(IHandshakeListener)
class SmtpClientProtocol(Protocol):
    """
    Carries out a L{ClientSession}'s actions on a Twisted transport.

    @ivar ready: fires with the L{ServerInfo} once the session is set up,
        or fails with L{SmtpSessionError}.
    """

    def __init__(
        self,
        session: ClientSession,
        clock: IReactorTime,
        tls_creator: IOpenSSLClientConnectionCreator | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        config = session.config
        if tls_creator is None and config.tls != "none" and not config.implicit_tls:
            raise ValueError(f"TLS policy {config.tls!r} needs a tls_creator")
        self.session = session
        self._clock = clock
        self._tls_creator = tls_creator
        self._chunk_size = chunk_size
        self.ready: Deferred[ServerInfo] = Deferred(self._cancel_ready)
        self._operation: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._body: MessageBody | None = None
        self._reader: BodyReader | None = None
        self._producer: _BodyProducer | None = None
        self._pumping = False
        self._tls_pending = config.implicit_tls
        self._connected = False

    # Transport events ----------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        self._run(self.session.connection_made())

    def dataReceived(self, data: bytes) -> None:
        self._run(self.session.data_received(data))

    def handshakeCompleted(self) -> None:
        self._tls_pending = False
        version = cipher = None
        try:
            handle = cast(Any, self.transport).getHandle()
            version = handle.get_protocol_version_name()
            cipher = handle.get_cipher_name()
        except Exception:
            # Only for the record; a transport without a TLS handle is fine.
            pass
        self._run(self.session.tls_established(version, cipher))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        tls_error = (
            self._tls_pending
            or reason.check(SSL.Error, VerificationError, CertificateError) is not None
        )
        self._run(self.session.connection_lost(tls_error, _describe(reason)))
        self._cancel_timer()
        self._drop_body(unregister=False)
        # The session reports every loss; this only guards against a
        # Deferred being left unfired if it ever did not.
        if not self.ready.called or self._operation is not None:
            failure = self.session.failure or SessionFailure(
                FailureKind.LOST, Stage.IDLE, _describe(reason)
            )
            self._fail_waiters(failure)

    # Operations ----------------------------------------------------------

    def send(
        self, envelope: ClientEnvelope, body: MessageBody | None
    ) -> Deferred[TransactionResult]:
        """
        Run one transaction; fires with its L{TransactionResult} or fails
        with L{SmtpSessionError}. Without a body it is a recipient probe:
        MAIL and RCPT only.

        @raise OSError: a body file cannot be examined (nothing was sent).
        @raise RuntimeError: another operation is in progress.
        """
        self._idle_check()
        if not self.session.ready:
            return self._failed()
        size = body_size(body) if body is not None else None
        d: Deferred[TransactionResult] = Deferred(self._cancel_operation)
        self._operation = d
        self._body = body
        try:
            actions = self.session.start_transaction(envelope, size, probe=body is None)
        except BaseException:
            self._operation = self._body = None
            raise
        self._run(actions)
        return d

    def quit(self) -> Deferred[None]:
        """
        Send QUIT and close; fires when the connection is closed.
        """
        self._idle_check()
        if self.session.closed:
            return succeed(None)
        actions = self.session.quit()
        d: Deferred[None] = Deferred(self._cancel_operation)
        self._operation = d
        self._run(actions)
        return d

    def abort(self) -> None:
        """
        Drop the connection now; a pending operation fails with
        C{ABORTED}.
        """
        self._run(self.session.abort())

    # Internals -------------------------------------------------------------

    def _idle_check(self) -> None:
        if self._operation is not None:
            raise RuntimeError("another operation is in progress on this connection")

    def _failed(self) -> Deferred[_T]:
        failure = self.session.failure or SessionFailure(
            FailureKind.LOST, Stage.IDLE, "the connection is closed"
        )
        d: Deferred[_T] = Deferred()
        d.errback(SmtpSessionError(failure))
        return d

    def _cancel_ready(self, d: Deferred[ServerInfo]) -> None:
        self._run(self.session.abort("cancelled during setup"))

    def _cancel_operation(self, d: Deferred[Any]) -> None:
        if self._operation is d:
            self._operation = None
        self._run(self.session.abort("cancelled"))

    def _fail_waiters(self, failure: SessionFailure) -> None:
        if not self.ready.called:
            self.ready.errback(SmtpSessionError(failure))
        operation, self._operation = self._operation, None
        if operation is not None:
            operation.errback(SmtpSessionError(failure))

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            self._do(action)

    def _do(self, action: Action) -> None:
        transport = cast(Any, self.transport)
        match action:
            case Send(data=data):
                if self._connected:
                    transport.write(data)
            case StartClientTLS():
                self._tls_pending = True
                transport.startTLS(self._tls_creator)
            case ArmTimer(seconds=seconds):
                if self._timer is not None and self._timer.active():
                    self._timer.reset(seconds)
                else:
                    self._timer = self._clock.callLater(seconds, self._timed_out)
            case CancelTimer():
                self._cancel_timer()
            case StartBody():
                self._start_body()
            case ResumeBody():
                self._pump()
            case StopBody():
                self._drop_body()
            case SessionReady(info=info):
                if not self.ready.called:
                    self.ready.callback(info)
            case TransactionDone(result=result):
                operation, self._operation = self._operation, None
                self._body = None
                log.debug(
                    "SMTP transaction done: {codes}",
                    codes=[r.code for r in result.recipients],
                )
                if operation is not None:
                    operation.callback(result)
            case SessionFailed(failure=failure):
                log.info(
                    "SMTP session failed: {failure}",
                    failure=str(failure),
                    kind=failure.kind.value,
                    stage=failure.stage.value,
                )
                self._body = None
                self._fail_waiters(failure)
            case CloseConnection(abort=abort):
                self._drop_body()
                if self._connected:
                    if abort:
                        transport.abortConnection()
                    else:
                        transport.loseConnection()
            case QuitDone():
                operation, self._operation = self._operation, None
                if operation is not None:
                    operation.callback(None)

    def _timed_out(self) -> None:
        self._timer = None
        self._run(self.session.timer_expired())

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _start_body(self) -> None:
        assert self._body is not None
        self._reader = BodyReader(self._body, self._chunk_size)
        self._producer = _BodyProducer(self)
        cast(Any, self.transport).registerProducer(self._producer, True)
        self._pump()

    def _pump(self) -> None:
        """
        Send chunks while the transport takes them and the session wants
        them; the transport's C{pauseProducing} stops the loop and its
        C{resumeProducing} restarts it.
        """
        if self._pumping:
            return
        self._pumping = True
        try:
            while (
                self._reader is not None
                and self._producer is not None
                and not self._producer.paused
                and self.session.wants_body
            ):
                try:
                    # One chunk (64 KiB by default) is read on the reactor
                    # thread. The spool file was written moments ago and
                    # sits in the page cache, so the read takes microseconds,
                    # less than handing it to a thread would; back-pressure
                    # keeps at most a chunk or two in memory.
                    chunk = self._reader.read()
                except Exception as e:
                    log.failure("could not read the message body")
                    self._run(self.session.body_failed(f"cannot read the body: {e}"))
                    return
                if not chunk:
                    self._drop_body()
                    self._run(self.session.body_end())
                    return
                self._run(self.session.body_chunk(chunk))
        finally:
            self._pumping = False

    def _drop_body(self, unregister: bool = True) -> None:
        if self._producer is not None and unregister and self._connected:
            cast(Any, self.transport).unregisterProducer()
        self._producer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None


class _ClientFactory(Factory):
    def __init__(self, build: Callable[[], SmtpClientProtocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: object) -> SmtpClientProtocol:
        return self._build()


class SmtpClient:
    """
    A connected SMTP session, set up (greeted, TLS and AUTH as configured)
    and ready for transactions, one at a time.
    """

    def __init__(self, protocol: SmtpClientProtocol) -> None:
        self.protocol = protocol

    @property
    def info(self) -> ServerInfo:
        """
        What the server announced and how the session is secured.
        """
        return self.protocol.session.info

    @property
    def usable(self) -> bool:
        """
        C{True} while another transaction may be sent.
        """
        return self.protocol.session.ready

    async def send(
        self, envelope: ClientEnvelope, body: MessageBody
    ) -> TransactionResult:
        """
        Send one message; an C{RSET} precedes every transaction after the
        first.

        @raise SmtpSessionError: the session failed; the connection is gone.
        @raise OSError: a body file cannot be examined (nothing was sent).
        """
        return await self.protocol.send(envelope, body)

    async def probe(self, envelope: ClientEnvelope) -> TransactionResult:
        """
        Ask whether the server would take the envelope's recipients: MAIL
        and RCPT only, no message. Each recipient result comes from RCPT.

        @raise SmtpSessionError: the session failed; the connection is gone.
        """
        return await self.protocol.send(envelope, None)

    async def quit(self) -> None:
        """
        Say QUIT and close the connection.
        """
        await self.protocol.quit()

    def abort(self) -> None:
        """
        Drop the connection at once.
        """
        self.protocol.abort()


async def connect(
    clock: IReactorTime,
    endpoint: IStreamClientEndpoint,
    config: SessionConfig,
    tls_creator: IOpenSSLClientConnectionCreator | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SmtpClient:
    """
    Connect through C{endpoint} and set the session up.

    @param endpoint: a plain endpoint, or one wrapped with
        C{wrapClientTLS} when C{config.implicit_tls}.
    @param tls_creator: TLS options for STARTTLS (see
        L{client_tls_creator}).
    @raise SmtpSessionError: connection, TLS, greeting, EHLO or AUTH
        failure.
    """

    def build() -> SmtpClientProtocol:
        return SmtpClientProtocol(ClientSession(config), clock, tls_creator, chunk_size)

    connecting = endpoint.connect(_ClientFactory(build))
    connecting.addTimeout(config.timeouts.connect, clock)
    try:
        protocol = await connecting
    except CancelledError:
        raise
    except Exception as e:
        failure = SessionFailure(
            FailureKind.CONNECT, Stage.CONNECT, _describe(Failure(e))
        )
        raise SmtpSessionError(failure) from e
    assert isinstance(protocol, SmtpClientProtocol)
    await protocol.ready
    return SmtpClient(protocol)
