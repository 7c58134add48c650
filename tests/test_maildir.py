"""
Tests for L{mdgateway.relay.maildir}: the C{maildir:} relay server type.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mdgateway.fileops import IFileOps
from mdgateway.relay.maildir import (
    ENVELOPE_TO,
    MaildirError,
    deliver,
    envelope_header,
    unique_name,
)
from mdgateway.testing.disk import WatchedFileOps

NOW = 1_700_000_000.125
MESSAGE = b"".join(
    b"Line %05d of the message body, with some text to copy.\r\n" % i
    for i in range(5000)
)


class MaildirMixin:
    """
    A spooled message file and a target folder under pytest's C{tmp_path}.
    """

    @pytest.fixture(autouse=True)
    def _tmp_root(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.folder = tmp_path / "delivered"
        self.message = tmp_path / "spooled.eml"
        self.message.write_bytes(MESSAGE)

    def deliver(self, **kw: Any) -> str:
        kw.setdefault("sender", "sender@example.com")
        kw.setdefault("recipients", ["rcpt@example.org"])
        kw.setdefault("now", NOW)
        kw.setdefault("hostname", "gw1.example.net")
        return deliver(str(self.folder), str(self.message), **kw)

    def listing(self, sub: str) -> list[str]:
        return sorted(os.listdir(self.folder / sub))


class FakeTests(SynchronousTestCase):
    """
    The test fakes are faithful.
    """

    def test_fileops(self) -> None:
        """
        The watching file operations provide L{IFileOps}.
        """
        verifyObject(IFileOps, WatchedFileOps())


class DeliverTests(MaildirMixin, SynchronousTestCase):
    """
    L{deliver} writes one file per message, atomically.
    """

    def test_content(self) -> None:
        """
        The file holds the envelope lines, the prefix and the spooled file
        from the offset, byte for byte.
        """
        prefix = b"X-MD-Email-Security-Id: abc; t=1; mac=x\r\n"
        offset = 1234
        path = self.deliver(
            recipients=["a@example.org", "b@example.org"],
            prefix=prefix,
            offset=offset,
        )
        expected = (
            b"Return-Path: <sender@example.com>\r\n"
            b"X-Mdgateway-Envelope-To: <a@example.org>\r\n"
            b"X-Mdgateway-Envelope-To: <b@example.org>\r\n" + prefix + MESSAGE[offset:]
        )
        self.assertEqual(Path(path).read_bytes(), expected)

    def test_layout(self) -> None:
        """
        The file lands in C{new/} with a C{.eml} name; C{tmp/} is left
        empty; C{tmp/}, C{new/} and C{cur/} exist with mode 0700 and the
        file has mode 0600.
        """
        path = Path(self.deliver())
        self.assertEqual(path.parent, self.folder / "new")
        self.assertTrue(path.name.endswith(".eml"))
        self.assertEqual(self.listing("new"), [path.name])
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("cur"), [])
        for sub in ("tmp", "new", "cur"):
            mode = stat.S_IMODE((self.folder / sub).stat().st_mode)
            self.assertEqual(mode, 0o700)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)

    def test_whole_file_default(self) -> None:
        """
        Without prefix or offset, the whole message follows the envelope.
        """
        path = self.deliver()
        data = Path(path).read_bytes()
        self.assertTrue(data.endswith(MESSAGE))
        self.assertEqual(
            len(data),
            len(envelope_header("sender@example.com", ["rcpt@example.org"]))
            + len(MESSAGE),
        )

    def test_envelope_header(self) -> None:
        """
        The null sender is C{<>}; internationalised addresses are kept as
        UTF-8.
        """
        self.assertEqual(
            envelope_header("", ["jörg@exämple.de"]),
            "Return-Path: <>\r\n"
            "X-Mdgateway-Envelope-To: <jörg@exämple.de>\r\n".encode(),
        )
        self.assertEqual(ENVELOPE_TO, "X-Mdgateway-Envelope-To")

    def test_header_injection_refused(self) -> None:
        """
        An address with CR or LF (or other controls) is refused before
        anything is written.
        """
        for bad in ("a@b\r\nBcc: x@y", "a\x00@b", "a@b\x7f"):
            self.assertRaises(ValueError, self.deliver, recipients=[bad])
            self.assertRaises(ValueError, self.deliver, sender=bad)
        self.assertFalse(self.folder.exists())

    def test_atomic(self) -> None:
        """
        Nothing appears in C{new/} until the file is complete and fsynced;
        the order is write, fsync, close, link into C{new/}, fsync of
        C{new/}.
        """
        ops = WatchedFileOps()
        seen: list[list[str]] = []
        ops.on_write = lambda: seen.append(self.listing("new"))
        path = self.deliver(fileops=ops)
        self.assertTrue(seen)
        self.assertEqual(seen, [[]] * len(seen))
        names = [name for name, _ in ops.calls]
        last_write = len(names) - 1 - names[::-1].index("write")
        self.assertEqual(
            names[last_write + 1 :],
            ["fsync", "close", "move_noreplace", "fsync_directory"],
        )
        self.assertEqual(ops.calls[-2], ("move_noreplace", path))
        self.assertEqual(ops.calls[-1], ("fsync_directory", str(self.folder / "new")))
        self.assertTrue(ops.calls[0][1].startswith(str(self.folder / "tmp")))

    def test_chunked_copy(self) -> None:
        """
        The message is copied in chunks of at most 64 KiB, never whole.
        """
        big = self.tmp / "big.eml"
        big.write_bytes(MESSAGE * 3)
        ops = WatchedFileOps()
        sizes: list[int] = []
        original_write = ops.write

        def write(fd: int, data: bytes | memoryview) -> int:
            sizes.append(len(data))
            return original_write(fd, data)

        ops.write = write  # type: ignore[method-assign]
        path = deliver(
            str(self.folder),
            str(big),
            sender="",
            recipients=["r@x"],
            now=NOW,
            fileops=ops,
        )
        self.assertLessEqual(max(sizes), 64 * 1024)
        self.assertGreater(len(sizes), 3)
        self.assertTrue(Path(path).read_bytes().endswith(MESSAGE * 3))

    def test_unique_names(self) -> None:
        """
        Names made in the same microsecond on the same host differ, carry
        the time and the host (with Maildir's escapes for C{/} and C{:}).
        """
        names = {unique_name(NOW, "gw/1:2") for _ in range(1000)}
        self.assertEqual(len(names), 1000)
        for name in names:
            self.assertTrue(name.startswith("1700000000.M125000P"))
            self.assertTrue(name.endswith(".gw\\0571\\0722.eml"))

    def test_concurrent(self) -> None:
        """
        Deliveries from many threads at the same clock time all land, each
        in its own file with the right content.
        """
        threads_count, per_thread = 8, 25
        paths: list[str] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(threads_count)

        def run(index: int) -> None:
            barrier.wait()
            for n in range(per_thread):
                try:
                    paths.append(self.deliver(prefix=b"X-N: %d-%d\r\n" % (index, n)))
                except BaseException as e:  # pragma: no cover - reported below
                    errors.append(e)

        threads = [
            threading.Thread(target=run, args=(i,)) for i in range(threads_count)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(errors, [])
        total = threads_count * per_thread
        self.assertEqual(len(set(paths)), total)
        self.assertEqual(len(self.listing("new")), total)
        self.assertEqual(self.listing("tmp"), [])
        prefixes = set()
        for path in paths:
            data = Path(path).read_bytes()
            self.assertTrue(data.endswith(MESSAGE))
            prefixes.add(data.split(b"\r\n")[2])
        self.assertEqual(len(prefixes), total)

    def test_name_collision_retried(self) -> None:
        """
        When the name is taken in C{new/}, the file is delivered under
        another name and the temporary file is gone; an existing file is
        never replaced.
        """
        ops = WatchedFileOps()
        ops.move_collisions = 2
        path = self.deliver(fileops=ops)
        moves = [p for name, p in ops.calls if name == "move_noreplace"]
        self.assertEqual(len(moves), 3)
        self.assertEqual(len(set(moves)), 3)
        self.assertEqual(self.listing("new"), [os.path.basename(path)])
        self.assertEqual(self.listing("tmp"), [])

    def test_endless_collisions(self) -> None:
        """
        A name that is always taken ends in a temporary failure.
        """
        ops = WatchedFileOps()
        ops.move_collisions = 100
        error = self.assertRaises(MaildirError, self.deliver, fileops=ops)
        self.assertEqual(error.status, "4.3.0")
        self.assertEqual(self.listing("tmp"), [])

    def test_disk_full(self) -> None:
        """
        ENOSPC while writing is a temporary C{4.3.1} failure; nothing is
        left in C{tmp/} or C{new/}.
        """
        ops = WatchedFileOps()
        ops.write_budget = 100_000
        error = self.assertRaises(MaildirError, self.deliver, fileops=ops)
        self.assertEqual((error.status, error.errno), ("4.3.1", errno.ENOSPC))
        self.assertIsInstance(error.__cause__, OSError)
        self.assertEqual(self.listing("new"), [])
        self.assertEqual(self.listing("tmp"), [])

    def test_quota_on_fsync(self) -> None:
        """
        EDQUOT when flushing is also C{4.3.1}, and the file is removed.
        """
        ops = WatchedFileOps()
        ops.faults["fsync"] = errno.EDQUOT
        error = self.assertRaises(MaildirError, self.deliver, fileops=ops)
        self.assertEqual((error.status, error.errno), ("4.3.1", errno.EDQUOT))
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("new"), [])

    def test_permission_denied(self) -> None:
        """
        A folder the gateway may not write to is a temporary C{4.3.0}
        failure (for creating the file, or the folders).
        """
        for call in ("create", "mkdir"):
            ops = WatchedFileOps()
            ops.faults[call] = errno.EACCES
            error = self.assertRaises(MaildirError, self.deliver, fileops=ops)
            self.assertEqual((error.status, error.errno), ("4.3.0", errno.EACCES))

    def test_is_os_error(self) -> None:
        """
        The error is an L{OSError} whose C{strerror} names the folder, so a
        caller that maps C{OSError} to a retry handles it.
        """
        ops = WatchedFileOps()
        ops.faults["create"] = errno.EACCES
        error = self.assertRaises(OSError, self.deliver, fileops=ops)
        self.assertIsInstance(error, MaildirError)
        self.assertIn(str(self.folder), error.strerror)

    def test_missing_message(self) -> None:
        """
        A spool file that is gone fails the delivery (temporarily) and
        leaves nothing behind.
        """
        self.message.unlink()
        error = self.assertRaises(MaildirError, self.deliver)
        self.assertEqual(error.errno, errno.ENOENT)
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("new"), [])

    def test_directory_sync_failure(self) -> None:
        """
        A failure to make the folder durable after the rename is reported
        (the relay retries: a duplicate rather than a loss).
        """
        ops = WatchedFileOps()
        ops.faults["fsync_directory"] = errno.EIO
        error = self.assertRaises(MaildirError, self.deliver, fileops=ops)
        self.assertEqual(error.status, "4.3.0")
        self.assertEqual(self.listing("tmp"), [])
