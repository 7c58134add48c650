"""
End to end, parser differentials: the real gateway (twistd plugin as a
subprocess) with its Core emulator, a rule that strips blocked content, and
a real downstream server. Messages that readers split differently hide the
EICAR test file where only one reading finds it; each is blocked whole (a
part of another reading cannot be stripped), and a clean ambiguous message
is delivered unchanged.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import free_port, running_gateway
from tests.test_e2e_pipeline import EICAR, headers_of, pipeline_toml, send, wait_for

pytestmark = pytest.mark.timeout(120)

HEAD = b"From: alice@example.com\r\nTo: bob@example.org\r\nMIME-Version: 1.0\r\n"
ENCODED = base64.encodebytes(EICAR).replace(b"\n", b"\r\n")


def hidden_by_duplicate_type() -> bytes:
    """
    A part with two Content-Type fields: readers take the first or the
    last; the base64 EICAR is found only by decoding it.
    """
    return (
        HEAD + b"Subject: duplicate type\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nHello.\r\n"
        b"--b1\r\nContent-Type: text/plain\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + ENCODED + b"--b1--\r\n"
    )


def hidden_by_boundary_escape() -> bytes:
    """
    A boundary with a backslash: one reading unescapes it (and finds the
    parts), another keeps it (and finds none).
    """
    return (
        HEAD + b"Subject: escaped boundary\r\n"
        b'Content-Type: multipart/mixed; boundary="a\\b"\r\n\r\n'
        b"--ab\r\nContent-Type: text/plain\r\n\r\nHello.\r\n"
        b"--ab\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + ENCODED + b"--ab--\r\n"
    )


def hidden_in_preamble() -> bytes:
    """
    The test file in a multipart's preamble, outside every part.
    """
    return (
        HEAD + b"Subject: preamble\r\n"
        b'Content-Type: multipart/mixed; boundary="b2"\r\n\r\n'
        + EICAR
        + b"\r\n--b2\r\nContent-Type: text/plain\r\n\r\nHello.\r\n--b2--\r\n"
    )


def clean_but_ambiguous() -> bytes:
    """
    A harmless message with an unquoted boundary that is not a plain token
    (readers differ on where it ends).
    """
    return (
        HEAD + b"Subject: clean\r\n"
        b"Content-Type: multipart/mixed; boundary=----=_Part_1\r\n\r\n"
        b"------=_Part_1\r\nContent-Type: text/plain\r\n\r\nHello.\r\n"
        b"------=_Part_1--\r\n"
    )


@pytest.mark.parametrize(
    "make", [hidden_by_duplicate_type, hidden_by_boundary_escape, hidden_in_preamble]
)
def test_hidden_payload_blocked(
    tmp_path: Path, smtpd: Callable[..., _Controller], make: Callable[[], bytes]
) -> None:
    """
    Under a rule that strips, a message hiding the test file where only
    one reading (or no part at all) holds it is not delivered: its
    history says Blocked/Infected; a clean ambiguous message sent after it
    arrives unchanged apart from our headers, Allowed.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port = free_port()
    toml, _ = pipeline_toml(
        port, tmp_path, downstream.port, rule='blocked_action = "strip"'
    )
    clean = clean_but_ambiguous()
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        send(port, make())
        send(port, clean)
        (got,) = wait_for(lambda: handler.messages)
        wait_for(lambda: not list((tmp_path / "spool" / "queue").glob("*.eml")))
        events = gw.log_events()
    assert headers_of(got)["Subject"] == "clean"
    assert got.content.endswith(clean)
    assert headers_of(got)["X-Metadefender-Core-Result"] == "Allowed"
    assert any(
        e.get("verdict") == "Blocked/Infected" and e.get("action") == "block"
        for e in events
    )
