# -*- test-case-name: tests.test_e2e_receive -*-
"""
From a configured listener to the SMTP server factory that serves it: the
session settings, the framing limits, and the wrapping for implicit TLS and
the PROXY protocol.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory

from mdgateway.config import GatewayConfig, ListenerConfig
from mdgateway.receive.handler import EnvelopeHandler
from mdgateway.smtp.server import SessionSettings
from mdgateway.smtp.serverprotocol import (
    ProtocolLimits,
    SMTPServerFactory,
    listening_factory,
)
from mdgateway.smtp.tls import ServerTLS, server_tls_options


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
    handler: EnvelopeHandler,
    clock: IReactorTime,
) -> tuple[SMTPServerFactory, Factory]:
    """
    The SMTP factory for one configured listener, and the factory to listen
    with (the first wrapped for implicit TLS and PROXY as configured).
    """
    tls_options = None
    if listener.tls != "none":
        tls_options = listener_tls_options(listener, config)
    factory = SMTPServerFactory(
        name=listener.name,
        settings=session_settings(listener, config),
        handler=handler,
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


def listener_tls_options(
    listener: ListenerConfig, config: GatewayConfig
) -> ServerTLS | None:
    """
    The server TLS of one listener under C{config}: the certificate (read
    from its files now, so a reload picks up a renewed one) with the
    listener's cipher policy; C{None} without a certificate or TLS.
    """
    tls = config.tls
    if listener.tls == "none" or not (tls.certificate and tls.key):
        return None
    return server_tls_options(
        tls.certificate,
        tls.key,
        tls.chain,
        tls.min_version,
        listener.cipher_policy(tls.ciphers),
    )


def apply_settings(
    factory: SMTPServerFactory,
    listeners: tuple[ListenerConfig, ...],
    config: GatewayConfig,
) -> None:
    """
    Give a running listener's new sessions the limits and names of a
    reloaded C{config}; sessions in progress keep theirs.
    """
    for listener in listeners:
        if listener.name == factory.name:
            factory.settings = session_settings(listener, config)
            factory.limits = protocol_limits(listener, config)
            factory.config_version = config.version
