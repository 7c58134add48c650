# -*- test-case-name: tests.test_spool -*-
"""
A committed spool entry, the spool's errors, and where an entry's files live
under a spool root.
"""

from __future__ import annotations

import errno
import os

import attrs

from mdgateway.queue.envelope import Envelope

MESSAGE_SUFFIX = ".eml"
ENVELOPE_SUFFIX = ".json"
TEMP_SUFFIX = ".tmp"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: The folder under a spool root where processing keeps its scratch files
#: (see L{mdgateway.queue.manager}); nothing in it outlives its process.
SCRATCH = "work"
#: The folder under a spool root where the pipeline keeps what it made of
#: each entry's copies until the entry is done (see
#: L{mdgateway.queue.scanned}).
PROCESSED = "processed"
#: Seconds between attempts to take a spool root's lock while waiting.
LOCK_RETRY = 0.25
#: Times the lock is taken again when its file was replaced meanwhile.
LOCK_ATTEMPTS = 5


# --------------------------------------------------------------------------
# Errors


class SpoolError(Exception):
    """
    The spool could not store or change an entry; nothing was queued.
    The SMTP server answers C{451 4.3.0}.
    """


class SpoolFullError(SpoolError):
    """
    The file system is full or over quota (C{ENOSPC}, C{EDQUOT}); nothing
    was queued. The SMTP server answers C{452 4.3.1}.
    """


class SpoolInUseError(SpoolError):
    """
    Another process holds the lock of the spool root. Two processes on one
    root would deliver each other's messages twice and clean away each
    other's work, so the second one does not start.
    """


def spool_error(exc: BaseException) -> SpoolError:
    """
    Map a failure from the disk onto the error the SMTP server acts on.
    """
    if isinstance(exc, SpoolError):
        return exc
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        err: SpoolError = SpoolFullError(f"spool full: {exc}")
    else:
        err = SpoolError(f"spool failure: {exc!r}")
    err.__cause__ = exc
    return err


# --------------------------------------------------------------------------
# Entries


@attrs.frozen
class SpoolEntry:
    """
    A complete, committed spool entry.

    @ivar queue_id: its id.
    @ivar envelope: its envelope.
    @ivar message_path: the message file (read it in a thread).
    @ivar envelope_path: the envelope file.
    @ivar state_path: where its delivery state lives (may not exist yet).
    @ivar size: the message size in bytes.
    """

    queue_id: str
    envelope: Envelope
    message_path: str
    envelope_path: str
    state_path: str
    size: int


@attrs.frozen
class RecoveryReport:
    """
    What L{Spool.recover} found and did.

    @ivar entries: the complete entries, oldest id first.
    @ivar removed_partials: names removed from C{incoming/}.
    @ivar removed_unfinished: ids whose message was in C{queue/} without an
        envelope (an interrupted commit, never acknowledged): removed.
    @ivar corrupt: ids moved to C{corrupt/}: an envelope without its
        message, or an envelope that cannot be read.
    @ivar removed_states: names removed from C{state/} (temporary files and
        states of entries that no longer exist).
    @ivar busy: files left alone because a live writer holds their lock.
    @ivar unknown: names in C{queue/} that are not spool files.
    """

    entries: tuple[SpoolEntry, ...]
    removed_partials: tuple[str, ...] = ()
    removed_unfinished: tuple[str, ...] = ()
    corrupt: tuple[str, ...] = ()
    removed_states: tuple[str, ...] = ()
    busy: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()


@attrs.frozen
class SpoolPaths:
    root: str
    incoming: str
    queue: str
    state: str
    corrupt: str
    lock: str

    @classmethod
    def under(cls, root: str) -> SpoolPaths:
        join = os.path.join
        return cls(
            root=root,
            incoming=join(root, "incoming"),
            queue=join(root, "queue"),
            state=join(root, "state"),
            corrupt=join(root, "corrupt"),
            lock=join(root, "lock"),
        )

    @property
    def layout(self) -> tuple[str, ...]:
        """
        The directories of the layout, in creation order.
        """
        return (self.incoming, self.queue, self.state, self.corrupt)

    def entry(self, queue_id: str, envelope: Envelope, size: int) -> SpoolEntry:
        return SpoolEntry(
            queue_id=queue_id,
            envelope=envelope,
            message_path=os.path.join(self.queue, queue_id + MESSAGE_SUFFIX),
            envelope_path=os.path.join(self.queue, queue_id + ENVELOPE_SUFFIX),
            state_path=os.path.join(self.state, queue_id + ENVELOPE_SUFFIX),
            size=size,
        )
