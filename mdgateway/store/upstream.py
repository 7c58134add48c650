# -*- test-case-name: tests.test_store -*-
"""
The relay's own id for a message, read from its 2xx reply to DATA.

Logging it ties our history to the next hop's logs (the correlation chain
SMTP session, Core C{data_id}, upstream queue id). Servers word the reply
differently; these are the common shapes.
"""

from __future__ import annotations

import re

_PATTERNS = (
    # Postfix, Haraka, aiosmtpd, mdgateway: "Ok: queued as 4Xk9Bz1abc"
    re.compile(r"\bqueued as\s+<?([^\s<>]+?)>?(?:[\s;,]|$)", re.IGNORECASE),
    # Exim: "OK id=1rXabc-000Abc-12"
    re.compile(r"\bid=([^\s;,]+)", re.IGNORECASE),
    # Exchange / Microsoft 365: "<msgid> [InternalId=123, Hostname=...]"
    re.compile(r"\bInternalId=([^\s;,\]]+)"),
    # Sendmail: "2.0.0 4A1B2C3D Message accepted for delivery"
    re.compile(r"([^\s]+)\s+Message accepted for delivery", re.IGNORECASE),
)


_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def parse_upstream_queue_id(text: str) -> str | None:
    """
    The queue id in a relay's reply text, or C{None} if none is recognized.
    """
    for pattern in _PATTERNS:
        match = pattern.search(text)
        if match and not _ENHANCED.fullmatch(match.group(1)):
            return match.group(1)
    return None
