# -*- test-case-name: tests.test_core_runtime -*-
"""
One MetaDefender Core server profile at run time.

L{CoreRuntime} spreads scans over the profile's servers (failover or
round-robin), limits the scans in flight per server, takes a server out of
rotation after C{failure_threshold} failures among its recent answers, probes it with
C{GET /version} after C{retry_after} seconds, and tells the SMTP edge
whether new work can be taken (L{CoreRuntime.available}). A failure on one
server moves the scan to the next; the caller sees an error condition only
when every server failed. Health is counted per server across every part
and message (see L{mdgateway.scan.breaker}). With the profile's
C{verdict_cache}, a file whose content, name and rule were scanned moments
ago is not scanned again (see L{mdgateway.scan.cache}).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool
from zope.interface import implementer

from mdgateway.policy.profiles import CoreProfile
from mdgateway.scan.breaker import CircuitBreaker
from mdgateway.scan.cache import CacheKey, VerdictCache
from mdgateway.scan.client import CoreClient, build_http_client, sha256_file
from mdgateway.scan.errors import Condition, CoreError
from mdgateway.scan.interfaces import ICoreServerClient, IScanner
from mdgateway.scan.verdict import Verdict

_log = Logger()
_T = TypeVar("_T")

#: The longest C{Retry-After} of a busy server that is honoured, in seconds.
MAX_RETRY_AFTER = 300.0


@attrs.frozen
class ServerStatus:
    """
    A snapshot of one server, for health pages and metrics.

    @ivar busy: answered 503 recently, or its queue is beyond the bound.
    @ivar in_flight: scans holding one of its slots.
    @ivar queued: scans waiting for a slot.
    """

    url: str
    up: bool
    busy: bool
    in_flight: int
    queued: int
    failures: int


def _scan_call(
    server: _Server, path: str, filename: str
) -> Callable[[], Awaitable[Verdict]]:
    return lambda: server.client.scan(path, filename)


def _health_fault(error: CoreError) -> bool:
    """
    Whether C{error} says the server is unwell (and counts against it): a
    server fault, no usable answer, a refused key, a scan that never
    completed. A busy server and the file's own failures do not.
    """
    return error.server_fault or error.condition in (
        Condition.UNREACHABLE,
        Condition.ACCESS_DENIED,
        Condition.SCAN_TIMEOUT,
    )


class _ServerDownError(Exception):
    """
    The server went down while the scan waited for a slot.
    """


class _Lane:
    """
    The slots of one server for parts of one size class.
    """

    def __init__(self, concurrency: int) -> None:
        self.concurrency = max(1, concurrency)
        self.slots = DeferredSemaphore(self.concurrency)

    @property
    def in_flight(self) -> int:
        return self.concurrency - self.slots.tokens

    @property
    def queued(self) -> int:
        return len(self.slots.waiting)


class _Server:
    def __init__(
        self,
        client: ICoreServerClient,
        concurrency: int,
        breaker: CircuitBreaker,
        big_concurrency: int = 1,
    ) -> None:
        self.client = client
        self.url: str = client.server.url
        #: Small parts and big parts wait for slots of their own, so a
        #: burst of large files never holds every slot a small one needs.
        self.small = _Lane(concurrency)
        self.big = _Lane(big_concurrency)
        self.breaker = breaker
        self.busy_until = 0.0
        self.probe_call: IDelayedCall | None = None
        self.probing: Deferred[None] | None = None

    def lane(self, big: bool) -> _Lane:
        return self.big if big else self.small

    @property
    def in_flight(self) -> int:
        return self.small.in_flight + self.big.in_flight

    @property
    def queued(self) -> int:
        return self.small.queued + self.big.queued


@implementer(IScanner)
class CoreRuntime:
    """
    Scans files with one L{CoreProfile}.

    @param clients: one L{ICoreServerClient} per server, in profile order.
    @param pool: closed by L{close} when given.
    @param busy_backoff: seconds a server that answered 503 gets no new work
        (unless its C{Retry-After} says otherwise: from 1 second up to
        L{MAX_RETRY_AFTER}).
    @param queue_bound: scans that may wait for a server's slots before it
        counts as busy (default: twice C{concurrency}).
    @param hasher: a file's SHA-256 for the verdict cache (default:
        computed in place).
    @param on_cache: told C{(profile name, result)} for every scan through
        the verdict cache, the result one of C{hit}, C{shared}, C{miss}.
    """

    def __init__(
        self,
        profile: CoreProfile,
        clock: IReactorTime,
        clients: Sequence[ICoreServerClient],
        *,
        pool: HTTPConnectionPool | None = None,
        busy_backoff: float = 5.0,
        queue_bound: int | None = None,
        hasher: Callable[[str], Awaitable[str]] | None = None,
        on_cache: Callable[[str, str], None] | None = None,
    ) -> None:
        if not clients:
            raise ValueError(f"Core profile {profile.name!r} has no servers")
        self.profile = profile
        self._clock = clock
        self._hasher = hasher or (lambda p: succeed(sha256_file(p)))
        self._on_cache = on_cache
        #: The verdict cache (C{None} when the profile's C{verdict_cache}
        #: is 0).
        self.cache = (
            VerdictCache(clock, profile.verdict_cache, profile.verdict_cache_size)
            if profile.verdict_cache > 0
            else None
        )
        self._pool = pool
        self._busy_backoff = busy_backoff
        self._queue_bound = (
            queue_bound if queue_bound is not None else 2 * max(1, profile.concurrency)
        )
        self._big_queue_bound = 2 * max(1, profile.big_concurrency)
        self._servers = [
            _Server(
                client,
                profile.concurrency,
                CircuitBreaker(profile.failure_threshold, profile.retry_after),
                profile.big_concurrency,
            )
            for client in clients
        ]
        self._by_url = {s.url: s for s in self._servers}
        self._next = 0
        self._closed = False

    @classmethod
    def from_profile(
        cls,
        profile: CoreProfile,
        reactor: IReactorTime,
        *,
        connect_timeout: float = 10.0,
        busy_backoff: float = 5.0,
        queue_bound: int | None = None,
        on_cache: Callable[[str, str], None] | None = None,
        **client_options: Any,
    ) -> CoreRuntime:
        """
        A runtime with real L{CoreClient}s sharing one connection pool.

        @param client_options: passed to each L{CoreClient}
            (C{request_timeout}, C{body_timeout}, C{hasher}, ...); the
            C{hasher} serves the verdict cache too.
        """
        http, pool = build_http_client(
            reactor, profile, connect_timeout=connect_timeout
        )
        clients = [
            CoreClient(server, profile, http, reactor, **client_options)
            for server in profile.servers
        ]
        return cls(
            profile,
            reactor,
            clients,
            pool=pool,
            busy_backoff=busy_backoff,
            queue_bound=queue_bound,
            hasher=client_options.get("hasher"),
            on_cache=on_cache,
        )

    # -- the public face -------------------------------------------------------

    def available(self) -> bool:
        """
        Whether a new scan would find a server that is up and not busy; the
        SMTP edge answers 4xx while this is C{False}.
        """
        now = self._clock.seconds()
        return any(s.breaker.up and not self._busy(s, now) for s in self._servers)

    def status(self) -> tuple[ServerStatus, ...]:
        """
        The state of every server, in profile order.
        """
        now = self._clock.seconds()
        return tuple(
            ServerStatus(
                url=s.url,
                up=s.breaker.up,
                busy=self._busy(s, now),
                in_flight=s.in_flight,
                queued=s.queued,
                failures=s.breaker.failures,
            )
            for s in self._servers
        )

    async def scan(self, path: str, filename: str) -> Verdict:
        """
        Scan the file at C{path} (named C{filename} to Core) on the first
        server that takes it, unless the verdict cache has its verdict.

        @raise CoreError: the file's own condition (I{processing failed},
            I{not scanned}, I{scan timeout}) from the server that scanned
            it, or, when every server failed, I{access denied} if any server
            refused the key, else I{busy} if any was busy, else the last
            server's condition (I{unreachable} when all are down).
        """
        if self._closed:
            raise CoreError(Condition.UNREACHABLE, "Core runtime is closed")
        cache = self.cache
        if cache is None:
            return await self._scan(path, filename)
        key = CacheKey(await self._hasher(path), filename, self.profile.rule)
        return await cache.through(
            key, lambda: self._scan(path, filename), self._report_cache
        )

    def _report_cache(self, result: str) -> None:
        if self._on_cache is not None:
            self._on_cache(self.profile.name, result)

    def _is_big(self, path: str) -> bool:
        try:
            return os.stat(path).st_size >= self.profile.big_part
        except OSError:
            return False  # the scan itself reports the missing file

    async def _scan(self, path: str, filename: str) -> Verdict:
        order = self._order()
        tried: set[int] = set()
        errors: list[CoreError] = []
        big = self._is_big(path)
        while True:
            server = self._pick(order, tried, errors, big)
            if server is None:
                raise self._give_up(errors)
            tried.add(id(server))
            try:
                verdict = await self._on(
                    server, _scan_call(server, path, filename), True, big
                )
            except _ServerDownError:
                continue
            except CoreError as e:
                if not e.retry_elsewhere:
                    raise
                errors.append(e)
                continue
            return verdict

    async def download_sanitized(self, verdict: Verdict, dest_path: str) -> str:
        """
        Stream the converted file of C{verdict} to C{dest_path} from the
        server that produced it; return the converted file's name.

        @raise CoreError: I{processing failed} when the server has no
            converted file; the mapped condition otherwise.
        @raise ValueError: the verdict is not from this profile's servers.
        """
        server = self._by_url.get(verdict.core_url)
        if server is None:
            raise ValueError(
                f"verdict from {verdict.core_url} is not from profile "
                f"{self.profile.name!r}"
            )
        return await self._on(
            server,
            lambda: server.client.download_converted(verdict, dest_path),
            False,
        )

    def close(self) -> Deferred[None]:
        """
        Stop probing and close the connection pool.
        """
        self._closed = True
        for server in self._servers:
            if server.probe_call is not None and server.probe_call.active():
                server.probe_call.cancel()
            server.probe_call = None
            if server.probing is not None:
                server.probing.cancel()
        if self._pool is None:
            return succeed(None)
        closing: Deferred[None] = self._pool.closeCachedConnections()
        return closing

    # -- choosing servers ------------------------------------------------------

    def _order(self) -> list[_Server]:
        servers = self._servers
        if self.profile.strategy != "round_robin":
            return list(servers)
        start = self._next % len(servers)
        self._next = start + 1
        return servers[start:] + servers[:start]

    def _busy(self, server: _Server, now: float, big: bool = False) -> bool:
        if server.busy_until > now:
            return True
        lane = server.lane(big)
        bound = self._big_queue_bound if big else self._queue_bound
        return lane.slots.tokens == 0 and lane.queued >= bound

    def _pick(
        self,
        order: list[_Server],
        tried: set[int],
        errors: list[CoreError],
        big: bool = False,
    ) -> _Server | None:
        now = self._clock.seconds()
        candidates = [s for s in order if id(s) not in tried and s.breaker.up]
        for server in candidates:
            if not self._busy(server, now, big):
                return server
        # Every remaining server is busy. Wait on the shortest queue, unless
        # they all answered 503 moments ago: then the caller retries later.
        waiting = [s for s in candidates if s.busy_until <= now]
        if waiting:
            return min(waiting, key=lambda s: s.lane(big).queued)
        for server in candidates:
            tried.add(id(server))
            errors.append(
                CoreError(
                    Condition.BUSY,
                    f"was busy less than {self._busy_backoff:g}s ago; not retried yet",
                    server=server.url,
                )
            )
        return None

    async def _on(
        self,
        server: _Server,
        call: Callable[[], Awaitable[_T]],
        require_up: bool,
        big: bool = False,
    ) -> _T:
        """
        Run C{call} in one of C{server}'s slots (of the big lane when
        C{big}) and account for the outcome before the slot is released, so
        a scan waiting for the slot already sees the server down.
        """
        slots = server.lane(big).slots
        await slots.acquire()
        try:
            if require_up and not server.breaker.up:
                raise _ServerDownError()
            try:
                result = await call()
            except CoreError as e:
                self._failed(server, e)
                raise
            self._succeeded(server)
            return result
        finally:
            slots.release()

    def _give_up(self, errors: list[CoreError]) -> CoreError:
        name = self.profile.name
        if not errors:
            return CoreError(
                Condition.UNREACHABLE,
                f"no server of Core profile {name!r} is up",
            )
        conditions = {e.condition for e in errors}
        if Condition.ACCESS_DENIED in conditions:
            condition = Condition.ACCESS_DENIED
        elif Condition.BUSY in conditions:
            condition = Condition.BUSY
        else:
            condition = errors[-1].condition
        detail = "; ".join(str(e) for e in errors)
        return CoreError(
            condition, f"every server of Core profile {name!r} failed: {detail}"
        )

    # -- health ------------------------------------------------------------------

    def _failed(self, server: _Server, error: CoreError) -> None:
        now = self._clock.seconds()
        if error.condition is Condition.BUSY:
            was_busy = server.busy_until > now
            wait = self._busy_backoff
            if error.retry_after is not None:
                # The server said how long: believe it, within reason.
                wait = min(max(error.retry_after, 1.0), MAX_RETRY_AFTER)
            server.busy_until = max(server.busy_until, now + wait)
            if was_busy:
                return
            _log.info(
                "Core server {server} is busy; no new work for {seconds}s",
                server=server.url,
                profile=self.profile.name,
                seconds=wait,
            )
            return
        if not _health_fault(error):
            # The server answered properly; the failure belongs to the file,
            # and says nothing about the server's health either way.
            return
        if server.breaker.failure(now):
            _log.warn(
                "Core server {server} marked down after {failures} failures"
                " ({error}); probing in {seconds}s",
                server=server.url,
                profile=self.profile.name,
                failures=server.breaker.failures,
                error=str(error),
                seconds=self.profile.retry_after,
            )
            self._schedule_probe(server)

    def _succeeded(self, server: _Server) -> None:
        server.breaker.success(self._clock.seconds())

    def _schedule_probe(self, server: _Server) -> None:
        if self._closed:
            return
        due = server.breaker.next_probe()
        if due is None:
            return
        delay = max(0.0, due - self._clock.seconds())
        server.probe_call = self._clock.callLater(delay, self._probe, server)

    def _probe(self, server: _Server) -> None:
        server.probe_call = None
        if server.breaker.up:
            return
        probing = Deferred.fromCoroutine(self._run_probe(server))
        server.probing = probing

        def done(_: object) -> None:
            server.probing = None

        probing.addBoth(done)

    async def _run_probe(self, server: _Server) -> None:
        try:
            await server.client.probe()
        except CoreError as e:
            if server.breaker.up:
                return
            server.breaker.probe_failed(self._clock.seconds())
            _log.info(
                "Core server {server} still down: {error}",
                server=server.url,
                profile=self.profile.name,
                error=str(e),
            )
            self._schedule_probe(server)
            return
        except Exception:
            if self._closed:
                return
            _log.failure("Core server {server} probe crashed", server=server.url)
            server.breaker.probe_failed(self._clock.seconds())
            self._schedule_probe(server)
            return
        if server.breaker.probe_succeeded():
            _log.info(
                "Core server {server} is back up",
                server=server.url,
                profile=self.profile.name,
            )
