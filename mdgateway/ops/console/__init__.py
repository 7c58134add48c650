# -*- test-case-name: tests.test_console -*-
"""
The web console for the people who run the gateway: history, quarantine,
refused log, queue, configuration and a dashboard, at C{/console/} of the
admin listener (see C{docs/console.md}).

L{Console} is the application; L{mount} serves it beside the admin API
under one root resource.
"""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request

from mdgateway.ops.console.app import Console

__all__ = ["Console", "mount"]


class _Mount(Resource):
    """
    C{/console} to the console; every other path to the admin API's leaf,
    which routes on the full path itself.
    """

    def __init__(self, api: Resource, console: Resource) -> None:
        super().__init__()
        self._api = api
        self.putChild(b"console", console)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self._api

    def render(self, request: Request) -> bytes | int:
        rendered: bytes | int = self._api.render(request)
        return rendered


def mount(api: Resource, console: Console) -> Resource:
    """
    One root resource serving the admin API and, at C{/console/}, the
    console.
    """
    return _Mount(api, console.resource())
