# -*- test-case-name: tests.test_smtp_client -*-
"""
Connecting to the servers of a relay profile: the client settings a profile
gives, the endpoint of one server, and one delivery session.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)

from mdgateway.endpoints import client_endpoint
from mdgateway.policy.profiles import RelayServer, SmtpProfile
from mdgateway.smtp.clientmodel import (
    ClientEnvelope,
    Credentials,
    MessageBody,
    SessionConfig,
    SessionFailure,
    SmtpSessionError,
    SmtpTimeouts,
    TransactionResult,
)
from mdgateway.smtp.clientprotocol import (
    DEFAULT_CHUNK_SIZE,
    SmtpClient,
    client_tls_creator,
    connect,
)


@attrs.frozen
class ClientSettings:
    """
    How to talk to the servers of one relay profile.

    @ivar helo: the EHLO/HELO name (C{sender_helo_domain}).
    @ivar tls: the STARTTLS policy: C{none}, C{opportunistic}, C{required}
        or C{verify}; for C{smtps://} only C{verify} matters (check or not).
    @ivar ca_file: PEM file of CAs to trust for C{verify} (default: the
        platform's roots).
    @ivar tls_name: the name the certificate must carry (default: the
        server's host).
    @ivar bind_address: local address to connect from.
    """

    helo: str
    tls: str = "opportunistic"
    ca_file: str | None = None
    tls_name: str | None = None
    credentials: Credentials | None = None
    timeouts: SmtpTimeouts = SmtpTimeouts()
    bind_address: str | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE

    @classmethod
    def from_profile(
        cls, profile: SmtpProfile, helo: str, password: str | None = None
    ) -> ClientSettings:
        """
        Settings from a relay profile; the caller reads the password file
        (off the reactor thread) and passes the password.
        """
        credentials = None
        if profile.auth_user is not None and password is not None:
            credentials = Credentials(profile.auth_user, password)
        return cls(
            helo=helo,
            tls=profile.tls,
            ca_file=profile.ca_file,
            tls_name=profile.tls_name,
            credentials=credentials,
            timeouts=profile.timeouts,
        )

    def session_config(self, implicit_tls: bool) -> SessionConfig:
        """
        The sans-IO session's configuration.
        """
        return SessionConfig(
            helo=self.helo,
            tls=self.tls,
            implicit_tls=implicit_tls,
            credentials=self.credentials,
            timeouts=self.timeouts,
        )


def server_endpoint(
    reactor: IReactorTime,
    server: RelayServer,
    settings: ClientSettings,
    tls_creator: IOpenSSLClientConnectionCreator | None = None,
) -> IStreamClientEndpoint:
    """
    The endpoint for an C{smtp://} or C{smtps://} server (C{mx://} hosts
    are resolved by the caller and passed as C{smtp}).
    """
    if server.scheme not in ("smtp", "smtps"):
        raise ValueError(f"cannot connect to {server}: resolve it first")
    bind = (settings.bind_address, 0) if settings.bind_address else None
    endpoint = client_endpoint(
        reactor, server.host, server.port, settings.timeouts.connect, bind
    )
    if server.scheme == "smtps":
        if tls_creator is None:
            tls_creator = client_tls_creator(
                settings.tls, settings.tls_name or server.host, settings.ca_file
            )
        endpoint = wrapClientTLS(tls_creator, endpoint, clock=reactor)
    return endpoint


async def connect_server(
    reactor: IReactorTime, server: RelayServer, settings: ClientSettings
) -> SmtpClient:
    """
    Connect to one relay server and set the session up.

    @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
    @raise SmtpSessionError: see L{connect}.
    @raise OSError: the CA file cannot be read.
    """
    implicit = server.scheme == "smtps"
    creator = None
    if implicit or settings.tls != "none":
        creator = client_tls_creator(
            settings.tls, settings.tls_name or server.host, settings.ca_file
        )
    endpoint = server_endpoint(reactor, server, settings, creator)
    return await connect(
        reactor,
        endpoint,
        settings.session_config(implicit),
        None if implicit else creator,
        settings.chunk_size,
    )


async def deliver_once(
    reactor: IReactorTime,
    server: RelayServer,
    settings: ClientSettings,
    transactions: Sequence[tuple[ClientEnvelope, MessageBody]],
) -> list[TransactionResult | SessionFailure]:
    """
    One connection, several transactions, then QUIT.

    @return: one entry per transaction, in order: its result, or the
        session failure that stopped it (then repeated for every later
        transaction, which was not attempted).
    @raise OSError: a body file cannot be examined.
    """
    try:
        client = await connect_server(reactor, server, settings)
    except SmtpSessionError as e:
        return [e.failure] * len(transactions)
    outcomes: list[TransactionResult | SessionFailure] = []
    try:
        for envelope, body in transactions:
            try:
                outcomes.append(await client.send(envelope, body))
            except SmtpSessionError as e:
                outcomes += [e.failure] * (len(transactions) - len(outcomes))
                return outcomes
        try:
            await client.quit()
        except SmtpSessionError:
            pass
    finally:
        # Harmless after a QUIT; drops the connection after anything else.
        client.abort()
    return outcomes
