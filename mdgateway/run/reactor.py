# -*- test-case-name: tests.test_embedding -*-
"""
The reactor a gateway process needs, as one interface: the intersection of
the reactor interfaces its pieces use.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFDSet,
    IReactorFromThreads,
    IReactorPluggableNameResolver,
    IReactorProcess,
    IReactorSocket,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)


class IGatewayReactor(
    IReactorCore,
    IReactorFDSet,
    IReactorTime,
    IReactorTCP,
    IReactorThreads,
    IReactorFromThreads,
    IReactorProcess,
    IReactorSocket,
    IReactorPluggableNameResolver,
):
    """
    Everything the gateway asks of its reactor. The default reactor on
    POSIX provides all of it; L{global_reactor} says so to the type checker.
    """


def global_reactor() -> IGatewayReactor:
    """
    Twisted's installed reactor, typed as what the gateway uses of it.
    """
    from twisted.internet import reactor

    return cast(IGatewayReactor, reactor)
