# -*- test-case-name: tests.test_queue_blocking -*-
"""
Where the queue's blocking file work runs: in a thread pool, or at once on
the reactor thread when the message is small.

A hand-over to a pool thread and back costs the reactor more than reading
or writing a few KiB that sit in the page cache: two thread wake-ups, a
fight for the interpreter lock, and the callbacks that carry the result
back. For a small message every such step (reading its header block,
taking it apart, writing the rebuilt copy, making and removing its scratch
folder) is cheaper done in place. Work that waits on the disk (an fsync)
always goes to the pool, whatever the size, and so does everything for a
large message, so the reactor never stalls on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

_T = TypeVar("_T")

#: Messages up to this size have their non-syncing file work done in place.
INLINE_BYTES = 64 * 1024


class BlockingWork:
    """
    Runs blocking file work for a message of a given size.

    @param reactor: takes results back from the pool's threads.
    @param inline_bytes: the largest message whose work runs in place
        (0: always in the pool).
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        inline_bytes: int = INLINE_BYTES,
    ) -> None:
        self._reactor = reactor
        self.threadpool = threadpool
        self.inline_bytes = inline_bytes

    async def pool(self, function: Callable[..., _T], *args: Any) -> _T:
        """
        C{function(*args)} in the pool: for work that syncs to disk.
        """
        result: _T = await deferToThreadPool(
            self._reactor, self.threadpool, function, *args
        )
        return result

    async def run(
        self, size: int | None, function: Callable[..., _T], *args: Any
    ) -> _T:
        """
        C{function(*args)} for a message of C{size} bytes: in place when
        it is small (never give this work that fsyncs), else in the pool;
        an unknown size (L{None}) goes to the pool.
        """
        if size is not None and size <= self.inline_bytes:
            return function(*args)
        return await self.pool(function, *args)
