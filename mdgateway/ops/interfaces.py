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
class ActionResult:
    """
    What a quarantine action (release, rescan, forward) did.

    @ivar queue_id: the spool entry the original was queued as.
    @ivar replayed: the request repeated an earlier one with the same
        idempotency key: nothing was done again, this is the first one's
        answer.
    """

    queue_id: str
    replayed: bool = False

    def __str__(self) -> str:
        # Callers that only want the queue id can format the result.
        return self.queue_id


@attrs.frozen
class ReloadResult:
    """
    What a configuration reload did.

    @ivar loaded: the file was valid and is in force now.
    @ivar problems: why it was not (one line per problem, naming its key).
    @ivar applied: the settings that changed and apply now (dotted keys).
    @ivar restart_required: the settings that changed but keep their old
        value until the gateway restarts.
    """

    loaded: bool
    problems: tuple[str, ...] = ()
    applied: tuple[str, ...] = ()
    restart_required: tuple[str, ...] = ()


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
    #: What else an operator or a probe may want to see (the outbox).
    details: dict[str, Any] = attrs.field(factory=dict)
    #: The shared services (Core, relays, store), reported, not judged.
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

    def release(  # noqa: N805
        item_id: str,
        by: str,
        force: bool = False,
        key: str | None = None,
        origin: str = "",
    ) -> Any:
        """
        Deliver a quarantined original (with
        C{X-Metadefender-EmailSecurity-OriginalCopy: True}) through its
        rule's relay; fires with an L{ActionResult}.

        Done at most once per item: a repeat is refused (409) unless
        C{force}; a retry with the same idempotency C{key} gets the first
        answer again and delivers nothing. An original Core blocked
        (infected) is released only with C{force}. Every attempt is in the
        audit, under C{by} (the operator's token name) and C{origin} (where
        the request came from).
        """

    def rescan(  # noqa: N805
        item_id: str,
        by: str,
        force: bool = False,
        key: str | None = None,
        origin: str = "",
    ) -> Any:
        """
        Process a quarantined original again with today's Core, under the
        rule it was first handled by (even if disabled since); fires with
        an L{ActionResult}. At most once per item as L{release}.
        """

    def forward(  # noqa: N805
        item_id: str,
        addresses: list[str],
        by: str,
        force: bool = False,
        key: str | None = None,
        origin: str = "",
    ) -> Any:
        """
        Send a quarantined original to other addresses; fires with an
        L{ActionResult}. At most once per item and set of addresses, and a
        blocked original only with C{force}, as L{release}.
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
        process's spool, readiness and the configuration's version: a
        Deferred firing with a L{mdgateway.ops.overview.GatewayStatus}.
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

    def reload() -> ReloadResult:  # noqa: N805
        """
        Reload the configuration file; say what applies now, what needs a
        restart, or every problem that kept it from loading.
        """

    def readiness() -> Any:  # noqa: N805
        """
        A L{Readiness} (or a L{Deferred} firing with one): listening, spool
        writable, not draining; Core, relays and the store as details.
        """
