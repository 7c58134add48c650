# -*- test-case-name: tests.test_processing -*-
"""
Where the queue manager reports what it did with each copy: the seam
(L{IHistory}), and the histories that only log or report to several.
The store's history is L{mdgateway.queue.report.StoreHistory}.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.logger import Logger
from zope.interface import Interface, implementer

from mdgateway.policy.rules import Rule
from mdgateway.queue.copies import CopyOutcome, Delivery
from mdgateway.queue.entry import SpoolEntry
from mdgateway.relay.delivery import RecipientOutcome
from mdgateway.store.interfaces import MessageStatus

log = Logger()


class IHistory(Interface):
    """
    Where the pipeline reports what it did: the store's email history, or
    just the log. Every method is a coroutine; recording failures are the
    history's own business and never stop delivery.
    """

    async def received(entry: SpoolEntry, rule: Rule, copy_id: str) -> None:  # noqa: N805
        """
        A copy is being processed for the first time or again.
        """

    async def copy_processed(
        entry: SpoolEntry,  # noqa: N805
        rule: Rule,
        copy_id: str,
        outcome: CopyOutcome,
    ) -> None:
        """
        A copy was scanned and acted on.
        """

    async def delivered(
        entry: SpoolEntry,  # noqa: N805
        rule: Rule,
        copy_id: str,
        delivery: Delivery,
        outcomes: list[RecipientOutcome],
    ) -> None:
        """
        A delivery attempt ended with these per-recipient outcomes.
        """

    async def quarantine(
        entry: SpoolEntry,  # noqa: N805
        rule: Rule,
        copy_id: str,
        reason: str,
    ) -> None:
        """
        Keep the original of the entry (before the spool entry goes).
        """

    async def status(
        entry: SpoolEntry,  # noqa: N805
        copy_id: str,
        status: MessageStatus,
        text: str,
    ) -> None:
        """
        The copy's status changed.
        """


@implementer(IHistory)
class LogHistory:
    """
    History as structured log events only: one decision line per copy.

    @param config_version: the version of the configuration in force, for
        the decision line.
    """

    def __init__(self, config_version: Callable[[], str] = str) -> None:
        self._config_version = config_version

    async def received(self, entry: SpoolEntry, rule: Rule, copy_id: str) -> None:
        log.debug("{message_id} processing", message_id=copy_id, rule=rule.name)

    async def copy_processed(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, outcome: CopyOutcome
    ) -> None:
        log.info(
            "{message_id} rule {rule}: {verdict}, {action}",
            message_id=copy_id,
            queue_id=entry.queue_id,
            rule=rule.name,
            direction=rule.direction,
            verdict=outcome.result,
            action=outcome.decision.value,
            config_version=self._config_version(),
            actions=list(outcome.actions),
            parts=[attrs.asdict(p) for p in outcome.parts],
        )

    async def delivered(
        self,
        entry: SpoolEntry,
        rule: Rule,
        copy_id: str,
        delivery: Delivery,
        outcomes: list[RecipientOutcome],
    ) -> None:
        # One line per relay attempt, not one per recipient: a message to
        # fifty recipients of one domain is one event, with each
        # recipient's outcome in its fields.
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.status.value] = counts.get(o.status.value, 0) + 1
        log.info(
            "{message_id} relayed ({kind}): {summary}; {reply}",
            message_id=copy_id,
            kind=delivery.kind,
            summary=", ".join(f"{n} {status}" for status, n in counts.items()),
            reply=outcomes[0].reply if outcomes else "",
            recipients=[
                {
                    "recipient": o.address,
                    "status": o.status.value,
                    "reply": o.reply,
                    "server": o.server,
                    "upstream_id": o.queue_id,
                }
                for o in outcomes
            ],
        )

    async def quarantine(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, reason: str
    ) -> None:
        log.info(
            "{message_id}: original quarantined ({reason})",
            message_id=copy_id,
            reason=reason,
        )

    async def status(
        self, entry: SpoolEntry, copy_id: str, status: MessageStatus, text: str
    ) -> None:
        # A delivered copy's relay line already says so; other endings
        # (failed, blocked, expired...) are news.
        emit = log.debug if status is MessageStatus.DELIVERED else log.info
        emit(
            "{message_id} {status}: {text}",
            message_id=copy_id,
            status=status.value,
            text=text,
        )


@implementer(IHistory)
class TeeHistory:
    """
    Report to several histories in turn (the store and the log).
    """

    def __init__(self, *histories: IHistory) -> None:
        self.histories = histories

    async def received(self, entry: SpoolEntry, rule: Rule, copy_id: str) -> None:
        for history in self.histories:
            await history.received(entry, rule, copy_id)

    async def copy_processed(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, outcome: CopyOutcome
    ) -> None:
        for history in self.histories:
            await history.copy_processed(entry, rule, copy_id, outcome)

    async def delivered(
        self,
        entry: SpoolEntry,
        rule: Rule,
        copy_id: str,
        delivery: Delivery,
        outcomes: list[RecipientOutcome],
    ) -> None:
        for history in self.histories:
            await history.delivered(entry, rule, copy_id, delivery, outcomes)

    async def quarantine(
        self, entry: SpoolEntry, rule: Rule, copy_id: str, reason: str
    ) -> None:
        for history in self.histories:
            await history.quarantine(entry, rule, copy_id, reason)

    async def status(
        self, entry: SpoolEntry, copy_id: str, status: MessageStatus, text: str
    ) -> None:
        for history in self.histories:
            await history.status(entry, copy_id, status, text)
