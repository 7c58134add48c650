"""
Tests for L{mdgateway.queue.scanned}: a copy's outcome and the files it
delivers, kept with the spool entry so that retries only deliver.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mdgateway.queue.copies import CopyOutcome, Decision, Delivery, PartReport
from mdgateway.queue.scanned import (
    SPOOLED,
    keep_outcome,
    load_outcome,
    processed_dir,
    remove_orphans,
    remove_processed,
)

QUEUE_ID = "1M8X2ZRCTHJAF9ZY0CT5"
SECURITY_ID = f"{QUEUE_ID}.1"


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """
    A spool root with a spooled message and a scratch folder holding what
    processing made: a rebuilt message and a notification.
    """
    (tmp_path / "queue").mkdir()
    (tmp_path / "queue" / f"{QUEUE_ID}.eml").write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    work = tmp_path / "work" / SECURITY_ID
    work.mkdir(parents=True)
    (work / "rebuilt.eml").write_bytes(b"Subject: x\r\n\r\nnew body\r\n")
    (work / "notification.eml").write_bytes(b"Subject: blocked\r\n\r\nsorry\r\n")
    return tmp_path


def outcome_in(spool: Path) -> CopyOutcome:
    work = spool / "work" / SECURITY_ID
    return CopyOutcome(
        Decision.DELIVER,
        "Blocked/Infected",
        (
            Delivery(str(work / "rebuilt.eml"), b"X-MD-Email-Security-Id: m\r\n"),
            Delivery(
                str(spool / "queue" / f"{QUEUE_ID}.eml"),
                b"X-A: 1\r\n",
                0,
                "original copy",
            ),
            Delivery(str(work / "notification.eml"), kind="notification"),
        ),
        sanitized=True,
        parts=(
            PartReport("1.1", "body.txt", "text/plain", 0, "Empty", action="empty"),
            PartReport(
                "1.2",
                "a.com",
                "application/octet-stream",
                68,
                "Blocked",
                blocked_reason="Infected",
                data_id="d1",
                core_url="http://core.test:8008",
                action="stripped",
            ),
        ),
        actions=("stripped part 1.2 (a.com)",),
        quarantine="blocked",
        condition=None,
        detail="",
    )


def test_round_trip(spool: Path) -> None:
    """
    Keeping an outcome moves the files it delivers into the entry's
    processed folder (the spooled message is named, not copied); its JSON
    form survives the delivery state's JSON and loads back to the same
    outcome, delivering the same bytes.
    """
    message = str(spool / "queue" / f"{QUEUE_ID}.eml")
    outcome = outcome_in(spool)
    before = [Path(d.path).read_bytes() for d in outcome.deliveries]
    kept, data = keep_outcome(outcome, str(spool), QUEUE_ID, SECURITY_ID, message)
    folder = processed_dir(str(spool), QUEUE_ID)
    assert sorted(os.listdir(folder)) == [
        f"{SECURITY_ID}-1.eml",
        f"{SECURITY_ID}-2.eml",
    ]
    assert not (spool / "work" / SECURITY_ID / "rebuilt.eml").exists()
    assert [Path(d.path).read_bytes() for d in kept.deliveries] == before
    assert kept.deliveries[1].path == message
    assert data["deliveries"][1]["file"] == SPOOLED
    stored = json.loads(json.dumps(data))
    loaded = load_outcome(stored, str(spool), QUEUE_ID, message)
    assert loaded == kept
    assert (loaded.parts, loaded.quarantine, loaded.sanitized) == (
        outcome.parts,
        "blocked",
        True,
    )


def test_missing_file_means_process_again(spool: Path) -> None:
    """
    A kept outcome whose file is gone (an entry adopted from another
    process's spool) cannot be used: L{load_outcome} says so with L{None},
    and so it does for another version or a malformed record.
    """
    message = str(spool / "queue" / f"{QUEUE_ID}.eml")
    kept, data = keep_outcome(
        outcome_in(spool), str(spool), QUEUE_ID, SECURITY_ID, message
    )
    assert load_outcome(data, str(spool), QUEUE_ID, message) is not None
    assert load_outcome({**data, "version": 99}, str(spool), QUEUE_ID, message) is None
    assert (
        load_outcome({**data, "decision": "maybe"}, str(spool), QUEUE_ID, message)
        is None
    )
    escaping = {**data, "deliveries": [{**data["deliveries"][0], "file": "../x.eml"}]}
    assert load_outcome(escaping, str(spool), QUEUE_ID, message) is None
    os.unlink(kept.deliveries[0].path)
    assert load_outcome(data, str(spool), QUEUE_ID, message) is None


def test_removal_and_orphans(spool: Path) -> None:
    """
    The kept files go with their entry; at start, those of entries that no
    longer exist are removed and those of live entries stay.
    """
    message = str(spool / "queue" / f"{QUEUE_ID}.eml")
    keep_outcome(outcome_in(spool), str(spool), QUEUE_ID, SECURITY_ID, message)
    other = Path(processed_dir(str(spool), "1M8X2ZRCTHJAF9ZY0CT6"))
    other.mkdir()
    (other / "x.eml").write_bytes(b"x")
    assert remove_orphans(str(spool), [QUEUE_ID]) == ["1M8X2ZRCTHJAF9ZY0CT6"]
    assert not other.exists()
    assert Path(processed_dir(str(spool), QUEUE_ID)).is_dir()
    remove_processed(str(spool), QUEUE_ID)
    assert not Path(processed_dir(str(spool), QUEUE_ID)).exists()
    assert remove_orphans(str(spool / "nowhere"), []) == []
