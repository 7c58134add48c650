# -*- test-case-name: tests.test_console_units -*-
"""
Who is using the console: logins, sessions and their CSRF tokens, and the
brake on password guessing.

Sessions live in this process's memory, keyed by a random 256-bit id that
only the session cookie carries; each ends at a fixed time after login
(server-side: a stolen cookie stops working then whatever the browser
does), at logout, or when the gateway restarts. Every session has its own
CSRF token, which every form that changes something must send back.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mdgateway.ops.console.passwords import parse_users, verify_password
from mdgateway.ops.tokens import find_token

#: Most sessions kept at once; beyond it the oldest ends.
MAX_SESSIONS = 1000


@attrs.frozen
class Flash:
    """
    A notice shown once, on the next page (the result of an action).

    @ivar kind: C{ok} or C{error}.
    @ivar details: lines under the text (e.g. every configuration problem).
    """

    kind: str
    text: str
    details: tuple[str, ...] = ()


@attrs.define
class Session:
    """
    One operator logged in.

    @ivar operator: the account name, or the admin token's name.
    @ivar via: C{password} or C{token}.
    """

    id: str
    operator: str
    via: str
    csrf: str
    created_at: float
    expires_at: float
    client: str
    flashes: list[Flash] = attrs.Factory(list)

    @property
    def by(self) -> str:
        """
        Who the audit names for what this session does.
        """
        return f"console:{self.operator}"

    def csrf_ok(self, token: str | None) -> bool:
        """
        Whether a form sent this session's CSRF token (constant time).
        """
        return token is not None and hmac.compare_digest(
            token.encode("utf-8"), self.csrf.encode("utf-8")
        )

    def flash(self, kind: str, text: str, details: tuple[str, ...] = ()) -> None:
        self.flashes.append(Flash(kind, text, details))

    def take_flashes(self) -> list[Flash]:
        out, self.flashes = self.flashes, []
        return out


class Sessions:
    """
    The sessions of this process, with server-side expiry.

    @param lifetime: seconds from login to the session's end.
    """

    def __init__(
        self, clock: IReactorTime, lifetime: float, limit: int = MAX_SESSIONS
    ) -> None:
        self._clock = clock
        self.lifetime = lifetime
        self._limit = limit
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, operator: str, via: str, client: str) -> Session:
        self._sweep()
        while len(self._sessions) >= self._limit:
            oldest = min(self._sessions.values(), key=lambda s: s.created_at)
            del self._sessions[oldest.id]
        now = self._clock.seconds()
        session = Session(
            id=secrets.token_urlsafe(32),
            operator=operator,
            via=via,
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=now + self.lifetime,
            client=client,
        )
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """
        The live session with this id; an expired one is ended here.
        """
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if self._clock.seconds() >= session.expires_at:
            del self._sessions[session_id]
            return None
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _sweep(self) -> None:
        now = self._clock.seconds()
        for session in [s for s in self._sessions.values() if now >= s.expires_at]:
            del self._sessions[session.id]


class LoginLimiter:
    """
    At most C{failures} failed logins per client address in C{window}
    seconds; then that address must wait until the oldest failure is
    C{window} old. A success clears the address's failures.
    """

    def __init__(
        self,
        clock: IReactorTime,
        failures: int = 5,
        window: float = 300.0,
        max_clients: int = 10000,
    ) -> None:
        self._clock = clock
        self.failures = failures
        self.window = window
        self._max_clients = max_clients
        self._failed: dict[str, list[float]] = {}

    def _recent(self, client: str) -> list[float]:
        horizon = self._clock.seconds() - self.window
        times = [t for t in self._failed.get(client, ()) if t > horizon]
        if times:
            self._failed[client] = times
        else:
            self._failed.pop(client, None)
        return times

    def wait(self, client: str) -> float:
        """
        Seconds C{client} must wait before it may try again (0: now).
        """
        times = self._recent(client)
        if len(times) < self.failures:
            return 0.0
        return max(0.0, times[-self.failures] + self.window - self._clock.seconds())

    def failed(self, client: str) -> None:
        if client not in self._failed and len(self._failed) >= self._max_clients:
            for other in list(self._failed):
                self._recent(other)
            if len(self._failed) >= self._max_clients:
                self._failed.pop(next(iter(self._failed)))
        self._failed.setdefault(client, []).append(self._clock.seconds())

    def succeeded(self, client: str) -> None:
        self._failed.pop(client, None)


def _read_text(path: str) -> tuple[tuple[int, int, int], str] | None:
    try:
        with open(path, encoding="utf-8") as file:
            info = os.fstat(file.fileno())
            return (info.st_ino, info.st_size, info.st_mtime_ns), file.read()
    except FileNotFoundError:
        return None


class Authenticator:
    """
    Checks a login: an operator's name and password against the users
    file (read again whenever it changes), or an admin token.

    @param users_file: the users file (C{mdgateway users add}); missing
        means no accounts.
    @param token_name: the name of the admin token given, or C{None} when
        it is not one (compares in constant time).
    """

    def __init__(
        self,
        *,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        users_file: str,
        token_name: Callable[[str], str | None],
    ) -> None:
        self._reactor = reactor
        self._pool = threadpool
        self.users_file = users_file
        self._token_name = token_name
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}

    def token(self, token: str) -> str | None:
        """
        The admin token's name, or C{None}.
        """
        return self._token_name(token.strip()) if token.strip() else None

    async def password(self, name: str, password: str) -> str | None:
        """
        C{name} if C{password} is that operator's, else C{None}. The file
        is read and the hash computed in the thread pool.

        @raise UsersFileError: the users file is unreadable or malformed.
        """
        stored = await deferToThreadPool(self._reactor, self._pool, self._lookup, name)
        ok = await deferToThreadPool(
            self._reactor, self._pool, verify_password, password, stored
        )
        return name if ok else None

    def _lookup(self, name: str) -> str | None:
        read = _read_text(self.users_file)
        if read is None:
            self._stamp, self._users = None, {}
            return None
        stamp, text = read
        if stamp != self._stamp:
            self._users = parse_users(text, self.users_file)
            self._stamp = stamp
        return self._users.get(name)


def token_checker(tokens: dict[str, str]) -> Callable[[str], str | None]:
    """
    A C{token_name} for L{Authenticator} over C{{name: token}}.
    """
    encoded = [(name, token.encode("utf-8")) for name, token in tokens.items()]
    return lambda given: find_token(encoded, given.encode("utf-8"))
