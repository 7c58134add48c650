# -*- test-case-name: tests.test_core_client -*-
"""
What a Core server's C{GET /version} says about the API it offers.

Only the synchronous submit matters so far: C{POST /file/sync} exists from
Core 4.21.0 on (and in every v5).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

#: The first Core version with C{POST /file/sync}.
SYNC_SINCE = (4, 21, 0)

_NUMBERS = re.compile(r"\d+(?:\.\d+)*")


def parse_version(text: str) -> tuple[int, ...] | None:
    """
    The leading dotted numbers of a version string (C{"4.21.1"} gives
    C{(4, 21, 1)}, C{"v5.6.1-beta"} gives C{(5, 6, 1)}), or C{None}.
    """
    match = _NUMBERS.search(text)
    if match is None:
        return None
    return tuple(int(n) for n in match.group(0).split("."))


def reported_version(body: bytes) -> str | None:
    """
    The C{version} of a C{GET /version} answer, or C{None} when the body
    is not such an answer.
    """
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, Mapping):
        return None
    version = doc.get("version")
    return version if isinstance(version, str) else None


def has_sync(version: str | None) -> bool:
    """
    Whether a server reporting C{version} offers C{POST /file/sync}; an
    unknown version is assumed not to.
    """
    numbers = parse_version(version) if version is not None else None
    return numbers is not None and numbers >= SYNC_SINCE
