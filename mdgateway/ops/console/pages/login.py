# -*- test-case-name: tests.test_console -*-
"""
Logging in and out.

The login form is protected against cross-site submission too: its CSRF
token is a random value also set in a short-lived cookie, and the POST
must carry both, equal. Attempts are limited per client address (see
L{LoginLimiter}) and every one is logged, with the name tried but never
the password or token.
"""

from __future__ import annotations

import hmac
import secrets
from typing import TYPE_CHECKING

from mdgateway.ops.console.auth import Flash
from mdgateway.ops.console.http import (
    SESSION_COOKIE,
    Call,
    ConsoleError,
    Response,
    cookie,
    redirect,
    request_cookie,
)
from mdgateway.ops.console.passwords import UsersFileError
from mdgateway.ops.console.render import render_login

if TYPE_CHECKING:
    from mdgateway.ops.console.app import Console

LOGIN_COOKIE = "mdgw_login"
#: Seconds a login form stays valid.
LOGIN_FORM_LIFETIME = 1800


def _next_path(text: str | None) -> str:
    """
    Where to go after login: a console path, never another site.
    """
    if (
        text
        and text.startswith("/console/")
        and not text.startswith("/console//")
        and "\\" not in text
        and text.isprintable()
        and not text.startswith("/console/login")
    ):
        return text
    return "/console/dashboard"


async def _form(
    console: Console, call: Call, status: int, notice: Flash | None, next_path: str
) -> Response:
    nonce = secrets.token_urlsafe(32)
    call.cookies.append(
        cookie(
            LOGIN_COOKIE,
            nonce,
            secure=console.secure(call),
            max_age=LOGIN_FORM_LIFETIME,
        )
    )
    body = await render_login(console.templates, nonce, next_path, notice)
    return Response(status, body)


async def form(console: Console, call: Call) -> Response:
    if console.sessions.get(request_cookie(call.request, SESSION_COOKIE)):
        return redirect(_next_path(call.param("next")))
    notice = None
    if call.param("out"):
        notice = Flash("ok", "You have logged out.")
    elif call.param("next"):
        notice = Flash("error", "Please log in (your session ended, or never began).")
    return await _form(console, call, 200, notice, _next_path(call.param("next")))


async def submit(console: Console, call: Call) -> Response:
    next_path = _next_path(call.field("next"))
    nonce = request_cookie(call.request, LOGIN_COOKIE)
    sent = call.field("csrf") or ""
    if not nonce or not hmac.compare_digest(nonce.encode(), sent.encode()):
        console.log.warn(
            "Console: login form without a valid CSRF token from {client}",
            client=call.client,
        )
        notice = Flash(
            "error", "The login form had expired or came from elsewhere; try again."
        )
        return await _form(console, call, 403, notice, next_path)
    wait = console.limiter.wait(call.client)
    if wait > 0:
        console.log.warn(
            "Console: login refused for {client}: too many failed attempts "
            "(wait {seconds:.0f}s)",
            client=call.client,
            seconds=wait,
        )
        notice = Flash(
            "error",
            f"Too many failed attempts from your address: try again in "
            f"{int(wait) + 1} seconds.",
        )
        return await _form(console, call, 429, notice, next_path)
    token = call.field("token") or ""
    name = (call.field("name") or "").strip()
    if token.strip():
        tried, via = "the admin token", "token"
        operator = console.authenticator.token(token)
        if operator is not None:
            operator = f"token:{operator}"
    else:
        tried, via = repr(name[:64]), "password"
        try:
            operator = (
                await console.authenticator.password(name, call.field("password") or "")
                if name
                else None
            )
        except UsersFileError as e:
            console.log.error("Console: users file unusable: {error}", error=str(e))
            raise ConsoleError(503, "The operator accounts cannot be read.") from None
    if operator is None:
        console.limiter.failed(call.client)
        console.log.warn(
            "Console: failed login with {tried} from {client}",
            tried=tried,
            client=call.client,
        )
        notice = Flash("error", "Wrong name, password or token.")
        return await _form(console, call, 401, notice, next_path)
    console.limiter.succeeded(call.client)
    session = console.sessions.create(operator, via, call.client)
    console.log.info(
        "Console: {operator} logged in ({via}) from {client}",
        operator=operator,
        via=via,
        client=call.client,
    )
    secure = console.secure(call)
    call.cookies.append(cookie(SESSION_COOKIE, session.id, secure=secure))
    call.cookies.append(cookie(LOGIN_COOKIE, "", secure=secure, max_age=0))
    return redirect(next_path)


async def logout(console: Console, call: Call) -> Response:
    session = call.user
    console.sessions.end(session.id)
    console.log.info(
        "Console: {operator} logged out from {client}",
        operator=session.operator,
        client=call.client,
    )
    call.cookies.append(
        cookie(SESSION_COOKIE, "", secure=console.secure(call), max_age=0)
    )
    return redirect("/console/login?out=1")
