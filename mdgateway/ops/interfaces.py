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

from mdgateway.message.view import MessagePart


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
    @ivar instance: the instance whose spool holds it (C{[store] instance}).
    @ivar held_by: the operator who put it on hold, if it is on hold.
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
    instance: str = ""
    held_by: str | None = None
    held_at: float | None = None


#: The queue actions an operator can take on one message (see
#: L{mdgateway.queue.tools}); C{flush} takes the whole queue.
QUEUE_ACTIONS = ("hold", "release-hold", "delete", "bounce", "retry")


@attrs.frozen
class QueueAction:
    """
    An operator's action on one queued message.

    @ivar action: one of L{QUEUE_ACTIONS}.
    @ivar by: the operator's name (a token's name, or C{console:NAME}).
    @ivar instance: the instance whose spool holds it; L{None}: wherever
        it is (this instance's processes first, then where the shared
        history says it was received).
    @ivar bounce: for a delete, send the sender a bounce.
    @ivar origin: where the request came from, for the audit.
    """

    action: str
    queue_id: str
    by: str
    instance: str | None = None
    bounce: bool = False
    origin: str = ""


@attrs.frozen
class QueueActionResult:
    """
    What a queue action did.

    @ivar changed: C{False} when it was so already (a second hold).
    @ivar later: the message is being attempted; the action applies when
        that attempt ends.
    @ivar process: the process whose spool holds it (0: the primary).
    """

    queue_id: str
    action: str
    instance: str
    process: int
    changed: bool
    detail: str
    later: bool = False


@attrs.frozen
class FlushResult:
    """
    What a flush did: per instance, how many messages are tried now (or
    why that instance could not be asked).
    """

    tried: dict[str, int]
    problems: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class InstanceQueue:
    """
    One instance's part of a cluster-wide queue listing.

    @ivar listed: its entries in the listing (at most a bounded number for
        another instance); C{total}: its entries in all.
    @ivar problem: why it could not be listed (not running, no answer).
    """

    name: str
    this: bool
    listed: int = 0
    total: int = 0
    problem: str | None = None


@attrs.frozen
class QueueListing:
    """
    The queue of every instance (or of the one asked for), oldest first.
    """

    entries: tuple[QueueEntry, ...]
    instances: tuple[InstanceQueue, ...]


#: One MIME entity of a queued message: the message view's own value, so the
#: content view crosses processes and instances without a copy of its shape.
QueuedPart = MessagePart


@attrs.frozen
class QueuedMessage:
    """
    A queued message opened for an operator's eyes (as C{postcat} shows
    one): its queue facts, its header block as sent and its MIME
    structure, each text part's start as text. Never rendered: a console
    shows it as escaped text.

    @ivar unreliable: why the MIME structure cannot be trusted (then no
        parts are listed), if it cannot.
    """

    entry: QueueEntry
    client_address: str
    client_helo: str
    headers: str
    headers_complete: bool
    parts: tuple[QueuedPart, ...]
    unreliable: str | None = None


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
        This instance's queue (every process's spool): a Deferred firing
        with a list of L{QueueEntry}, oldest first.
        """

    def cluster_queue(instance: str | None = None) -> Any:  # noqa: N805
        """
        The queue of every instance of the cluster, each entry naming its
        instance (or of C{instance} alone): a Deferred firing with a
        L{QueueListing}.
        """

    def queue_action(action: QueueAction) -> Any:  # noqa: N805
        """
        Hold, release the hold of, delete, bounce or retry one queued
        message, in whichever process of whichever instance holds it; a
        Deferred firing with a L{QueueActionResult}. Every attempt is in
        the audit under C{action.by}.

        @raise OperationError: 409 when the action does not apply (the
            message is gone, nothing is left to bounce, it is on hold for a
            retry); 503 when the process or instance holding it cannot be
            asked; 400 for an unknown action.
        """

    def flush(  # noqa: N805
        by: str, instance: str | None = None, origin: str = ""
    ) -> Any:
        """
        Try every queued message now (not those on hold), on every
        instance (or on C{instance}); a Deferred firing with a
        L{FlushResult}. Audited under C{by}.
        """

    def queued_message(queue_id: str, instance: str | None = None) -> Any:  # noqa: N805
        """
        A queued message's content view: a Deferred firing with a
        L{QueuedMessage}. @raise OperationError: 409 when it is gone.
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
