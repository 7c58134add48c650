"""
Tests for L{mdgateway.message.marker} and L{mdgateway.message.digest}: the
HMAC processed marker, what it is bound to (the content digest, the rule
and the result), when it lets a message be relayed once more, and its
secret file.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.message.digest import (
    HEADER_LIMIT,
    ContentHasher,
    canonical_fields,
    content_digest,
)
from mdgateway.message.headers import format_field
from mdgateway.message.marker import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_SKEW,
    DEFAULT_RELAY_ONCE_MAX_AGE,
    FORGED,
    FUTURE,
    MALFORMED,
    MARKER_HEADER,
    OK,
    SECRET_SIZE,
    STALE,
    MarkerCheck,
    MarkerCount,
    SecretFileError,
    Stamp,
    _create_secret,
    actions_code,
    check_marker,
    load_or_create_secret,
    make_marker,
    read_markers,
    scan_markers,
)

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
NOW = 1_700_000_000.0
DIGEST = bytes(range(100, 132))
STAMP = Stamp("inbound mail", "core-main/Automatic", "block.cdr", "Allowed", False)


class TmpMixin:
    """
    A fresh directory from pytest's C{tmp_path} for each test.
    """

    @pytest.fixture(autouse=True)
    def _tmp_root(self, tmp_path: Path) -> None:
        self.tmp = tmp_path


def mint(
    message_id: str = "abc",
    now: float = NOW,
    *,
    secret: bytes = SECRET,
    digest: bytes = DIGEST,
    stamp: Stamp = STAMP,
) -> str:
    return make_marker(secret, message_id, now, digest, stamp)[1]


def check(
    value: str,
    now: float = NOW,
    *,
    max_age: float = DEFAULT_MAX_AGE,
    max_skew: float = DEFAULT_MAX_SKEW,
    digest: bytes | None = DIGEST,
) -> MarkerCheck:
    return check_marker(SECRET, value, now, max_age, max_skew, digest)


def params(value: str) -> dict[str, str]:
    """
    The C{key=value} parameters of a marker value.
    """
    return dict(part.split("=", 1) for part in value.split("; ")[1:])


def rebuild(value: str, **changes: str) -> str:
    """
    A marker value with some parameters replaced (the MAC kept).
    """
    message_id = value.split("; ")[0]
    items = params(value)
    items.update(changes)
    return "; ".join([message_id, *(f"{k}={v}" for k, v in items.items())])


def _message(*markers: str, body: bytes = b"Hello\r\n") -> bytes:
    head = b"".join(format_field(MARKER_HEADER, value) for value in markers)
    return (
        b"Received: from a by b; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        + head
        + b"From: a@example.com\r\nSubject: hi\r\n\r\n"
        + body
    )


def digest_of(data: bytes) -> bytes:
    hasher = ContentHasher()
    hasher.feed(data)
    digest = hasher.digest()
    assert digest is not None
    return digest


class MarkerTests(SynchronousTestCase):
    """
    L{make_marker} and L{check_marker}.
    """

    def test_round_trip(self) -> None:
        """
        A marker made with a secret checks valid with it for the same
        content digest, naming the id, the whole seconds of the time it was
        made and the stamp it vouches for, rule names and results with
        spaces, slashes and non-ASCII included.
        """
        stamp = Stamp(
            "Règle 1; strict",
            "core/File scan",
            "strip",
            "Blocked/Sensitive Data Found",
            True,
        )
        name, value = make_marker(
            SECRET, "01HABCDEF0123456789", NOW + 0.75, DIGEST, stamp
        )
        self.assertEqual(name, "X-MD-Email-Security-Id")
        self.assertTrue(value.isascii())
        result = check(value, NOW + 10)
        self.assertEqual(
            (result.valid, result.reason, result.message_id, result.time, result.stamp),
            (True, OK, "01HABCDEF0123456789", int(NOW), stamp),
        )

    def test_value_format(self) -> None:
        """
        The value is C{<id>; t=; r=; p=; a=; v=; s=; mac=} with the MAC a
        base64url HMAC-SHA256 of 43 characters without padding.
        """
        value = mint("msg-1@gw")
        self.assertEqual(value.split("; ")[0], "msg-1@gw")
        items = params(value)
        self.assertEqual(list(items), ["t", "r", "p", "a", "v", "s", "mac"])
        self.assertEqual(items["t"], str(int(NOW)))
        self.assertEqual(items["r"], "inbound%20mail")
        self.assertEqual(items["p"], "core-main/Automatic")
        self.assertEqual(
            (items["a"], items["v"], items["s"]), ("block.cdr", "Allowed", "0")
        )
        raw = base64.urlsafe_b64decode(items["mac"] + "=")
        self.assertEqual(len(raw), 32)
        self.assertNotIn("=", items["mac"])

    def test_folded_header(self) -> None:
        """
        The marker as a folded header field (as L{format_field} writes it)
        still checks valid once read back.
        """
        value = mint("A" * 60)
        field = format_field(MARKER_HEADER, value).decode("ascii")
        self.assertIn("\r\n ", field)
        folded = field.split(":", 1)[1].rstrip("\r\n")
        self.assertTrue(check(folded).valid)

    def test_forged(self) -> None:
        """
        A marker with a changed MAC, id, time, rule, profile, actions,
        result or sanitized flag, or made with another secret, or checked
        against other content (or no content digest at all), is invalid and
        reported as forged.
        """
        value = mint()
        mac = params(value)["mac"]
        flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
        variants = [
            rebuild(value, mac=flipped),
            "abd" + value[3:],
            rebuild(value, t=str(int(NOW) - 1)),
            rebuild(value, r="other"),
            rebuild(value, p="core-main/Other"),
            rebuild(value, a="deliver"),
            rebuild(value, v="Blocked/Infected"),
            rebuild(value, s="1"),
            mint(secret=OTHER),
        ]
        for variant in variants:
            result = check(variant)
            self.assertFalse(result.valid, variant)
            self.assertEqual(result.reason, FORGED, variant)
        for digest in (bytes(32), None):
            result = check(value, digest=digest)
            self.assertEqual((result.valid, result.reason), (False, FORGED))

    def test_empty_secret(self) -> None:
        """
        Nothing is valid under an empty secret, and none can be minted.
        """
        value = mint()
        self.assertEqual(check_marker(b"", value, NOW, digest=DIGEST).reason, FORGED)
        self.assertRaises(ValueError, make_marker, b"", "abc", NOW, DIGEST, STAMP)

    def test_stale(self) -> None:
        """
        A marker older than C{max_age} is stale; one exactly C{max_age} old
        is still valid.
        """
        value = mint()
        self.assertTrue(check(value, NOW + DEFAULT_MAX_AGE).valid)
        result = check(value, NOW + DEFAULT_MAX_AGE + 1)
        self.assertEqual((result.valid, result.reason), (False, STALE))
        result = check(value, NOW + 61, max_age=60)
        self.assertEqual((result.valid, result.reason), (False, STALE))

    def test_future(self) -> None:
        """
        A marker from further in the future than C{max_skew} is refused;
        within the skew (another instance's clock) it is valid.
        """
        value = mint()
        self.assertTrue(check(value, NOW - DEFAULT_MAX_SKEW).valid)
        result = check(value, NOW - DEFAULT_MAX_SKEW - 1)
        self.assertEqual((result.valid, result.reason), (False, FUTURE))
        result = check(value, NOW - 11, max_skew=10)
        self.assertEqual((result.valid, result.reason), (False, FUTURE))

    def test_malformed(self) -> None:
        """
        Values that are not markers (the first version's three-part form
        among them) are invalid with a reason starting C{malformed} and
        neither id nor time.
        """
        value = mint()
        mac = "mac=" + params(value)["mac"]
        t = f"t={int(NOW)}"
        rest = value.split("; ", 2)[2]
        variants = [
            "",
            "abc",
            "B5C0A7E2-3F5D-4C1A-9E2B-1234567890AB",
            f"abc; {t}; {mac}",
            f"abc; {t}",
            value + "; x=1",
            value + f"; {t}",
            f"abc; t=; {rest}",
            f"abc; t=-5; {rest}",
            f"abc; t=1e9; {rest}",
            rebuild(value, mac=""),
            rebuild(value, mac=params(value)["mac"] + "A"),
            rebuild(value, mac="+" * 43),
            rebuild(value, a="quarantine"),
            rebuild(value, a="block.cdr.x"),
            rebuild(value, s="2"),
            rebuild(value, r="%ff%fe"),
            "ab c" + value[3:],
            "abç" + value[3:],
            value[3:],
            "a" * 129 + value[3:],
        ]
        for variant in variants:
            result = check(variant)
            self.assertFalse(result.valid, variant)
            self.assertTrue(result.reason.startswith(MALFORMED + ": "), variant)
            self.assertIsNone(result.message_id)
            self.assertIsNone(result.time)

    def test_parameter_order_and_case(self) -> None:
        """
        Parameters may come in any order and key case: only their values
        are authenticated.
        """
        value = mint()
        message_id = value.split("; ")[0]
        items = params(value)
        swapped = (
            message_id
            + ";"
            + " ;".join(f"{k.upper()}={v}" for k, v in reversed(items.items()))
        )
        self.assertTrue(check(swapped).valid)

    def test_bad_ids_refused(self) -> None:
        """
        L{make_marker} refuses ids that could not be read back, and actions
        that are not an actions code.
        """
        for bad in ["", "a b", "a;b", "é", "a" * 129, "a\r\nb"]:
            self.assertRaises(ValueError, make_marker, SECRET, bad, NOW, DIGEST, STAMP)
        odd = Stamp("r", "p/q", "quarantine", "Allowed")
        self.assertRaises(ValueError, make_marker, SECRET, "a", NOW, DIGEST, odd)


class StampTests(SynchronousTestCase):
    """
    L{Stamp.permits} and L{actions_code}: which rule may relay a processed
    copy once more without a second scan.
    """

    def test_actions_code(self) -> None:
        """
        The actions code names the blocked action and the content flags.
        """
        self.assertEqual(actions_code("block", True, False), "block.cdr")
        self.assertEqual(actions_code("deliver", False, False), "deliver")
        self.assertEqual(actions_code("strip", True, True), "strip.cdr.smime")
        self.assertRaises(ValueError, actions_code, "other", False, False)

    def test_same_or_laxer(self) -> None:
        """
        A copy a rule processed may pass a rule with the same Core profile
        and the same or laxer actions: a blocked action no stricter (block
        > strip > deliver), and neither Deep CDR nor S/MIME modification
        that the first rule did not apply.
        """
        done = Stamp("a", "core/Automatic", "strip.cdr", "Allowed")
        allowed = ["strip.cdr", "strip", "deliver.cdr", "deliver"]
        refused = ["block.cdr", "block", "strip.cdr.smime", "strip.smime"]
        for actions in allowed:
            now = Stamp("b", "core/Automatic", actions, "")
            self.assertTrue(done.permits(now), actions)
        for actions in refused:
            now = Stamp("b", "core/Automatic", actions, "")
            self.assertFalse(done.permits(now), actions)

    def test_other_profile(self) -> None:
        """
        Another Core profile, or the same profile with another Core rule
        (workflow), never lets a copy pass unscanned.
        """
        done = Stamp("a", "core/Automatic", "block.cdr", "Allowed")
        for profile in ("other/Automatic", "core/File scan"):
            self.assertFalse(done.permits(Stamp("a", profile, "block.cdr", "")))

    def test_only_scanned_results(self) -> None:
        """
        Only a copy whose content Core scanned (Allowed, or Blocked content
        delivered or stripped as the rule said) may pass; one bypassed,
        skipped, failed, an original copy or a notification may not.
        """
        now = Stamp("a", "core/Automatic", "deliver", "")
        for result in ("Allowed", "Blocked/Infected"):
            self.assertTrue(
                Stamp("a", "core/Automatic", "deliver", result).permits(now)
            )
        for result in (
            "Bypassed/core_unreachable",
            "Skipped/AlreadyProcessed",
            "Failed/not_scanned",
            "OriginalCopy/Blocked/Infected",
            "Notification",
            "Generated",
        ):
            done = Stamp("a", "core/Automatic", "deliver", result)
            self.assertFalse(done.permits(now), result)


class ScanTests(SynchronousTestCase):
    """
    L{scan_markers} counts valid markers in a message's header block, and
    L{MarkerCount.relay_once} decides the relay-once pass.
    """

    def scan(self, data: bytes, limit: int = HEADER_LIMIT) -> MarkerCount:
        return scan_markers(io.BytesIO(data), SECRET, NOW, limit=limit, digest=DIGEST)

    def test_counts(self) -> None:
        """
        A new message has no valid marker; one processed once has one
        (relay it); one that came back again has two (a loop); a forged
        marker beside them adds nothing.
        """
        first = mint("id1", NOW - 100)
        second = mint("id2", NOW - 10)
        forged = mint("id3", secret=OTHER)
        cases = [
            ((), 0, False, False),
            ((first,), 1, True, False),
            ((second, first), 2, True, True),
            ((forged,), 0, False, False),
            ((forged, first), 1, True, False),
            ((first, forged, second), 2, True, True),
        ]
        for markers, valid, processed, looped in cases:
            count = self.scan(_message(*markers))
            self.assertEqual(count.valid, valid, markers)
            self.assertEqual(count.processed, processed)
            self.assertEqual(count.looped, looped)
            self.assertEqual(len(count.checks), len(markers))
            self.assertTrue(count.complete)

    def test_relay_once(self) -> None:
        """
        The relay-once pass needs exactly one valid marker, no older than
        its own (short) maximum age, whose stamp permits the current rule.
        """
        current = Stamp("inbound mail", "core-main/Automatic", "block.cdr", "")
        fresh = mint("id1", NOW - 100)
        count = self.scan(_message(fresh))
        found = count.relay_once(current, NOW)
        assert found is not None
        self.assertEqual(found.message_id, "id1")
        self.assertIsNone(count.relay_once(current, NOW, max_age=99))
        self.assertIsNone(self.scan(_message(mint("id1"))).relay_once(current, NOW, 0))
        old = mint("id1", NOW - DEFAULT_RELAY_ONCE_MAX_AGE - 1)
        old_count = self.scan(_message(old))
        self.assertEqual(old_count.valid, 1)
        self.assertIsNone(old_count.relay_once(current, NOW))
        stricter = Stamp("other rule", "core-main/Automatic", "block.cdr.smime", "")
        self.assertIsNone(count.relay_once(stricter, NOW))
        twice = self.scan(_message(mint("id2", NOW - 10), fresh))
        self.assertIsNone(twice.relay_once(current, NOW))
        self.assertIsNone(self.scan(_message()).relay_once(current, NOW))

    def test_invalid_reported(self) -> None:
        """
        Forged, stale and malformed markers are listed with their reasons
        and count for nothing.
        """
        markers = (
            mint("f", secret=OTHER),
            mint("s", NOW - DEFAULT_MAX_AGE - 5),
            "garbage",
            mint("ok"),
        )
        count = self.scan(_message(*markers))
        self.assertEqual(count.valid, 1)
        reasons = [c.reason for c in count.invalid]
        self.assertEqual(reasons[:2], [FORGED, STALE])
        self.assertTrue(reasons[2].startswith(MALFORMED))
        self.assertEqual(len(reasons), 3)

    def test_copied_marker_counts_once(self) -> None:
        """
        The same marker field twice (copied) is one pass, not a loop.
        """
        value = mint("id1")
        count = self.scan(_message(value, value))
        self.assertEqual(count.valid, 1)
        self.assertEqual(len(count.checks), 2)
        self.assertEqual(len(count.valid_checks), 1)

    def test_top_level_only(self) -> None:
        """
        Marker lines in the body, or in the headers of an attached message,
        are not markers of this message.
        """
        value = mint("id1")
        body = (
            format_field(MARKER_HEADER, value)
            + b"\r\n"
            + b"--b\r\nContent-Type: message/rfc822\r\n\r\n"
            + format_field(MARKER_HEADER, value)
        )
        self.assertEqual(self.scan(_message(body=body)).valid, 0)

    def test_name_case_insensitive(self) -> None:
        """
        Header names are matched without regard to case.
        """
        value = mint("id1")
        data = b"x-md-EMAIL-security-id: " + value.encode() + b"\r\n\r\nbody\r\n"
        self.assertEqual(self.scan(data).valid, 1)

    def test_headers_only_message(self) -> None:
        """
        A message without a body (no blank line) is all header block.
        """
        data = b"Subject: x\r\n" + format_field(MARKER_HEADER, mint("id1"))
        count = self.scan(data)
        self.assertEqual((count.valid, count.complete), (1, True))

    def test_bounded_read(self) -> None:
        """
        Only C{limit} bytes are read: a marker beyond the limit is not
        seen, and the count says the header block was not complete.
        """
        filler = b"".join(b"X-Filler: %05d\r\n" % i for i in range(100))
        data = filler + format_field(MARKER_HEADER, mint("id1")) + b"\r\nbody\r\n"
        source = io.BytesIO(data)
        count = scan_markers(source, SECRET, NOW, limit=len(filler) + 10, digest=DIGEST)
        self.assertEqual((count.valid, count.complete), (0, False))
        self.assertLessEqual(source.tell(), len(filler) + 14)
        count = self.scan(data, limit=len(data))
        self.assertEqual((count.valid, count.complete), (1, True))

    def test_eight_bit_headers(self) -> None:
        """
        Raw 8-bit bytes elsewhere in the header block do not hide a marker.
        """
        data = (
            "Subject: grüße\r\n".encode()
            + format_field(MARKER_HEADER, mint("id1"))
            + b"\r\nbody\r\n"
        )
        self.assertEqual(self.scan(data).valid, 1)

    def test_read_markers_file(self) -> None:
        """
        L{read_markers} reads a spooled message file by its path and binds
        the check to that file's content: a marker made for this content is
        valid, the same marker on another body counts for nothing.
        """
        path = self.mktemp()
        digest = digest_of(_message("x"))
        value = mint("id1", digest=digest)
        with open(path, "wb") as f:
            f.write(_message(value))
        self.assertEqual(content_digest(path), digest)
        self.assertEqual(read_markers(path, SECRET, NOW).valid, 1)
        with open(path, "wb") as f:
            f.write(_message(value, body=b"other\r\n"))
        result = read_markers(path, SECRET, NOW)
        self.assertEqual(result.valid, 0)
        self.assertEqual(result.checks[0].reason, "forged")


STRUCTURE = (
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed;\r\n boundary="=_b 1"\r\n'
    b"Content-Transfer-Encoding: 7bit\r\n"
)


def _mime_message(fields: bytes, body: bytes = b"--=_b 1--\r\n") -> bytes:
    return (
        b"Received: from a by b; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        b"From: a@example.com\r\n" + fields + b"Subject: hi\r\n\r\n" + body
    )


class DigestTests(SynchronousTestCase):
    """
    L{mdgateway.message.digest}: what the content digest covers.
    """

    def test_body_and_structure_bound(self) -> None:
        """
        Changing the body, or any top-level MIME field in a way a parser
        could read differently (type, a parameter, the boundary's case or
        inner spaces, the transfer encoding, the disposition, MIME-Version,
        a field added or removed, a duplicate), changes the digest; so does
        a line that is not a field.
        """
        base = digest_of(_mime_message(STRUCTURE))
        changed = [
            _mime_message(STRUCTURE, b"--=_b 1--\r\nx\r\n"),
            _mime_message(
                STRUCTURE.replace(b"multipart/mixed", b"application/octet-stream")
            ),
            _mime_message(STRUCTURE.replace(b'"=_b 1"', b'"=_B 1"')),
            _mime_message(STRUCTURE.replace(b'"=_b 1"', b'"=_b  1"')),
            _mime_message(STRUCTURE.replace(b"7bit", b"base64")),
            _mime_message(STRUCTURE.replace(b"1.0", b"1.1")),
            _mime_message(
                STRUCTURE + b"Content-Disposition: attachment; filename=a.exe\r\n"
            ),
            _mime_message(STRUCTURE + b"Content-Type: text/plain\r\n"),
            _mime_message(STRUCTURE.replace(b"MIME-Version: 1.0\r\n", b"")),
            _mime_message(STRUCTURE + b"not a field\r\n"),
        ]
        for data in changed:
            self.assertNotEqual(digest_of(data), base, data)

    def test_hop_changes_ignored(self) -> None:
        """
        What hops legitimately do keeps the digest: adding Received, ARC,
        DKIM, Authentication-Results and X-MS-* fields (and our own), and
        folding the MIME fields anew (or not at all), with spaces or tabs.
        """
        base = digest_of(_mime_message(STRUCTURE))
        hops = (
            b"Received: from x by y; Tue, 14 Nov 2023 22:13:21 +0000\r\n"
            b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=example.com\r\n"
            b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com;\r\n b=abc\r\n"
            b"Authentication-Results: mx.example.com; spf=pass\r\n"
            b"X-MS-Exchange-Organization-SCL: 1\r\n"
            b"X-MD-Email-Security-Id: x\r\n"
        )
        same = [
            hops + _mime_message(STRUCTURE),
            _mime_message(hops + STRUCTURE),
            _mime_message(STRUCTURE.replace(b";\r\n boundary", b"; boundary")),
            _mime_message(STRUCTURE.replace(b";\r\n boundary", b";\r\n\t  boundary")),
            _mime_message(STRUCTURE.replace(b"Type: multipart", b"Type:  multipart")),
            _mime_message(STRUCTURE.replace(b"Version: 1.0", b"Version:1.0   ")),
        ]
        for data in same:
            self.assertEqual(digest_of(data), base, data)

    def test_canonical_fields(self) -> None:
        """
        The canonical form keeps quoted strings exact and collapses spaces
        outside them; items are length-prefixed.
        """
        block = b'Content-Type: a/b;\r\n\tx="1  2";  y=3\r\nFrom: z\r\n'
        self.assertEqual(canonical_fields(block), b'31:content-type:a/b; x="1  2"; y=3')

    @given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
    def test_pieces(self, body: bytes, size: int) -> None:
        """
        The digest is the same however the message is cut into pieces, and
        equals the digest of the file.
        """
        message = _mime_message(STRUCTURE, body)
        hasher = ContentHasher()
        for start in range(0, len(message), size):
            hasher.feed(message[start : start + size])
        self.assertEqual(hasher.digest(), digest_of(message))

    def test_too_large(self) -> None:
        """
        A header block larger than the limit has no digest (so no marker on
        it is ever valid); the header block is then not kept either.
        """
        hasher = ContentHasher(limit=100)
        hasher.feed(b"X-A: " + b"a" * 200 + b"\r\n\r\nbody")
        self.assertIsNone(hasher.digest())
        self.assertEqual(hasher.header(), b"")

    def test_no_header_fields(self) -> None:
        """
        A message that starts with its blank line, and one without any, both
        have a digest; what is kept of the header block is what precedes
        the blank line (its MIME and marker fields).
        """
        hasher = ContentHasher()
        hasher.feed(b"\r\nbody\r\n")
        self.assertEqual(hasher.header(), b"")
        self.assertIsNotNone(hasher.digest())
        hasher = ContentHasher()
        hasher.feed(b"Subject: x\r\nMIME-Version: 1.0")
        self.assertEqual(hasher.header(), b"MIME-Version: 1.0\r\n")
        self.assertIsNotNone(hasher.digest())

    def test_keeps_only_what_it_needs(self) -> None:
        """
        Of the header block the hasher keeps the MIME fields, the marker
        fields and lines that are not fields (with their continuation
        lines), nothing else: memory stays small whatever the sender's other
        fields weigh, and the digest equals one computed independently from
        the whole block.
        """
        block = (
            b"Received: from a\r\n by b\r\n"
            + b"X-Big: "
            + b"x" * 100_000
            + b"\r\n"
            + b"X-MD-Email-Security-Id: m;\r\n t=1\r\n"
            + b"Content-Type: multipart/mixed;\r\n\tboundary=b\r\n"
            + b"junk line\r\n continued\r\n"
            + b"MIME-Version: 1.0\r\n"
        )
        body = b"--b\r\n\r\nx\r\n--b--\r\n"
        hasher = ContentHasher()
        for start in range(0, len(block) + 2 + len(body), 4096):
            hasher.feed((block + b"\r\n" + body)[start : start + 4096])
        self.assertEqual(
            hasher.header(),
            b"X-MD-Email-Security-Id: m;\r\n t=1\r\n"
            b"Content-Type: multipart/mixed;\r\n\tboundary=b\r\n"
            b"junk line\r\n continued\r\n"
            b"MIME-Version: 1.0\r\n",
        )
        fields = canonical_fields(block)
        expected = hashlib.sha256(
            b"mdgateway-content-v2\x00"
            + b"%d:" % len(fields)
            + fields
            + hashlib.sha256(body).digest()
        ).digest()
        self.assertEqual(hasher.digest(), expected)


class SecretTests(TmpMixin, SynchronousTestCase):
    """
    L{load_or_create_secret}.
    """

    def test_created_once(self) -> None:
        """
        The first call creates 32 random bytes with mode 0600 (and missing
        folders with 0700); later calls return the same bytes.
        """
        path = self.tmp / "keys" / "marker.key"
        secret = load_or_create_secret(str(path))
        self.assertEqual(len(secret), SECRET_SIZE)
        self.assertEqual(path.read_bytes(), secret)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(path.parent.stat().st_mode), 0o700)
        self.assertEqual(load_or_create_secret(str(path)), secret)
        self.assertEqual(os.listdir(path.parent), ["marker.key"])

    def test_mode_despite_umask(self) -> None:
        """
        The file is 0600 even under a umask that would take bits away.
        """
        old = os.umask(0o277)
        try:
            path = self.tmp / "marker.key"
            load_or_create_secret(str(path))
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)

    def test_distinct_files(self) -> None:
        """
        Two clusters (two files) get different secrets.
        """
        a = load_or_create_secret(str(self.tmp / "a.key"))
        b = load_or_create_secret(str(self.tmp / "b.key"))
        self.assertNotEqual(a, b)

    def test_operator_file_used_whole(self) -> None:
        """
        A file an operator provides (any 32 to 4096 bytes, private) is the
        key as it is.
        """
        path = self.tmp / "marker.key"
        path.write_bytes(b"k" * 50)
        path.chmod(0o640)
        self.assertEqual(load_or_create_secret(str(path)), b"k" * 50)

    def test_losing_the_race(self) -> None:
        """
        Creating a secret where one has just appeared leaves the first one
        in place and no temporary file behind.
        """
        path = self.tmp / "marker.key"
        first = load_or_create_secret(str(path))
        _create_secret(str(path))
        self.assertEqual(path.read_bytes(), first)
        self.assertEqual(os.listdir(self.tmp), ["marker.key"])

    def test_thread_race(self) -> None:
        """
        Many threads starting at once all end up with one and the same
        secret, and only the one file exists.
        """
        path = str(self.tmp / "marker.key")
        count = 16
        barrier = threading.Barrier(count)
        results: list[bytes] = []
        errors: list[BaseException] = []

        def run() -> None:
            barrier.wait()
            try:
                results.append(load_or_create_secret(path))
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=run) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(errors, [])
        self.assertEqual(len(results), count)
        self.assertEqual(len(set(results)), 1)
        self.assertEqual(os.listdir(self.tmp), ["marker.key"])

    @pytest.mark.timeout(60)
    def test_process_race(self) -> None:
        """
        Processes starting at once (instances of a cluster on a shared
        folder) all end up with the same secret.
        """
        path = str(self.tmp / "shared" / "marker.key")
        code = (
            "import sys, time\n"
            "from mdgateway.message.marker import load_or_create_secret\n"
            "while time.time() < float(sys.argv[2]): pass\n"
            "print(load_or_create_secret(sys.argv[1]).hex())\n"
        )
        start = str(time.time() + 1.0)
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", code, path, start],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(4)
        ]
        outputs = []
        for process in processes:
            out, err = process.communicate(timeout=50)
            self.assertEqual(process.returncode, 0, err)
            outputs.append(out.strip())
        self.assertEqual(len(set(outputs)), 1)
        self.assertEqual(bytes.fromhex(outputs[0].decode()), Path(path).read_bytes())
        self.assertEqual(os.listdir(Path(path).parent), ["marker.key"])

    def test_open_to_others_refused(self) -> None:
        """
        A secret file that other users can read or anyone but the owner can
        write is refused: it would let them forge markers.
        """
        path = self.tmp / "marker.key"
        path.write_bytes(b"k" * 32)
        for mode in (0o644, 0o604, 0o620, 0o602):
            path.chmod(mode)
            self.assertRaises(SecretFileError, load_or_create_secret, str(path))

    def test_bad_sizes_refused(self) -> None:
        """
        A file shorter than 32 bytes (after waiting for a writer that never
        finishes) or longer than 4096 bytes is refused.
        """
        path = self.tmp / "marker.key"
        waits: list[float] = []
        path.write_bytes(b"k" * 31)
        path.chmod(0o600)
        error = self.assertRaises(
            SecretFileError,
            load_or_create_secret,
            str(path),
            sleep=waits.append,
        )
        self.assertIn("31 bytes", str(error))
        self.assertTrue(waits)
        path.write_bytes(b"k" * 4097)
        self.assertRaises(SecretFileError, load_or_create_secret, str(path))

    def test_short_file_completed(self) -> None:
        """
        A file another instance is still writing (no hard links on its
        file system) is read again once complete.
        """
        path = self.tmp / "marker.key"
        path.write_bytes(b"k" * 10)
        path.chmod(0o600)

        def finish(seconds: float) -> None:
            path.write_bytes(b"k" * 32)

        self.assertEqual(load_or_create_secret(str(path), sleep=finish), b"k" * 32)

    def test_not_regular_file(self) -> None:
        """
        A directory in the secret's place is refused.
        """
        path = self.tmp / "marker.key"
        path.mkdir(mode=0o700)
        self.assertRaises(SecretFileError, load_or_create_secret, str(path))
