# -*- test-case-name: tests.test_admin -*-
"""
The admin HTTP API: history, refused log, quarantine, queue, reload, health
and metrics, as JSON over C{twisted.web}.

One leaf resource routes every request to an C{async def} handler through
an explicit route table. A handler returns the answer and one place writes
it (status, JSON, headers), so errors map to statuses uniformly and no
handler blocks the reactor: store calls run in the store's thread pool, and
the one streaming handler (the C{.eml} download) sends a temporary file
through a producer instead of reading it into memory.

Authentication is a bearer token compared in constant time. Only
C{/healthz} and C{/readyz} answer without it (load balancers probe them);
C{/metrics} needs it too unless C{metrics_public} is set, because metric
labels name rules and profiles (Prometheus sends it with
C{authorization: {credentials_file: ...}}).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import IO, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mdgateway.ops import adminjson
from mdgateway.ops.interfaces import (
    ActionResult,
    IOperations,
    OperationError,
    ReloadResult,
)
from mdgateway.ops.tokens import DEFAULT_NAME, find_token
from mdgateway.policy.rules import DIRECTIONS
from mdgateway.smtp.parse import ParseError, parse_mailbox
from mdgateway.store.audit import DONE, REFUSED, AuditEntry, AuditFilter
from mdgateway.store.interfaces import (
    MAX_ID_LENGTH,
    MAX_PAGE,
    CorruptOriginalError,
    MessageFilter,
    MessageStatus,
    NotFoundError,
    Page,
    PageRequest,
    QuarantineFilter,
    RefusalFilter,
    ScanVerdict,
    StoreError,
)

__all__ = ["MAX_BODY", "AdminAPI", "HttpError", "client_host", "parse_time"]

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
_FILENAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


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


def _bad(parameter: str, message: str) -> HttpError:
    return HttpError(400, f"{parameter}: {message}", parameter)


@attrs.frozen
class _Response:
    """
    A complete answer: status, body and content type.
    """

    status: int
    body: bytes
    content_type: bytes = JSON_TYPE
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def json(cls, status: int, data: object) -> _Response:
        body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        return cls(status, body.encode("utf-8") + b"\n")


def _error(
    status: int,
    message: str,
    parameter: str | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> _Response:
    data: dict[str, object] = {"error": message, "status": status}
    if parameter is not None:
        data["parameter"] = parameter
    return attrs.evolve(_Response.json(status, data), headers=tuple(headers))


class _Streamed:
    """
    The handler wrote and finished the response itself.
    """


_STREAMED = _Streamed()


@attrs.define
class _Call:
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
                raise _bad(name, "unknown parameter")
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
            raise _bad(name, "given more than once")
        return values[0]

    def time(self, name: str) -> float | None:
        text = self.text(name)
        if text is None:
            return None
        value = parse_time(text, self.now)
        if value is None:
            raise _bad(
                name,
                f"not an ISO-8601 time, epoch seconds or a duration ago "
                f"(30m, 2h, 7d): {text!r}",
            )
        return value

    def window(self) -> tuple[float | None, float | None]:
        since, until = self.time("since"), self.time("until")
        if since is not None and until is not None and since >= until:
            raise _bad("until", "must be later than since")
        return since, until

    def integer(self, name: str, low: int, high: int) -> int | None:
        text = self.text(name)
        if text is None:
            return None
        if not text.isdigit() or not low <= int(text) <= high:
            raise _bad(name, f"must be an integer from {low} to {high}: {text!r}")
        return int(text)

    def boolean(self, name: str) -> bool | None:
        text = self.text(name)
        if text is None:
            return None
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise _bad(name, f"must be true or false: {text!r}")

    def direction(self) -> str | None:
        text = self.text("direction")
        if text is not None and text.lower() not in DIRECTIONS:
            raise _bad("direction", f"must be one of {', '.join(DIRECTIONS)}")
        return text.lower() if text is not None else None

    def statuses(self) -> frozenset[MessageStatus]:
        out = set()
        for text in self.many("status"):
            try:
                out.add(MessageStatus(text.lower().replace("_", " ")))
            except ValueError:
                names = ", ".join(s.value for s in MessageStatus)
                raise _bad("status", f"unknown status {text!r} ({names})") from None
        return frozenset(out)

    def verdicts(self) -> frozenset[ScanVerdict]:
        by_fold = {v.value.casefold(): v for v in ScanVerdict}
        out = set()
        for text in self.many("verdict"):
            verdict = by_fold.get(text.casefold())
            if verdict is None:
                names = ", ".join(v.value for v in ScanVerdict)
                raise _bad("verdict", f"unknown verdict {text!r} ({names})")
            out.add(verdict)
        return frozenset(out)

    def page(self) -> PageRequest:
        limit = self.integer("limit", 1, MAX_PAGE)
        return PageRequest(
            limit=50 if limit is None else limit, cursor=self.text("cursor")
        )


_PAGE_PARAMETERS = ("limit", "cursor")
_MESSAGE_PARAMETERS = (
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
_REFUSAL_PARAMETERS = (
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
_AUDIT_PARAMETERS = (
    "since",
    "until",
    "actor",
    "action",
    "target",
    *_PAGE_PARAMETERS,
)
_QUARANTINE_PARAMETERS = (
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


async def _resolve(value: Any) -> Any:
    """
    The result of an operation that may answer at once (a value) or later
    (a L{Deferred} or a coroutine).
    """
    if isinstance(value, Deferred) or hasattr(value, "__await__"):
        return await value
    return value


_Handler = Callable[["AdminAPI", _Call], Awaitable[_Response | _Streamed]]


@attrs.frozen
class _Route:
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


def _split_path(raw: bytes) -> list[str]:
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


class _Root(Resource):
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


def _bounded_request(limit: int) -> type[Request]:
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


class _AdminSite(Site):
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


class AdminAPI:
    """
    The admin HTTP API over an L{IOperations}.

    @param operations: the running gateway.
    @param token: the bearer tokens by name (see L{mdgateway.ops.tokens});
        every protected request must carry one, and the audit names its
        operator by it. A single string is the token named C{admin}.
    @param clock: the time for relative filters (C{since=2h}).
    @param metrics_public: serve C{/metrics} without the token (for a
        scraper that cannot send one, on a listener only it can reach).
    @param scratch_dir: where a quarantined original is written before it
        is streamed (default: the system temporary folder); each file is
        unlinked as soon as it is open.
    @param max_body: largest request body accepted.
    """

    _log = Logger()

    def __init__(
        self,
        operations: IOperations,
        token: str | Mapping[str, str],
        clock: IReactorTime,
        *,
        metrics_public: bool = False,
        scratch_dir: str | None = None,
        max_body: int = MAX_BODY,
    ) -> None:
        self.operations = operations
        self.set_tokens(token)
        self._clock = clock
        self._public = {("healthz",), ("readyz",)}
        if metrics_public:
            self._public.add(("metrics",))
        self._scratch = scratch_dir
        self._max_body = max_body

    def token_name(self, presented: bytes | str) -> str | None:
        """
        The name of the admin token C{presented}, or L{None}.
        """
        if isinstance(presented, str):
            presented = presented.encode("utf-8")
        return find_token(self._tokens, presented)

    def set_tokens(self, tokens: str | Mapping[str, str]) -> None:
        """
        Accept these tokens from now on (a reload of the token file).
        """
        named = {DEFAULT_NAME: tokens} if isinstance(tokens, str) else dict(tokens)
        if not named:
            raise ValueError("at least one admin token is needed")
        for name, token in named.items():
            if not token or token != token.strip() or not token.isprintable():
                raise ValueError(
                    f"the admin token {name!r} must be non-empty printable text"
                )
        self._tokens = [(name, token.encode("utf-8")) for name, token in named.items()]

    def resource(self) -> Resource:
        """
        The root resource, to serve at C{/} of a L{Site}. Prefer L{site},
        which also bounds request bodies while they arrive.
        """
        return _Root(self)

    def site(self) -> Site:
        """
        A L{Site} for the admin listener: this API at its root, request
        bodies beyond C{max_body} discarded while they arrive, no
        tracebacks in answers.
        """
        site = _AdminSite(
            self.resource(), requestFactory=_bounded_request(self._max_body)
        )
        site.displayTracebacks = False
        return site

    # -- plumbing

    async def _serve(self, request: Request) -> None:
        call = _Call(request, (), self._clock.seconds(), self._max_body)

        def lost(_: object) -> None:
            call.gone = True

        # Handlers are not cancelled when the client goes away: a release
        # half-done because a curl was interrupted would be worse than work
        # nobody reads. Only the writing is skipped.
        request.notifyFinish().addErrback(lost)
        try:
            response = await self._dispatch(request, call)
        except HttpError as e:
            response = _error(e.status, e.message, e.parameter, e.headers)
        except OperationError as e:
            response = _error(e.status, e.message)
        except NotFoundError as e:
            response = _error(404, str(e) or "not found")
        except CorruptOriginalError:
            self._log.failure("Admin API: corrupt quarantined original")
            response = _error(500, "the stored original is corrupt")
        except StoreError:
            self._log.failure("Admin API: store failed")
            response = _error(503, "the store is unavailable")
        except Exception:
            self._log.failure(
                "Admin API: {method} {path} failed",
                method=request.method,
                path=request.path,
            )
            response = _error(500, "internal error")
        if isinstance(response, _Streamed) or call.gone:
            return
        request.setResponseCode(response.status)
        request.setHeader(b"content-type", response.content_type)
        request.setHeader(b"content-length", b"%d" % len(response.body))
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        for name, value in response.headers:
            request.setHeader(name, value)
        request.write(response.body)
        request.finish()

    async def _dispatch(self, request: Request, call: _Call) -> _Response | _Streamed:
        segments = _split_path(request.path)
        if tuple(segments) not in self._public:
            call.by = self._authenticate(request)
        asked = request.method.upper()
        method = b"GET" if asked == b"HEAD" else asked
        allowed: list[bytes] = []
        for route in _ROUTES:
            args = route.match(segments)
            if args is None:
                continue
            if route.method == method:
                call.args = args
                return await route.handler(self, call)
            allowed.append(route.method)
        if not allowed:
            raise HttpError(404, "no such resource")
        if b"GET" in allowed:
            allowed.append(b"HEAD")
        raise HttpError(
            405,
            f"method {asked.decode('ascii', 'replace')} not allowed here",
            headers=[(b"allow", b", ".join(allowed))],
        )

    def _authenticate(self, request: Request) -> str:
        """
        The name of the token the request carries.
        """
        header = request.getHeader(b"authorization")
        if header is None:
            raise _unauthorized("missing bearer token", b'Bearer realm="mdgateway"')
        scheme, _, credentials = header.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            raise _unauthorized("not a bearer token", b'Bearer realm="mdgateway"')
        found = self.token_name(credentials.strip())
        if found is None:
            self._log.warn(
                "Admin API: invalid token from {client}", client=client_host(request)
            )
            raise _unauthorized(
                "invalid token", b'Bearer realm="mdgateway", error="invalid_token"'
            )
        return found

    def _logged(self, call: _Call, action: str, target: str, **fields: object) -> None:
        self._log.info(
            "Admin API: {action} {target} by {by}",
            action=action,
            target=target,
            by=call.by,
            client=call.origin,
            **fields,
        )

    async def _audited(
        self, call: _Call, action: str, target: str, result: str, detail: str = ""
    ) -> None:
        """
        Record an operator action in the audit; an audit the store cannot
        take is logged, and the action's answer stands.
        """
        origin = f"from {call.origin}"
        entry = AuditEntry(
            at=call.now,
            actor=call.by,
            action=action,
            target=target,
            result=result,
            detail=f"{detail}, {origin}" if detail else origin,
            finished_at=call.now,
        )
        try:
            await self.operations.store.record_audit(entry)
        except StoreError:
            self._log.failure(
                "Admin API: could not record {action} in the audit", action=action
            )

    async def _page(self, search: Awaitable[Page[_T]]) -> Page[_T]:
        try:
            return await search
        except ValueError as e:
            # The store validates the opaque cursor before it searches.
            raise _bad("cursor", str(e)) from None

    # -- health and metrics

    async def _healthz(self, call: _Call) -> _Response:
        return _Response.json(200, {"status": "alive"})

    async def _readyz(self, call: _Call) -> _Response:
        try:
            readiness = await _resolve(self.operations.readiness())
        except Exception:
            self._log.failure("Admin API: readiness check failed")
            data: dict[str, object] = {
                "ready": False,
                "checks": {},
                "reasons": ["the readiness check failed"],
            }
            return _Response.json(503, data)
        return _Response.json(
            200 if readiness.ready else 503, adminjson.readiness(readiness)
        )

    async def _health(self, call: _Call) -> _Response:
        call.query(())
        readiness = await _resolve(self.operations.readiness())
        return _Response.json(200, adminjson.health(readiness))

    async def _metrics(self, call: _Call) -> _Response:
        accept = call.request.getHeader(b"accept") or b""
        body, content_type = self.operations.metrics.render(accept.decode("latin-1"))
        return _Response(200, body, content_type.encode("ascii"))

    # -- history and refused log

    async def _messages(self, call: _Call) -> _Response:
        q = call.query(_MESSAGE_PARAMETERS)
        since, until = q.window()
        filters = MessageFilter(
            since=since,
            until=until,
            sender=q.text("sender"),
            recipient=q.text("recipient"),
            subject=q.text("subject"),
            statuses=q.statuses(),
            rule=q.text("rule"),
            direction=q.direction(),
            verdicts=q.verdicts(),
            queue_id=q.text("queue_id"),
            message_id_header=q.text("message_id"),
        )
        page = q.page()
        result = await self._page(self.operations.store.search_messages(filters, page))
        return _Response.json(200, adminjson.page(result, adminjson.message_summary))

    async def _message(self, call: _Call) -> _Response:
        (message_id,) = call.args
        call.query(())
        store = self.operations.store
        try:
            record = await store.get_message(message_id)
        except NotFoundError:
            raise HttpError(404, f"no history entry {message_id!r}") from None
        items = await store.list_quarantine(
            QuarantineFilter(message_id=message_id), PageRequest(limit=MAX_PAGE)
        )
        ids = [item.id for item in items.items]
        return _Response.json(200, adminjson.message_record(record, ids))

    async def _refused(self, call: _Call) -> _Response:
        q = call.query(_REFUSAL_PARAMETERS)
        since, until = q.window()
        filters = RefusalFilter(
            since=since,
            until=until,
            client_address=q.text("client"),
            sender=q.text("sender"),
            recipient=q.text("recipient"),
            listener=q.text("listener"),
            code=q.integer("code", 200, 599),
            category=q.text("category"),
        )
        page = q.page()
        result = await self._page(self.operations.store.search_refusals(filters, page))
        return _Response.json(200, adminjson.page(result, adminjson.refusal))

    # -- quarantine

    async def _quarantine(self, call: _Call) -> _Response:
        q = call.query(_QUARANTINE_PARAMETERS)
        since, until = q.window()
        filters = QuarantineFilter(
            since=since,
            until=until,
            sender=q.text("sender"),
            recipient=q.text("recipient"),
            subject=q.text("subject"),
            reason=q.text("reason"),
            rule=q.text("rule"),
            direction=q.direction(),
            pinned=q.boolean("pinned"),
            released=q.boolean("released"),
            message_id=q.text("message_id"),
        )
        page = q.page()
        result = await self._page(self.operations.store.list_quarantine(filters, page))
        return _Response.json(200, adminjson.page(result, adminjson.quarantine_item))

    async def _item(self, call: _Call) -> _Response:
        (item_id,) = call.args
        call.query(())
        item = await self._get_item(item_id)
        return _Response.json(200, adminjson.quarantine_item(item))

    async def _get_item(self, item_id: str) -> Any:
        try:
            return await self.operations.store.get_quarantined(item_id)
        except NotFoundError:
            raise HttpError(404, f"no quarantine item {item_id!r}") from None

    async def _eml(self, call: _Call) -> _Response | _Streamed:
        (item_id,) = call.args
        call.query(())
        fd, path = tempfile.mkstemp(
            prefix="mdgateway-admin-", suffix=".eml", dir=self._scratch
        )
        os.close(fd)
        try:
            try:
                item = await self.operations.store.read_quarantined(item_id, path)
            except NotFoundError:
                raise HttpError(404, f"no quarantine item {item_id!r}") from None
            original = open(path, "rb")  # noqa: SIM115 (closed below)
        finally:
            # Unlinked at once: the open file stays readable, and nothing is
            # left behind whatever happens to the transfer.
            with suppress(OSError):
                os.unlink(path)
        with original:
            await self._send_file(call, original, item.id)
        return _STREAMED

    async def _send_file(self, call: _Call, original: IO[bytes], item_id: str) -> None:
        request = call.request
        if call.gone:
            return
        size = os.fstat(original.fileno()).st_size
        name = _FILENAME_UNSAFE.sub("_", item_id) or "original"
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"message/rfc822")
        request.setHeader(b"content-length", b"%d" % size)
        request.setHeader(
            b"content-disposition",
            f'attachment; filename="{name}.eml"'.encode("ascii"),
        )
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        if request.method.upper() != b"HEAD":
            try:
                await FileSender().beginFileTransfer(original, request)
            except OSError:
                # Reading failed halfway: the announced length cannot be
                # met, so the connection is closed rather than finished.
                self._log.failure("Admin API: streaming {item} failed", item=item_id)
                request.loseConnection()
                return
            except Exception:
                # The client went away and the producer was told to stop.
                return
        if not call.gone:
            request.finish()

    async def _release(self, call: _Call) -> _Response:
        (item_id,) = call.args
        force, key = _action_options(call, call.body(), ())
        result = await _resolve(
            self.operations.release(item_id, call.by, force, key, call.origin)
        )
        self._logged(
            call,
            "released quarantine item",
            item_id,
            queue_id=result.queue_id,
            replayed=result.replayed,
        )
        return _Response.json(202, _action(item_id, "release", result))

    async def _rescan(self, call: _Call) -> _Response:
        (item_id,) = call.args
        force, key = _action_options(call, call.body(), ())
        result = await _resolve(
            self.operations.rescan(item_id, call.by, force, key, call.origin)
        )
        self._logged(
            call,
            "rescanning quarantine item",
            item_id,
            queue_id=result.queue_id,
            replayed=result.replayed,
        )
        return _Response.json(202, _action(item_id, "rescan", result))

    async def _forward(self, call: _Call) -> _Response:
        (item_id,) = call.args
        body = call.body()
        force, key = _action_options(call, body, ("to",))
        to = body.get("to")
        if not isinstance(to, list) or not to:
            raise _bad("to", "must be a non-empty list of addresses")
        if len(to) > MAX_FORWARD:
            raise _bad("to", f"at most {MAX_FORWARD} addresses")
        addresses = []
        for address in to:
            if not isinstance(address, str):
                raise _bad("to", f"not an address: {address!r}")
            try:
                parse_mailbox(address, utf8=True)
            except ParseError:
                raise _bad("to", f"not an address: {address!r}") from None
            addresses.append(address)
        result = await _resolve(
            self.operations.forward(
                item_id, addresses, call.by, force, key, call.origin
            )
        )
        self._logged(
            call,
            "forwarded quarantine item",
            item_id,
            to=addresses,
            queue_id=result.queue_id,
            replayed=result.replayed,
        )
        return _Response.json(
            202, {**_action(item_id, "forward", result), "to": addresses}
        )

    async def _pin(self, call: _Call) -> _Response:
        (item_id,) = call.args
        body = call.body()
        _only_fields(body, ("pinned",))
        pinned = body.get("pinned")
        if not isinstance(pinned, bool):
            raise _bad("pinned", "required, true or false")
        store = self.operations.store
        action = "pin" if pinned else "unpin"
        try:
            await store.pin(item_id, pinned)
        except NotFoundError:
            await self._audited(call, action, item_id, REFUSED, "no such item")
            raise HttpError(404, f"no quarantine item {item_id!r}") from None
        await self._audited(call, action, item_id, DONE)
        self._logged(call, "pinned" if pinned else "unpinned", item_id)
        item = await self._get_item(item_id)
        return _Response.json(200, adminjson.quarantine_item(item))

    async def _delete(self, call: _Call) -> _Response:
        (item_id,) = call.args
        call.body()
        if not await self.operations.store.delete_quarantined(item_id):
            await self._audited(call, "delete", item_id, REFUSED, "no such item")
            raise HttpError(404, f"no quarantine item {item_id!r}")
        await self._audited(call, "delete", item_id, DONE)
        self._logged(call, "deleted quarantine item", item_id)
        return _Response.json(200, {"id": item_id, "deleted": True})

    # -- queue and configuration

    async def _queue(self, call: _Call) -> _Response:
        call.query(())
        entries = await _resolve(self.operations.queue())
        items = [adminjson.queue_entry(e) for e in entries]
        return _Response.json(200, {"items": items, "total": len(items)})

    async def _retry(self, call: _Call) -> _Response:
        (queue_id,) = call.args
        call.body()
        try:
            await _resolve(self.operations.retry_now(queue_id))
        except OperationError as e:
            await self._audited(call, "retry", queue_id, REFUSED, e.message)
            raise
        await self._audited(call, "retry", queue_id, DONE)
        self._logged(call, "retry now of queued message", queue_id)
        return _Response.json(202, {"queue_id": queue_id, "action": "retry"})

    async def _reload(self, call: _Call) -> _Response:
        call.body()
        result: ReloadResult = await _resolve(self.operations.reload())
        restart = "; needs a restart: " + ", ".join(result.restart_required)
        await self._audited(
            call,
            "reload",
            "config",
            DONE if result.loaded else REFUSED,
            "; ".join(result.problems) + (restart if result.restart_required else ""),
        )
        self._logged(
            call,
            "configuration reload",
            "loaded" if result.loaded else "refused",
            problems=list(result.problems),
            restart_required=list(result.restart_required),
        )
        return _Response.json(
            200 if result.loaded else 422,
            {
                "loaded": result.loaded,
                "problems": list(result.problems),
                "applied": list(result.applied),
                "restart_required": list(result.restart_required),
            },
        )

    # -- audit

    async def _audit(self, call: _Call) -> _Response:
        q = call.query(_AUDIT_PARAMETERS)
        since, until = q.window()
        filters = AuditFilter(
            since=since,
            until=until,
            actor=q.text("actor"),
            action=q.text("action"),
            target=q.text("target"),
        )
        page = q.page()
        result = await self._page(self.operations.store.search_audit(filters, page))
        return _Response.json(200, adminjson.page(result, adminjson.audit_entry))


#: Longest idempotency key accepted.
MAX_KEY = 200


def _action_options(
    call: _Call, body: dict[str, Any], other: Sequence[str]
) -> tuple[bool, str | None]:
    """
    The C{force} flag and the idempotency key of a quarantine action: the
    key from the body's C{idempotency_key} or the C{Idempotency-Key}
    header (not both, unless equal).
    """
    _only_fields(body, ("force", "idempotency_key", *other))
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise _bad("force", "must be true or false")
    key = body.get("idempotency_key")
    header = call.request.getHeader(b"idempotency-key")
    if header is not None:
        try:
            from_header = header.decode("ascii").strip()
        except UnicodeDecodeError:
            raise _bad("idempotency_key", "the header is not ASCII") from None
        if key is not None and key != from_header:
            raise _bad("idempotency_key", "the body and the header differ")
        key = from_header
    if key is not None and (
        not isinstance(key, str)
        or not key
        or len(key) > MAX_KEY
        or not key.isprintable()
    ):
        raise _bad("idempotency_key", f"must be 1 to {MAX_KEY} printable characters")
    return force, key


def _action(item_id: str, action: str, result: ActionResult) -> dict[str, Any]:
    return {
        "id": item_id,
        "action": action,
        "queue_id": result.queue_id,
        "replayed": result.replayed,
    }


def client_host(request: Request) -> str:
    """
    The client's address, for logs (an IPv6 address in brackets).
    """
    address = request.getClientAddress()
    host = str(getattr(address, "host", None) or address)
    return f"[{host}]" if ":" in host else host


def _unauthorized(message: str, challenge: bytes) -> HttpError:
    return HttpError(401, message, headers=[(b"www-authenticate", challenge)])


def _only_fields(body: dict[str, Any], known: Sequence[str]) -> None:
    for name in body:
        if name not in known:
            raise _bad(name, "unknown field")


_ROUTES = (
    _Route(b"GET", ("healthz",), AdminAPI._healthz),
    _Route(b"GET", ("readyz",), AdminAPI._readyz),
    _Route(b"GET", ("metrics",), AdminAPI._metrics),
    _Route(b"GET", ("api", "health"), AdminAPI._health),
    _Route(b"GET", ("api", "messages"), AdminAPI._messages),
    _Route(b"GET", ("api", "messages", None), AdminAPI._message),
    _Route(b"GET", ("api", "refused"), AdminAPI._refused),
    _Route(b"GET", ("api", "quarantine"), AdminAPI._quarantine),
    _Route(b"GET", ("api", "quarantine", None), AdminAPI._item),
    _Route(b"DELETE", ("api", "quarantine", None), AdminAPI._delete),
    _Route(b"GET", ("api", "quarantine", None, "eml"), AdminAPI._eml),
    _Route(b"POST", ("api", "quarantine", None, "release"), AdminAPI._release),
    _Route(b"POST", ("api", "quarantine", None, "rescan"), AdminAPI._rescan),
    _Route(b"POST", ("api", "quarantine", None, "forward"), AdminAPI._forward),
    _Route(b"POST", ("api", "quarantine", None, "pin"), AdminAPI._pin),
    _Route(b"GET", ("api", "queue"), AdminAPI._queue),
    _Route(b"POST", ("api", "queue", None, "retry"), AdminAPI._retry),
    _Route(b"POST", ("api", "config", "reload"), AdminAPI._reload),
    _Route(b"GET", ("api", "audit"), AdminAPI._audit),
)
