# -*- test-case-name: tests.test_smtp_tls -*-
"""
Server-side TLS: the OpenSSL context every listener uses, its cipher
policy, ALPN, and what a failed handshake tells the operator.

The context is built here with pyOpenSSL rather than taken from Twisted's
C{CertificateOptions}, so that what a client can negotiate is decided in
one place we test: since Twisted 25 every C{CertificateOptions} context
answers an ALPN offer it has no protocol for with an empty selection, which
OpenSSL turns into alert 80 (internal error) for every client that offers
ALPN (Go, Android, browsers' libraries, C{openssl s_client -alpn}).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    ITransport,
)
from zope.interface import implementer

_VERSIONS = {
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}
TLS_VERSIONS = tuple(_VERSIONS)

#: Mozilla's "intermediate" TLS 1.2 suites: forward secrecy and AEAD only
#: (the DHE ones it also lists need DH parameters, which we do not set).
#: TLS 1.3 suites are OpenSSL's, all AEAD.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)

#: The intermediate suites first, then CBC and RSA key exchange for peers
#: that know no better: where TLS is opportunistic, refusing an old peer's
#: cipher sends its mail in plaintext instead (RFC 7435), so any
#: encryption is kept (Postfix makes the same choice for port 25).
OPPORTUNISTIC_CIPHERS = ":".join(
    (
        INTERMEDIATE_CIPHERS,
        "ECDHE+AES",
        "RSA+AESGCM",
        "RSA+AES",
        "!aNULL:!eNULL:!MD5:!DSS:!PSK:!SRP:!3DES:!RC4",
    )
)

#: Named cipher policies for a listener's C{tls_ciphers}.
CIPHER_POLICIES = {
    "intermediate": INTERMEDIATE_CIPHERS,
    "opportunistic": OPPORTUNISTIC_CIPHERS,
}

#: The protocol we select when a client offers it over ALPN.
ALPN_SMTP = b"smtp"


def default_cipher_policy(tls_mode: str, auth: str) -> str:
    """
    The cipher policy of a listener that names none: C{intermediate} where
    TLS is required (C{starttls-required}, C{implicit}) or passwords are
    taken, C{opportunistic} where a client may as well send in plaintext.
    """
    if tls_mode in ("starttls-required", "implicit") or auth != "off":
        return "intermediate"
    return "opportunistic"


def cipher_string(policy: str) -> str:
    """
    The OpenSSL cipher string of a named policy, or C{policy} itself (an
    OpenSSL cipher string).
    """
    return CIPHER_POLICIES.get(policy, policy)


def cipher_problem(policy: str) -> str | None:
    """
    Why OpenSSL would refuse a cipher policy (name or cipher string), or
    C{None} if it selects at least one TLS 1.2 cipher.
    """
    suites = cipher_string(policy)
    try:
        SSL.Context(SSL.TLS_SERVER_METHOD).set_cipher_list(suites.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        names = ", ".join(CIPHER_POLICIES)
        return (
            f"no usable cipher in {policy!r} (use {names} or an OpenSSL cipher string)"
        )
    return None


def select_alpn(connection: SSL.Connection, offered: Sequence[bytes]) -> Any:
    """
    The ALPN answer: C{smtp} if the client offered it, else none at all (the
    handshake goes on without ALPN, as RFC 7301 allows a server that knows
    none of the offered protocols). Never an empty protocol: OpenSSL fails
    the handshake on that.
    """
    if ALPN_SMTP in offered:
        return ALPN_SMTP
    return SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLServerConnectionCreator)
@attrs.frozen
class ServerTLS:
    """
    A listener's TLS settings, ready to serve: one OpenSSL context shared by
    every connection (for STARTTLS and implicit TLS alike).

    @ivar ciphers: the OpenSSL cipher string in force (TLS 1.2).
    @ivar minimum_version: C{TLSv1.2} or C{TLSv1.3}.
    """

    context: SSL.Context
    ciphers: str
    minimum_version: str

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N802
        """
        A new OpenSSL connection for one handshake.
        """
        return SSL.Connection(self.context, None)

    def getContext(self) -> SSL.Context:  # noqa: N802
        """
        The shared context, for code that takes an old-style context
        factory (C{startTLS}, a wrapper choosing the options per connection).
        """
        return self.context


def server_tls_options(
    certificate: str,
    key: str,
    chain: str | None = None,
    minimum_version: str = "TLSv1.2",
    ciphers: str | None = None,
) -> ServerTLS:
    """
    Build a listener's server TLS from PEM files.

    @param ciphers: a policy name of L{CIPHER_POLICIES} or an OpenSSL
        cipher string (default: C{intermediate}).
    @raise OSError: a file cannot be read.
    @raise ValueError: a file is not valid PEM, key and certificate differ,
        or the cipher string selects no cipher.
    """
    cert_pem = Path(certificate).read_bytes()
    key_pem = Path(key).read_bytes()
    chain_pem = Path(chain).read_bytes() if chain else b""
    try:
        certificate_obj = x509.load_pem_x509_certificate(cert_pem)
        pkey = serialization.load_pem_private_key(key_pem, password=None)
        extra = x509.load_pem_x509_certificates(chain_pem) if chain_pem else []
    except (ValueError, TypeError) as e:
        raise ValueError(f"not valid PEM: {e}") from None
    suites = cipher_string(ciphers or "intermediate")
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(_VERSIONS[minimum_version])
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_SINGLE_ECDH_USE
    )
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # A session id context lets clients resume (Postfix and Exchange do).
    context.set_session_id(b"mdgateway")
    try:
        context.set_cipher_list(suites.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise ValueError(f"no usable cipher in {suites!r}") from None
    context.use_certificate(certificate_obj)
    for extra_certificate in extra:
        context.add_extra_chain_cert(extra_certificate)
    try:
        context.use_privatekey(pkey)  # type: ignore[arg-type]
        context.check_privatekey()
    except (SSL.Error, TypeError) as e:
        raise ValueError(f"key does not match certificate: {e}") from None
    context.set_alpn_select_callback(select_alpn)
    return ServerTLS(context, suites, minimum_version)


def negotiated(transport: ITransport) -> tuple[str | None, str | None]:
    """
    The TLS version and cipher of a transport that has completed a handshake.
    """
    get_handle = getattr(transport, "getHandle", None)
    connection = get_handle() if get_handle is not None else None
    version = getattr(connection, "get_protocol_version_name", None)
    cipher = getattr(connection, "get_cipher_name", None)
    if version is None or cipher is None:
        return None, None
    return version(), cipher()


@implementer(IOpenSSLServerConnectionCreator)
class CurrentServerTLS:
    """
    Server TLS connections made with whatever L{ServerTLS} C{options()}
    gives at the moment each connection starts, so a listener serving
    implicit TLS takes a reloaded certificate for its next connection while
    those already open keep theirs.
    """

    def __init__(self, options: Callable[[], ServerTLS | None]) -> None:
        self._options = options

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N802
        options = self._options()
        if options is None:
            raise RuntimeError("no TLS options for this listener")
        return options.serverConnectionForTLS(tlsProtocol)


def handshake_error(reason: object) -> str | None:
    """
    The OpenSSL reasons of a failed handshake (C{"unsupported protocol"},
    C{"no shared cipher"}, C{"tlsv1 alert unknown ca"}...), or C{None} when
    C{reason} (a connection-lost failure) is not a TLS error.
    """
    value = getattr(reason, "value", reason)
    if not isinstance(value, SSL.Error):
        return None
    errors = value.args[0] if value.args else []
    texts = []
    if isinstance(errors, list):
        for error in errors:
            if isinstance(error, tuple) and error:
                texts.append(str(error[-1]))
    return "; ".join(dict.fromkeys(texts)) or str(value) or "TLS error"


class FailureLogLimit:
    """
    How often a failed handshake from one client address is logged at
    I{info}: at most C{burst} lines per C{window} seconds; the rest go to
    I{debug} and are counted, and the next I{info} line says how many were
    held back. A scanner that retries all day costs a few lines an hour.

    At most C{max_clients} addresses are remembered (the oldest are
    forgotten first), so a flood from many addresses costs bounded memory.
    """

    def __init__(
        self,
        clock: IReactorTime,
        window: float = 300.0,
        burst: int = 3,
        max_clients: int = 4096,
    ) -> None:
        self._clock = clock
        self._window = window
        self._burst = burst
        self._max = max_clients
        #: client address to [window start, lines in window, held back]
        self._seen: dict[str, list[float]] = {}

    def admit(self, client: str) -> int | None:
        """
        Count one failure from C{client}: the number of failures held back
        since its last I{info} line if this one is to be logged at I{info},
        or C{None} to log it at I{debug}.
        """
        now = self._clock.seconds()
        seen = self._seen.pop(client, None)
        if seen is None or now - seen[0] >= self._window:
            held = int(seen[2]) if seen is not None else 0
            seen = [now, 0.0, float(held)]
        self._seen[client] = seen  # most recent last
        while len(self._seen) > self._max:
            del self._seen[next(iter(self._seen))]
        if seen[1] < self._burst:
            seen[1] += 1
            held, seen[2] = int(seen[2]), 0.0
            return held
        seen[2] += 1
        return None
