# -*- test-case-name: tests.test_core_emulator -*-
"""
The C{mdcore-emulator} twistd/twist plugin: C{twist mdcore-emulator --port 8008}.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from mdgateway.emulator.app import CoreEmulator
from mdgateway.emulator.config import DEFAULT_SANITIZE_TYPES, SHAPES, EmulatorConfig
from mdgateway.emulator.server import BACKLOG, build_site, log_request_counts

_log = Logger()


def _types(value: str) -> frozenset[str]:
    return frozenset(
        part.strip().lower().lstrip(".") for part in value.split(",") if part.strip()
    )


class Options(usage.Options):
    """
    Command-line options of C{mdcore-emulator}.
    """

    synopsis = "[options]"
    longdesc = (
        "Emulates the MetaDefender Core REST API (POST /file, /file/sync, "
        "GET /file/{id}, /file/converted/{id}, /hash/{hash}, /version, "
        "/stat/...) for tests and trials. EICAR is infected, archives are "
        "extracted and blocked when a file in them is, encrypted archives are "
        "blocked, Luhn-valid card numbers are sensitive data, and the "
        "--sanitize-types are 'sanitized' by Deep CDR."
    )
    optParameters = [
        ["port", "p", 8008, "TCP port to listen on.", int],
        ["interface", "i", "127.0.0.1", "Address to listen on."],
        ["latency", None, 0.0, "Seconds each file spends processing.", float],
        [
            "postprocess",
            None,
            0.1,
            "Seconds of Deep CDR/DLP after the scan (a poll also ends it).",
            float,
        ],
        ["queue-size", None, 500, "Files processing at once before 503.", int],
        [
            "profile",
            None,
            "v4",
            "Result shapes of Core version: " + ", ".join(SHAPES) + ".",
        ],
        [
            "apikey",
            None,
            None,
            "Require this API key (visible in ps; prefer --apikey-file).",
        ],
        ["apikey-file", None, None, "Read the required API key from this file."],
        [
            "sanitize-types",
            None,
            ",".join(sorted(DEFAULT_SANITIZE_TYPES)),
            "Comma-separated file extensions Deep CDR sanitizes.",
        ],
        ["fail-rate", None, 0.0, "Probability (0-1) of answering HTTP 500.", float],
        ["fail-next", None, 0, "Answer the first N requests with HTTP 500.", int],
        ["hang-next", None, 0, "Never answer the first N requests.", int],
        [
            "forget-next",
            None,
            0,
            "Answer the first N result polls Not Found (a lost data_id).",
            int,
        ],
        [
            "reset-next",
            None,
            0,
            "Reset the first N uploads once their headers are in.",
            int,
        ],
        [
            "early-busy-next",
            None,
            0,
            "Answer the first N uploads 503 before reading their body.",
            int,
        ],
        [
            "retry-after",
            None,
            None,
            "Send Retry-After: N with every 503 (default: none).",
            int,
        ],
        ["retention", None, 600.0, "Seconds finished results are kept.", float],
        [
            "max-file-size",
            None,
            200_000_000,
            "Largest upload in bytes (larger: HTTP 500).",
            int,
        ],
        ["archive-depth", None, 5, "Nested archive levels extracted.", int],
        ["sync-timeout", None, 30.0, "Seconds POST /file/sync waits.", float],
        ["backlog", None, BACKLOG, "Pending connections the listener queues.", int],
        ["threads", None, 4, "Threads examining uploads.", int],
        [
            "workdir",
            None,
            None,
            "Directory for converted files (default: a "
            "temporary directory removed at exit).",
        ],
        ["seed", None, None, "Seed for --fail-rate, for repeatable runs.", int],
    ]
    optFlags = [
        ["stall-body", None, "Stall the body of every result poll and download."],
        ["not-found-200", None, "Answer unknown data_ids with 200, not 404."],
        ["dlp-allow", None, "Allow files with card numbers (redacted copy)."],
        ["quiet", "q", "No access log."],
        [
            "instant",
            None,
            "Benchmark stand-in, never for real mail: report every upload "
            "clean at once, without reading it.",
        ],
    ]

    def postOptions(self) -> None:
        if not 0 <= self["port"] <= 65535:
            raise usage.UsageError("--port must be 0-65535")
        if self["latency"] < 0:
            raise usage.UsageError("--latency must not be negative")
        if self["queue-size"] < 0:
            raise usage.UsageError("--queue-size must not be negative")
        if not 0.0 <= self["fail-rate"] <= 1.0:
            raise usage.UsageError("--fail-rate must be between 0 and 1")
        knobs = (
            "fail-next",
            "hang-next",
            "forget-next",
            "reset-next",
            "early-busy-next",
        )
        for key in knobs:
            if self[key] < 0:
                raise usage.UsageError(f"--{key} must not be negative")
        if self["retry-after"] is not None and self["retry-after"] < 0:
            raise usage.UsageError("--retry-after must not be negative")
        if self["retention"] <= 0:
            raise usage.UsageError("--retention must be positive")
        if self["postprocess"] < 0:
            raise usage.UsageError("--postprocess must not be negative")
        if self["profile"] not in SHAPES:
            raise usage.UsageError(f"--profile must be one of {', '.join(SHAPES)}")
        for key in ("max-file-size", "backlog", "threads"):
            if self[key] < 1:
                raise usage.UsageError(f"--{key} must be positive")
        if self["archive-depth"] < 0:
            raise usage.UsageError("--archive-depth must not be negative")
        if self["sync-timeout"] <= 0:
            raise usage.UsageError("--sync-timeout must be positive")
        if self["apikey"] is not None and self["apikey-file"] is not None:
            raise usage.UsageError("give --apikey or --apikey-file, not both")
        if self["apikey-file"] is not None:
            try:
                with open(self["apikey-file"], encoding="utf-8") as f:
                    self["apikey"] = f.read().strip()
            except OSError as e:
                raise usage.UsageError(f"--apikey-file: {e.strerror}") from e
        if self["apikey"] is not None and not self["apikey"]:
            raise usage.UsageError("the API key is empty")
        self["sanitize-types"] = _types(self["sanitize-types"])

    def config(self) -> EmulatorConfig:
        """
        The L{EmulatorConfig} these options describe.
        """
        return EmulatorConfig(
            latency=self["latency"],
            postprocess=self["postprocess"],
            queue_size=self["queue-size"],
            apikey=self["apikey"] or None,
            sanitize_types=self["sanitize-types"],
            fail_rate=self["fail-rate"],
            stall_body=bool(self["stall-body"]),
            not_found_status=200 if self["not-found-200"] else 404,
            dlp_block=not self["dlp-allow"],
            retention=self["retention"],
            max_file_size=self["max-file-size"],
            archive_depth=self["archive-depth"],
            sync_timeout=self["sync-timeout"],
            shape=SHAPES[self["profile"]],
            retry_after=self["retry-after"],
            instant=bool(self["instant"]),
        )


class _EmulatorState(Service):
    """
    Owns the emulator so its timers and files go away at shutdown.
    """

    def __init__(self, emulator: CoreEmulator) -> None:
        self.emulator = emulator

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        log_request_counts(self.emulator)
        self.emulator.close()
        return None


class ThreadPoolService(Service):
    """
    A thread pool of its own for examining uploads, started and stopped
    with the service (so it is not the reactor's pool of 10, shared with
    name resolution).
    """

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="mdcore-emulator")

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.pool.stop()
        return None


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    A listener on C{--interface}:C{--port} serving a fresh emulator.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    threads = ThreadPoolService(options["threads"])
    blocking = partial(deferToThreadPool, reactor, threads.pool)
    emulator = CoreEmulator(
        reactor,
        options.config(),
        workdir=options["workdir"],
        seed=options["seed"],
        blocking=blocking,
    )
    emulator.fail_next(options["fail-next"])
    emulator.hang_next(options["hang-next"])
    emulator.forget_next(options["forget-next"])
    emulator.reset_next(options["reset-next"])
    emulator.early_busy_next(options["early-busy-next"])
    site = build_site(emulator, access_log=not options["quiet"], reactor=reactor)
    interface = options["interface"]
    endpoint_type = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
    endpoint = endpoint_type(
        reactor, options["port"], backlog=options["backlog"], interface=interface
    )
    top = MultiService()
    threads.setServiceParent(top)
    _EmulatorState(emulator).setServiceParent(top)
    StreamServerEndpointService(endpoint, site).setServiceParent(top)
    _log.info(
        "MetaDefender Core emulator on {interface}:{port}",
        interface=interface,
        port=options["port"],
        latency=options["latency"],
        profile=options["profile"],
        api_key_required=bool(options["apikey"]),
    )
    if options["instant"]:
        warn_instant()
    return top


def warn_instant() -> None:
    """
    Say loudly that the emulator scans nothing (C{--instant}).
    """
    _log.warn(
        "the Core emulator runs as an instant stand-in: every file is reported"
        " clean without being read; a benchmark tool, never for real mail",
        emulator_instant=True,
    )
