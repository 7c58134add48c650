# -*- test-case-name: tests.test_core_emulator -*-
"""
The emulated Core's jobs (one per upload, plus one per archive child) and
its webhooks.

A L{Job} tracks where the processing of one examined upload stands: its
timers, the C{POST /file/sync} requests waiting for it, and whether it was
cancelled. L{Webhooks} POSTs a finished result to the C{callbackurl} of its
upload and remembers the outcome for C{GET /file/webhook/{data_id}}.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from mdgateway.emulator.examine import Node
from mdgateway.emulator.results import DONE, PROCESSING, Progress, Request, iso

_log = Logger()


@attrs.frozen
class Upload:
    """
    The headers of one upload that matter to the emulator.

    @ivar raw_filename: the C{filename} header as sent.
    @ivar rule: the C{rule} (or C{workflow}) header, decoded.
    @ivar passwords: the C{archivepwd*} headers, decoded, in order.
    @ivar callback_url: the C{callbackurl} header, decoded.
    """

    raw_filename: str = ""
    rule: str | None = None
    user_agent: str = ""
    passwords: tuple[str, ...] = ()
    callback_url: str | None = None


def passwords_from(headers: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """
    The C{archivepwd}, C{archivepwd1}, C{archivepwd2}, ... header values,
    URL-decoded, in that order.
    """
    found: list[tuple[int, str]] = []
    for name, value in headers:
        lowered = name.lower()
        if not lowered.startswith("archivepwd"):
            continue
        suffix = lowered[len("archivepwd") :]
        if suffix and not suffix.isdigit():
            continue
        found.append((int(suffix) if suffix else 0, unquote(value)))
    return tuple(value for _, value in sorted(found))


def valid_callback(url: str) -> bool:
    """
    Whether C{url} is a usable webhook address: C{http(s)://host[:port]/path}.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and (port is None or 0 < port < 65536)
        and not any(c.isspace() for c in url)
    )


@attrs.define(eq=False)
class Job:
    """
    One examined upload (or, with C{parent}, one of its archive children,
    whose result is complete when the upload's extraction is).
    """

    node: Node
    rule: str
    user_agent: str
    received: float
    latency: float
    started: str
    callback_url: str | None = None
    parent: Job | None = None
    stage: int = PROCESSING
    cancelled: bool = False
    cancelled_at: float | None = None
    scanned: float | None = None
    finished: float | None = None
    scan_call: IDelayedCall | None = None
    finish_call: IDelayedCall | None = None
    waiters: list[Deferred[bool]] = attrs.field(factory=list)

    @classmethod
    def child(cls, parent: Job, node: Node) -> Job:
        """
        The job of an archive child of C{parent}.
        """
        return cls(
            node=node,
            rule=parent.rule,
            user_agent=parent.user_agent,
            received=parent.received,
            latency=0.0,
            started=parent.started,
            parent=parent,
            stage=DONE,
        )

    def progress(self, now: float) -> Progress:
        """
        Where the processing stands at C{now}.
        """
        return Progress(
            stage=self.stage,
            received=self.received,
            latency=self.latency,
            now=self.cancelled_at if self.cancelled_at is not None else now,
            cancelled=self.cancelled,
        )

    def request(self) -> Request:
        """
        What the submission said.
        """
        return Request(rule=self.rule, user_agent=self.user_agent, started=self.started)

    def wait(self, clock: IReactorTime, timeout: float) -> Deferred[bool]:
        """
        Fire with C{True} when the job is done, or C{False} after
        C{timeout} seconds.
        """
        waiting: Deferred[bool] = Deferred()
        if self.stage == DONE:
            waiting.callback(True)
            return waiting
        self.waiters.append(waiting)

        def expire() -> None:
            if waiting in self.waiters:
                self.waiters.remove(waiting)
                waiting.callback(False)

        call = clock.callLater(timeout, expire)

        def settled(result: bool) -> bool:
            if call.active():
                call.cancel()
            return result

        return waiting.addCallback(settled)

    def release_waiters(self) -> None:
        """
        Answer every waiter: C{True} when the job is done.
        """
        waiters, self.waiters = self.waiters, []
        for waiting in waiters:
            waiting.callback(self.stage == DONE)

    def stop_timers(self) -> None:
        """
        Cancel the job's pending timers.
        """
        for call in (self.scan_call, self.finish_call):
            if call is not None and call.active():
                call.cancel()
        self.scan_call = self.finish_call = None


def _treq_poster(clock: Any) -> Callable[[str, bytes], Deferred[int]]:
    import treq

    def post(url: str, body: bytes) -> Deferred[int]:
        async def run() -> int:
            response = await treq.post(
                url,
                data=body,
                headers=Headers({b"Content-Type": [b"application/json"]}),
                reactor=clock,
                timeout=30,
                persistent=False,
            )
            await treq.content(response)
            return int(response.code)

        return Deferred.fromCoroutine(run())

    return post


class Webhooks:
    """
    The C{callbackurl} deliveries: one POST of the finished result per job,
    and what came of it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        poster: Callable[[str, bytes], Deferred[int]] | None = None,
    ) -> None:
        self._clock = clock
        self._poster = poster
        self._status: dict[str, dict[str, Any]] = {}
        self._sending: set[Deferred[Any]] = set()

    def expect(self, data_id: str, url: str) -> None:
        """
        Record that C{data_id} will be delivered to C{url} (status 0 and no
        request time until then).
        """
        self._status[data_id] = {
            "data_id": data_id,
            "request_time": "",
            "status_code": 0,
            "url": url,
        }

    def status(self, data_id: str) -> dict[str, Any] | None:
        """
        C{{"data_id", "request_time", "status_code", "url"}}, or C{None}.
        """
        status = self._status.get(data_id)
        return dict(status) if status is not None else None

    def send(self, data_id: str, doc: dict[str, Any]) -> None:
        """
        POST C{doc} (sorted JSON) to the URL recorded for C{data_id}; a
        failed delivery is logged and recorded as status 0.
        """
        status = self._status.get(data_id)
        if status is None:
            return
        if self._poster is None:
            self._poster = _treq_poster(self._clock)
        status["request_time"] = iso(self._clock.seconds())
        url = status["url"]
        body = json.dumps(doc, sort_keys=True).encode("utf-8")
        sending = self._poster(url, body)
        self._sending.add(sending)

        def done(code: int) -> None:
            status["status_code"] = code

        def failed(failure: Any) -> None:
            _log.info(
                "webhook for {data_id} to {url} failed: {error}",
                data_id=data_id,
                url=url,
                error=failure.getErrorMessage(),
            )

        sending.addCallbacks(done, failed)
        sending.addBoth(lambda _: self._sending.discard(sending))

    def forget(self, data_id: str) -> None:
        """
        Drop the record of a purged job.
        """
        self._status.pop(data_id, None)

    def close(self) -> None:
        """
        Abandon deliveries in progress.
        """
        for sending in list(self._sending):
            sending.cancel()
        self._sending.clear()
        self._status.clear()
