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
    """

    ready: bool
    checks: dict[str, bool]
    reasons: tuple[str, ...] = ()


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

    def pin(item_id: str, pinned: bool, by: str) -> Any:  # noqa: N805
        """
        Exempt a quarantined original from cleanup, or stop exempting it;
        recorded in its history entry's timeline with C{by}.
        @raise OperationError: 404 unknown id.
        """

    def delete(item_id: str, by: str) -> Any:  # noqa: N805
        """
        Delete a quarantined original for good; recorded in its history
        entry's timeline with C{by}. @raise OperationError: 404 unknown id.
        """

    def status() -> Any:  # noqa: N805
        """
        This instance now: Core servers and relays with their health, each
        process's spool, readiness and the configuration's version (a
        L{mdgateway.ops.overview.GatewayStatus}).
        """

    def instances(since: float) -> Any:  # noqa: N805
        """
        The instances of the cluster (this one first, with its spools) and
        what the shared history shows of each since C{since}: a Deferred
        firing with L{mdgateway.ops.overview.InstanceStatus} values.
        """

    def configuration() -> Any:  # noqa: N805
        """
        The configuration in force with its secrets masked (a
        L{mdgateway.ops.configview.ConfigurationView}).
        """

    def reload() -> tuple[bool, list[str]]:  # noqa: N805
        """
        Reload the configuration file: C{(loaded, problems)}.
        """

    def readiness() -> Readiness:  # noqa: N805
        """
        Listeners up, spool writable, a healthy server in every Core and
        relay profile in use, not draining.
        """
