# -*- test-case-name: tests.test_console -*-
"""
The web console: served at C{/console/} by the admin listener, rendered on
the server with C{twisted.web.template}, usable without JavaScript.

One leaf resource hands every request to L{Console}, which finds the page
in an explicit route table (method and path pattern to an C{async def}
handler), checks the session, the CSRF token and the origin of every POST,
and writes the handler's answer with the security headers in one place.
The route table is a dozen lines; Klein would add a dependency for what a
loop over it does.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any
from urllib.parse import unquote

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mdgateway.ops.console.auth import Authenticator, LoginLimiter, Sessions
from mdgateway.ops.console.http import (
    SESSION_COOKIE,
    Call,
    ConsoleError,
    Response,
    client_of,
    redirect,
    request_cookie,
    same_origin,
    write,
)
from mdgateway.ops.console.render import PageData, Templates, href, render_layout
from mdgateway.ops.interfaces import IOperations, OperationError
from mdgateway.store.interfaces import (
    MAX_ID_LENGTH,
    CorruptOriginalError,
    NotFoundError,
    StoreError,
)

#: Largest form accepted.
MAX_FORM = 64 * 1024


@attrs.frozen
class Asset:
    body: bytes
    content_type: bytes


def load_assets() -> dict[str, Asset]:
    """
    The static files shipped in the package (blocking: run in a thread).
    """
    folder = resources.files("mdgateway.ops.console") / "static"
    out = {}
    for entry in folder.iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            kind = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind.endswith("javascript"):
                kind += "; charset=utf-8"
            out[entry.name] = Asset(entry.read_bytes(), kind.encode("ascii"))
    return out


Handler = Callable[["Console", Call], Awaitable[Response | None]]


@attrs.frozen
class ConsoleRoute:
    """
    One page: C{None} in the pattern matches one path segment (an id).

    @ivar public: served without a session (login, static files).
    """

    method: bytes
    pattern: tuple[str | None, ...]
    handler: Handler
    public: bool = False

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


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, console: Console) -> None:
        super().__init__()
        self._console = console

    def render(self, request: Request) -> int:
        ensureDeferred(self._console._serve(request))
        return NOT_DONE_YET


class Console:
    """
    The console over an L{IOperations}.

    @param secure_cookies: mark cookies C{Secure} even on a plain
        connection (a TLS proxy in front); under TLS they always are.
    @param scratch_dir: where a quarantined original is written while it
        is read (download, headers and parts).
    @param instance: this instance's name, for the page footer.
    """

    log = Logger()

    def __init__(
        self,
        *,
        operations: IOperations,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        templates: Templates,
        assets: dict[str, Asset],
        authenticator: Authenticator,
        sessions: Sessions,
        limiter: LoginLimiter,
        secure_cookies: bool = False,
        scratch_dir: str | None = None,
        max_form: int = MAX_FORM,
        clock: IReactorTime | None = None,
        instance: str = "",
    ) -> None:
        self.operations = operations
        self.instance = instance
        self.reactor = reactor
        self.clock: IReactorTime = clock or IReactorTime(reactor)
        self.threadpool = threadpool
        self.templates = templates
        self.assets = assets
        self.authenticator = authenticator
        self.sessions = sessions
        self.limiter = limiter
        self.secure_cookies = secure_cookies
        self.scratch_dir = scratch_dir
        self.max_form = max_form

    @classmethod
    async def create(
        cls,
        *,
        operations: IOperations,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        users_file: str,
        token_name: Callable[[str], str | None],
        session_lifetime: float,
        clock: IReactorTime | None = None,
        **kw: Any,
    ) -> Console:
        """
        A console with its templates and static files read (in the thread
        pool) from the package.

        @param clock: the time for sessions, login limits and relative
            filters (default: C{reactor}).
        """
        clock = clock or IReactorTime(reactor)
        templates = await deferToThreadPool(reactor, threadpool, Templates.load)
        assets = await deferToThreadPool(reactor, threadpool, load_assets)
        return cls(
            operations=operations,
            reactor=reactor,
            threadpool=threadpool,
            templates=templates,
            assets=assets,
            authenticator=Authenticator(
                reactor=reactor,
                threadpool=threadpool,
                users_file=users_file,
                token_name=token_name,
            ),
            sessions=Sessions(clock, session_lifetime),
            limiter=LoginLimiter(clock),
            clock=clock,
            **kw,
        )

    def resource(self) -> Resource:
        """
        The console as one leaf resource, to be served at C{/console}.
        """
        return _Leaf(self)

    def secure(self, call: Call) -> bool:
        return self.secure_cookies or bool(call.request.isSecure())

    # -- serving

    async def _serve(self, request: Request) -> None:
        call = Call(request, self.clock.seconds(), client_of(request))

        def lost(_: object) -> None:
            call.gone = True

        request.notifyFinish().addErrback(lost)
        try:
            response = await self._dispatch(request, call)
        except ConsoleError as e:
            response = await self.error_page(call, e.status, e.title, e.message)
        except OperationError as e:
            response = await self.error_page(call, e.status, "Not done", e.message)
        except NotFoundError as e:
            response = await self.error_page(call, 404, "Not found", str(e))
        except CorruptOriginalError:
            self.log.failure("Console: corrupt quarantined original")
            response = await self.error_page(
                call, 500, "Corrupt original", "The stored original is corrupt."
            )
        except StoreError:
            self.log.failure("Console: store failed")
            response = await self.error_page(
                call, 503, "Unavailable", "The store is unavailable; try again."
            )
        except Exception:
            self.log.failure(
                "Console: {method} {path} failed",
                method=request.method,
                path=request.path,
            )
            response = await self.error_page(
                call, 500, "Internal error", "Something failed; the log says what."
            )
        if response is None or call.gone:
            return
        write(request, response, call.cookies)

    async def _dispatch(self, request: Request, call: Call) -> Response | None:
        call.read_query()
        segments = _segments(request.path)
        if segments is None:
            return redirect("/console/")
        asked = request.method.upper()
        method = b"GET" if asked == b"HEAD" else asked
        allowed: list[bytes] = []
        for route in ROUTES:
            args = route.match(segments)
            if args is None:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            call.args = args
            if method == b"POST":
                # Read here, with the limit, once the route is known.
                call.read_form(self.max_form)
                if not same_origin(request):
                    self.log.warn(
                        "Console: cross-origin POST to {path} from {client}",
                        path=request.path,
                        client=call.client,
                    )
                    raise ConsoleError(403, "This form was sent from another site.")
            if not route.public:
                gate = self._session(request, call, method)
                if gate is not None:
                    return gate
            return await route.handler(self, call)
        if not allowed:
            raise ConsoleError(404, "There is no such page.")
        raise ConsoleError(405, "That page does not take this method.")

    def _session(self, request: Request, call: Call, method: bytes) -> Response | None:
        """
        Attach the session; C{None} to go on, or the answer for a request
        without one (to the login page) or a POST without its CSRF token.
        """
        session = self.sessions.get(request_cookie(request, SESSION_COOKIE))
        if session is None:
            back = request.uri.decode("ascii", "replace")
            if method != b"GET" or not back.startswith("/console/"):
                back = "/console/"
            return redirect(href("login", query={"next": back}))
        call.session = session
        if method == b"POST" and not session.csrf_ok(call.field("csrf")):
            self.log.warn(
                "Console: POST to {path} by {operator} without a valid CSRF token",
                path=request.path,
                operator=session.operator,
            )
            raise ConsoleError(
                403,
                "The form's security token is missing or stale: nothing was "
                "done. Reload the page and try again.",
            )
        return None

    # -- pages

    async def page(
        self,
        call: Call,
        title: str,
        section: str,
        content: Any,
        *,
        status: int = 200,
        refresh: int | None = None,
    ) -> Response:
        """
        A page in the layout, with the session's pending notices.
        """
        session = call.user
        try:
            version = self.operations.configuration().version
        except OperationError:
            version = ""
        instance = self.instance
        data = PageData(
            title=title,
            section=section,
            content=content,
            session=session,
            flashes=tuple(session.take_flashes()),
            version=version,
            instance=instance,
            refresh=refresh,
        )
        return Response(status, await render_layout(self.templates, data))

    async def error_page(
        self, call: Call, status: int, title: str, message: str
    ) -> Response:
        from twisted.web.template import tags

        body = tags.p(message, class_="error-message")
        if call.session is not None:
            try:
                return await self.page(call, title, "error", body, status=status)
            except Exception:
                self.log.failure("Console: the error page failed")
        text = f"{status} {title}: {message}\n".encode()
        return Response(status, text, b"text/plain; charset=utf-8")

    def audit(self, call: Call, action: str, target: str, **fields: object) -> None:
        """
        Log an operator's action with their name and address.
        """
        self.log.info(
            "Console: {action} {target} by {by} from {client}",
            action=action,
            target=target,
            by=call.user.by,
            client=call.client,
            **fields,
        )


def _segments(raw: bytes) -> list[str] | None:
    """
    The path below C{/console/}; C{None} for C{/console} itself.
    """
    try:
        text = raw.decode("ascii")
        parts = [unquote(s, errors="strict") for s in text.split("/")]
    except (UnicodeDecodeError, ValueError):
        raise ConsoleError(404, "There is no such page.") from None
    if parts[:2] != ["", "console"]:
        raise ConsoleError(404, "There is no such page.")
    if len(parts) == 2:
        return None
    rest = parts[2:]
    if rest == [""]:
        return []
    if len(rest) > 1 and rest[-1] == "":
        rest = rest[:-1]
    return rest


async def _static(console: Console, call: Call) -> Response:
    (name,) = call.args
    asset = console.assets.get(name)
    if asset is None:
        raise ConsoleError(404, "There is no such file.")
    return Response(200, asset.body, asset.content_type, cacheable=True)


async def _home(console: Console, call: Call) -> Response:
    return redirect("/console/dashboard")


def _routes() -> tuple[ConsoleRoute, ...]:
    from mdgateway.ops.console.pages import (
        actions,
        config,
        dashboard,
        history,
        login,
        quarantine,
        queue,
        refused,
    )

    return (
        ConsoleRoute(b"GET", ("static", None), _static, public=True),
        ConsoleRoute(b"GET", ("login",), login.form, public=True),
        ConsoleRoute(b"POST", ("login",), login.submit, public=True),
        ConsoleRoute(b"POST", ("logout",), login.logout),
        ConsoleRoute(b"GET", (), _home),
        ConsoleRoute(b"GET", ("dashboard",), dashboard.page),
        ConsoleRoute(b"GET", ("messages",), history.search),
        ConsoleRoute(b"GET", ("messages", None), history.message),
        ConsoleRoute(b"GET", ("quarantine",), quarantine.listing),
        ConsoleRoute(b"POST", ("quarantine", "bulk"), actions.bulk),
        ConsoleRoute(b"GET", ("quarantine", None), quarantine.item),
        ConsoleRoute(b"GET", ("quarantine", None, "eml"), quarantine.download),
        ConsoleRoute(b"GET", ("quarantine", None, "release"), actions.confirm_release),
        ConsoleRoute(b"POST", ("quarantine", None, "release"), actions.release),
        ConsoleRoute(b"POST", ("quarantine", None, "rescan"), actions.rescan),
        ConsoleRoute(b"POST", ("quarantine", None, "forward"), actions.forward),
        ConsoleRoute(b"POST", ("quarantine", None, "pin"), actions.pin),
        ConsoleRoute(b"GET", ("quarantine", None, "delete"), actions.confirm_delete),
        ConsoleRoute(b"POST", ("quarantine", None, "delete"), actions.delete),
        ConsoleRoute(b"GET", ("refused",), refused.listing),
        ConsoleRoute(b"GET", ("queue",), queue.listing),
        ConsoleRoute(b"POST", ("queue", "flush"), queue.flush),
        ConsoleRoute(b"GET", ("queue", None), queue.show),
        ConsoleRoute(b"POST", ("queue", None, "hold"), queue.hold),
        ConsoleRoute(b"POST", ("queue", None, "release-hold"), queue.release_hold),
        ConsoleRoute(b"POST", ("queue", None, "retry"), queue.retry),
        ConsoleRoute(b"GET", ("queue", None, "bounce"), queue.confirm_bounce),
        ConsoleRoute(b"POST", ("queue", None, "bounce"), queue.bounce),
        ConsoleRoute(b"GET", ("queue", None, "delete"), queue.confirm_delete),
        ConsoleRoute(b"POST", ("queue", None, "delete"), queue.delete),
        ConsoleRoute(b"GET", ("config",), config.page),
        ConsoleRoute(b"POST", ("config", "reload"), config.reload),
    )


ROUTES = _routes()
