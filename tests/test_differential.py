"""
The differential harness: the spec of scan completeness.

For thousands of generated adversarial messages (L{tests.mimegen}), every
payload Python's C{email} package extracts from a leaf
(C{get_payload(decode=True)}) under C{policy.compat32} and under
C{policy.default} must have been submitted to the scanner byte for byte, by
the real L{CopyProcessor} with a recording fake Core; so must every
non-blank preamble and epilogue Python finds (as text within a submitted
file). A second, independent parser (fast-mail-parser, Rust's C{mailparse})
checks the messages our parser calls unambiguous: there, each leaf payload
it extracts must have been submitted too.
"""

from __future__ import annotations

import email
import email.policy
import tempfile
from pathlib import Path

import fast_mail_parser
from hypothesis import HealthCheck, given, settings
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.message.decompose import WHOLE_MESSAGE_NAME
from mdgateway.policy.profiles import CoreProfile, CoreServer, RelayServer, SmtpProfile
from mdgateway.policy.rules import Rule
from mdgateway.queue.copies import CopyJob, CopyOutcome
from mdgateway.queue.processing import CopyProcessor
from mdgateway.testing.scan import CORE_URL, FakeScanner
from mdgateway.testing.threads import SynchronousThreadPool, ThreadsClock
from tests.mimegen import messages

#: Examples per property (thousands in all, within CI's time budget).
EXAMPLES = 1500

RULE = Rule(
    "inbound",
    CoreProfile("core", (CoreServer(CORE_URL),)),
    SmtpProfile("relay", (RelayServer("smtp", "127.0.0.1", 2525),)),
)


def python_payloads(data: bytes) -> dict[bytes, str]:
    """
    Every non-empty leaf payload of Python's two readings, with the name of
    the first policy that extracts it.
    """
    found: dict[bytes, str] = {}
    for name, policy in (
        ("compat32", email.policy.compat32),
        ("default", email.policy.default),
    ):
        for part in email.message_from_bytes(data, policy=policy).walk():
            if not part.is_multipart():
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes) and payload:
                    found.setdefault(payload, name)
    return found


def python_texts(data: bytes) -> list[bytes]:
    """
    The non-blank preambles and epilogues of Python's two readings.
    """
    found = []
    for policy in (email.policy.compat32, email.policy.default):
        for part in email.message_from_bytes(data, policy=policy).walk():
            for text in (part.preamble, part.epilogue):
                if text and text.strip():
                    found.append(text.encode("ascii", "surrogateescape"))
    return found


def mailparse_payloads(data: bytes) -> list[bytes] | None:
    """
    The non-empty leaf payloads fast-mail-parser extracts, or L{None} when
    it refuses the message.
    """
    try:
        tree = fast_mail_parser.parse_email_tree(data)
    except Exception:
        return None
    return [
        node.content
        for node in fast_mail_parser.walk(tree)
        if node.content and not node.children
    ]


def process(data: bytes) -> tuple[CopyOutcome, list[bytes], list[str]]:
    """
    Process one copy of C{data} with the real processor and a recording
    fake Core; return the outcome and what was submitted (contents and
    names).
    """
    scanner = FakeScanner(sanitize_suffixes=())
    processor = CopyProcessor(
        reactor=ThreadsClock(),
        threadpool=SynchronousThreadPool(),  # type: ignore[arg-type]
        scanner_for=lambda name: scanner,
        hostname="gw.test",
    )
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        message = root / "spooled.eml"
        message.write_bytes(data)
        (root / "work").mkdir()
        job = CopyJob(str(message), str(root / "work"), RULE, "id.1", "a@x", ("b@y",))
        d = Deferred.fromCoroutine(processor.process(job))
        results: list[CopyOutcome] = []
        d.addCallback(results.append)
        assert results, "processing did not complete synchronously"
    return (
        results[0],
        [call.content for call in scanner.scans],
        [call.filename for call in scanner.scans],
    )


class DifferentialTests(SynchronousTestCase):
    """
    Nothing a reader extracts escapes the scanner.
    """

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @given(messages())
    def test_every_python_payload_submitted(self, data: bytes) -> None:
        """
        Every payload Python's email extracts under either policy was
        submitted byte for byte, and every non-blank preamble and epilogue
        it sees lies within a submitted file; the copy was scanned (not
        failed for want of a reading).
        """
        outcome, submitted, names = process(data)
        self.assertNotEqual(outcome.result, "Failed/not_scanned", outcome.detail)
        contents = set(submitted)
        missing = [
            (payload[:80], policy)
            for payload, policy in python_payloads(data).items()
            if payload not in contents
        ]
        self.assertEqual(missing, [], (data[:2000], names))
        for text in python_texts(data):
            self.assertTrue(
                any(text in content for content in submitted), (text[:80], names)
            )

    @settings(
        max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck)
    )
    @given(messages())
    def test_second_parser_on_trusted_structures(self, data: bytes) -> None:
        """
        Where our parser trusts a structure (no C{message.eml} and no other
        reading was offered), every leaf payload an independent parser
        (Rust's C{mailparse}, through fast-mail-parser) extracts was
        submitted.
        """
        outcome, submitted, names = process(data)
        if WHOLE_MESSAGE_NAME in names or any(
            name.startswith("reading-") for name in names
        ):
            # Ambiguous somewhere (the message, or an encoded message in
            # it): there the spec is Python's readings, checked above.
            return
        theirs = mailparse_payloads(data)
        if theirs is None:
            return
        contents = set(submitted)
        missing = [payload[:80] for payload in theirs if payload not in contents]
        self.assertEqual(missing, [], (data[:2000], names))


def nested(depth: int, payload: bytes) -> bytes:
    """
    A message of C{depth} multiparts, one inside the other, around one
    text leaf.
    """
    head = tail = b""
    for level in range(depth):
        head += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (
            level,
            level,
        )
        tail = b"\r\n--b%d--\r\n" % level + tail
    return (
        b"Subject: deep\r\n"
        + head
        + b"Content-Type: text/plain\r\n\r\n"
        + payload
        + tail
    )


class NestingTests(SynchronousTestCase):
    """
    Parts beyond the nesting limit are still scanned; nesting no reader
    can follow is not called scanned.
    """

    def test_beyond_the_limit(self) -> None:
        """
        A leaf nested 40 deep (the parser stops at 20) is found by the
        other readings and submitted.
        """
        outcome, submitted, names = process(nested(40, b"deep inside"))
        self.assertIn(WHOLE_MESSAGE_NAME, names)
        self.assertIn(b"deep inside", submitted)
        self.assertEqual(outcome.result, "Allowed")

    def test_deeper_than_any_reading(self) -> None:
        """
        Nesting so deep that Python's reader gives up (1,000 levels) leaves
        the message not scanned: the rule's not_scanned handling decides
        (by default it fails), and nothing is delivered as Allowed.
        """
        outcome, submitted, names = process(nested(1000, b"deep inside"))
        self.assertEqual(outcome.result, "Failed/not_scanned")
        self.assertIn("nests deeper", outcome.detail)
        self.assertEqual(outcome.deliveries, ())
