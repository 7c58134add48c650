# -*- test-case-name: tests.test_admin -*-
"""
The admin API's HTTP plumbing: the request wrapper with its query and body
readers, the answer shapes, the route table's types, the bounded site, and
the errors that map onto statuses.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mdgateway.policy.rules import DIRECTIONS
from mdgateway.store.interfaces import (
    MAX_ID_LENGTH,
    MAX_PAGE,
    MessageStatus,
    PageRequest,
    ScanVerdict,
)

if TYPE_CHECKING:
    from mdgateway.ops.admin import AdminAPI

_T = TypeVar("_T")

#: Largest request body accepted (every body is a small JSON object).
MAX_BODY = 64 * 1024

#: Most addresses one forward may name.
MAX_FORWARD = 100

JSON_TYPE = b"application/json; charset=utf-8"

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
FILENAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class HttpError(Exception):
    """
    Answer with C{status} and C{{"error": message, "status": status}}.

    @ivar parameter: the query parameter or body field at fault, if any.
    """

    def __init__(
        self,
        status: int,
        message: str,
        parameter: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.parameter = parameter
        self.headers = tuple(headers)


def bad_parameter(parameter: str, message: str) -> HttpError:
    return HttpError(400, f"{parameter}: {message}", parameter)


@attrs.frozen
class ApiResponse:
    """
    A complete answer: status, body and content type.
    """

    status: int
    body: bytes
    content_type: bytes = JSON_TYPE
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def json(cls, status: int, data: object) -> ApiResponse:
        body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        return cls(status, body.encode("utf-8") + b"\n")


def error_response(
    status: int,
    message: str,
    parameter: str | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> ApiResponse:
    data: dict[str, object] = {"error": message, "status": status}
    if parameter is not None:
        data["parameter"] = parameter
    return attrs.evolve(ApiResponse.json(status, data), headers=tuple(headers))


class Streamed:
    """
    The handler wrote and finished the response itself.
    """


STREAMED = Streamed()


@attrs.define
class ApiCall:
    """
    One request on its way through a handler.

    @ivar args: the variable path segments, in order.
    @ivar gone: the client disconnected; nothing may be written.
    """

    request: Request
    args: tuple[str, ...]
    now: float
    max_body: int
    gone: bool = False
    #: The name of the token the request was authorized with.
    by: str = ""

    @property
    def origin(self) -> str:
        """
        Where the request came from, for the audit and the log.
        """
        return client_host(self.request)

    def query(self, allowed: Sequence[str]) -> _Query:
        return _Query.parse(self.request, allowed, self.now)

    def body(self) -> dict[str, Any]:
        """
        The request body as a JSON object; C{{}} when empty.
        """
        raw = _read_body(self.request, self.max_body)
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the body must be a JSON object")
        return data


def _read_body(request: Request, limit: int) -> bytes:
    if getattr(request, "body_too_large", False):
        raise HttpError(413, f"request body larger than {limit} bytes")
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data = content.read(limit + 1)
    if len(data) > limit:
        raise HttpError(413, f"request body larger than {limit} bytes")
    return bytes(data)


@attrs.define
class _Query:
    """
    The query string of one request, checked parameter by parameter.
    """

    values: dict[str, list[str]]
    now: float

    @classmethod
    def parse(cls, request: Request, allowed: Sequence[str], now: float) -> _Query:
        raw = urlsplit(request.uri).query
        try:
            text = raw.decode("ascii")
            values = parse_qs(
                text, keep_blank_values=True, strict_parsing=False, errors="strict"
            )
        except (UnicodeDecodeError, ValueError):
            raise HttpError(
                400, "the query string is not percent-encoded UTF-8"
            ) from None
        for name in values:
            if name not in allowed:
                raise bad_parameter(name, "unknown parameter")
        # An empty value means "not set", as an HTML form sends it.
        kept = {k: [v for v in vs if v != ""] for k, vs in values.items()}
        return cls({k: vs for k, vs in kept.items() if vs}, now)

    def many(self, name: str) -> list[str]:
        """
        Every value of C{name}, repeated or comma-separated.
        """
        return [
            part.strip()
            for value in self.values.get(name, [])
            for part in value.split(",")
            if part.strip()
        ]

    def text(self, name: str) -> str | None:
        values = self.values.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise bad_parameter(name, "given more than once")
        return values[0]

    def time(self, name: str) -> float | None:
        text = self.text(name)
        if text is None:
            return None
        value = parse_time(text, self.now)
        if value is None:
            raise bad_parameter(
                name,
                f"not an ISO-8601 time, epoch seconds or a duration ago "
                f"(30m, 2h, 7d): {text!r}",
            )
        return value

    def window(self) -> tuple[float | None, float | None]:
        since, until = self.time("since"), self.time("until")
        if since is not None and until is not None and since >= until:
            raise bad_parameter("until", "must be later than since")
        return since, until

    def integer(self, name: str, low: int, high: int) -> int | None:
        text = self.text(name)
        if text is None:
            return None
        if not text.isdigit() or not low <= int(text) <= high:
            raise bad_parameter(
                name, f"must be an integer from {low} to {high}: {text!r}"
            )
        return int(text)

    def boolean(self, name: str) -> bool | None:
        text = self.text(name)
        if text is None:
            return None
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise bad_parameter(name, f"must be true or false: {text!r}")

    def direction(self) -> str | None:
        text = self.text("direction")
        if text is not None and text.lower() not in DIRECTIONS:
            raise bad_parameter("direction", f"must be one of {', '.join(DIRECTIONS)}")
        return text.lower() if text is not None else None

    def statuses(self) -> frozenset[MessageStatus]:
        out = set()
        for text in self.many("status"):
            try:
                out.add(MessageStatus(text.lower().replace("_", " ")))
            except ValueError:
                names = ", ".join(s.value for s in MessageStatus)
                raise bad_parameter(
                    "status", f"unknown status {text!r} ({names})"
                ) from None
        return frozenset(out)

    def verdicts(self) -> frozenset[ScanVerdict]:
        by_fold = {v.value.casefold(): v for v in ScanVerdict}
        out = set()
        for text in self.many("verdict"):
            verdict = by_fold.get(text.casefold())
            if verdict is None:
                names = ", ".join(v.value for v in ScanVerdict)
                raise bad_parameter("verdict", f"unknown verdict {text!r} ({names})")
            out.add(verdict)
        return frozenset(out)

    def page(self) -> PageRequest:
        limit = self.integer("limit", 1, MAX_PAGE)
        return PageRequest(
            limit=50 if limit is None else limit, cursor=self.text("cursor")
        )


_PAGE_PARAMETERS = ("limit", "cursor")
MESSAGE_PARAMETERS = (
    "since",
    "until",
    "sender",
    "recipient",
    "subject",
    "status",
    "rule",
    "direction",
    "verdict",
    "queue_id",
    "message_id",
    *_PAGE_PARAMETERS,
)
REFUSAL_PARAMETERS = (
    "since",
    "until",
    "client",
    "sender",
    "recipient",
    "listener",
    "code",
    "category",
    *_PAGE_PARAMETERS,
)
AUDIT_PARAMETERS = (
    "since",
    "until",
    "actor",
    "action",
    "target",
    *_PAGE_PARAMETERS,
)
QUARANTINE_PARAMETERS = (
    "since",
    "until",
    "sender",
    "recipient",
    "subject",
    "reason",
    "rule",
    "direction",
    "pinned",
    "released",
    "message_id",
    *_PAGE_PARAMETERS,
)


def parse_time(text: str, now: float) -> float | None:
    """
    A time filter: ISO-8601 (without an offset: UTC), POSIX seconds, or a
    duration before C{now} (C{90s}, C{30m}, C{2h}, C{7d}); C{None} when it
    is none of these.
    """
    text = text.strip()
    match = _DURATION.match(text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    if _NUMBER.match(text):
        value = float(text)
        return value if math.isfinite(value) else None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


async def resolve(value: Any) -> Any:
    """
    The result of an operation that may answer at once (a value) or later
    (a L{Deferred} or a coroutine).
    """
    if isinstance(value, Deferred) or hasattr(value, "__await__"):
        return await value
    return value


_Handler = Callable[["AdminAPI", ApiCall], Awaitable[ApiResponse | Streamed]]


@attrs.frozen
class AdminRoute:
    method: bytes
    pattern: tuple[str | None, ...]
    handler: _Handler

    def match(self, segments: Sequence[str]) -> tuple[str, ...] | None:
        if len(segments) != len(self.pattern):
            return None
        args = []
        for expected, got in zip(self.pattern, segments, strict=True):
            if expected is None:
                if not got or len(got) > MAX_ID_LENGTH:
                    return None
                args.append(got)
            elif expected != got:
                return None
        return tuple(args)


def split_path(raw: bytes) -> list[str]:
    try:
        text = raw.decode("ascii")
        segments = [unquote(s, errors="strict") for s in text.split("/")]
    except (UnicodeDecodeError, ValueError):
        raise HttpError(404, "no such resource") from None
    if segments and segments[0] == "":
        segments = segments[1:]
    if len(segments) > 1 and segments[-1] == "":
        segments = segments[:-1]
    return segments


class Root(Resource):
    """
    The whole API as one leaf: every path is routed by L{AdminAPI}.
    """

    isLeaf = True

    def __init__(self, api: AdminAPI) -> None:
        super().__init__()
        self._api = api

    def render(self, request: Request) -> int:
        ensureDeferred(self._api._serve(request))
        return NOT_DONE_YET


def bounded_request(limit: int) -> type[Request]:
    class BoundedRequest(Request):
        """
        A request that keeps at most C{limit} bytes of body (in memory) and
        then only counts, so the handler can refuse it with 413 without a
        large body ever reaching memory or disk.
        """

        body_too_large = False
        _received = 0

        def gotLength(self, length: int | None) -> None:
            self.content = io.BytesIO()
            self._received = 0
            self.body_too_large = length is not None and length > limit

        def handleContentChunk(self, data: bytes) -> None:
            self._received += len(data)
            if self._received > limit:
                if not self.body_too_large:
                    self.body_too_large = True
                    self.content = io.BytesIO()
                return
            content = self.content
            if not self.body_too_large and content is not None:
                content.write(data)

    return BoundedRequest


#: Load balancers probe these every few seconds: logged only when they fail.
_PROBES = frozenset({b"/healthz", b"/readyz"})

_access_log = Logger(namespace="mdgateway.ops.admin.access")


class AdminSite(Site):
    """
    A site whose access log is one structured event per request (instead
    of a line of text in the combined log format), and none for a health
    probe that succeeds.
    """

    def log(self, request: Any) -> None:
        code = request.code or 0
        if request.path in _PROBES and code < 400:
            return
        _access_log.info(
            "admin API {method} {path} {status}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            status=code,
            client=client_host(request),
            bytes=request.sentLength,
        )


def client_host(request: Request) -> str:
    """
    The client's address, for logs (an IPv6 address in brackets).
    """
    address = request.getClientAddress()
    host = str(getattr(address, "host", None) or address)
    return f"[{host}]" if ":" in host else host


def unauthorized(message: str, challenge: bytes) -> HttpError:
    return HttpError(401, message, headers=[(b"www-authenticate", challenge)])


def only_fields(body: dict[str, Any], known: Sequence[str]) -> None:
    for name in body:
        if name not in known:
            raise bad_parameter(name, "unknown field")
