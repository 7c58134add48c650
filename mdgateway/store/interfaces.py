# -*- test-case-name: tests.test_store -*-
"""
The store seam: email history, the refused log and the quarantine.

One interface, L{IStore}, with two implementations (SQLite for one host,
PostgreSQL when several gateway instances share one history and one
quarantine). Callers hand it and get back the frozen values defined here, so
nothing above the store sees a row, a cursor or a dialect.

A history entry is one I{copy} of a spooled message: a message whose
recipients are bound to two security rules is scanned, acted on and
delivered twice, so it is two entries. Each copy has its own id, by
convention C{<queue_id>.<n>} (see L{copy_id}); C{n} numbers the rules in the
order they first appear among the envelope's recipients, which is fixed
once the message is spooled, so a pipeline that restarts after a crash
finds the same ids again.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, BinaryIO

import attrs
from zope.interface import Interface

# Searching lives in its own module; its names are re-exported here.
from mdgateway.store.search import MAX_PAGE as MAX_PAGE
from mdgateway.store.search import MessageFilter as MessageFilter
from mdgateway.store.search import Page as Page
from mdgateway.store.search import PageRequest as PageRequest
from mdgateway.store.search import PurgeCounts as PurgeCounts
from mdgateway.store.search import QuarantineFilter as QuarantineFilter
from mdgateway.store.search import RefusalFilter as RefusalFilter

if TYPE_CHECKING:
    from mdgateway.store.audit import AuditEntry, AuditFilter
    from mdgateway.store.owed import Applied, Owed

#: Where a quarantined original comes from: a file path, a binary stream
#: read from a pool thread, or bytes already in memory.
QuarantineSource = str | os.PathLike[str] | BinaryIO | bytes

#: Longest id the store accepts for a history entry.
MAX_ID_LENGTH = 200


def copy_id(queue_id: str, n: int) -> str:
    """
    The history id of copy C{n} (from 1) of spool entry C{queue_id}.
    """
    if n < 1:
        raise ValueError(f"copy numbers start at 1, not {n}")
    return f"{queue_id}.{n}"


# --------------------------------------------------------------------------
# Errors


class StoreError(Exception):
    """
    The database failed or refused; the driver's exception is the cause.
    """


class NotFoundError(StoreError, LookupError):
    """
    No history entry or quarantine item has that id.
    """


class SchemaVersionError(StoreError):
    """
    The database was migrated by a newer mdgateway than this one; opening
    it could corrupt what the newer version wrote.
    """


class CorruptOriginalError(StoreError):
    """
    A quarantined original read back with another size or digest than it
    was stored with.
    """


# --------------------------------------------------------------------------
# Vocabulary


class MessageStatus(enum.Enum):
    """
    The Status column of the email history.

    The product's exact list is undocumented; these are the words its
    documentation uses for a message's fate, plus the two intermediate
    states an operator needs to see mail that is still on its way.
    """

    #: Spooled and acknowledged with 250, not yet picked up.
    QUEUED = "queued"
    #: Being scanned or delivered right now.
    PROCESSING = "processing"
    #: Waiting to retry (Core unavailable, relay 4xx or down).
    DEFERRED = "deferred"
    #: Delivered to every recipient.
    DELIVERED = "delivered"
    #: Delivered to some recipients; the others bounced.
    PARTIALLY_DELIVERED = "partially delivered"
    #: Not delivered because of the verdict; the original was not kept.
    BLOCKED = "blocked"
    #: Not delivered because of the verdict; the original is in quarantine.
    QUARANTINED = "quarantined"
    #: Processing failed for good (retries exhausted or fail-immediately);
    #: the sender got a bounce.
    FAILED = "failed"
    #: The relay refused every recipient (5xx); the sender got a bounce.
    BOUNCED = "bounced"
    #: Delivered without a complete scan because error handling said so.
    BYPASSED = "bypassed"

    @property
    def final(self) -> bool:
        """
        Whether a message in this status is done with.
        """
        return self not in _PENDING


_PENDING = frozenset(
    {MessageStatus.QUEUED, MessageStatus.PROCESSING, MessageStatus.DEFERRED}
)


class ScanVerdict(enum.Enum):
    """
    The message-level scan verdict that the history's verdict filter uses.
    A message not scanned by Core (bypassed, internally generated) has
    none (C{None}, shown as N/A).
    """

    ALLOWED = "Allowed"
    BLOCKED = "Blocked"
    SANITIZED = "Sanitized"


class DeliveryStatus(enum.Enum):
    """
    Where one recipient of one copy stands.
    """

    #: Not yet tried.
    PENDING = "pending"
    #: The relay answered 2xx.
    DELIVERED = "delivered"
    #: 4xx or connection failure; will be retried.
    DEFERRED = "deferred"
    #: 5xx, or retries expired; a bounce went to the sender.
    BOUNCED = "bounced"
    #: Not sent because the verdict blocked the message.
    BLOCKED = "blocked"


def _tuple_of_str(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError("expected a sequence of strings, not one string")
    return tuple(value)


def _check_id(instance: object, attribute: object, value: str) -> None:
    if not value or len(value) > MAX_ID_LENGTH:
        raise ValueError(f"history ids are 1 to {MAX_ID_LENGTH} characters")


# --------------------------------------------------------------------------
# History: what goes in


@attrs.frozen
class ReceivedMessage:
    """
    One copy of a spooled message, as L{IStore.record_received} takes it.

    @ivar id: the copy's history id (see L{copy_id}).
    @ivar queue_id: the spool entry it came from.
    @ivar received_at: POSIX time the 250 was sent.
    @ivar client_address: the SMTP client (after PROXY, the real one).
    @ivar helo: what the client said in EHLO/HELO.
    @ivar sender: the reverse-path, C{""} for the null sender.
    @ivar recipients: the recipients bound to this copy's rule, in order.
    @ivar rule: the security rule, C{None} for internally generated mail.
    @ivar direction: the rule's direction.
    @ivar size: message size in bytes.
    @ivar subject: the Subject header, RFC 2047 decoded.
    @ivar message_id_header: the Message-ID header as sent.
    @ivar instance: which gateway instance spooled it (its spool holds the
        file while the copy is pending).
    @ivar parent_id: for a forked entry (a release, a forward, a rescan),
        the entry it was forked from.
    """

    id: str = attrs.field(validator=_check_id)
    queue_id: str
    received_at: float
    client_address: str
    helo: str
    sender: str
    recipients: tuple[str, ...] = attrs.field(converter=_tuple_of_str)
    rule: str | None
    direction: str | None
    size: int
    subject: str = ""
    message_id_header: str = ""
    instance: str = ""
    parent_id: str | None = None


@attrs.frozen
class PartVerdict:
    """
    What Core said about one scanned part (the body or an attachment).

    @ivar part_id: the part's position in the MIME tree, e.g. C{1.2}.
    @ivar result: Core's C{process_info.result} as sent (C{Allowed},
        C{Blocked}, ...).
    @ivar blocked_reason: Core's C{blocked_reason}, if any.
    @ivar sanitized: Deep CDR rebuilt this part.
    @ivar dlp_hits: one short line per DLP hit (e.g. C{credit card x3}).
    """

    part_id: str
    content_type: str
    size: int
    result: str
    filename: str | None = None
    data_id: str | None = None
    core_url: str | None = None
    blocked_reason: str | None = None
    sanitized: bool = False
    dlp_hits: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)

    @property
    def blocked(self) -> bool:
        """
        Whether Core blocked this part.
        """
        return self.result.casefold() == "blocked"

    @property
    def scanned(self) -> bool:
        """
        Whether Core gave this part a verdict (a part whose scan failed
        is recorded with the result C{Error}).
        """
        return self.result.casefold() in _SCAN_RESULTS

    @property
    def empty(self) -> bool:
        """
        Whether the part had no content, so was never sent to Core (which
        refuses empty files): nothing in zero bytes can do harm, so it
        counts as clean.
        """
        return self.result.casefold() == _EMPTY


#: The part results that are verdicts of Core (case-folded).
_SCAN_RESULTS = frozenset({"allowed", "blocked"})
#: The part result of an empty part (case-folded).
_EMPTY = "empty"


def overall_verdict(parts: Iterable[PartVerdict]) -> ScanVerdict | None:
    """
    The message verdict the parts add up to: blocked if Core blocked any
    part; otherwise C{None} unless every part was scanned or empty (and
    there was one), sanitized if any part was, else allowed. A message
    with a part Core never judged is never called clean; an empty part
    needs no judging.
    """
    parts = list(parts)
    if any(p.blocked for p in parts):
        return ScanVerdict.BLOCKED
    if not parts or not all(p.scanned or p.empty for p in parts):
        return None
    if any(p.sanitized for p in parts):
        return ScanVerdict.SANITIZED
    return ScanVerdict.ALLOWED


class FromParts(enum.Enum):
    """
    The type of L{FROM_PARTS}.
    """

    FROM_PARTS = "from parts"


#: L{IStore.record_verdicts}: work the verdict out with L{overall_verdict}.
FROM_PARTS = FromParts.FROM_PARTS


@attrs.frozen
class RecipientDelivery:
    """
    The latest delivery outcome for one recipient.

    @ivar code: the relay's reply code, C{None} without a reply (connection
        failure, or not tried).
    @ivar enhanced: the enhanced status code, e.g. C{2.0.0}.
    @ivar text: the reply text (or the connection error).
    @ivar upstream_queue_id: the relay's id for the message; when C{None}
        L{IStore.record_delivery} parses it from a 2xx C{text}.
    @ivar server: the relay server that answered (C{host:port}).
    @ivar at: when the outcome happened.
    @ivar attempts: how many outcomes were recorded for this recipient
        (set by the store; ignored on input).
    """

    recipient: str
    status: DeliveryStatus
    code: int | None = None
    enhanced: str | None = None
    text: str = ""
    upstream_queue_id: str | None = None
    server: str | None = None
    at: float | None = None
    attempts: int = 0


# --------------------------------------------------------------------------
# History: what comes out


@attrs.frozen
class TimelineEvent:
    """
    One line of a copy's processing history.

    @ivar status: the status the copy entered with this event, if it
        changed.
    """

    at: float
    text: str
    status: MessageStatus | None = None


@attrs.frozen
class MessageSummary:
    """
    One history row, as search results list it.

    @ivar processed_at: when verdicts were recorded (scan done).
    @ivar delivered_at: the latest successful delivery to a recipient.
    @ivar finished_at: when the copy entered a final status.
    """

    id: str
    queue_id: str
    received_at: float
    client_address: str
    helo: str
    sender: str
    recipients: tuple[str, ...]
    rule: str | None
    direction: str | None
    size: int
    subject: str
    message_id_header: str
    status: MessageStatus
    verdict: ScanVerdict | None
    processed_at: float | None
    delivered_at: float | None
    finished_at: float | None
    instance: str
    parent_id: str | None


@attrs.frozen
class MessageRecord:
    """
    Everything the store knows about one copy, for its details page.

    @ivar timeline: oldest first.
    @ivar parts: in MIME order.
    @ivar actions: what the gateway did to the message, e.g.
        C{sanitized part 1.2}, C{stripped part 1.3}.
    @ivar deliveries: one per recipient, in envelope order.
    """

    summary: MessageSummary
    timeline: tuple[TimelineEvent, ...]
    parts: tuple[PartVerdict, ...]
    actions: tuple[str, ...]
    deliveries: tuple[RecipientDelivery, ...]

    @property
    def id(self) -> str:
        """
        The copy's history id.
        """
        return self.summary.id


# --------------------------------------------------------------------------
# Refused log


@attrs.frozen
class Refusal:
    """
    One SMTP-level refusal (Audit > Refused Emails).

    @ivar listener: the name of the listener that refused.
    @ivar code: the reply code sent, e.g. C{550}.
    @ivar reason: the reply text or a short cause.
    @ivar helo: C{None} when refused before EHLO/HELO; likewise
        C{sender} and C{recipient}.
    @ivar category: the short reason (C{syntax}, C{too_big}, C{no_rule},
        ...; see L{mdgateway.smtp.categories}); C{None} in rows older
        than categories.
    @ivar repeats: how many refusals the row stands for: 1, or more for a
        summary row written instead of individual rows during a flood.
    @ivar id: assigned by the store; C{None} on input.
    """

    at: float
    listener: str
    client_address: str
    code: int
    reason: str
    enhanced: str | None = None
    helo: str | None = None
    sender: str | None = None
    recipient: str | None = None
    id: int | None = None
    category: str | None = None
    repeats: int = 1


# --------------------------------------------------------------------------
# Quarantine


@attrs.frozen
class QuarantineItem:
    """
    One quarantined original.

    @ivar id: the item's id (32 hex digits).
    @ivar message: the history entry whose original this is.
    @ivar expires_at: when cleanup may remove it; C{None} means the
        retention in force (C{quarantine_days} of L{IStore.purge}) decides.
    @ivar size: bytes of the original.
    @ivar sha256: hex digest of the original, checked on every read.
    @ivar pinned: exempt from cleanup.
    @ivar released_at: the last release, if any.
    """

    id: str
    message: MessageSummary
    reason: str
    quarantined_at: float
    expires_at: float | None
    size: int
    sha256: str
    pinned: bool
    released_at: float | None
    released_by: str | None


# --------------------------------------------------------------------------
# Dashboard counts


@attrs.frozen
class VerdictCount:
    """
    How many copies received in one time bucket got one verdict.

    @ivar start: the bucket's first second (C{since + k * step}).
    @ivar verdict: C{None} for copies without one (not scanned, pending).
    """

    start: float
    verdict: ScanVerdict | None
    count: int


@attrs.frozen
class InstanceActivity:
    """
    What the shared history says about one gateway instance.

    @ivar received: copies it received since the time asked for.
    @ivar last_received: its latest copy's received time, if any since.
    @ivar pending: copies still queued, processing or deferred in its
        spool, however old.
    @ivar oldest_pending: the received time of the oldest of those.
    """

    instance: str
    received: int
    last_received: float | None
    pending: int
    oldest_pending: float | None


# --------------------------------------------------------------------------
# The interface


class IStore(Interface):
    """
    Email history, refused log and quarantine.

    Every method is a coroutine whose database work runs in a thread pool,
    never on the reactor thread. Failures of the database raise
    L{StoreError}; unknown ids raise L{NotFoundError}. Times are POSIX
    seconds; where a time is optional the store's clock supplies it.
    Searches without C{filters} match everything; without C{page} they
    return the first default L{PageRequest}.
    """

    async def open() -> None:
        """
        Connect and bring the schema up to date (idempotent; safe when
        several instances open the same database at once). Call once,
        before anything else.
        """

    async def close() -> None:
        """
        Let calls in flight finish, then close every connection. Calls made
        afterwards raise L{StoreError}.
        """

    async def schema_version() -> int:
        """
        The highest migration applied to the database.
        """

    async def check() -> None:
        """
        One cheap round trip, for readiness checks; raises L{StoreError}.
        """

    async def record_received(
        message: ReceivedMessage, event_text: str | None = None
    ) -> bool:
        """
        Add a copy in status C{queued}, with its recipients pending and a
        first timeline event. Returns C{False}, changing nothing, when the
        id already exists (a pipeline restarted after a crash).
        """

    async def update_status(
        message_id: str,
        status: MessageStatus,
        event_text: str,
        at: float | None = None,
    ) -> None:
        """
        Set the status and append it, with C{event_text}, to the timeline.
        A final status also sets C{finished_at}.
        """

    async def add_event(message_id: str, text: str, at: float | None = None) -> None:
        """
        Append a timeline line without changing the status.
        """

    async def record_verdicts(
        message_id: str,
        parts: Iterable[PartVerdict],
        actions: Iterable[str] = (),
        verdict: ScanVerdict | None | FromParts = FROM_PARTS,
        at: float | None = None,
    ) -> None:
        """
        Replace the copy's part verdicts and actions and set its verdict
        (C{verdict}: C{None} for none, or by default L{overall_verdict} of
        C{parts}) and C{processed_at}.
        """

    async def record_delivery(message_id: str, result: RecipientDelivery) -> None:
        """
        Store the latest outcome for one recipient (adding the recipient
        if it is not yet listed), count the attempt, parse the upstream
        queue id from a 2xx reply that lacks one, and append a timeline
        line.
        """

    async def get_message(message_id: str) -> MessageRecord:
        """
        Everything about one copy.
        """

    async def search_messages(
        filters: MessageFilter | None = None,
        page: PageRequest | None = None,
    ) -> Page[MessageSummary]:
        """
        History rows matching C{filters}, newest received first.
        """

    async def record_refusal(refusal: Refusal) -> Refusal:
        """
        Log one SMTP-level refusal; returns it with its id.
        """

    async def search_refusals(
        filters: RefusalFilter | None = None,
        page: PageRequest | None = None,
    ) -> Page[Refusal]:
        """
        Refusals matching C{filters}, newest first.
        """

    async def quarantine(
        message_id: str,
        reason: str,
        source: QuarantineSource,
        expires_at: float | None = None,
        at: float | None = None,
    ) -> QuarantineItem:
        """
        Store the original of copy C{message_id}, read from C{source} in
        bounded chunks (never whole in memory), durably, in one transaction;
        append a timeline line. A stream is read from a pool thread; an
        C{OSError} opening or reading C{source} propagates as it is.
        """

    async def list_quarantine(
        filters: QuarantineFilter | None = None,
        page: PageRequest | None = None,
    ) -> Page[QuarantineItem]:
        """
        Quarantine items matching C{filters}, newest quarantined first.
        """

    async def get_quarantined(item_id: str) -> QuarantineItem:
        """
        One quarantine item, without its bytes.
        """

    async def read_quarantined(item_id: str, dest_path: str) -> QuarantineItem:
        """
        Write the original to C{dest_path} (replaced atomically, fsynced),
        in chunks, for release, forward, rescan or download. Raises
        L{CorruptOriginalError} when size or digest differ.
        """

    async def pin(item_id: str, pinned: bool) -> None:
        """
        Exempt the item from cleanup, or stop exempting it.
        """

    async def delete_quarantined(item_id: str) -> bool:
        """
        Remove the item and its bytes; C{False} if it did not exist.
        """

    async def mark_released(
        item_id: str, by: str, at: float | None = None
    ) -> QuarantineItem:
        """
        Record that C{by} released the original; append a timeline line to
        its history entry.
        """

    async def count_by_verdict(
        since: float, until: float, step: float
    ) -> tuple[VerdictCount, ...]:
        """
        Copies received in C{[since, until)}, counted per C{step}-second
        bucket (counted from C{since}) and verdict; empty buckets are left
        out. For the console's traffic chart.
        """

    async def instance_activity(since: float) -> tuple[InstanceActivity, ...]:
        """
        Per gateway instance (by name): copies received since C{since} and
        copies still pending, for every instance that has either; sorted
        by name.
        """

    async def purge(
        now: float, history_days: float | None, quarantine_days: float | None
    ) -> PurgeCounts:
        """
        Remove unpinned quarantine items past their expiry (their own
        C{expires_at}, else C{quarantine_days} after they were quarantined),
        then history entries and refusals older than C{history_days}; a
        history entry that still has a quarantine item stays.
        C{history_days=None} keeps history and refusals forever;
        C{quarantine_days=None} keeps items without their own C{expires_at}.
        """

    async def apply(records: Sequence[Owed]) -> list[Applied]:
        """
        Apply records the gateway owed the store (see
        L{mdgateway.store.outbox}), in order, in one durable transaction,
        each at most once: a record whose key was applied before is a
        duplicate and changes nothing. A record that cannot be applied
        (its history entry is missing, its original is unreadable) fails
        alone, keeping none of its changes, and the others go on.

        @return: one L{Applied} per record, in order.
        @raise StoreError: the transaction failed as a whole; nothing was
            kept (the database is unreachable, say).
        """

    async def record_audit(entry: AuditEntry) -> AuditEntry:
        """
        Add one finished operator action to the audit; returns it with
        its id.
        """

    async def claim_audit(entry: AuditEntry) -> tuple[AuditEntry, bool]:
        """
        Add C{entry} (an action starting, with its C{claim}) unless an
        entry with the same claim exists: then C{(that entry, False)},
        except that an entry whose action failed is taken over (its result
        set back to started). C{(entry with its id, True)} when the claim
        is ours.
        """

    async def finish_audit(
        entry_id: int,
        result: str,
        detail: str,
        outcome: str = "",
        at: float | None = None,
    ) -> AuditEntry:
        """
        Record how a claimed action ended.
        """

    async def search_audit(
        filters: AuditFilter | None = None,
        page: PageRequest | None = None,
    ) -> Page[AuditEntry]:
        """
        Audit entries matching C{filters}, newest first.
        """
