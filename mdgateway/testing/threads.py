# -*- test-case-name: tests.test_testing -*-
"""
Thread pools and a clock that run "threaded" work on the test's own thread,
so code that hands blocking work to a pool is tested synchronously, under
a L{task.Clock}, and at a moment of the test's choosing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IReactorTime, IReactorFromThreads)
class ThreadsClock(task.Clock):
    """
    A L{task.Clock} that also takes C{callFromThread}: the fake thread pools
    below run work on the test's own thread, so the call runs at once.
    """

    def callFromThread(
        self, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> None:
        callable(*args, **kw)


@implementer(IReactorFromThreads)
class ThreadsMemoryReactor(MemoryReactorClock):
    """
    Twisted's memory reactor (connections and listeners recorded, never
    made; a clock the test advances) that also takes C{callFromThread},
    running the call at once: enough to build a whole gateway in a test.
    """

    def callFromThread(
        self, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> None:
        callable(*args, **kw)


def _outcome(
    func: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]
) -> tuple[bool, Any]:
    # What ThreadPool.callInThreadWithCallback reports: (True, result) or
    # (False, Failure).
    try:
        return True, func(*args, **kw)
    except BaseException:
        return False, Failure()


class SynchronousThreadPool:
    """
    The C{callInThreadWithCallback} of L{ThreadPool}, run at once.
    """

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], object] | None,
        func: Callable[..., Any],
        *args: Any,
        **kw: Any,
    ) -> None:
        ok, result = _outcome(func, args, kw)
        if onResult is not None:
            onResult(ok, result)


class ManualThreadPool:
    """
    The C{callInThreadWithCallback} of L{ThreadPool}, run when the test says,
    so a test can act while a job is "in flight".
    """

    def __init__(self) -> None:
        self.jobs: list[
            tuple[Any, Callable[..., Any], tuple[Any, ...], dict[str, Any]]
        ] = []

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], object] | None,
        func: Callable[..., Any],
        *args: Any,
        **kw: Any,
    ) -> None:
        self.jobs.append((onResult, func, args, kw))

    def run_one(self) -> None:
        on_result, func, args, kw = self.jobs.pop(0)
        ok, result = _outcome(func, args, kw)
        if on_result is not None:
            on_result(ok, result)

    def run_all(self) -> int:
        count = 0
        while self.jobs:
            self.run_one()
            count += 1
        return count
