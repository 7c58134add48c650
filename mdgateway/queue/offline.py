# -*- test-case-name: tests.test_spool_offline -*-
"""
A spool no gateway runs on (a stopped instance's, a dead node's disk),
opened by an operator's command: its entries listed, one shown, entries
moved into another spool root, where a gateway takes them over.

Everything here blocks (a command-line tool is not a reactor). Reading
takes no lock: a live spool renames every file into place whole, so what
is read is whole, and a listing can say the spool is in use. Moving takes
the lock of both roots (C{flock} on C{<root>/lock}, as a running gateway
holds it for its life) and is refused while either is held: a running
gateway's entries are its own. An entry is moved as adoption moves it
(L{job_adopt_entry}: hard links in, the envelope last, then the source's
copy removed, envelope first), so a crash at any instant leaves it
complete in at least one of the two roots, and moving again completes it
without a duplicate.

The gateway whose spool a moved entry lands in must find it when it
starts: move into a stopped instance's spool directory, or into
C{<spool>/workers/<N>} of a running one with I{N} at least its
C{[processes] workers} (a root no process owns, adopted at its next
start).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

import attrs

from mdgateway.fileops import IFileOps, OSFileOps
from mdgateway.message.view import MessageView, inspect_message
from mdgateway.queue.entry import SpoolEntry, SpoolInUseError, SpoolPaths
from mdgateway.queue.jobs import (
    close_quietly,
    job_adopt_entry,
    job_list,
    job_list_root,
    job_lock,
    job_read_entry,
    make_layout,
)


@attrs.frozen
class OfflineEntry:
    """
    One entry of an offline spool, with the process root it is in.

    @ivar process: 0 for the spool root itself, I{k} for C{workers/<k>}.
    """

    process: int
    entry: SpoolEntry
    state: dict[str, Any] | None


@attrs.frozen
class MoveReport:
    """
    What a move did.

    @ivar moved: the ids now in the target.
    @ivar collided: ids the target holds already (another message): left
        in the source.
    @ivar missing: ids asked for that no root holds.
    """

    moved: tuple[str, ...] = ()
    collided: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()


def process_roots(root: str) -> list[tuple[int, str]]:
    """
    The spool root and its worker roots (C{workers/<k>}), in order.
    """
    roots = [(0, root)]
    base = os.path.join(root, "workers")
    with suppress(FileNotFoundError, NotADirectoryError):
        for name in sorted(os.listdir(base), key=lambda n: (len(n), n)):
            path = os.path.join(base, name)
            if name.isdigit() and int(name) > 0 and os.path.isdir(path):
                roots.append((int(name), path))
    return roots


def in_use(root: str, ops: IFileOps | None = None) -> bool:
    """
    Whether a process holds the lock of C{root} now.
    """
    ops = ops or OSFileOps()
    try:
        fd = job_lock(ops, SpoolPaths.under(os.path.abspath(root)), False)
    except FileNotFoundError:
        return False
    if fd is None:
        return True
    close_quietly(ops, fd)
    return False


def _device(path: str) -> int:
    """
    The file system of C{path}, or of its nearest existing parent.
    """
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return os.stat(path).st_dev


@contextmanager
def locked(
    root: str, create: bool = False, ops: IFileOps | None = None
) -> Iterator[SpoolPaths]:
    """
    Hold the lock of C{root} for the block.

    @param create: create the root and its layout if missing.
    @raise SpoolInUseError: a running process holds it.
    @raise FileNotFoundError: C{root} does not exist (and not C{create}).
    """
    ops = ops or OSFileOps()
    paths = SpoolPaths.under(os.path.abspath(root))
    fd = job_lock(ops, paths, create)
    if fd is None:
        raise SpoolInUseError(
            f"spool directory {paths.root} is in use by a running gateway"
        )
    try:
        if create:
            make_layout(ops, paths)
        yield paths
    finally:
        close_quietly(ops, fd)


def list_entries(root: str) -> list[OfflineEntry]:
    """
    Every complete entry of C{root} and of its worker roots, oldest first.
    """
    ops = OSFileOps()
    out = []
    for process, path in process_roots(root):
        for entry, state in job_list_root(ops, SpoolPaths.under(os.path.abspath(path))):
            out.append(OfflineEntry(process, entry, state))
    out.sort(key=lambda e: e.entry.envelope.received_at)
    return out


def show_entry(root: str, queue_id: str) -> tuple[OfflineEntry, MessageView] | None:
    """
    One entry of C{root} or its worker roots, with its content view.
    """
    ops = OSFileOps()
    for process, path in process_roots(root):
        found = job_read_entry(ops, SpoolPaths.under(os.path.abspath(path)), queue_id)
        if found is not None:
            entry, state = found
            try:
                view = inspect_message(entry.message_path)
            except FileNotFoundError:
                return None
            return OfflineEntry(process, entry, state), view
    return None


def move_entries(
    source: str, target: str, queue_ids: list[str] | None = None
) -> MoveReport:
    """
    Move entries of C{source} (and of its worker roots) into the root
    C{target}: those named by C{queue_ids}, or all of them.

    @raise SpoolInUseError: a running process holds the lock of the
        target or of a source root; nothing was moved.
    @raise ValueError: the target is the source or one of its roots, or
        on another file system (an entry moves by hard links); nothing was
        moved.
    """
    ops = OSFileOps()
    target = os.path.abspath(target)
    roots = [(p, os.path.abspath(r)) for p, r in process_roots(source)]
    if any(target == r for _, r in roots):
        raise ValueError(f"{target} is one of the roots the entries come from")
    if _device(target) != _device(source):
        raise ValueError(
            f"{target} is on another file system than {source}, and a move "
            "hard-links each message: copy the spool directory onto the "
            "target's file system first (cp -a), then move from the copy"
        )
    wanted = None if queue_ids is None else list(dict.fromkeys(queue_ids))
    moved: list[str] = []
    collided: list[str] = []
    with ExitStack() as held:
        # Every lock first: a root in use refuses the whole move.
        ours = held.enter_context(locked(target, create=True, ops=ops))
        sources = [held.enter_context(locked(root, ops=ops)) for _, root in roots]
        for theirs in sources:
            entries, _ = job_list(ops, theirs)
            for entry in entries:
                if wanted is not None and entry.queue_id not in wanted:
                    continue
                if job_adopt_entry(ops, ours, theirs, entry.queue_id):
                    moved.append(entry.queue_id)
                else:
                    collided.append(entry.queue_id)
    missing = [] if wanted is None else [q for q in wanted if q not in moved + collided]
    return MoveReport(tuple(moved), tuple(collided), tuple(missing))
