"""
Tests for L{mdgateway.message.dsn}: RFC 3464 delivery status notifications.
"""

from __future__ import annotations

import email
import email.policy
import errno
import hashlib
import os
import quopri
import re
import resource
import signal
import stat
import tracemalloc
from collections.abc import Mapping
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from unittest import SkipTest

import attrs
import pytest
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.message.dsn import (
    DsnMessage,
    DsnSuppressedError,
    RecipientReport,
    SuppressReason,
    address_field,
    envelope_id_field,
    notify_allows,
    original_recipient_field,
    select_reported,
    write_dsn,
)
from mdgateway.queue.envelope import Envelope, Recipient

NOW = 1_700_000_200.0
ARRIVED = 1_700_000_000.0
HOST = "mdgw.example.net"
HEADERS = (
    b"Received: from client.example.com by mdgw.example.net;\r\n"
    b"\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Quarterly =?utf-8?q?r=C3=A9port?=\r\n"
    b"Message-ID: <orig-1@example.com>\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
)
BODY = b"".join(b"Body line %04d\r\n" % i for i in range(200))
ORIGINAL = HEADERS + b"\r\n" + BODY


def make_envelope(**kw: Any) -> Envelope:
    values: dict[str, Any] = {
        "queue_id": "01HF0000000000000001",
        "received_at": ARRIVED,
        "sender": "alice@example.com",
        "recipients": (
            Recipient("bob@example.org", {"ORCPT": "rfc822;bob+2Bx@example.org"}),
            Recipient("carol@example.org", {"NOTIFY": "FAILURE,DELAY"}),
        ),
        "mail_parameters": {"ENVID": "QQ314159+2Bx", "RET": "HDRS"},
    }
    values.update(kw)
    return Envelope(**values)


def failed(address: str = "bob@example.org", **kw: Any) -> RecipientReport:
    values: dict[str, Any] = {
        "action": "failed",
        "status": "5.1.1",
        "remote_mta": "mx.example.org",
        "diagnostic_code": "smtp; 550 5.1.1 <bob@example.org>: user unknown",
        "last_attempt": NOW - 50,
    }
    values.update(kw)
    return RecipientReport(address, **values)


def delayed(address: str = "carol@example.org", **kw: Any) -> RecipientReport:
    values: dict[str, Any] = {
        "action": "delayed",
        "status": "4.4.1",
        "remote_mta": "mx2.example.org",
        "diagnostic_code": "smtp; 451 4.4.1 try later",
        "last_attempt": NOW - 60,
        "will_retry_until": ARRIVED + 5 * 86400,
    }
    values.update(kw)
    return RecipientReport(address, **values)


def parse(path: str) -> EmailMessage:
    with open(path, "rb") as f:
        message = email.message_from_binary_file(f, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: Message) -> list[EmailMessage]:
    """
    The subparts of a multipart (or C{message/*}) part, each parsed as an
    L{EmailMessage} under C{email.policy.default}.
    """
    payload = message.get_payload()
    assert isinstance(payload, list), payload
    found = []
    for part in payload:
        assert isinstance(part, EmailMessage), part
        found.append(part)
    return found


def status_blocks(message: EmailMessage) -> list[EmailMessage]:
    """
    The per-message block, then the per-recipient blocks.
    """
    part = parts(message)[1]
    assert part.get_content_type() == "message/delivery-status"
    return parts(part)


def fields(block: Message) -> dict[str, str]:
    return {name: str(value) for name, value in block.items()}


def raw_parts(data: bytes) -> list[tuple[bytes, bytes]]:
    """
    The C{(header, content)} bytes of each part, exactly as written.
    """
    boundary = re.search(rb'boundary="([^"]+)"', data)
    assert boundary is not None
    delimiter = b"\r\n--" + boundary[1]
    pieces = data.split(delimiter)
    assert pieces[-1] == b"--\r\n"
    parts = []
    for piece in pieces[1:-1]:
        assert piece.startswith(b"\r\n")
        head, _, content = piece[2:].partition(b"\r\n\r\n")
        parts.append((head, content))
    return parts


class DsnMixin:
    """
    An original message file and a place for reports, under pytest's
    C{tmp_path}.
    """

    @pytest.fixture(autouse=True)
    def _tmp_root(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.original = tmp_path / "original.eml"
        self.original.write_bytes(ORIGINAL)
        self.count = 0

    def write(
        self,
        envelope: Any = None,
        results: Any = None,
        **kw: Any,
    ) -> tuple[DsnMessage, EmailMessage, bytes]:
        self.count += 1
        path = str(self.tmp / f"dsn{self.count}.eml")
        kw.setdefault("reporting_mta", HOST)
        kw.setdefault("now", NOW)
        report = write_dsn(
            path,
            str(self.original),
            envelope if envelope is not None else make_envelope(),
            results if results is not None else [failed()],
            **kw,
        )
        return report, parse(path), Path(path).read_bytes()

    def suppressed(self, envelope: Any = None, results: Any = None) -> SuppressReason:
        path = self.tmp / "suppressed.eml"
        with pytest.raises(DsnSuppressedError) as caught:
            write_dsn(
                str(path),
                str(self.original),
                envelope if envelope is not None else make_envelope(),
                results if results is not None else [failed()],
                reporting_mta=HOST,
                now=NOW,
            )
        assert not path.exists()
        return caught.value.reason


class HeaderTests(DsnMixin, SynchronousTestCase):
    """
    The report's own header and MIME structure.
    """

    def test_message_headers(self) -> None:
        """
        From the mailer daemon at the reporting host, to the original
        sender, with the bounce subject, a Date from the injected clock, a
        Message-ID at the reporting host, C{Auto-Submitted: auto-replied}
        and a C{multipart/report; report-type=delivery-status} type.
        """
        report, message, _ = self.write()
        self.assertEqual(
            message["From"], f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
        )
        self.assertEqual(message["To"], "alice@example.com")
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(parsedate_to_datetime(message["Date"]).timestamp(), NOW)
        self.assertEqual(message["Message-ID"], report.message_id)
        self.assertRegex(
            report.message_id,
            r"^<01HF0000000000000001\.[0-9a-f]{16}@mdgw\.example\.net>$",
        )
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(message["MIME-Version"], "1.0")
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")

    def test_parts(self) -> None:
        """
        Three parts: the text for people, the delivery status, the
        original's headers.
        """
        _, message, _ = self.write()
        types = [part.get_content_type() for part in parts(message)]
        self.assertEqual(
            types, ["text/plain", "message/delivery-status", "text/rfc822-headers"]
        )
        self.assertFalse(message.defects)

    def test_delay_subject(self) -> None:
        """
        A report of delays only has the delay subject.
        """
        _, message, _ = self.write(results=[delayed()])
        self.assertEqual(message["Subject"], "Delayed Mail (still being retried)")

    def test_mixed_is_failure(self) -> None:
        """
        A report with a failure and a delay is a failure report.
        """
        report, message, _ = self.write(results=[delayed(), failed()])
        self.assertEqual(report.kind, "failure")
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")

    def test_lines(self) -> None:
        """
        Every line ends with CRLF, and the report without a returned 8-bit
        original is plain ASCII.
        """
        _, _, data = self.write()
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        self.assertNotIn(b"\r", data.replace(b"\r\n", b""))
        self.assertTrue(data.isascii())

    def test_return_value(self) -> None:
        """
        The result names the file, the null sender, the original sender as
        the only recipient, the reported results and the file's size.
        """
        results = [failed(), delayed()]
        report, _, data = self.write(results=results)
        self.assertEqual(report.sender, "")
        self.assertEqual(report.recipients, ("alice@example.com",))
        self.assertEqual(report.reported, tuple(results))
        self.assertEqual(report.omitted, ())
        self.assertEqual(report.kind, "failure")
        self.assertEqual(report.returned, "headers")
        self.assertEqual(report.size, len(data))
        self.assertEqual(Path(report.path).read_bytes(), data)
        self.assertFalse(report.body_8bit)
        self.assertFalse(report.smtputf8)
        self.assertEqual(stat.S_IMODE(os.stat(report.path).st_mode), 0o600)


class StatusFieldTests(DsnMixin, SynchronousTestCase):
    """
    The C{message/delivery-status} part, field by field.
    """

    def test_per_message(self) -> None:
        """
        Reporting-MTA, the decoded ENVID, the queue id and the arrival date,
        in that order.
        """
        _, message, _ = self.write()
        block = status_blocks(message)[0]
        self.assertEqual(
            list(block.items()),
            [
                ("Reporting-MTA", f"dns; {HOST}"),
                ("Original-Envelope-Id", "QQ314159+x"),
                ("X-Mdgateway-Queue-Id", "01HF0000000000000001"),
                ("Arrival-Date", "Tue, 14 Nov 2023 22:13:20 +0000"),
            ],
        )

    def test_arrival_date_given(self) -> None:
        """
        An explicit arrival date wins over the envelope's.
        """
        _, message, _ = self.write(arrival_date=ARRIVED - 3600)
        block = status_blocks(message)[0]
        self.assertEqual(
            parsedate_to_datetime(block["Arrival-Date"]).timestamp(), ARRIVED - 3600
        )

    def test_no_envid(self) -> None:
        """
        Without ENVID there is no Original-Envelope-Id.
        """
        envelope = make_envelope(mail_parameters={"RET": "HDRS"})
        _, message, _ = self.write(envelope)
        self.assertNotIn("Original-Envelope-Id", status_blocks(message)[0])

    def test_failed_recipient(self) -> None:
        """
        A failed recipient's block: Original-Recipient from ORCPT (xtext
        undone), Final-Recipient, Action, Status, Remote-MTA,
        Diagnostic-Code and Last-Attempt-Date, and nothing else.
        """
        _, message, _ = self.write()
        blocks = status_blocks(message)
        self.assertEqual(len(blocks), 2)
        self.assertEqual(
            list(blocks[1].items()),
            [
                ("Original-Recipient", "rfc822; bob+x@example.org"),
                ("Final-Recipient", "rfc822; bob@example.org"),
                ("Action", "failed"),
                ("Status", "5.1.1"),
                ("Remote-MTA", "dns; mx.example.org"),
                ("Diagnostic-Code", "smtp; 550 5.1.1 <bob@example.org>: user unknown"),
                ("Last-Attempt-Date", "Tue, 14 Nov 2023 22:15:50 +0000"),
            ],
        )

    def test_delayed_recipient(self) -> None:
        """
        A delayed recipient's block carries Will-Retry-Until; without ORCPT
        there is no Original-Recipient.
        """
        _, message, _ = self.write(results=[delayed()])
        self.assertEqual(
            fields(status_blocks(message)[1]),
            {
                "Final-Recipient": "rfc822; carol@example.org",
                "Action": "delayed",
                "Status": "4.4.1",
                "Remote-MTA": "dns; mx2.example.org",
                "Diagnostic-Code": "smtp; 451 4.4.1 try later",
                "Last-Attempt-Date": "Tue, 14 Nov 2023 22:15:40 +0000",
                "Will-Retry-Until": "Sun, 19 Nov 2023 22:13:20 +0000",
            },
        )

    def test_minimal_recipient(self) -> None:
        """
        Optional fields absent from the result are absent from the block;
        Will-Retry-Until is only for delays.
        """
        result = RecipientReport(
            "carol@example.org", "failed", "4.4.7", will_retry_until=NOW + 10
        )
        _, message, _ = self.write(results=[result])
        self.assertEqual(
            fields(status_blocks(message)[1]),
            {
                "Final-Recipient": "rfc822; carol@example.org",
                "Action": "failed",
                "Status": "4.4.7",
            },
        )

    def test_several_recipients(self) -> None:
        """
        One block per reported recipient, in the given order.
        """
        envelope = make_envelope(
            recipients=[Recipient(f"u{i}@example.org") for i in range(5)]
        )
        results = [failed(f"u{i}@example.org") for i in (3, 1, 4)]
        _, message, _ = self.write(envelope, results)
        finals = [b["Final-Recipient"] for b in status_blocks(message)[1:]]
        self.assertEqual(finals, [f"rfc822; u{i}@example.org" for i in (3, 1, 4)])

    def test_orcpt_from_result(self) -> None:
        """
        An ORCPT given with the result wins over the envelope's.
        """
        result = failed(original_recipient="rfc822;list+2Downer@example.org")
        _, message, _ = self.write(results=[result])
        block = status_blocks(message)[1]
        self.assertEqual(block["Original-Recipient"], "rfc822; list-owner@example.org")

    def test_diagnostic_sanitised(self) -> None:
        """
        A diagnostic with line breaks stays one field (no injected field),
        non-ASCII becomes C{\\x{HEX}}, and untyped text gets the
        C{X-Mdgateway} type; a typed Remote-MTA is kept as given.
        """
        result = failed(
            diagnostic_code="smtp; 550 no\r\nInjected: yes über",
            remote_mta="dns; mx9.example.org",
        )
        other = failed("carol@example.org", diagnostic_code="Core scan failed: timeout")
        _, message, _ = self.write(results=[result, other])
        blocks = status_blocks(message)
        self.assertNotIn("Injected", blocks[1])
        self.assertEqual(
            blocks[1]["Diagnostic-Code"], "smtp; 550 no Injected: yes \\x{FC}ber"
        )
        self.assertEqual(blocks[1]["Remote-MTA"], "dns; mx9.example.org")
        self.assertEqual(
            blocks[2]["Diagnostic-Code"], "X-Mdgateway; Core scan failed: timeout"
        )

    def test_long_diagnostic_folded(self) -> None:
        """
        A long diagnostic is folded onto continuation lines and reads back
        whole.
        """
        text = "smtp; 550 5.7.1 " + " ".join(["rejected"] * 40)
        _, message, data = self.write(results=[failed(diagnostic_code=text)])
        self.assertEqual(status_blocks(message)[1]["Diagnostic-Code"], text)
        for line in data.split(b"\r\n"):
            self.assertLessEqual(len(line), 998)


class HumanTextTests(DsnMixin, SynchronousTestCase):
    """
    The plain-English part.
    """

    def text(self, message: EmailMessage) -> str:
        part = parts(message)[0]
        self.assertEqual(part.get_content_type(), "text/plain")
        return str(part.get_content())

    def test_failure_text(self) -> None:
        """
        It says what happened, to whom, why, and which message (its decoded
        subject, Message-ID and queue id).
        """
        _, message, _ = self.write()
        text = self.text(message)
        self.assertIn(f"This is the mail system at {HOST}.", text)
        self.assertIn("could not be delivered", text)
        self.assertIn("Subject: Quarterly réport", text)
        self.assertIn("Message-ID: <orig-1@example.com>", text)
        self.assertIn("Queue ID: 01HF0000000000000001", text)
        self.assertIn("Delivery to these recipients failed:", text)
        self.assertIn("<bob@example.org>", text)
        self.assertIn("Originally addressed to: bob+x@example.org", text)
        self.assertIn("Status: 5.1.1", text)
        self.assertIn("Remote server: mx.example.org", text)
        self.assertIn("What it said: 550 5.1.1 <bob@example.org>: user unknown", text)

    def test_delay_text(self) -> None:
        """
        A delay report says the mail system keeps trying, until when, and
        that the message need not be sent again.
        """
        _, message, _ = self.write(results=[delayed()])
        text = self.text(message)
        self.assertIn("has not been delivered yet", text)
        self.assertIn("do not need to send the message again", text)
        self.assertIn("Will keep trying until: Sun, 19 Nov 2023 22:13:20 +0000", text)
        self.assertNotIn("could not be delivered", text)

    def test_non_ascii_text_encoded(self) -> None:
        """
        Text with non-ASCII characters goes as quoted-printable UTF-8, so
        the report stays 7-bit.
        """
        _, message, data = self.write()
        part = parts(message)[0]
        self.assertEqual(part["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(part.get_content_charset(), "utf-8")
        self.assertTrue(data.isascii())


class ReturnedContentTests(DsnMixin, SynchronousTestCase):
    """
    What of the original comes back: C{RET} and the size limit.
    """

    def test_ret_hdrs(self) -> None:
        """
        C{RET=HDRS}: the header block exactly, as C{text/rfc822-headers},
        and no body.
        """
        report, _, data = self.write()
        head, content = raw_parts(data)[2]
        self.assertIn(b"Content-Type: text/rfc822-headers", head)
        self.assertEqual(content, HEADERS)
        self.assertNotIn(b"Body line", data)
        self.assertEqual(report.returned, "headers")

    def test_ret_full(self) -> None:
        """
        C{RET=FULL}: the original byte for byte, as C{message/rfc822}.
        """
        envelope = make_envelope(mail_parameters={"RET": "FULL"})
        report, message, data = self.write(envelope)
        head, content = raw_parts(data)[2]
        self.assertIn(b"Content-Type: message/rfc822", head)
        self.assertEqual(content, ORIGINAL)
        attached = parts(parts(message)[2])[0]
        self.assertEqual(attached["Message-ID"], "<orig-1@example.com>")
        self.assertEqual(report.returned, "full")

    def test_default_small(self) -> None:
        """
        Without C{RET}, a failure report returns a small original whole.
        """
        envelope = make_envelope(mail_parameters={})
        report, _, data = self.write(envelope)
        self.assertEqual(raw_parts(data)[2][1], ORIGINAL)
        self.assertEqual(report.returned, "full")

    def test_default_large(self) -> None:
        """
        Without C{RET}, an original over the size limit comes back as
        headers only.
        """
        envelope = make_envelope(mail_parameters={})
        report, _, data = self.write(envelope, full_limit=len(ORIGINAL) - 1)
        head, content = raw_parts(data)[2]
        self.assertIn(b"text/rfc822-headers", head)
        self.assertEqual(content, HEADERS)
        self.assertEqual(report.returned, "headers")

    def test_default_delay(self) -> None:
        """
        Without C{RET}, a delay warning returns headers only; with
        C{RET=FULL}, the whole original.
        """
        envelope = make_envelope(mail_parameters={})
        report, _, _ = self.write(envelope, [delayed()])
        self.assertEqual(report.returned, "headers")
        envelope = make_envelope(mail_parameters={"RET": "full"})
        report, _, data = self.write(envelope, [delayed()])
        self.assertEqual(report.returned, "full")
        self.assertEqual(raw_parts(data)[2][1], ORIGINAL)

    def test_header_limit(self) -> None:
        """
        A header block longer than the limit is cut at a line end.
        """
        report, _, data = self.write(header_limit=100)
        content = raw_parts(data)[2][1]
        self.assertTrue(HEADERS.startswith(content))
        self.assertTrue(content.endswith(b"\r\n"))
        self.assertLessEqual(len(content), 100)
        self.assertGreater(len(content), 50)

    def test_declared_8bit(self) -> None:
        """
        An original sent with C{BODY=8BITMIME} is returned with
        C{Content-Transfer-Encoding: 8bit}, and the report must be relayed
        as 8BITMIME.
        """
        self.original.write_bytes(HEADERS + b"\r\nGr\xc3\xbc\xc3\x9fe\r\n")
        envelope = make_envelope(mail_parameters={"RET": "FULL", "BODY": "8BITMIME"})
        report, message, data = self.write(envelope)
        self.assertEqual(message["Content-Transfer-Encoding"], "8bit")
        head, content = raw_parts(data)[2]
        self.assertIn(b"Content-Transfer-Encoding: 8bit", head)
        self.assertEqual(content, HEADERS + b"\r\nGr\xc3\xbc\xc3\x9fe\r\n")
        self.assertTrue(report.body_8bit)

    def test_undeclared_8bit_found(self) -> None:
        """
        8-bit bytes in an original declared 7-bit are found while copying
        and reported, so the relay can ask for 8BITMIME.
        """
        self.original.write_bytes(HEADERS + b"\r\n" + BODY + b"caf\xc3\xa9\r\n")
        envelope = make_envelope(mail_parameters={"RET": "FULL"})
        report, _, _ = self.write(envelope)
        self.assertTrue(report.body_8bit)

    def test_smtputf8(self) -> None:
        """
        An original received with SMTPUTF8 comes back as C{message/global}
        (or C{message/global-headers}), and the report needs SMTPUTF8.
        """
        envelope = make_envelope(mail_parameters={"RET": "FULL", "SMTPUTF8": None})
        report, _, data = self.write(envelope)
        self.assertIn(b"Content-Type: message/global\r\n", raw_parts(data)[2][0])
        self.assertTrue(report.smtputf8)
        envelope = make_envelope(mail_parameters={"RET": "HDRS", "SMTPUTF8": None})
        report, _, data = self.write(envelope)
        self.assertIn(b"Content-Type: message/global-headers", raw_parts(data)[2][0])

    def test_large_original_streamed(self) -> None:
        """
        A 20 MB original with C{RET=FULL} is returned byte for byte while
        Python memory stays under 2 MiB: it is streamed, not loaded.
        """
        chunk = b"".join(
            b"%07d 0123456789abcdef0123456789abcdef\r\n" % i for i in range(20000)
        )
        digest = hashlib.sha256()
        size = 0
        with open(self.original, "wb") as f:
            f.write(HEADERS + b"\r\n")
            digest.update(HEADERS + b"\r\n")
            size += len(HEADERS) + 2
            while size < 20 * 1024 * 1024:
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        envelope = make_envelope(mail_parameters={"RET": "FULL"})
        path = str(self.tmp / "big-dsn.eml")
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            report = write_dsn(
                path,
                str(self.original),
                envelope,
                [failed()],
                reporting_mta=HOST,
                now=NOW,
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 2 * 1024 * 1024)
        self.assertEqual(report.returned, "full")
        self.assertEqual(report.size, os.path.getsize(path))
        with open(path, "rb") as f:
            start = f.read(64 * 1024)
            boundary = re.search(rb'boundary="([^"]+)"', start)
            assert boundary is not None
            delimiter = b"\r\n--" + boundary[1] + b"\r\n"
            third = start.find(
                delimiter, start.find(delimiter, start.find(delimiter) + 1) + 1
            )
            offset = start.index(b"\r\n\r\n", third + len(delimiter)) + 4
            ending = b"\r\n--" + boundary[1] + b"--\r\n"
            f.seek(offset)
            copied = hashlib.sha256()
            remaining = report.size - offset - len(ending)
            self.assertEqual(remaining, size)
            while remaining:
                data = f.read(min(remaining, 1 << 20))
                copied.update(data)
                remaining -= len(data)
            self.assertEqual(f.read(), ending)
        self.assertEqual(copied.hexdigest(), digest.hexdigest())


class NotifyTests(DsnMixin, SynchronousTestCase):
    """
    The recipients' C{NOTIFY} decides who is in a report.
    """

    def test_notify_allows(self) -> None:
        """
        No NOTIFY: failures and delays; NEVER: nothing; an explicit list:
        what it names, case-insensitively; success only when asked for.
        """
        table = {
            None: {
                "failed": True,
                "delayed": True,
                "delivered": False,
                "relayed": False,
            },
            "NEVER": {
                "failed": False,
                "delayed": False,
                "delivered": False,
                "relayed": False,
            },
            "FAILURE": {
                "failed": True,
                "delayed": False,
                "delivered": False,
                "relayed": False,
            },
            "DELAY": {
                "failed": False,
                "delayed": True,
                "delivered": False,
                "relayed": False,
            },
            "SUCCESS": {
                "failed": False,
                "delayed": False,
                "delivered": True,
                "relayed": True,
            },
            "success,Failure, delay": {
                "failed": True,
                "delayed": True,
                "delivered": True,
                "relayed": True,
            },
        }
        for notify, expected in table.items():
            parameters: Mapping[str, str | None] = (
                {} if notify is None else {"NOTIFY": notify}
            )
            for action, allowed in expected.items():
                self.assertEqual(
                    notify_allows(parameters, action), allowed, (notify, action)
                )

    def test_never_left_out(self) -> None:
        """
        A recipient with C{NOTIFY=NEVER} is left out of the report and
        listed as omitted.
        """
        envelope = make_envelope(
            recipients=[
                Recipient("bob@example.org", {"NOTIFY": "NEVER"}),
                Recipient("carol@example.org"),
            ]
        )
        results = [failed("bob@example.org"), failed("carol@example.org")]
        report, message, _ = self.write(envelope, results)
        self.assertEqual(report.reported, (results[1],))
        self.assertEqual(report.omitted, (results[0],))
        finals = [b["Final-Recipient"] for b in status_blocks(message)[1:]]
        self.assertEqual(finals, ["rfc822; carol@example.org"])

    def test_nothing_to_report(self) -> None:
        """
        When every recipient said NEVER, or did not ask for failures, no
        report is written.
        """
        for notify in ("NEVER", "SUCCESS", "DELAY", "SUCCESS,DELAY"):
            envelope = make_envelope(
                recipients=[Recipient("bob@example.org", {"NOTIFY": notify})]
            )
            self.assertEqual(
                self.suppressed(envelope), SuppressReason.NOTHING_TO_REPORT, notify
            )

    def test_delay_needs_delay(self) -> None:
        """
        A delay warning goes only to recipients whose NOTIFY names DELAY
        (or who gave no NOTIFY).
        """
        envelope = make_envelope(
            recipients=[
                Recipient("a@example.org", {"NOTIFY": "FAILURE"}),
                Recipient("b@example.org", {"NOTIFY": "DELAY"}),
                Recipient("c@example.org"),
            ]
        )
        results = [delayed(f"{x}@example.org") for x in "abc"]
        report, _, _ = self.write(envelope, results)
        self.assertEqual(
            [r.address for r in report.reported], ["b@example.org", "c@example.org"]
        )
        self.assertEqual(report.kind, "delay")
        envelope = make_envelope(
            recipients=[Recipient("a@example.org", {"NOTIFY": "FAILURE"})]
        )
        self.assertEqual(
            self.suppressed(envelope, [delayed("a@example.org")]),
            SuppressReason.NOTHING_TO_REPORT,
        )

    def test_success(self) -> None:
        """
        With NOTIFY=SUCCESS, delivered and relayed recipients get a success
        report; without it, none.
        """
        envelope = make_envelope(
            recipients=[
                Recipient("a@example.org", {"NOTIFY": "SUCCESS"}),
                Recipient("b@example.org", {"NOTIFY": "SUCCESS,FAILURE"}),
            ]
        )
        results = [
            RecipientReport("a@example.org", "delivered", "2.0.0", remote_mta="mx"),
            RecipientReport("b@example.org", "relayed", "2.0.0"),
        ]
        report, message, _ = self.write(envelope, results)
        self.assertEqual(report.kind, "success")
        self.assertEqual(message["Subject"], "Successful Mail Delivery Report")
        actions = [b["Action"] for b in status_blocks(message)[1:]]
        self.assertEqual(actions, ["delivered", "relayed"])
        plain = make_envelope(recipients=[Recipient("a@example.org")])
        self.assertEqual(
            self.suppressed(plain, results[:1]), SuppressReason.NOTHING_TO_REPORT
        )

    def test_unknown_address(self) -> None:
        """
        A result for an address not in the envelope is treated as having
        no NOTIFY.
        """
        reported, omitted = select_reported(
            make_envelope(), [failed("zed@example.org"), delayed("zed@example.org")]
        )
        self.assertEqual(len(reported), 2)
        self.assertEqual(omitted, ())


class SuppressTests(DsnMixin, SynchronousTestCase):
    """
    What is never bounced.
    """

    def test_null_sender(self) -> None:
        """
        Nothing is reported about a message from the null reverse-path,
        whatever happened (the original is not even read).
        """
        self.original.unlink()
        for results in ([failed()], [delayed()]):
            reason = self.suppressed(make_envelope(sender=""), results)
            self.assertEqual(reason, SuppressReason.NULL_SENDER)
        self.assertIn("null", str(DsnSuppressedError(SuppressReason.NULL_SENDER)))

    def test_original_is_report(self) -> None:
        """
        A message that is itself a delivery report is never bounced, in
        any spelling of its content type.
        """
        spellings = [
            b"Content-Type: multipart/report; report-type=delivery-status;"
            b' boundary="x"\r\n',
            b"content-type: Multipart/Report;\r\n\tboundary=x;\r\n"
            b'\treport-type="Delivery-Status"\r\n',
            b"Content-Type: multipart/report (dsn); report-type=delivery-status\r\n",
        ]
        for spelling in spellings:
            self.original.write_bytes(b"From: x@y\r\n" + spelling + b"\r\nbody\r\n")
            self.assertEqual(
                self.suppressed(), SuppressReason.ORIGINAL_IS_REPORT, spelling
            )

    def test_auto_replied(self) -> None:
        """
        An automatic reply (C{Auto-Submitted: auto-replied}) is never
        bounced.
        """
        for value in (b"auto-replied", b"Auto-Replied; owner-email=x@y"):
            self.original.write_bytes(
                b"From: x@y\r\nAuto-Submitted: " + value + b"\r\n\r\nbody\r\n"
            )
            self.assertEqual(self.suppressed(), SuppressReason.ORIGINAL_IS_AUTO_REPLY)

    def test_other_reports_bounced(self) -> None:
        """
        Mail with a real sender that is auto-generated (mailing lists,
        alerts), says C{Auto-Submitted: no}, is a read receipt, or merely
        mentions a delivery-status type in its body, is bounced.
        """
        originals = [
            b"From: list@x\r\nAuto-Submitted: auto-generated\r\n\r\nbody\r\n",
            b"From: x@y\r\nAuto-Submitted: no\r\n\r\nbody\r\n",
            b"From: x@y\r\nContent-Type: multipart/report;"
            b" report-type=disposition-notification\r\n\r\nbody\r\n",
            b"From: x@y\r\n\r\nContent-Type: multipart/report;"
            b" report-type=delivery-status\r\nAuto-Submitted: auto-replied\r\n",
        ]
        for original in originals:
            self.original.write_bytes(original)
            report, _, _ = self.write()
            self.assertEqual(report.kind, "failure", original)


class InternationalTests(DsnMixin, SynchronousTestCase):
    """
    Internationalised addresses (RFC 6533).
    """

    def test_non_ascii_recipient(self) -> None:
        """
        A non-ASCII recipient is reported with the C{utf-8} address type in
        its 7-bit xtext form; the people's text shows it as it is.
        """
        address = "jörg@exämple.de"
        envelope = make_envelope(recipients=[Recipient(address)])
        report, message, data = self.write(envelope, [failed(address)])
        block = status_blocks(message)[1]
        self.assertEqual(block["Final-Recipient"], "utf-8; j\\x{F6}rg@ex\\x{E4}mple.de")
        self.assertTrue(data.isascii())
        text = quopri.decodestring(raw_parts(data)[0][1]).decode("utf-8")
        self.assertIn(f"<{address}>", text)
        self.assertFalse(report.smtputf8)

    def test_non_ascii_sender(self) -> None:
        """
        A report to a non-ASCII sender addresses it in UTF-8 (no encoded
        words in addresses) and must be relayed with SMTPUTF8.
        """
        envelope = make_envelope(sender="ålice@exämple.com")
        report, _, data = self.write(envelope)
        self.assertIn("To: <ålice@exämple.com>\r\n".encode(), data)
        self.assertTrue(report.smtputf8)
        self.assertEqual(report.recipients, ("ålice@exämple.com",))

    def test_address_field(self) -> None:
        """
        ASCII addresses are C{rfc822}; others C{utf-8} with everything
        outside QCHAR (non-ASCII, C{+}, C{=}, C{\\}) escaped.
        """
        self.assertEqual(address_field("a+b=c@x.org"), "rfc822; a+b=c@x.org")
        self.assertEqual(
            address_field("ü+1=2\\@x"), "utf-8; \\x{FC}\\x{2B}1\\x{3D}2\\x{5C}@x"
        )
        self.assertEqual(address_field("δ@x"), "utf-8; \\x{3B4}@x")
        self.assertEqual(address_field("😀@x"), "utf-8; \\x{1F600}@x")

    def test_original_recipient_field(self) -> None:
        """
        ORCPT values: xtext undone for C{rfc822}; C{utf-8} values kept in
        (or turned into) xtext form; no type, no field.
        """
        cases = {
            "rfc822;bob+2Bx@example.org": "rfc822; bob+x@example.org",
            "RFC822; a+3Db@x": "RFC822; a=b@x",
            "utf-8;j\\x{F6}rg@x": "utf-8; j\\x{F6}rg@x",
            "utf-8;jörg@x": "utf-8; j\\x{F6}rg@x",
            "rfc822;j+C3+B6rg@x": "utf-8; j\\x{F6}rg@x",
            "rfc822;a+0D+0AX:y@x": "utf-8; a\\x{0D}\\x{0A}X:y@x",
            "x400;/c=us/": "x400; /c=us/",
        }
        for orcpt, expected in cases.items():
            self.assertEqual(original_recipient_field(orcpt), expected, orcpt)
        self.assertIsNone(original_recipient_field("bob@example.org"))

    def test_envelope_id_field(self) -> None:
        """
        ENVID has its xtext undone, unless that gives something unprintable.
        """
        self.assertEqual(envelope_id_field("abc+2B+3D"), "abc+=")
        self.assertEqual(envelope_id_field("a+0D+0Ab"), "a+0D+0Ab")


@attrs.frozen
class _Envelope:
    queue_id: str
    received_at: float
    sender: str
    mail_parameters: Mapping[str, str | None]
    recipients: tuple[Recipient, ...]


class ErrorTests(DsnMixin, SynchronousTestCase):
    """
    Bad input and failures.
    """

    def test_result_validation(self) -> None:
        """
        Unknown actions, malformed statuses and statuses of the wrong class
        for the action are refused.
        """
        bad = [
            ("expanded", "2.0.0"),
            ("failed", "550"),
            ("failed", "5.1"),
            ("failed", "6.1.1"),
            ("failed", "2.0.0"),
            ("delayed", "5.1.1"),
            ("delivered", "4.0.0"),
            ("relayed", "5.0.0"),
        ]
        for action, status in bad:
            self.assertRaises(ValueError, RecipientReport, "a@b", action, status)
        RecipientReport("a@b", "failed", "4.4.7")

    def test_bad_reporting_mta(self) -> None:
        """
        A reporting MTA that is not a host name is refused.
        """
        for host in ("", "a b", "x\r\ny", "mdgw.example.net>"):
            self.assertRaises(ValueError, self.write, reporting_mta=host)

    def test_existing_file(self) -> None:
        """
        The report never overwrites an existing file.
        """
        path = self.tmp / "dsn1.eml"
        path.write_bytes(b"keep")
        self.assertRaises(FileExistsError, self.write)
        self.assertEqual(path.read_bytes(), b"keep")

    def test_failure_removes_file(self) -> None:
        """
        A failure while writing (here the file-size limit, as a full disk
        would) surfaces as C{OSError} and removes the half-written report.
        """
        if signal.getsignal(signal.SIGXFSZ) != signal.SIG_IGN:
            raise SkipTest("SIGXFSZ is not ignored; the limit would kill us")
        self.original.write_bytes(HEADERS + b"\r\n" + BODY * 100)
        envelope = make_envelope(mail_parameters={"RET": "FULL"})
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        try:
            error = self.assertRaises(OSError, self.write, envelope)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        self.assertEqual(error.errno, errno.EFBIG)
        self.assertFalse((self.tmp / "dsn1.eml").exists())

    def test_envelope_protocol(self) -> None:
        """
        Any object shaped like a spool envelope will do.
        """
        envelope = _Envelope(
            queue_id="Q1",
            received_at=ARRIVED,
            sender="alice@example.com",
            mail_parameters={},
            recipients=(Recipient("bob@example.org"),),
        )
        report, message, _ = self.write(envelope)
        self.assertEqual(status_blocks(message)[0]["X-Mdgateway-Queue-Id"], "Q1")
        self.assertEqual(report.returned, "full")
