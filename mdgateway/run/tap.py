# -*- test-case-name: tests.test_e2e_receive -*-
"""
The C{mdgateway} twistd/twist plugin: C{twist mdgateway --config FILE}.

Only the command line lives here; the gateway is built by
L{mdgateway.run.compose.build_gateway} and run by
L{mdgateway.run.service.GatewayService}.
"""

from __future__ import annotations

import os
import signal

from twisted.application.service import IService
from twisted.python import usage

from mdgateway.config import ConfigError, GatewayConfig, load_config
from mdgateway.run.compose import build_gateway
from mdgateway.run.reactor import IGatewayReactor, global_reactor
from mdgateway.run.service import GatewayService


class Options(usage.Options):
    """
    C{twist mdgateway --config FILE}.
    """

    synopsis = "--config FILE"
    optParameters = [
        ["config", "c", "etc/mdgateway.toml", "the TOML configuration file"],
    ]

    def postOptions(self) -> None:
        try:
            self["gateway_config"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(
                "invalid configuration:\n  " + "\n  ".join(e.problems)
            ) from None


def makeService(options: Options) -> IService:
    reactor = global_reactor()
    config: GatewayConfig = options["gateway_config"]
    # Before anything is created: spool, store, tokens and secrets hold
    # mail and keys, and their workers inherit the mask.
    os.umask(config.umask)
    service = GatewayService(build_gateway(config, reactor))
    _install_signals(reactor, service)
    return service


def _install_signals(reactor: IGatewayReactor, service: GatewayService) -> None:
    # twistd and twist handle SIGTERM and SIGINT (orderly stop); SIGHUP
    # reloads the configuration, as operators expect of a daemon.
    if os.name == "posix":
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(service.reload))
