# -*- test-case-name: tests.test_processing -*-
"""
What one message copy is, and what processing decided about it: the job,
the deliveries, the per-part reports and the outcome, and what the copy's
processed marker vouches for.

These values travel from L{mdgateway.queue.processing} (which makes them)
to the queue manager (which delivers, records and keeps them, see
L{mdgateway.queue.scanned}).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs
from zope.interface import Interface

from mdgateway.message.marker import MARKER_HEADER, MarkerCheck, Stamp, actions_code
from mdgateway.policy.rules import Rule


class Decision(enum.Enum):
    """
    What happens to the copy.
    """

    #: Deliver C{CopyOutcome.deliveries}.
    DELIVER = "deliver"
    #: Deliver nothing (blocked); deliveries may hold a notification.
    BLOCK = "block"
    #: Try the whole copy again later (an error the rule retries).
    RETRY = "retry"
    #: Give up: the recipients get a bounce (an error the rule fails).
    FAIL = "fail"


@attrs.frozen
class Delivery:
    """
    One message to relay: C{prefix} bytes, then the file from C{offset}.
    """

    path: str
    prefix: bytes = b""
    offset: int = 0
    #: What the delivery is, for history: C{message}, C{original copy},
    #: C{notification}.
    kind: str = "message"


@attrs.frozen
class PartReport:
    """
    One scanned part, for history and logs.
    """

    part_id: str
    filename: str
    content_type: str
    size: int
    result: str
    blocked_reason: str = ""
    sanitized: bool = False
    data_id: str = ""
    core_url: str = ""
    dlp_hits: int = 0
    action: str = "allowed"
    error: str = ""
    #: Where a verdict that is not a new scan came from (L{Verdict.cache}).
    cache: str = ""


@attrs.frozen
class CopyOutcome:
    """
    What processing decided about one message copy.

    @ivar result: the value of C{X-Metadefender-Core-Result}: C{Allowed},
        C{Blocked/<reason>}, C{Bypassed/<condition>}...
    @ivar quarantine: a reason to keep the original in quarantine, or
        L{None}.
    @ivar condition: the error condition behind L{Decision.RETRY},
        L{Decision.FAIL} or a bypass.
    """

    decision: Decision
    result: str
    deliveries: tuple[Delivery, ...] = ()
    sanitized: bool = False
    parts: tuple[PartReport, ...] = ()
    actions: tuple[str, ...] = ()
    quarantine: str | None = None
    condition: str | None = None
    detail: str = ""


def rule_stamp(rule: Rule, result: str, sanitized: bool = False) -> Stamp:
    """
    What a marker on a copy processed under C{rule} vouches for.
    """
    profile = rule.core_profile
    return Stamp(
        rule=rule.name,
        profile=f"{profile.name}/{profile.rule}",
        actions=actions_code(
            rule.blocked_action, rule.apply_sanitized, rule.modify_smime
        ),
        result=result,
        sanitized=sanitized,
    )


@attrs.frozen
class CopyJob:
    """
    One copy to process.

    @ivar message_path: the spooled message (our Received header first).
    @ivar workdir: an empty folder for decoded parts and rebuilt files;
        the caller removes it when the copy is done.
    @ivar security_id: the copy's id in logs, notifications and history;
        without C{marker} also the value of C{X-MD-Email-Security-Id}.
    @ivar marker: makes the loop-marker value for a content digest (see
        L{mdgateway.message.digest}) and a L{Stamp}, so the marker is bound
        to the exact content delivered, the rule and the result.
    """

    message_path: str
    workdir: str
    rule: Rule
    security_id: str
    sender: str
    recipients: tuple[str, ...]
    marker: Callable[[bytes, Stamp], str] | None = None
    #: The Core server that gave the verdicts (it may be a failover server).
    core_url: str | None = None
    #: The spooled message's size (L{None}: unknown), which decides where
    #: its file work runs (L{mdgateway.queue.blocking}).
    size: int | None = None

    def marker_field(
        self, digest: bytes | None, result: str, sanitized: bool = False
    ) -> tuple[str, str]:
        """
        The C{X-MD-Email-Security-Id} field for a message with this
        content digest, delivered with this result.

        Without a digest (a header block too large to bind) the marker is
        made over no content and can never be valid.
        """
        stamp = rule_stamp(self.rule, result, sanitized)
        value = (
            self.marker(digest or b"", stamp)
            if self.marker is not None
            else self.security_id
        )
        return (MARKER_HEADER, value)


class ICopyProcessor(Interface):
    """
    What the queue manager asks of message processing for one copy: scan
    and act, or pass on a message the gateway made or already processed.
    L{mdgateway.queue.processing.CopyProcessor} is the real one.
    """

    async def process(job: CopyJob) -> CopyOutcome:
        """
        Decompose, scan every part with the rule's Core profile, act on the
        verdicts, and rebuild and stamp what is delivered.
        """

    async def generated(job: CopyJob) -> CopyOutcome:
        """
        A message the gateway made itself (a bounce, a released original):
        delivered unscanned, stamped.
        """

    async def relay_once(job: CopyJob, check: MarkerCheck) -> CopyOutcome:
        """
        A message this cluster processed before, under a rule at least as
        strict: relayed once more without a scan, as C{check} vouches.
        """
