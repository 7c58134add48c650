# -*- test-case-name: tests.test_core_emulator -*-
"""
An emulator of the MetaDefender Core REST API, for tests and trials.

It answers like Core in every way the client depends on (see
C{docs/core.md} and the conformance tests): raw-body uploads with a
mandatory Content-Length, staged progress (C{scan_results} reaches 100
before C{process_info} does), sorted JSON keys, archives extracted with
each child reported, the verdicts of EICAR, encrypted archives, card
numbers and Deep CDR, converted-file downloads, hash lookups, synchronous
submissions, webhooks and the documented error bodies, in the shape of
Core v4, v5 or the early 4.x servers. Knobs add latency, a bounded queue,
an API key and failure injection.

L{CoreEmulator} holds the state and answers in plain values; the
C{twisted.web} tree over it is in L{mdgateway.emulator.resources}, the
listener in L{mdgateway.emulator.server}.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from typing import IO, Any, BinaryIO, cast
from urllib.parse import unquote

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from mdgateway.emulator.archives import remove
from mdgateway.emulator.config import (
    DEFAULT_SANITIZE_TYPES,
    SHAPES,
    EmulatorConfig,
    Shape,
)
from mdgateway.emulator.examine import Node, examine, unexamined
from mdgateway.emulator.jobs import Job, Upload, Webhooks, valid_callback
from mdgateway.emulator.results import (
    DONE,
    ENGINES,
    PROCESSING,
    SCANNED,
    document,
    iso,
)

__all__ = [
    "DEFAULT_SANITIZE_TYPES",
    "SHAPES",
    "CoreEmulator",
    "EmulatorConfig",
    "EmulatorServer",
    "Shape",
    "Submission",
    "Upload",
    "build_site",
]

_log = Logger()

Reply = tuple[int, Any]
BUSY: Reply = (503, {"err": "Server is too busy. Try again later."})
TOO_BIG: Reply = (
    500,
    {
        "err": "Failed to request scan. File size exceeded the maximum size"
        " permitted by your configuration."
    },
)
EMPTY: Reply = (422, {"err": "File is empty."})
BAD_CALLBACK: Reply = (400, {"err": "Callback url is invalid."})


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


class CoreEmulator:
    """
    The state of one emulated Core server.

    @ivar counters: request counts by kind (C{submit}, C{poll}, C{download},
        C{hash}, C{cancel}, C{version}, C{busy}, C{denied}, C{injected},
        C{sync}, C{no_sync}: a C{POST /file/sync} refused by a shape
        without it, C{webhook}, C{gone}), and over the wire (C{requests}:
        every HTTP request received, C{connections}: every TCP connection
        accepted; counted by the site of L{build_site}).
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
        poster: Callable[[str, bytes], Deferred[int]] | None = None,
    ) -> None:
        """
        @param blocking: runs a blocking call (the examination of an
            upload) off the reactor thread, returning a L{Deferred} of its
            result, for example C{partial(deferToThreadPool, reactor,
            pool)}. Without it the examination runs inline, as the tests
            want.
        @param poster: POSTs a webhook body to a URL and fires with the
            HTTP status (default: treq on C{clock}, which must then be a
            reactor).
        """
        self.clock = clock
        self._blocking = blocking
        self.config = config or EmulatorConfig()
        self._started = iso(clock.seconds())
        self.counters: collections.Counter[str] = collections.Counter()
        self.submissions: collections.deque[Submission] = collections.deque(maxlen=100)
        self._workdir = workdir
        self._own_workdir = False
        self._random = random.Random(seed)
        self._jobs: dict[str, Job] = {}
        self._finished: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._by_hash: dict[str, str] = {}
        self._in_flight = 0
        self._admitting = 0
        self._fail_next = 0
        self._stall_next = 0
        self._forget_next = 0
        self._hang_next = 0
        self._reset_next = 0
        self._early_busy_next = 0
        self._stalled: set[Request] = set()
        self.webhooks = Webhooks(clock, poster)

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

    def hang_next(self, count: int) -> None:
        """
        Never answer the next C{count} requests (of any kind): the
        connection stays open and silent until the client gives up.
        """
        self._hang_next += count

    def reset_next(self, count: int) -> None:
        """
        Reset the connection of each of the next C{count} uploads as soon
        as their headers are in, while the body is still coming.
        """
        self._reset_next += count

    def early_busy_next(self, count: int) -> None:
        """
        Answer each of the next C{count} uploads with 503 "too busy" as
        soon as their headers are in, before reading the body (as a proxy
        or a Core refusing at once does), and close the connection.
        """
        self._early_busy_next += count

    def take(self, knob: str) -> bool:
        """
        Consume one of C{hang}, C{reset} or C{early_busy}; whether it was
        set.
        """
        attribute = f"_{knob}_next"
        count: int = getattr(self, attribute)
        if count > 0:
            setattr(self, attribute, count - 1)
            self.counters[knob] += 1
            return True
        return False

    @property
    def in_flight(self) -> int:
        """
        Files still processing, and uploads being examined (what the queue
        limit counts).
        """
        return self._in_flight + self._admitting

    @property
    def results(self) -> int:
        """
        Results held (processing and finished), archive children included.
        """
        return len(self._jobs)

    def close(self) -> None:
        """
        Cancel pending timers, answer held requests, drop stalled ones,
        remove converted files.
        """
        for job in list(self._jobs.values()):
            job.stop_timers()
            job.release_waiters()
        self._jobs.clear()
        self._finished.clear()
        self._by_hash.clear()
        self._in_flight = 0
        self.webhooks.close()
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

    # -- submissions -----------------------------------------------------------

    def submit(self, content: IO[bytes], upload: Upload | None = None) -> Reply:
        """
        C{POST /file} with the examination inline; takes ownership of
        C{content} (closed when done).
        """
        result: list[Reply] = []
        self.submit_later(content, upload, inline=True).addCallback(result.append)
        return result[0]

    def submit_later(
        self,
        content: IO[bytes],
        upload: Upload | None = None,
        *,
        inline: bool = False,
    ) -> Deferred[Reply]:
        """
        C{POST /file}: admit the upload (or answer 503, 500 for a file too
        big, 422 for an empty one), examine it with the C{blocking} runner
        (so a large upload does not hold up the reactor), then register
        the job and start its timers.

        Takes ownership of C{content}: it is closed once examined, in the
        runner, so the HTTP request it came from may go away meanwhile.
        """
        upload = upload or Upload()
        refused = self._refuse(content, upload)
        if refused is not None:
            content.close()
            return succeed(refused)
        self._admitting += 1
        self.counters["submit"] += 1
        rule = upload.rule or self.config.rules[0]
        config = self.config
        if config.instant:
            # _refuse left the stream at its end: its position is the size.
            size = content.tell()
            content.close()
            raw = upload.raw_filename
            node = unexamined(display_name=raw, name=unquote(raw), size=size)
            return succeed(self._register(node, upload, rule))
        workdir = self._dir()  # created here, never concurrently in workers
        if self._blocking is None or inline:
            try:
                examined: Deferred[Node] = succeed(
                    _examine(content, upload, rule, config, workdir)
                )
            except BaseException:
                self._admitting -= 1
                raise
        else:
            examined = self._blocking(_examine, content, upload, rule, config, workdir)

        def failed(failure: Any) -> Any:
            self._admitting -= 1
            return failure

        examined.addErrback(failed)
        return examined.addCallback(self._register, upload, rule)

    def _refuse(self, content: IO[bytes], upload: Upload) -> Reply | None:
        self._purge(self.clock.seconds())
        content.seek(0, os.SEEK_END)
        size = content.tell()
        if size == 0:
            return EMPTY
        if size > self.config.max_file_size:
            return TOO_BIG
        if upload.callback_url is not None and not valid_callback(upload.callback_url):
            return BAD_CALLBACK
        if self.in_flight >= self.config.queue_size:
            self.counters["busy"] += 1
            return BUSY
        return None

    def _register(self, node: Node, upload: Upload, rule: str) -> Reply:
        """
        The reactor part of a submission: record the job, start its timer.
        """
        self._admitting -= 1
        config = self.config
        job = Job(
            node=node,
            rule=rule,
            user_agent=upload.user_agent,
            received=self.clock.seconds(),
            latency=0.0 if config.instant else config.latency,
            started=self._started,
            callback_url=upload.callback_url,
        )
        self._jobs[node.data_id] = job
        for child in node.walk()[1:]:
            self._jobs[child.data_id] = Job.child(job, child)
        if job.callback_url is not None:
            self.webhooks.expect(node.data_id, job.callback_url)
        if config.instant:
            job.scanned = job.received
            self._finish(job)
        else:
            self._in_flight += 1
            job.scan_call = self.clock.callLater(config.latency, self._scanned, job)
        self.submissions.append(
            Submission(
                data_id=node.data_id,
                filename=node.name,
                raw_filename=upload.raw_filename,
                rule=upload.rule,
                user_agent=upload.user_agent,
                size=node.findings.size,
            )
        )
        return 200, {"data_id": node.data_id}

    def submit_sync(
        self, content: IO[bytes], upload: Upload | None = None
    ) -> Deferred[Reply]:
        """
        C{POST /file/sync}: L{submit_later}, then hold the answer until the
        result is complete (200 with it) or the sync timeout passes (408
        with the C{data_id}, to be polled).
        """
        self.counters["sync"] += 1

        async def run() -> Reply:
            reply = await self.submit_later(content, upload)
            if reply[0] != 200:
                return reply
            data_id = reply[1]["data_id"]
            job = self._jobs.get(data_id)
            if job is None:
                return 408, {"data_id": data_id}
            done = await job.wait(self.clock, self.config.sync_timeout)
            if not done or data_id not in self._jobs:
                return 408, {"data_id": data_id}
            return 200, self._document(job, self.clock.seconds())

        return Deferred.fromCoroutine(run())

    # -- results -----------------------------------------------------------------

    def result(self, data_id: str, first: int = 0, size: int | None = None) -> Reply:
        """
        C{GET /file/{data_id}}: the document; a poll after the scan ended
        also ends post-processing (the next poll is complete).
        """
        self.counters["poll"] += 1
        now = self.clock.seconds()
        self._purge(now)
        job = self._jobs.get(data_id)
        if job is not None and self._forget_next > 0 and job.parent is None:
            self._forget_next -= 1
            self._drop(job)
            job = None
        if job is None:
            return self.config.not_found_status, {data_id: "Not Found"}
        doc = self._document(job, now, first, size)
        if job.stage == SCANNED:
            self._finish(job)
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
        if job is None or job.stage != DONE or job.cancelled:
            return 404, {"err": "File could not be found"}, None, None
        node = job.node
        if node.converted_path is None or node.converted_name is None:
            return 404, {"err": "File could not be found"}, None, None
        return 200, None, node.converted_path, node.converted_name

    def cancel(self, data_id: str) -> Reply:
        """
        C{POST /file/{data_id}/cancel}.
        """
        self.counters["cancel"] += 1
        job = self._jobs.get(data_id)
        if job is None or job.parent is not None:
            return 404, {"err": "Not found"}
        if job.stage == PROCESSING:
            job.cancelled = True
            job.cancelled_at = self.clock.seconds()
            self._scanned(job)
        if job.stage != DONE:
            self._finish(job)
        return 200, {data_id: "cancelled"}

    def webhook(self, data_id: str) -> Reply:
        """
        C{GET /file/webhook/{data_id}}.
        """
        status = self.webhooks.status(data_id)
        if status is None:
            return 404, {"err": "Not found"}
        return 200, status

    # -- info ----------------------------------------------------------------------

    def version(self) -> Reply:
        """
        C{GET /version}.
        """
        self.counters["version"] += 1
        return 200, {"product_id": "MSCL", "version": self.config.reported_version}

    def rules(self) -> Reply:
        """
        C{GET /file/rules}.
        """
        size = self.config.max_file_size
        return 200, [{"max_file_size": size, "name": n} for n in self.config.rules]

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
            for name, eng_id in ENGINES
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
                        "engines": [eng_id for _, eng_id in ENGINES],
                        "free_disk_space": 0,
                        "id": "mdcore-emulator",
                        "issues": [],
                        "load": 0,
                        "os": "Linux",
                        "scan_queue": self.in_flight,
                        "total_memory": 0,
                        "version": self.config.reported_version,
                    }
                ],
            }
        ]

    # -- internals -------------------------------------------------------------------

    def _document(
        self, job: Job, now: float, first: int = 0, size: int | None = None
    ) -> dict[str, Any]:
        return document(
            job.node,
            job.progress(now),
            job.request(),
            self.config.shape,
            first=max(0, first),
            page_size=self.config.page_size if size is None else max(0, size),
        )

    def _dir(self) -> str:
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="mdcore-emulator-")
            self._own_workdir = True
        return self._workdir

    def _scanned(self, job: Job) -> None:
        if job.scan_call is not None and job.scan_call.active():
            job.scan_call.cancel()
        job.scan_call = None
        if job.stage != PROCESSING:
            return
        job.stage = SCANNED
        job.scanned = self.clock.seconds()
        self._in_flight -= 1
        if job.cancelled:
            return
        job.finish_call = self.clock.callLater(
            self.config.postprocess, self._finish, job
        )

    def _finish(self, job: Job) -> None:
        if job.finish_call is not None and job.finish_call.active():
            job.finish_call.cancel()
        job.finish_call = None
        if job.stage == DONE:
            return
        job.stage = DONE
        now = self.clock.seconds()
        job.finished = now
        self._finished[job.node.data_id] = now
        for node in job.node.walk():
            for digest in (node.findings.md5, node.findings.sha1, node.findings.sha256):
                if digest:  # an unexamined (instant) upload has none
                    self._by_hash[digest] = node.data_id
        job.release_waiters()
        if job.callback_url is not None:
            self.counters["webhook"] += 1
            self.webhooks.send(job.node.data_id, self._document(job, now))

    def _drop(self, job: Job) -> None:
        if job.stage == PROCESSING:
            self._in_flight -= 1
        job.stop_timers()
        job.release_waiters()
        self._finished.pop(job.node.data_id, None)
        for node in job.node.walk():
            self._jobs.pop(node.data_id, None)
            for digest in (node.findings.md5, node.findings.sha1, node.findings.sha256):
                if self._by_hash.get(digest) == node.data_id:
                    del self._by_hash[digest]
        for path in job.node.converted_files():
            remove(path)
        self.webhooks.forget(job.node.data_id)

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


def _examine(
    content: IO[bytes], upload: Upload, rule: str, config: EmulatorConfig, workdir: str
) -> Node:
    """
    The blocking part of a submission (run in a worker thread): examine the
    upload, then close it. Touches no shared state.
    """
    try:
        return examine(
            cast(BinaryIO, content),
            display_name=upload.raw_filename,
            name=unquote(upload.raw_filename),
            rule=rule,
            passwords=tuple(p.encode("utf-8") for p in upload.passwords),
            config=config,
            workdir=workdir,
        )
    finally:
        content.close()


# The listener and the resource tree live in their own modules; they are
# re-exported here, where callers have always found them.
from mdgateway.emulator.server import EmulatorServer, build_site  # noqa: E402
