# -*- test-case-name: tests.test_config -*-
"""
Typed reading of one TOML table, collecting every problem with its key path.

The config loader walks the parsed TOML with a L{Section} per table. Each
getter returns a usable value (the default when the key is wrong) and records
C{"<path>: <what is wrong>"} in a shared L{Problems} list, so one pass over a
bad file reports every mistake at once instead of stopping at the first.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import attrs

T = TypeVar("T")

_MISSING: Any = object()


class ConfigError(Exception):
    """
    The configuration is invalid; C{problems} holds one line per mistake.
    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@attrs.define
class Problems:
    """
    An ordered list of C{"path: message"} lines found while reading config.
    """

    lines: list[str] = attrs.Factory(list)

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(self.lines)


def _type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(text: str) -> int | None:
    """
    Parse C{"25MiB"}, C{"10k"}, C{"512"} into bytes; L{None} when malformed.
    """
    match = _SIZE.match(text)
    if match is None:
        return None
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _SIZE_UNITS[unit]


def parse_duration(text: str) -> float | None:
    """
    Parse C{"300s"}, C{"5m"}, C{"1.5h"}, C{"250ms"} into seconds.
    """
    match = _DURATION.match(text)
    if match is None:
        return None
    return float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "").lower()]


@attrs.define
class Section:
    """
    One TOML table being read, with the key path used in problem lines.
    """

    data: Mapping[str, Any]
    path: str
    problems: Problems
    _seen: set[str] = attrs.field(factory=set, init=False)

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _raw(self, key: str) -> Any:
        self._seen.add(key)
        return self.data.get(key, _MISSING)

    def has(self, key: str) -> bool:
        return key in self.data

    def _typed(
        self, key: str, kinds: tuple[type, ...], default: Any, required: bool
    ) -> Any:
        value = self._raw(key)
        if value is _MISSING:
            if required:
                self.problems.add(self._key(key), "is required")
            return default
        if isinstance(value, bool) and bool not in kinds:
            self.problems.add(
                self._key(key), f"expected {_type_name(kinds[0]())}, got a boolean"
            )
            return default
        if not isinstance(value, kinds):
            self.problems.add(
                self._key(key),
                f"expected {_type_name(kinds[0]())}, got {_type_name(value)}",
            )
            return default
        return value

    def string(self, key: str, default: Any = None, required: bool = False) -> Any:
        return self._typed(key, (str,), default, required)

    def boolean(self, key: str, default: bool) -> bool:
        result: bool = self._typed(key, (bool,), default, False)
        return result

    def integer(
        self,
        key: str,
        default: int,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value: int = self._typed(key, (int,), default, False)
        return self._bounded(key, value, default, minimum, maximum)

    def _bounded(self, key: str, value: T, default: T, minimum: Any, maximum: Any) -> T:
        if minimum is not None and value < minimum:
            self.problems.add(self._key(key), f"must be at least {minimum}")
            return default
        if maximum is not None and value > maximum:
            self.problems.add(self._key(key), f"must be at most {maximum}")
            return default
        return value

    def size(self, key: str, default: int, minimum: int = 0) -> int:
        """
        A byte count: an integer or a string such as C{"25MiB"}.
        """
        value = self._typed(key, (int, str), default, False)
        if isinstance(value, str):
            parsed = parse_size(value)
            if parsed is None:
                self.problems.add(self._key(key), f"not a size: {value!r}")
                return default
            value = parsed
        bounded: int = self._bounded(key, value, default, minimum, None)
        return bounded

    def duration(self, key: str, default: float, minimum: float = 0.0) -> float:
        """
        Seconds: a number or a string such as C{"5m"} or C{"250ms"}.
        """
        value = self._typed(key, (int, float, str), default, False)
        if isinstance(value, str):
            parsed = parse_duration(value)
            if parsed is None:
                self.problems.add(self._key(key), f"not a duration: {value!r}")
                return default
            value = parsed
        return self._bounded(key, float(value), default, minimum, None)

    def choice(
        self, key: str, choices: Iterable[str], default: str, what: str = "value"
    ) -> str:
        options = tuple(choices)
        value: str = self._typed(key, (str,), default, False)
        if value not in options:
            self.problems.add(
                self._key(key),
                f'unknown {what} "{value}" (choose from {", ".join(options)})',
            )
            return default
        return value

    def strings(self, key: str, default: Iterable[str] = ()) -> tuple[str, ...]:
        value = self._typed(key, (list,), list(default), False)
        result = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.problems.add(
                    f"{self._key(key)}[{index}]",
                    f"expected a string, got {_type_name(item)}",
                )
            else:
                result.append(item)
        return tuple(result)

    def networks(
        self, key: str, default: Iterable[str] = ()
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """
        A list of CIDR networks (a bare address means a single host).
        """
        result = []
        for index, text in enumerate(self.strings(key, default)):
            try:
                result.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                self.problems.add(
                    f"{self._key(key)}[{index}]", f"not an IP network: {text!r}"
                )
        return tuple(result)

    def table(self, key: str) -> Section:
        value = self._typed(key, (dict,), {}, False)
        return Section(value, self._key(key), self.problems)

    def tables(self, key: str) -> list[Section]:
        """
        An array of tables (C{[[key]]} in TOML), each with an indexed path.
        """
        value = self._typed(key, (list,), [], False)
        sections = []
        for index, item in enumerate(value):
            path = f"{self._key(key)}[{index}]"
            if not isinstance(item, dict):
                self.problems.add(path, f"expected a table, got {_type_name(item)}")
                continue
            sections.append(Section(item, path, self.problems))
        return sections

    def named_tables(self, key: str) -> dict[str, Section]:
        """
        A table of tables keyed by name (C{[key.NAME]} in TOML).
        """
        value = self._typed(key, (dict,), {}, False)
        sections = {}
        for name, item in value.items():
            path = f"{self._key(key)}.{name}"
            if not isinstance(item, dict):
                self.problems.add(path, f"expected a table, got {_type_name(item)}")
                continue
            sections[name] = Section(item, path, self.problems)
        return sections

    def check(self, key: str, ok: bool, message: str) -> None:
        """
        Record C{message} against C{key} unless C{ok}.
        """
        if not ok:
            self.problems.add(self._key(key), message)

    def convert(
        self, key: str, value: str, convert: Callable[[str], T], what: str
    ) -> T | None:
        """
        Apply C{convert} to C{value}, recording C{what} if it raises.
        """
        try:
            return convert(value)
        except (ValueError, TypeError) as e:
            self.problems.add(self._key(key), f"{what}: {e}")
            return None

    def finish(self) -> None:
        """
        Report keys this section does not know, so typos never pass silently.
        """
        for key in self.data:
            if key not in self._seen:
                self.problems.add(self._key(key), "unknown key")
