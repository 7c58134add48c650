# -*- test-case-name: tests.test_loop -*-
"""
The processed marker at run time: the cluster's secret, minting a marker
for a copy, and checking the markers of a message that arrives.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from mdgateway.message.marker import (
    MarkerCount,
    Stamp,
    load_or_create_secret,
    make_marker,
    scan_markers,
)


class ILoopGuard(Interface):
    """
    The processed-marker seam of the queue manager.
    """

    def make(copy_id: str, now: float, digest: bytes, stamp: Stamp) -> str:  # noqa: N805
        """
        Our marker value for a copy id, a time, the content digest of the
        copy as it is delivered and the stamp (rule, profile, actions,
        result) it vouches for.
        """

    def check(path: str, now: float, digest: bytes | None) -> MarkerCount:  # noqa: N805
        """
        The markers of the spooled file at C{path}, checked against its
        content digest (blocking); with no digest (a header block too large
        to bind) no marker is valid. The caller logs the invalid ones.
        """

    def relay_once_max_age() -> float:  # noqa: N805
        """
        How old a marker may be to let a message be relayed once more
        without a second scan (asked at each use, so a reload applies).
        """


class SecretNotLoadedError(RuntimeError):
    """
    A marker was asked for before the secret was loaded: a wiring mistake.
    """


@implementer(ILoopGuard)
class MarkerLoopGuard:
    """
    Markers keyed with the secret every instance of the cluster shares.

    @param secret_file: where the secret lives (created on first start).
    @param max_age: how long a marker counts, read at each use so that a
        reload applies.
    @param relay_once_max_age: how old a marker may be to relay a message
        once more unscanned, read at each use likewise.
    """

    def __init__(
        self,
        clock: IReactorTime,
        secret_file: str,
        max_age: Callable[[], float],
        relay_once_max_age: Callable[[], float],
    ) -> None:
        self._clock = clock
        self._secret_file = secret_file
        self._max_age = max_age
        self._relay_once_max_age = relay_once_max_age
        self._secret: bytes | None = None

    async def load(self, reactor: IReactorFromThreads, threadpool: ThreadPool) -> None:
        """
        Read the secret, or create it (in a thread: it fsyncs).
        """
        self._secret = await deferToThreadPool(
            reactor, threadpool, load_or_create_secret, self._secret_file
        )

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            raise SecretNotLoadedError(self._secret_file)
        return self._secret

    def make(self, copy_id: str, now: float, digest: bytes, stamp: Stamp) -> str:
        return make_marker(self.secret, copy_id, now, digest, stamp)[1]

    def check(self, path: str, now: float, digest: bytes | None) -> MarkerCount:
        with open(path, "rb") as f:
            return scan_markers(
                f, self.secret, now, max_age=self._max_age(), digest=digest
            )

    def relay_once_max_age(self) -> float:
        return self._relay_once_max_age()

    def looped(self, head: bytes, digest: bytes | None) -> bool:
        """
        Whether a message arriving with this top-level header block and
        content digest (L{None} when the block is too large to bind) has
        come round more than once (refuse it at the end of DATA).
        """
        count = scan_markers(
            io.BytesIO(head),
            self.secret,
            self._clock.seconds(),
            max_age=self._max_age(),
            digest=digest,
        )
        return count.looped
