# -*- test-case-name: tests.test_console_units -*-
"""
The running configuration as an operator may see it: every key of the
TOML document, flattened to C{key = value} lines, with secrets masked.

A secret is a value under a key that names one (C{apikey}, C{password},
C{secret}, C{token}, ...; never a C{*_file} key, which holds a path) or
the credentials inside a URL (C{user:password@} and C{?apikey=} style
query parameters, as Core server URIs and PostgreSQL locations carry).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from datetime import date, datetime, time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs

#: What a masked value shows.
MASK = "********"

_SECRET_KEY = re.compile(
    r"(^|_)(apikey|api_key|password|passwd|secret|token|credentials?)$",
    re.IGNORECASE,
)
_SECRET_PARAMETER = re.compile(
    r"^(apikey|api_key|password|passwd|secret|token|access_token)$",
    re.IGNORECASE,
)
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@attrs.frozen
class ConfigEntry:
    """
    One key of the configuration: its dotted path (TOML spelling, array
    positions in brackets) and its value as TOML text.
    """

    key: str
    value: str
    masked: bool = False


@attrs.frozen
class ConfigurationView:
    """
    The configuration in force, for the console's read-only page.

    @ivar version: the running configuration's version (a hash of its
        file's bytes).
    @ivar path: the file it was loaded from.
    @ivar restart_keys: top-level keys whose changes take effect only
        after a restart (a reload keeps their running values).
    """

    version: str
    path: str
    entries: tuple[ConfigEntry, ...]
    restart_keys: tuple[str, ...] = ()


def secret_key(name: str) -> bool:
    """
    Whether a key holds a secret by its name (C{*_file} keys hold paths).
    """
    return not name.lower().endswith("_file") and bool(_SECRET_KEY.search(name))


def mask_url(text: str) -> tuple[str, bool]:
    """
    C{text} with a URL's password and secret query parameters masked;
    and whether anything was.
    """
    if "://" not in text:
        return text, False
    try:
        parts = urlsplit(text)
    except ValueError:
        return MASK, True
    masked = False
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        name = user.partition(":")[0]
        netloc = f"{name}:{MASK}@{host}"
        masked = True
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAMETER.match(k) for k, _ in pairs):
            masked = True
            query = urlencode(
                [(k, MASK if _SECRET_PARAMETER.match(k) else v) for k, v in pairs],
                safe="*",
            )
    if not masked:
        return text, False
    return urlunsplit(parts._replace(netloc=netloc, query=query)), True


def toml_value(value: Any) -> str:
    """
    A scalar or array as TOML writes it.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    return json.dumps(str(value))


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name, ensure_ascii=False)


def _masked(name: str, value: Any) -> tuple[Any, bool]:
    """
    C{value} (under a key that is not itself secret) with the credentials
    in its URLs masked, and whether any were.
    """
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, list):
        out, any_masked = [], False
        for item in value:
            item, masked = _masked("", item)
            out.append(item)
            any_masked = any_masked or masked
        return out, any_masked
    return value, False


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, Mapping) for v in value)
    )


def flatten(document: Mapping[str, Any], prefix: str = "") -> Iterator[ConfigEntry]:
    """
    Every leaf of a TOML document, in document order, secrets masked.
    """
    for name, value in document.items():
        key = f"{prefix}.{_key(name)}" if prefix else _key(name)
        if isinstance(value, Mapping) and not secret_key(name):
            yield from flatten(value, key)
        elif _is_table_array(value) and not secret_key(name):
            for index, table in enumerate(value):
                yield from flatten(table, f"{key}[{index}]")
        elif secret_key(name):
            yield ConfigEntry(key, MASK, True)
        else:
            shown, masked = _masked(name, value)
            yield ConfigEntry(key, toml_value(shown), masked)


def configuration_view(
    document: Mapping[str, Any],
    version: str,
    path: str,
    restart_keys: tuple[str, ...] = (),
) -> ConfigurationView:
    """
    The view of a loaded configuration document.
    """
    return ConfigurationView(version, path, tuple(flatten(document)), restart_keys)
