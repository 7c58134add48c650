# -*- test-case-name: tests.test_core_emulator -*-
"""
An emulator of the MetaDefender Core v4 REST API, for tests and trials.

It behaves like Core in every way the client depends on: raw-body uploads
with a mandatory Content-Length, staged progress (C{scan_results} reaches
100 one poll before C{process_info} does), sorted JSON keys, the verdicts
the gateway acts on (EICAR, encrypted zip, card numbers, Deep CDR of
configured file types), converted-file downloads, hash lookups and the
documented error bodies. Knobs add latency, a bounded queue, an API key and
failure injection. L{CoreEmulator} holds the state and answers in plain
values; L{EmulatorResource} is the C{twisted.web} tree over it;
L{EmulatorServer} listens on loopback and can stop and start listening to
simulate refused connections.
"""

from __future__ import annotations

import collections
import io
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, BinaryIO, NamedTuple, cast
from urllib.parse import quote, unquote

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from mdgateway.emulator.detect import (
    Findings,
    describe_type,
    scan_stream,
    write_converted,
)

_log = Logger()

DEFAULT_SANITIZE_TYPES = frozenset(
    {"docx", "xlsx", "pptx", "pdf", "html", "htm", "doc", "xls", "rtf"}
)

_PROCESSING, _SCANNED, _DONE = range(3)
_ENGINES = (
    ("Emulated AV One", "emuav1_1_linux"),
    ("Emulated AV Two", "emuav2_1_linux"),
)
_THREAT = "EICAR-Test-File (not a virus)"
_ACCESS_DENIED = {"err": "Access denied"}
_BLOCK = 1 << 16


def _iso(seconds: float) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{int(seconds * 1000) % 1000:03d}Z"


@attrs.frozen
class EmulatorConfig:
    """
    The emulator's knobs; replace L{CoreEmulator.config} to change them on
    the fly.

    @ivar latency: seconds each file spends "processing".
    @ivar queue_size: files processing at once before C{POST /file} answers
        503 (0 makes every upload busy).
    @ivar apikey: when set, every call must carry it (header or
        C{?apikey=}); never logged.
    @ivar sanitize_types: file name extensions (lower case, no dot) that
        Deep CDR "sanitizes".
    @ivar fail_rate: probability that any request answers 500.
    @ivar stall_body: result polls and downloads send headers and a partial
        body, then stall.
    @ivar not_found_status: status for an unknown C{data_id} (404, or 200 as
        some Core versions answer).
    @ivar dlp_block: a card number blocks the file (else it is allowed with
        a redacted copy).
    @ivar retention: seconds a finished result (and its converted file) is
        kept.
    @ivar max_results: finished results kept at most.
    """

    latency: float = 0.0
    queue_size: int = 500
    apikey: str | None = attrs.field(default=None, repr=False)
    sanitize_types: frozenset[str] = DEFAULT_SANITIZE_TYPES
    fail_rate: float = 0.0
    stall_body: bool = False
    not_found_status: int = 404
    dlp_block: bool = True
    retention: float = 600.0
    max_results: int = 100_000
    version: str = "4.18.0"
    rules: tuple[str, ...] = ("Default", "Email Security")


@attrs.frozen
class Submission:
    """
    What one C{POST /file} carried, kept (a bounded number) for tests.

    @ivar raw_filename: the C{filename} header as sent (URL-encoded).
    @ivar rule: the C{rule} header decoded, or C{None} when absent.
    """

    data_id: str
    filename: str
    raw_filename: str
    rule: str | None
    user_agent: str
    size: int


@attrs.define
class _Job:
    data_id: str
    raw_filename: str
    filename: str
    rule: str
    user_agent: str
    received: float
    findings: Findings
    sanitized: bool
    converted_path: str | None
    converted_name: str | None
    stage: int = _PROCESSING
    cancelled: bool = False
    finished: float | None = None
    call: IDelayedCall | None = None


Reply = tuple[int, Any]


class CoreEmulator:
    """
    The state of one emulated Core server.

    @ivar counters: request counts by kind (C{submit}, C{poll}, C{download},
        C{hash}, C{cancel}, C{version}, C{busy}, C{denied}, C{injected}).
    @ivar submissions: the most recent uploads, newest last.
    """

    def __init__(
        self,
        clock: IReactorTime,
        config: EmulatorConfig | None = None,
        *,
        workdir: str | None = None,
        seed: int | None = None,
        blocking: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        """
        @param blocking: runs a blocking call (the content scan of an
            upload) off the reactor thread, returning a L{Deferred} of its
            result, for example C{partial(deferToThreadPool, reactor, pool)}.
            Without it the scan runs inline, as the tests want.
        """
        self.clock = clock
        self._blocking = blocking
        self.config = config or EmulatorConfig()
        self._started = _iso(clock.seconds())
        self.counters: collections.Counter[str] = collections.Counter()
        self.submissions: collections.deque[Submission] = collections.deque(maxlen=100)
        self._workdir = workdir
        self._own_workdir = False
        self._random = random.Random(seed)
        self._jobs: dict[str, _Job] = {}
        self._finished: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._by_hash: dict[str, str] = {}
        self._in_flight = 0
        self._fail_next = 0
        self._stall_next = 0
        self._forget_next = 0
        self._stalled: set[Request] = set()

    # -- knobs ---------------------------------------------------------------

    def fail_next(self, count: int) -> None:
        """
        Answer the next C{count} requests (of any kind) with HTTP 500.
        """
        self._fail_next += count

    def stall_next(self, count: int) -> None:
        """
        Stall the body of the next C{count} result polls or downloads.
        """
        self._stall_next += count

    def forget_next(self, count: int) -> None:
        """
        Lose the job of each of the next C{count} result polls (they answer
        "Not Found", as after a Core restart or purge).
        """
        self._forget_next += count

    @property
    def in_flight(self) -> int:
        """
        Files still processing (what the queue limit counts).
        """
        return self._in_flight

    @property
    def results(self) -> int:
        """
        Results held (processing and finished).
        """
        return len(self._jobs)

    def close(self) -> None:
        """
        Cancel pending timers, drop stalled requests, remove converted files.
        """
        for job in self._jobs.values():
            if job.call is not None and job.call.active():
                job.call.cancel()
        self._jobs.clear()
        self._finished.clear()
        self._by_hash.clear()
        self._in_flight = 0
        for request in list(self._stalled):
            request.loseConnection()
        self._stalled.clear()
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self._own_workdir = False

    # -- request-level hooks ---------------------------------------------------

    def authorised(self, key: str | None) -> bool:
        """
        Whether C{key} may call (always, when no API key is configured).
        """
        expected = self.config.apikey
        return expected is None or key == expected

    def inject_failure(self) -> bool:
        """
        Whether this request should fail with a 500 (consumes C{fail_next}).
        """
        if self._fail_next > 0:
            self._fail_next -= 1
            self.counters["injected"] += 1
            return True
        rate = self.config.fail_rate
        if rate > 0 and self._random.random() < rate:
            self.counters["injected"] += 1
            return True
        return False

    def take_stall(self) -> bool:
        """
        Whether this body should stall (consumes C{stall_next}).
        """
        if self._stall_next > 0:
            self._stall_next -= 1
            return True
        return self.config.stall_body

    def stalled(self, request: Request) -> None:
        """
        Keep a stalled request so L{close} can drop it.
        """
        self._stalled.add(request)
        request.notifyFinish().addBoth(lambda _: self._stalled.discard(request))

    # -- the API ---------------------------------------------------------------

    def submit(
        self,
        content: IO[bytes],
        *,
        raw_filename: str,
        rule: str | None,
        user_agent: str,
    ) -> Reply:
        """
        C{POST /file}: scan the body once, start the latency timer.
        """
        busy = self._admit()
        if busy is not None:
            return busy
        examined = self._examine(content, raw_filename)
        return self._register(examined, raw_filename, rule, user_agent)

    def submit_later(
        self,
        content: IO[bytes],
        *,
        raw_filename: str,
        rule: str | None,
        user_agent: str,
    ) -> Deferred[Reply]:
        """
        L{submit}, with the content scan run by the C{blocking} runner, so
        a large upload does not hold up the reactor (and, embedded in the
        gateway, its SMTP sessions).
        """
        busy = self._admit()
        if busy is not None:
            return succeed(busy)
        if self._blocking is None:
            examining = succeed(self._examine(content, raw_filename))
        else:
            examining = self._blocking(self._examine, content, raw_filename)
        return examining.addCallback(self._register, raw_filename, rule, user_agent)

    def _admit(self) -> Reply | None:
        self._purge(self.clock.seconds())
        if self._in_flight >= self.config.queue_size:
            self.counters["busy"] += 1
            return 503, {"err": "Server is too busy. Try again later."}
        self.counters["submit"] += 1
        return None

    def _examine(self, content: IO[bytes], raw_filename: str) -> _Examined:
        """
        The blocking part of a submission: scan the content and write the
        converted (sanitized or redacted) file. Touches no shared state.
        """
        config = self.config
        content.seek(0)
        findings = scan_stream(cast(BinaryIO, content))
        data_id = uuid.uuid4().hex
        filename = unquote(raw_filename)
        stem, dot, extension = filename.rpartition(".")
        if not dot:
            stem, extension = filename, ""
        extension = extension.lower()
        sanitized = (
            extension in config.sanitize_types
            and not findings.infected
            and not findings.encrypted_archive
            and not findings.fail
            and not findings.not_scanned
        )
        converted_path = converted_name = None
        if sanitized or findings.cards:
            converted_name = (
                f"{stem or 'file'}_sanitized_by_OPSWAT_MetaDefender_{data_id}"
                + (f".{extension}" if extension else "")
            )
            converted_path = os.path.join(self._dir(), data_id)
            with open(converted_path, "wb") as out:
                write_converted(
                    cast(BinaryIO, content), out, findings.cards, sanitized=sanitized
                )
        return _Examined(
            data_id, filename, findings, sanitized, converted_path, converted_name
        )

    def _register(
        self,
        examined: _Examined,
        raw_filename: str,
        rule: str | None,
        user_agent: str,
    ) -> Reply:
        """
        The reactor part of a submission: record the job, start its timer.
        """
        data_id, filename, findings, sanitized, converted_path, converted_name = (
            examined
        )
        if findings.size == 0:
            return 422, {"err": "File is empty."}
        now = self.clock.seconds()
        config = self.config
        job = _Job(
            data_id=data_id,
            raw_filename=raw_filename,
            filename=filename,
            rule=rule or config.rules[0],
            user_agent=user_agent,
            received=now,
            findings=findings,
            sanitized=sanitized,
            converted_path=converted_path,
            converted_name=converted_name,
        )
        self._jobs[data_id] = job
        self._in_flight += 1
        job.call = self.clock.callLater(config.latency, self._scanned, job)
        self.submissions.append(
            Submission(
                data_id=data_id,
                filename=filename,
                raw_filename=raw_filename,
                rule=rule,
                user_agent=user_agent,
                size=findings.size,
            )
        )
        return 200, {"data_id": data_id}

    def result(self, data_id: str) -> Reply:
        """
        C{GET /file/{data_id}}: the document, advancing the staged progress.
        """
        self.counters["poll"] += 1
        now = self.clock.seconds()
        self._purge(now)
        job = self._jobs.get(data_id)
        if job is not None and self._forget_next > 0:
            self._forget_next -= 1
            self._drop(job)
            job = None
        if job is None:
            return self.config.not_found_status, {data_id: "Not Found"}
        doc = self._document(job, now)
        if job.stage == _SCANNED:
            job.stage = _DONE
        return 200, doc

    def lookup(self, digest: str) -> Reply:
        """
        C{GET /hash/{hash}}: the latest result for an md5/sha1/sha256.
        """
        self.counters["hash"] += 1
        now = self.clock.seconds()
        self._purge(now)
        data_id = self._by_hash.get(digest.lower())
        job = self._jobs.get(data_id) if data_id else None
        if job is None:
            return 200, {digest: "Not Found"}
        return 200, self._document(job, now)

    def converted(self, data_id: str) -> tuple[int, Any, str | None, str | None]:
        """
        C{GET /file/converted/{data_id}}: C{(status, error body, path, name)}.
        """
        self.counters["download"] += 1
        self._purge(self.clock.seconds())
        job = self._jobs.get(data_id)
        if job is None or job.stage != _DONE or job.converted_path is None:
            return 404, {"err": "File could not be found"}, None, None
        return 200, None, job.converted_path, job.converted_name

    def cancel(self, data_id: str) -> Reply:
        """
        C{POST /file/{data_id}/cancel}.
        """
        self.counters["cancel"] += 1
        job = self._jobs.get(data_id)
        if job is None:
            return 404, {data_id: "Not Found"}
        if job.stage == _PROCESSING:
            if job.call is not None and job.call.active():
                job.call.cancel()
            job.cancelled = True
            self._scanned(job)
        job.stage = _DONE
        return 200, {data_id: "cancelled"}

    def version(self) -> Reply:
        """
        C{GET /version}.
        """
        self.counters["version"] += 1
        return 200, {"product_id": "MSCL", "version": self.config.version}

    def rules(self) -> Reply:
        """
        C{GET /file/rules}.
        """
        return 200, [{"max_file_size": 200000000, "name": n} for n in self.config.rules]

    def engines(self) -> Reply:
        """
        C{GET /stat/engines}.
        """
        started = self._started
        return 200, [
            {
                "active": True,
                "def_time": started,
                "download_progress": 100,
                "download_time": started,
                "eng_id": eng_id,
                "eng_name": name,
                "eng_type": "Bundled engine",
                "eng_ver": "1.0.0",
                "engine_type": "av",
                "state": "production",
                "type": "engine",
            }
            for name, eng_id in _ENGINES
        ]

    def nodes(self) -> Reply:
        """
        C{GET /stat/nodes}: one node whose C{scan_queue} is the files
        processing.
        """
        return 200, [
            {
                "external_nodes_allowed": False,
                "max_node_count": 1,
                "statuses": [
                    {
                        "address": "127.0.0.1",
                        "cpu_cores": os.cpu_count() or 1,
                        "engines": [eng_id for _, eng_id in _ENGINES],
                        "free_disk_space": 0,
                        "id": "mdcore-emulator",
                        "issues": [],
                        "load": 0,
                        "os": "Linux",
                        "scan_queue": self._in_flight,
                        "total_memory": 0,
                        "version": self.config.version,
                    }
                ],
            }
        ]

    # -- internals ---------------------------------------------------------------

    def _dir(self) -> str:
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="mdcore-emulator-")
            self._own_workdir = True
        return self._workdir

    def _scanned(self, job: _Job) -> None:
        job.call = None
        if job.stage != _PROCESSING:
            return
        job.stage = _SCANNED
        job.finished = self.clock.seconds()
        self._in_flight -= 1
        self._finished[job.data_id] = job.finished
        for digest in (job.findings.md5, job.findings.sha1, job.findings.sha256):
            self._by_hash[digest] = job.data_id

    def _drop(self, job: _Job) -> None:
        if job.call is not None and job.call.active():
            job.call.cancel()
            self._in_flight -= 1
        self._jobs.pop(job.data_id, None)
        self._finished.pop(job.data_id, None)
        for digest in (job.findings.md5, job.findings.sha1, job.findings.sha256):
            if self._by_hash.get(digest) == job.data_id:
                del self._by_hash[digest]
        if job.converted_path is not None:
            try:
                os.unlink(job.converted_path)
            except OSError:
                pass

    def _purge(self, now: float) -> None:
        horizon = now - self.config.retention
        limit = self.config.max_results
        while self._finished:
            data_id, finished = next(iter(self._finished.items()))
            if finished > horizon and len(self._finished) <= limit:
                break
            job = self._jobs.get(data_id)
            if job is None:
                self._finished.pop(data_id)
            else:
                self._drop(job)

    def _verdict(self, job: _Job) -> tuple[int, str, str, str]:
        """
        C{(scan_all_result_i, scan_all_result_a, result, blocked_reason)}.
        """
        found = job.findings
        if job.cancelled:
            return 19, "Canceled", "Blocked", "Canceled"
        if found.fail:
            return 3, "Failed", "Blocked", "Failed"
        if found.not_scanned:
            return 10, "Not Scanned", "Blocked", "Not Scanned"
        if found.infected:
            return 1, "Infected", "Blocked", "Infected"
        if found.encrypted_archive:
            return 12, "Encrypted Archive", "Blocked", "Encrypted Archive"
        if found.cards:
            if self.config.dlp_block:
                return 20, "Sensitive Data Found", "Blocked", "Sensitive Data Found"
            return 20, "Sensitive Data Found", "Allowed", ""
        return 0, "No Threat Detected", "Allowed", ""

    def _document(self, job: _Job, now: float) -> dict[str, Any]:
        found = job.findings
        latency = self.config.latency
        code, code_text, result, reason = self._verdict(job)
        if job.stage == _PROCESSING:
            elapsed = now - job.received
            fraction = min(elapsed / latency, 0.99) if latency > 0 else 0.0
            scan_percent = int(fraction * 100)
            process_percent = scan_percent * 9 // 10
            code, code_text, result, reason = 255, "In Progress", "Processing", ""
        elif job.stage == _SCANNED:
            scan_percent, process_percent = 100, 90
            result, reason = "Processing", ""
        else:
            scan_percent = process_percent = 100
        extension = (
            job.filename.rpartition(".")[2].lower() if "." in job.filename else ""
        )
        file_type, description = describe_type(found.head, extension, found.infected)
        scan_time = int(latency * 1000)
        details = {}
        for name, eng_id in _ENGINES:
            engine_done = job.stage != _PROCESSING
            infected = engine_done and found.infected and not job.cancelled
            details[name] = {
                "def_time": self._started,
                "eng_id": eng_id,
                "location": "local",
                "scan_result_i": (1 if infected else 0) if engine_done else 255,
                "scan_time": scan_time if engine_done else 0,
                "threat_found": _THREAT if infected else "",
                "wait_time": 0,
            }
        process_info: dict[str, Any] = {
            "blocked_reason": reason,
            "file_type_skipped_scan": False,
            "outdated_data": [],
            "processing_time": scan_time,
            "profile": job.rule,
            "progress_percentage": process_percent,
            "queue_time": 0,
            "result": result,
            "user_agent": job.user_agent,
            "username": "LOCAL/anonymous",
            "verdicts": [reason] if reason else [],
        }
        doc: dict[str, Any] = {
            "data_id": job.data_id,
            "file_info": {
                "display_name": job.raw_filename,
                "file_size": found.size,
                "file_type": file_type,
                "file_type_description": description,
                "md5": found.md5,
                "sha1": found.sha1,
                "sha256": found.sha256,
                "upload_timestamp": _iso(job.received),
            },
            "process_info": process_info,
            "scan_results": {
                "data_id": job.data_id,
                "progress_percentage": scan_percent,
                "scan_all_result_a": code_text,
                "scan_all_result_i": code,
                "scan_details": details,
                "start_time": _iso(job.received),
                "total_avs": len(_ENGINES),
                "total_time": scan_time if job.stage != _PROCESSING else -1,
            },
        }
        if job.stage == _DONE:
            process_info["post_processing"] = {
                "actions_failed": "",
                "actions_ran": "Sanitized" if job.sanitized else "",
                "converted_destination": job.converted_name if job.sanitized else "",
                "converted_to": extension if job.sanitized else "",
                "copy_move_destination": "",
            }
            doc["dlp_info"] = self._dlp(job)
        return doc

    def _dlp(self, job: _Job) -> dict[str, Any]:
        cards = job.findings.cards
        hits = {}
        if cards:
            hits["ccn"] = {
                "display_name": "Credit Card Number",
                "hits": [
                    {
                        "after": card.after,
                        "before": card.before,
                        "certainty": "Very High",
                        "certainty_score": 100,
                        "hit": card.masked.decode("ascii"),
                        "isRedacted": True,
                        "severity": 0,
                    }
                    for card in cards
                ],
            }
        return {
            "certainty": "Very High" if cards else "",
            "errors": {},
            "filename": job.converted_name if cards else "",
            "hits": hits,
            "metadata_removal": {"result": "not removed"},
            "redact": {"result": "redacted" if cards else "not redacted"},
            "severity": 0,
            "verdict": 1 if cards else 0,
            "watermark": {"result": "not added"},
        }


# -- the twisted.web tree -----------------------------------------------------


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("utf-8", "replace")


def _apikey(request: Request) -> str | None:
    key = _header(request, b"apikey")
    if key is None:
        values = request.args.get(b"apikey") if request.args else None
        if values:
            key = values[0].decode("utf-8", "replace")
    return key


class _Examined(NamedTuple):
    data_id: str
    filename: str
    findings: Findings
    sanitized: bool
    converted_path: str | None
    converted_name: str | None


def _json(request: Request, reply: Reply) -> bytes:
    status, doc = reply
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(doc, sort_keys=True).encode("utf-8")


class _Fixed(Resource):
    isLeaf = True

    def __init__(self, reply: Reply) -> None:
        super().__init__()
        self._reply = reply

    def render(self, request: Request) -> bytes:
        return _json(request, self._reply)


_NOT_FOUND = _Fixed((404, {"err": "Not found"}))


class _Node(Resource):
    """
    A resource of the emulator: JSON answers, API-key check, unknown
    children and methods answered in JSON.
    """

    denied_status = 403

    def __init__(self, emulator: CoreEmulator) -> None:
        super().__init__()
        self.emulator = emulator

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NOT_FOUND

    def render(self, request: Request) -> bytes | int:
        if not self.emulator.authorised(_apikey(request)):
            self.emulator.counters["denied"] += 1
            return _json(request, (self.denied_status, _ACCESS_DENIED))
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, f"render_{method}", None)
        if handler is None:
            return _json(request, (405, {"err": "Method not allowed"}))
        result: bytes | int = handler(request)
        return result


class _Version(_Node):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _json(request, self.emulator.version())


class _Rules(_Node):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _json(request, self.emulator.rules())


class _Engines(_Node):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _json(request, self.emulator.engines())


class _Nodes(_Node):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _json(request, self.emulator.nodes())


class _Stat(_Node):
    def __init__(self, emulator: CoreEmulator) -> None:
        super().__init__(emulator)
        self.putChild(b"nodes", _Nodes(emulator))
        self.putChild(b"engines", _Engines(emulator))


class _Hash(_Node):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return _HashItem(self.emulator, path.decode("ascii", "replace"))


class _HashItem(_Node):
    isLeaf = True

    def __init__(self, emulator: CoreEmulator, digest: str) -> None:
        super().__init__(emulator)
        self.digest = digest

    def render_GET(self, request: Request) -> bytes:
        return _json(request, self.emulator.lookup(self.digest))


class _Cancel(_Node):
    isLeaf = True
    denied_status = 405

    def __init__(self, emulator: CoreEmulator, data_id: str) -> None:
        super().__init__(emulator)
        self.data_id = data_id

    def render_POST(self, request: Request) -> bytes:
        return _json(request, self.emulator.cancel(self.data_id))


def _stall(emulator: CoreEmulator, request: Request) -> int:
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"application/json")
    request.write(b'{"data_id": "')
    emulator.stalled(request)
    return NOT_DONE_YET


class _Result(_Node):
    def __init__(self, emulator: CoreEmulator, data_id: str) -> None:
        super().__init__(emulator)
        self.data_id = data_id

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"cancel":
            return _Cancel(self.emulator, self.data_id)
        return _NOT_FOUND

    def render_GET(self, request: Request) -> bytes | int:
        if self.emulator.take_stall():
            return _stall(self.emulator, request)
        return _json(request, self.emulator.result(self.data_id))


class _Converted(_Node):
    isLeaf = True
    denied_status = 405

    def __init__(self, emulator: CoreEmulator, data_id: str) -> None:
        super().__init__(emulator)
        self.data_id = data_id

    def render_GET(self, request: Request) -> bytes | int:
        if self.emulator.take_stall():
            return _stall(self.emulator, request)
        status, error, path, name = self.emulator.converted(self.data_id)
        if path is None or name is None:
            return _json(request, (status, error))
        try:
            source = open(path, "rb")
        except OSError:
            return _json(request, (404, {"err": "File could not be found"}))
        size = os.fstat(source.fileno()).st_size
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(size).encode("ascii"))
        request.setHeader(
            b"content-disposition",
            f'attachment; filename="{quote(name, safe="")}"'.encode("ascii"),
        )
        _FileStreamer(self.emulator.clock, request, source).start()
        return NOT_DONE_YET


@implementer(IPushProducer)
class _FileStreamer:
    """
    Streams a file into a response in blocks, one block per reactor turn
    (on the emulator's clock), pausing when the transport's buffer is full.
    """

    def __init__(
        self, clock: IReactorTime, request: Request, source: IO[bytes]
    ) -> None:
        self._clock = clock
        self._request = request
        self._source = source
        self._paused = False
        self._done = False
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if not self._paused and not self._done and self._call is None:
            self._call = self._clock.callLater(0, self._step)

    def _step(self) -> None:
        self._call = None
        if self._done:
            return
        block = self._source.read(_BLOCK)
        if not block:
            self._finish()
            self._request.unregisterProducer()
            self._request.finish()
            return
        self._request.write(block)
        self._schedule()

    def _finish(self) -> None:
        self._done = True
        self._source.close()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def pauseProducing(self) -> None:
        self._paused = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self._finish()


class _ConvertedParent(_Node):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return _Converted(self.emulator, path.decode("ascii", "replace"))


class _File(_Node):
    denied_status = 400

    def __init__(self, emulator: CoreEmulator) -> None:
        super().__init__(emulator)
        self.putChild(b"rules", _Rules(emulator))
        self.putChild(b"converted", _ConvertedParent(emulator))

    def getChild(self, path: bytes, request: Request) -> Resource:
        if not path:
            return self
        return _Result(self.emulator, path.decode("ascii", "replace"))

    def render_POST(self, request: Request) -> bytes | int:
        if request.getHeader(b"content-length") is None:
            return _json(request, (411, {"err": "Missing Content-Length header."}))
        content = request.content
        if content is None:
            return _json(request, (422, {"err": "File is empty."}))
        rule = _header(request, b"rule") or _header(request, b"workflow")
        submitted = self.emulator.submit_later(
            content,
            raw_filename=_header(request, b"filename") or "",
            rule=unquote(rule) if rule is not None else None,
            user_agent=_header(request, b"user_agent") or "",
        )

        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def answer(reply: Reply) -> None:
            body = _json(request, reply)
            if not gone:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            _log.failure("emulator submission failed", failure)
            answer((500, {"err": "Internal error"}))

        submitted.addCallback(answer)
        submitted.addErrback(failed)
        return NOT_DONE_YET


class _Login(_Node):
    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        if request.method != b"POST":
            return _json(request, (405, {"err": "Method not allowed"}))
        try:
            body = json.loads((request.content or _empty()).read() or b"{}")
        except ValueError:
            body = {}
        if not isinstance(body, dict) or not body.get("user"):
            return _json(request, (403, {"err": "Failed to login"}))
        session = self.emulator.config.apikey or uuid.uuid4().hex
        return _json(request, (200, {"session_id": session}))


class _Logout(_Node):
    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        return _json(request, (200, {"response": "Logout success"}))


def _empty() -> IO[bytes]:
    return io.BytesIO()


class EmulatorResource(_Node):
    """
    The root of the emulated API: C{/file}, C{/file/{id}},
    C{/file/{id}/cancel}, C{/file/converted/{id}}, C{/file/rules},
    C{/hash/{hash}}, C{/version}, C{/stat/nodes}, C{/stat/engines},
    C{/login}, C{/logout}.
    """

    def __init__(self, emulator: CoreEmulator) -> None:
        super().__init__(emulator)
        self.putChild(b"file", _File(emulator))
        self.putChild(b"hash", _Hash(emulator))
        self.putChild(b"version", _Version(emulator))
        self.putChild(b"stat", _Stat(emulator))
        self.putChild(b"login", _Login(emulator))
        self.putChild(b"logout", _Logout(emulator))

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if self.emulator.inject_failure():
            return _Fixed((500, {"err": "Failed to request scan. Try again later."}))
        child: Resource = super().getChildWithDefault(path, request)
        return child

    def render_GET(self, request: Request) -> bytes:
        return _json(request, (404, {"err": "Not found"}))


class _QuietSite(Site):
    def log(self, request: Any) -> None:
        pass


def build_site(
    emulator: CoreEmulator, *, access_log: bool = True, reactor: Any = None
) -> Site:
    """
    A L{Site} serving the emulator (without an access log when asked:
    benchmarks run hundreds of requests a second).
    """
    resource = EmulatorResource(emulator)
    site = (
        Site(resource, reactor=reactor)
        if access_log
        else _QuietSite(resource, reactor=reactor)
    )
    site.noisy = False
    return site


class EmulatorServer:
    """
    One emulator listening on loopback, able to stop and start listening on
    the same port to simulate a server that refuses connections.

    @ivar emulator: the state, for knobs and assertions.
    """

    def __init__(
        self,
        reactor: Any,
        emulator: CoreEmulator | None = None,
        *,
        interface: str = "127.0.0.1",
        access_log: bool = False,
    ) -> None:
        self._reactor = reactor
        self.emulator = emulator or CoreEmulator(reactor)
        self._interface = interface
        self._factory = WrappingFactory(
            build_site(self.emulator, access_log=access_log, reactor=reactor)
        )
        self._listening: IListeningPort | None = None
        self._port = 0

    def start(self, port: int | None = None) -> int:
        """
        Listen (on C{port}, else the previous port, else a free one) and
        return the port number.
        """
        if self._listening is None:
            number = self._port if port is None else port
            self._listening = self._reactor.listenTCP(
                number, self._factory, interface=self._interface
            )
            self._port = int(self._listening.getHost().port)  # type: ignore[union-attr]
        return self._port

    @property
    def port(self) -> int:
        """
        The port number (kept across L{stop}/L{start}).
        """
        return self._port

    @property
    def url(self) -> str:
        """
        Base URL for a L{mdgateway.policy.profiles.CoreServer}.
        """
        return f"http://{self._interface}:{self._port}"

    def stop(self) -> Deferred[None]:
        """
        Stop listening and abort every open connection: clients now get
        "connection refused".
        """
        waits: list[Deferred[Any]] = []
        if self._listening is not None:
            stopped = self._listening.stopListening()
            if stopped is not None:
                waits.append(stopped)
            self._listening = None
        for wrapper in list(self._connections()):
            wrapper.transport.abortConnection()
        done: Deferred[Any] = DeferredList(waits)
        return done.addCallback(lambda _: None)

    def close(self) -> Deferred[None]:
        """
        L{stop}, then drop the emulator's state and files.
        """
        return self.stop().addCallback(lambda _: self.emulator.close())

    def _connections(self) -> Iterator[Any]:
        yield from self._factory.protocols
