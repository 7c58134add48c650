# -*- test-case-name: tests.test_console -*-
"""
The console's requests and answers: query strings and form bodies read
strictly, answers as values, and the headers every answer carries.

Every page answer forbids framing, inline script and caching (pages show
mail data); a static asset may be cached but is no less locked down.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
from twisted.web.server import Request

from mdgateway.ops.console.auth import Session

HTML = b"text/html; charset=utf-8"

#: The session cookie's name.
SESSION_COOKIE = "mdgw_session"

#: The most fields one form or query may carry (a bulk selection is one
#: field per item).
MAX_FIELDS = 2000

#: No script but our own file, no inline script or style, no framing, no
#: plugins, forms only to ourselves.
CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"object-src 'none'; base-uri 'none'; form-action 'self'; "
    b"frame-ancestors 'none'"
)

SECURITY_HEADERS = (
    (b"content-security-policy", CSP),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


class ConsoleError(Exception):
    """
    Answer with an error page: C{status} and a sentence for the operator.
    """

    def __init__(self, status: int, message: str, title: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.title = title or _TITLES.get(status, "Error")


_TITLES = {
    400: "Bad request",
    403: "Refused",
    404: "Not found",
    405: "Method not allowed",
    409: "Not possible now",
    413: "Too large",
    415: "Unsupported form",
    429: "Too many attempts",
    503: "Unavailable",
}


@attrs.frozen
class Response:
    """
    A complete answer.

    @ivar cacheable: a static asset (no mail data): may be cached.
    """

    status: int
    body: bytes
    content_type: bytes = HTML
    headers: tuple[tuple[bytes, bytes], ...] = ()
    cacheable: bool = False


def redirect(location: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> Response:
    """
    C{303 See Other} to a console path (after a POST, the browser GETs it:
    a reload does not repeat the action).
    """
    if not location.startswith("/console/"):
        raise ValueError(f"not a console path: {location!r}")
    return Response(
        303,
        b"",
        b"text/plain; charset=utf-8",
        ((b"location", location.encode("ascii")), *headers),
    )


def _parse(text: bytes, what: str) -> dict[str, list[str]]:
    try:
        return parse_qs(
            text.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=False,
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise ConsoleError(400, f"the {what} is not percent-encoded UTF-8") from None


@attrs.define
class Call:
    """
    One request on its way through a page handler.

    @ivar args: the variable path segments, in order.
    @ivar client: the client's address, for logs.
    @ivar gone: the client disconnected; nothing may be written.
    """

    request: Request
    now: float
    client: str
    args: tuple[str, ...] = ()
    session: Session | None = None
    form: dict[str, list[str]] = attrs.Factory(dict)
    query: dict[str, list[str]] = attrs.Factory(dict)
    cookies: list[bytes] = attrs.Factory(list)
    gone: bool = False

    def read_query(self) -> None:
        self.query = _parse(urlsplit(self.request.uri).query, "query string")

    def read_form(self, limit: int) -> None:
        self.form = _read_form(self.request, limit)

    @property
    def user(self) -> Session:
        """
        The session (every handler but login's has one).
        """
        assert self.session is not None
        return self.session

    def field(self, name: str) -> str | None:
        """
        The first value of form field C{name} (C{None} when absent).
        """
        values = self.form.get(name)
        return values[0] if values else None

    def fields(self, name: str) -> list[str]:
        return list(self.form.get(name, ()))

    def param(self, name: str) -> str | None:
        """
        The query parameter C{name}, C{None} when absent or empty.
        """
        values = [v for v in self.query.get(name, ()) if v.strip()]
        return values[0].strip() if values else None

    def params(self, name: str) -> list[str]:
        return [v.strip() for v in self.query.get(name, ()) if v.strip()]

    def checked(self, name: str) -> bool:
        """
        Whether the form's checkbox C{name} was ticked.
        """
        return self.field(name) in ("yes", "on", "1", "true")


def _read_form(request: Request, limit: int) -> dict[str, list[str]]:
    if getattr(request, "body_too_large", False):
        raise ConsoleError(413, f"the form is larger than {limit} bytes")
    kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if kind not in (b"", b"application/x-www-form-urlencoded"):
        raise ConsoleError(415, "forms are sent as application/x-www-form-urlencoded")
    content = request.content
    if content is None:
        return {}
    content.seek(0)
    data = content.read(limit + 1)
    if len(data) > limit:
        raise ConsoleError(413, f"the form is larger than {limit} bytes")
    return _parse(bytes(data), "form")


def cookie(name: str, value: str, *, secure: bool, max_age: int | None = None) -> bytes:
    """
    A C{Set-Cookie} value for the console's path: never readable from
    script, never sent with a request another site starts.
    """
    parts = [f"{name}={value}", "Path=/console/", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts).encode("ascii")


def request_cookie(request: Request, name: str) -> str | None:
    value: bytes | None = request.getCookie(name.encode("ascii"))
    if value is None:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def same_origin(request: Request) -> bool:
    """
    Whether a POST came from one of our own pages: its C{Origin} (when the
    browser sends one) names this host and scheme.
    """
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    host = request.getHeader(b"host")
    if host is None:
        return False
    scheme = b"https" if request.isSecure() else b"http"
    return bool(origin.strip().lower() == scheme + b"://" + host.strip().lower())


def write(request: Request, response: Response, cookies: Sequence[bytes]) -> None:
    """
    Send C{response} with the console's security headers.
    """
    request.setResponseCode(response.status)
    request.setHeader(b"content-type", response.content_type)
    request.setHeader(b"content-length", b"%d" % len(response.body))
    for name, value in SECURITY_HEADERS:
        request.setHeader(name, value)
    if response.cacheable:
        request.setHeader(b"cache-control", b"private, max-age=300")
    else:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"pragma", b"no-cache")
    for name, value in response.headers:
        request.setHeader(name, value)
    for value in cookies:
        request.responseHeaders.addRawHeader(b"set-cookie", value)
    request.write(response.body)
    request.finish()


def client_of(request: Request) -> str:
    address: Any = request.getClientAddress()
    host = str(getattr(address, "host", None) or address)
    return f"[{host}]" if ":" in host else host
