# -*- test-case-name: tests.test_cli -*-
"""
How the C{mdgateway} command shows answers: aligned tables with local
times and cut columns, fields, JSON; and how it reads time options.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from mdgateway.ops.cliclient import EXIT_USAGE, CliError

_RELATIVE = re.compile(r"^\d+(?:\.\d+)?[smhd]$")
_EPOCH = re.compile(r"^\d+(?:\.\d+)?$")


def local_time(value: str | None) -> str:
    """
    An API time (ISO-8601 UTC) as local ISO time to the second; C{-} for
    none.
    """
    if not value:
        return "-"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return value
    return when.astimezone().replace(tzinfo=None).isoformat(timespec="seconds")


def human_size(size: int | None) -> str:
    """
    C{1536} as C{1.5K}.
    """
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(size)  # pragma: no cover


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], widths: Sequence[int]
) -> str:
    """
    Rows aligned under their headers; a cell longer than its column's
    width is cut with C{...}. No trailing spaces.
    """
    cells = [
        [cut(" ".join(str(c).split()), w) for c, w in zip(row, widths, strict=True)]
        for row in rows
    ]
    sizes = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *cells]:
        padded = [c.ljust(sizes[i]) for i, c in enumerate(row)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(
        f"{k.ljust(width)}  {'-' if v in (None, '') else v}" for k, v in pairs
    )


def page_footer(data: Mapping[str, Any], what: str) -> str:
    shown, total = len(data["items"]), data["total"]
    line = f"{shown} of {total} {what}"
    if data.get("next_cursor"):
        line += f"; next page: --cursor {data['next_cursor']}"
    return line


def time_arg(text: str) -> str:
    """
    A time option as the API takes it: relative (C{2h}) and epoch seconds
    as given; an ISO time without offset is the local time zone's.
    """
    text = text.strip()
    if _RELATIVE.match(text) or _EPOCH.match(text):
        return text
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(
            f"not a time: {text!r} (ISO-8601, epoch seconds, or 30m/2h/7d ago)",
            EXIT_USAGE,
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.isoformat()


def times(args: argparse.Namespace) -> dict[str, str | None]:
    return {
        "since": time_arg(args.since) if args.since else None,
        "until": time_arg(args.until) if args.until else None,
    }


def print_json(data: object, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
