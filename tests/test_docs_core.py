"""
The Core documentation agrees with the code on every default it states:
the C{[profiles.core.NAME]} table of C{docs/policy.md} and the emulator keys
of C{docs/configuration.md} against what the configuration loader actually
gives for an empty section, the emulator's option table in C{docs/core.md}
against the plugin's options, and the client's timing figures quoted in
C{docs/core.md} against the client's and runtime's defaults. A change on
either side that the other does not follow fails here.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mdgateway.config import parse_config
from mdgateway.emulator.config import DEFAULT_SANITIZE_TYPES
from mdgateway.emulator.tap import Options
from mdgateway.scan.client import CoreClient
from mdgateway.scan.runtime import MAX_RETRY_AFTER, CoreRuntime
from mdgateway.tomlreader import parse_duration, parse_size

DOCS = Path(__file__).resolve().parent.parent / "docs"

_CONFIG = """
sender_helo_domain = "gw.test"
[[listeners]]
name = "smtp"
endpoint = "tcp:10025:interface=127.0.0.1"
[spool]
directory = "spool"
[profiles.core.plain]
servers = ["http://127.0.0.1:8008"]
[profiles.smtp.out]
servers = ["smtp://127.0.0.1:2525"]
[[rules]]
name = "r"
client_networks = ["127.0.0.0/8"]
core_profile = "plain"
relay_profile = "out"
"""


def _loaded() -> Any:
    return parse_config(tomllib.loads(_CONFIG), base=DOCS, check_files=False)


def _table(path: Path, heading: str) -> dict[str, list[str]]:
    """
    The rows of the first table after C{heading}: first cell (without
    backquotes) -> the other cells.
    """
    text = path.read_text()
    start = text.index(heading)
    rows: dict[str, list[str]] = {}
    in_table = False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            in_table = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set(cells[0]) <= {"-", " "} or cells[0] in ("key", "option"):
                continue
            rows[cells[0].strip("`")] = cells[1:]
        elif in_table:
            break
    return rows


def _value(cell: str) -> Any:
    """
    A documented default as a value: durations and sizes as seconds,
    numbers, booleans, words.
    """
    cell = cell.strip("`")
    if cell in ("true", "false"):
        return cell == "true"
    if re.fullmatch(r"-?\d+", cell):
        return int(cell)
    if re.fullmatch(r"-?\d+\.\d+", cell):
        return float(cell)
    if re.fullmatch(r"\d+[KMG]iB", cell):
        return parse_size(cell)
    duration = parse_duration(cell)
    if duration is not None and re.search(r"[a-z]$", cell):
        return duration
    return cell


_PROFILE_KEYS = (
    "strategy",
    "rule",
    "user_agent",
    "poll_interval",
    "scan_timeout",
    "concurrency",
    "hash_lookup",
    "failure_threshold",
    "retry_after",
    "submit",
    "verdict_cache",
    "verdict_cache_size",
    "big_part",
    "big_concurrency",
)


@pytest.mark.parametrize("key", _PROFILE_KEYS)
def test_core_profile_defaults(key: str) -> None:
    """
    Each default in the Core profile table of policy.md is what the loader
    gives a profile that does not set the key.
    """
    rows = _table(DOCS / "policy.md", "### MetaDefender Core profiles")
    documented = _value(rows[key][0])
    profile = _loaded().policy.core_profiles["plain"]
    assert documented == getattr(profile, key), (key, rows[key][0])


def test_core_profile_table_complete() -> None:
    """
    The table lists every key a Core profile takes (and no other).
    """
    rows = _table(DOCS / "policy.md", "### MetaDefender Core profiles")
    assert set(rows) == {*_PROFILE_KEYS, "servers", "ca_file"}


def test_emulator_keys() -> None:
    """
    The C{[emulator]} row of configuration.md gives the loader's defaults.
    """
    rows = _table(DOCS / "configuration.md", "| key | default | meaning |")
    row = next(v for k, v in rows.items() if k.startswith("emulator.enabled"))
    enabled, endpoint, latency = (c.strip().strip("`") for c in row[0].split(","))
    settings = _loaded().emulator
    assert (_value(enabled), endpoint, _value(latency)) == (
        settings.enabled,
        settings.endpoint,
        settings.latency,
    )
    assert _value(rows["emulator.instant"][0]) is settings.instant is False


def test_emulator_options() -> None:
    """
    Every option of the emulator plugin is in core.md's option table with
    its real default, and the table has no option the plugin lacks.
    """
    rows = _table(DOCS / "core.md", "Options:")
    documented: dict[str, str] = {}
    for names, cells in rows.items():
        options = [n.strip().strip("`").lstrip("-") for n in names.split(",")]
        defaults = [d.strip() for d in cells[0].split(",")]
        if len(options) == 1:
            defaults = [cells[0]]
        elif len(defaults) != len(options):
            defaults = defaults[:1] * len(options)
        documented.update(zip(options, defaults, strict=True))
    parameters: dict[str, object] = {}
    for row in Options.optParameters:
        assert isinstance(row, list), row
        parameters[row[0]] = row[2]
    flags = set()
    for row in Options.optFlags:
        assert isinstance(row, list), row
        flags.add(row[0])
    assert set(documented) == set(parameters) | flags
    for name in flags:
        assert documented[name] == "off", name
    for name, default in parameters.items():
        cell = documented[name].strip("`")
        if default is None:
            assert cell in ("none", "random", "a temporary folder"), name
        elif name == "sanitize-types":
            assert set(cell.split(",")) == DEFAULT_SANITIZE_TYPES
        else:
            assert _value(cell) == default, (name, cell, default)


def _default(function: Any, name: str) -> Any:
    return inspect.signature(function).parameters[name].default


def test_client_figures() -> None:
    """
    The figures core.md quotes for polling, busy servers and lost results
    are the client's and runtime's defaults.
    """
    text = (DOCS / "core.md").read_text()
    profile = _loaded().policy.core_profiles["plain"]
    assert f"(default {profile.poll_interval * 1000:g} ms)" in text
    assert f"then {_default(CoreClient, 'poll_backoff'):g} times longer" in text
    assert (
        f"up to {_default(CoreClient, 'max_poll_interval'):g} seconds between" in text
    )
    backoff = _default(CoreRuntime, "busy_backoff")
    assert f"no new work for {backoff:g} seconds" in text
    assert f"1 second to {MAX_RETRY_AFTER / 60:g} minutes" in text
    assert _default(CoreClient, "max_resubmissions") == 2
    assert "uploaded\nagain, at most twice" in text
