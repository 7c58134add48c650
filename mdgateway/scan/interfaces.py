# -*- test-case-name: tests.test_core_runtime -*-
"""
The seams of the scan room: what message processing needs of a Core
profile (L{IScanner}), and what the profile runtime needs of the client of
one Core server (L{ICoreServerClient}).

The runtime only needs these three calls, so its failover, health and
concurrency logic is tested against a verified fake
(L{mdgateway.testing.core.FakeCoreServerClient}) with a L{task.Clock}.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

from mdgateway.scan.verdict import Verdict


class ICoreServerClient(Interface):
    """
    Talks to one MetaDefender Core server.

    Every method raises L{mdgateway.scan.errors.CoreError} on failure.
    """

    server = Attribute("The L{mdgateway.policy.profiles.CoreServer} this client uses.")

    async def scan(path: str, filename: str) -> Verdict:
        """
        Submit the file at C{path} (shown to Core as C{filename}), wait for
        the complete result and return it.
        """

    async def download_converted(verdict: Verdict, dest_path: str) -> str:
        """
        Stream the converted (sanitized or redacted) file of C{verdict} to
        C{dest_path}; return the converted file's name.
        """

    async def probe() -> None:
        """
        Check the server answers (C{GET /version}).
        """


class IScanner(Interface):
    """
    What message processing needs of a Core server profile: scan a part,
    fetch its converted file. L{mdgateway.scan.runtime.CoreRuntime} is the
    real one; L{mdgateway.testing.scan.FakeScanner} decides by content.

    Both raise L{mdgateway.scan.errors.CoreError} on failure.
    """

    async def scan(path: str, filename: str) -> Verdict:
        """
        The complete verdict for the file at C{path}, shown to Core as
        C{filename}, from whichever server of the profile takes it.
        """

    async def download_sanitized(verdict: Verdict, dest_path: str) -> str:
        """
        Write the converted file of C{verdict} (from the server that made
        it) to C{dest_path}; return its name.
        """
