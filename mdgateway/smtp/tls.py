# -*- test-case-name: tests.test_smtp_protocol -*-
"""
TLS context helpers for the server side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ITransport
from zope.interface import implementer

_VERSIONS = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
TLS_VERSIONS = tuple(_VERSIONS)


def server_tls_options(
    certificate: str,
    key: str,
    chain: str | None = None,
    minimum_version: str = "TLSv1.2",
    ciphers: str | None = None,
) -> ssl.CertificateOptions:
    """
    Build server TLS options from PEM files.

    @raise OSError: a file cannot be read.
    @raise ValueError: a file is not valid PEM, or key and certificate differ.
    """
    cert_pem = Path(certificate).read_bytes()
    key_pem = Path(key).read_bytes()
    try:
        certificate_obj = x509.load_pem_x509_certificate(cert_pem)
        pkey = serialization.load_pem_private_key(key_pem, password=None)
        extra = []
        if chain:
            extra = x509.load_pem_x509_certificates(Path(chain).read_bytes())
    except (ValueError, TypeError) as e:
        raise ValueError(f"not valid PEM: {e}") from None
    keyword: dict[str, object] = {}
    if ciphers:
        keyword["acceptableCiphers"] = ssl.AcceptableCiphers.fromOpenSSLCipherString(
            ciphers
        )
    options = ssl.CertificateOptions(
        # pyOpenSSL takes cryptography objects (its own X509/PKey wrappers
        # are deprecated); Twisted's annotations still name the old types.
        privateKey=cast(Any, pkey),
        certificate=cast(Any, certificate_obj),
        extraCertChain=cast(Any, extra),
        raiseMinimumTo=_VERSIONS[minimum_version],
        **keyword,  # type: ignore[arg-type]
    )
    try:
        options.getContext().check_privatekey()
    except Exception as e:
        raise ValueError(f"key does not match certificate: {e}") from None
    return options


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
    Server TLS connections made with whatever options C{options()} gives
    at the moment each connection starts, so a listener serving implicit
    TLS takes a reloaded certificate for its next connection while those
    already open keep theirs.
    """

    def __init__(self, options: Callable[[], ssl.CertificateOptions | None]) -> None:
        self._options = options

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        options = self._options()
        if options is None:
            raise RuntimeError("no TLS options for this listener")
        return SSL.Connection(options.getContext(), None)
