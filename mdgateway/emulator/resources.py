# -*- test-case-name: tests.test_core_emulator -*-
"""
The C{twisted.web} resource tree of the Core emulator: routing, the API-key
check, uploads, JSON answers and streamed downloads, over a
L{CoreEmulator} that holds the state.

An upload's body belongs to the emulator from the moment it is handed on:
the request's content file is detached from the request first, so a client
that goes away while its upload is being examined cannot close the file
under the examining thread; such a client is simply not answered.
"""

from __future__ import annotations

import io
import json
import os
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mdgateway.emulator.jobs import Upload, passwords_from

if TYPE_CHECKING:
    from mdgateway.emulator.app import CoreEmulator

_log = Logger()

Reply = tuple[int, Any]
_ACCESS_DENIED = {"err": "Access denied"}
_BLOCK = 1 << 16


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


def _int_arg(request: Request, name: bytes) -> int | None:
    values = request.args.get(name) if request.args else None
    if not values:
        return None
    try:
        return int(values[0])
    except ValueError:
        return None


def json_body(request: Request, reply: Reply) -> bytes:
    """
    Set the status and content type of C{request}; return the sorted JSON.
    """
    status, doc = reply
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(doc, sort_keys=True).encode("utf-8")


class Fixed(Resource):
    """
    A leaf answering one fixed reply to any method.
    """

    isLeaf = True

    def __init__(self, reply: Reply) -> None:
        super().__init__()
        self._reply = reply

    def render(self, request: Request) -> bytes:
        return json_body(request, self._reply)


_NOT_FOUND = Fixed((404, {"err": "Not found"}))


class _Node(Resource):
    """
    A resource of the emulator: JSON answers, API-key check, unknown
    children and methods answered in JSON.
    """

    denied_status = 403
    denied_body: dict[str, str] = _ACCESS_DENIED

    def __init__(self, emulator: CoreEmulator) -> None:
        super().__init__()
        self.emulator = emulator

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NOT_FOUND

    def render(self, request: Request) -> bytes | int:
        if not self.emulator.authorised(_apikey(request)):
            self.emulator.counters["denied"] += 1
            return json_body(request, (self.denied_status, self.denied_body))
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, f"render_{method}", None)
        if handler is None:
            return json_body(request, (405, {"err": "Method not allowed"}))
        result: bytes | int = handler(request)
        return result


class _Leaf(_Node):
    isLeaf = True

    def __init__(self, emulator: CoreEmulator, key: str = "") -> None:
        super().__init__(emulator)
        self.key = key


class _Version(_Leaf):
    def render_GET(self, request: Request) -> bytes:
        return json_body(request, self.emulator.version())


class _Rules(_Leaf):
    def render_GET(self, request: Request) -> bytes:
        return json_body(request, self.emulator.rules())


class _Engines(_Leaf):
    def render_GET(self, request: Request) -> bytes:
        return json_body(request, self.emulator.engines())


class _Nodes(_Leaf):
    def render_GET(self, request: Request) -> bytes:
        return json_body(request, self.emulator.nodes())


class _Stat(_Node):
    def __init__(self, emulator: CoreEmulator) -> None:
        super().__init__(emulator)
        self.putChild(b"nodes", _Nodes(emulator))
        self.putChild(b"engines", _Engines(emulator))


class _Hash(_Node):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return _HashItem(self.emulator, path.decode("ascii", "replace"))


class _HashItem(_Leaf):
    def render_GET(self, request: Request) -> bytes:
        return json_body(request, self.emulator.lookup(self.key))


class _Cancel(_Leaf):
    denied_status = 405

    def render_POST(self, request: Request) -> bytes:
        return json_body(request, self.emulator.cancel(self.key))


class _Hang(Resource):
    """
    Holds the request open and never answers.
    """

    isLeaf = True

    def __init__(self, emulator: CoreEmulator) -> None:
        super().__init__()
        self.emulator = emulator

    def render(self, request: Request) -> int:
        self.emulator.stalled(request)
        return NOT_DONE_YET


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
        first = _int_arg(request, b"first") or 0
        size = _int_arg(request, b"size")
        return json_body(request, self.emulator.result(self.data_id, first, size))


class _Converted(_Leaf):
    denied_status = 405

    def render_GET(self, request: Request) -> bytes | int:
        if self.emulator.take_stall():
            return _stall(self.emulator, request)
        status, error, path, name = self.emulator.converted(self.key)
        if path is None or name is None:
            return json_body(request, (status, error))
        try:
            source = open(path, "rb")
        except OSError:
            return json_body(request, (404, {"err": "File could not be found"}))
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


class _Webhook(_Node):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return _WebhookItem(self.emulator, path.decode("ascii", "replace"))


class _WebhookItem(_Leaf):
    def render_GET(self, request: Request) -> bytes:
        return json_body(request, self.emulator.webhook(self.key))


class _Refused:
    def __init__(self, status: int, body: Any) -> None:
        self.reply: Reply = (status, body)


def _take_upload(
    request: Request, webhooks: bool
) -> tuple[IO[bytes], Upload] | _Refused:
    """
    Check an upload's headers and take its body away from the request.
    """
    length = request.getHeader(b"content-length")
    if length is None:
        return _Refused(411, {"err": "Missing Content-Length header."})
    content = request.content
    has_body = content is not None and length.strip() not in (b"", b"0")
    for link in (b"downloadfrom", b"filepath"):
        value = _header(request, link)
        if value is None:
            continue
        if has_body:
            return _Refused(
                400, {"err": "Both body data and download link were given."}
            )
        if link == b"downloadfrom" and not value.lower().startswith(
            ("http://", "https://")
        ):
            return _Refused(
                400, {"err": "Download url must start with http:// or https://."}
            )
    if content is None:
        content = io.BytesIO()
    # The body is the emulator's now: Request.connectionLost closes
    # request.content, which must not be the file a worker is reading.
    request.content = io.BytesIO()
    rule = _header(request, b"rule") or _header(request, b"workflow")
    callback = _header(request, b"callbackurl") if webhooks else None
    headers = [
        (name.decode("latin-1"), value.decode("utf-8", "replace"))
        for name, values in request.requestHeaders.getAllRawHeaders()
        for value in values
    ]
    return content, Upload(
        raw_filename=_header(request, b"filename") or "",
        rule=unquote(rule) if rule is not None else None,
        user_agent=_header(request, b"user_agent") or "",
        passwords=passwords_from(headers),
        callback_url=unquote(callback) if callback is not None else None,
    )


def busy_headers(emulator: CoreEmulator, request: Request, status: int) -> None:
    """
    Add C{Retry-After} to a 503 when the emulator is told to send one.
    """
    seconds = emulator.config.retry_after
    if status == 503 and seconds is not None:
        request.setHeader(b"retry-after", str(seconds).encode("ascii"))


def _answer_later(
    emulator: CoreEmulator, request: Request, answering: Deferred[Reply]
) -> int:
    """
    Write the reply when it comes, unless the client has gone (then it is
    only counted: a vanished client is normal under load, not an error).
    """
    gone: list[object] = []
    request.notifyFinish().addErrback(gone.append)

    def answer(reply: Reply) -> None:
        if gone:
            emulator.counters["gone"] += 1
            return
        busy_headers(emulator, request, reply[0])
        body = json_body(request, reply)
        request.write(body)
        request.finish()

    def failed(failure: Failure) -> None:
        _log.failure("emulator submission failed", failure)
        answer((500, {"err": "Failed to request scan. Try again later."}))

    answering.addCallbacks(answer, failed)
    return NOT_DONE_YET


class _Sync(_Leaf):
    denied_status = 400

    def render_POST(self, request: Request) -> bytes | int:
        emulator = self.emulator
        if not emulator.config.shape.sync:
            emulator.counters["no_sync"] += 1
            return json_body(request, (404, {"err": "Not found"}))
        taken = _take_upload(request, emulator.config.shape.webhooks)
        if isinstance(taken, _Refused):
            return json_body(request, taken.reply)
        content, upload = taken
        return _answer_later(emulator, request, emulator.submit_sync(content, upload))


class _File(_Node):
    denied_status = 400

    def __init__(self, emulator: CoreEmulator) -> None:
        super().__init__(emulator)
        self.putChild(b"rules", _Rules(emulator))
        self.putChild(b"converted", _ConvertedParent(emulator))
        self.putChild(b"sync", _Sync(emulator))
        self.putChild(b"webhook", _Webhook(emulator))

    def getChild(self, path: bytes, request: Request) -> Resource:
        if not path:
            return self
        return _Result(self.emulator, path.decode("ascii", "replace"))

    def render_POST(self, request: Request) -> bytes | int:
        emulator = self.emulator
        taken = _take_upload(request, emulator.config.shape.webhooks)
        if isinstance(taken, _Refused):
            return json_body(request, taken.reply)
        content, upload = taken
        return _answer_later(emulator, request, emulator.submit_later(content, upload))


class _Login(_Leaf):
    def render(self, request: Request) -> bytes | int:
        if request.method != b"POST":
            return json_body(request, (405, {"err": "Method not allowed"}))
        try:
            body = json.loads((request.content or io.BytesIO()).read() or b"{}")
        except ValueError:
            body = {}
        if not isinstance(body, dict) or not body.get("user"):
            return json_body(request, (403, {"err": "Failed to login"}))
        session = self.emulator.config.apikey or os.urandom(16).hex()
        return json_body(request, (200, {"session_id": session}))


class _Logout(_Leaf):
    denied_body = {"response": "Access denied"}

    def render_POST(self, request: Request) -> bytes:
        return json_body(request, (200, {"response": "Logout success"}))


class _Readyz(_Leaf):
    def render_GET(self, request: Request) -> bytes:
        emulator = self.emulator
        if emulator.config.shape.name != "v5":
            return json_body(request, (404, {"err": "Not found"}))
        queued = emulator.in_flight
        limit = emulator.config.queue_size
        ok = queued < limit
        return json_body(
            request,
            (
                200 if ok else 503,
                {
                    "database": {"status": True},
                    "engines": [],
                    "license": {"status": "ok"},
                    "number_active_av_engines": {"status": "ok", "threshold": 1},
                    "scan_queue": {
                        "max_number_in_queue": limit,
                        "number_in_queue": queued,
                        "status": "ok" if ok else "error",
                        "threshold": limit,
                    },
                },
            ),
        )


class EmulatorResource(_Node):
    """
    The root of the emulated API: C{/file}, C{/file/sync}, C{/file/{id}},
    C{/file/{id}/cancel}, C{/file/converted/{id}}, C{/file/webhook/{id}},
    C{/file/rules}, C{/hash/{hash}}, C{/version}, C{/stat/nodes},
    C{/stat/engines}, C{/login}, C{/logout} and (v5) C{/readyz}.
    """

    def __init__(self, emulator: CoreEmulator) -> None:
        super().__init__(emulator)
        self.putChild(b"file", _File(emulator))
        self.putChild(b"hash", _Hash(emulator))
        self.putChild(b"version", _Version(emulator))
        self.putChild(b"stat", _Stat(emulator))
        self.putChild(b"login", _Login(emulator))
        self.putChild(b"logout", _Logout(emulator))
        self.putChild(b"readyz", _Readyz(emulator))

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if self.emulator.take("hang"):
            return _Hang(self.emulator)
        if self.emulator.inject_failure():
            return Fixed((500, {"err": "Failed to request scan. Try again later."}))
        child: Resource = super().getChildWithDefault(path, request)
        return child

    def render_GET(self, request: Request) -> bytes:
        return json_body(request, (404, {"err": "Not found"}))
