# -*- test-case-name: tests.test_policy -*-
"""
Server addresses of profiles: parsing Core and relay server URIs, and the check
that a relay does not point back at one of the gateway's own listeners.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from urllib.parse import SplitResult, parse_qsl, urlsplit

from mdgateway.policy.profiles import (
    CoreServer,
    RelayServer,
)
from mdgateway.policy.rules import (
    CORE_SCHEMES,
    HOSTNAME,
    RELAY_SCHEMES,
    IPAddress,
    unmapped,
)


class ServerUriError(ValueError):
    """
    A server URI cannot be used; the message says why.
    """


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_host(host: str) -> str:
    """
    Validate a URI host and return its canonical form (IDN as A-labels).
    """
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ServerUriError(f"not a host name: {host!r}") from None
    if not HOSTNAME.match(host):
        raise ServerUriError(f"not a host name: {host!r}")
    return host


def _split_network_uri(uri: str, scheme: str) -> tuple[SplitResult, str, int | None]:
    """
    Split C{scheme://host[:port][/][?query]}; return the parts, the host and
    the port (L{None} when absent).
    """
    if not uri[len(scheme) + 1 :].startswith("//"):
        raise ServerUriError(f"expected {scheme}://host")
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise ServerUriError(f"not a server URI: {e}") from None
    if parts.username is not None or parts.password is not None:
        raise ServerUriError(
            "credentials do not belong in the URI (use auth_user and "
            "auth_password_file, or ?apikey= for Core)"
        )
    if not parts.hostname:
        raise ServerUriError("missing host")
    if port == 0:
        raise ServerUriError("port 0 is not a port")
    if parts.path not in ("", "/"):
        raise ServerUriError(f"server URIs have no path (got {parts.path!r})")
    if parts.fragment:
        raise ServerUriError("server URIs have no #fragment")
    return parts, _check_host(parts.hostname), port


def _scheme(uri: str, schemes: Iterable[str]) -> str:
    if any(c.isspace() or not c.isprintable() for c in uri):
        raise ServerUriError("white space or control characters in a server URI")
    scheme, colon, _ = uri.partition(":")
    options = ", ".join(schemes)
    if not colon or not scheme:
        raise ServerUriError(f"missing scheme (use {options})")
    scheme = scheme.lower()
    if scheme not in schemes:
        raise ServerUriError(f"unknown scheme {scheme!r} (use {options})")
    return scheme


def parse_core_server(uri: str) -> CoreServer:
    """
    Parse a MetaDefender Core server URI, C{http[s]://host[:port][?apikey=KEY]}
    (port 8008 by default).

    @raise ServerUriError: when it is not one.
    """
    scheme = _scheme(uri, CORE_SCHEMES)
    parts, host, port = _split_network_uri(uri, scheme)
    apikey = None
    if parts.query:
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise ServerUriError(f"bad query string {parts.query!r}") from None
        for key, value in pairs:
            if key != "apikey":
                raise ServerUriError(
                    f"unknown query parameter {key!r} (only apikey is known)"
                )
            if apikey is not None:
                raise ServerUriError("apikey given twice")
            if not value:
                raise ServerUriError("empty apikey")
            apikey = value
    if port is None:
        port = CORE_SCHEMES[scheme]
    return CoreServer(f"{scheme}://{_url_host(host)}:{port}", apikey)


def parse_relay_server(uri: str, base: str | None = None) -> RelayServer:
    """
    Parse an SMTP relay server URI: C{smtp://host[:port]} (port 25,
    STARTTLS by the profile's C{tls}), C{smtps://host[:port]} (port 465,
    implicit TLS), C{mx://domain} (the domain's MX hosts, port 25) or
    C{maildir:folder} (write C{.eml} files, for tests, archives and air
    gaps; a relative folder is taken from C{base}, the config file's folder).

    @raise ServerUriError: when it is not one.
    """
    scheme = _scheme(uri, RELAY_SCHEMES)
    if scheme == "maildir":
        path = uri[len("maildir:") :]
        if path.startswith("//"):
            raise ServerUriError("write maildir:/absolute/folder (one slash)")
        if not path:
            raise ServerUriError("maildir needs a folder (maildir:/var/...)")
        if not path.startswith("/"):
            if base is None:
                raise ServerUriError("maildir path must be absolute (maildir:/var/...)")
            path = os.path.join(base, path)
        return RelayServer("maildir", os.path.normpath(path), 0)
    parts, host, port = _split_network_uri(uri, scheme)
    if parts.query:
        if "apikey" in dict(parse_qsl(parts.query, keep_blank_values=True)):
            raise ServerUriError("apikey is only for MetaDefender Core servers")
        raise ServerUriError("SMTP server URIs take no query parameters")
    if scheme == "mx":
        if port is not None:
            raise ServerUriError("mx:// takes no port (MX hosts listen on 25)")
        if _literal_addresses(host) is not None:
            raise ServerUriError("mx:// needs a domain; use smtp:// for an address")
        return RelayServer("mx", host, 25)
    return RelayServer(scheme, host, RELAY_SCHEMES[scheme] if port is None else port)


# -- the loop guard ---------------------------------------------------------

_LOOPBACKS: frozenset[IPAddress] = frozenset(
    {ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")}
)


def _literal_addresses(host: str) -> frozenset[IPAddress] | None:
    """
    The addresses a host stands for without DNS: an IP literal, or
    C{localhost}; L{None} for any other name.
    """
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return _LOOPBACKS
    try:
        return frozenset({unmapped(ipaddress.ip_address(host))})
    except ValueError:
        return None


def _all_interfaces(host: str) -> tuple[int, ...]:
    """
    The IP versions a listener host binds on every interface (C{""} and
    C{::} are dual-stack, C{0.0.0.0} IPv4 only); empty for a specific host.
    """
    host = host.strip("[]")
    if host in ("", "*"):
        return (4, 6)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ()
    if not address.is_unspecified:
        return ()
    return (4, 6) if address.version == 6 else (4,)


def loops_back(
    server: RelayServer, own_endpoints: Iterable[tuple[str, int]]
) -> str | None:
    """
    Which of the gateway's own listeners C{server} would reach, if any.

    Only literal IPs and C{localhost} are recognised (no DNS at load time):
    a relay on the same port at a loopback or unspecified address when the
    listener binds all interfaces, or at the listener's own address.

    @return: the listener as C{host:port}, or L{None}.
    """
    if server.scheme not in ("smtp", "smtps"):
        return None
    targets = _literal_addresses(server.host)
    if targets is None:
        return None
    for own_host, own_port in own_endpoints:
        if own_port != server.port:
            continue
        shown = f"{_url_host(own_host.strip('[]') or '*')}:{own_port}"
        families = _all_interfaces(own_host)
        if families:
            if any(
                (a.is_loopback or a.is_unspecified) and a.version in families
                for a in targets
            ):
                return shown
            continue
        own = _literal_addresses(own_host)
        if own is None:
            continue
        if targets & own or (
            any(a.is_unspecified for a in targets) and any(a.is_loopback for a in own)
        ):
            return shown
    return None
