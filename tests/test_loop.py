"""
Tests for L{mdgateway.message.marker}: the HMAC processed marker and its secret file.
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
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.message.headers import format_field
from mdgateway.message.marker import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_SKEW,
    FORGED,
    FUTURE,
    MALFORMED,
    MARKER_HEADER,
    OK,
    SECRET_SIZE,
    STALE,
    BodyHasher,
    MarkerCheck,
    SecretFileError,
    _create_secret,
    body_digest,
    check_marker,
    load_or_create_secret,
    make_marker,
    read_markers,
    scan_markers,
)

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
NOW = 1_700_000_000.0


class TmpMixin:
    """
    A fresh directory from pytest's C{tmp_path} for each test.
    """

    @pytest.fixture(autouse=True)
    def _tmp_root(self, tmp_path: Path) -> None:
        self.tmp = tmp_path


def _message(*markers: str, body: bytes = b"Hello\r\n") -> bytes:
    head = b"".join(format_field(MARKER_HEADER, value) for value in markers)
    return (
        b"Received: from a by b; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        + head
        + b"From: a@example.com\r\nSubject: hi\r\n\r\n"
        + body
    )


class MarkerTests(SynchronousTestCase):
    """
    L{make_marker} and L{check_marker}.
    """

    def test_round_trip(self) -> None:
        """
        A marker made with a secret checks valid with it, naming the id and
        the whole seconds of the time it was made.
        """
        name, value = make_marker(SECRET, "01HABCDEF0123456789", NOW + 0.75)
        self.assertEqual(name, "X-MD-Email-Security-Id")
        self.assertEqual(
            check_marker(SECRET, value, NOW + 10),
            MarkerCheck(True, OK, "01HABCDEF0123456789", int(NOW)),
        )

    def test_value_format(self) -> None:
        """
        The value is C{<id>; t=<unix time>; mac=<base64url HMAC-SHA256>},
        the MAC 43 characters without padding.
        """
        _, value = make_marker(SECRET, "msg-1@gw", NOW)
        message_id, t, mac = value.split("; ")
        self.assertEqual(message_id, "msg-1@gw")
        self.assertEqual(t, f"t={int(NOW)}")
        self.assertTrue(mac.startswith("mac="))
        raw = base64.urlsafe_b64decode(mac[4:] + "=")
        self.assertEqual(len(raw), 32)
        self.assertNotIn("=", mac[4:])

    def test_folded_header(self) -> None:
        """
        The marker as a folded header field (as L{format_field} writes it)
        still checks valid once read back.
        """
        _, value = make_marker(SECRET, "A" * 60, NOW)
        field = format_field(MARKER_HEADER, value).decode("ascii")
        self.assertIn("\r\n ", field)
        folded = field.split(":", 1)[1].rstrip("\r\n")
        self.assertTrue(check_marker(SECRET, folded, NOW).valid)

    def test_forged(self) -> None:
        """
        A marker with a changed MAC, id or time, or made with another
        secret, is invalid and reported as forged.
        """
        _, value = make_marker(SECRET, "abc", NOW)
        message_id, t, mac = value.split("; ")
        flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
        variants = [
            f"{message_id}; {t}; {flipped}",
            f"abd; {t}; {mac}",
            f"{message_id}; t={int(NOW) - 1}; {mac}",
            make_marker(OTHER, "abc", NOW)[1],
        ]
        for variant in variants:
            check = check_marker(SECRET, variant, NOW)
            self.assertFalse(check.valid, variant)
            self.assertEqual(check.reason, FORGED, variant)

    def test_empty_secret(self) -> None:
        """
        Nothing is valid under an empty secret, and none can be minted.
        """
        _, value = make_marker(SECRET, "abc", NOW)
        self.assertEqual(check_marker(b"", value, NOW).reason, FORGED)
        self.assertRaises(ValueError, make_marker, b"", "abc", NOW)

    def test_stale(self) -> None:
        """
        A marker older than C{max_age} is stale; one exactly C{max_age} old
        is still valid.
        """
        _, value = make_marker(SECRET, "abc", NOW)
        self.assertTrue(check_marker(SECRET, value, NOW + DEFAULT_MAX_AGE).valid)
        check = check_marker(SECRET, value, NOW + DEFAULT_MAX_AGE + 1)
        self.assertEqual((check.valid, check.reason), (False, STALE))
        check = check_marker(SECRET, value, NOW + 61, max_age=60)
        self.assertEqual((check.valid, check.reason), (False, STALE))

    def test_future(self) -> None:
        """
        A marker from further in the future than C{max_skew} is refused;
        within the skew (another instance's clock) it is valid.
        """
        _, value = make_marker(SECRET, "abc", NOW)
        self.assertTrue(check_marker(SECRET, value, NOW - DEFAULT_MAX_SKEW).valid)
        check = check_marker(SECRET, value, NOW - DEFAULT_MAX_SKEW - 1)
        self.assertEqual((check.valid, check.reason), (False, FUTURE))
        check = check_marker(SECRET, value, NOW - 11, max_skew=10)
        self.assertEqual((check.valid, check.reason), (False, FUTURE))

    def test_malformed(self) -> None:
        """
        Values that are not markers are invalid with a reason starting
        C{malformed} and neither id nor time.
        """
        _, value = make_marker(SECRET, "abc", NOW)
        _, t, mac = value.split("; ")
        variants = [
            "",
            "abc",
            "B5C0A7E2-3F5D-4C1A-9E2B-1234567890AB",
            f"abc; {t}",
            f"abc; {t}; {mac}; x=1",
            f"abc; {t}; {t}",
            f"abc; {mac}; {mac}",
            f"abc; t=; {mac}",
            f"abc; t=-5; {mac}",
            f"abc; t=1e9; {mac}",
            f"abc; {t}; mac=",
            f"abc; {t}; {mac}A",
            f"abc; {t}; {mac[:-1]}!",
            f"abc; {t}; mac={'+' * 43}",
            f"ab c; {t}; {mac}",
            f"abç; {t}; {mac}",
            f"; {t}; {mac}",
            f"{'a' * 129}; {t}; {mac}",
            f"abc; t {int(NOW)}; {mac}",
            f"abc; T={int(NOW)}; MAC={mac[4:]}x",
        ]
        for variant in variants:
            check = check_marker(SECRET, variant, NOW)
            self.assertFalse(check.valid, variant)
            self.assertTrue(check.reason.startswith(MALFORMED + ": "), variant)
            self.assertIsNone(check.message_id)
            self.assertIsNone(check.time)

    def test_parameter_order_and_case(self) -> None:
        """
        Parameters may come in either order and any case: only their
        values are authenticated.
        """
        _, value = make_marker(SECRET, "abc", NOW)
        message_id, t, mac = value.split("; ")
        swapped = f"{message_id};MAC={mac[4:]} ;T={t[2:]}"
        self.assertTrue(check_marker(SECRET, swapped, NOW).valid)

    def test_bad_ids_refused(self) -> None:
        """
        L{make_marker} refuses ids that could not be read back.
        """
        for bad in ["", "a b", "a;b", "é", "a" * 129, "a\r\nb"]:
            self.assertRaises(ValueError, make_marker, SECRET, bad, NOW)


class ScanTests(SynchronousTestCase):
    """
    L{scan_markers} counts valid markers in a message's header block.
    """

    def scan(self, data: bytes, **kw: object) -> object:
        return scan_markers(io.BytesIO(data), SECRET, NOW, **kw)  # type: ignore[arg-type]

    def test_counts(self) -> None:
        """
        A new message has no valid marker; one processed once has one
        (relay it); one that came back again has two (a loop); a forged
        marker beside them adds nothing.
        """
        first = make_marker(SECRET, "id1", NOW - 100)[1]
        second = make_marker(SECRET, "id2", NOW - 10)[1]
        forged = make_marker(OTHER, "id3", NOW)[1]
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

    def test_invalid_reported(self) -> None:
        """
        Forged, stale and malformed markers are listed with their reasons
        and count for nothing.
        """
        markers = (
            make_marker(OTHER, "f", NOW)[1],
            make_marker(SECRET, "s", NOW - DEFAULT_MAX_AGE - 5)[1],
            "garbage",
            make_marker(SECRET, "ok", NOW)[1],
        )
        count = self.scan(_message(*markers))
        self.assertEqual(count.valid, 1)
        reasons = [check.reason for check in count.invalid]
        self.assertEqual(reasons[:2], [FORGED, STALE])
        self.assertTrue(reasons[2].startswith(MALFORMED))
        self.assertEqual(len(reasons), 3)

    def test_copied_marker_counts_once(self) -> None:
        """
        The same marker field twice (copied) is one pass, not a loop.
        """
        value = make_marker(SECRET, "id1", NOW)[1]
        count = self.scan(_message(value, value))
        self.assertEqual(count.valid, 1)
        self.assertEqual(len(count.checks), 2)

    def test_top_level_only(self) -> None:
        """
        Marker lines in the body, or in the headers of an attached message,
        are not markers of this message.
        """
        value = make_marker(SECRET, "id1", NOW)[1]
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
        value = make_marker(SECRET, "id1", NOW)[1]
        data = b"x-md-EMAIL-security-id: " + value.encode() + b"\r\n\r\nbody\r\n"
        self.assertEqual(self.scan(data).valid, 1)

    def test_headers_only_message(self) -> None:
        """
        A message without a body (no blank line) is all header block.
        """
        value = make_marker(SECRET, "id1", NOW)[1]
        data = b"Subject: x\r\n" + format_field(MARKER_HEADER, value)
        count = self.scan(data)
        self.assertEqual((count.valid, count.complete), (1, True))

    def test_bounded_read(self) -> None:
        """
        Only C{limit} bytes are read: a marker beyond the limit is not
        seen, and the count says the header block was not complete.
        """
        value = make_marker(SECRET, "id1", NOW)[1]
        filler = b"".join(b"X-Filler: %05d\r\n" % i for i in range(100))
        data = filler + format_field(MARKER_HEADER, value) + b"\r\nbody\r\n"
        source = io.BytesIO(data)
        count = scan_markers(source, SECRET, NOW, limit=len(filler) + 10)
        self.assertEqual((count.valid, count.complete), (0, False))
        self.assertLessEqual(source.tell(), len(filler) + 14)
        count = self.scan(data, limit=len(data))
        self.assertEqual((count.valid, count.complete), (1, True))

    def test_eight_bit_headers(self) -> None:
        """
        Raw 8-bit bytes elsewhere in the header block do not hide a marker.
        """
        value = make_marker(SECRET, "id1", NOW)[1]
        data = (
            "Subject: grüße\r\n".encode()
            + format_field(MARKER_HEADER, value)
            + b"\r\nbody\r\n"
        )
        self.assertEqual(self.scan(data).valid, 1)

    def test_read_markers_file(self) -> None:
        """
        L{read_markers} reads a spooled message file by its path and binds
        the check to that file's body: a marker made for this body is
        valid, the same marker on another body counts for nothing.
        """
        path = self.mktemp()
        body_of = _message("x").split(b"\r\n\r\n", 1)[1]
        digest = hashlib.sha256(body_of).digest()
        value = make_marker(SECRET, "id1", NOW, digest)[1]
        with open(path, "wb") as f:
            f.write(_message(value))
        self.assertEqual(body_digest(path), digest)
        self.assertEqual(read_markers(path, SECRET, NOW).valid, 1)
        copied = make_marker(SECRET, "id1", NOW, hashlib.sha256(b"other").digest())[1]
        with open(path, "wb") as f:
            f.write(_message(copied))
        result = read_markers(path, SECRET, NOW)
        self.assertEqual(result.valid, 0)
        self.assertEqual(result.checks[0].reason, "forged")

    def test_body_hasher_pieces(self) -> None:
        """
        The body digest is the same however the message is cut into pieces,
        and covers only what follows the first blank line.
        """
        message = b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore\r\n"
        expected = hashlib.sha256(b"body\r\n\r\nmore\r\n").digest()
        for size in range(1, len(message) + 1):
            hasher = BodyHasher()
            for start in range(0, len(message), size):
                hasher.feed(message[start : start + size])
            self.assertEqual(hasher.digest(), expected, size)


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
