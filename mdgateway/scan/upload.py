# -*- test-case-name: tests.test_core_upload -*-
"""
The body of an upload to Core: a file streamed from the spool with a known
length.

Twisted's C{FileBodyProducer} needs one more cooperative step after its
last write (to read the end of the file) before it says it is done, and
reads a file its caller owns. When Core answers before that step (it has
the whole body, or it answers early, as a 503 may), the caller has moved
on and closed the file, the step fails with "read of closed file", and
Twisted logs the failure at critical level, since the response is already
out. L{FileUpload} owns its file (opening it when the request starts and
closing it when it stops), says it is done in the same step that writes the
last of its C{length} bytes, and when stopped never reports anything: an
early answer costs nothing but the rest of the upload.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import IO, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import NotPaused, TaskFinished, TaskStopped
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

_BLOCK = 1 << 16


class UploadChangedError(Exception):
    """
    The file ended before its length: it changed during the upload.
    """


@implementer(IBodyProducer)
class FileUpload:
    """
    Streams the file at C{path} in blocks on a cooperator, writing exactly
    its size at creation.

    @ivar length: the file's size when the upload was created.
    """

    def __init__(self, path: str, cooperator: Any, block: int = _BLOCK) -> None:
        """
        @param cooperator: schedules the writes (C{twisted.internet.task},
            or a L{Cooperator}); one block per step.
        """
        self._path = path
        self._cooperator = cooperator
        self._block = block
        self.length = os.stat(path).st_size
        self._file: IO[bytes] | None = None
        self._task: Any = None
        self._finished: Deferred[None] | None = None

    @property
    def closed(self) -> bool:
        """
        Whether the upload holds no open file (never started, finished or
        stopped).
        """
        return self._file is None

    def startProducing(self, consumer: Any) -> Deferred[None]:
        """
        Open the file and start writing it to C{consumer}; the result fires
        right after the last byte is written, or fails if the file ended
        early (never after L{stopProducing}).
        """
        self._close()
        self._file = open(self._path, "rb")
        finished: Deferred[None] = Deferred(lambda _: self.stopProducing())
        self._finished = finished
        self._task = self._cooperator.cooperate(self._steps(self._file, consumer))
        done = self._task.whenDone()

        def ended(_: object) -> None:
            self._task = None
            self._close()
            if not finished.called:
                finished.callback(None)

        def failed(failure: Any) -> None:
            self._task = None
            self._close()
            if failure.check(TaskStopped, CancelledError) or finished.called:
                return  # stopped: the request no longer waits for us
            finished.errback(failure)

        done.addCallbacks(ended, failed)
        return finished

    def _steps(self, source: IO[bytes], consumer: Any) -> Iterator[None]:
        remaining = self.length
        while remaining > 0:
            block = source.read(min(self._block, remaining))
            if not block:
                raise UploadChangedError(
                    f"{self._path} ended {remaining} bytes short of {self.length}"
                )
            consumer.write(block)
            remaining -= len(block)
            if remaining:
                yield None

    def pauseProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.pause()
            except TaskFinished:
                pass

    def resumeProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.resume()
            except (TaskFinished, NotPaused):
                pass

    def stopProducing(self) -> None:
        """
        Stop writing and close the file; the result of L{startProducing}
        never fires after this (Twisted's contract for a stopped producer).
        """
        task, self._task = self._task, None
        if task is not None:
            try:
                task.stop()
            except TaskFinished:
                pass
        self._close()

    def _close(self) -> None:
        source, self._file = self._file, None
        if source is not None:
            source.close()
