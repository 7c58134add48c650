"""
Tests for L{mdgateway.queue.processing}: one message copy is decomposed, scanned
part by part, acted on, rebuilt and stamped, end to end on real files with a
real thread pool and the real reactor, against the fake Core of
L{mdgateway.testing.scan}.
"""

from __future__ import annotations

import base64
import email
import email.policy
import inspect
import io
import mimetypes
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from email.header import decode_header, make_header
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mdgateway.emulator.detect import EICAR
from mdgateway.message.decompose import WHOLE_MESSAGE_NAME, ScannablePart, decompose
from mdgateway.message.digest import ContentHasher
from mdgateway.message.marker import Stamp
from mdgateway.message.structure import Structure, parse_structure
from mdgateway.policy.profiles import CoreProfile, CoreServer, RelayServer, SmtpProfile
from mdgateway.policy.rules import ERROR_ACTIONS, ErrorHandling, Rule
from mdgateway.queue.copies import CopyJob, CopyOutcome, Decision, Delivery
from mdgateway.queue.processing import CopyProcessor
from mdgateway.scan.errors import Condition, CoreError
from mdgateway.scan.interfaces import IScanner
from mdgateway.scan.runtime import CoreRuntime
from mdgateway.scan.verdict import Outcome, Verdict
from mdgateway.testing.scan import (
    CORE_RULE,
    CORE_URL,
    FakeScanner,
    converted_content,
)

CORPUS = Path(__file__).parent / "corpus"
BROKEN = sorted(p.name for p in CORPUS.glob("broken-*.eml"))
GOOD = sorted(p.name for p in CORPUS.glob("*.eml") if p.name not in BROKEN)
SIGNED = ["smime-enveloped.eml", "smime-signed.eml"]

SECURITY_ID = "4Xq2abc.0.1762246800.5f3a9c"
SENDER = "carol@example.org"
RECIPIENTS = ("bob@example.com", "dave@example.com")
HOSTNAME = "gateway.example.com"
APIKEY = "s3cret-apikey-0123"
CORE = CoreProfile(
    "core-main",
    (
        CoreServer(CORE_URL, apikey=APIKEY),
        CoreServer("http://core-backup.test:8008", apikey=APIKEY),
    ),
    rule=CORE_RULE,
)
RELAY = SmtpProfile("relay-main", (RelayServer("smtp", "127.0.0.1", 2525),))
CUSTOM_HEADERS = (("X-Scanned-By", "mdgateway"), ("X-Site", "Zürich office"))
DOCX_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
#: How the rule's error handling names each condition.
CONDITION_KEYS = {
    Condition.UNREACHABLE: "core_unreachable",
    Condition.BUSY: "core_busy",
    Condition.SCAN_TIMEOUT: "scan_timeout",
    Condition.PROCESSING_FAILED: "processing_failed",
    Condition.NOT_SCANNED: "not_scanned",
}
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n"
DOCX = b"PK\x03\x04" + bytes(range(256)) * 2


def make_rule(**changes: object) -> Rule:
    """
    The rule of these tests: a profile whose servers have API keys, and
    custom headers, one of them not ASCII.
    """
    values: dict[str, object] = {
        "name": "inbound mail",
        "core_profile": CORE,
        "relay_profile": RELAY,
        "custom_headers": CUSTOM_HEADERS,
    }
    values.update(changes)
    return Rule(**values)  # type: ignore[arg-type]


def errors_rule(**actions: str) -> Rule:
    """
    A rule with the given error handling actions (others default).
    """
    return make_rule(on_error=ErrorHandling(**actions))


# -- building messages --------------------------------------------------------


def entity(headers: Sequence[str], body: bytes) -> bytes:
    """
    A MIME entity with CRLF lines.
    """
    return "".join(f"{h}\r\n" for h in headers).encode() + b"\r\n" + body


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n").rstrip(b"\r\n")


def attachment(filename: str, content_type: str, data: bytes) -> bytes:
    return entity(
        [
            f'Content-Type: {content_type}; name="{filename}"',
            f'Content-Disposition: attachment; filename="{filename}"',
            "Content-Transfer-Encoding: base64",
        ],
        b64(data),
    )


def text_part(text: str) -> bytes:
    return entity(["Content-Type: text/plain; charset=us-ascii"], text.encode())


def multipart(boundary: str, parts: Sequence[bytes], headers: Sequence[str]) -> bytes:
    delimiter = b"--" + boundary.encode()
    body = b"".join(delimiter + b"\r\n" + p + b"\r\n" for p in parts)
    return entity(
        [
            *headers,
            "MIME-Version: 1.0",
            f'Content-Type: multipart/mixed; boundary="{boundary}"',
        ],
        body + delimiter + b"--\r\n",
    )


RECEIVED = [
    "Received: from client.example.org (client.example.org [192.0.2.10])",
    "\tby gateway.example.com with ESMTPS id 4Xq2abc",
    "\tfor <bob@example.com>; Tue, 04 Nov 2025 09:12:44 +0000",
]


def eicar_message(*, docx: bool = False) -> bytes:
    """
    A message whose part C{1.2} (C{invoice.com}) is the EICAR test file,
    between a text body (C{1.1}) and a PDF (C{1.3}); with C{docx}, a
    sanitizable C{notes.docx} (C{1.4}) follows.
    """
    parts = [
        text_part("Please find the invoice attached."),
        attachment("invoice.com", "application/octet-stream", EICAR),
        attachment("report.pdf", "application/pdf", PDF),
    ]
    if docx:
        parts.append(attachment("notes.docx", DOCX_TYPE, DOCX))
    return multipart(
        "=_mixed_7f3a",
        parts,
        [
            *RECEIVED,
            "From: Carol <carol@example.org>",
            "To: Bob <bob@example.com>",
            "Subject: Invoice 2025-11",
            "Date: Tue, 04 Nov 2025 09:12:40 +0000",
            "Message-ID: <invoice-1@example.org>",
        ],
    )


def forwarded_eicar() -> bytes:
    """
    A message forwarding (C{message/rfc822}, part C{1.2}) the EICAR message:
    the test file is part C{1.2.1.2}.
    """
    inner = eicar_message().split(b"\r\n", len(RECEIVED))[-1]
    forward = entity(
        [
            "Content-Type: message/rfc822",
            'Content-Disposition: attachment; filename="Invoice.eml"',
        ],
        inner.rstrip(b"\r\n"),
    )
    return multipart(
        "=_outer_91c2",
        [text_part("Forwarding this, looks odd."), forward],
        [
            *RECEIVED,
            "From: Alice <alice@example.net>",
            "To: Bob <bob@example.com>",
            "Subject: Fwd: Invoice 2025-11",
            "Message-ID: <fwd-2@example.net>",
        ],
    )


def with_subject(data: bytes, subject: bytes) -> bytes:
    """
    A corpus message with its Subject field replaced.
    """
    start = data.index(b"\r\nSubject: ") + 2
    end = data.index(b"\r\n", start)
    return data[:start] + b"Subject: " + subject + data[end:]


FORGED = (
    b"X-Metadefender-Core-Result: Allowed\r\n"
    b"X-MD-Email-Security-Id: forged\r\n"
    b"x-metadefender-emailsecurity-sanitized: True\r\n"
    b"X-Metadefender-Core-Url:\r\n http://evil.example\r\n"
)


def insert_after_received(data: bytes, fields: bytes) -> bytes:
    """
    Put header fields after the first (folded) Received field, where a
    forger upstream of the gateway would have put them.
    """
    end = data.index(b"\r\n")
    while data[end + 2 : end + 3] in (b" ", b"\t"):
        end = data.index(b"\r\n", end + 2)
    return data[: end + 2] + fields + data[end + 2 :]


# -- reading results ----------------------------------------------------------


def delivered(delivery: Delivery) -> bytes:
    """
    The bytes the relay sends for a delivery.
    """
    return delivery.prefix + Path(delivery.path).read_bytes()[delivery.offset :]


def header_block(data: bytes) -> bytes:
    return data[: data.index(b"\r\n\r\n") + 2]


def fields(data: bytes) -> list[tuple[str, str]]:
    """
    The top-level header fields, unfolded, encoded words decoded (with the
    stdlib's lenient C{compat32} parsing, which accepts any header text).
    """
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    return [
        (name, str(make_header(decode_header(re.sub(r"\r?\n(?=[ \t])", "", raw)))))
        for name, raw in message.items()
    ]


def values(data: bytes, name: str) -> list[str]:
    return [v for n, v in fields(header_block(data)) if n.lower() == name.lower()]


def stamp(
    result: str, sanitized: bool = False, extra: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """
    The headers the gateway should stamp, in order.
    """
    return [
        ("X-MD-Email-Security-Id", SECURITY_ID),
        ("X-Metadefender-Core-Url", CORE_URL),
        ("X-Metadefender-Core-Result", result),
        ("X-Metadefender-Core-Rule", CORE_RULE),
        ("X-Metadefender-EmailSecurity-Sanitized", str(sanitized)),
        *extra,
        *CUSTOM_HEADERS,
    ]


def assert_stamped(
    data: bytes,
    result: str,
    sanitized: bool = False,
    extra: Sequence[tuple[str, str]] = (),
) -> None:
    """
    The message starts with exactly our headers, ASCII and without the API
    key, and carries each of ours exactly once.
    """
    expected = stamp(result, sanitized, extra)
    got = fields(header_block(data))
    assert got[: len(expected)] == expected
    assert APIKEY.encode() not in data
    block = header_block(data)
    assert block.isascii()
    assert b"\r\nX-Site: =?utf-8?" in block
    for name, _ in expected[:5]:
        assert len(values(data, name)) == 1, name


def assert_unchanged(run: Run, delivery: Delivery, result: str) -> None:
    """
    The delivery is our headers in front of the untouched spooled file.
    """
    assert delivery.path == str(run.message)
    assert delivery.offset == 0
    assert delivery.kind == "message"
    assert fields(delivery.prefix + b"\r\n") == stamp(result)
    assert delivered(delivery) == delivery.prefix + run.original
    assert_stamped(delivered(delivery), result)


def structure_of(data: bytes) -> Structure:
    structure = parse_structure(io.BytesIO(data))
    assert not structure.unreliable, structure.detail
    return structure


def entity_bytes(data: bytes) -> dict[str, bytes]:
    """
    Each entity's bytes C{[headers_start, end)} by part id.
    """
    return {e.part_id: data[e.headers_start : e.end] for e in structure_of(data).walk()}


def assert_only_changed(original: bytes, output: bytes, changed: set[str]) -> None:
    """
    The output has the original's part tree, and every entity that is
    neither changed nor contains a changed one is byte-identical; the
    top-level header block ends with the original's.
    """
    before, after = entity_bytes(original), entity_bytes(output)
    assert after.keys() == before.keys()
    for part_id, data in before.items():
        if part_id in changed or any(c.startswith(part_id + ".") for c in changed):
            continue
        assert after[part_id] == data, part_id
    assert header_block(output).endswith(header_block(original))
    for part_id in changed:
        assert after[part_id] != before[part_id], part_id


def decoded_parts(data: bytes, directory: Path) -> dict[str, ScannablePart]:
    """
    The decoded leaves of a message, by part id (written in C{directory}).
    """
    directory.mkdir(parents=True, exist_ok=True)
    message = directory / "message.eml"
    message.write_bytes(data)
    decomposition = decompose(message, directory / "parts")
    assert not decomposition.unreliable, decomposition.detail
    return {part.part_id: part for part in decomposition.parts}


# -- the harness ----------------------------------------------------------------


@attrs.frozen
class Run:
    """
    One processed copy: the outcome, the spooled file and its bytes.
    """

    outcome: CopyOutcome
    message: Path
    original: bytes
    workdir: Path

    @property
    def delivery(self) -> Delivery:
        [delivery] = self.outcome.deliveries
        return delivery

    def data(self) -> bytes:
        return delivered(self.delivery)


class Harness:
    """
    Spools messages into a temporary folder and processes them with a
    L{CopyProcessor} on the real reactor and a real thread pool.
    """

    def __init__(self, pool: ThreadPool, root: Path) -> None:
        self.pool = pool
        self.root = root
        self.profiles: list[str] = []
        self._count = 0

    def fresh(self) -> Path:
        self._count += 1
        path = self.root / f"copy-{self._count}"
        path.mkdir()
        return path

    async def process(
        self,
        scanner: IScanner,
        rule: Rule,
        message: str | bytes,
        marker: Callable[[bytes, Stamp], str] | None = None,
    ) -> Run:
        """
        Process C{message} (a corpus name or bytes) and check that the
        spooled file was left alone.
        """
        from twisted.internet import reactor

        data = (CORPUS / message).read_bytes() if isinstance(message, str) else message
        base = self.fresh()
        path = base / "spooled.eml"
        path.write_bytes(data)
        workdir = base / "work"
        workdir.mkdir()

        def scanner_for(name: str) -> IScanner:
            self.profiles.append(name)
            return scanner

        processor = CopyProcessor(
            reactor=reactor,
            threadpool=self.pool,
            scanner_for=scanner_for,
            hostname=HOSTNAME,
        )
        job = CopyJob(
            str(path), str(workdir), rule, SECURITY_ID, SENDER, RECIPIENTS, marker
        )
        outcome = await processor.process(job)
        assert path.read_bytes() == data
        assert set(self.profiles) <= {rule.core_profile.name}
        return Run(outcome, path, data, workdir)


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    """
    A started thread pool, stopped at teardown.
    """
    pool = ThreadPool(minthreads=1, maxthreads=4, name="test-processing")
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture
def harness(threadpool: ThreadPool, tmp_path: Path) -> Harness:
    return Harness(threadpool, tmp_path)


# -- the fake is faithful -------------------------------------------------------


class FakeScannerTests(SynchronousTestCase):
    """
    L{FakeScanner} stands in for L{CoreRuntime} as L{CopyProcessor} uses it.
    """

    def setUp(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.directory = Path(directory.name)

    def file(self, name: str, content: bytes) -> str:
        path = self.directory / name
        path.write_bytes(content)
        return str(path)

    def scan(self, scanner: FakeScanner, name: str, content: bytes) -> Verdict:
        result = self.successResultOf(
            Deferred.fromCoroutine(scanner.scan(self.file(name, content), name))
        )
        assert isinstance(result, Verdict)
        return result

    def test_same_calls_as_runtime(self) -> None:
        """
        C{scan} and C{download_sanitized} are coroutine functions with the
        runtime's parameters and annotations, the two calls of L{IScanner}.
        """
        for name in ("scan", "download_sanitized"):
            ours = getattr(FakeScanner, name)
            theirs = getattr(CoreRuntime, name)
            self.assertTrue(inspect.iscoroutinefunction(ours))
            self.assertTrue(inspect.iscoroutinefunction(theirs))
            self.assertIn(name, IScanner)
            self.assertEqual(
                [
                    (p.name, str(p.annotation))
                    for p in inspect.signature(ours).parameters.values()
                ],
                [
                    (p.name, str(p.annotation))
                    for p in inspect.signature(theirs).parameters.values()
                ],
            )
            self.assertEqual(
                str(inspect.signature(ours).return_annotation),
                str(inspect.signature(theirs).return_annotation),
            )
        self.assertTrue(verifyObject(IScanner, FakeScanner()))

    def test_clean(self) -> None:
        """
        An ordinary file is Allowed, with no converted file, from the
        fake's server, and the call is recorded with the file's content.
        """
        scanner = FakeScanner()
        verdict = self.scan(scanner, "report.pdf", PDF)
        self.assertEqual(verdict.outcome, Outcome.ALLOWED)
        self.assertEqual(verdict.result, "Allowed")
        self.assertEqual(verdict.core_url, CORE_URL)
        self.assertEqual(verdict.display_name, "report.pdf")
        self.assertEqual(verdict.file_size, len(PDF))
        self.assertFalse(verdict.has_converted_file)
        self.assertEqual(
            [(c.filename, c.content) for c in scanner.scans], [("report.pdf", PDF)]
        )

    def test_eicar(self) -> None:
        """
        A file holding the EICAR string anywhere is Blocked/Infected with
        the engines' threat names; so is a name in C{blocked_names}.
        """
        scanner = FakeScanner(blocked_names={"message.eml"})
        verdict = self.scan(scanner, "invoice.com", b"xx" + EICAR + b"yy")
        self.assertTrue(verdict.blocked)
        self.assertEqual(verdict.blocked_reason, "Infected")
        self.assertEqual(verdict.scan_all_result_i, 1)
        self.assertIn("Eicar-Test-Signature", verdict.threats)
        self.assertTrue(self.scan(scanner, "message.eml", b"hello").blocked)
        self.assertFalse(self.scan(scanner, "other.eml", b"hello").blocked)

    def test_sanitized(self) -> None:
        """
        A C{.docx} is Allowed and sanitized; downloading writes the
        converted content to the destination, records it and returns the
        converted name.
        """
        scanner = FakeScanner()
        verdict = self.scan(scanner, "Notes.DOCX", DOCX)
        self.assertTrue(verdict.allowed)
        self.assertTrue(verdict.sanitized)
        self.assertTrue(verdict.has_converted_file)
        dest = str(self.directory / "converted")
        name = self.successResultOf(
            Deferred.fromCoroutine(scanner.download_sanitized(verdict, dest))
        )
        self.assertEqual(name, verdict.converted_name)
        self.assertTrue(name.startswith("Notes_sanitized_by_OPSWAT_MetaDefender_"))
        self.assertTrue(name.endswith(".DOCX"))
        self.assertEqual(Path(dest).read_bytes(), converted_content(DOCX))
        self.assertEqual(scanner.written, {dest: converted_content(DOCX)})
        self.assertNotEqual(converted_content(DOCX), DOCX)

    def test_errors(self) -> None:
        """
        A name in C{errors} fails with its condition; conditions that are
        Core results carry the failure verdict.
        """
        scanner = FakeScanner(
            errors={"a.bin": Condition.BUSY, "b.bin": Condition.NOT_SCANNED}
        )
        busy = self.failureResultOf(
            Deferred.fromCoroutine(scanner.scan(self.file("a.bin", b"a"), "a.bin")),
            CoreError,
        ).value
        self.assertEqual(busy.condition, Condition.BUSY)
        self.assertIsNone(busy.verdict)
        skipped = self.failureResultOf(
            Deferred.fromCoroutine(scanner.scan(self.file("b.bin", b"b"), "b.bin")),
            CoreError,
        ).value
        self.assertEqual(skipped.condition, Condition.NOT_SCANNED)
        self.assertEqual(skipped.verdict.scan_all_result_i, 10)
        self.assertEqual(scanner.scanned_names, ["a.bin", "b.bin"])

    def test_download_failures(self) -> None:
        """
        Downloading fails like the runtime: C{ValueError} for a verdict of
        another server, I{processing failed} when there is no converted
        file, and C{download_error} when set.
        """
        scanner = FakeScanner()
        clean = self.scan(scanner, "a.txt", b"text")
        dest = str(self.directory / "out")
        error = self.failureResultOf(
            Deferred.fromCoroutine(scanner.download_sanitized(clean, dest)), CoreError
        ).value
        self.assertEqual(error.condition, Condition.PROCESSING_FAILED)
        foreign = attrs.evolve(clean, core_url="http://elsewhere:8008")
        self.failureResultOf(
            Deferred.fromCoroutine(scanner.download_sanitized(foreign, dest)),
            ValueError,
        )
        failing = FakeScanner(download_error=Condition.UNREACHABLE)
        sanitized = self.scan(failing, "a.docx", DOCX)
        error = self.failureResultOf(
            Deferred.fromCoroutine(failing.download_sanitized(sanitized, dest)),
            CoreError,
        ).value
        self.assertEqual(error.condition, Condition.UNREACHABLE)
        self.assertFalse(Path(dest).exists())


# -- 1. allowed messages ----------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", GOOD)
@pytest_twisted.ensureDeferred
async def test_allowed_corpus(harness: Harness, name: str) -> None:
    """
    Every part of a well-formed corpus message is scanned under its name
    with the rule's profile; when all are Allowed the copy is delivered as
    our headers in front of the spooled file itself, byte for byte, with
    nothing quarantined.
    """
    scanner = FakeScanner(sanitize_suffixes=())
    run = await harness.process(scanner, make_rule(), name)
    outcome = run.outcome
    assert outcome.decision is Decision.DELIVER
    assert outcome.result == "Allowed"
    assert not outcome.sanitized
    assert outcome.quarantine is None
    assert outcome.condition is None
    assert_unchanged(run, run.delivery, "Allowed")
    expected = decoded_parts(run.original, harness.fresh() / "expected")
    assert scanner.scanned_names == sorted(p.filename for p in expected.values())
    assert sorted(c.content for c in scanner.scans) == sorted(
        p.path.read_bytes() for p in expected.values()
    )
    assert [(r.part_id, r.result, r.action) for r in outcome.parts] == [
        (part_id, "Allowed", "allowed") for part_id in expected
    ]
    assert {r.core_url for r in outcome.parts} == {CORE_URL}
    assert harness.profiles == ["core-main"]
    assert scanner.downloads == []


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_stamp_rfc2047_and_no_apikey(harness: Harness) -> None:
    """
    The stamped prefix is ASCII: a custom header with non-ASCII text is
    written as RFC 2047 encoded words that decode to the configured value,
    and the Core URL header is the first server's URL without its API key.
    """
    run = await harness.process(FakeScanner(), make_rule(), "plain.eml")
    prefix = run.delivery.prefix
    assert prefix.isascii()
    assert APIKEY.encode() not in prefix
    assert b"apikey" not in prefix
    assert b"X-Metadefender-Core-Url: http://core.test:8008\r\n" in prefix
    assert b"X-Site: =?utf-8?" in prefix
    assert ("X-Site", "Zürich office") in fields(prefix + b"\r\n")
    assert fields(prefix + b"\r\n")[-2:] == list(CUSTOM_HEADERS)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """
    Plausible messages: random header text, random 8-bit body lines and
    random base64 attachments, sometimes multipart.
    """
    text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=70)
    line = st.binary(max_size=90).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
    )
    headers = [
        *RECEIVED,
        f"From: {draw(text)} <alice@example.net>",
        "To: bob@example.com",
        f"Subject: {draw(text)}",
        f"Message-ID: <{draw(st.integers(0, 10**9))}@example.net>",
    ]
    body = b"\r\n".join(draw(st.lists(line, max_size=8)))
    files = draw(
        st.lists(
            st.tuples(
                st.from_regex(r"[a-z]{1,8}\.(pdf|bin|txt|png)", fullmatch=True),
                st.binary(max_size=400),
            ),
            max_size=3,
        )
    )
    if not files:
        return entity(headers, body + draw(st.sampled_from([b"", b"\r\n"])))
    parts = [
        entity(["Content-Type: text/plain; charset=utf-8"], body),
        *(attachment(n, "application/octet-stream", d) for n, d in files),
    ]
    return multipart(
        "=_b_" + draw(st.from_regex(r"[a-z0-9]{4}", fullmatch=True)), parts, headers
    )


@pytest.mark.timeout(60)
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=messages())
@pytest_twisted.ensureDeferred
async def test_unchanged_keeps_every_byte(harness: Harness, data: bytes) -> None:
    """
    Whatever an Allowed message holds, the delivery is our headers in front
    of the spooled file, untouched, at offset 0.
    """
    scanner = FakeScanner(sanitize_suffixes=())
    run = await harness.process(scanner, make_rule(), data)
    assert run.outcome.decision is Decision.DELIVER
    assert run.outcome.result == "Allowed"
    assert_unchanged(run, run.delivery, "Allowed")
    # Every part with content is scanned; only empty ones are not.
    assert len(scanner.scans) == sum(1 for p in run.outcome.parts if p.size)


# -- 2. blocked content -----------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("quarantine", [True, False])
@pytest_twisted.ensureDeferred
async def test_block(harness: Harness, quarantine: bool) -> None:
    """
    With C{blocked_action = "block"} an infected attachment blocks the
    whole copy: nothing is delivered, the result names Core's reason, and
    the original goes to the quarantine as "blocked" when the rule keeps
    blocked originals.
    """
    scanner = FakeScanner()
    rule = make_rule(blocked_action="block", quarantine_blocked=quarantine)
    run = await harness.process(scanner, rule, eicar_message())
    outcome = run.outcome
    assert outcome.decision is Decision.BLOCK
    assert outcome.result == "Blocked/Infected"
    assert outcome.deliveries == ()
    assert outcome.quarantine == ("blocked" if quarantine else None)
    assert outcome.actions == ("blocked",)
    assert not outcome.sanitized
    reports = {r.part_id: r for r in outcome.parts}
    assert reports["1.2"].result == "Blocked"
    assert reports["1.2"].blocked_reason == "Infected"
    assert {r.action for r in outcome.parts} == {"blocked"}
    assert scanner.scanned_names == ["body.txt", "invoice.com", "report.pdf"]


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_block_notifies_recipients(harness: Harness) -> None:
    """
    With C{notify_recipient} a blocked copy delivers only a notification:
    to the recipients, from the gateway's postmaster, automatic, naming
    the reason and the security id, and carrying nothing of the message.
    """
    rule = make_rule(notify_recipient=True)
    run = await harness.process(FakeScanner(), rule, eicar_message())
    assert run.outcome.decision is Decision.BLOCK
    delivery = run.delivery
    assert delivery.kind == "notification"
    assert Path(delivery.path).parent == run.workdir
    data = delivered(delivery)
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["To"] == ", ".join(RECIPIENTS)
    assert message["From"] == f"Mail Gateway <postmaster@{HOSTNAME}>"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["X-MD-Email-Security-Id"] == SECURITY_ID
    body = message.get_content()
    assert "Infected" in body
    assert SECURITY_ID in body
    assert EICAR not in data
    assert b64(EICAR)[:40] not in data
    assert b"invoice.com" not in data
    assert run.outcome.quarantine == "blocked"


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_block_external_quarantine(harness: Harness) -> None:
    """
    With C{external_quarantine} the blocked original is delivered as a copy
    marked C{X-Metadefender-To-Quarantine: True} (the original file with our
    headers in front) instead of being kept, then the notification.
    """
    rule = make_rule(external_quarantine=True, notify_recipient=True)
    run = await harness.process(FakeScanner(), rule, eicar_message())
    outcome = run.outcome
    assert outcome.decision is Decision.BLOCK
    assert outcome.quarantine is None
    assert [d.kind for d in outcome.deliveries] == ["original copy", "notification"]
    copy = outcome.deliveries[0]
    assert copy.path == str(run.message)
    assert delivered(copy) == copy.prefix + run.original
    assert_stamped(
        delivered(copy),
        "Blocked/Infected",
        extra=[
            ("X-Metadefender-EmailSecurity-OriginalCopy", "True"),
            ("X-Metadefender-To-Quarantine", "True"),
        ],
    )


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_strip(harness: Harness) -> None:
    """
    With C{blocked_action = "strip"} the infected attachment is replaced by
    a text notice attachment naming it and the reason, every other part
    and the header block stay byte-identical, the copy is delivered as
    Blocked/Infected and the original is quarantined.
    """
    run = await harness.process(
        FakeScanner(), make_rule(blocked_action="strip"), eicar_message()
    )
    outcome = run.outcome
    assert outcome.decision is Decision.DELIVER
    assert outcome.result == "Blocked/Infected"
    assert outcome.quarantine == "blocked"
    assert not outcome.sanitized
    assert outcome.actions == ("stripped part 1.2 (invoice.com)",)
    assert {r.part_id: r.action for r in outcome.parts} == {
        "1.1": "allowed",
        "1.2": "stripped",
        "1.3": "allowed",
    }
    data = run.data()
    assert EICAR not in data
    assert b64(EICAR)[:40] not in data
    assert_stamped(data, "Blocked/Infected")
    assert_only_changed(run.original, data, {"1.2"})
    parts = decoded_parts(data, harness.fresh())
    notice = parts["1.2"]
    assert notice.content_type == "text/plain"
    assert notice.filename == "invoice.com.removed.txt"
    text = notice.path.read_bytes()
    assert b"invoice.com" in text
    assert b"Infected" in text


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_strip_in_attached_message(harness: Harness) -> None:
    """
    Stripping reaches into a forwarded message: only the infected leaf
    inside it changes, the forwarded message's other parts and the outer
    parts stay byte-identical.
    """
    run = await harness.process(
        FakeScanner(), make_rule(blocked_action="strip"), forwarded_eicar()
    )
    assert run.outcome.decision is Decision.DELIVER
    assert run.outcome.result == "Blocked/Infected"
    data = run.data()
    assert EICAR not in data
    assert_only_changed(run.original, data, {"1.2.1.2"})
    parts = decoded_parts(data, harness.fresh())
    assert parts["1.2.1.2"].filename == "invoice.com.removed.txt"
    assert parts["1.2.1.3"].path.read_bytes() == PDF


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_strip_and_sanitize(harness: Harness) -> None:
    """
    Stripping one part does not stop Deep CDR output replacing another:
    the EICAR part becomes a notice, the document its sanitized version,
    and the copy says it was sanitized.
    """
    scanner = FakeScanner()
    run = await harness.process(
        scanner, make_rule(blocked_action="strip"), eicar_message(docx=True)
    )
    assert run.outcome.decision is Decision.DELIVER
    assert run.outcome.result == "Blocked/Infected"
    assert run.outcome.sanitized
    data = run.data()
    assert_stamped(data, "Blocked/Infected", sanitized=True)
    assert_only_changed(run.original, data, {"1.2", "1.4"})
    parts = decoded_parts(data, harness.fresh())
    [written] = scanner.written.values()
    assert parts["1.4"].path.read_bytes() == written == converted_content(DOCX)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ["strip", "deliver"])
@pytest_twisted.ensureDeferred
async def test_blocked_subject_tag(harness: Harness, action: str) -> None:
    """
    A copy delivered with blocked content (stripped or not) gets the
    blocked subject tag once, and only the Subject changes in the header.
    """
    rule = make_rule(blocked_action=action, subject_tag_blocked="[BLOCKED]")
    run = await harness.process(FakeScanner(), rule, eicar_message())
    data = run.data()
    assert values(data, "Subject") == ["[BLOCKED] Invoice 2025-11"]
    assert_stamped(data, "Blocked/Infected")
    assert (
        header_block(data)
        .replace(b"[BLOCKED] ", b"")
        .endswith(header_block(run.original))
    )


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_deliver_blocked(harness: Harness) -> None:
    """
    With C{blocked_action = "deliver"} the infected message goes through
    unchanged, stamped Blocked/Infected, its original kept in quarantine.
    """
    run = await harness.process(
        FakeScanner(), make_rule(blocked_action="deliver"), eicar_message()
    )
    outcome = run.outcome
    assert outcome.decision is Decision.DELIVER
    assert outcome.result == "Blocked/Infected"
    assert outcome.quarantine == "blocked"
    assert outcome.actions == ("delivered blocked content",)
    assert_unchanged(run, run.delivery, "Blocked/Infected")
    assert {r.part_id: r.action for r in outcome.parts}["1.2"] == "delivered"


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_strip_external_quarantine(harness: Harness) -> None:
    """
    With C{external_quarantine}, a stripped copy's original is delivered
    as a copy marked C{X-Metadefender-To-Quarantine: True} rather than
    kept locally, as for blocked and sanitized mail.
    """
    rule = make_rule(blocked_action="strip", external_quarantine=True)
    run = await harness.process(FakeScanner(), rule, eicar_message())
    outcome = run.outcome
    assert outcome.quarantine is None
    assert [d.kind for d in outcome.deliveries] == ["message", "original copy"]
    copy = outcome.deliveries[1]
    assert delivered(copy) == copy.prefix + run.original
    assert ("X-Metadefender-To-Quarantine", "True") in fields(copy.prefix + b"\r\n")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ["strip", "deliver"])
@pytest_twisted.ensureDeferred
async def test_blocked_and_unscanned(harness: Harness, action: str) -> None:
    """
    When one part is blocked and another could not be scanned, a rule that
    delivers what remains (strip, deliver) still applies its error handling
    to the unscanned part: I{processing failed} set to fail fails the copy
    rather than delivering the PDF nobody scanned.
    """
    scanner = FakeScanner(errors={"report.pdf": Condition.PROCESSING_FAILED})
    rule = make_rule(
        blocked_action=action, on_error=ErrorHandling(processing_failed="fail")
    )
    run = await harness.process(scanner, rule, eicar_message())
    assert run.outcome.decision is Decision.FAIL
    assert run.outcome.condition == "processing_failed"
    assert run.outcome.deliveries == ()


# -- 3. sanitized documents --------------------------------------------------------


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_sanitized_docx(harness: Harness) -> None:
    """
    A document Core sanitized is replaced by the converted file Core
    returns (same bytes once decoded, Core's name, the type for that
    name); every other part and the header block stay byte-identical and
    the copy is stamped as sanitized, with nothing quarantined by default.
    """
    scanner = FakeScanner()
    run = await harness.process(scanner, make_rule(), "forwarded.eml")
    outcome = run.outcome
    assert outcome.decision is Decision.DELIVER
    assert outcome.result == "Allowed"
    assert outcome.sanitized
    assert outcome.quarantine is None
    [download] = scanner.downloads
    assert Path(download.dest_path).parent == run.workdir
    data = run.data()
    assert_stamped(data, "Allowed", sanitized=True)
    assert_only_changed(run.original, data, {"1.3"})
    new = decoded_parts(data, harness.fresh())["1.3"]
    assert new.path.read_bytes() == scanner.written[download.dest_path]
    assert new.path.read_bytes() == converted_content(DOCX)
    assert new.filename == download.verdict.converted_name
    assert new.content_type == DOCX_TYPE == mimetypes.guess_type(new.filename)[0]
    assert {r.part_id: r.action for r in outcome.parts}["1.3"] == "sanitized"
    assert outcome.actions == (f"sanitized part 1.3 (notes.docx -> {new.filename})",)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (b"Fwd: Contract and data", "[SANITIZED] Fwd: Contract and data"),
        (b"Re: [sanitized] Fwd: Contract", "Re: [sanitized] Fwd: Contract"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_sanitized_subject_tag(
    harness: Harness, subject: bytes, expected: str
) -> None:
    """
    C{subject_tag_sanitized} is put before the Subject of a sanitized copy
    once: never when the subject already carries it, and there is still
    exactly one Subject; the rest of the header is unchanged.
    """
    message = with_subject((CORPUS / "forwarded.eml").read_bytes(), subject)
    rule = make_rule(subject_tag_sanitized="[SANITIZED]")
    run = await harness.process(FakeScanner(), rule, message)
    data = run.data()
    assert values(data, "Subject") == [expected]
    assert_stamped(data, "Allowed", sanitized=True)
    assert_only_changed(
        run.original.replace(subject, b""),
        data.replace(subject, b"").replace(b"[SANITIZED] ", b""),
        {"1.3"},
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("external", [False, True])
@pytest_twisted.ensureDeferred
async def test_sanitized_quarantine(harness: Harness, external: bool) -> None:
    """
    With C{quarantine_sanitized} the original of a sanitized copy is kept
    as "sanitized", or with C{external_quarantine} delivered after the
    sanitized copy, marked for quarantine and otherwise untouched.
    """
    rule = make_rule(quarantine_sanitized=True, external_quarantine=external)
    run = await harness.process(FakeScanner(), rule, "forwarded.eml")
    outcome = run.outcome
    assert outcome.sanitized
    if not external:
        assert outcome.quarantine == "sanitized"
        assert [d.kind for d in outcome.deliveries] == ["message"]
        return
    assert outcome.quarantine is None
    assert [d.kind for d in outcome.deliveries] == ["message", "original copy"]
    copy = outcome.deliveries[1]
    assert delivered(copy) == copy.prefix + run.original
    assert_stamped(
        delivered(copy),
        "Allowed",
        extra=[
            ("X-Metadefender-EmailSecurity-OriginalCopy", "True"),
            ("X-Metadefender-To-Quarantine", "True"),
        ],
    )
    assert_stamped(delivered(outcome.deliveries[0]), "Allowed", sanitized=True)


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_apply_sanitized_off(harness: Harness) -> None:
    """
    With C{apply_sanitized = false} Core's converted file is not fetched
    and the message is delivered unchanged, not marked sanitized.
    """
    scanner = FakeScanner()
    run = await harness.process(
        scanner, make_rule(apply_sanitized=False), "forwarded.eml"
    )
    assert run.outcome.result == "Allowed"
    assert not run.outcome.sanitized
    assert scanner.downloads == []
    assert_unchanged(run, run.delivery, "Allowed")


def utf8_html(original: bytes) -> bytes:
    """
    A Deep CDR of HTML: the same text, scripts removed, in UTF-8.
    """
    return original.replace(b"<p>", b"<p data-cdr='1'>")


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_sanitized_text_keeps_charset(harness: Harness) -> None:
    """
    A sanitized HTML body keeps its declared charset, so its non-ASCII text
    reads the same after the replacement.
    """
    scanner = FakeScanner(sanitize_suffixes=(".html",), convert=utf8_html)
    run = await harness.process(scanner, make_rule(), "alternative.eml")
    assert run.outcome.sanitized
    message = email.message_from_bytes(run.data(), policy=email.policy.default)
    html = message.get_body(("html",))
    assert html is not None
    assert html.get_content_charset() == "utf-8"
    assert "Renée" in html.get_content()


# -- 4. S/MIME ---------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", SIGNED)
@pytest_twisted.ensureDeferred
async def test_smime_not_modified(harness: Harness, name: str) -> None:
    """
    An S/MIME message is scanned but not modified when parts of it were
    sanitized and the rule does not allow modifying S/MIME: the converted
    files are not even fetched.
    """
    scanner = FakeScanner(sanitize_suffixes=(".pdf", ".p7m"))
    run = await harness.process(scanner, make_rule(), name)
    assert any(r.sanitized for r in run.outcome.parts)
    assert not run.outcome.sanitized
    assert scanner.downloads == []
    assert_unchanged(run, run.delivery, "Allowed")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "part_id"), [(SIGNED[0], "1"), (SIGNED[1], "1.1.2")])
@pytest_twisted.ensureDeferred
async def test_smime_modified(harness: Harness, name: str, part_id: str) -> None:
    """
    With C{modify_smime} the sanitized part of an S/MIME message is
    replaced like any other.
    """
    scanner = FakeScanner(sanitize_suffixes=(".pdf", ".p7m"))
    run = await harness.process(scanner, make_rule(modify_smime=True), name)
    assert run.outcome.sanitized
    [download] = scanner.downloads
    data = run.data()
    assert_stamped(data, "Allowed", sanitized=True)
    if part_id != "1":
        assert_only_changed(run.original, data, {part_id})
    new = decoded_parts(data, harness.fresh())[part_id]
    assert new.path.read_bytes() == scanner.written[download.dest_path]


# -- 5. broken MIME -----------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", BROKEN)
@pytest_twisted.ensureDeferred
async def test_broken_scanned_whole(harness: Harness, name: str) -> None:
    """
    A message whose structure cannot be trusted is scanned as one file,
    C{message.eml}, holding the whole message, together with every payload
    Python's email extracts from it under either policy (each once); it is
    delivered unchanged when all are Allowed, even when Core says it
    sanitized one (nothing can be rebuilt). A message with more parts than
    a reading may give is not called scanned: it fails as not_scanned.
    """
    scanner = FakeScanner(sanitize_suffixes=(".eml",))
    run = await harness.process(scanner, make_rule(), name)
    if name == "broken-many-parts.eml":
        assert run.outcome.decision is Decision.FAIL
        assert run.outcome.condition == "not_scanned"
        assert "more than 1000 parts" in run.outcome.detail
        return
    whole = [c for c in scanner.scans if c.filename == WHOLE_MESSAGE_NAME]
    assert [c.content for c in whole] == [run.original]
    readings = python_leaves(run.original)
    others = [c.content for c in scanner.scans if c.filename != WHOLE_MESSAGE_NAME]
    assert sorted(others) == sorted(readings)
    assert all(c.filename.startswith("reading-") for c in scanner.scans[1:])
    assert run.outcome.decision is Decision.DELIVER
    assert run.outcome.result == "Allowed"
    assert not run.outcome.sanitized
    assert scanner.downloads == []
    assert_unchanged(run, run.delivery, "Allowed")


def python_leaves(data: bytes) -> list[bytes]:
    """
    The distinct non-empty leaf payloads of Python's email under both
    policies.
    """
    found: list[bytes] = []
    for policy in (email.policy.compat32, email.policy.default):
        for part in email.message_from_bytes(data, policy=policy).walk():
            if not part.is_multipart():
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes) and payload and payload not in found:
                    found.append(payload)
    return found


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ["block", "strip"])
@pytest.mark.parametrize("name", [n for n in BROKEN if n != "broken-many-parts.eml"])
@pytest_twisted.ensureDeferred
async def test_broken_blocked(harness: Harness, name: str, action: str) -> None:
    """
    A broken message Core blocks is blocked whole, even when the rule
    strips blocked content: there are no parts to strip.
    """
    scanner = FakeScanner(blocked_names={WHOLE_MESSAGE_NAME})
    run = await harness.process(scanner, make_rule(blocked_action=action), name)
    assert run.outcome.decision is Decision.BLOCK
    assert run.outcome.result == "Blocked/Infected"
    assert run.outcome.deliveries == ()
    assert run.outcome.quarantine == "blocked"


def hidden_eicar() -> bytes:
    """
    A message our parser calls ambiguous (a part with two Content-Type
    fields, which readers resolve differently) whose second part is the
    base64 of the EICAR test file: only a reading that decodes it sees the
    file; the raw message holds only its base64 text.
    """
    return multipart(
        "=_hidden_1",
        [
            text_part("Hello."),
            entity(
                [
                    "Content-Type: text/plain",
                    "Content-Type: application/octet-stream",
                    "Content-Transfer-Encoding: base64",
                ],
                b64(EICAR),
            ),
        ],
        [*RECEIVED, "Subject: hidden"],
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ["block", "strip", "deliver"])
@pytest_twisted.ensureDeferred
async def test_finding_in_another_reading(harness: Harness, action: str) -> None:
    """
    Content that only another reader's reading of an ambiguous message
    holds is scanned; a finding there takes the whole message: blocked
    with "block" and with "strip" (a part of another reading cannot be
    taken out), delivered with the Blocked result with "deliver"; the
    history names the reading's part as blocked.
    """
    data = hidden_eicar()
    assert EICAR in python_leaves(data)
    scanner = FakeScanner()
    run = await harness.process(scanner, make_rule(blocked_action=action), data)
    assert run.outcome.result == "Blocked/Infected"
    assert any(c.content == EICAR for c in scanner.scans)
    assert EICAR not in data
    blocked = [p.part_id for p in run.outcome.parts if p.result == "Blocked"]
    assert blocked == ["~compat32.2"]
    if action == "deliver":
        assert run.outcome.decision is Decision.DELIVER
        assert values(run.data(), "X-Metadefender-Core-Result") == ["Blocked/Infected"]
    else:
        assert run.outcome.decision is Decision.BLOCK
        assert run.outcome.deliveries == ()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["preamble", "epilogue"])
@pytest.mark.parametrize("action", ["block", "strip"])
@pytest_twisted.ensureDeferred
async def test_preamble_and_epilogue_scanned(
    harness: Harness, where: str, action: str
) -> None:
    """
    Text in a multipart's preamble or epilogue is submitted like a part
    (as it is); blocked there, the whole message is blocked even by a rule
    that strips (it is not a part that can be taken out). White space
    alone is not submitted.
    """
    clean = multipart("=_pre", [text_part("Hi.")], [*RECEIVED, "Subject: p"])
    scanner = FakeScanner()
    await harness.process(scanner, make_rule(), clean)
    assert scanner.scanned_names == ["body.txt"]
    delimiter = b"--=_pre\r\n"
    if where == "preamble":
        data = clean.replace(delimiter, b"Look: " + EICAR + b"\r\n" + delimiter, 1)
    else:
        data = clean + b"Look: " + EICAR + b"\r\n"
    scanner = FakeScanner()
    run = await harness.process(scanner, make_rule(blocked_action=action), data)
    assert f"{where}-1.txt" in scanner.scanned_names
    (call,) = [c for c in scanner.scans if c.filename == f"{where}-1.txt"]
    assert EICAR in call.content
    assert run.outcome.decision is Decision.BLOCK
    by_id = {p.part_id: p for p in run.outcome.parts}
    assert by_id[f"1~{where}"].result == "Blocked"


# -- 6. errors -----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ERROR_ACTIONS)
@pytest.mark.parametrize("condition", list(CONDITION_KEYS))
@pytest_twisted.ensureDeferred
async def test_scan_error(harness: Harness, condition: Condition, action: str) -> None:
    """
    A part Core could not scan follows the rule's action for the condition:
    retry later, fail, or deliver the original unchanged (nothing
    sanitized) as C{Bypassed/<condition>}.
    """
    key = CONDITION_KEYS[condition]
    scanner = FakeScanner(errors={"données.zip": condition})
    run = await harness.process(scanner, errors_rule(**{key: action}), "forwarded.eml")
    outcome = run.outcome
    assert outcome.condition == key
    reports = {r.part_id: r for r in outcome.parts}
    assert (reports["1.2.1.3"].result, reports["1.2.1.3"].action) == ("Error", "error")
    assert condition.value in reports["1.2.1.3"].error
    if action == "bypass":
        assert outcome.decision is Decision.DELIVER
        assert outcome.result == f"Bypassed/{key}"
        assert f"scan bypassed ({key})" in outcome.actions
        assert not outcome.sanitized
        assert scanner.downloads == []
        assert_unchanged(run, run.delivery, f"Bypassed/{key}")
        return
    assert outcome.decision is (Decision.RETRY if action == "retry" else Decision.FAIL)
    assert outcome.result == f"Failed/{key}"
    assert outcome.deliveries == ()
    assert "données.zip" in outcome.detail


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ERROR_ACTIONS)
@pytest_twisted.ensureDeferred
async def test_access_denied_retries(harness: Harness, action: str) -> None:
    """
    A refused API key is retried whatever the rule says about other
    conditions: it is a configuration error, never a reason to bounce or
    to deliver unscanned mail.
    """
    scanner = FakeScanner(errors={"body.txt": Condition.ACCESS_DENIED})
    rule = errors_rule(**dict.fromkeys(CONDITION_KEYS.values(), action))
    run = await harness.process(scanner, rule, "plain.eml")
    assert run.outcome.decision is Decision.RETRY
    assert run.outcome.condition == "access_denied"
    assert run.outcome.deliveries == ()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_most_severe_error_wins(harness: Harness) -> None:
    """
    When several parts fail, a bypass for one condition does not deliver
    a part whose condition the rule retries.
    """
    scanner = FakeScanner(
        errors={
            "Vertrag für Müller.pdf": Condition.NOT_SCANNED,
            "données.zip": Condition.UNREACHABLE,
        }
    )
    rule = errors_rule(not_scanned="bypass", core_unreachable="retry")
    run = await harness.process(scanner, rule, "forwarded.eml")
    assert run.outcome.decision is Decision.RETRY
    assert run.outcome.condition == "core_unreachable"
    assert run.outcome.deliveries == ()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ERROR_ACTIONS)
@pytest_twisted.ensureDeferred
async def test_download_failure(harness: Harness, action: str) -> None:
    """
    When the sanitized file cannot be downloaded, C{modification_failure}
    decides (not the download's own condition): retry, fail, or deliver
    the original unchanged as C{Bypassed/modification_failure}.
    """
    scanner = FakeScanner(download_error=Condition.UNREACHABLE)
    rule = errors_rule(modification_failure=action, core_unreachable="bypass")
    run = await harness.process(scanner, rule, "forwarded.eml")
    outcome = run.outcome
    assert len(scanner.downloads) == 1
    assert outcome.condition == "modification_failure"
    assert not outcome.sanitized
    if action == "bypass":
        assert outcome.decision is Decision.DELIVER
        assert outcome.result == "Bypassed/modification_failure"
        assert_unchanged(run, run.delivery, "Bypassed/modification_failure")
        return
    assert outcome.decision is (Decision.RETRY if action == "retry" else Decision.FAIL)
    assert outcome.result == "Failed/modification_failure"
    assert outcome.deliveries == ()
    assert "unreachable" in outcome.detail


# -- 7. forged headers -----------------------------------------------------------------


def without_forged(data: bytes) -> bytes:
    return data.replace(FORGED, b"")


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_forged_headers_allowed(harness: Harness) -> None:
    """
    Gateway headers arriving with the message (any case, folded or not)
    are removed from the delivered copy, which carries ours exactly once
    and is otherwise the original byte for byte.
    """
    original = (CORPUS / "plain.eml").read_bytes()
    message = insert_after_received(original, FORGED)
    run = await harness.process(FakeScanner(), make_rule(), message)
    data = run.data()
    assert_stamped(data, "Allowed")
    assert b"forged" not in data
    assert b"evil" not in data
    assert values(data, "X-Metadefender-Core-Result") == ["Allowed"]
    assert values(data, "X-Metadefender-EmailSecurity-Sanitized") == ["False"]
    prefix = data[: data.index(original[:20])]
    assert data == prefix + original
    assert fields(prefix + b"\r\n") == stamp("Allowed")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", ["strip", "deliver", "sanitized", "original copy"])
@pytest_twisted.ensureDeferred
async def test_forged_headers_removed(harness: Harness, scenario: str) -> None:
    """
    Forged gateway headers are removed from rebuilt, tagged and original
    copies too: a forged C{Allowed} never survives next to our verdict.
    """
    tag = {"subject_tag_blocked": "[BLOCKED]"} if scenario == "deliver" else {}
    rule = make_rule(
        blocked_action="block" if scenario == "original copy" else scenario,
        external_quarantine=scenario == "original copy",
        **tag,
    )
    if scenario == "sanitized":
        rule = make_rule(quarantine_sanitized=True, external_quarantine=True)
    message = insert_after_received(eicar_message(docx=True), FORGED)
    if scenario == "sanitized":
        message = message.replace(b64(EICAR), b64(b"harmless"))
    run = await harness.process(FakeScanner(), rule, message)
    result = "Allowed" if scenario == "sanitized" else "Blocked/Infected"
    assert run.outcome.deliveries
    for delivery in run.outcome.deliveries:
        data = delivered(delivery)
        assert b"forged" not in data
        assert b"evil" not in data
        assert values(data, "X-Metadefender-Core-Result") == [result]
        assert values(data, "X-MD-Email-Security-Id") == [SECURITY_ID]
        assert len(values(data, "X-Metadefender-EmailSecurity-Sanitized")) == 1
        assert len(values(data, "X-Metadefender-Core-Url")) == 1
    clean = without_forged(message)
    copies = [d for d in run.outcome.deliveries if d.kind == "original copy"]
    assert len(copies) == (scenario in ("sanitized", "original copy"))
    for copy in copies:
        data = delivered(copy)
        assert data.endswith(clean)
        assert fields(data[: -len(clean)] + b"\r\n") == stamp(
            result,
            extra=[
                ("X-Metadefender-EmailSecurity-OriginalCopy", "True"),
                ("X-Metadefender-To-Quarantine", "True"),
            ],
        )


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_forged_marker_with_space(harness: Harness) -> None:
    """
    A forged security id written with space before the colon (which
    RFC 5322's obsolete syntax allows and parsers accept) is removed too.
    """
    original = (CORPUS / "plain.eml").read_bytes()
    message = insert_after_received(original, b"X-MD-Email-Security-Id : forged\r\n")
    run = await harness.process(FakeScanner(), make_rule(), message)
    data = run.data()
    assert b"forged" not in data
    assert values(data, "X-MD-Email-Security-Id") == [SECURITY_ID]


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_modification_bypass_keeps_strip(harness: Harness) -> None:
    """
    When the sanitized file of one part cannot be fetched and the rule
    bypasses modification failures, the part Core blocked is still not
    delivered: bypassing Deep CDR must not undo C{blocked_action = strip}.
    """
    scanner = FakeScanner(download_error=Condition.UNREACHABLE)
    rule = make_rule(
        blocked_action="strip",
        on_error=ErrorHandling(modification_failure="bypass"),
    )
    run = await harness.process(scanner, rule, eicar_message(docx=True))
    assert run.outcome.deliveries
    for delivery in run.outcome.deliveries:
        if delivery.kind != "original copy":
            assert b64(EICAR)[:40] not in delivered(delivery)


# -- 8. the loop marker -------------------------------------------------------------


def marker_for(digest: bytes, stamp: Stamp) -> str:
    return (
        f"{SECURITY_ID}; body={digest.hex()[:24]}; r={stamp.rule}; "
        f"p={stamp.profile}; a={stamp.actions}; v={stamp.result}; "
        f"s={int(stamp.sanitized)}"
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("message", "changes"),
    [
        ("plain.eml", {}),
        ("forwarded.eml", {"subject_tag_sanitized": "[SANITIZED]"}),
        ("strip", {"blocked_action": "strip"}),
        ("block", {"external_quarantine": True, "notify_recipient": True}),
        ("forged", {"blocked_action": "deliver"}),
    ],
)
@pytest_twisted.ensureDeferred
async def test_marker_binds_delivered_body(
    harness: Harness, message: str, changes: dict[str, object]
) -> None:
    """
    With a marker maker, every delivery (message, original copy,
    notification) carries exactly one C{X-MD-Email-Security-Id}, made for
    the content digest of what it actually delivers, the rule, its Core
    profile and actions, and the result (an original copy's and a
    notification's result is never one of a scanned copy, so they are
    scanned should they come back); on relayed messages it is the first
    field.
    """
    data: str | bytes = {
        "strip": eicar_message(),
        "block": eicar_message(),
        "forged": insert_after_received(eicar_message(), FORGED),
    }.get(message, message)
    rule = make_rule(**changes)
    run = await harness.process(FakeScanner(), rule, data, marker_for)
    assert run.outcome.deliveries
    for delivery in run.outcome.deliveries:
        output = delivered(delivery)
        hasher = ContentHasher()
        hasher.feed(output)
        digest = hasher.digest()
        assert digest is not None
        result = {
            "message": run.outcome.result,
            "original copy": f"OriginalCopy/{run.outcome.result}",
            "notification": "Notification",
        }[delivery.kind]
        stamp = Stamp(
            rule.name,
            f"{CORE.name}/{CORE_RULE}",
            rule.blocked_action + ".cdr",
            result,
            run.outcome.sanitized if delivery.kind == "message" else False,
        )
        expected = marker_for(digest, stamp)
        assert values(output, "X-MD-Email-Security-Id") == [expected], delivery.kind
        if delivery.kind != "notification":
            assert fields(header_block(output))[0] == (
                "X-MD-Email-Security-Id",
                expected,
            )


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_core_url_names_the_server_that_scanned(harness: Harness) -> None:
    """
    When a failover server gave the verdicts, X-Metadefender-Core-Url names
    that server, not the profile's first one.
    """
    run = await harness.process(
        FakeScanner(core_url="http://core-b.test:8008"), make_rule(), "plain.eml"
    )
    prefix = run.delivery.prefix
    assert b"X-Metadefender-Core-Url: http://core-b.test:8008\r\n" in prefix
    assert b"core.test:8008" not in prefix


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_forged_headers_after_large_header_block(harness: Harness) -> None:
    """
    Forged product fields after hundreds of KiB of other fields (beyond any
    read limit of the old check), between them, and in the X-MD-*
    namespace at large, are all removed: the recipient sees only ours.
    """
    original = (CORPUS / "plain.eml").read_bytes()
    filler = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"f" * 60) for i in range(6000))
    assert len(filler) > 400 * 1024
    forged = (
        filler[: len(filler) // 2]
        + b"X-MD-Anything: forged-mid\r\n"
        + filler[len(filler) // 2 :]
        + FORGED
        + b"x-md-email-security-id:forged-late\r\n"
    )
    message = insert_after_received(original, forged)
    run = await harness.process(FakeScanner(), make_rule(), message)
    data = run.data()
    assert b"forged" not in data
    assert b"evil" not in data
    assert values(data, "X-MD-Email-Security-Id") == [SECURITY_ID]
    assert values(data, "X-Metadefender-Core-Result") == ["Allowed"]
    assert data.count(b"X-Filler-") == 6000


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_empty_parts_not_submitted(harness: Harness) -> None:
    """
    Zero-byte parts (an empty text body, an empty attachment, one whose
    base64 decodes to nothing) are never sent to Core, count as clean, and
    are listed as "empty" among the parts; the non-empty part is scanned and
    the message delivered unchanged under the default error handling (which
    would fail a part Core did not scan).
    """
    message = multipart(
        "=_empty_1",
        [
            entity(["Content-Type: text/plain; charset=us-ascii"], b""),
            attachment("empty.bin", "application/octet-stream", b""),
            entity(
                [
                    "Content-Type: application/pdf",
                    'Content-Disposition: attachment; filename="blank.pdf"',
                    "Content-Transfer-Encoding: base64",
                ],
                b"\r\n",
            ),
            attachment("report.pdf", "application/pdf", PDF),
        ],
        [*RECEIVED, "Subject: empties"],
    )
    scanner = FakeScanner()
    run = await harness.process(scanner, make_rule(), message)
    assert scanner.scanned_names == ["report.pdf"]
    assert run.outcome.decision is Decision.DELIVER
    assert run.outcome.result == "Allowed"
    by_id = {p.part_id: p for p in run.outcome.parts}
    assert [by_id[i].result for i in ("1.1", "1.2", "1.3")] == ["Empty"] * 3
    assert [by_id[i].action for i in ("1.1", "1.2", "1.3")] == ["empty"] * 3
    assert all(by_id[i].size == 0 for i in ("1.1", "1.2", "1.3"))
    assert by_id["1.4"].result == "Allowed"
    assert_unchanged(run, run.delivery, "Allowed")


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_empty_part_of_blocked_message(harness: Harness) -> None:
    """
    Beside a blocked part, an empty part stays "empty" in the history
    rather than being called blocked.
    """
    message = multipart(
        "=_empty_2",
        [
            entity(["Content-Type: text/plain"], b""),
            attachment("invoice.com", "application/octet-stream", EICAR),
        ],
        [*RECEIVED, "Subject: empty and infected"],
    )
    run = await harness.process(FakeScanner(), make_rule(), message)
    assert run.outcome.decision is Decision.BLOCK
    by_id = {p.part_id: p for p in run.outcome.parts}
    assert (by_id["1.1"].result, by_id["1.1"].action) == ("Empty", "empty")
    assert by_id["1.2"].action == "blocked"
