# -*- test-case-name: tests.test_core_client -*-
"""
The error conditions a MetaDefender Core call can end in.

Security rules choose what to do per condition (retry, fail, bypass), so
every failure the client reports is a L{CoreError} carrying one
L{Condition}, never a raw HTTP or socket exception.
"""

from __future__ import annotations

import enum
import json
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mdgateway.scan.verdict import Verdict


class Condition(enum.Enum):
    """
    The product's error conditions, plus C{access_denied}.

    C{access_denied} is a configuration error (wrong API key, rule not
    allowed for the user agent); callers treat it as retry-later, and the
    client logs it loudly.
    """

    UNREACHABLE = "unreachable"
    BUSY = "busy"
    SCAN_TIMEOUT = "scan_timeout"
    PROCESSING_FAILED = "processing_failed"
    NOT_SCANNED = "not_scanned"
    ACCESS_DENIED = "access_denied"


class CoreError(Exception):
    """
    A Core call failed with a L{Condition}.

    @ivar condition: what the security rule acts on.
    @ivar message: human-readable detail (never contains the API key).
    @ivar server: base URL of the server involved, or C{None} for a
        profile-level failure.
    @ivar status: HTTP status when the failure was an HTTP answer.
    @ivar server_fault: C{True} when the server (not the file) is at fault,
        so another server may succeed and the failure counts against this
        server's health.
    @ivar verdict: the parsed result when the failure is a result (for
        example C{Not Scanned}), else C{None}.
    @ivar retry_after: seconds a busy server asked us to wait
        (C{Retry-After}), if it said.
    """

    def __init__(
        self,
        condition: Condition,
        message: str,
        *,
        server: str | None = None,
        status: int | None = None,
        server_fault: bool = False,
        verdict: Verdict | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(condition, message)
        self.condition = condition
        self.message = message
        self.server = server
        self.status = status
        self.server_fault = server_fault
        self.verdict = verdict
        self.retry_after = retry_after

    @property
    def retry_elsewhere(self) -> bool:
        """
        Whether the same file should be tried on the profile's next server.
        """
        return self.server_fault or self.condition in (
            Condition.UNREACHABLE,
            Condition.BUSY,
            Condition.ACCESS_DENIED,
        )

    def __str__(self) -> str:
        where = f" ({self.server})" if self.server else ""
        status = f" HTTP {self.status}" if self.status is not None else ""
        return f"{self.condition.value}{where}{status}: {self.message}"


def error_message(body: bytes) -> str:
    """
    Extract the message of a Core error body.

    Core answers C{{"err": "..."}} almost everywhere, C{{"response": "..."}}
    on logout and C{{"<id>": "Not Found"}} for unknown ids; anything else is
    shown as (truncated) text.
    """
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace").strip()
    if isinstance(doc, dict):
        for key in ("err", "response"):
            value = doc.get(key)
            if isinstance(value, str):
                return value
        if len(doc) == 1:
            ((key, value),) = doc.items()
            return f"{key}: {value}"
    return body[:200].decode("utf-8", "replace").strip()


def parse_retry_after(value: str | None, now: float) -> float | None:
    """
    The seconds a C{Retry-After} header asks for (delta-seconds or an HTTP
    date), or C{None} when absent or unreadable.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


def error_for_response(
    status: int,
    body: bytes,
    *,
    server: str,
    what: str = "request",
    retry_after: float | None = None,
) -> CoreError:
    """
    Map a non-success HTTP answer to a L{CoreError}.

    Following the Core v4 reference: 503 (and a proxy's 429) and the
    "insufficient disk space" refusal are I{busy}; C{Access denied} on
    400/401/403/405 is a configuration error; 422 (empty file) is I{not
    scanned}; the size-limit 500 is I{processing failed}, the file's fault.
    Every other answer means the server is not working properly and is
    I{unreachable} (the server's fault): mail waits and retries rather than
    bounce because a Core server answers 500 or sits behind a wrong URL.

    @param what: what was being done, for the message (C{"upload"}, ...).
    @param retry_after: the answer's C{Retry-After}, in seconds, kept on a
        I{busy} error.
    """
    message = error_message(body)
    text = f"{what}: HTTP {status} {message}".rstrip()
    lowered = message.lower()
    if status in (503, 429) or (status == 400 and "disk space" in lowered):
        return CoreError(
            Condition.BUSY, text, server=server, status=status, retry_after=retry_after
        )
    if status in (400, 401, 403, 405) and ("access denied" in lowered or status == 401):
        return CoreError(
            Condition.ACCESS_DENIED,
            text,
            server=server,
            status=status,
            server_fault=True,
        )
    if status == 422:
        return CoreError(Condition.NOT_SCANNED, text, server=server, status=status)
    if status == 500 and "exceeded" in lowered:
        return CoreError(
            Condition.PROCESSING_FAILED, text, server=server, status=status
        )
    return CoreError(
        Condition.UNREACHABLE,
        text,
        server=server,
        status=status,
        server_fault=True,
    )
