"""
Tests for what the store does with owed records (L{IStore.apply}), the
operator audit, honest verdicts and the migration that fixes old rows: on
SQLite and PostgreSQL alike (the C{backend} fixture of L{tests.test_store}).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.queue.copies import CopyOutcome, Decision
from mdgateway.queue.report import copy_verdict
from mdgateway.store import (
    DeliveryStatus,
    MessageFilter,
    MessageStatus,
    PartVerdict,
    RecipientDelivery,
    Refusal,
    RefusalFilter,
    ScanVerdict,
    overall_verdict,
)
from mdgateway.store.audit import DONE, FAILED, STARTED, AuditEntry, AuditFilter
from mdgateway.store.owed import (
    APPLIED,
    DUPLICATE,
    Owed,
    OwedDelivery,
    OwedEvent,
    OwedFormatError,
    OwedQuarantine,
    OwedReceived,
    OwedRefusal,
    OwedStatus,
    OwedVerdicts,
    decode,
    encode,
)
from mdgateway.store.owed import FAILED as RECORD_FAILED
from mdgateway.store.schema import MIGRATIONS, SCHEMA_VERSION, migrate
from mdgateway.store.sqlstore import SqlStore
from tests.storefixtures import Backend, received

pytestmark = pytest.mark.timeout(60)


def every_kind(tmp_path: Path) -> list[Owed]:
    """
    One record of every kind, for copy C{Q1.1}, in the order the pipeline
    writes them.
    """
    original = tmp_path / "original.eml"
    original.write_bytes(b"Subject: x\r\n\r\nEICAR\r\n")
    parts = (PartVerdict("1", "text/plain", 10, "Blocked", blocked_reason="Infected"),)
    return [
        Owed.new(
            OwedReceived(
                received("Q1.1"),
                "received from mx [192.0.2.10]",
                1000.0,
                MessageStatus.PROCESSING,
                "processing under rule Inbound",
            )
        ),
        Owed.new(
            OwedVerdicts(
                "Q1.1", parts, ("blocked",), ScanVerdict.BLOCKED, 1001.0, "Blocked"
            )
        ),
        Owed.new(OwedQuarantine("Q1.1", "blocked", str(original), 1002.0, 9999.0)),
        Owed.new(OwedEvent("Q1.1", "notification sent", 1003.0)),
        Owed.new(
            OwedDelivery(
                "Q1.1",
                RecipientDelivery(
                    "bob@example.org",
                    DeliveryStatus.BLOCKED,
                    text="blocked",
                    at=1003.5,
                ),
                1003.5,
            )
        ),
        Owed.new(
            OwedStatus("Q1.1", MessageStatus.QUARANTINED, "original quarantined", 1004)
        ),
        Owed.new(
            OwedRefusal(
                Refusal(
                    at=1005.0,
                    listener="smtp",
                    client_address="192.0.2.99",
                    code=550,
                    reason="No security rule",
                    enhanced="5.7.1",
                    category="no_rule",
                )
            )
        ),
    ]


async def snapshot(store: SqlStore) -> dict[str, Any]:
    """
    Everything the records above can change, to compare before and after
    a replay.
    """
    record = await store.get_message("Q1.1")
    refusals = await store.search_refusals()
    items = await store.list_quarantine()
    return {
        "record": record,
        "refusals": [attrs.evolve(r, id=None) for r in refusals.items],
        "items": items.items,
    }


@pytest_twisted.ensureDeferred
async def test_apply_every_kind_then_replay_changes_nothing(
    store: SqlStore, tmp_path: Path
) -> None:
    """
    Every kind of record is applied as the corresponding store call would;
    applying the same records again (a crash between the commit and the
    outbox clean-up) reports each as a duplicate and changes nothing: no
    second timeline line, refusal row, quarantine item or delivery attempt.
    """
    records = every_kind(tmp_path)
    outcomes = await store.apply(records)
    assert [o.status for o in outcomes] == [APPLIED] * len(records)
    assert [o.key for o in outcomes] == [r.key for r in records]
    first = await snapshot(store)
    summary = first["record"].summary
    assert summary.status is MessageStatus.QUARANTINED
    assert summary.verdict is ScanVerdict.BLOCKED
    assert [e.text for e in first["record"].timeline] == [
        "received from mx [192.0.2.10]",
        "processing under rule Inbound",
        "Blocked",
        "original quarantined (21 bytes): blocked",
        "notification sent",
        "blocked bob@example.org: blocked",
        "original quarantined",
    ]
    assert first["record"].deliveries[0].attempts == 1
    (item,) = first["items"]
    assert item.id == records[2].key
    assert item.size == 21
    assert first["refusals"][0].category == "no_rule"
    again = await store.apply(records)
    assert [o.status for o in again] == [DUPLICATE] * len(records)
    assert await snapshot(store) == first


@pytest_twisted.ensureDeferred
async def test_a_record_that_cannot_be_applied_fails_alone(
    store: SqlStore, tmp_path: Path
) -> None:
    """
    A record for a history entry that does not exist, or whose original
    is gone, fails with its reason; the records around it are applied.
    """
    records = [
        Owed.new(OwedReceived(received("A.1", at=0.5), "received", 1.0)),
        Owed.new(OwedEvent("nope.1", "orphan", 2.0)),
        Owed.new(OwedQuarantine("A.1", "blocked", str(tmp_path / "gone.eml"), 3.0)),
        Owed.new(OwedEvent("A.1", "still here", 4.0)),
    ]
    outcomes = await store.apply(records)
    assert [o.status for o in outcomes] == [
        APPLIED,
        RECORD_FAILED,
        RECORD_FAILED,
        APPLIED,
    ]
    assert "NotFoundError" in outcomes[1].error
    assert "FileNotFoundError" in outcomes[2].error
    record = await store.get_message("A.1")
    assert [e.text for e in record.timeline] == ["received", "still here"]
    assert (await store.list_quarantine()).total == 0


@pytest_twisted.ensureDeferred
async def test_reprocessing_a_copy_records_each_attempt(store: SqlStore) -> None:
    """
    A copy received again (a retry after a Core failure) keeps its one
    history entry, and each attempt's status change is a record of its
    own: applied once each, never lost as a "duplicate" of the first.
    """
    first = Owed.new(
        OwedReceived(
            received("R.1", at=0.5), "received", 1.0, MessageStatus.PROCESSING, "try"
        )
    )
    second = Owed.new(
        OwedReceived(
            received("R.1", at=0.5), "received", 5.0, MessageStatus.PROCESSING, "try"
        )
    )
    outcomes = await store.apply([first, second])
    assert [o.status for o in outcomes] == [APPLIED, APPLIED]
    record = await store.get_message("R.1")
    assert [e.text for e in record.timeline] == ["received", "try", "try"]


@pytest_twisted.ensureDeferred
async def test_refusal_category_and_repeats_are_searchable(store: SqlStore) -> None:
    """
    Refusals keep their category and how many refusals a summary row
    stands for, and the refused log filters on the category.
    """
    base = Refusal(
        at=10.0, listener="smtp", client_address="192.0.2.1", code=501, reason="x"
    )
    await store.record_refusal(attrs.evolve(base, category="syntax"))
    await store.record_refusal(attrs.evolve(base, category="too_big", repeats=41))
    page = await store.search_refusals(RefusalFilter(category="too_big"))
    assert [(r.category, r.repeats) for r in page.items] == [("too_big", 41)]
    assert (await store.search_refusals()).total == 2


@pytest_twisted.ensureDeferred
async def test_verdict_is_none_unless_every_part_was_scanned(store: SqlStore) -> None:
    """
    Worked out from the parts, a copy with a part Core never judged has no
    verdict (not Allowed), unless Core blocked another part; an explicit
    C{None} is stored as no verdict whatever the parts say.
    """
    for n in (1, 2, 3):
        await store.record_received(received(f"V.{n}"))
    clean = PartVerdict("1", "text/plain", 1, "Allowed")
    error = PartVerdict("2", "application/pdf", 1, "Error")
    blocked = PartVerdict("3", "application/zip", 1, "Blocked")
    await store.record_verdicts("V.1", [clean, error])
    await store.record_verdicts("V.2", [error, blocked])
    await store.record_verdicts("V.3", [clean], verdict=None)
    verdicts = {
        m.id: m.verdict for m in (await store.search_messages(MessageFilter())).items
    }
    assert verdicts == {"V.1": None, "V.2": ScanVerdict.BLOCKED, "V.3": None}
    allowed = await store.search_messages(MessageFilter(verdicts="Allowed"))
    assert allowed.total == 0


@pytest_twisted.ensureDeferred
async def test_migration_clears_verdicts_that_claimed_too_much(
    backend: Backend,
) -> None:
    """
    A database written before honest verdicts (schema 1) with failed,
    bypassed and half-scanned copies marked Allowed is fixed when the
    store opens: those lose their verdict; clean and blocked copies keep
    theirs.
    """
    old = backend.make()
    await old._call(True, migrate, 1.0, MIGRATIONS[:1], opening=True)
    await old.close()
    backend.opened.remove(old)
    rows = {
        "failed.1": ("failed", "Allowed", ["Allowed", "Error"]),
        "bypassed.1": ("bypassed", "Allowed", ["Allowed"]),
        "halfscanned.1": ("deferred", "Allowed", ["Error"]),
        "noparts.1": ("delivered", "Allowed", []),
        "clean.1": ("delivered", "Allowed", ["Allowed"]),
        "blocked.1": ("quarantined", "Blocked", ["Blocked", "Error"]),
    }
    # Rows as schema 1 stored them: whatever the pipeline said.
    for message_id, (status, verdict, results) in rows.items():
        backend.raw(
            "INSERT INTO messages (id, queue_id, instance, received_at, "
            "client_address, helo, sender, sender_key, size, subject, subject_key, "
            "message_id_header, status, verdict, actions, processed_at, "
            "updated_at) VALUES (?, 'q', '', 1.0, 'c', 'h', '', '', 1, '', '', "
            "'', ?, ?, '[]', 2.0, 2.0)",
            (message_id, status, verdict),
        )
        for n, result in enumerate(results):
            backend.raw(
                "INSERT INTO message_parts (message_id, position, part_id, "
                "content_type, size, result, sanitized, dlp_hits) "
                "VALUES (?, ?, ?, 'text/plain', 1, ?, ?, '[]')",
                (message_id, n, str(n), result, False),
            )
    store = await backend.open()
    assert store.applied_migrations == list(range(2, SCHEMA_VERSION + 1))
    verdicts = {
        m.id: m.verdict for m in (await store.search_messages(MessageFilter())).items
    }
    assert verdicts == {
        "failed.1": None,
        "bypassed.1": None,
        "halfscanned.1": None,
        "noparts.1": None,
        "clean.1": ScanVerdict.ALLOWED,
        "blocked.1": ScanVerdict.BLOCKED,
    }


@pytest_twisted.ensureDeferred
async def test_audit_claims_are_taken_once(store: SqlStore) -> None:
    """
    A claimed action is claimed once: a second claim with the same claim
    string gets the first entry back; a failed one can be claimed again;
    finished entries are searchable by actor, action and target.
    """
    entry = AuditEntry(
        at=1.0,
        actor="alice",
        action="release",
        target="item1",
        result=STARTED,
        claim="release:item1",
    )
    mine, claimed = await store.claim_audit(entry)
    assert claimed and mine.id is not None and mine.result == STARTED
    theirs, claimed = await store.claim_audit(attrs.evolve(entry, actor="bob"))
    assert not claimed and theirs.id == mine.id and theirs.actor == "alice"
    done = await store.finish_audit(mine.id, DONE, "queued as Q9", "Q9", at=2.0)
    assert (done.result, done.outcome, done.finished_at) == (DONE, "Q9", 2.0)
    other, claimed = await store.claim_audit(
        attrs.evolve(entry, target="item2", claim="release:item2")
    )
    assert claimed
    assert other.id is not None
    await store.finish_audit(other.id, FAILED, "relay gone")
    retaken, claimed = await store.claim_audit(
        attrs.evolve(entry, actor="carol", target="item2", claim="release:item2")
    )
    assert claimed and retaken.id == other.id and retaken.actor == "carol"
    await store.record_audit(
        AuditEntry(at=3.0, actor="bob", action="pin", target="item1", result=DONE)
    )
    page = await store.search_audit(AuditFilter(target="item1"))
    assert [(e.actor, e.action) for e in page.items] == [
        ("bob", "pin"),
        ("alice", "release"),
    ]
    assert (await store.search_audit(AuditFilter(actor="carol"))).total == 1


class PureTests(SynchronousTestCase):
    """
    The record values and verdict rules, without a database.
    """

    def test_encode_decode_round_trip(self) -> None:
        """
        Every kind of record reads back from its JSON equal to what was
        written.
        """
        import json
        import tempfile

        for owed in every_kind(Path(tempfile.mkdtemp())):
            data = json.loads(json.dumps(encode(owed)))
            self.assertEqual(decode(data), owed)

    def test_decode_refuses_what_it_cannot_read(self) -> None:
        """
        Another format version, an unknown kind or a missing field is an
        L{OwedFormatError}, never a half-read record.
        """
        good = encode(Owed.new(OwedEvent("A.1", "x", 1.0)))
        for bad in (
            {**good, "v": 99},
            {**good, "kind": "nonsense"},
            {k: v for k, v in good.items() if k != "message_id"},
            "not even a dict",
        ):
            with self.assertRaises(OwedFormatError):
                decode(bad)

    def test_overall_verdict(self) -> None:
        """
        Blocked wins; otherwise a part without a Core verdict (or no part
        at all) means no verdict; sanitized beats allowed.
        """
        allowed = PartVerdict("1", "text/plain", 1, "Allowed")
        sanitized = PartVerdict("2", "text/plain", 1, "Allowed", sanitized=True)
        error = PartVerdict("3", "text/plain", 1, "Error")
        blocked = PartVerdict("4", "text/plain", 1, "Blocked")
        self.assertIsNone(overall_verdict([]))
        self.assertIsNone(overall_verdict([allowed, error]))
        self.assertIsNone(overall_verdict([sanitized, error]))
        self.assertEqual(overall_verdict([allowed]), ScanVerdict.ALLOWED)
        self.assertEqual(overall_verdict([allowed, sanitized]), ScanVerdict.SANITIZED)
        self.assertEqual(overall_verdict([error, blocked]), ScanVerdict.BLOCKED)

    def test_overall_verdict_empty_parts_count_clean(self) -> None:
        """
        An empty part (never sent to Core: nothing in zero bytes can do
        harm) counts as clean: beside clean parts, or alone, the message is
        Allowed; beside a sanitized part, Sanitized; beside a part whose
        scan failed, still no verdict; beside a blocked one, Blocked.
        """
        empty = PartVerdict("1", "text/plain", 0, "Empty")
        allowed = PartVerdict("2", "application/pdf", 9, "Allowed")
        sanitized = PartVerdict("3", "text/plain", 1, "Allowed", sanitized=True)
        error = PartVerdict("4", "text/plain", 1, "Error")
        blocked = PartVerdict("5", "text/plain", 1, "Blocked")
        self.assertEqual(overall_verdict([empty, allowed]), ScanVerdict.ALLOWED)
        self.assertEqual(overall_verdict([empty]), ScanVerdict.ALLOWED)
        self.assertEqual(overall_verdict([empty, sanitized]), ScanVerdict.SANITIZED)
        self.assertIsNone(overall_verdict([empty, error]))
        self.assertEqual(overall_verdict([empty, blocked]), ScanVerdict.BLOCKED)

    def test_copy_verdict_never_calls_unscanned_mail_clean(self) -> None:
        """
        The history verdict of a processed copy: none for a copy that
        failed, waits for a retry of its scan, was bypassed or skipped, even
        when every part Core did judge was clean; Blocked whenever Core
        blocked; else what the parts say, Sanitized when CDR rebuilt it.
        """
        clean = (PartVerdict("1", "text/plain", 1, "Allowed"),)
        error = (*clean, PartVerdict("2", "application/pdf", 1, "Error"))
        blocked = (*error, PartVerdict("3", "application/zip", 1, "Blocked"))

        def outcome(decision: Decision, result: str, **kw: Any) -> CopyOutcome:
            return CopyOutcome(decision, result, **kw)

        cases = [
            (outcome(Decision.FAIL, "Failed/not_scanned"), error, None),
            (outcome(Decision.FAIL, "Failed/modification_failure"), clean, None),
            (outcome(Decision.RETRY, "Failed/processing_failed"), error, None),
            (outcome(Decision.DELIVER, "Bypassed/core_unreachable"), error, None),
            (outcome(Decision.DELIVER, "Bypassed/modification_failure"), clean, None),
            (outcome(Decision.DELIVER, "Skipped/AlreadyProcessed"), (), None),
            (outcome(Decision.BLOCK, "Blocked/Infected"), blocked, ScanVerdict.BLOCKED),
            (outcome(Decision.DELIVER, "Allowed"), clean, ScanVerdict.ALLOWED),
            (
                outcome(Decision.DELIVER, "Allowed", sanitized=True),
                clean,
                ScanVerdict.SANITIZED,
            ),
            (outcome(Decision.DELIVER, "Allowed"), error, None),
            (
                outcome(Decision.DELIVER, "Allowed"),
                (*clean, PartVerdict("2", "text/plain", 0, "Empty")),
                ScanVerdict.ALLOWED,
            ),
        ]
        for copy, parts, expected in cases:
            self.assertEqual(copy_verdict(copy, parts), expected, copy.result)
