"""
Throw-away TLS material for tests: a CA and a server certificate for
C{localhost}, C{127.0.0.1} and C{::1}, written as PEM files.

Keys are EC P-256, so generating a fresh set per test costs milliseconds.
Use L{make_test_pki} with pytest's C{tmp_path} (or a trial C{mktemp()}).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl as tssl


@attrs.frozen
class TestPKI:
    """
    Paths of the generated PEM files.

    @ivar ca_cert: the CA certificate (the trust root for clients).
    @ivar ca_key: the CA's private key.
    @ivar server_cert: the server's certificate alone.
    @ivar server_key: the server's private key (unencrypted PKCS#8).
    @ivar server_chain: the certificates to send after the server's own
        (here the CA, standing in for an intermediate).
    @ivar server_combined: key and certificate in one file, for
        C{ssl:...:privateKey=...:certKey=...} endpoint strings.
    @ivar names: the DNS names and IP addresses the certificate covers.
    """

    __test__ = False  # not a test class, whatever pytest thinks of the name

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    server_chain: Path
    server_combined: Path
    names: tuple[str, ...]

    def server_ssl_context(self) -> ssl.SSLContext:
        """
        A stdlib server context (for aiosmtpd and other asyncio servers).
        """
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.server_cert), str(self.server_key))
        return context

    def client_ssl_context(self) -> ssl.SSLContext:
        """
        A stdlib client context that trusts only this CA (for smtplib).
        """
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def twisted_server_options(self) -> tssl.CertificateOptions:
        """
        Twisted server options with this certificate and key.
        """
        pem = self.server_key.read_bytes() + self.server_cert.read_bytes()
        return tssl.PrivateCertificate.loadPEM(pem).options()

    def twisted_client_options(self, name: str = "localhost") -> object:
        """
        Twisted client options that trust this CA and check C{name}.
        """
        ca = tssl.Certificate.loadPEM(self.ca_cert.read_bytes())
        return tssl.optionsForClientTLS(name, trustRoot=ca)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mdgateway tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def make_test_pki(
    directory: Path | str,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
    days: int = 30,
) -> TestPKI:
    """
    Create a CA and a server certificate signed by it in C{directory}.

    @param dns_names: DNS names of the server certificate (the first is
        also its common name).
    @param ip_addresses: IP addresses of the server certificate.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(days=1)
    not_after = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("mdgateway test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    common_name = dns_names[0] if dns_names else ip_addresses[0]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    server_pem = server_cert.public_bytes(serialization.Encoding.PEM)
    return TestPKI(
        directory=directory,
        ca_cert=_write(directory / "ca.pem", ca_pem),
        ca_key=_write(directory / "ca.key", key_pem(ca_key), private=True),
        server_cert=_write(directory / "server.pem", server_pem),
        server_key=_write(directory / "server.key", key_pem(server_key), private=True),
        server_chain=_write(directory / "server-chain.pem", ca_pem),
        server_combined=_write(
            directory / "server-combined.pem",
            key_pem(server_key) + server_pem,
            private=True,
        ),
        names=tuple(dns_names) + tuple(ip_addresses),
    )
