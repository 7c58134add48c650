"""
Tests for L{mdgateway.queue.spool}: the durable queue behind C{250 queued as}.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import inspect
import json
import os
import queue
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mdgateway.fileops import IFileOps, OSFileOps
from mdgateway.queue.entry import (
    SpoolEntry,
    SpoolError,
    SpoolFullError,
    SpoolInUseError,
)
from mdgateway.queue.envelope import (
    ENVELOPE_VERSION,
    Envelope,
    EnvelopeFormatError,
    Recipient,
)
from mdgateway.queue.ids import QUEUE_ID_LENGTH, QueueIdGenerator, is_queue_id
from mdgateway.queue.spool import Spool
from mdgateway.queue.writer import ISpoolWriter, SpoolWriter
from mdgateway.testing.disk import CrashedError, DyingFileOps, FaultyFileOps
from mdgateway.testing.threads import (
    ManualThreadPool,
    SynchronousThreadPool,
    ThreadsClock,
)

# --------------------------------------------------------------------------
# Fakes (verified below against the real interfaces)


# --------------------------------------------------------------------------
# Helpers


def result_of(d: Deferred[Any] | Any) -> Any:
    """
    The result of an already-fired Deferred (or coroutine, which is wrapped);
    raise its failure's exception.
    """
    if inspect.iscoroutine(d):
        d = Deferred.fromCoroutine(d)
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def make_envelope(**kw: Any) -> Envelope:
    values: dict[str, Any] = {
        "queue_id": "",
        "received_at": 1_700_000_000.25,
        "sender": "sender@example.com",
        "recipients": (
            Recipient(
                "rcpt@example.org", {"NOTIFY": "SUCCESS,FAILURE"}, "Default", "inbound"
            ),
        ),
        "mail_parameters": {"SIZE": "1234", "BODY": "8BITMIME"},
        "client_address": "192.0.2.1",
        "client_port": 40000,
        "client_helo": "client.example.com",
        "protocol": "ESMTP",
        "listener": "inbound",
    }
    values.update(kw)
    return Envelope(**values)


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def close_spool(spool: Spool, pool: Any) -> Deferred[None]:
    d = Deferred.fromCoroutine(spool.close())
    if isinstance(pool, ManualThreadPool):
        pool.run_all()
    return d


class SpoolTestMixin:
    """
    Fresh directories under pytest's C{tmp_path}, and spools on them with a
    L{ThreadsClock} and a chosen fake pool. Spools still open at the end of
    a test are closed (releasing their locks).
    """

    @pytest.fixture(autouse=True)
    def _tmp_root(self, tmp_path: Path) -> Iterator[None]:
        self._tmp_path = tmp_path
        self._tmp_count = 0
        self._spools: list[tuple[Spool, Any]] = []
        yield
        for spool, pool in self._spools:
            close_spool(spool, pool).addErrback(lambda f: None)

    def release(self, root: Path) -> None:
        """
        Close this test's spools on C{root}, as the end of their process
        would, so that another can lock it.
        """
        keep = []
        for spool, pool in self._spools:
            if spool.root == os.path.abspath(root):
                result_of(close_spool(spool, pool))
            else:
                keep.append((spool, pool))
        self._spools = keep

    def reopen(self, root: Path, pool: Any = None, **kw: Any) -> Spool:
        """
        A new spool on C{root} after closing the earlier ones (a restart).
        """
        self.release(root)
        return self.make_spool(root, pool, **kw)

    def tmp(self) -> Path:
        self._tmp_count += 1
        return self._tmp_path / f"spool{self._tmp_count}"

    def make_spool(
        self,
        root: Path,
        pool: Any = None,
        clock: ThreadsClock | None = None,
        **kw: Any,
    ) -> Spool:
        clock = clock or ThreadsClock()
        pool = pool if pool is not None else SynchronousThreadPool()
        kw.setdefault("min_free_bytes", 0)
        kw.setdefault("min_free_inodes", 0)
        spool = Spool(str(root), clock, pool, **kw)
        self._spools.append((spool, pool))
        return spool

    def recovered(self, root: Path, pool: Any = None, **kw: Any) -> Spool:
        spool = self.make_spool(root, pool, **kw)
        d = Deferred.fromCoroutine(spool.recover())
        if isinstance(pool, ManualThreadPool):
            pool.run_all()
        result_of(d)
        return spool


# --------------------------------------------------------------------------
# The fakes are faithful


class FakeVerificationTests(SpoolTestMixin, SynchronousTestCase):
    """
    The fakes used here behave like what they stand for.
    """

    def test_clock_interfaces(self) -> None:
        """
        L{ThreadsClock} provides the reactor interfaces the spool needs and
        runs C{callFromThread} calls with their arguments.
        """
        clock = ThreadsClock()
        verifyObject(IReactorTime, clock)
        verifyObject(IReactorFromThreads, clock)
        seen: list[Any] = []
        clock.callFromThread(lambda *a, **k: seen.append((a, k)), 1, x=2)
        self.assertEqual(seen, [((1,), {"x": 2})])

    def test_pools_match_threadpool(self) -> None:
        """
        Both fake pools have C{ThreadPool.callInThreadWithCallback}'s
        parameters and report success and failure exactly as a real
        L{ThreadPool} does: C{(True, result)} and C{(False, Failure)}.
        """
        real = inspect.signature(ThreadPool.callInThreadWithCallback)
        for fake in (SynchronousThreadPool, ManualThreadPool):
            sig = inspect.signature(fake.callInThreadWithCallback)
            self.assertEqual(list(sig.parameters), list(real.parameters))

        def boom() -> None:
            raise OSError(errno.ENOSPC, "full")

        def outcomes(pool: Any, run: Callable[[], object]) -> list[Any]:
            got: queue.Queue[tuple[bool, Any]] = queue.Queue()
            pool.callInThreadWithCallback(lambda ok, r: got.put((ok, r)), pow, 2, 5)
            pool.callInThreadWithCallback(lambda ok, r: got.put((ok, r)), boom)
            run()
            first, second = got.get(timeout=10), got.get(timeout=10)
            return [first, (second[0], type(second[1]), type(second[1].value))]

        real_pool = ThreadPool(1, 1)
        real_pool.start()
        try:
            expected = outcomes(real_pool, lambda: None)
        finally:
            real_pool.stop()
        self.assertEqual(expected, [(True, 32), (False, Failure, OSError)])
        self.assertEqual(outcomes(SynchronousThreadPool(), lambda: None), expected)
        manual = ManualThreadPool()
        self.assertEqual(outcomes(manual, manual.run_all), expected)

    def test_fileops_interface(self) -> None:
        """
        L{OSFileOps} and the fault-injecting fake provide L{IFileOps}.
        """
        verifyObject(IFileOps, OSFileOps())
        verifyObject(IFileOps, FaultyFileOps())
        verifyObject(IFileOps, DyingFileOps())

    def test_dying_fileops(self) -> None:
        """
        L{DyingFileOps} works like the real calls until C{die_at}, then
        every call but C{close} raises L{CrashedError} and changes nothing.
        """
        ops = DyingFileOps()
        root = self.tmp()
        ops.mkdir(str(root))
        fd = ops.create(str(root / "a"))
        ops.die_at = 3
        self.assertRaises(CrashedError, ops.create, str(root / "b"))
        self.assertRaises(CrashedError, ops.unlink, str(root / "a"))
        ops.close(fd)
        self.assertEqual(names(root), ["a"])
        self.assertEqual(ops.count, 4)

    def test_fileops_basics(self) -> None:
        """
        L{OSFileOps} creates files 0600 exclusively, makes directories 0700,
        refuses to move over an existing name, and its lock excludes a
        second open file until the first is closed.
        """
        ops = OSFileOps()
        root = self.tmp()
        root.mkdir()
        self.assertTrue(ops.mkdir(str(root / "d")))
        self.assertFalse(ops.mkdir(str(root / "d")))
        self.assertEqual(stat.S_IMODE(os.stat(root / "d").st_mode), 0o700)
        fd = ops.create(str(root / "a"))
        self.assertEqual(stat.S_IMODE(os.fstat(fd).st_mode), 0o600)
        self.assertRaises(FileExistsError, ops.create, str(root / "a"))
        self.assertTrue(ops.lock(fd, True))
        other = ops.open_existing(str(root / "a"))
        self.assertFalse(ops.lock(other, False))
        ops.close(fd)
        self.assertTrue(ops.lock(other, False))
        ops.close(other)
        (root / "b").write_bytes(b"b")
        self.assertRaises(
            FileExistsError, ops.move_noreplace, str(root / "a"), str(root / "b")
        )
        ops.move_noreplace(str(root / "a"), str(root / "c"))
        self.assertEqual(names(root), ["b", "c", "d"])

    def test_fileops_lock_link_rmdir(self) -> None:
        """
        L{OSFileOps} opens a lock file creating it 0600 (or the existing
        one); tells whether a name still names an open file; links without
        replacing an existing name; tells hard links apart from copies; and
        removes only empty directories.
        """
        ops = OSFileOps()
        root = self.tmp()
        ops.mkdir(str(root / "d"))
        lock = str(root / "lock")
        fd = ops.open_lock(lock)
        self.assertEqual(stat.S_IMODE(os.fstat(fd).st_mode), 0o600)
        again = ops.open_lock(lock)
        self.assertTrue(ops.lock(fd, False))
        self.assertFalse(ops.lock(again, False))
        ops.close(again)
        self.assertTrue(ops.names_file(fd, lock))
        os.unlink(lock)
        self.assertFalse(ops.names_file(fd, lock))
        Path(lock).write_bytes(b"")
        self.assertFalse(ops.names_file(fd, lock))
        ops.close(fd)
        self.assertRaises(FileNotFoundError, ops.open_lock, str(root / "x" / "lock"))
        (root / "a").write_bytes(b"a")
        (root / "b").write_bytes(b"a")
        ops.link(str(root / "a"), str(root / "d" / "a"))
        self.assertRaises(FileExistsError, ops.link, str(root / "a"), str(root / "b"))
        self.assertTrue(ops.same_file(str(root / "a"), str(root / "d" / "a")))
        self.assertFalse(ops.same_file(str(root / "a"), str(root / "b")))
        self.assertFalse(ops.same_file(str(root / "a"), str(root / "c")))
        self.assertRaises(OSError, ops.rmdir, str(root / "d"))
        os.unlink(root / "d" / "a")
        ops.rmdir(str(root / "d"))
        self.assertEqual(names(root), ["a", "b", "lock"])


# --------------------------------------------------------------------------
# Queue ids


class QueueIdTests(SynchronousTestCase):
    """
    Queue ids are short, path-safe, time-ordered and unique.
    """

    def test_unique_in_one_tick(self) -> None:
        """
        Many ids made while the clock stands still are all different, strictly
        increasing, and each is a 20-character Crockford base32 id.
        """
        gen = QueueIdGenerator(task.Clock())
        ids = [gen() for _ in range(20000)]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(ids, sorted(ids))
        self.assertTrue(all(len(i) == QUEUE_ID_LENGTH and is_queue_id(i) for i in ids))

    def test_time_ordered(self) -> None:
        """
        An id made later sorts after one made earlier, and a clock stepping
        back does not break the order.
        """
        clock = task.Clock()
        clock.advance(1_700_000_000)
        gen = QueueIdGenerator(clock)
        first = gen()
        clock.advance(0.001)
        second = gen()
        clock.rightNow -= 10
        third = gen()
        self.assertLess(first, second)
        self.assertLess(second, third)
        self.assertEqual(first[:9], "1HF7YAT00")  # 1_700_000_000_000 ms

    def test_random_overflow(self) -> None:
        """
        When the random part would overflow within one millisecond, the id
        moves to the next millisecond instead of wrapping around.
        """
        gen = QueueIdGenerator(task.Clock(), randbits=lambda n: (1 << n) - 1)
        first, second = gen(), gen()
        self.assertLess(first, second)
        self.assertEqual(second[:9], "000000001")

    def test_independent_generators(self) -> None:
        """
        Generators that share nothing (separate processes) give different ids
        in the same millisecond.
        """
        clock = task.Clock()
        ids = {QueueIdGenerator(clock)() for _ in range(2000)}
        self.assertEqual(len(ids), 2000)

    def test_is_queue_id(self) -> None:
        """
        Only well-formed ids pass, so file names from elsewhere are ignored.
        """
        self.assertTrue(is_queue_id("0" * 20))
        for bad in ("0" * 19, "0" * 21, "I" + "0" * 19, "../" + "0" * 17, "a" * 20):
            self.assertFalse(is_queue_id(bad), bad)


# --------------------------------------------------------------------------
# Envelope

_params = st.dictionaries(
    st.text(min_size=1, max_size=12), st.none() | st.text(max_size=40), max_size=5
)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_opt_text = st.none() | st.text(max_size=40)
_recipient = st.builds(
    Recipient,
    address=st.text(max_size=80),
    parameters=_params,
    rule=_opt_text,
    direction=_opt_text,
)
_envelope = st.builds(
    Envelope,
    queue_id=st.text(alphabet="0123456789ABCDEFGHJKMNPQRSTVWXYZ", max_size=20),
    received_at=st.floats(allow_nan=False, allow_infinity=False),
    sender=st.text(max_size=80),
    recipients=st.lists(_recipient, max_size=4).map(tuple),
    mail_parameters=_params,
    client_address=_opt_text,
    client_port=st.none() | st.integers(0, 65535),
    client_helo=_opt_text,
    tls=st.booleans(),
    tls_version=_opt_text,
    tls_cipher=_opt_text,
    authenticated_user=_opt_text,
    protocol=st.sampled_from(["SMTP", "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA"]),
    listener=st.text(max_size=20),
    config_version=st.text(max_size=20),
    extra=st.dictionaries(st.text(max_size=8), _json, max_size=3),
)


class EnvelopeTests(SynchronousTestCase):
    """
    The envelope survives JSON unchanged, and bad JSON is refused.
    """

    @settings(max_examples=300, deadline=None)
    @given(_envelope)
    def test_round_trip(self, envelope: Envelope) -> None:
        """
        Any envelope reads back equal from its JSON text and from its UTF-8
        bytes.
        """
        text = envelope.to_json()
        self.assertEqual(Envelope.from_json(text), envelope)
        self.assertEqual(Envelope.from_json(text.encode("utf-8")), envelope)

    def test_utf8_addresses(self) -> None:
        """
        Internationalised addresses are written as UTF-8 (not escaped) and
        read back unchanged, with the format version in the JSON.
        """
        envelope = make_envelope(
            sender="",
            recipients=(
                Recipient("用户@例子.广告"),
                Recipient("δοκιμή@παράδειγμα.δοκιμή", {"ORCPT": "utf-8;δ@π"}),
            ),
            mail_parameters={"SMTPUTF8": None},
        )
        data = envelope.to_json().encode("utf-8")
        self.assertIn("用户@例子.广告".encode(), data)
        self.assertNotIn(b"\\u", data)
        self.assertEqual(json.loads(data)["version"], ENVELOPE_VERSION)
        back = Envelope.from_json(data)
        self.assertEqual(back, envelope)
        self.assertEqual(back.sender, "")
        self.assertEqual(back.mail_parameters, {"SMTPUTF8": None})

    def test_refuses_bad_input(self) -> None:
        """
        Invalid JSON or UTF-8, a newer format version, or a field of the
        wrong type raise L{EnvelopeFormatError}.
        """
        good = json.loads(make_envelope().to_json())
        bad_cases: list[Any] = [
            b"\xff\xfe",
            "{not json",
            "[]",
            {**good, "version": ENVELOPE_VERSION + 1},
            {**good, "version": "1"},
            {**good, "received_at": "yesterday"},
            {**good, "received_at": True},
            {**good, "sender": None},
            {**good, "recipients": "a@b"},
            {**good, "recipients": [{"address": 5}]},
            {**good, "mail_parameters": {"SIZE": 5}},
            {**good, "client_port": "25"},
            {**good, "tls": "yes"},
            {**good, "extra": []},
        ]
        for case in bad_cases:
            text = json.dumps(case) if isinstance(case, dict) else case
            self.assertRaises(EnvelopeFormatError, Envelope.from_json, text)

    def test_ignores_unknown_keys(self) -> None:
        """
        A key this version does not know is ignored, so a later addition
        does not strand queued mail.
        """
        envelope = make_envelope()
        data = json.loads(envelope.to_json())
        data["added_later"] = {"x": 1}
        self.assertEqual(Envelope.from_json(json.dumps(data)), envelope)

    def test_refuses_nan(self) -> None:
        """
        A NaN time cannot be written: JSON has no such number.
        """
        self.assertRaises(ValueError, make_envelope(received_at=float("nan")).to_json)


# --------------------------------------------------------------------------
# Writing and committing


class WriterTests(SpoolTestMixin, SynchronousTestCase):
    """
    Receiving a message into the spool and committing it.
    """

    def test_writer_interface(self) -> None:
        """
        A spool writer provides L{ISpoolWriter}.
        """
        spool = self.recovered(self.tmp())
        verifyObject(ISpoolWriter, spool.open_writer())

    def test_round_trip(self) -> None:
        """
        Committed bytes and envelope are in C{queue/} exactly as written,
        with modes 0600/0700, nothing is left in C{incoming/}, and a new
        spool on the same directory recovers the same entry.
        """
        root = self.tmp()
        spool = self.recovered(root, flush_size=10, buffer_size=40)
        writer = spool.open_writer()
        self.assertTrue(is_queue_id(writer.queue_id))
        body = b"Received: from x\r\nSubject: hi\r\n\r\n" + b"line\r\n" * 50
        for i in range(0, len(body), 7):
            writer.write(body[i : i + 7])
        self.assertEqual(writer.size, len(body))
        entry = result_of(writer.commit(make_envelope()))
        self.assertEqual(entry.queue_id, writer.queue_id)
        self.assertEqual(entry.envelope, make_envelope(queue_id=writer.queue_id))
        self.assertEqual(entry.size, len(body))
        self.assertEqual(Path(entry.message_path).read_bytes(), body)
        self.assertEqual(
            Envelope.from_json(Path(entry.envelope_path).read_bytes()), entry.envelope
        )
        self.assertEqual(names(root / "incoming"), [])
        self.assertEqual(
            names(root / "queue"), [writer.queue_id + ".eml", writer.queue_id + ".json"]
        )
        for directory in ("incoming", "queue", "state", "corrupt"):
            mode = stat.S_IMODE(os.stat(root / directory).st_mode)
            self.assertEqual(mode, 0o700, directory)
        for path in (entry.message_path, entry.envelope_path):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(spool.entry_count, 1)
        self.assertEqual(spool.active_writers, 0)

        again = self.reopen(root)
        self.assertEqual(result_of(again.recover()), [entry])
        self.assertEqual(result_of(again.list_entries()), [entry])
        self.assertEqual(again.entry_count, 1)

    def test_commit_order(self) -> None:
        """
        Commit fsyncs the message, writes and fsyncs the envelope, moves the
        message into C{queue/}, the envelope last, then fsyncs C{queue/}.
        """
        root = self.tmp()
        ops = FaultyFileOps()
        spool = self.recovered(root, fileops=ops)
        writer = spool.open_writer()
        writer.write(b"body\r\n")
        ops.calls.clear()
        result_of(writer.commit(make_envelope()))
        qid = writer.queue_id
        steps = [
            (name, os.path.relpath(path, root) if path else "")
            for name, path in ops.calls
        ]
        self.assertEqual(
            steps,
            [
                ("write", f"incoming/{qid}.eml"),
                ("fsync", f"incoming/{qid}.eml"),
                ("create", f"incoming/{qid}.json"),
                ("write", f"incoming/{qid}.json"),
                ("fsync", f"incoming/{qid}.json"),
                ("move_noreplace", f"queue/{qid}.eml"),
                ("move_noreplace", f"queue/{qid}.json"),
                ("fsync_directory", "queue"),
            ],
        )

    def test_commit_fills_queue_id(self) -> None:
        """
        An envelope with an empty queue id gets the writer's; one naming
        another id is refused with L{ValueError}.
        """
        spool = self.recovered(self.tmp())
        writer = spool.open_writer()
        self.assertRaises(ValueError, writer.commit, make_envelope(queue_id="0" * 20))
        entry = result_of(writer.commit(make_envelope(queue_id=writer.queue_id)))
        self.assertEqual(entry.envelope.queue_id, writer.queue_id)

    def test_empty_message(self) -> None:
        """
        A message with no bytes at all commits as an empty file.
        """
        spool = self.recovered(self.tmp())
        entry = result_of(spool.open_writer().commit(make_envelope()))
        self.assertEqual(Path(entry.message_path).read_bytes(), b"")
        self.assertEqual(entry.size, 0)

    def test_unstorable_envelope(self) -> None:
        """
        An envelope that cannot be encoded (a lone surrogate in an address)
        fails the commit with L{SpoolError} and removes the partial file.
        """
        root = self.tmp()
        spool = self.recovered(root)
        writer = spool.open_writer()
        writer.write(b"body")
        bad = make_envelope(recipients=(Recipient("\udcff@example.org"),))
        self.assertRaises(SpoolError, result_of, writer.commit(bad))
        self.assertEqual(names(root / "incoming"), [])
        self.assertEqual(names(root / "queue"), [])

    def test_close(self) -> None:
        """
        Closing waits for a commit in flight to finish, aborts a writer still
        receiving (its file removed), then refuses new writers and reports
        not writable.
        """
        pool = ManualThreadPool()
        root = self.tmp()
        spool = self.recovered(root, pool=pool)
        pool.run_all()
        committing = spool.open_writer()
        receiving = spool.open_writer()
        pool.run_all()
        receiving.write(b"half")
        committed = committing.commit(make_envelope())
        closed = Deferred.fromCoroutine(spool.close())
        self.assertNoResult(closed)
        pool.run_all()
        self.assertIsNone(result_of(closed))
        entry = result_of(committed)
        self.assertEqual(names(root / "incoming"), [])
        self.assertEqual(
            names(root / "queue"), [entry.queue_id + ".eml", entry.queue_id + ".json"]
        )
        self.assertRaises(RuntimeError, spool.open_writer)
        self.assertFalse(spool.writable())

    def test_write_after_commit(self) -> None:
        """
        Writing after commit is a programming error, and a second commit fails
        with L{SpoolError}.
        """
        spool = self.recovered(self.tmp())
        writer = spool.open_writer()
        result_of(writer.commit(make_envelope()))
        self.assertRaises(RuntimeError, writer.write, b"late")
        self.assertRaises(SpoolError, result_of, writer.commit(make_envelope()))

    def test_open_before_recover(self) -> None:
        """
        Opening a writer before recovery is refused: recovery would delete
        its file.
        """
        spool = self.make_spool(self.tmp())
        self.assertRaises(RuntimeError, spool.open_writer)
        self.assertFalse(spool.writable())

    def test_queue_id_collision_in_incoming(self) -> None:
        """
        Two writers given the same id never share a file: the second fails
        with L{SpoolError}, the first commits intact.
        """
        root = self.tmp()
        spool = self.recovered(root, new_queue_id=lambda: "0" * 20)
        a = spool.open_writer()
        a.write(b"first")
        b = spool.open_writer()
        self.assertIsInstance(b.error, SpoolError)
        self.assertRaises(SpoolError, result_of, b.commit(make_envelope()))
        entry = result_of(a.commit(make_envelope()))
        self.assertEqual(Path(entry.message_path).read_bytes(), b"first")

    def test_queue_id_collision_in_queue(self) -> None:
        """
        A commit whose id is already queued fails with L{SpoolError} and
        leaves the queued entry untouched (never replaced).
        """
        root = self.tmp()
        spool = self.recovered(root, new_queue_id=lambda: "0" * 20)
        writer = spool.open_writer()
        writer.write(b"first")
        entry = result_of(writer.commit(make_envelope(sender="a@x")))
        writer = spool.open_writer()
        writer.write(b"second")
        self.assertRaises(SpoolError, result_of, writer.commit(make_envelope()))
        self.assertEqual(Path(entry.message_path).read_bytes(), b"first")
        self.assertEqual(result_of(spool.list_entries()), [entry])
        self.assertEqual(names(root / "incoming"), [])


class BackPressureTests(SpoolTestMixin, SynchronousTestCase):
    """
    C{write} never blocks and asks the caller to pause while the disk lags.
    """

    def test_pause_and_drain(self) -> None:
        """
        With the pool not running, C{write} returns C{False} once the buffer
        holds C{buffer_size}; the drain callback runs once jobs have brought
        it down, and the file then holds every byte in order.
        """
        pool = ManualThreadPool()
        spool = self.recovered(self.tmp(), pool=pool, buffer_size=100, flush_size=30)
        pool.run_all()
        writer = spool.open_writer()
        results = [writer.write(bytes([65 + i]) * 20) for i in range(5)]
        self.assertEqual(results, [True, True, True, True, False])
        self.assertEqual(writer.buffered_bytes, 100)
        drained: list[int] = []
        writer.on_drained(lambda: drained.append(writer.buffered_bytes))
        self.assertEqual(drained, [])
        pool.run_one()  # the open; starts a write job with everything held
        self.assertEqual(drained, [])
        pool.run_one()  # the write
        self.assertEqual(drained, [0])
        entry = writer.commit(make_envelope())
        pool.run_all()
        expected = b"".join(bytes([65 + i]) * 20 for i in range(5))
        self.assertEqual(Path(result_of(entry).message_path).read_bytes(), expected)

    def test_on_drained_when_already_drained(self) -> None:
        """
        A drain callback given while the buffer is low runs at once.
        """
        spool = self.recovered(self.tmp())
        writer = spool.open_writer()
        called: list[bool] = []
        writer.on_drained(lambda: called.append(True))
        self.assertEqual(called, [True])

    def test_one_job_at_a_time(self) -> None:
        """
        A writer has at most one job in the pool, so its writes land in order.
        """
        pool = ManualThreadPool()
        spool = self.recovered(self.tmp(), pool=pool, buffer_size=64, flush_size=8)
        pool.run_all()
        writer = spool.open_writer()
        for i in range(30):
            writer.write(b"%02d" % i * 4)
            self.assertLessEqual(len(pool.jobs), 1)
            if i % 3 == 0:
                pool.run_all()
        d = writer.commit(make_envelope())
        pool.run_all()
        expected = b"".join(b"%02d" % i * 4 for i in range(30))
        self.assertEqual(Path(result_of(d).message_path).read_bytes(), expected)

    def test_memory_bounded(self) -> None:
        """
        Writing 25 MB in 64 KiB chunks, pausing as asked, never holds more
        than the buffer plus one chunk in memory.
        """
        pool = ManualThreadPool()
        root = self.tmp()
        spool = self.recovered(root, pool=pool)
        pool.run_all()
        writer = spool.open_writer()
        digest = hashlib.sha256()
        peak = 0
        for i in range(400):
            chunk = i.to_bytes(4, "big") * 16384
            digest.update(chunk)
            if not writer.write(chunk):
                resumed: list[bool] = []
                writer.on_drained(functools.partial(resumed.append, True))
                while not resumed:
                    pool.run_one()
            peak = max(peak, writer.buffered_bytes)
        d = writer.commit(make_envelope())
        pool.run_all()
        entry = result_of(d)
        self.assertLessEqual(peak, 256 * 1024 + 64 * 1024)
        self.assertEqual(entry.size, 400 * 65536)
        with open(entry.message_path, "rb") as f:
            self.assertEqual(hashlib.file_digest(f, "sha256").digest(), digest.digest())


class AbortTests(SpoolTestMixin, SynchronousTestCase):
    """
    An aborted message leaves nothing behind, whenever the abort comes.
    """

    def test_abort_during_flush(self) -> None:
        """
        Aborting while a flush is in the pool waits for it, then removes the
        partial file; the abort Deferred fires only then, and a second abort
        is harmless.
        """
        pool = ManualThreadPool()
        root = self.tmp()
        spool = self.recovered(root, pool=pool, flush_size=10)
        pool.run_all()
        writer = spool.open_writer()
        pool.run_one()  # open
        writer.write(b"x" * 20)
        self.assertEqual(len(pool.jobs), 1)  # the flush, in flight
        done: list[Any] = []
        writer.abort().addBoth(done.append)
        writer.abort().addBoth(done.append)
        self.assertEqual(done, [])
        self.assertTrue(writer.write(b"ignored"))
        pool.run_one()  # the flush completes
        self.assertEqual(done, [])
        pool.run_all()  # the discard
        self.assertEqual(done, [None, None])
        self.assertEqual(names(root / "incoming"), [])
        self.assertEqual(names(root / "queue"), [])
        self.assertEqual(result_of(writer.abort()), None)
        self.assertEqual(spool.active_writers, 0)
        self.assertRaises(SpoolError, result_of, writer.commit(make_envelope()))

    def test_abort_before_open(self) -> None:
        """
        Aborting before the file is even created removes it once created.
        """
        pool = ManualThreadPool()
        root = self.tmp()
        spool = self.recovered(root, pool=pool)
        pool.run_all()
        writer = spool.open_writer()
        d = writer.abort()
        pool.run_all()
        self.assertEqual(result_of(d), None)
        self.assertEqual(names(root / "incoming"), [])

    def test_abort_after_commit_is_noop(self) -> None:
        """
        Abort after commit changes nothing: the entry stays queued.
        """
        spool = self.recovered(self.tmp())
        writer = spool.open_writer()
        entry = result_of(writer.commit(make_envelope()))
        result_of(writer.abort())
        self.assertEqual(result_of(spool.list_entries()), [entry])


class FullDiskTests(SpoolTestMixin, SynchronousTestCase):
    """
    A full disk refuses the message cleanly: L{SpoolFullError}, nothing
    queued, and the spool reports itself not writable.
    """

    def assertNothingQueued(self, root: Path) -> None:
        self.assertEqual(names(root / "queue"), [])
        self.assertEqual(names(root / "incoming"), [])

    def test_full_while_writing(self) -> None:
        """
        ENOSPC in a flush sets C{full} at once, discards further data, frees
        the partial file, and commit raises L{SpoolFullError}.
        """
        root = self.tmp()
        ops = FaultyFileOps()
        spool = self.recovered(root, fileops=ops, flush_size=10)
        writer = spool.open_writer()
        ops.write_budget = 15
        drained: list[bool] = []
        writer.write(b"a" * 10)
        self.assertFalse(writer.full)
        writer.write(b"b" * 10)
        self.assertTrue(writer.full)
        self.assertIsInstance(writer.error, SpoolFullError)
        self.assertFalse(spool.writable())
        self.assertNothingQueued(root)
        self.assertTrue(writer.write(b"c" * 10))
        self.assertEqual(writer.buffered_bytes, 0)
        writer.on_drained(lambda: drained.append(True))
        self.assertEqual(drained, [True])
        self.assertRaises(SpoolFullError, result_of, writer.commit(make_envelope()))
        self.assertNothingQueued(root)
        self.assertEqual(spool.active_writers, 0)

    def test_full_in_commit(self) -> None:
        """
        ENOSPC (or EDQUOT) while writing the envelope at commit gives
        L{SpoolFullError} and nothing in C{queue/} or C{incoming/}.
        """
        for err in (errno.ENOSPC, errno.EDQUOT):
            root = self.tmp()
            ops = FaultyFileOps()
            ops.fail_writes_to = ".json"
            ops.write_errno = err
            spool = self.recovered(root, fileops=ops)
            writer = spool.open_writer()
            writer.write(b"message")
            self.assertRaises(SpoolFullError, result_of, writer.commit(make_envelope()))
            self.assertNothingQueued(root)

    def test_full_on_create(self) -> None:
        """
        ENOSPC creating the file marks the writer full before any data.
        """
        root = self.tmp()
        ops = FaultyFileOps()
        ops.faults["create"] = ("incoming", errno.ENOSPC)
        spool = self.recovered(root, fileops=ops)
        writer = spool.open_writer()
        self.assertTrue(writer.full)
        self.assertRaises(SpoolFullError, result_of, writer.commit(make_envelope()))
        self.assertNothingQueued(root)

    def test_full_on_rename(self) -> None:
        """
        A failure after the message moved into C{queue/} (moving the
        envelope, or fsyncing the directory) removes what was moved, so no
        partial or unacknowledged entry stays queued.
        """
        for call, text in (("move_noreplace", ".json"), ("fsync_directory", "queue")):
            root = self.tmp()
            ops = FaultyFileOps()
            spool = self.recovered(root, fileops=ops)
            ops.faults[call] = (text, errno.ENOSPC)
            writer = spool.open_writer()
            writer.write(b"message")
            self.assertRaises(SpoolFullError, result_of, writer.commit(make_envelope()))
            self.assertNothingQueued(root)

    def test_other_errors(self) -> None:
        """
        An I/O error that is not about space is a plain L{SpoolError}.
        """
        root = self.tmp()
        ops = FaultyFileOps()
        ops.write_errno = errno.EIO
        ops.fail_writes_to = ".eml"
        spool = self.recovered(root, fileops=ops)
        writer = spool.open_writer()
        writer.write(b"message")
        failure = self.assertRaises(
            SpoolError, result_of, writer.commit(make_envelope())
        )
        self.assertNotIsInstance(failure, SpoolFullError)
        self.assertFalse(writer.full)
        self.assertNothingQueued(root)


class WritableTests(SpoolTestMixin, SynchronousTestCase):
    """
    L{Spool.writable} is a cheap readiness check.
    """

    def test_free_space_threshold(self) -> None:
        """
        Writable when free bytes and inodes are above the thresholds; not
        when either is below; inodes are ignored where not counted.
        """
        cases = [
            ((100, 100), True),
            ((99, 100), False),
            ((100, 9), False),
            ((100, None), True),
        ]
        for free, expected in cases:
            ops = FaultyFileOps()
            ops.free = free
            spool = self.recovered(
                self.tmp(), fileops=ops, min_free_bytes=100, min_free_inodes=10
            )
            self.assertEqual(spool.writable(), expected, free)

    def test_cached(self) -> None:
        """
        The free-space reading is reused for C{space_check_interval} seconds
        of the injected clock, then refreshed.
        """
        clock = ThreadsClock()
        ops = FaultyFileOps()
        ops.free = (10, None)
        spool = self.recovered(self.tmp(), clock=clock, fileops=ops, min_free_bytes=5)
        reads = lambda: sum(1 for name, _ in ops.calls if name == "free_space")  # noqa: E731
        self.assertEqual(reads(), 1)  # by recover
        self.assertTrue(spool.writable())
        ops.free = (1, None)
        self.assertTrue(spool.writable())
        self.assertEqual(reads(), 1)
        clock.advance(1.0)
        self.assertFalse(spool.writable())
        self.assertEqual(reads(), 2)

    def test_not_writable_after_full(self) -> None:
        """
        After ENOSPC the spool says not writable for the interval even if
        free space looks fine, then believes the next reading again.
        """
        clock = ThreadsClock()
        ops = FaultyFileOps()
        spool = self.recovered(self.tmp(), clock=clock, fileops=ops)
        ops.faults["create"] = ("incoming", errno.ENOSPC)
        spool.open_writer()
        self.assertFalse(spool.writable())
        clock.advance(0.5)
        self.assertFalse(spool.writable())
        clock.advance(0.5)
        self.assertTrue(spool.writable())

    def test_free_space_failure(self) -> None:
        """
        When free space cannot be read the spool says not writable and logs.
        """
        clock = ThreadsClock()
        ops = FaultyFileOps()
        spool = self.recovered(self.tmp(), clock=clock, fileops=ops)
        ops.faults["free_space"] = ("", errno.EIO)
        clock.advance(1)
        self.assertFalse(spool.writable())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


# --------------------------------------------------------------------------
# Recovery


class RecoveryTests(SpoolTestMixin, SynchronousTestCase):
    """
    Recovery after a crash keeps complete entries and only those.
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def committed(self, spool: Spool, body: bytes = b"body") -> SpoolEntry:
        writer = spool.open_writer()
        writer.write(body)
        return result_of(writer.commit(make_envelope()))

    def test_creates_layout(self) -> None:
        """
        Recovery creates the root (and missing parents) and its directories,
        mode 0700, and returns no entries.
        """
        root = self.tmp() / "var" / "spool"
        spool = self.make_spool(root)
        self.assertEqual(result_of(spool.recover()), [])
        self.assertEqual(names(root), ["corrupt", "incoming", "lock", "queue", "state"])
        self.assertEqual(stat.S_IMODE(os.stat(root).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(root / "lock").st_mode), 0o600)
        self.assertTrue(spool.writable())

    def test_partial_removed(self) -> None:
        """
        Partial files in C{incoming/} (from a writer that died, so unlocked)
        are removed.
        """
        root = self.tmp()
        self.recovered(root)
        (root / "incoming" / f"{'1' * 20}.eml").write_bytes(b"partial")
        (root / "incoming" / f"{'1' * 20}.json").write_bytes(b"{")
        again = self.reopen(root)
        self.assertEqual(result_of(again.recover()), [])
        self.assertEqual(names(root / "incoming"), [])
        assert again.last_recovery is not None
        self.assertEqual(
            again.last_recovery.removed_partials,
            (f"{'1' * 20}.eml", f"{'1' * 20}.json"),
        )

    def test_live_writer_left_alone(self) -> None:
        """
        Recovery leaves alone a file in C{incoming/} that a live writer
        holds locked (here one that ignores the root's lock, such as an
        older version), and removes it once the lock is gone.
        """
        root = self.tmp()
        self.recovered(root)
        ops = OSFileOps()
        name = f"{'2' * 20}.eml"
        fd = ops.create(str(root / "incoming" / name))
        ops.lock(fd, True)
        other = self.reopen(root)
        self.assertEqual(result_of(other.recover()), [])
        self.assertEqual(names(root / "incoming"), [name])
        assert other.last_recovery is not None
        self.assertEqual(other.last_recovery.busy, (f"incoming/{name}",))
        ops.close(fd)
        result_of(self.reopen(root).recover())
        self.assertEqual(names(root / "incoming"), [])

    def test_message_without_envelope(self) -> None:
        """
        A queued message without envelope (a commit cut short, never
        acknowledged) is removed; complete entries stay.
        """
        root = self.tmp()
        spool = self.recovered(root)
        keep = self.committed(spool)
        lost = self.committed(spool)
        os.unlink(lost.envelope_path)
        again = self.reopen(root)
        self.assertEqual(result_of(again.recover()), [keep])
        self.assertFalse(os.path.exists(lost.message_path))
        assert again.last_recovery is not None
        self.assertEqual(again.last_recovery.removed_unfinished, (lost.queue_id,))

    def test_envelope_without_message(self) -> None:
        """
        An envelope without its message is reported: moved to C{corrupt/},
        counted, logged as critical, and not returned.
        """
        root = self.tmp()
        spool = self.recovered(root)
        broken = self.committed(spool)
        os.unlink(broken.message_path)
        again = self.reopen(root)
        self.assertEqual(result_of(again.recover()), [])
        self.assertEqual(names(root / "queue"), [])
        self.assertEqual(names(root / "corrupt"), [broken.queue_id + ".json"])
        assert again.last_recovery is not None
        self.assertEqual(again.last_recovery.corrupt, (broken.queue_id,))
        self.assertEqual(again.corrupt_count, 1)
        critical = [
            e
            for e in self.events
            if e.get("log_level") and e["log_level"].name == "critical"
        ]
        self.assertEqual([e["queue_id"] for e in critical], [broken.queue_id])
        self.assertEqual(critical[0]["problem"], "envelope without message")

    def test_unreadable_envelope(self) -> None:
        """
        An envelope that cannot be read (or names another id) moves to
        C{corrupt/} with its message rather than being deleted.
        """
        root = self.tmp()
        spool = self.recovered(root)
        garbled = self.committed(spool)
        wrong = self.committed(spool)
        Path(garbled.envelope_path).write_bytes(b"{garbage")
        Path(wrong.envelope_path).write_text(make_envelope(queue_id="0" * 20).to_json())
        self.assertEqual(result_of(spool.list_entries()), [])
        again = self.reopen(root)
        self.assertEqual(result_of(again.recover()), [])
        self.assertEqual(
            names(root / "corrupt"),
            sorted(
                f"{e.queue_id}{s}" for e in (garbled, wrong) for s in (".eml", ".json")
            ),
        )

    def test_unknown_files_kept(self) -> None:
        """
        Files in C{queue/} that are not spool files are left and reported.
        """
        root = self.tmp()
        self.recovered(root)
        (root / "queue" / "README").write_text("hands off")
        again = self.reopen(root)
        result_of(again.recover())
        assert again.last_recovery is not None
        self.assertEqual(again.last_recovery.unknown, ("README",))
        self.assertEqual(names(root / "queue"), ["README"])

    def test_states_cleaned(self) -> None:
        """
        Leftover temporary state files and states of removed entries are
        removed; the state of a live entry and files not ours stay.
        """
        root = self.tmp()
        spool = self.recovered(root)
        entry = self.committed(spool)
        result_of(spool.write_state(entry, {"a": 1}))
        (root / "state" / f"{entry.queue_id}.json.abc.tmp").write_bytes(b"{")
        (root / "state" / f"{'1' * 20}.json").write_bytes(b"{}")
        (root / "state" / "notes.txt").write_bytes(b"operator's")
        again = self.reopen(root)
        self.assertEqual(result_of(again.recover()), [entry])
        self.assertEqual(names(root / "state"), [entry.queue_id + ".json", "notes.txt"])
        self.assertEqual(result_of(again.read_state(entry)), {"a": 1})

    def test_counters(self) -> None:
        """
        The entry count and oldest age follow commits, removals and recovery.
        """
        clock = ThreadsClock()
        clock.advance(1000)
        root = self.tmp()
        spool = self.recovered(root, clock=clock)
        self.assertEqual((spool.entry_count, spool.oldest_age()), (0, 0.0))
        w = spool.open_writer()
        old = result_of(w.commit(make_envelope(received_at=900.0)))
        w = spool.open_writer()
        new = result_of(w.commit(make_envelope(received_at=990.0)))
        self.assertEqual((spool.entry_count, spool.oldest_age()), (2, 100.0))
        result_of(spool.remove(old))
        self.assertEqual((spool.entry_count, spool.oldest_age()), (1, 10.0))
        self.release(root)
        again = self.recovered(root, clock=clock)
        self.assertEqual((again.entry_count, again.oldest_age()), (1, 10.0))
        self.assertEqual(result_of(again.list_entries()), [new])


# --------------------------------------------------------------------------
# Delivery state and removal


class StateTests(SpoolTestMixin, SynchronousTestCase):
    """
    Per-entry delivery state is replaced atomically; removal is ordered.
    """

    def entry(self, spool: Spool) -> SpoolEntry:
        writer = spool.open_writer()
        writer.write(b"body")
        return result_of(writer.commit(make_envelope()))

    def test_write_read(self) -> None:
        """
        No state reads as C{None}; a written state reads back, UTF-8 intact,
        and a later write replaces it.
        """
        spool = self.recovered(self.tmp())
        entry = self.entry(spool)
        self.assertIsNone(result_of(spool.read_state(entry)))
        result_of(spool.write_state(entry, {"rcpt": {"用户@例子.广告": "deferred"}}))
        self.assertEqual(
            result_of(spool.read_state(entry)), {"rcpt": {"用户@例子.广告": "deferred"}}
        )
        result_of(spool.write_state(entry, {"attempts": 2}))
        self.assertEqual(result_of(spool.read_state(entry)), {"attempts": 2})
        self.assertEqual(stat.S_IMODE(os.stat(entry.state_path).st_mode), 0o600)
        self.assertEqual(
            os.listdir(os.path.dirname(entry.state_path)), [entry.queue_id + ".json"]
        )

    def test_atomic_replace(self) -> None:
        """
        State goes to a temporary file that is fsynced, renamed over the old
        state, and the directory fsynced.
        """
        ops = FaultyFileOps()
        spool = self.recovered(self.tmp(), fileops=ops)
        entry = self.entry(spool)
        ops.calls.clear()
        result_of(spool.write_state(entry, {"x": 1}))
        steps = [name for name, _ in ops.calls]
        self.assertEqual(
            steps, ["create", "write", "fsync", "replace", "fsync_directory"]
        )
        self.assertTrue(ops.calls[0][1].endswith(".tmp"))
        self.assertEqual(ops.calls[3][1], entry.state_path)

    def test_failed_write_keeps_old(self) -> None:
        """
        A failed state write raises L{SpoolFullError}, keeps the old state and
        leaves no temporary file.
        """
        ops = FaultyFileOps()
        spool = self.recovered(self.tmp(), fileops=ops)
        entry = self.entry(spool)
        result_of(spool.write_state(entry, {"v": 1}))
        ops.fail_writes_to = ".tmp"
        self.assertRaises(SpoolFullError, result_of, spool.write_state(entry, {"v": 2}))
        self.assertEqual(result_of(spool.read_state(entry)), {"v": 1})
        self.assertEqual(
            os.listdir(os.path.dirname(entry.state_path)), [entry.queue_id + ".json"]
        )

    def test_last_write_wins(self) -> None:
        """
        State writes for one entry run one after another in call order, so
        the last one called is the one on disk.
        """
        pool = ManualThreadPool()
        spool = self.recovered(self.tmp(), pool=pool)
        pool.run_all()
        writer = spool.open_writer()
        d = writer.commit(make_envelope())
        pool.run_all()
        entry = result_of(d)
        first = Deferred.fromCoroutine(spool.write_state(entry, {"v": 1}))
        second = Deferred.fromCoroutine(spool.write_state(entry, {"v": 2}))
        self.assertEqual(len(pool.jobs), 1)
        pool.run_all()
        result_of(first)
        result_of(second)
        read = Deferred.fromCoroutine(spool.read_state(entry))
        pool.run_all()
        self.assertEqual(result_of(read), {"v": 2})

    def test_corrupt_state(self) -> None:
        """
        An unreadable state file reads as C{None} (start over: duplicates,
        never loss) and is logged.
        """
        spool = self.recovered(self.tmp())
        entry = self.entry(spool)
        for data in (b"[1]", b"{bad", b"\xff"):
            Path(entry.state_path).write_bytes(data)
            self.assertIsNone(result_of(spool.read_state(entry)))

    def test_remove(self) -> None:
        """
        Removal deletes envelope, message and state; the envelope goes first
        and is made durable before the others go.
        """
        root = self.tmp()
        ops = FaultyFileOps()
        spool = self.recovered(root, fileops=ops)
        entry = self.entry(spool)
        result_of(spool.write_state(entry, {"done": True}))
        ops.calls.clear()
        result_of(spool.remove(entry))
        self.assertEqual(
            ops.calls,
            [
                ("unlink", entry.envelope_path),
                ("fsync_directory", str(root / "queue")),
                ("unlink", entry.message_path),
                ("unlink", entry.state_path),
            ],
        )
        self.assertEqual(names(root / "queue"), [])
        self.assertEqual(names(root / "state"), [])
        self.assertEqual(spool.entry_count, 0)
        result_of(spool.remove(entry))  # again: nothing to do, no error

    def test_remove_interrupted(self) -> None:
        """
        A removal cut short after the envelope went leaves nothing that
        recovery would deliver again.
        """
        root = self.tmp()
        ops = FaultyFileOps()
        spool = self.recovered(root, fileops=ops)
        entry = self.entry(spool)
        result_of(spool.write_state(entry, {"done": True}))
        ops.faults["fsync_directory"] = ("queue", errno.EIO)
        self.assertRaises(SpoolError, result_of, spool.remove(entry))
        again = self.reopen(root)
        self.assertEqual(result_of(again.recover()), [])
        self.assertEqual(names(root / "queue"), [])
        self.assertEqual(names(root / "state"), [])


# --------------------------------------------------------------------------
# The root's lock


def tree(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """
    Everything under C{root}: directories map to C{None}, files to their
    bytes and inode (so a replaced file shows).
    """
    found: dict[str, tuple[bytes, int] | None] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(directory, name), root)] = None
        for name in files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = (
                Path(path).read_bytes(),
                os.stat(path).st_ino,
            )
    return found


class LogCapture:
    """
    Collects the events logged during a test.
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(  # type: ignore[attr-defined]
            globalLogPublisher.removeObserver, self.events
        )

    def logged(self, text: str) -> list[dict[str, Any]]:
        """
        The events whose format contains C{text}.
        """
        return [e for e in self.events if text in (e.get("log_format") or "")]


class LockTests(LogCapture, SpoolTestMixin, SynchronousTestCase):
    """
    One process at a time uses a spool root: a second one fails at start.
    """

    def test_second_spool_refused(self) -> None:
        """
        While one spool holds the root, another one's L{Spool.recover} and
        L{Spool.acquire} fail with L{SpoolInUseError} naming the directory
        and saying another process uses it; the lock file is 0600 and
        nothing was cleaned up by the refused spool.
        """
        root = self.tmp()
        first = self.recovered(root)
        (root / "incoming" / f"{'3' * 20}.eml").write_bytes(b"partial")
        second = self.make_spool(root)
        for attempt in (second.recover, second.acquire):
            error = self.assertRaises(SpoolInUseError, result_of, attempt())
            self.assertIn(str(root), str(error))
            self.assertIn("in use by another process", str(error))
        self.assertIsInstance(error, SpoolError)
        self.assertRaises(RuntimeError, second.open_writer)
        self.assertEqual(names(root / "incoming"), [f"{'3' * 20}.eml"])
        self.assertEqual(stat.S_IMODE(os.stat(root / "lock").st_mode), 0o600)
        self.assertTrue(first.writable())

    def test_close_releases(self) -> None:
        """
        After L{Spool.close} another spool takes the root, and the closed
        one can no longer take it back.
        """
        root = self.tmp()
        first = self.recovered(root)
        result_of(first.close())
        second = self.make_spool(root)
        self.assertEqual(result_of(second.recover()), [])
        self.assertRaises(RuntimeError, result_of, first.acquire())
        self.assertRaises(SpoolInUseError, result_of, self.make_spool(root).acquire())

    def test_acquire_creates_root_and_is_idempotent(self) -> None:
        """
        L{Spool.acquire} creates the root (and its parents, 0700) with only
        the lock file in it, and a second call, or L{Spool.recover}
        afterwards, does not open the lock again.
        """
        root = self.tmp() / "a" / "b"
        ops = FaultyFileOps()
        spool = self.make_spool(root, fileops=ops)
        result_of(spool.acquire())
        self.assertEqual(names(root), ["lock"])
        self.assertEqual(stat.S_IMODE(os.stat(root).st_mode), 0o700)
        result_of(spool.acquire())
        result_of(spool.recover())
        self.assertEqual([n for n, _ in ops.calls].count("open_lock"), 1)

    def test_wait_then_acquire(self) -> None:
        """
        With C{wait}, L{Spool.acquire} retries every 0.25 s of the injected
        clock, logs once that it waits (naming the directory), and succeeds
        as soon as the holder closes.
        """
        root = self.tmp()
        clock = ThreadsClock()
        first = self.recovered(root)
        ops = FaultyFileOps()
        second = self.make_spool(root, clock=clock, fileops=ops)
        d = Deferred.fromCoroutine(second.acquire(wait=1.0))
        self.assertNoResult(d)
        clock.advance(0.25)
        self.assertNoResult(d)
        result_of(first.close())
        clock.advance(0.24)
        self.assertNoResult(d)
        clock.advance(0.01)
        self.assertIsNone(result_of(d))
        self.assertEqual([n for n, _ in ops.calls].count("open_lock"), 3)
        waits = self.logged("waiting up to")
        self.assertEqual(len(waits), 1)
        self.assertEqual(waits[0]["directory"], str(root))
        self.assertRaises(SpoolInUseError, result_of, self.make_spool(root).acquire())

    def test_wait_gives_up(self) -> None:
        """
        When the holder keeps the lock for all of C{wait}, L{Spool.acquire}
        tries at 0, 0.25, 0.5, 0.75 and 1 s, then fails with
        L{SpoolInUseError}; the wait is logged once.
        """
        root = self.tmp()
        clock = ThreadsClock()
        self.recovered(root)
        ops = FaultyFileOps()
        second = self.make_spool(root, clock=clock, fileops=ops)
        d = Deferred.fromCoroutine(second.acquire(wait=1.0))
        for _ in range(3):
            clock.advance(0.25)
            self.assertNoResult(d)
        clock.advance(0.25)
        self.assertRaises(SpoolInUseError, result_of, d)
        self.assertEqual([n for n, _ in ops.calls].count("open_lock"), 5)
        self.assertEqual(len(self.logged("waiting up to")), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_close_while_waiting(self) -> None:
        """
        Closing a spool that waits for the lock ends the wait with
        L{RuntimeError} and leaves no lock taken.
        """
        root = self.tmp()
        clock = ThreadsClock()
        first = self.recovered(root)
        second = self.make_spool(root, clock=clock)
        d = Deferred.fromCoroutine(second.acquire(wait=5.0))
        result_of(second.close())
        result_of(first.close())
        clock.advance(0.25)
        self.assertRaises(RuntimeError, result_of, d)
        self.assertEqual(result_of(self.make_spool(root).recover()), [])

    def test_lock_file_replaced(self) -> None:
        """
        A lock won on a lock file that was removed meanwhile (its root
        adopted away by its last user) is taken again on the file now
        named C{lock}, so that it excludes the next process.
        """
        root = self.tmp()
        lock = root / "lock"

        @implementer(IFileOps)
        class RacingFileOps(FaultyFileOps):
            raced = False

            def lock(self, fd: int, blocking: bool) -> bool:
                if not self.raced and lock.exists():
                    self.raced = True
                    os.unlink(lock)
                return super().lock(fd, blocking)

        ops = RacingFileOps()
        spool = self.make_spool(root, fileops=ops)
        result_of(spool.acquire())
        self.assertTrue(ops.raced)
        self.assertEqual([n for n, _ in ops.calls].count("open_lock"), 2)
        self.assertRaises(SpoolInUseError, result_of, self.make_spool(root).acquire())

    def test_recovery_leaves_workers_and_lock(self) -> None:
        """
        Recovery only scans its layout: a C{workers/} directory under the
        root, with spool files of its own, and the lock file survive it
        unchanged.
        """
        root = self.tmp()
        self.recovered(root)
        other = root / "workers" / "1"
        for part in ("incoming", "queue", "state"):
            (other / part).mkdir(parents=True)
        (other / "incoming" / f"{'4' * 20}.eml").write_bytes(b"partial")
        (other / "queue" / f"{'4' * 20}.eml").write_bytes(b"no envelope")
        (other / "queue" / f"{'5' * 20}.json").write_bytes(b"{bad")
        (other / "state" / f"{'6' * 20}.json").write_bytes(b"{}")
        (other / "lock").write_bytes(b"")
        before = tree(root)
        again = self.reopen(root)
        self.assertEqual(result_of(again.recover()), [])
        self.assertEqual(tree(root), before)


# --------------------------------------------------------------------------
# Adopting another root's entries


class AdoptTests(LogCapture, SpoolTestMixin, SynchronousTestCase):
    """
    The entries of a root no process uses any more move into a live spool,
    never lost on the way.
    """

    def fill(
        self, root: Path, messages: list[tuple[bytes, dict[str, Any] | None]]
    ) -> list[SpoolEntry]:
        """
        Commit C{messages} (bytes, delivery state or C{None}) into the
        spool at C{root}, then close it, as a worker that stopped would.
        """
        spool = self.recovered(root)
        entries = []
        for n, (body, state) in enumerate(messages):
            writer = spool.open_writer()
            writer.write(body)
            entry = result_of(writer.commit(make_envelope(sender=f"s{n}@example.com")))
            if state is not None:
                result_of(spool.write_state(entry, state))
            entries.append(entry)
        self.release(root)
        return entries

    def test_list_root_reads_another_spool(self) -> None:
        """
        A spool lists another root's complete entries with their delivery
        states while that root's owner still holds it, and changes nothing
        there; a root that does not exist lists nothing.
        """
        source, own = self.tmp(), self.tmp()
        entries = self.fill(source, [(b"one\r\n", {"attempts": 2}), (b"two\r\n", None)])
        owner = self.holder(source)
        reader = self.recovered(own)
        before = tree(source)
        listed = result_of(reader.list_root(str(source)))
        self.assertEqual(
            [e for e, _ in listed], sorted(entries, key=lambda e: e.queue_id)
        )
        self.assertEqual([state for _, state in listed], [{"attempts": 2}, None])
        self.assertEqual(tree(source), before)
        self.assertEqual(result_of(reader.list_root(str(own / "none"))), [])
        self.assertTrue(owner)

    def holder(self, root: Path, **kw: Any) -> Spool:
        """
        A spool on C{root} holding its lock, ready to adopt.
        """
        spool = self.make_spool(root, **kw)
        result_of(spool.acquire())
        return spool

    def assertHolds(
        self,
        spool: Spool,
        expected: list[SpoolEntry],
        bodies: dict[str, bytes],
        states: dict[str, dict[str, Any] | None],
    ) -> None:
        """
        C{spool} recovers exactly the C{expected} entries (same ids and
        envelopes), with their message bytes and delivery states (by id).
        """
        entries = result_of(spool.recover())
        self.assertEqual(
            [(e.queue_id, e.envelope, e.size) for e in entries],
            sorted((e.queue_id, e.envelope, e.size) for e in expected),
        )
        for entry in entries:
            self.assertEqual(
                Path(entry.message_path).read_bytes(), bodies[entry.queue_id]
            )
            self.assertEqual(
                result_of(spool.read_state(entry)), states.get(entry.queue_id)
            )

    def test_moves_entries(self) -> None:
        """
        L{Spool.adopt} moves every complete entry, keeping its queue id,
        envelope, message bytes and delivery state, returns their number,
        logs it, and removes the emptied source root; recovery then returns
        the adopted entries with this spool's own.
        """
        source, root = self.tmp(), self.tmp()
        moved = self.fill(
            source,
            [(b"one\r\n", {"rcpt": "deferred"}), (b"two\r\n" * 1000, None)],
        )
        (own,) = self.fill(root, [(b"own\r\n", None)])
        bodies = {e.queue_id: Path(e.message_path).read_bytes() for e in [*moved, own]}
        spool = self.holder(root)
        self.assertEqual(result_of(spool.adopt(str(source))), 2)
        self.assertFalse(source.exists())
        self.assertEqual(
            names(root / "queue"),
            sorted(
                f"{e.queue_id}{s}" for e in [*moved, own] for s in (".eml", ".json")
            ),
        )
        self.assertEqual(names(root / "state"), [moved[0].queue_id + ".json"])
        (info,) = self.logged("adopted {count}")
        self.assertEqual((info["count"], info["source"]), (2, str(source)))
        self.assertHolds(
            spool, [*moved, own], bodies, {moved[0].queue_id: {"rcpt": "deferred"}}
        )

    def test_leftovers_handled_like_recovery(self) -> None:
        """
        What is not a complete entry in the source is treated as its own
        recovery would: partial files and a message without envelope are
        removed, an envelope without message stays in the source's
        C{corrupt/} (logged critical); the source root is then kept, with a
        warning naming what remains, and so is anything not the spool's.
        """
        source, root = self.tmp(), self.tmp()
        (entry,) = self.fill(source, [(b"complete", None)])
        broken, unfinished = self.fill(source, [(b"broken", None), (b"half", None)])
        os.unlink(broken.message_path)
        os.unlink(unfinished.envelope_path)
        (source / "incoming" / f"{'7' * 20}.eml").write_bytes(b"partial")
        (source / "workers").mkdir()
        spool = self.holder(root)
        self.assertEqual(result_of(spool.adopt(source)), 1)
        self.assertEqual(names(source / "incoming"), [])
        self.assertEqual(names(source / "queue"), [])
        self.assertEqual(names(source / "corrupt"), [broken.queue_id + ".json"])
        self.assertEqual(
            names(source), ["corrupt", "incoming", "lock", "queue", "state", "workers"]
        )
        (kept,) = self.logged("is kept")
        self.assertEqual(
            kept["remains"], [f"corrupt/{broken.queue_id}.json", "workers"]
        )
        critical = self.logged("is corrupt")
        self.assertEqual([e["queue_id"] for e in critical], [broken.queue_id])
        self.assertEqual(critical[0]["corrupt"], str(source / "corrupt"))
        self.assertEqual(
            [e.queue_id for e in result_of(spool.recover())], [entry.queue_id]
        )

    def test_id_taken_stays_in_source(self) -> None:
        """
        An entry whose queue id this spool has already stays whole in the
        source, with a warning, and this spool's entry is untouched; the
        source root is kept.
        """
        source, root = self.tmp(), self.tmp()
        (theirs,) = self.fill(source, [(b"theirs", {"a": 1})])
        spool = self.recovered(root, new_queue_id=lambda: theirs.queue_id)
        writer = spool.open_writer()
        writer.write(b"ours")
        ours = result_of(writer.commit(make_envelope(sender="ours@example.com")))
        self.release(root)
        before = tree(source)
        del before["lock"]
        spool = self.holder(root)
        self.assertEqual(result_of(spool.adopt(source)), 0)
        after = tree(source)
        del after["lock"]
        self.assertEqual(after, before)
        (warning,) = self.logged("is not adopted")
        self.assertEqual(warning["queue_id"], theirs.queue_id)
        self.assertEqual(names(root / "state"), [])
        self.assertEqual(result_of(spool.recover()), [ours])
        self.assertEqual(Path(ours.message_path).read_bytes(), b"ours")

    def test_locked_source_untouched(self) -> None:
        """
        A source root whose lock another process holds is refused with
        L{SpoolInUseError} naming it, and nothing in it changes; the
        adopting spool can still recover.
        """
        source, root = self.tmp(), self.tmp()
        self.fill(source, [(b"busy", None)])
        live = self.recovered(source)
        (source / "incoming" / f"{'8' * 20}.eml").write_bytes(b"partial")
        before = tree(source)
        spool = self.holder(root)
        error = self.assertRaises(SpoolInUseError, result_of, spool.adopt(source))
        self.assertIn(str(source), str(error))
        self.assertEqual(tree(source), before)
        self.assertEqual(result_of(spool.recover()), [])
        self.assertTrue(live.writable())

    def test_order(self) -> None:
        """
        An entry moves as: message and state linked in, their directories
        fsynced, the envelope linked last and C{queue/} fsynced; then the
        source's envelope unlinked and made durable, its state and message
        unlinked and their directories fsynced. The emptied source goes
        last: layout directories, lock file, root, and its parent fsynced.
        """
        source, root = self.tmp(), self.tmp()
        (entry,) = self.fill(source, [(b"x", {"s": 1})])
        ops = FaultyFileOps()
        spool = self.holder(root, fileops=ops)
        ops.calls.clear()
        result_of(spool.adopt(source))
        base = self._tmp_path
        steps = [
            (name, os.path.relpath(path, base))
            for name, path in ops.calls
            if name in ("link", "unlink", "fsync_directory", "rmdir")
        ]
        q = entry.queue_id
        src, dst = source.name, root.name
        self.assertEqual(
            steps,
            [
                ("fsync_directory", dst),  # its layout, made now
                ("link", f"{dst}/queue/{q}.eml"),
                ("link", f"{dst}/state/{q}.json"),
                ("fsync_directory", f"{dst}/queue"),
                ("fsync_directory", f"{dst}/state"),
                ("link", f"{dst}/queue/{q}.json"),
                ("fsync_directory", f"{dst}/queue"),
                ("unlink", f"{src}/queue/{q}.json"),
                ("fsync_directory", f"{src}/queue"),
                ("unlink", f"{src}/state/{q}.json"),
                ("unlink", f"{src}/queue/{q}.eml"),
                ("fsync_directory", f"{src}/state"),
                ("fsync_directory", f"{src}/queue"),
                ("rmdir", f"{src}/incoming"),
                ("rmdir", f"{src}/queue"),
                ("rmdir", f"{src}/state"),
                ("rmdir", f"{src}/corrupt"),
                ("unlink", f"{src}/lock"),
                ("rmdir", src),
                ("fsync_directory", "."),
            ],
        )

    def test_misuse(self) -> None:
        """
        L{Spool.adopt} needs this spool's lock and must come before
        L{Spool.recover} (L{RuntimeError} otherwise); it refuses the
        spool's own root (L{ValueError}); a source that does not exist
        adopts nothing and is not created.
        """
        source, root = self.tmp(), self.tmp()
        self.fill(source, [(b"x", None)])
        spool = self.make_spool(root)
        self.assertRaises(RuntimeError, result_of, spool.adopt(source))
        result_of(spool.acquire())
        self.assertRaises(ValueError, result_of, spool.adopt(root))
        missing = self.tmp()
        self.assertEqual(result_of(spool.adopt(missing)), 0)
        self.assertFalse(missing.exists())
        result_of(spool.recover())
        self.assertRaises(RuntimeError, result_of, spool.adopt(source))
        self.assertEqual(len(names(source / "queue")), 2)

    def test_crash_at_every_step(self) -> None:
        """
        Whichever file operation of an adoption the process dies at, every
        entry is complete (envelope, message bytes and state) in at least
        one of the two roots; and the next start's adoption then leaves each
        entry exactly once, intact, in the adopting spool and removes the
        source root.
        """
        messages: list[tuple[bytes, dict[str, Any] | None]] = [
            (b"first\r\n", {"rcpt": "done"}),
            (b"second\r\n" * 100, None),
        ]
        die_at = 0
        while True:
            die_at += 1
            source, root = self.tmp(), self.tmp()
            moved = self.fill(source, messages)
            bodies = {e.queue_id: b for e, (b, _) in zip(moved, messages, strict=True)}
            states = {e.queue_id: s for e, (_, s) in zip(moved, messages, strict=True)}
            ops = DyingFileOps()
            spool = self.holder(root, fileops=ops)
            ops.die_at = ops.count + die_at
            try:
                result_of(spool.adopt(source))
            except SpoolError as e:
                self.assertIsInstance(e.__cause__, CrashedError)
                finished = False
            else:
                finished = True
            self.release(root)

            for entry in moved:
                self.assertTrue(
                    any(
                        self.complete_in(
                            place, entry, bodies[entry.queue_id], states[entry.queue_id]
                        )
                        for place in (source, root)
                    ),
                    f"{entry.queue_id} lost when dying at call {die_at}",
                )
            restarted = self.holder(root)
            result_of(restarted.adopt(source))
            self.assertFalse(source.exists(), die_at)
            self.assertHolds(restarted, moved, bodies, states)
            self.release(root)
            if finished:
                break
        self.assertGreater(die_at, 30)

    def complete_in(
        self,
        root: Path,
        entry: SpoolEntry,
        body: bytes,
        state: dict[str, Any] | None,
    ) -> bool:
        """
        Whether C{root} holds C{entry} complete: its envelope, its exact
        message bytes and, if it had one, its delivery state.
        """
        queue = root / "queue"
        envelope = queue / f"{entry.queue_id}.json"
        message = queue / f"{entry.queue_id}.eml"
        state_file = root / "state" / f"{entry.queue_id}.json"
        if not (envelope.exists() and message.exists()):
            return False
        self.assertEqual(Envelope.from_json(envelope.read_bytes()), entry.envelope)
        self.assertEqual(message.read_bytes(), body)
        if state is not None:
            self.assertEqual(json.loads(state_file.read_bytes()), state)
        return True


# --------------------------------------------------------------------------
# Real thread pool and reactor


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=1, maxthreads=4, name="test-spool")
    pool.start()
    yield pool
    pool.stop()


async def _drained(writer: SpoolWriter) -> None:
    d: Deferred[None] = Deferred()
    writer.on_drained(lambda: d.callback(None))
    await d


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_real_pool_round_trip(tmp_path: Path, threadpool: ThreadPool) -> None:
    """
    With a real thread pool and reactor, concurrent writers commit their
    messages intact and a fresh spool recovers all of them.
    """
    from twisted.internet import defer, reactor

    spool = Spool(str(tmp_path), reactor, threadpool, min_free_bytes=0)
    assert await spool.recover() == []

    async def one(n: int) -> SpoolEntry:
        writer = spool.open_writer()
        for i in range(50):
            if not writer.write(b"%d:%d " % (n, i) * 1000):
                await _drained(writer)
        return await writer.commit(make_envelope(sender=f"s{n}@example.com"))

    entries = await defer.gatherResults(
        [Deferred.fromCoroutine(one(n)) for n in range(8)]
    )
    for n, entry in enumerate(entries):
        with open(entry.message_path, "rb") as f:
            assert f.read() == b"".join(b"%d:%d " % (n, i) * 1000 for i in range(50))
    await spool.close()
    again = Spool(str(tmp_path), reactor, threadpool, min_free_bytes=0)
    assert await again.recover() == sorted(entries, key=lambda e: e.queue_id)
    assert os.listdir(tmp_path / "incoming") == []
    await again.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_real_pool_memory_bounded(tmp_path: Path, threadpool: ThreadPool) -> None:
    """
    Writing 25 MB in 64 KiB chunks through a real thread pool, pausing when
    asked, keeps the writer's buffered bytes within the buffer plus one chunk,
    and every byte lands in order.
    """
    from twisted.internet import reactor

    spool = Spool(str(tmp_path), reactor, threadpool, min_free_bytes=0)
    await spool.recover()
    writer = spool.open_writer()
    digest = hashlib.sha256()
    peak = pauses = 0
    for i in range(400):
        chunk = i.to_bytes(4, "big") * 16384
        digest.update(chunk)
        ok = writer.write(chunk)
        peak = max(peak, writer.buffered_bytes)
        if not ok:
            pauses += 1
            await _drained(writer)
    entry = await writer.commit(make_envelope())
    assert peak <= 256 * 1024 + 64 * 1024
    assert entry.size == 25 * 1024 * 1024
    with open(entry.message_path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").digest() == digest.digest()
    await spool.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_real_pool_abort_and_full(tmp_path: Path, threadpool: ThreadPool) -> None:
    """
    Through a real thread pool, an abort in the middle of writing and a full
    disk both leave C{incoming/} and C{queue/} empty.
    """
    from twisted.internet import reactor

    ops = FaultyFileOps()
    spool = Spool(str(tmp_path), reactor, threadpool, fileops=ops, min_free_bytes=0)
    await spool.recover()
    writer = spool.open_writer()
    writer.write(b"x" * 200_000)
    await writer.abort()
    ops.write_budget = 100_000
    writer = spool.open_writer()
    for _ in range(10):
        if not writer.write(b"y" * 65536):
            await _drained(writer)
    with pytest.raises(SpoolFullError):
        await writer.commit(make_envelope())
    assert writer.full
    assert os.listdir(tmp_path / "incoming") == []
    assert os.listdir(tmp_path / "queue") == []
    await spool.close()


# --------------------------------------------------------------------------
# Crash safety: a real process killed with SIGKILL

_CHILD = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.python.threadpool import ThreadPool
    from mdgateway.queue.envelope import Envelope, Recipient
    from mdgateway.queue.spool import Spool

    def body(n):
        return b"Subject: %d\\r\\n\\r\\n" % n + bytes([n % 251]) * (n * 7919 % 300000)

    async def main():
        pool = ThreadPool(1, 4)
        pool.start()
        spool = Spool(sys.argv[1], reactor, pool, min_free_bytes=0)
        await spool.recover()
        n = int(sys.argv[2])
        while True:
            writer = spool.open_writer()
            data = body(n)
            for i in range(0, len(data), 65536):
                if not writer.write(data[i:i + 65536]):
                    d = Deferred()
                    writer.on_drained(lambda: d.callback(None))
                    await d
            entry = await writer.commit(Envelope(
                queue_id="", received_at=reactor.seconds(), sender="",
                recipients=(Recipient("r@example.org"),)))
            sys.stdout.write("%s %d\\n" % (entry.queue_id, n))
            sys.stdout.flush()
            n += 1

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
    reactor.run()
    """
)


def _child_body(n: int) -> bytes:
    return b"Subject: %d\r\n\r\n" % n + bytes([n % 251]) * (n * 7919 % 300000)


@pytest.mark.timeout(120)
def test_sigkill_after_commit(tmp_path: Path) -> None:
    """
    A child process commits entries and prints each id once commit returns;
    it is SIGKILLed right after a print, in the middle of its next message.
    Every printed id is recovered complete with its exact bytes, every
    envelope found in C{queue/} has its whole message, and nothing partial
    is left in C{queue/} or C{incoming/} after recovery. Repeated on the same
    directory, so each run also recovers after the previous kill.
    """
    acknowledged: dict[str, int] = {}
    start = 0
    for round_, kill_after in enumerate((1, 7, 15)):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path), str(start)],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).parent.parent,
        )
        assert child.stdout is not None
        try:
            for _ in range(kill_after):
                line = child.stdout.readline()
                assert line, f"child ended early in round {round_}"
                queue_id, number = line.decode().split()
                acknowledged[queue_id] = int(number)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        start += 1000

        # Before recovery: every envelope in queue/ has its message.
        for name in os.listdir(tmp_path / "queue"):
            if name.endswith(".json"):
                data = (tmp_path / "queue" / name).read_bytes()
                envelope = Envelope.from_json(data)
                assert (tmp_path / "queue" / (envelope.queue_id + ".eml")).exists()

        clock = ThreadsClock()
        # SynchronousThreadPool is a duck-typed stand-in for ThreadPool.
        pool = SynchronousThreadPool()
        spool = Spool(str(tmp_path), clock, pool, min_free_bytes=0)  # type: ignore[arg-type]
        entries = {e.queue_id: e for e in result_of(spool.recover())}
        assert set(acknowledged) <= set(entries)
        for queue_id, n in acknowledged.items():
            with open(entries[queue_id].message_path, "rb") as f:
                assert f.read() == _child_body(n)
        for entry in entries.values():  # committed but maybe not printed: whole too
            with open(entry.message_path, "rb") as f:
                data = f.read()
            assert data == _child_body(int(data.split(b"\r\n", 1)[0].split()[1]))
        assert os.listdir(tmp_path / "incoming") == []
        queued = sorted(os.listdir(tmp_path / "queue"))
        assert queued == sorted(f"{q}{s}" for q in entries for s in (".eml", ".json"))
        assert os.listdir(tmp_path / "corrupt") == []
        result_of(spool.close())  # its lock, so the next child can start
