# -*- test-case-name: tests.test_core_runtime -*-
"""
A verified fake of L{ICoreServerClient} for tests of code that scans files.

Every call returns a Deferred the test fires, so failover, health and
concurrency can be driven step by step with a L{task.Clock}.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred
from zope.interface import implementer

from mdgateway.policy.profiles import CoreServer
from mdgateway.scan.errors import CoreError
from mdgateway.scan.interfaces import ICoreServerClient
from mdgateway.scan.verdict import Outcome, Verdict


@attrs.define
class PendingCall:
    """
    One call the fake received; fire L{result} to answer it.
    """

    kind: str
    args: tuple[object, ...]
    result: Deferred[object] = attrs.field(factory=Deferred)


def clean_verdict(server: CoreServer, data_id: str = "0" * 32) -> Verdict:
    """
    An Allowed, no-threat verdict from C{server}.
    """
    return Verdict(
        data_id=data_id,
        core_url=server.url,
        outcome=Outcome.ALLOWED,
        result="Allowed",
        blocked_reason="",
        scan_all_result_i=0,
        scan_all_result_a="No Threat Detected",
    )


@implementer(ICoreServerClient)
class FakeCoreServerClient:
    """
    Records calls; the test answers them through L{calls}.
    """

    def __init__(self, server: CoreServer) -> None:
        self.server = server
        self.calls: list[PendingCall] = []

    def pending(self, kind: str) -> list[PendingCall]:
        """
        Calls of C{kind} (C{scan}, C{download}, C{probe}) not yet answered.
        """
        return [c for c in self.calls if c.kind == kind and not c.result.called]

    def succeed_scan(self, index: int = 0) -> Verdict:
        """
        Answer the C{index}th pending scan with a clean verdict.
        """
        verdict = clean_verdict(self.server)
        self.pending("scan")[index].result.callback(verdict)
        return verdict

    def fail(self, kind: str, error: CoreError, index: int = 0) -> None:
        """
        Answer the C{index}th pending call of C{kind} with C{error}.
        """
        self.pending(kind)[index].result.errback(error)

    async def _call(self, kind: str, *args: object) -> object:
        call = PendingCall(kind, args)
        self.calls.append(call)
        return await call.result

    async def scan(self, path: str, filename: str) -> Verdict:
        result = await self._call("scan", path, filename)
        assert isinstance(result, Verdict)
        return result

    async def download_converted(self, verdict: Verdict, dest_path: str) -> str:
        result = await self._call("download", verdict, dest_path)
        assert isinstance(result, str)
        return result

    async def probe(self) -> None:
        await self._call("probe")
