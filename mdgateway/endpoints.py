# -*- test-case-name: tests.test_config -*-
"""
Server endpoint descriptions (C{tcp:25:interface=::}, C{unix:/run/x.sock},
C{systemd:domain=INET:index=0}) checked before anything listens.

Twisted parses a description only when it listens, and then fails with the
socket's words (C{bind(): port must be 0-65535}) and no key named. Here a
description is read with the same grammar (C{:} between parameters, C{=}
for a keyword, C{\\} escapes the next character) and every parameter of
the kinds the gateway uses is checked, so C{check-config} refuses what
cannot bind and says which key and why, in one line.

Client endpoints too (L{client_endpoint}): an address is connected to
without a name lookup.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

import attrs
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint

#: The kinds a configuration may use, by what serves on them.
LISTENER_KINDS = ("tcp", "tcp6", "unix", "systemd")
ADMIN_KINDS = ("tcp", "tcp6", "unix", "systemd", "ssl")
TCP_KINDS = ("tcp", "tcp6")

_SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")

#: Keyword parameters each kind takes (positional ones are listed apart).
_KEYWORDS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "interface", "backlog"),
    "ssl": (
        "port",
        "interface",
        "backlog",
        "privateKey",
        "certKey",
        "extraCertChain",
        "sslmethod",
        "dhParameters",
    ),
    "unix": ("address", "mode", "backlog", "lockfile", "wantPID"),
    "systemd": ("domain", "index", "name"),
}
#: The positional parameters of each kind, in order.
_POSITIONAL = {
    "tcp": ("port",),
    "tcp6": ("port",),
    "ssl": ("port",),
    "unix": ("address",),
    "systemd": (),
}


class EndpointError(ValueError):
    """
    A description that cannot be served; the message says why.
    """


@attrs.frozen
class Endpoint:
    """
    A parsed server endpoint description.

    @ivar kind: C{tcp}, C{tcp6}, C{unix}, C{systemd}, C{ssl}, ... (lower case).
    @ivar options: every parameter by name, positional ones under their
        names (C{port}, C{address}).
    """

    kind: str
    options: dict[str, str]

    @property
    def port(self) -> int:
        text = self.options.get("port", "0")
        return int(text) if text.isdigit() else 0

    @property
    def interface(self) -> str:
        return self.options.get("interface", "")


def _tokens(description: str) -> list[list[str]]:
    """
    The C{:}-separated parameters of a description, each split at its
    first unescaped C{=}.
    """
    parameters: list[list[str]] = []
    current = [""]
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current[-1] += next(chars, "")
        elif char == ":":
            parameters.append(current)
            current = [""]
        elif char == "=" and len(current) == 1:
            current.append("")
        else:
            current[-1] += char
    parameters.append(current)
    return parameters


def parse_endpoint(description: str) -> Endpoint:
    """
    Read a server endpoint description.

    @raise EndpointError: a parameter given twice, a positional parameter
        the kind does not take, or an unknown keyword.
    """
    first, *rest = _tokens(description)
    kind = first[0].strip().lower()
    if len(first) != 1 or not kind:
        raise EndpointError(f"no endpoint type in {description!r}")
    if kind not in _KEYWORDS:
        raise EndpointError(f"unknown endpoint type {kind!r}")
    positional = list(_POSITIONAL[kind])
    options: dict[str, str] = {}
    for parameter in rest:
        if len(parameter) == 1:
            if not positional:
                raise EndpointError(f"unexpected parameter {parameter[0]!r}")
            name, value = positional.pop(0), parameter[0]
        else:
            name, value = parameter
            if name not in _KEYWORDS[kind]:
                known = ", ".join(_KEYWORDS[kind])
                raise EndpointError(f"unknown option {name!r} for {kind}: ({known})")
            if name in positional:
                positional.remove(name)
        if name in options:
            raise EndpointError(f"{name} given twice")
        options[name] = value
    return Endpoint(kind, options)


def check_endpoint(
    description: str, kinds: tuple[str, ...], check_files: bool = True
) -> Endpoint:
    """
    Parse and check a description for one of C{kinds}.

    @param check_files: check that the folder of a UNIX socket and the key
        files of an C{ssl:} endpoint exist (off for a file meant for
        another host).
    @raise EndpointError: with the first reason it cannot be served.
    """
    endpoint = parse_endpoint(description)
    if endpoint.kind not in kinds:
        raise EndpointError(
            f"unsupported endpoint type {endpoint.kind!r} "
            f"(use {', '.join(k + ':' for k in kinds)})"
        )
    options = endpoint.options
    if endpoint.kind in ("tcp", "tcp6", "ssl"):
        _check_port(options.get("port"))
        _check_interface(options.get("interface"), endpoint.kind)
    if "backlog" in options:
        _check_integer("backlog", options["backlog"], 1, 65535)
    if endpoint.kind == "unix":
        _check_unix(options, check_files)
    elif endpoint.kind == "systemd":
        _check_systemd(options)
    elif endpoint.kind == "ssl" and check_files:
        for key in ("privateKey", "certKey", "extraCertChain"):
            if key in options and not os.path.isfile(options[key]):
                raise EndpointError(f"{key}: file not found: {options[key]}")
    return endpoint


def _check_port(text: str | None) -> None:
    if text is None or text == "":
        raise EndpointError("no port")
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise EndpointError(f"port must be 0 to 65535, not {text!r}")


def _check_interface(text: str | None, kind: str) -> None:
    if not text:
        return
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise EndpointError(f"interface must be an IP address, not {text!r}") from None
    if kind == "tcp6" and address.version != 6:
        raise EndpointError(f"tcp6 needs an IPv6 interface, not {text!r}")


def _check_integer(name: str, text: str, low: int, high: int) -> None:
    if not text.isdigit() or not low <= int(text) <= high:
        raise EndpointError(f"{name} must be {low} to {high}, not {text!r}")


def _check_unix(options: dict[str, str], check_files: bool) -> None:
    path = options.get("address", "")
    if not path:
        raise EndpointError("no socket path")
    if "mode" in options:
        try:
            int(options["mode"], 8)
        except ValueError:
            raise EndpointError(
                f"mode must be octal (660), not {options['mode']!r}"
            ) from None
    for flag in ("lockfile", "wantPID"):
        if flag in options and options[flag] not in ("0", "1"):
            raise EndpointError(f"{flag} must be 0 or 1, not {options[flag]!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if check_files and not os.path.isdir(folder):
        raise EndpointError(f"the socket's folder does not exist: {folder}")


def _check_systemd(options: dict[str, str]) -> None:
    domain = options.get("domain")
    if domain not in _SYSTEMD_DOMAINS:
        raise EndpointError(
            f"domain must be one of {', '.join(_SYSTEMD_DOMAINS)}, not {domain!r}"
        )
    if "index" in options:
        _check_integer("index", options["index"], 0, 1023)
    elif not options.get("name"):
        raise EndpointError("index (or name) of the inherited socket is required")


def endpoint_address(description: str) -> tuple[str, str, int]:
    """
    The kind (C{"TCP"}, C{"TCP6"}, C{"SSL"}, C{"UNIX"}, C{"SYSTEMD"}),
    interface and port of a server endpoint description (port 0 and C{""}
    where none).

    @raise EndpointError: it cannot be parsed.
    """
    endpoint = parse_endpoint(description)
    return endpoint.kind.upper(), endpoint.interface, endpoint.port


def client_endpoint(
    reactor: Any,
    host: str,
    port: int,
    timeout: float,
    bind: tuple[str, int] | None = None,
) -> IStreamClientEndpoint:
    """
    A TCP client endpoint for C{host}: an address connects as it is, a name
    through L{HostnameEndpoint}. An address given to L{HostnameEndpoint}
    would still be looked up in a thread for every connection.

    @param reactor: connects (C{IReactorTCP}) and times out (C{IReactorTime}).
    """
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind)
    kind = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
    return kind(reactor, bare, port, timeout=timeout, bindAddress=bind)
