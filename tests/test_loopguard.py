"""
Tests for L{mdgateway.queue.loopguard}: the marker seam the queue manager
and the SMTP edge use, with the cluster's secret loaded from its file and
both ages read from the configuration at each use (so a reload applies).
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from mdgateway.message.digest import content_digest
from mdgateway.message.headers import format_field
from mdgateway.message.marker import MARKER_HEADER, STALE, Stamp
from mdgateway.queue.loopguard import (
    ILoopGuard,
    MarkerLoopGuard,
    SecretNotLoadedError,
)
from mdgateway.testing.threads import SynchronousThreadPool, ThreadsClock

NOW = 1_700_000_000.0
STAMP = Stamp("inbound mail", "core-main/Automatic", "block.cdr", "Allowed", False)


def _message(*markers: str, body: bytes = b"Hello\r\n") -> bytes:
    head = b"".join(format_field(MARKER_HEADER, value) for value in markers)
    return head + b"From: a@example.com\r\nSubject: hi\r\n\r\n" + body


class MarkerLoopGuardTests(SynchronousTestCase):
    """
    L{MarkerLoopGuard} makes and checks markers with the secret in its
    file, bound to the content digest it is given.
    """

    def setUp(self) -> None:
        self.clock = ThreadsClock()
        self.clock.advance(NOW)
        self.ages = {"marker": 7 * 86400.0, "relay_once": 3600.0}
        root = self.mktemp()
        os.makedirs(root)
        self.root = root
        self.guard = MarkerLoopGuard(
            self.clock,
            os.path.join(root, "loop.secret"),
            lambda: self.ages["marker"],
            lambda: self.ages["relay_once"],
        )

    def load(self) -> None:
        """
        Load (create) the secret, the fake pool running the work at once.
        """
        self.successResultOf(
            Deferred.fromCoroutine(
                self.guard.load(self.clock, SynchronousThreadPool())  # type: ignore[arg-type]
            )
        )

    def digest(self, data: bytes) -> bytes:
        digest = content_digest(self.write(data))
        assert digest is not None
        return digest

    def write(self, data: bytes) -> str:
        path = os.path.join(self.root, "message.eml")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_interface(self) -> None:
        """
        The production class provides the queue manager's seam.
        """
        self.assertTrue(verifyClass(ILoopGuard, MarkerLoopGuard))
        self.load()
        self.assertTrue(verifyObject(ILoopGuard, self.guard))

    def test_needs_the_secret(self) -> None:
        """
        A marker asked for before the secret is loaded is a wiring mistake,
        raised as such rather than made with no key.
        """
        with self.assertRaises(SecretNotLoadedError):
            self.guard.make("Q.1", NOW, b"d" * 32, STAMP)

    def test_make_and_check(self) -> None:
        """
        A marker made for a file's content digest is valid on that file;
        checked against another digest it counts for nothing; with no
        digest (a header block too large to bind) nothing is valid.
        """
        self.load()
        digest = self.digest(_message())
        value = self.guard.make("Q.1", NOW, digest, STAMP)
        path = self.write(_message(value))
        count = self.guard.check(path, NOW + 10, digest)
        self.assertEqual((count.valid, count.invalid), (1, ()))
        self.assertEqual(count.valid_checks[0].stamp, STAMP)
        forged = self.guard.check(path, NOW + 10, b"x" * 32)
        self.assertEqual((forged.valid, len(forged.invalid)), (0, 1))
        self.assertEqual(self.guard.check(path, NOW + 10, None).valid, 0)

    def test_ages_read_at_each_use(self) -> None:
        """
        Both ages come from the configuration in force each time they are
        needed: a marker valid under one C{marker_max_age} is stale once a
        reload shortens it, and C{relay_once_max_age} follows likewise.
        """
        self.load()
        digest = self.digest(_message())
        path = self.write(_message(self.guard.make("Q.1", NOW, digest, STAMP)))
        self.assertEqual(self.guard.check(path, NOW + 600, digest).valid, 1)
        self.assertEqual(self.guard.relay_once_max_age(), 3600.0)
        self.ages["marker"] = 300.0
        self.ages["relay_once"] = 0.0
        count = self.guard.check(path, NOW + 600, digest)
        self.assertEqual(count.valid, 0)
        self.assertEqual(count.invalid[0].reason, STALE)
        self.assertEqual(self.guard.relay_once_max_age(), 0.0)

    def test_looped(self) -> None:
        """
        At the end of DATA, a header block with two valid markers for the
        message's content digest is a loop; one is not, nor are two checked
        against another digest or none.
        """
        self.load()
        digest = self.digest(_message())
        first = self.guard.make("Q.1", NOW - 20, digest, STAMP)
        second = self.guard.make("R.1", NOW - 10, digest, STAMP)
        head = _message(second, first).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        self.assertTrue(self.guard.looped(head, digest))
        one = _message(first).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        self.assertFalse(self.guard.looped(one, digest))
        self.assertFalse(self.guard.looped(head, b"x" * 32))
        self.assertFalse(self.guard.looped(head, None))
