"""
The Core emulator as a program: the C{mdcore-emulator} twist plugin's
options and service (L{mdgateway.emulator.tap}), the built-in emulator's
listening backlog, and L{EmulatorServer} stopping and starting to listen.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import reactor, task, threads
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.emulator.app import DEFAULT_SANITIZE_TYPES, EmulatorServer
from mdgateway.emulator.tap import Options, makeService
from mdgateway.run.emulator import with_backlog
from tests.test_core_emulator import REPO_ROOT, temp_dir


class TapTests(SynchronousTestCase):
    """
    The C{mdcore-emulator} plugin's options and service.
    """

    def test_defaults(self) -> None:
        """
        Defaults: port 8008 on 127.0.0.1, no latency, the default sanitize
        types, 404 for unknown ids, DLP blocks.
        """
        options = Options()
        options.parseOptions([])
        self.assertEqual((options["port"], options["interface"]), (8008, "127.0.0.1"))
        config = options.config()
        self.assertEqual(config.latency, 0.0)
        self.assertEqual(config.sanitize_types, DEFAULT_SANITIZE_TYPES)
        self.assertEqual(config.not_found_status, 404)
        self.assertIs(config.dlp_block, True)
        self.assertIsNone(config.apikey)

    def test_knobs(self) -> None:
        """
        Every knob reaches the config.
        """
        options = Options()
        options.parseOptions(
            [
                "--port", "9000", "--latency", "0.5", "--queue-size", "7",
                "--apikey", "k", "--sanitize-types", "DOCX, .pdf", "--fail-rate",
                "0.25", "--stall-body", "--not-found-200", "--dlp-allow",
                "--retention", "30",
            ]
        )  # fmt: skip
        config = options.config()
        self.assertEqual(
            (config.latency, config.queue_size, config.apikey, config.fail_rate),
            (0.5, 7, "k", 0.25),
        )
        self.assertEqual(config.sanitize_types, {"docx", "pdf"})
        self.assertEqual(
            (config.stall_body, config.not_found_status, config.dlp_block),
            (True, 200, False),
        )
        self.assertEqual(config.retention, 30.0)
        self.assertFalse(config.instant)
        options = Options()
        options.parseOptions(["--instant"])
        self.assertTrue(options.config().instant)

    def test_fidelity_knobs(self) -> None:
        """
        The version profile, post-processing time, size and archive limits,
        sync timeout and Retry-After reach the config; the listener's
        backlog and the examining threads are options too.
        """
        options = Options()
        options.parseOptions(
            [
                "--profile", "early-v4", "--postprocess", "0.5",
                "--max-file-size", "1000", "--archive-depth", "2",
                "--sync-timeout", "9", "--retry-after", "7", "--backlog", "64",
                "--threads", "2",
            ]
        )  # fmt: skip
        config = options.config()
        self.assertEqual(config.shape.name, "early-v4")
        self.assertEqual(config.reported_version, "4.3.0")
        self.assertEqual(
            (config.postprocess, config.max_file_size, config.archive_depth),
            (0.5, 1000, 2),
        )
        self.assertEqual((config.sync_timeout, config.retry_after), (9.0, 7))
        self.assertEqual((options["backlog"], options["threads"]), (64, 2))
        defaults = Options()
        defaults.parseOptions([])
        self.assertEqual(defaults.config().shape.name, "v4")
        self.assertEqual(defaults["backlog"], 1024)
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--profile", "v6"])

    def test_backlog_in_endpoint(self) -> None:
        """
        The gateway's built-in emulator listens with a long backlog unless
        its endpoint names one.
        """
        self.assertEqual(
            with_backlog("tcp:8008:interface=127.0.0.1"),
            "tcp:8008:interface=127.0.0.1:backlog=1024",
        )
        self.assertEqual(with_backlog("tcp:8008:backlog=10"), "tcp:8008:backlog=10")
        self.assertEqual(with_backlog("unix:/tmp/core.sock"), "unix:/tmp/core.sock")

    def test_apikey_file(self) -> None:
        """
        C{--apikey-file} reads the key; giving both forms, or an empty key,
        is an error.
        """
        path = os.path.join(temp_dir(self), "key")
        Path(path).write_text("from-file\n")
        options = Options()
        options.parseOptions(["--apikey-file", path])
        self.assertEqual(options.config().apikey, "from-file")
        self.assertRaises(
            usage.UsageError,
            Options().parseOptions,
            ["--apikey-file", path, "--apikey", "x"],
        )
        empty = os.path.join(temp_dir(self), "empty")
        Path(empty).write_text("\n")
        self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--apikey-file", empty]
        )

    def test_bad_values(self) -> None:
        """
        Out-of-range values are usage errors.
        """
        for argv in (
            ["--fail-rate", "2"],
            ["--latency", "-1"],
            ["--port", "70000"],
            ["--queue-size", "-1"],
            ["--retention", "0"],
        ):
            self.assertRaises(usage.UsageError, Options().parseOptions, argv)

    def test_make_service(self) -> None:
        """
        C{makeService} gives a service listening on the chosen endpoint.
        """
        options = Options()
        options.parseOptions(["--port", "0", "--quiet", "--fail-next", "1"])
        service = makeService(options, reactor=Clock())
        assert isinstance(service, MultiService)
        listeners = [s for s in service if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(len(listeners), 1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_stop_and_start_listening() -> None:
    """
    L{EmulatorServer.stop} makes connections fail with "refused";
    L{EmulatorServer.start} listens again on the same port.
    """
    server = EmulatorServer(reactor)
    port = server.start()
    try:
        answer = await treq.get(f"{server.url}/version", persistent=False)
        assert answer.code == 200
        await answer.content()
        await server.stop()
        with pytest.raises(ConnectionRefusedError):
            await treq.get(f"{server.url}/version", persistent=False)
        assert server.start() == port
        answer = await treq.get(f"{server.url}/version", persistent=False)
        assert (await answer.json())["product_id"] == "MSCL"
    finally:
        await server.close()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_twist_plugin(tmp_path: Path) -> None:
    """
    C{twist mdcore-emulator --port N} starts a working emulator; when it
    stops, it logs what it served by kind (benchmarks read the Core
    requests per file from that line).
    """
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    log = open(tmp_path / "twist.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "twisted", "mdcore-emulator", "--port", str(port)],
        cwd=str(tmp_path),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        doc = None
        for _ in range(200):
            try:
                answer = await treq.get(
                    f"http://127.0.0.1:{port}/version", persistent=False, timeout=2
                )
                doc = await answer.json()
                break
            except Exception:
                if process.poll() is not None:
                    break
                await task.deferLater(reactor, 0.1, lambda: None)
        assert doc == {"product_id": "MSCL", "version": "4.21.1"}, (
            tmp_path / "twist.log"
        ).read_text()
    finally:
        process.terminate()
        await threads.deferToThread(process.wait, 20)
        log.close()
    text = (tmp_path / "twist.log").read_text()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    found = [e["emulator_counts"] for e in events if "emulator_counts" in e]
    assert len(found) == 1, text
    counts = found[0]
    assert counts["version"] >= 1 and counts["requests"] >= counts["version"], counts
    assert "submit" not in counts and "sync" not in counts, counts
