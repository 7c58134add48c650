"""
Tests for L{mdgateway.smtp.proxy}: PROXY protocol v1 and v2 headers, whole
and in arbitrary pieces, and the refusal of anything else.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.smtp.proxy import (
    V2_SIGNATURE,
    ProxiedAddresses,
    ProxyHeaderError,
    ProxyHeaderParser,
)

PROPERTY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def v2(command: int, family: int, body: bytes, version: int = 2) -> bytes:
    """
    A v2 header: signature, version and command, family and protocol, length.
    """
    return (
        V2_SIGNATURE
        + bytes([version << 4 | command, family])
        + struct.pack("!H", len(body))
        + body
    )


def v2_proxy(
    source: IPAddress, destination: IPAddress, ports: tuple[int, int], tlvs: bytes = b""
) -> bytes:
    """
    A v2 PROXY header for a TCP connection, optionally followed by TLVs.
    """
    family = 0x11 if source.version == 4 else 0x21
    body = source.packed + destination.packed + struct.pack("!HH", *ports) + tlvs
    return v2(1, family, body)


def feed_pieces(
    pieces: list[bytes],
) -> tuple[ProxiedAddresses, bytes] | None:
    """
    Feed C{pieces} to a fresh parser until it has a header.

    @return: the addresses and every byte after the header (what the parser
        returned plus the pieces never fed), or L{None} if it never finished.
    """
    parser = ProxyHeaderParser()
    for index, piece in enumerate(pieces):
        result = parser.feed(piece)
        if result is not None:
            addresses, rest = result
            return addresses, rest + b"".join(pieces[index + 1 :])
    return None


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """
    Split C{data} at the given offsets (any order, repeats allowed).
    """
    bounds = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# -- strategies -------------------------------------------------------------

ports = st.integers(0, 65535)


def _v1(version: Literal[4, 6]) -> st.SearchStrategy[tuple[bytes, ProxiedAddresses]]:
    def build(
        source: IPAddress, destination: IPAddress, sport: int, dport: int
    ) -> tuple[bytes, ProxiedAddresses]:
        line = f"PROXY TCP{version} {source} {destination} {sport} {dport}\r\n"
        return line.encode(), ProxiedAddresses(
            (str(source), sport), (str(destination), dport), 1
        )

    addresses = st.ip_addresses(v=version)
    return st.builds(build, addresses, addresses, ports, ports)


def _v2(version: Literal[4, 6]) -> st.SearchStrategy[tuple[bytes, ProxiedAddresses]]:
    def build(
        source: IPAddress,
        destination: IPAddress,
        sport: int,
        dport: int,
        tlvs: bytes,
    ) -> tuple[bytes, ProxiedAddresses]:
        return v2_proxy(source, destination, (sport, dport), tlvs), ProxiedAddresses(
            (str(source), sport), (str(destination), dport), 2
        )

    addresses = st.ip_addresses(v=version)
    return st.builds(build, addresses, addresses, ports, ports, st.binary(max_size=30))


_unspecified = st.one_of(
    st.sampled_from([b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ::1 ::2 1 2\r\n"]).map(
        lambda h: (h, ProxiedAddresses(None, None, 1))
    ),
    st.builds(
        lambda family, body: (v2(0, family, body), ProxiedAddresses(None, None, 2)),
        st.sampled_from([0x00, 0x11, 0x21, 0x31]),
        st.binary(max_size=40),
    ),
    st.builds(
        lambda family, body: (v2(1, family, body), ProxiedAddresses(None, None, 2)),
        st.sampled_from([0x00, 0x01, 0x31, 0x32]),
        st.binary(max_size=216),
    ),
)
headers = _v1(4) | _v1(6) | _v2(4) | _v2(6) | _unspecified
trailers = st.sampled_from([b"", b"EHLO client.example\r\n", b"\x16\x03\x01"]) | (
    st.binary(max_size=20)
)


# -- tests -----------------------------------------------------------------


class V1Tests(SynchronousTestCase):
    """
    Version 1, the text header.
    """

    def test_tcp4(self) -> None:
        """
        A TCP4 line gives the client and server addresses and the bytes after.
        """
        self.assertEqual(
            ProxyHeaderParser().feed(
                b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\nEHLO x\r\n"
            ),
            (
                ProxiedAddresses(("192.0.2.1", 56324), ("198.51.100.2", 25), 1),
                b"EHLO x\r\n",
            ),
        )

    def test_tcp6(self) -> None:
        """
        A TCP6 line; addresses come back in their canonical text form.
        """
        self.assertEqual(
            ProxyHeaderParser().feed(
                b"PROXY TCP6 2001:DB8:0::1 2001:db8::2 65535 0\r\n"
            ),
            (ProxiedAddresses(("2001:db8::1", 65535), ("2001:db8::2", 0), 1), b""),
        )

    def test_unknown(self) -> None:
        """
        UNKNOWN (a proxy health check) says nothing about the client, with or
        without the optional addresses after it.
        """
        for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n"):
            self.assertEqual(
                ProxyHeaderParser().feed(line + b"QUIT\r\n"),
                (ProxiedAddresses(None, None, 1), b"QUIT\r\n"),
            )

    def test_incomplete(self) -> None:
        """
        Without its CRLF the line is not finished yet.
        """
        parser = ProxyHeaderParser()
        self.assertIsNone(parser.feed(b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r"))
        self.assertEqual(
            parser.feed(b"\n"),
            (ProxiedAddresses(("192.0.2.1", 1), ("198.51.100.2", 2), 1), b""),
        )

    def test_malformed(self) -> None:
        """
        A wrong protocol word, a missing or extra field, doubled spaces,
        a bad address and non-ASCII are refused.
        """
        for line in (
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
            b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 \xb2\r\n",
            b"PROXY tcp4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY\r\n",
        ):
            with self.assertRaises(ProxyHeaderError, msg=line):
                ProxyHeaderParser().feed(line)

    def test_family_mismatch(self) -> None:
        """
        TCP4 with an IPv6 address, or TCP6 with an IPv4 one, is refused.
        """
        for line in (
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 2001:db8::2 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP6 2001:db8::1 198.51.100.2 1 2\r\n",
        ):
            with self.assertRaises(ProxyHeaderError, msg=line):
                ProxyHeaderParser().feed(line)

    def test_bad_ports(self) -> None:
        """
        Ports outside 0..65535 or not numbers are refused.
        """
        for ports in (b"65536 25", b"25 65536", b"-1 25", b"x 25", b"25 0x19"):
            with self.assertRaises(ProxyHeaderError, msg=ports):
                ProxyHeaderParser().feed(
                    b"PROXY TCP4 192.0.2.1 198.51.100.2 %s\r\n" % ports
                )

    def test_non_decimal_ports_and_zone_ids(self) -> None:
        """
        A port is plain decimal digits and an address has no zone id; anything
        else is refused.
        """
        for line in (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 +25 25\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 2_5 25\r\n",
            b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n",
        ):
            with self.assertRaises(ProxyHeaderError, msg=line):
                ProxyHeaderParser().feed(line)

    def test_too_long_without_crlf(self) -> None:
        """
        More than 107 bytes without a CRLF is refused at once, rather than
        buffered without end.
        """
        parser = ProxyHeaderParser()
        self.assertIsNone(parser.feed(b"PROXY " + b"1" * 100))
        with self.assertRaises(ProxyHeaderError):
            parser.feed(b"1" * 2)

    def test_too_long_with_crlf(self) -> None:
        """
        A line longer than 107 bytes (CRLF included) is refused even when it
        arrives whole, just as it is when it arrives in pieces.
        """
        padded = b"PROXY TCP4 192.0.2.1 198.51.100.2 " + b"0" * 80 + b"25 25\r\n"
        for line in (b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", padded):
            self.assertGreater(len(line), 107)
            with self.assertRaises(ProxyHeaderError):
                feed_pieces([bytes([b]) for b in line])
            with self.assertRaises(ProxyHeaderError, msg=line):
                ProxyHeaderParser().feed(line)


class V2Tests(SynchronousTestCase):
    """
    Version 2, the binary header.
    """

    def test_proxy_ipv4(self) -> None:
        """
        A PROXY command over IPv4 gives both addresses and ports.
        """
        header = v2_proxy(
            ipaddress.IPv4Address("192.0.2.1"),
            ipaddress.IPv4Address("198.51.100.2"),
            (56324, 25),
        )
        self.assertEqual(
            ProxyHeaderParser().feed(header + b"EHLO x\r\n"),
            (
                ProxiedAddresses(("192.0.2.1", 56324), ("198.51.100.2", 25), 2),
                b"EHLO x\r\n",
            ),
        )

    def test_proxy_ipv6_with_tlvs(self) -> None:
        """
        A PROXY command over IPv6; TLVs after the addresses are skipped and
        not mistaken for the bytes after the header.
        """
        tlvs = b"\x04\x00\x02hi" + b"\x20\x00\x01\x00"
        header = v2_proxy(
            ipaddress.IPv6Address("2001:db8::1"),
            ipaddress.IPv6Address("2001:db8::2"),
            (1, 65535),
            tlvs,
        )
        self.assertEqual(
            ProxyHeaderParser().feed(header + b"QUIT\r\n"),
            (
                ProxiedAddresses(("2001:db8::1", 1), ("2001:db8::2", 65535), 2),
                b"QUIT\r\n",
            ),
        )

    def test_local(self) -> None:
        """
        A LOCAL command (the proxy's own check) says nothing about the client,
        whatever address block it carries.
        """
        for family, body in ((0x00, b""), (0x11, b"\x00" * 12), (0x21, b"junk")):
            self.assertEqual(
                ProxyHeaderParser().feed(v2(0, family, body) + b"x"),
                (ProxiedAddresses(None, None, 2), b"x"),
            )

    def test_unix_and_unspec(self) -> None:
        """
        PROXY over a UNIX socket or UNSPEC family carries no IP: the real
        peer stands.
        """
        for family, body in ((0x31, b"\x00" * 216), (0x32, b"/a\x00"), (0x00, b"")):
            self.assertEqual(
                ProxyHeaderParser().feed(v2(1, family, body)),
                (ProxiedAddresses(None, None, 2), b""),
            )

    def test_waits_for_address_block(self) -> None:
        """
        The header is complete only once the length field's bytes are in.
        """
        header = v2_proxy(
            ipaddress.IPv4Address("192.0.2.1"),
            ipaddress.IPv4Address("192.0.2.2"),
            (1, 2),
        )
        parser = ProxyHeaderParser()
        self.assertIsNone(parser.feed(header[:15]))
        self.assertIsNone(parser.feed(header[15:-1]))
        self.assertIsNotNone(parser.feed(header[-1:]))

    def test_bad_version_command_family(self) -> None:
        """
        Version 1 in the binary form, an unknown command, an unknown family,
        and an address block too short for its family are refused.
        """
        for header in (
            v2(1, 0x11, b"\x00" * 12, version=1),
            v2(1, 0x11, b"\x00" * 12, version=3),
            v2(2, 0x11, b"\x00" * 12),
            v2(0xF, 0x11, b"\x00" * 12),
            v2(1, 0x41, b"\x00" * 36),
            v2(1, 0x11, b"\x00" * 11),
            v2(1, 0x21, b"\x00" * 35),
            v2(1, 0x21, b"\x00" * 12),
        ):
            with self.assertRaises(ProxyHeaderError, msg=header):
                ProxyHeaderParser().feed(header)


class GarbageTests(SynchronousTestCase):
    """
    Anything that is not a PROXY header is refused, as early as possible.
    """

    def test_not_a_header(self) -> None:
        """
        An SMTP command, an HTTP request, a TLS hello and a lower-case
        "proxy" are refused.
        """
        for data in (
            b"EHLO client.example\r\n",
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01\x00\xa5",
            b"proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXZ",
            b"PROX\r\n",
        ):
            with self.assertRaises(ProxyHeaderError, msg=data):
                ProxyHeaderParser().feed(data)

    def test_refused_on_first_wrong_byte(self) -> None:
        """
        A wrong byte is refused as soon as it arrives, without waiting for
        a whole header's worth.
        """
        for good, bad in ((b"PROX", b"Z"), (V2_SIGNATURE[:7], b"X"), (b"", b"E")):
            parser = ProxyHeaderParser()
            if good:
                self.assertIsNone(parser.feed(good))
            with self.assertRaises(ProxyHeaderError):
                parser.feed(bad)

    def test_wrong_v2_signature(self) -> None:
        """
        A v2 signature with any one byte changed is refused.
        """
        for index in range(len(V2_SIGNATURE)):
            broken = bytearray(V2_SIGNATURE)
            broken[index] ^= 0x01
            with self.assertRaises(ProxyHeaderError, msg=index):
                ProxyHeaderParser().feed(bytes(broken) + b"\x21\x11\x00\x0c")

    @PROPERTY
    @given(
        st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE]),
        st.binary(max_size=120),
        st.data(),
    )
    def test_random_bytes_only_header_errors(
        self, prefix: bytes, junk: bytes, data: st.DataObject
    ) -> None:
        """
        Any bytes, after a plausible start or not, fed in any pieces, give
        L{None}, a result or L{ProxyHeaderError}, never another exception.
        """
        stream = prefix + junk
        points = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
        parser = ProxyHeaderParser()
        try:
            for piece in cut(stream, points):
                if parser.feed(piece) is not None:
                    break
        except ProxyHeaderError:
            pass


class PiecesTests(SynchronousTestCase):
    """
    However the network cuts the header, the parser gives the same answer.
    """

    @PROPERTY
    @given(headers, trailers, st.data())
    def test_any_split(
        self,
        header: tuple[bytes, ProxiedAddresses],
        trailer: bytes,
        data: st.DataObject,
    ) -> None:
        """
        A valid header (v1 TCP4/TCP6/UNKNOWN, v2 PROXY/LOCAL, any family) with
        trailing bytes, cut anywhere, gives the expected addresses and exactly
        the trailing bytes, as when it arrives whole.
        """
        raw, expected = header
        stream = raw + trailer
        whole = ProxyHeaderParser().feed(stream)
        self.assertEqual(whole, (expected, trailer))
        points = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
        self.assertEqual(feed_pieces(cut(stream, points)), (expected, trailer))

    @PROPERTY
    @given(headers)
    def test_byte_by_byte(self, header: tuple[bytes, ProxiedAddresses]) -> None:
        """
        Fed one byte at a time, a header is incomplete until its last byte.
        """
        raw, expected = header
        parser = ProxyHeaderParser()
        for byte in raw[:-1]:
            self.assertIsNone(parser.feed(bytes([byte])))
        self.assertEqual(parser.feed(raw[-1:]), (expected, b""))
