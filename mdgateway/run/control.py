# -*- test-case-name: tests.test_workers -*-
"""
Requests from the primary to a worker process, and their answers, over the
pipes a worker already has: the primary writes a request frame to the
worker's standard input; the worker answers on descriptor 3, among its
metric snapshots.

A frame is the metrics pipe's (L{Frames}: C{<length> LF <payload>}); its
payload is a JSON object. A request is C{{"ask": n, "request": {...}}},
its answer C{{"answer": n, "result": {...}}} or C{{"answer": n, "error":
"..."}}; metric snapshots stay JSON lists, so the two never mix up.

Nothing here is kept on disk: a request is answered by a worker that is
running, or fails at once (not running), at its deadline, or when the
worker exits first. What a request changes is made durable by the worker
(a queue tool saves the delivery state atomically before it answers), so a
worker that dies mid-request has done all of it or none, and its
successor recovers the spool as after any crash. The primary then says
that the answer is unknown, never that it failed or succeeded.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class Frames:
    """
    Length-prefixed frames (C{<decimal length> LF <payload>}) of a worker's
    metrics pipe; a malformed prefix drops the stream rather than guess.
    """

    def __init__(self, limit: int = 16 * 1024 * 1024) -> None:
        self._buffer = b""
        self._limit = limit
        self.broken = False

    @staticmethod
    def encode(payload: bytes) -> bytes:
        return b"%d\n" % len(payload) + payload

    def feed(self, data: bytes) -> list[bytes]:
        if self.broken:
            return []
        self._buffer += data
        frames: list[bytes] = []
        while True:
            head, sep, rest = self._buffer.partition(b"\n")
            if not sep:
                if len(head) > 20:
                    self.broken = True
                return frames
            if not head.isdigit() or int(head) > self._limit:
                self.broken = True
                return frames
            size = int(head)
            if len(rest) < size:
                return frames
            frames.append(rest[:size])
            self._buffer = rest[size:]


class WorkerUnavailableError(Exception):
    """
    The worker could not answer: it is not running, it exited before it
    answered (what it was asked may or may not have been done), or it did
    not answer in time.
    """


class Asks:
    """
    The primary's side of one worker's requests: numbering, deadlines and
    the answers waited for.
    """

    def __init__(self, clock: IReactorTime, label: str) -> None:
        self._clock = clock
        self._label = label
        self._next = 0
        self._waiting: dict[int, tuple[Deferred[dict[str, Any]], IDelayedCall]] = {}

    def ask(
        self,
        write: Callable[[bytes], object] | None,
        request: dict[str, Any],
        timeout: float,
    ) -> Deferred[dict[str, Any]]:
        """
        Send C{request} with C{write} (the worker's standard input; L{None}
        when it is not running); fires with its answer.
        """
        if write is None:
            return fail(WorkerUnavailableError(f"{self._label} is not running"))
        self._next += 1
        number = self._next
        frame = Frames.encode(json.dumps({"ask": number, "request": request}).encode())
        waiter: Deferred[dict[str, Any]] = Deferred()
        timer = self._clock.callLater(timeout, self._expired, number, timeout)
        self._waiting[number] = (waiter, timer)
        try:
            write(frame)
        except Exception as e:
            self._settle(number, Failure(WorkerUnavailableError(f"{self._label}: {e}")))
        return waiter

    def answered(self, message: dict[str, Any]) -> bool:
        """
        A frame from the worker: whether it was an answer (and handled).
        """
        number = message.get("answer")
        if type(number) is not int:
            return False
        if "result" in message and isinstance(message["result"], dict):
            self._settle(number, message["result"])
        else:
            why = str(message.get("error") or "no result")
            self._settle(
                number, Failure(WorkerUnavailableError(f"{self._label}: {why}"))
            )
        return True

    def ended(self) -> None:
        """
        The worker exited: nothing it was asked will be answered.
        """
        for number in list(self._waiting):
            self._settle(
                number,
                Failure(
                    WorkerUnavailableError(
                        f"{self._label} exited before it answered; what it was "
                        "asked may or may not have been done"
                    )
                ),
            )

    def _expired(self, number: int, timeout: float) -> None:
        self._settle(
            number,
            Failure(
                WorkerUnavailableError(
                    f"{self._label} did not answer within {timeout:g}s; what it "
                    "was asked may still be done"
                )
            ),
        )

    def _settle(self, number: int, result: dict[str, Any] | Failure) -> None:
        waiting = self._waiting.pop(number, None)
        if waiting is None:
            return  # answered after its deadline: too late
        waiter, timer = waiting
        if timer.active():
            timer.cancel()
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)


class Answers:
    """
    A worker's side: reads request frames from its standard input, runs
    each through C{handler}, and writes the answer frame with C{write}.
    """

    def __init__(
        self,
        handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
        write: Callable[[bytes], object],
    ) -> None:
        self._handler = handler
        self._write = write
        self._frames = Frames(limit=1024 * 1024)

    def feed(self, data: bytes) -> None:
        for frame in self._frames.feed(data):
            try:
                message = json.loads(frame)
            except ValueError:
                log.error("the primary sent a request that is not JSON")
                continue
            number = message.get("ask") if isinstance(message, dict) else None
            request = message.get("request") if isinstance(message, dict) else None
            if type(number) is not int or not isinstance(request, dict):
                log.error("the primary sent a malformed request")
                continue
            Deferred.fromCoroutine(self._answer(number, request))
        if self._frames.broken:
            log.error("the primary's request stream is broken; requests are ignored")

    async def _answer(self, number: int, request: dict[str, Any]) -> None:
        try:
            reply: dict[str, Any] = {
                "answer": number,
                "result": await self._handler(request),
            }
        except Exception as e:
            log.failure("a request from the primary failed")
            reply = {"answer": number, "error": str(e) or type(e).__name__}
        try:
            self._write(Frames.encode(json.dumps(reply).encode()))
        except (OSError, ValueError):
            log.failure("the answer to the primary could not be written")
