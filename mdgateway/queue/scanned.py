# -*- test-case-name: tests.test_scan_once -*-
"""
Scan once per copy: what processing decided about a copy, kept with its
spool entry so that delivery retries only deliver.

Once a copy is scanned and acted on, the files it delivers (the rebuilt
message, a notification, an original copy) move from the scratch folder to
C{processed/<queue id>/} under the spool root and are fsynced there, and
the outcome (decision, result, per-part verdicts, actions, and which file
each delivery sends) goes into the entry's delivery state, which the spool
replaces atomically and durably.  Both happen before the first delivery
attempt, so:

  - a retry (relay down, a recipient deferred) delivers the kept files
    without calling Core;
  - a crash after they were kept loses nothing and scans nothing again;
  - a crash between the scan and the keeping scans once more at restart,
    never more (nothing was delivered meanwhile);
  - an operator rescan queues a new entry, which is scanned afresh.

A delivery that sends the spooled message itself (an unchanged copy, with
our headers in front) names it rather than copying it.  Kept files go when
the entry does; those of entries that no longer exist are removed at start.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from mdgateway.queue.copies import (
    CopyOutcome,
    Decision,
    Delivery,
    PartReport,
)
from mdgateway.queue.entry import PROCESSED

#: How a kept delivery names the spooled message itself.
SPOOLED = "@spooled"
_VERSION = 1


def processed_dir(root: str, queue_id: str) -> str:
    """
    Where the kept files of an entry's copies live.
    """
    return os.path.join(root, PROCESSED, queue_id)


def _fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keep_outcome(
    outcome: CopyOutcome, root: str, queue_id: str, security_id: str, message_path: str
) -> tuple[CopyOutcome, dict[str, Any]]:
    """
    Move the files an outcome delivers into the entry's processed folder
    and make them durable (blocking: run it in a worker thread).

    @return: the outcome with its deliveries pointing at the kept files,
        and its JSON form for the delivery state.
    """
    folder = processed_dir(root, queue_id)
    parent = os.path.dirname(folder)
    new_parent = not os.path.isdir(parent)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    names: dict[str, str] = {}
    kept: list[Delivery] = []
    for delivery in outcome.deliveries:
        if delivery.path == message_path:
            kept.append(delivery)
            continue
        name = names.get(delivery.path)
        if name is None:
            name = names[delivery.path] = f"{security_id}-{len(names) + 1}.eml"
            target = os.path.join(folder, name)
            os.replace(delivery.path, target)
            _fsync_path(target)
        kept.append(attrs.evolve(delivery, path=os.path.join(folder, name)))
    if names:
        _fsync_path(folder, os.O_DIRECTORY)
    if new_parent:
        _fsync_path(parent, os.O_DIRECTORY)
    kept_outcome = attrs.evolve(outcome, deliveries=tuple(kept))
    return kept_outcome, outcome_json(kept_outcome, folder, message_path)


def outcome_json(
    outcome: CopyOutcome, folder: str, message_path: str
) -> dict[str, Any]:
    """
    The JSON form of an outcome whose delivery files are in C{folder} (or
    are the spooled message).
    """

    def file(path: str) -> str:
        if path == message_path:
            return SPOOLED
        if os.path.dirname(path) != folder:
            raise ValueError(f"{path} is not a kept file")
        return os.path.basename(path)

    return {
        "version": _VERSION,
        "decision": outcome.decision.value,
        "result": outcome.result,
        "deliveries": [
            {
                "file": file(d.path),
                "prefix": base64.b64encode(d.prefix).decode("ascii"),
                "offset": d.offset,
                "kind": d.kind,
            }
            for d in outcome.deliveries
        ],
        "sanitized": outcome.sanitized,
        "parts": [attrs.asdict(p) for p in outcome.parts],
        "actions": list(outcome.actions),
        "quarantine": outcome.quarantine,
        "condition": outcome.condition,
        "detail": outcome.detail,
    }


def load_outcome(
    data: Mapping[str, Any], root: str, queue_id: str, message_path: str
) -> CopyOutcome | None:
    """
    The outcome kept for a copy, or L{None} when it cannot be used (another
    version, malformed, or a file it delivers is gone: an entry adopted
    from another process's spool comes without them), in which case the
    copy is processed again (blocking: it looks at the files).
    """
    folder = processed_dir(root, queue_id)
    try:
        if data.get("version") != _VERSION:
            return None
        deliveries = []
        for item in data["deliveries"]:
            name = str(item["file"])
            if name == SPOOLED:
                path = message_path
            elif os.path.basename(name) != name or name in ("", ".", ".."):
                return None
            else:
                path = os.path.join(folder, name)
            if not os.path.isfile(path):
                return None
            deliveries.append(
                Delivery(
                    path,
                    base64.b64decode(item["prefix"], validate=True),
                    int(item["offset"]),
                    str(item["kind"]),
                )
            )
        return CopyOutcome(
            Decision(data["decision"]),
            str(data["result"]),
            tuple(deliveries),
            sanitized=bool(data["sanitized"]),
            parts=tuple(PartReport(**p) for p in data["parts"]),
            actions=tuple(str(a) for a in data["actions"]),
            quarantine=data["quarantine"],
            condition=data["condition"],
            detail=str(data["detail"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def remove_processed(root: str, queue_id: str) -> None:
    """
    Remove the kept files of an entry (blocking).
    """
    shutil.rmtree(processed_dir(root, queue_id), ignore_errors=True)


def remove_orphans(root: str, live: Iterable[str]) -> list[str]:
    """
    Remove the kept files of entries not in C{live} (blocking).

    @return: the queue ids whose files were removed.
    """
    folder = os.path.join(root, PROCESSED)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    alive = set(live)
    removed = sorted(name for name in names if name not in alive)
    for name in removed:
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    return removed
