# -*- test-case-name: tests.test_e2e_reload -*-
"""
Which settings a configuration reload changes, and which of them keep
their old value until a restart.
"""

from __future__ import annotations

from typing import Any

import attrs

from mdgateway.config import GatewayConfig

#: The settings a reload leaves as they are until a restart (dotted keys
#: of the configuration); everything else a reload applies at once.
RESTART_KEYS = (
    "listeners",
    "spool.directory",
    "spool.threads",
    "spool.min_free",
    "store.location",
    "store.instance",
    "admin.endpoint",
    "admin.tls",
    "delivery.concurrency",
    "delivery.big_message",
    "delivery.big_concurrency",
    "delivery.loop_secret_file",
    "emulator",
    "workers",
    "umask",
)

#: The sections whose settings are compared one by one for the reload
#: answer; other top-level keys count as one setting each.
_SECTIONS = ("tls", "limits", "spool", "delivery", "store", "admin")


def _get(config: Any, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def needs_restart(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RESTART_KEYS)


def changed_keys(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """
    The settings (dotted keys) that differ between two configurations.
    """
    changed: list[str] = []
    for field in attrs.fields(GatewayConfig):
        name = field.name
        if name in ("version", "path") or not field.eq:
            # Where it came from, and what only describes it (the document
            # as loaded), are not settings.
            continue
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if name in _SECTIONS:
            changed.extend(
                f"{name}.{inner.name}"
                for inner in attrs.fields(type(before))
                if getattr(before, inner.name) != getattr(after, inner.name)
            )
        else:
            changed.append(name)
    return changed


def keep(new: GatewayConfig, old: GatewayConfig, keys: tuple[str, ...]) -> Any:
    """
    C{new} with the settings named by C{keys} as they are in C{old}.
    """
    top: dict[str, Any] = {}
    for key in keys:
        section, _, inner = key.partition(".")
        if not inner:
            top[section] = getattr(old, section)
            continue
        current = top.get(section, getattr(new, section))
        top[section] = attrs.evolve(current, **{inner: _get(old, key)})
    return attrs.evolve(new, **top)
