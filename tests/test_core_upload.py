"""
Uploads to Core when the answer comes early or the other side goes away
(issue 16, item 6), on both sides of the wire:

- the client's body producer (L{mdgateway.scan.upload.FileUpload}) owns its
  file, reports done with its last byte, and, stopped by an early answer,
  never reports a failure that Twisted would log as critical;
- the emulator takes the body away from the request before its worker
  thread reads it, and drops a client that went away without an error;
- under load (hundreds of concurrent uploads on a busy cooperator) neither
  side logs an error or a critical event.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task, threads
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mdgateway.emulator.app import CoreEmulator, EmulatorConfig, EmulatorServer
from mdgateway.policy.profiles import CoreProfile, CoreServer
from mdgateway.run.reactor import global_reactor
from mdgateway.scan.client import CoreClient, build_http_client
from mdgateway.scan.errors import Condition, CoreError
from mdgateway.scan.runtime import CoreRuntime
from mdgateway.scan.upload import FileUpload, UploadChangedError
from tests.listening import listen_local, stop_listening

reactor = global_reactor()


class _Consumer:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)


class _Steps:
    """
    A cooperator whose steps the test runs one at a time.
    """

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []
        self.cooperator = task.Cooperator(
            scheduler=self._schedule,
            terminationPredicateFactory=lambda: lambda: True,
            started=True,
        )

    def _schedule(self, call: Callable[[], None]) -> IDelayedCall:
        """
        Hold C{call} for the next L{step}; cancelling the call drops it.
        """
        self.pending.append(call)

        def cancel(_: DelayedCall) -> None:
            if call in self.pending:
                self.pending.remove(call)

        return DelayedCall(0, call, (), {}, cancel, lambda _: None)

    def step(self) -> None:
        pending, self.pending = self.pending, []
        for call in pending:
            call()


def _open_fds(path: str) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                count += 1
        except OSError:
            pass
    return count


class FileUploadTests(SynchronousTestCase):
    """
    L{FileUpload} on a cooperator stepped by hand.
    """

    def setUp(self) -> None:
        self.steps = _Steps()
        self.path = self.mktemp()
        Path(self.path).write_bytes(b"0123456789" * 3)

    def upload(self) -> FileUpload:
        return FileUpload(self.path, self.steps.cooperator, block=10)

    def test_done_with_last_byte(self) -> None:
        """
        The body is written in blocks, exactly C{length} bytes, and the
        result fires in the step that wrote the last block (no extra step
        to find the end), with the file closed.
        """
        upload = self.upload()
        self.assertEqual(upload.length, 30)
        consumer = _Consumer()
        finished = upload.startProducing(consumer)
        self.assertEqual(_open_fds(os.path.abspath(self.path)), 1)
        self.steps.step()
        self.steps.step()
        self.assertNoResult(finished)
        self.steps.step()
        self.successResultOf(finished)
        self.assertEqual(b"".join(consumer.data), b"0123456789" * 3)
        self.assertEqual(len(consumer.data), 3)
        self.assertTrue(upload.closed)
        self.assertEqual(self.steps.pending, [])

    def test_stopped_early(self) -> None:
        """
        Stopped mid-way (an early answer): the file is closed, nothing more
        is written, and the result never fires, neither success nor the
        failure Twisted would log at critical level.
        """
        upload = self.upload()
        consumer = _Consumer()
        finished = upload.startProducing(consumer)
        self.steps.step()
        upload.stopProducing()
        self.assertTrue(upload.closed)
        self.assertEqual(_open_fds(os.path.abspath(self.path)), 0)
        for _ in range(3):
            self.steps.step()
        self.assertNoResult(finished)
        self.assertEqual(len(consumer.data), 1)
        upload.stopProducing()  # twice is harmless

    def test_cancelled(self) -> None:
        """
        Cancelling the result (the request's own cancellation) stops the
        upload and closes the file.
        """
        upload = self.upload()
        finished = upload.startProducing(_Consumer())
        finished.cancel()
        self.failureResultOf(finished)
        self.assertTrue(upload.closed)

    def test_pause_resume(self) -> None:
        """
        Paused, no block is written; resumed, the upload finishes.
        """
        upload = self.upload()
        consumer = _Consumer()
        finished = upload.startProducing(consumer)
        upload.pauseProducing()
        self.steps.step()
        self.assertEqual(consumer.data, [])
        upload.resumeProducing()
        for _ in range(3):
            self.steps.step()
        self.successResultOf(finished)
        upload.resumeProducing()  # after the end: nothing happens
        upload.pauseProducing()

    def test_file_shrank(self) -> None:
        """
        A file shorter than its length at creation fails the upload (it
        changed on disk) instead of sending a short body.
        """
        upload = self.upload()
        Path(self.path).write_bytes(b"short")
        finished = upload.startProducing(_Consumer())
        self.steps.step()  # the five bytes there are
        self.steps.step()  # then the end, 25 bytes early
        self.failureResultOf(finished, UploadChangedError)
        self.assertTrue(upload.closed)

    def test_not_started(self) -> None:
        """
        An upload that never started (connection refused) holds no file.
        """
        upload = self.upload()
        self.assertTrue(upload.closed)
        upload.stopProducing()


@implementer(ILogObserver)
class _Events:
    """
    Collects the log events at error level or above.
    """

    def __init__(self) -> None:
        self.bad: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level in (LogLevel.error, LogLevel.critical):
            self.bad.append(event)

    def texts(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.bad]


@pytest.fixture
def bad_events() -> Iterator[_Events]:
    events = _Events()
    globalLogPublisher.addObserver(events)
    yield events
    globalLogPublisher.removeObserver(events)


class _EarlyAnswers(Factory):
    """
    Makes L{_EarlyAnswer} connections and keeps them, so the test can count
    the bytes each received and close them at the end.
    """

    def __init__(self) -> None:
        self.connections: list[_EarlyAnswer] = []

    def buildProtocol(self, addr: object) -> _EarlyAnswer:
        connection = _EarlyAnswer()
        connection.factory = self
        self.connections.append(connection)
        return connection


class _EarlyAnswer(Protocol):
    """
    Answers 503 as soon as the request headers are in, before reading the
    body; closes the connection when C{close} is set.
    """

    close = True

    def connectionMade(self) -> None:
        self.buffer = b""
        self.answered = False
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.answered:
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        self.answered = True
        body = b'{"err": "Server is too busy. Try again later."}'
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 503 Service Unavailable\r\n"
            b"Content-Type: application/json\r\n"
            + (b"Connection: close\r\n" if self.close else b"")
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        if self.close:
            self.transport.loseConnection()  # type: ignore[union-attr]


def _client(url: str, **profile: Any) -> tuple[CoreClient, Any]:
    profile.setdefault("poll_interval", 0.01)
    core = CoreProfile(name="t", servers=(CoreServer(url),), **profile)
    http, pool = build_http_client(reactor, core)
    return CoreClient(core.servers[0], core, http, reactor), pool


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("close", [True, False], ids=["closes", "keeps-open"])
async def test_early_503_while_uploading(
    tmp_path: Path, bad_events: _Events, close: bool
) -> None:
    """
    A server that answers 503 before reading the body, while 8 MiB are
    still being sent: the client reports I{busy}, stops sending, closes
    its file, and nothing is logged at error or critical level (the old
    producer logged "Error writing request ... read of closed file").
    """
    factory = _EarlyAnswers()
    _EarlyAnswer.close = close
    port, number = await listen_local(factory)
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(8 << 20))
    client, pool = _client(f"http://127.0.0.1:{number}")
    try:
        for _ in range(3):
            with pytest.raises(CoreError) as caught:
                await client.submit(str(path), "big.bin")
            assert caught.value.condition is Condition.BUSY
            assert caught.value.status == 503
        # Let every postponed cooperator step and connection close happen.
        for _ in range(20):
            await task.deferLater(reactor, 0.02, lambda: None)
        assert _open_fds(str(path)) == 0
        received = sum(c.received for c in factory.connections)
        assert received < 3 * (8 << 20)  # the rest was not sent
        assert bad_events.texts() == []
    finally:
        await pool.closeCachedConnections()
        await stop_listening(port)
        for connection in factory.connections:
            ITCPTransport(connection.transport).abortConnection()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_client_gone_mid_upload(bad_events: _Events) -> None:
    """
    A client that disconnects halfway through its upload, or after it but
    before the answer (while the upload is examined in a worker thread):
    the emulator logs nothing at error level, frees the queue slot, and
    keeps working.
    """
    held: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def runner(function: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        held.append((function, args, d))
        return d

    emulator = CoreEmulator(reactor, EmulatorConfig(), blocking=runner)
    server = EmulatorServer(reactor, emulator)
    server.start()

    def raw(body: bytes, length: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(
            b"POST /file HTTP/1.1\r\nHost: core\r\nfilename: a.txt\r\n"
            b"Content-Length: %d\r\n\r\n" % length + body
        )
        return s

    try:
        half = raw(b"x" * 1000, 5000)
        await task.deferLater(reactor, 0.05, lambda: None)
        half.close()
        whole = raw(b"y" * 5000, 5000)
        for _ in range(200):
            if held:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        ((function, args, d),) = held
        assert emulator.in_flight == 1
        whole.close()
        for _ in range(200):
            if emulator.counters["gone"] or not server._factory.protocols:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        await task.deferLater(reactor, 0.05, lambda: None)
        # The worker reads the body after the client has gone.
        node = await threads.deferToThread(function, *args)
        d.callback(node)
        assert emulator.counters["gone"] == 1
        assert emulator.results == 1  # the job was registered all the same
        assert bad_events.texts() == []
        client, pool = _client(server.url)
        try:
            held.clear()
            submitting = Deferred.fromCoroutine(client.submit(_tmp_file(), "b.txt"))
            for _ in range(200):
                if held:
                    break
                await task.deferLater(reactor, 0.01, lambda: None)
            ((function, args, d),) = held
            d.callback(function(*args))
            assert len(await submitting) == 32
        finally:
            await pool.closeCachedConnections()
    finally:
        await server.close()


def _tmp_file() -> str:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="mdgw-upload-")
    os.write(fd, b"hello")
    os.close(fd)
    return path


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_load_logs_no_errors(tmp_path: Path, bad_events: _Events) -> None:
    """
    300 uploads of 10 KiB at once through the runtime, against an emulator
    examining them in a thread pool with a small queue (so some get 503),
    while 20 other cooperative tasks keep the global cooperator busy (what
    made the old producer's final step late): every file gets a verdict or
    I{busy}, and neither side logs an error or critical event.
    """
    pool = reactor.getThreadPool()
    emulator = CoreEmulator(
        reactor,
        EmulatorConfig(latency=0.05, queue_size=100),
        blocking=lambda f, *a: threads.deferToThreadPool(reactor, pool, f, *a),
    )
    server = EmulatorServer(reactor, emulator)
    server.start()
    profile = CoreProfile(
        name="load",
        servers=(CoreServer(server.url),),
        poll_interval=0.05,
        concurrency=300,
        failure_threshold=1000,
    )
    runtime = CoreRuntime.from_profile(profile, reactor, queue_bound=1000)
    busy = True

    def spin() -> Iterator[None]:
        while busy:
            sum(range(50_000))
            yield None

    spinners = [task.cooperate(spin()) for _ in range(20)]
    paths = []
    for i in range(300):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(os.urandom(10 << 10))
        paths.append(str(path))

    async def one(path: str) -> str:
        try:
            verdict = await runtime.scan(path, "f.bin")
        except CoreError as e:
            assert e.condition is Condition.BUSY, str(e)
            return "busy"
        return verdict.result

    try:
        outcomes = await gatherResults([Deferred.fromCoroutine(one(p)) for p in paths])
        assert len(outcomes) == 300
        assert set(outcomes) <= {"Allowed", "busy"}
        assert "Allowed" in outcomes
        for _ in range(10):
            await task.deferLater(reactor, 0.02, lambda: None)
        assert bad_events.texts() == []
        assert all(_open_fds(p) == 0 for p in paths[:20])
    finally:
        busy = False
        for spinner in spinners:
            spinner.stop()
        await runtime.close()
        await server.close()
