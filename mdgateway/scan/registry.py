# -*- test-case-name: tests.test_core_runtime -*-
"""
The Core runtimes of a running gateway: one per Core server profile, kept
in step with the configuration across reloads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mdgateway.policy.profiles import CoreProfile
from mdgateway.policy.rules import Rule
from mdgateway.scan.client import sha256_file
from mdgateway.scan.runtime import CoreRuntime

#: Parts up to this size are hashed on the reactor thread.
INLINE_HASH_BYTES = 256 << 10


class CoreRuntimes:
    """
    Core server profile name to its L{CoreRuntime}.

    A profile that changes on reload gets a new runtime (its circuit
    breakers and connections start afresh); an unchanged one keeps its
    own, so a reload does not forget which servers are down.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        threadpool: ThreadPool,
        on_cache: Callable[[str, str], None] | None = None,
    ) -> None:
        """
        @param threadpool: where the digests of large parts are computed
            (for the verdict cache and Core's hash lookup), off the reactor
            thread.
        @param on_cache: told C{(profile, result)} of every scan through a
            verdict cache (see L{CoreRuntime}).
        """
        self._reactor = reactor
        self._threads = IReactorFromThreads(reactor)
        self._threadpool = threadpool
        self._on_cache = on_cache
        self._runtimes: dict[str, CoreRuntime] = {}

    def sync(self, profiles: Mapping[str, CoreProfile]) -> None:
        """
        One runtime per profile in C{profiles}.
        """
        for name, profile in profiles.items():
            runtime = self._runtimes.get(name)
            if runtime is not None and runtime.profile == profile:
                continue
            if runtime is not None:
                runtime.close()
            self._runtimes[name] = CoreRuntime.from_profile(
                profile, self._reactor, hasher=self._hash, on_cache=self._on_cache
            )

    def _hash(self, path: str) -> Deferred[str]:
        """
        A part's SHA-256: in place when it is small (a thread hand-over
        costs more than hashing a few hundred KiB), else in the pool.
        """
        try:
            small = os.stat(path).st_size <= INLINE_HASH_BYTES
        except OSError:
            small = True  # the hash reports the error
        if small:
            return maybeDeferred(sha256_file, path)
        return deferToThreadPool(self._threads, self._threadpool, sha256_file, path)

    def __getitem__(self, name: str) -> CoreRuntime:
        return self._runtimes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._runtimes)

    def items(self) -> list[tuple[str, CoreRuntime]]:
        return list(self._runtimes.items())

    def scanning(self, rule: Rule) -> bool:
        """
        Whether the rule's Core profile can take work now (a profile with
        no runtime yet is assumed to).
        """
        runtime = self._runtimes.get(rule.core_profile.name)
        return runtime is None or runtime.available()

    def unavailable(self, rule: Rule) -> str | None:
        """
        Why the rule's Core profile cannot take work now, as the error
        condition a rule's C{on_error} names (C{core_unreachable}: no
        server is up; C{core_busy}: every server that is up is busy), or
        C{None} when it can.
        """
        runtime = self._runtimes.get(rule.core_profile.name)
        if runtime is None or runtime.available():
            return None
        if any(status.up for status in runtime.status()):
            return "core_busy"
        return "core_unreachable"

    def servers_up(self) -> dict[str, int]:
        """
        Profile name to the number of its servers currently up.
        """
        return {
            name: sum(1 for s in runtime.status() if s.up)
            for name, runtime in self._runtimes.items()
        }

    async def close(self) -> None:
        for runtime in self._runtimes.values():
            await runtime.close()
