# -*- test-case-name: tests.test_spool -*-
"""
The spool's blocking jobs: each runs in a pool thread and touches no shared
Python state.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import secrets
import shutil
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from mdgateway.fileops import IFileOps
from mdgateway.queue.entry import (
    ENVELOPE_SUFFIX,
    LOCK_ATTEMPTS,
    MESSAGE_SUFFIX,
    PROCESSED,
    SCRATCH,
    TEMP_SUFFIX,
    RecoveryReport,
    SpoolEntry,
    SpoolPaths,
)
from mdgateway.queue.envelope import Envelope, EnvelopeFormatError
from mdgateway.queue.ids import QUEUE_ID_LENGTH, is_queue_id


def nothing() -> None:
    pass


def _unlink_quietly(ops: IFileOps, path: str) -> None:
    with suppress(FileNotFoundError):
        ops.unlink(path)


def close_quietly(ops: IFileOps, fd: int | None) -> None:
    if fd is not None:
        with suppress(OSError):
            ops.close(fd)


def _write_all(ops: IFileOps, fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = ops.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def job_create(ops: IFileOps, path: str) -> int:
    fd = ops.create(path)
    try:
        ops.lock(fd, True)
    except BaseException:
        close_quietly(ops, fd)
        with suppress(OSError):
            _unlink_quietly(ops, path)
        raise
    return fd


def job_append(ops: IFileOps, fd: int, path: str, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            _write_all(ops, fd, chunk)
    except BaseException:
        # Give the space back at once: the writer is dead from here on.
        close_quietly(ops, fd)
        with suppress(OSError):
            _unlink_quietly(ops, path)
        raise


def job_commit(
    ops: IFileOps,
    paths: SpoolPaths,
    queue_id: str,
    fd: int,
    chunks: list[bytes],
    envelope: bytes,
) -> None:
    """
    Make the entry durable and visible, in the order that keeps every
    instant safe: message data fsynced; envelope written and fsynced; the
    message named into C{queue/}; the envelope named into C{queue/} last
    (its presence marks the entry complete); C{queue/} fsynced. Our locks
    on both files are held until the end, so a concurrent recovery (another
    process) never takes the half-renamed entry for a dead one.
    """
    message_tmp = os.path.join(paths.incoming, queue_id + MESSAGE_SUFFIX)
    envelope_tmp = os.path.join(paths.incoming, queue_id + ENVELOPE_SUFFIX)
    message = os.path.join(paths.queue, queue_id + MESSAGE_SUFFIX)
    envelope_path = os.path.join(paths.queue, queue_id + ENVELOPE_SUFFIX)
    envelope_fd: int | None = None
    moved_message = moved_envelope = False
    try:
        for chunk in chunks:
            _write_all(ops, fd, chunk)
        ops.fsync(fd)
        envelope_fd = ops.create(envelope_tmp)
        ops.lock(envelope_fd, True)
        _write_all(ops, envelope_fd, envelope)
        ops.fsync(envelope_fd)
        ops.move_noreplace(message_tmp, message)
        moved_message = True
        ops.move_noreplace(envelope_tmp, envelope_path)
        moved_envelope = True
        ops.fsync_directory(paths.queue)
    except BaseException:
        # Undo, envelope first, so that queue/ is left without this entry:
        # the client gets a 4xx and sends again; nothing was acknowledged.
        with suppress(OSError):
            close_quietly(ops, envelope_fd)
            if moved_envelope:
                _unlink_quietly(ops, envelope_path)
            if moved_message:
                _unlink_quietly(ops, message)
            _unlink_quietly(ops, envelope_tmp)
            _unlink_quietly(ops, message_tmp)
        close_quietly(ops, fd)
        raise
    close_quietly(ops, envelope_fd)
    close_quietly(ops, fd)


def job_discard(ops: IFileOps, fd: int | None, path: str) -> None:
    close_quietly(ops, fd)
    _unlink_quietly(ops, path)


def job_free_space(ops: IFileOps, path: str) -> tuple[int, int | None]:
    return ops.free_space(path)


def make_layout(ops: IFileOps, paths: SpoolPaths) -> None:
    created = False
    for directory in (paths.root, *paths.layout):
        created = ops.mkdir(directory) or created
    if created:
        ops.fsync_directory(paths.root)


def job_lock(ops: IFileOps, paths: SpoolPaths, create_root: bool) -> int | None:
    """
    Take the lock of a spool root without blocking: the open lock file, or
    C{None} when another open file holds the lock.

    A lock won on a file that was removed meanwhile (the root's last user
    adopted it away and deleted it) guards nothing, so it is taken again on
    the file now named C{lock}.

    @param create_root: create the root if missing; if false, a missing
        root raises C{FileNotFoundError}.
    """
    for _ in range(LOCK_ATTEMPTS):
        if create_root:
            ops.mkdir(paths.root)
        try:
            fd = ops.open_lock(paths.lock)
        except FileNotFoundError:
            if not create_root:
                raise
            continue  # the root was removed right after we made sure of it
        try:
            busy = not ops.lock(fd, False)
            if not busy and ops.names_file(fd, paths.lock):
                return fd
        except BaseException:
            close_quietly(ops, fd)
            raise
        close_quietly(ops, fd)
        if busy:
            return None
    raise OSError(errno.EAGAIN, "the lock file keeps being replaced", paths.lock)


def _remove_unless_busy(
    ops: IFileOps, path: str, still_orphan: Callable[[], bool] | None = None
) -> bool | None:
    """
    Remove C{path} unless a live process holds its lock (C{None}) or
    C{still_orphan}, asked while we hold the lock, says otherwise
    (C{False}). C{True} when removed.
    """
    try:
        fd = ops.open_existing(path)
    except FileNotFoundError:
        return False
    try:
        if not ops.lock(fd, False):
            return None
        if still_orphan is not None and not still_orphan():
            return False
        _unlink_quietly(ops, path)
        return True
    finally:
        ops.close(fd)


def _absent(ops: IFileOps, path: str) -> bool:
    return not ops.exists(path)


def _read_entry(ops: IFileOps, paths: SpoolPaths, queue_id: str) -> SpoolEntry:
    """
    @raise EnvelopeFormatError: unreadable envelope, or one for another id.
    """
    entry_path = os.path.join(paths.queue, queue_id + ENVELOPE_SUFFIX)
    envelope = Envelope.from_json(ops.read_bytes(entry_path))
    if envelope.queue_id != queue_id:
        raise EnvelopeFormatError(
            f"envelope names queue id {envelope.queue_id!r}, file is {queue_id}"
        )
    size = ops.size(os.path.join(paths.queue, queue_id + MESSAGE_SUFFIX))
    return paths.entry(queue_id, envelope, size)


def _scan_queue(
    ops: IFileOps, paths: SpoolPaths
) -> tuple[dict[str, set[str]], list[str]]:
    found: dict[str, set[str]] = {}
    unknown = []
    for name in ops.listdir(paths.queue):
        stem, suffix = os.path.splitext(name)
        if suffix in (MESSAGE_SUFFIX, ENVELOPE_SUFFIX) and is_queue_id(stem):
            found.setdefault(stem, set()).add(suffix)
        else:
            unknown.append(name)
    return found, sorted(unknown)


def job_list(
    ops: IFileOps, paths: SpoolPaths
) -> tuple[list[SpoolEntry], list[tuple[str, str]]]:
    found, _ = _scan_queue(ops, paths)
    entries, bad = [], []
    for queue_id in sorted(found):
        if found[queue_id] != {MESSAGE_SUFFIX, ENVELOPE_SUFFIX}:
            continue
        try:
            entries.append(_read_entry(ops, paths, queue_id))
        except FileNotFoundError:
            continue  # removed meanwhile
        except EnvelopeFormatError as e:
            bad.append((queue_id, str(e)))
    return entries, bad


def _move_to_corrupt(ops: IFileOps, paths: SpoolPaths, queue_id: str) -> None:
    for suffix in (ENVELOPE_SUFFIX, MESSAGE_SUFFIX):
        with suppress(FileNotFoundError):
            ops.replace(
                os.path.join(paths.queue, queue_id + suffix),
                os.path.join(paths.corrupt, queue_id + suffix),
            )


def job_recover(
    ops: IFileOps, paths: SpoolPaths
) -> tuple[RecoveryReport, list[tuple[str, str]], tuple[int, int | None]]:
    """
    Create the layout, remove what no live writer owns, and list entries.
    Only the layout's directories are scanned: the C{lock} file and
    anything else under the root are left alone.
    """
    make_layout(ops, paths)

    busy: list[str] = []
    partials: list[str] = []
    for name in sorted(ops.listdir(paths.incoming)):
        removed = _remove_unless_busy(ops, os.path.join(paths.incoming, name))
        if removed:
            partials.append(name)
        elif removed is None:
            busy.append("incoming/" + name)

    found, unknown = _scan_queue(ops, paths)
    unfinished: list[str] = []
    corrupt: list[str] = []
    problems: list[tuple[str, str]] = []
    entries: list[SpoolEntry] = []
    for queue_id in sorted(found):
        message = os.path.join(paths.queue, queue_id + MESSAGE_SUFFIX)
        envelope = os.path.join(paths.queue, queue_id + ENVELOPE_SUFFIX)
        if found[queue_id] == {MESSAGE_SUFFIX}:
            # An interrupted commit; a live one holds the lock until its
            # envelope is in place, so check again under the lock.
            removed = _remove_unless_busy(
                ops, message, functools.partial(_absent, ops, envelope)
            )
            if removed:
                unfinished.append(queue_id)
                continue
            if removed is None:
                busy.append("queue/" + queue_id + MESSAGE_SUFFIX)
                continue
            if not ops.exists(envelope):
                continue  # gone meanwhile
        elif not ops.exists(message):
            _move_to_corrupt(ops, paths, queue_id)
            corrupt.append(queue_id)
            problems.append((queue_id, "envelope without message"))
            continue
        try:
            entries.append(_read_entry(ops, paths, queue_id))
        except FileNotFoundError:
            continue
        except EnvelopeFormatError as e:
            _move_to_corrupt(ops, paths, queue_id)
            corrupt.append(queue_id)
            problems.append((queue_id, str(e)))

    live = {entry.queue_id for entry in entries}
    states: list[str] = []
    for name in sorted(ops.listdir(paths.state)):
        path = os.path.join(paths.state, name)
        stem = name[:QUEUE_ID_LENGTH]
        if not is_queue_id(stem) or not name[QUEUE_ID_LENGTH:].startswith(
            ENVELOPE_SUFFIX
        ):
            continue  # not ours
        if name.endswith(TEMP_SUFFIX):
            removed = _remove_unless_busy(ops, path)
        elif name == stem + ENVELOPE_SUFFIX:
            if stem in live or ops.exists(
                os.path.join(paths.queue, stem + ENVELOPE_SUFFIX)
            ):
                continue
            removed = _remove_unless_busy(ops, path)
        else:
            continue
        if removed:
            states.append(name)
        elif removed is None:
            busy.append("state/" + name)

    if partials:
        ops.fsync_directory(paths.incoming)
    if unfinished or corrupt:
        ops.fsync_directory(paths.queue)
    if corrupt:
        ops.fsync_directory(paths.corrupt)
    if states:
        ops.fsync_directory(paths.state)
    report = RecoveryReport(
        entries=tuple(entries),
        removed_partials=tuple(partials),
        removed_unfinished=tuple(unfinished),
        corrupt=tuple(corrupt),
        removed_states=tuple(states),
        busy=tuple(busy),
        unknown=tuple(unknown),
    )
    return report, problems, ops.free_space(paths.root)


def job_write_state(
    ops: IFileOps, paths: SpoolPaths, queue_id: str, data: bytes
) -> None:
    final = os.path.join(paths.state, queue_id + ENVELOPE_SUFFIX)
    temp = f"{final}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
    fd = ops.create(temp)
    try:
        ops.lock(fd, True)
        _write_all(ops, fd, data)
        ops.fsync(fd)
        ops.replace(temp, final)
        ops.fsync_directory(paths.state)
    except BaseException:
        with suppress(OSError):
            _unlink_quietly(ops, temp)
        raise
    finally:
        close_quietly(ops, fd)


def job_list_root(
    ops: IFileOps, paths: SpoolPaths
) -> list[tuple[SpoolEntry, dict[str, Any] | None]]:
    if not ops.exists(paths.queue):
        return []
    entries, _ = job_list(ops, paths)
    out: list[tuple[SpoolEntry, dict[str, Any] | None]] = []
    for entry in entries:
        data = job_read_state(ops, entry.state_path)
        state = None if data is None else decode_state(data)
        out.append((entry, state if isinstance(state, dict) else None))
    return out


def job_read_entry(
    ops: IFileOps, paths: SpoolPaths, queue_id: str
) -> tuple[SpoolEntry, dict[str, Any] | None] | None:
    """
    One complete entry of the root C{paths} and its delivery state, or
    L{None} when it is not there (any more). Reads only.

    @raise EnvelopeFormatError: its envelope cannot be read.
    """
    if not is_queue_id(queue_id):
        return None
    try:
        entry = _read_entry(ops, paths, queue_id)
    except FileNotFoundError:
        return None
    data = job_read_state(ops, entry.state_path)
    state = None if data is None else decode_state(data)
    return entry, state if isinstance(state, dict) else None


def decode_state(data: bytes) -> Any:
    """
    A delivery state file's JSON, or the exception that kept it from being
    read as such.
    """
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return e


def job_read_state(ops: IFileOps, path: str) -> bytes | None:
    try:
        return ops.read_bytes(path)
    except FileNotFoundError:
        return None


def job_remove(ops: IFileOps, paths: SpoolPaths, queue_id: str) -> None:
    """
    Remove an entry: envelope first, made durable, then message and state.

    Taking the envelope away first turns the entry incomplete in one step:
    a crash after it leaves a message without envelope and maybe a state
    file, both cleaned by recovery. Removing the state or the message first
    could leave a complete-looking entry with no state (delivered again to
    every recipient) or an envelope without message (reported as corrupt).
    """
    _unlink_quietly(ops, os.path.join(paths.queue, queue_id + ENVELOPE_SUFFIX))
    ops.fsync_directory(paths.queue)
    _unlink_quietly(ops, os.path.join(paths.queue, queue_id + MESSAGE_SUFFIX))
    _unlink_quietly(ops, os.path.join(paths.state, queue_id + ENVELOPE_SUFFIX))


def job_adopt_entry(
    ops: IFileOps, ours: SpoolPaths, source: SpoolPaths, queue_id: str
) -> bool:
    """
    Move one complete entry from the root C{source} into C{ours} under its
    own id, complete in at least one of the two at every instant.

    The message and the state (if any) are hard-linked in and made durable,
    then the envelope, which completes the entry here, and C{queue/} is made
    durable. Only then does the source lose the envelope (made durable
    first, as in L{job_remove}), the state and the message.

    A name that exists here already is the same file when an earlier
    adoption was cut short, and is kept; if our envelope is the source's,
    the entry is complete here and only the source's copy is removed (our
    state, perhaps newer, stands). Any other existing name is an id
    collision: the links this call made are removed again and the entry
    stays in the source.

    @return: whether the entry was moved; C{False} on a collision.
    """

    join = os.path.join
    message = (
        join(source.queue, queue_id + MESSAGE_SUFFIX),
        join(ours.queue, queue_id + MESSAGE_SUFFIX),
    )
    state = (
        join(source.state, queue_id + ENVELOPE_SUFFIX),
        join(ours.state, queue_id + ENVELOPE_SUFFIX),
    )
    envelope = (
        join(source.queue, queue_id + ENVELOPE_SUFFIX),
        join(ours.queue, queue_id + ENVELOPE_SUFFIX),
    )
    has_state = ops.exists(state[0])
    if not ops.same_file(*envelope):
        made: list[str] = []

        def link(pair: tuple[str, str]) -> bool:
            try:
                ops.link(*pair)
            except FileExistsError:
                return ops.same_file(*pair)
            made.append(pair[1])
            return True

        pairs = [message, state] if has_state else [message]
        if not all(link(pair) for pair in pairs):
            for path in made:
                _unlink_quietly(ops, path)
            return False
        ops.fsync_directory(ours.queue)
        if has_state:
            ops.fsync_directory(ours.state)
        if not link(envelope):
            for path in made:
                _unlink_quietly(ops, path)
            return False
    ops.fsync_directory(ours.queue)
    _unlink_quietly(ops, envelope[0])
    ops.fsync_directory(source.queue)
    _unlink_quietly(ops, state[0])
    _unlink_quietly(ops, message[0])
    if has_state:
        ops.fsync_directory(source.state)
    ops.fsync_directory(source.queue)
    return True


def job_remove_root(ops: IFileOps, paths: SpoolPaths) -> list[str]:
    """
    Remove the root C{paths} if nothing is left in it but its empty layout
    directories and its lock file: those, the lock file, then the root.

    @return: what is left (paths relative to the root), in which case
        nothing was removed; C{[]} when the root is gone.
    """
    remains: list[str] = []
    for name in sorted(ops.listdir(paths.root)):
        path = os.path.join(paths.root, name)
        if name in (SCRATCH, PROCESSED):
            # The processing scratch of the process that owned the root
            # (copies of parts), and the copies it kept for its entries
            # (gone with them; an adopted entry is processed anew): never
            # the only copy of anything.
            shutil.rmtree(path, ignore_errors=True)
            continue
        if path in paths.layout:
            remains.extend(f"{name}/{inner}" for inner in sorted(ops.listdir(path)))
        elif path != paths.lock:
            remains.append(name)
    if remains:
        return remains
    for directory in paths.layout:
        with suppress(FileNotFoundError):
            ops.rmdir(directory)
    _unlink_quietly(ops, paths.lock)
    try:
        ops.rmdir(paths.root)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        # Someone waiting for the lock has just made a new lock file.
        return sorted(ops.listdir(paths.root))
    ops.fsync_directory(os.path.dirname(paths.root))
    return []
