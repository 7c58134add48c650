# -*- test-case-name: tests.test_cli -*-
"""
Where the C{mdgateway} command finds the gateway: on the gateway's host it
needs no flags.

The configuration file is C{--config}, else C{$MDGATEWAY_CONFIG}, else
C{/etc/mdgateway/mdgateway.toml}. Its C{[admin]} table gives the API's
address (C{endpoint}) and the token's file (C{token_file}); options and the
environment override each:

    URL:   --url, $MDGATEWAY_ADMIN_URL, [admin] endpoint, http://127.0.0.1:10080
    token: --token-file, $MDGATEWAY_ADMIN_TOKEN_FILE, $MDGATEWAY_ADMIN_TOKEN
           (the token itself), [admin] token_file

A token file may hold several named tokens (C{name:token} lines); the one
used is C{--token-name}, else C{$MDGATEWAY_ADMIN_TOKEN_NAME}, else the only
one, else C{admin}.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path

import attrs

from mdgateway.config import AdminConfig, load_admin_settings
from mdgateway.endpoints import EndpointError, parse_endpoint
from mdgateway.ops.cliclient import EXIT_USAGE, CliError
from mdgateway.ops.tokens import TokenFileError, parse_tokens, pick_token
from mdgateway.tomlreader import ConfigError

DEFAULT_CONFIG = "/etc/mdgateway/mdgateway.toml"
DEFAULT_URL = "http://127.0.0.1:10080"
CONFIG_ENV = "MDGATEWAY_CONFIG"
URL_ENV = "MDGATEWAY_ADMIN_URL"
TOKEN_FILE_ENV = "MDGATEWAY_ADMIN_TOKEN_FILE"
TOKEN_ENV = "MDGATEWAY_ADMIN_TOKEN"
TOKEN_NAME_ENV = "MDGATEWAY_ADMIN_TOKEN_NAME"


@attrs.frozen
class Target:
    """
    The admin API to talk to, and the token to show it.
    """

    url: str
    token: str | None


def config_path(option: str | None, environ: Mapping[str, str]) -> tuple[str, bool]:
    """
    The configuration file, and whether it was named (by C{--config} or
    C{$MDGATEWAY_CONFIG}) rather than the default.
    """
    named = option or environ.get(CONFIG_ENV)
    return (named, True) if named else (DEFAULT_CONFIG, False)


def url_for(endpoint: str) -> str:
    """
    The URL that reaches a TCP or SSL admin endpoint from this host.

    @raise CliError: for an endpoint no URL reaches (UNIX, systemd).
    """
    try:
        parsed = parse_endpoint(endpoint)
    except EndpointError as e:
        raise CliError(f"admin.endpoint {endpoint!r}: {e}", EXIT_USAGE) from None
    if parsed.kind not in ("tcp", "tcp6", "ssl"):
        raise CliError(
            f"admin.endpoint {endpoint!r} is not reached by a URL: pass --url",
            EXIT_USAGE,
        )
    host = parsed.interface or "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and address.is_unspecified:
        host = "::1" if address.version == 6 else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if parsed.kind == "ssl" else "http"
    return f"{scheme}://{host}:{parsed.port}"


def read_token(path: str, name: str | None = None) -> str:
    """
    The token in the file C{path}: the one named C{name} in a file of named
    tokens (default: the only one, or C{admin}).

    @raise CliError: it cannot be read, is empty, or has no such token.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except PermissionError:
        raise CliError(
            f"cannot read token file {path}: permission denied (run as root or "
            "as a member of the gateway's group, or pass --token-file)",
            EXIT_USAGE,
        ) from None
    except OSError as e:
        raise CliError(
            f"cannot read token file {path}: {e.strerror}", EXIT_USAGE
        ) from None
    if not text.strip():
        raise CliError(f"token file {path} is empty", EXIT_USAGE)
    try:
        return pick_token(parse_tokens(text, path), name)
    except TokenFileError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def admin_target(
    url: str | None,
    token_file: str | None,
    config: str | None,
    environ: Mapping[str, str],
    token_name: str | None = None,
) -> Target:
    """
    Resolve the API's URL and token from the options (C{--url},
    C{--token-file}, C{--config}), the environment and the configuration
    file (read when named, or when the default exists).
    """
    path, named = config_path(config, environ)
    admin: AdminConfig | None = None
    url = url or environ.get(URL_ENV)
    token_file = token_file or environ.get(TOKEN_FILE_ENV)
    token = None if token_file else environ.get(TOKEN_ENV, "").strip() or None
    if named or Path(path).exists():
        try:
            admin = load_admin_settings(path)
        except ConfigError as e:
            if url is None or (token_file is None and token is None):
                raise CliError(
                    "cannot read the admin settings: " + "; ".join(e.problems),
                    EXIT_USAGE,
                ) from None
    if url is None:
        if admin is None:
            url = DEFAULT_URL
        elif not admin.endpoint:
            raise CliError(
                f"{path} has no admin API ([admin] endpoint is empty): "
                "configure one, or pass --url",
                EXIT_USAGE,
            )
        else:
            url = url_for(admin.endpoint)
    if token_file is None and token is None and admin is not None:
        token_file = admin.token_file
    if token_file is not None:
        token = read_token(token_file, token_name or environ.get(TOKEN_NAME_ENV))
    return Target(url, token)
