# -*- test-case-name: tests.test_admin -*-
"""
The admin HTTP API: history, refused log, quarantine, queue (in
L{mdgateway.ops.adminqueue}), reload, health and metrics, as JSON over
C{twisted.web}.

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

import os
import tempfile
from collections.abc import Awaitable, Mapping, Sequence
from contextlib import suppress
from typing import IO, Any, TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mdgateway.ops import adminjson, adminqueue
from mdgateway.ops.adminhttp import (
    AUDIT_PARAMETERS,
    FILENAME_UNSAFE,
    MAX_BODY,
    MAX_FORWARD,
    MESSAGE_PARAMETERS,
    QUARANTINE_PARAMETERS,
    REFUSAL_PARAMETERS,
    STREAMED,
    AdminRoute,
    AdminSite,
    ApiCall,
    ApiResponse,
    HttpError,
    Root,
    Streamed,
    bad_parameter,
    bounded_request,
    client_host,
    error_response,
    only_fields,
    parse_time,
    resolve,
    split_path,
    unauthorized,
)
from mdgateway.ops.interfaces import (
    ActionResult,
    IOperations,
    OperationError,
    ReloadResult,
)
from mdgateway.ops.tokens import DEFAULT_NAME, find_token
from mdgateway.smtp.parse import ParseError, parse_mailbox
from mdgateway.store.audit import DONE, REFUSED, AuditEntry, AuditFilter
from mdgateway.store.interfaces import (
    MAX_PAGE,
    CorruptOriginalError,
    MessageFilter,
    NotFoundError,
    Page,
    PageRequest,
    QuarantineFilter,
    RefusalFilter,
    StoreError,
)

__all__ = ["MAX_BODY", "AdminAPI", "HttpError", "client_host", "parse_time"]

_T = TypeVar("_T")


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
        return Root(self)

    def site(self) -> Site:
        """
        A L{Site} for the admin listener: this API at its root, request
        bodies beyond C{max_body} discarded while they arrive, no
        tracebacks in answers.
        """
        site = AdminSite(
            self.resource(), requestFactory=bounded_request(self._max_body)
        )
        site.displayTracebacks = False
        return site

    # -- plumbing

    async def _serve(self, request: Request) -> None:
        call = ApiCall(request, (), self._clock.seconds(), self._max_body)

        def lost(_: object) -> None:
            call.gone = True

        # Handlers are not cancelled when the client goes away: a release
        # half-done because a curl was interrupted would be worse than work
        # nobody reads. Only the writing is skipped.
        request.notifyFinish().addErrback(lost)
        try:
            response = await self._dispatch(request, call)
        except HttpError as e:
            response = error_response(e.status, e.message, e.parameter, e.headers)
        except OperationError as e:
            response = error_response(e.status, e.message)
        except NotFoundError as e:
            response = error_response(404, str(e) or "not found")
        except CorruptOriginalError:
            self._log.failure("Admin API: corrupt quarantined original")
            response = error_response(500, "the stored original is corrupt")
        except StoreError:
            self._log.failure("Admin API: store failed")
            response = error_response(503, "the store is unavailable")
        except Exception:
            self._log.failure(
                "Admin API: {method} {path} failed",
                method=request.method,
                path=request.path,
            )
            response = error_response(500, "internal error")
        if isinstance(response, Streamed) or call.gone:
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

    async def _dispatch(
        self, request: Request, call: ApiCall
    ) -> ApiResponse | Streamed:
        segments = split_path(request.path)
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
            raise unauthorized("missing bearer token", b'Bearer realm="mdgateway"')
        scheme, _, credentials = header.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            raise unauthorized("not a bearer token", b'Bearer realm="mdgateway"')
        found = self.token_name(credentials.strip())
        if found is None:
            self._log.warn(
                "Admin API: invalid token from {client}", client=client_host(request)
            )
            raise unauthorized(
                "invalid token", b'Bearer realm="mdgateway", error="invalid_token"'
            )
        return found

    def logged(self, call: ApiCall, action: str, target: str, **fields: object) -> None:
        self._log.info(
            "Admin API: {action} {target} by {by}",
            action=action,
            target=target,
            by=call.by,
            client=call.origin,
            **fields,
        )

    async def _audited(
        self, call: ApiCall, action: str, target: str, result: str, detail: str = ""
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
            raise bad_parameter("cursor", str(e)) from None

    # -- health and metrics

    async def _healthz(self, call: ApiCall) -> ApiResponse:
        return ApiResponse.json(200, {"status": "alive"})

    async def _readyz(self, call: ApiCall) -> ApiResponse:
        try:
            readiness = await resolve(self.operations.readiness())
        except Exception:
            self._log.failure("Admin API: readiness check failed")
            data: dict[str, object] = {
                "ready": False,
                "checks": {},
                "reasons": ["the readiness check failed"],
            }
            return ApiResponse.json(503, data)
        return ApiResponse.json(
            200 if readiness.ready else 503, adminjson.readiness(readiness)
        )

    async def _health(self, call: ApiCall) -> ApiResponse:
        call.query(())
        readiness = await resolve(self.operations.readiness())
        return ApiResponse.json(200, adminjson.health(readiness))

    async def _metrics(self, call: ApiCall) -> ApiResponse:
        accept = call.request.getHeader(b"accept") or b""
        body, content_type = self.operations.metrics.render(accept.decode("latin-1"))
        return ApiResponse(200, body, content_type.encode("ascii"))

    # -- history and refused log

    async def _messages(self, call: ApiCall) -> ApiResponse:
        q = call.query(MESSAGE_PARAMETERS)
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
        return ApiResponse.json(200, adminjson.page(result, adminjson.message_summary))

    async def _message(self, call: ApiCall) -> ApiResponse:
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
        return ApiResponse.json(200, adminjson.message_record(record, ids))

    async def _refused(self, call: ApiCall) -> ApiResponse:
        q = call.query(REFUSAL_PARAMETERS)
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
        return ApiResponse.json(200, adminjson.page(result, adminjson.refusal))

    # -- quarantine

    async def _quarantine(self, call: ApiCall) -> ApiResponse:
        q = call.query(QUARANTINE_PARAMETERS)
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
        return ApiResponse.json(200, adminjson.page(result, adminjson.quarantine_item))

    async def _item(self, call: ApiCall) -> ApiResponse:
        (item_id,) = call.args
        call.query(())
        item = await self._get_item(item_id)
        return ApiResponse.json(200, adminjson.quarantine_item(item))

    async def _get_item(self, item_id: str) -> Any:
        try:
            return await self.operations.store.get_quarantined(item_id)
        except NotFoundError:
            raise HttpError(404, f"no quarantine item {item_id!r}") from None

    async def _eml(self, call: ApiCall) -> ApiResponse | Streamed:
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
        return STREAMED

    async def _send_file(
        self, call: ApiCall, original: IO[bytes], item_id: str
    ) -> None:
        request = call.request
        if call.gone:
            return
        size = os.fstat(original.fileno()).st_size
        name = FILENAME_UNSAFE.sub("_", item_id) or "original"
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

    async def _release(self, call: ApiCall) -> ApiResponse:
        (item_id,) = call.args
        force, key = _action_options(call, call.body(), ())
        result = await resolve(
            self.operations.release(item_id, call.by, force, key, call.origin)
        )
        self.logged(
            call,
            "released quarantine item",
            item_id,
            queue_id=result.queue_id,
            replayed=result.replayed,
        )
        return ApiResponse.json(202, _action(item_id, "release", result))

    async def _rescan(self, call: ApiCall) -> ApiResponse:
        (item_id,) = call.args
        force, key = _action_options(call, call.body(), ())
        result = await resolve(
            self.operations.rescan(item_id, call.by, force, key, call.origin)
        )
        self.logged(
            call,
            "rescanning quarantine item",
            item_id,
            queue_id=result.queue_id,
            replayed=result.replayed,
        )
        return ApiResponse.json(202, _action(item_id, "rescan", result))

    async def _forward(self, call: ApiCall) -> ApiResponse:
        (item_id,) = call.args
        body = call.body()
        force, key = _action_options(call, body, ("to",))
        to = body.get("to")
        if not isinstance(to, list) or not to:
            raise bad_parameter("to", "must be a non-empty list of addresses")
        if len(to) > MAX_FORWARD:
            raise bad_parameter("to", f"at most {MAX_FORWARD} addresses")
        addresses = []
        for address in to:
            if not isinstance(address, str):
                raise bad_parameter("to", f"not an address: {address!r}")
            try:
                parse_mailbox(address, utf8=True)
            except ParseError:
                raise bad_parameter("to", f"not an address: {address!r}") from None
            addresses.append(address)
        result = await resolve(
            self.operations.forward(
                item_id, addresses, call.by, force, key, call.origin
            )
        )
        self.logged(
            call,
            "forwarded quarantine item",
            item_id,
            to=addresses,
            queue_id=result.queue_id,
            replayed=result.replayed,
        )
        return ApiResponse.json(
            202, {**_action(item_id, "forward", result), "to": addresses}
        )

    async def _pin(self, call: ApiCall) -> ApiResponse:
        (item_id,) = call.args
        body = call.body()
        only_fields(body, ("pinned",))
        pinned = body.get("pinned")
        if not isinstance(pinned, bool):
            raise bad_parameter("pinned", "required, true or false")
        store = self.operations.store
        action = "pin" if pinned else "unpin"
        try:
            await store.pin(item_id, pinned)
        except NotFoundError:
            await self._audited(call, action, item_id, REFUSED, "no such item")
            raise HttpError(404, f"no quarantine item {item_id!r}") from None
        await self._audited(call, action, item_id, DONE)
        self.logged(call, "pinned" if pinned else "unpinned", item_id)
        item = await self._get_item(item_id)
        return ApiResponse.json(200, adminjson.quarantine_item(item))

    async def _delete(self, call: ApiCall) -> ApiResponse:
        (item_id,) = call.args
        call.body()
        if not await self.operations.store.delete_quarantined(item_id):
            await self._audited(call, "delete", item_id, REFUSED, "no such item")
            raise HttpError(404, f"no quarantine item {item_id!r}")
        await self._audited(call, "delete", item_id, DONE)
        self.logged(call, "deleted quarantine item", item_id)
        return ApiResponse.json(200, {"id": item_id, "deleted": True})

    # -- configuration (the queue's endpoints are in adminqueue)

    async def _reload(self, call: ApiCall) -> ApiResponse:
        call.body()
        result: ReloadResult = await resolve(self.operations.reload())
        restart = "; needs a restart: " + ", ".join(result.restart_required)
        await self._audited(
            call,
            "reload",
            "config",
            DONE if result.loaded else REFUSED,
            "; ".join(result.problems) + (restart if result.restart_required else ""),
        )
        self.logged(
            call,
            "configuration reload",
            "loaded" if result.loaded else "refused",
            problems=list(result.problems),
            restart_required=list(result.restart_required),
        )
        return ApiResponse.json(
            200 if result.loaded else 422,
            {
                "loaded": result.loaded,
                "problems": list(result.problems),
                "applied": list(result.applied),
                "restart_required": list(result.restart_required),
            },
        )

    # -- audit

    async def _audit(self, call: ApiCall) -> ApiResponse:
        q = call.query(AUDIT_PARAMETERS)
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
        return ApiResponse.json(200, adminjson.page(result, adminjson.audit_entry))


#: Longest idempotency key accepted.
MAX_KEY = 200


def _action_options(
    call: ApiCall, body: dict[str, Any], other: Sequence[str]
) -> tuple[bool, str | None]:
    """
    The C{force} flag and the idempotency key of a quarantine action: the
    key from the body's C{idempotency_key} or the C{Idempotency-Key}
    header (not both, unless equal).
    """
    only_fields(body, ("force", "idempotency_key", *other))
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise bad_parameter("force", "must be true or false")
    key = body.get("idempotency_key")
    header = call.request.getHeader(b"idempotency-key")
    if header is not None:
        try:
            from_header = header.decode("ascii").strip()
        except UnicodeDecodeError:
            raise bad_parameter("idempotency_key", "the header is not ASCII") from None
        if key is not None and key != from_header:
            raise bad_parameter("idempotency_key", "the body and the header differ")
        key = from_header
    if key is not None and (
        not isinstance(key, str)
        or not key
        or len(key) > MAX_KEY
        or not key.isprintable()
    ):
        raise bad_parameter(
            "idempotency_key", f"must be 1 to {MAX_KEY} printable characters"
        )
    return force, key


def _action(item_id: str, action: str, result: ActionResult) -> dict[str, Any]:
    return {
        "id": item_id,
        "action": action,
        "queue_id": result.queue_id,
        "replayed": result.replayed,
    }


_ROUTES = (
    AdminRoute(b"GET", ("healthz",), AdminAPI._healthz),
    AdminRoute(b"GET", ("readyz",), AdminAPI._readyz),
    AdminRoute(b"GET", ("metrics",), AdminAPI._metrics),
    AdminRoute(b"GET", ("api", "health"), AdminAPI._health),
    AdminRoute(b"GET", ("api", "messages"), AdminAPI._messages),
    AdminRoute(b"GET", ("api", "messages", None), AdminAPI._message),
    AdminRoute(b"GET", ("api", "refused"), AdminAPI._refused),
    AdminRoute(b"GET", ("api", "quarantine"), AdminAPI._quarantine),
    AdminRoute(b"GET", ("api", "quarantine", None), AdminAPI._item),
    AdminRoute(b"DELETE", ("api", "quarantine", None), AdminAPI._delete),
    AdminRoute(b"GET", ("api", "quarantine", None, "eml"), AdminAPI._eml),
    AdminRoute(b"POST", ("api", "quarantine", None, "release"), AdminAPI._release),
    AdminRoute(b"POST", ("api", "quarantine", None, "rescan"), AdminAPI._rescan),
    AdminRoute(b"POST", ("api", "quarantine", None, "forward"), AdminAPI._forward),
    AdminRoute(b"POST", ("api", "quarantine", None, "pin"), AdminAPI._pin),
    AdminRoute(b"GET", ("api", "queue"), adminqueue.listing),
    AdminRoute(b"POST", ("api", "queue", "flush"), adminqueue.flush),
    AdminRoute(b"GET", ("api", "queue", None), adminqueue.show),
    AdminRoute(b"DELETE", ("api", "queue", None), adminqueue.delete),
    AdminRoute(b"POST", ("api", "queue", None, "hold"), adminqueue.hold),
    AdminRoute(b"DELETE", ("api", "queue", None, "hold"), adminqueue.release_hold),
    AdminRoute(b"POST", ("api", "queue", None, "bounce"), adminqueue.bounce),
    AdminRoute(b"POST", ("api", "queue", None, "retry"), adminqueue.retry),
    AdminRoute(b"POST", ("api", "config", "reload"), AdminAPI._reload),
    AdminRoute(b"GET", ("api", "audit"), AdminAPI._audit),
)
