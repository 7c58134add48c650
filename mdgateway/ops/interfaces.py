# -*- test-case-name: tests.test_admin -*-
"""
What an operator can ask of a running gateway, as one interface.

The admin HTTP API and the CLI speak to an L{IOperations}; the gateway
service implements it over its spool, pipeline, store and configuration.
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import Attribute, Interface


class OperationError(Exception):
    """
    The operation cannot be done; C{status} is the HTTP status to answer
    (404 unknown id, 409 wrong state, 400 bad input).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@attrs.frozen
class QueueRecipient:
    address: str
    status: str
    rule: str | None
    last_reply: str = ""


@attrs.frozen
class QueueEntry:
    """
    One message in the spool, for the queue view.

    @ivar worker: the process whose spool holds it (0: the primary; see
        L{mdgateway.run.supervisor}).
    """

    queue_id: str
    received_at: float
    sender: str
    size: int
    recipients: tuple[QueueRecipient, ...]
    attempts: int
    next_attempt: float | None
    last_error: str
    generated: str | None = None
    worker: int = 0


@attrs.frozen
class Readiness:
    """
    Whether a load balancer should send this instance new connections.

    @ivar checks: what this instance alone can fix, by name; all must pass.
    @ivar dependencies: the shared services (C{core}, C{relay}, C{store})
        and their state: reported, never a reason to be unready.
    """

    ready: bool
    checks: dict[str, bool]
    reasons: tuple[str, ...] = ()
    dependencies: dict[str, Any] = attrs.field(factory=dict)


class IOperations(Interface):
    """
    The running gateway, as operators see it.
    """

    store = Attribute("The IStore with history, refusals and quarantine.")
    metrics = Attribute("The Metrics object (prometheus-client registry).")

    def queue() -> Any:  # noqa: N805
        """
        @return: a Deferred firing with a list of L{QueueEntry}, oldest first.
        """

    def retry_now(queue_id: str) -> Any:  # noqa: N805
        """
        Try a queued message now. @raise OperationError: 404 unknown id.
        """

    def release(item_id: str, by: str) -> Any:  # noqa: N805
        """
        Deliver a quarantined original (with
        C{X-Metadefender-EmailSecurity-OriginalCopy: True}) through its
        rule's relay; fires with the new queue id.
        """

    def rescan(item_id: str, by: str) -> Any:  # noqa: N805
        """
        Process a quarantined original again with today's Core, under the
        rule it was first handled by (even if disabled since); fires with
        the new queue id.
        """

    def forward(item_id: str, addresses: list[str], by: str) -> Any:  # noqa: N805
        """
        Send a quarantined original to other addresses; fires with the new
        queue id.
        """

    def reload() -> tuple[bool, list[str]]:  # noqa: N805
        """
        Reload the configuration file: C{(loaded, problems)}.
        """

    def readiness() -> Any:  # noqa: N805
        """
        A L{Readiness} (or a L{Deferred} firing with one): listening, spool
        writable, not draining; Core, relays and the store as details.
        """
