# -*- test-case-name: tests.test_smtp_proxy -*-
"""
PROXY protocol v1 and v2 header parsing (HAProxy's spec), sans-IO.

Twisted's C{haproxy:} wrapper cannot be used here: it trusts every peer,
drops a connection whose first segment is short, never tells the wrapped
protocol when a header arrives alone (so the banner could not wait for it)
and reports the proxy's address to C{connectionMade}. This parser is fed
bytes until it has a whole header, then says who the real client is.
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107


class ProxyHeaderError(Exception):
    """
    The bytes are not a valid PROXY header.
    """


@attrs.frozen
class ProxiedAddresses:
    """
    What the header said. C{client} is L{None} for a v2 LOCAL command or a
    v1 C{UNKNOWN} (the proxy's own health check): the real peer stands.
    """

    client: tuple[str, int] | None
    server: tuple[str, int] | None
    version: int


@attrs.define
class ProxyHeaderParser:
    """
    Accumulates bytes until a complete v1 or v2 header is seen.
    """

    _buffer: bytes = b""

    def feed(self, data: bytes) -> tuple[ProxiedAddresses, bytes] | None:
        """
        @return: the addresses and the bytes after the header, or L{None}
            while the header is incomplete.
        @raise ProxyHeaderError: the input is not a PROXY header.
        """
        self._buffer += data
        buffer = self._buffer
        if buffer[:1] == b"P":
            if not b"PROXY ".startswith(buffer[:6]):
                raise ProxyHeaderError("not a PROXY header")
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > _V1_MAX:
                    raise ProxyHeaderError("v1 header too long")
                return None
            if end + 2 > _V1_MAX:
                raise ProxyHeaderError("v1 header too long")
            return _parse_v1(buffer[:end]), buffer[end + 2 :]
        if not V2_SIGNATURE.startswith(buffer[:12]):
            raise ProxyHeaderError("not a PROXY header")
        if len(buffer) < 16:
            return None
        length = struct.unpack("!H", buffer[14:16])[0]
        if len(buffer) < 16 + length:
            return None
        return _parse_v2(buffer[12], buffer[13], buffer[16 : 16 + length]), buffer[
            16 + length :
        ]


def _parse_v1(line: bytes) -> ProxiedAddresses:
    try:
        words = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    if words[:2] == ["PROXY", "UNKNOWN"]:
        return ProxiedAddresses(None, None, 1)
    if len(words) != 6 or words[0] != "PROXY" or words[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed v1 header")
    if not (words[4].isdigit() and words[5].isdigit()):
        raise ProxyHeaderError("bad port in v1 header")
    if "%" in words[2] or "%" in words[3]:
        raise ProxyHeaderError("zone id in v1 header")
    try:
        source = ipaddress.ip_address(words[2])
        destination = ipaddress.ip_address(words[3])
        ports = int(words[4]), int(words[5])
    except ValueError:
        raise ProxyHeaderError("bad address in v1 header") from None
    expected = 4 if words[1] == "TCP4" else 6
    if source.version != expected or destination.version != expected:
        raise ProxyHeaderError("address family mismatch in v1 header")
    if not all(0 <= port <= 65535 for port in ports):
        raise ProxyHeaderError("bad port in v1 header")
    return ProxiedAddresses((str(source), ports[0]), (str(destination), ports[1]), 1)


def _parse_v2(version_command: int, family: int, body: bytes) -> ProxiedAddresses:
    if version_command >> 4 != 2:
        raise ProxyHeaderError("unsupported PROXY version")
    command = version_command & 0x0F
    if command == 0:
        return ProxiedAddresses(None, None, 2)
    if command != 1:
        raise ProxyHeaderError("unknown v2 command")
    address_family = family >> 4
    if address_family == 1 and len(body) >= 12:
        src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
        return ProxiedAddresses(
            (str(ipaddress.IPv4Address(src)), sport),
            (str(ipaddress.IPv4Address(dst)), dport),
            2,
        )
    if address_family == 2 and len(body) >= 36:
        src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
        return ProxiedAddresses(
            (str(ipaddress.IPv6Address(src)), sport),
            (str(ipaddress.IPv6Address(dst)), dport),
            2,
        )
    if address_family in (0, 3):
        # UNSPEC or a UNIX socket: no IP to act on, keep the real peer.
        return ProxiedAddresses(None, None, 2)
    raise ProxyHeaderError("truncated v2 address block")
