# -*- test-case-name: tests.test_e2e_start -*-
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
from mdgateway.run.logs import FORMATS, install
from mdgateway.run.notify import SystemdNotifier
from mdgateway.run.reactor import IGatewayReactor, global_reactor
from mdgateway.run.service import GatewayService

#: Where the configuration is unless C{--config} or C{MDGATEWAY_CONFIG} say.
DEFAULT_CONFIG = "/etc/mdgateway/mdgateway.toml"
CONFIG_ENV = "MDGATEWAY_CONFIG"


class Options(usage.Options):
    """
    C{twist mdgateway [--config FILE] [--log-format json|text]}.
    """

    synopsis = "[--config FILE] [--log-format json|text]"
    optParameters = [
        [
            "config",
            "c",
            None,
            f"the TOML configuration file (default: ${CONFIG_ENV}, else "
            f"{DEFAULT_CONFIG})",
        ],
        [
            "log-format",
            None,
            None,
            "json: JSON Lines (the default); text: one line per event for "
            "people. Replaces twist's own --log-format (which is read when "
            "this one is not given); --log-file and --log-level still apply.",
        ],
    ]

    def postOptions(self) -> None:
        if self["log-format"] is not None and self["log-format"] not in FORMATS:
            raise usage.UsageError(
                f"--log-format: {self['log-format']!r} is not one of "
                + ", ".join(FORMATS)
            )
        if self.parent is not None:
            self["log-format"] = install(self.parent, self["log-format"])
        path = self["config"] or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
        self["config"] = path
        try:
            self["gateway_config"] = load_config(path)
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
    service = GatewayService(
        build_gateway(config, reactor),
        exit_on_failure=True,
        notifier=SystemdNotifier.from_environment(),
    )
    _install_signals(reactor, service)
    return service


def _install_signals(reactor: IGatewayReactor, service: GatewayService) -> None:
    # twistd and twist handle SIGTERM and SIGINT (orderly stop); SIGHUP
    # reloads the configuration, as operators expect of a daemon.
    if os.name == "posix":
        signal.signal(
            signal.SIGHUP, lambda *_: reactor.callFromThread(service.reload_notified)
        )
