"""
Tests for delivery through relay profiles: outcomes per recipient, Office
365 throttling, idle connection reuse and the next hop's queue id.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from mdgateway.policy.profiles import RelayServer, SmtpProfile
from mdgateway.relay.delivery import (
    Outgoing,
    Relay,
    RelayRecipient,
    Status,
    queue_id_from,
)
from mdgateway.smtp.clientmodel import SmtpTimeouts
from mdgateway.testing.relay import TableResolver
from tests.downstream import RecordingHandler, _Controller

pytestmark = pytest.mark.timeout(60)


def relay(pool: ThreadPool) -> Relay:
    return Relay(
        reactor=reactor,
        helo="gw.test",
        resolver=TableResolver({}),
        threadpool=pool,
        maildir_writer=lambda folder, outgoing: "unused",
        password_reader=lambda path: "unused",
        idle_keep=2.0,
    )


def profile(port: int) -> SmtpProfile:
    return SmtpProfile(
        name="downstream",
        servers=(RelayServer("smtp", "127.0.0.1", port),),
        tls="none",
        timeouts=SmtpTimeouts(*[10.0] * 8),
    )


def outgoing(tmp_path: Path, *recipients: str) -> Outgoing:
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: hi\r\n\r\nbody\r\n")
    return Outgoing(
        "a@example.com",
        tuple(RelayRecipient(r) for r in recipients),
        str(path),
        prefix=b"X-Test: 1\r\n",
    )


@pytest.fixture
def pool():
    threads = ThreadPool(minthreads=1, maxthreads=2)
    threads.start()
    yield threads
    threads.stop()


def test_queue_id_from_replies() -> None:
    """
    The next hop's queue id is read from the usual reply shapes.
    """
    assert queue_id_from("2.0.0 Ok: queued as 4Xyz12abc") == "4Xyz12abc"
    assert queue_id_from("OK id=1abc-0002Xy-7Q") == "1abc-0002Xy-7Q"
    assert queue_id_from("Ok") == ""


@pytest_twisted.ensureDeferred
async def test_outcomes_reuse_and_queue_id(
    tmp_path: Path, pool: ThreadPool, smtpd: Callable[..., _Controller]
) -> None:
    """
    Each recipient gets its own outcome (delivered, deferred on 4xx, failed
    on 5xx), the next hop's queue id is kept, the prefix and file arrive as
    one message, and a second message within the idle time reuses the
    connection (one EHLO for two messages).
    """
    handler = RecordingHandler(
        rcpt_replies={
            "later@example.org": "450 4.2.1 Mailbox busy",
            "gone@example.org": "550 5.1.1 No such user",
        },
        data_reply="250 2.0.0 Ok: queued as ABC123XYZ",
    )
    server = smtpd(handler)
    r = relay(pool)
    outcomes = await r.deliver(
        profile(server.port),
        outgoing(tmp_path, "bob@example.org", "later@example.org", "gone@example.org"),
    )
    by = {o.address: o for o in outcomes}
    assert by["bob@example.org"].status is Status.DELIVERED
    assert by["bob@example.org"].queue_id == "ABC123XYZ"
    assert by["later@example.org"].status is Status.DEFERRED
    assert by["gone@example.org"].status is Status.FAILED
    assert by["gone@example.org"].enhanced == "5.1.1"
    assert handler.messages[0].content == b"X-Test: 1\r\nSubject: hi\r\n\r\nbody\r\n"
    await r.deliver(profile(server.port), outgoing(tmp_path, "bob@example.org"))
    assert len(handler.messages) == 2
    assert len(handler.ehlo_names) == 1
    await r.close()


@pytest_twisted.ensureDeferred
async def test_office365_throttling(
    tmp_path: Path, pool: ThreadPool, smtpd: Callable[..., _Controller]
) -> None:
    """
    Office 365's 451 4.7.500 defers the recipients and pauses the profile
    for a while; other answers do not.
    """
    handler = RecordingHandler(
        data_reply="451 4.7.500 Server busy. Please try again later"
    )
    server = smtpd(handler)
    r = relay(pool)
    p = profile(server.port)
    assert r.throttled_until(p) == 0.0
    (outcome,) = await r.deliver(p, outgoing(tmp_path, "bob@example.org"))
    assert outcome.status is Status.DEFERRED
    assert r.throttled_until(p) > reactor.seconds() + 30
    await r.close()


@pytest_twisted.ensureDeferred
async def test_unreachable_profile(tmp_path: Path, pool: ThreadPool) -> None:
    """
    With no server reachable every recipient is deferred with 4.4.1 and the
    profile reports itself unhealthy.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]
    r = relay(pool)
    p = profile(down)
    (outcome,) = await r.deliver(p, outgoing(tmp_path, "bob@example.org"))
    assert (outcome.status, outcome.enhanced) == (Status.DEFERRED, "4.4.1")
    assert not r.healthy(p)
