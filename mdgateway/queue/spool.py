# -*- test-case-name: tests.test_spool -*-
"""
The durable spool: where an accepted message lives from C{250} until it is done.

The SMTP server streams a message into a L{SpoolWriter} and may answer
C{250 2.0.0 Ok: queued as <id>} only once L{SpoolWriter.commit} has returned:
by then the message bytes and the L{Envelope} are fsynced and renamed into
C{queue/}. The pipeline later reads entries, keeps per-recipient delivery
state beside them and removes an entry last. A crash at any instant leaves
either no entry or a complete one; duplicates after a crash are acceptable,
loss is not.

Layout under the spool root (directories 0700, files 0600)::

    incoming/<id>.eml       message being received (flock-ed by its writer)
    incoming/<id>.json      envelope being committed
    queue/<id>.eml          committed message, bytes exactly as received
    queue/<id>.json         committed envelope; its presence marks a complete entry
    state/<id>.json         mutable delivery state, replaced atomically
    corrupt/                envelopes recovery could not use, kept for an operator
    lock                    flock-ed by the one process using this root

Anything else under the root (such as the C{workers/} roots of other
processes) is not this spool's: recovery never looks at it. A spool can
adopt the entries of another root (L{Spool.adopt}), so that a root no
process uses any more does not strand its mail.

All disk work runs in an injected thread pool, never on the reactor thread.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import functools
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredLock, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

_T = TypeVar("_T")

#: The envelope format this code writes; it reads this and older ones.
ENVELOPE_VERSION = 1

_MESSAGE_SUFFIX = ".eml"
_ENVELOPE_SUFFIX = ".json"
_TEMP_SUFFIX = ".tmp"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: The folder under a spool root where processing keeps its scratch files
#: (see L{mdgateway.queue.manager}); nothing in it outlives its process.
SCRATCH = "work"
#: Seconds between attempts to take a spool root's lock while waiting.
_LOCK_RETRY = 0.25
#: Times the lock is taken again when its file was replaced meanwhile.
_LOCK_ATTEMPTS = 5


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


class EnvelopeFormatError(ValueError):
    """
    Envelope JSON that this version cannot read.
    """


def _spool_error(exc: BaseException) -> SpoolError:
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
# Queue ids

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TIME_CHARS = 9
_RANDOM_CHARS = 11
_TIME_BITS = 5 * _TIME_CHARS
_RANDOM_BITS = 5 * _RANDOM_CHARS
#: Length of every queue id.
QUEUE_ID_LENGTH = _TIME_CHARS + _RANDOM_CHARS
_QUEUE_ID_RE = re.compile(f"[{_CROCKFORD}]{{{QUEUE_ID_LENGTH}}}")


def is_queue_id(text: str) -> bool:
    """
    Whether C{text} has the shape of a queue id (and so is safe in a path).
    """
    return _QUEUE_ID_RE.fullmatch(text) is not None


def _base32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class QueueIdGenerator:
    """
    Makes queue ids: 20 characters of Crockford base32, the first 9 the
    milliseconds of the injected clock, the rest 55 random bits.

    Ids sort by time, which keeps listings in arrival order and tells an
    operator an entry's age at a glance. Independent processes sharing
    nothing collide only by chance (55 bits per millisecond); within one
    generator ids are strictly increasing even when the clock stands still
    or steps back, because the random part is then incremented.

    @ivar _last: the (milliseconds, random) pair of the previous id.
    """

    def __init__(
        self,
        clock: IReactorTime,
        randbits: Callable[[int], int] = secrets.randbits,
    ) -> None:
        """
        @param clock: where time comes from.
        @param randbits: C{randbits(n)} returns C{n} random bits.
        """
        self._clock = clock
        self._randbits = randbits
        self._last: tuple[int, int] = (-1, 0)

    def __call__(self) -> str:
        millis = max(0, int(self._clock.seconds() * 1000)) % (1 << _TIME_BITS)
        last_millis, last_random = self._last
        if millis <= last_millis:
            millis, rand = last_millis, last_random + 1
            if rand >> _RANDOM_BITS:
                millis, rand = millis + 1, self._randbits(_RANDOM_BITS)
        else:
            rand = self._randbits(_RANDOM_BITS)
        self._last = (millis, rand)
        return _base32(millis, _TIME_CHARS) + _base32(rand, _RANDOM_CHARS)


# --------------------------------------------------------------------------
# Envelope


def _str_params(value: Mapping[str, str | None]) -> dict[str, str | None]:
    return dict(value)


@attrs.frozen
class Recipient:
    """
    One accepted RCPT TO.

    @ivar address: the forward-path, UTF-8 allowed (SMTPUTF8).
    @ivar parameters: RCPT parameters as received, e.g. C{NOTIFY}, C{ORCPT};
        a keyword without value maps to C{None}. Treat as read-only.
    @ivar rule: name of the security rule chosen at RCPT time.
    @ivar direction: the rule's direction (e.g. C{inbound}, C{outbound}).
    """

    address: str
    parameters: dict[str, str | None] = attrs.field(factory=dict, converter=_str_params)
    rule: str | None = None
    direction: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """
        This recipient as a JSON-ready dict.
        """
        return {
            "address": self.address,
            "parameters": dict(self.parameters),
            "rule": self.rule,
            "direction": self.direction,
        }

    @classmethod
    def from_dict(cls, data: object) -> Recipient:
        """
        Read what L{to_dict} wrote.

        @raise EnvelopeFormatError: when a field has the wrong type.
        """
        obj = _object(data, "recipient")
        return cls(
            address=_get_str(obj, "address", "recipient"),
            parameters=_get_params(obj, "parameters", "recipient"),
            rule=_get_opt_str(obj, "rule", "recipient"),
            direction=_get_opt_str(obj, "direction", "recipient"),
        )


def _recipients(value: Iterable[Recipient]) -> tuple[Recipient, ...]:
    return tuple(value)


@attrs.frozen
class Envelope:
    """
    Everything about a message except its bytes, as the SMTP session saw it.

    Written once at commit and never changed; delivery progress goes to the
    entry's state file instead, so the envelope cannot be half rewritten.

    @ivar queue_id: the spool id; L{SpoolWriter.commit} fills it in when empty.
    @ivar received_at: when the message arrived, seconds since the epoch from
        the injected clock.
    @ivar sender: the reverse-path; C{""} for the null reverse-path C{<>}.
    @ivar mail_parameters: MAIL FROM parameters (C{SIZE}, C{BODY},
        C{SMTPUTF8}, C{RET}, C{ENVID}, C{AUTH}); keyword without value is
        C{None}. Treat as read-only.
    @ivar recipients: the accepted recipients, in RCPT order.
    @ivar client_address: the client's IP address (after PROXY, if any).
    @ivar client_port: the client's port.
    @ivar client_helo: the EHLO/HELO argument.
    @ivar tls: whether the transaction ran over TLS.
    @ivar tls_version: e.g. C{TLSv1.3}.
    @ivar tls_cipher: the negotiated cipher name.
    @ivar authenticated_user: the authenticated user, if AUTH succeeded.
    @ivar protocol: C{SMTP}, C{ESMTP}, C{ESMTPS}, C{ESMTPA} or C{ESMTPSA}
        (RFC 3848), as in the Received header.
    @ivar listener: name of the listener that took the message.
    @ivar config_version: version of the configuration in force.
    @ivar extra: a JSON object for later additions without a format change.
    @ivar version: the envelope format version, L{ENVELOPE_VERSION}.
    """

    queue_id: str
    received_at: float
    sender: str
    recipients: tuple[Recipient, ...] = attrs.field(converter=_recipients)
    mail_parameters: dict[str, str | None] = attrs.field(
        factory=dict, converter=_str_params
    )
    client_address: str | None = None
    client_port: int | None = None
    client_helo: str | None = None
    tls: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    authenticated_user: str | None = None
    protocol: str = "ESMTP"
    listener: str = ""
    config_version: str = ""
    extra: dict[str, Any] = attrs.field(factory=dict)
    version: int = ENVELOPE_VERSION

    def to_json(self) -> str:
        """
        The envelope as a JSON text (not ASCII-escaped; encode as UTF-8).

        @raise ValueError: for values JSON cannot carry (NaN, lone surrogates
            are caught when encoding).
        """
        return json.dumps(
            {
                "version": self.version,
                "queue_id": self.queue_id,
                "received_at": self.received_at,
                "sender": self.sender,
                "mail_parameters": dict(self.mail_parameters),
                "recipients": [r.to_dict() for r in self.recipients],
                "client_address": self.client_address,
                "client_port": self.client_port,
                "client_helo": self.client_helo,
                "tls": self.tls,
                "tls_version": self.tls_version,
                "tls_cipher": self.tls_cipher,
                "authenticated_user": self.authenticated_user,
                "protocol": self.protocol,
                "listener": self.listener,
                "config_version": self.config_version,
                "extra": self.extra,
            },
            ensure_ascii=False,
            allow_nan=False,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        """
        Read what L{to_json} wrote (bytes are decoded as UTF-8).

        Unknown keys are ignored so that a later minor addition does not
        strand mail; a newer format version is refused.

        @raise EnvelopeFormatError: when the text is not an envelope this
            version can read.
        """
        try:
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            data = json.loads(text)
        except (UnicodeDecodeError, ValueError) as e:
            raise EnvelopeFormatError(f"envelope is not JSON: {e}") from e
        obj = _object(data, "envelope")
        version = obj.get("version")
        if type(version) is not int or not 1 <= version <= ENVELOPE_VERSION:
            raise EnvelopeFormatError(f"unsupported envelope version {version!r}")
        received_at = obj.get("received_at")
        if not isinstance(received_at, int | float) or isinstance(received_at, bool):
            raise EnvelopeFormatError("envelope: received_at must be a number")
        recipients = obj.get("recipients")
        if not isinstance(recipients, list):
            raise EnvelopeFormatError("envelope: recipients must be a list")
        port = obj.get("client_port")
        if port is not None and type(port) is not int:
            raise EnvelopeFormatError("envelope: client_port must be an integer")
        tls = obj.get("tls", False)
        if type(tls) is not bool:
            raise EnvelopeFormatError("envelope: tls must be true or false")
        extra = obj.get("extra", {})
        if not isinstance(extra, dict):
            raise EnvelopeFormatError("envelope: extra must be an object")
        return cls(
            version=version,
            queue_id=_get_str(obj, "queue_id", "envelope"),
            received_at=float(received_at),
            sender=_get_str(obj, "sender", "envelope"),
            mail_parameters=_get_params(obj, "mail_parameters", "envelope"),
            recipients=tuple(Recipient.from_dict(r) for r in recipients),
            client_address=_get_opt_str(obj, "client_address", "envelope"),
            client_port=port,
            client_helo=_get_opt_str(obj, "client_helo", "envelope"),
            tls=tls,
            tls_version=_get_opt_str(obj, "tls_version", "envelope"),
            tls_cipher=_get_opt_str(obj, "tls_cipher", "envelope"),
            authenticated_user=_get_opt_str(obj, "authenticated_user", "envelope"),
            protocol=_get_str(obj, "protocol", "envelope", "ESMTP"),
            listener=_get_str(obj, "listener", "envelope", ""),
            config_version=_get_str(obj, "config_version", "envelope", ""),
            extra=extra,
        )


def _object(data: object, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise EnvelopeFormatError(f"{what} must be a JSON object")
    return data


def _get_str(
    obj: dict[str, Any], key: str, what: str, default: str | None = None
) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise EnvelopeFormatError(f"{what}: {key} must be a string")
    return value


def _get_opt_str(obj: dict[str, Any], key: str, what: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise EnvelopeFormatError(f"{what}: {key} must be a string or null")
    return value


def _get_params(obj: dict[str, Any], key: str, what: str) -> dict[str, str | None]:
    value = obj.get(key, {})
    if not isinstance(value, dict) or not all(
        v is None or isinstance(v, str) for v in value.values()
    ):
        raise EnvelopeFormatError(f"{what}: {key} must map names to strings")
    return value


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
class _Paths:
    root: str
    incoming: str
    queue: str
    state: str
    corrupt: str
    lock: str

    @classmethod
    def under(cls, root: str) -> _Paths:
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
            message_path=os.path.join(self.queue, queue_id + _MESSAGE_SUFFIX),
            envelope_path=os.path.join(self.queue, queue_id + _ENVELOPE_SUFFIX),
            state_path=os.path.join(self.state, queue_id + _ENVELOPE_SUFFIX),
            size=size,
        )


# --------------------------------------------------------------------------
# File operations seam


class IFileOps(Interface):
    """
    The blocking file-system calls the spool makes, all from pool threads.

    A seam so tests can simulate a full disk; L{OSFileOps} is the real one.
    """

    def create(path: str) -> int:  # noqa: N805
        """
        Create a new file for writing (C{O_CREAT|O_EXCL}, mode 0600) and
        return its descriptor. C{FileExistsError} if it exists.
        """

    def open_existing(path: str) -> int:  # noqa: N805
        """
        Open an existing file read-only (used to test its lock).
        """

    def write(fd: int, data: bytes | memoryview) -> int:  # noqa: N805
        """
        Write some of C{data}; return how many bytes were written.
        """

    def fsync(fd: int) -> None:  # noqa: N805
        """
        Flush the file's data and metadata to stable storage.
        """

    def close(fd: int) -> None:  # noqa: N805
        """
        Close a descriptor (and so release its lock).
        """

    def lock(fd: int, blocking: bool) -> bool:  # noqa: N805
        """
        Take an exclusive advisory lock (C{flock}); return C{False} if
        C{blocking} is false and another open file holds it.
        """

    def move_noreplace(source: str, destination: str) -> None:  # noqa: N805
        """
        Give C{source} the name C{destination} (same file system) unless
        C{destination} exists (C{FileExistsError}).
        """

    def replace(source: str, destination: str) -> None:  # noqa: N805
        """
        Atomically rename C{source} over C{destination}.
        """

    def unlink(path: str) -> None:  # noqa: N805
        """
        Remove a name. C{FileNotFoundError} if absent.
        """

    def fsync_directory(path: str) -> None:  # noqa: N805
        """
        Make the directory's entries (creations, renames, removals) durable.
        """

    def listdir(path: str) -> list[str]:  # noqa: N805
        """
        Names in a directory.
        """

    def read_bytes(path: str) -> bytes:  # noqa: N805
        """
        A whole (small) file.
        """

    def exists(path: str) -> bool:  # noqa: N805
        """
        Whether a name exists.
        """

    def size(path: str) -> int:  # noqa: N805
        """
        A file's size in bytes.
        """

    def mkdir(path: str) -> bool:  # noqa: N805
        """
        Create a directory with mode 0700 (and missing parents); return
        C{False} if it existed.
        """

    def free_space(path: str) -> tuple[int, int | None]:  # noqa: N805
        """
        Bytes and inodes available to unprivileged users on the file
        system of C{path}; inodes are C{None} where it does not count them.
        """

    def open_lock(path: str) -> int:  # noqa: N805
        """
        Open the lock file C{path} for L{lock}, creating it (mode 0600) if
        missing; C{FileNotFoundError} if its directory is missing.
        """

    def names_file(fd: int, path: str) -> bool:  # noqa: N805
        """
        Whether C{path} still names the open file C{fd} (C{False} when it
        names nothing or another file).
        """

    def link(source: str, destination: str) -> None:  # noqa: N805
        """
        Give the file C{source} the further name C{destination} (a hard
        link, same file system); C{FileExistsError} if C{destination}
        exists.
        """

    def same_file(first: str, second: str) -> bool:  # noqa: N805
        """
        Whether both names exist and name one file.
        """

    def rmdir(path: str) -> None:  # noqa: N805
        """
        Remove an empty directory.
        """


@implementer(IFileOps)
class OSFileOps:
    """
    L{IFileOps} on the real file system.
    """

    def create(self, path: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        return os.open(path, flags, 0o600)

    def open_existing(self, path: str) -> int:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def lock(self, fd: int, blocking: bool) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def move_noreplace(self, source: str, destination: str) -> None:
        # A hard link fails on an existing destination, where rename would
        # silently replace an acknowledged entry on an id collision.
        try:
            os.link(source, destination)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # File systems without hard links: check, then rename.
            if os.path.lexists(destination):
                raise FileExistsError(errno.EEXIST, "exists", destination) from e
            os.replace(source, destination)
            return
        os.unlink(source)

    def replace(self, source: str, destination: str) -> None:
        os.replace(source, destination)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_directory(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def mkdir(self, path: str) -> bool:
        try:
            os.makedirs(path, 0o700)
        except FileExistsError:
            return False
        return True

    def free_space(self, path: str) -> tuple[int, int | None]:
        st = os.statvfs(path)
        inodes = st.f_favail if st.f_files else None
        return st.f_bavail * st.f_frsize, inodes

    def open_lock(self, path: str) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(path, flags, 0o600)

    def names_file(self, fd: int, path: str) -> bool:
        try:
            named = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        opened = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

    def link(self, source: str, destination: str) -> None:
        os.link(source, destination, follow_symlinks=False)

    def same_file(self, first: str, second: str) -> bool:
        try:
            a = os.stat(first, follow_symlinks=False)
            b = os.stat(second, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)


# --------------------------------------------------------------------------
# Blocking jobs (run in pool threads; they touch no shared Python state)


def _nothing() -> None:
    pass


def _unlink_quietly(ops: IFileOps, path: str) -> None:
    with suppress(FileNotFoundError):
        ops.unlink(path)


def _close_quietly(ops: IFileOps, fd: int | None) -> None:
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


def _job_create(ops: IFileOps, path: str) -> int:
    fd = ops.create(path)
    try:
        ops.lock(fd, True)
    except BaseException:
        _close_quietly(ops, fd)
        with suppress(OSError):
            _unlink_quietly(ops, path)
        raise
    return fd


def _job_append(ops: IFileOps, fd: int, path: str, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            _write_all(ops, fd, chunk)
    except BaseException:
        # Give the space back at once: the writer is dead from here on.
        _close_quietly(ops, fd)
        with suppress(OSError):
            _unlink_quietly(ops, path)
        raise


def _job_commit(
    ops: IFileOps,
    paths: _Paths,
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
    message_tmp = os.path.join(paths.incoming, queue_id + _MESSAGE_SUFFIX)
    envelope_tmp = os.path.join(paths.incoming, queue_id + _ENVELOPE_SUFFIX)
    message = os.path.join(paths.queue, queue_id + _MESSAGE_SUFFIX)
    envelope_path = os.path.join(paths.queue, queue_id + _ENVELOPE_SUFFIX)
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
            _close_quietly(ops, envelope_fd)
            if moved_envelope:
                _unlink_quietly(ops, envelope_path)
            if moved_message:
                _unlink_quietly(ops, message)
            _unlink_quietly(ops, envelope_tmp)
            _unlink_quietly(ops, message_tmp)
        _close_quietly(ops, fd)
        raise
    _close_quietly(ops, envelope_fd)
    _close_quietly(ops, fd)


def _job_discard(ops: IFileOps, fd: int | None, path: str) -> None:
    _close_quietly(ops, fd)
    _unlink_quietly(ops, path)


def _job_free_space(ops: IFileOps, path: str) -> tuple[int, int | None]:
    return ops.free_space(path)


def _make_layout(ops: IFileOps, paths: _Paths) -> None:
    created = False
    for directory in (paths.root, *paths.layout):
        created = ops.mkdir(directory) or created
    if created:
        ops.fsync_directory(paths.root)


def _job_lock(ops: IFileOps, paths: _Paths, create_root: bool) -> int | None:
    """
    Take the lock of a spool root without blocking: the open lock file, or
    C{None} when another open file holds the lock.

    A lock won on a file that was removed meanwhile (the root's last user
    adopted it away and deleted it) guards nothing, so it is taken again on
    the file now named C{lock}.

    @param create_root: create the root if missing; if false, a missing
        root raises C{FileNotFoundError}.
    """
    for _ in range(_LOCK_ATTEMPTS):
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
            _close_quietly(ops, fd)
            raise
        _close_quietly(ops, fd)
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


def _read_entry(ops: IFileOps, paths: _Paths, queue_id: str) -> SpoolEntry:
    """
    @raise EnvelopeFormatError: unreadable envelope, or one for another id.
    """
    entry_path = os.path.join(paths.queue, queue_id + _ENVELOPE_SUFFIX)
    envelope = Envelope.from_json(ops.read_bytes(entry_path))
    if envelope.queue_id != queue_id:
        raise EnvelopeFormatError(
            f"envelope names queue id {envelope.queue_id!r}, file is {queue_id}"
        )
    size = ops.size(os.path.join(paths.queue, queue_id + _MESSAGE_SUFFIX))
    return paths.entry(queue_id, envelope, size)


def _scan_queue(ops: IFileOps, paths: _Paths) -> tuple[dict[str, set[str]], list[str]]:
    found: dict[str, set[str]] = {}
    unknown = []
    for name in ops.listdir(paths.queue):
        stem, suffix = os.path.splitext(name)
        if suffix in (_MESSAGE_SUFFIX, _ENVELOPE_SUFFIX) and is_queue_id(stem):
            found.setdefault(stem, set()).add(suffix)
        else:
            unknown.append(name)
    return found, sorted(unknown)


def _job_list(
    ops: IFileOps, paths: _Paths
) -> tuple[list[SpoolEntry], list[tuple[str, str]]]:
    found, _ = _scan_queue(ops, paths)
    entries, bad = [], []
    for queue_id in sorted(found):
        if found[queue_id] != {_MESSAGE_SUFFIX, _ENVELOPE_SUFFIX}:
            continue
        try:
            entries.append(_read_entry(ops, paths, queue_id))
        except FileNotFoundError:
            continue  # removed meanwhile
        except EnvelopeFormatError as e:
            bad.append((queue_id, str(e)))
    return entries, bad


def _move_to_corrupt(ops: IFileOps, paths: _Paths, queue_id: str) -> None:
    for suffix in (_ENVELOPE_SUFFIX, _MESSAGE_SUFFIX):
        with suppress(FileNotFoundError):
            ops.replace(
                os.path.join(paths.queue, queue_id + suffix),
                os.path.join(paths.corrupt, queue_id + suffix),
            )


def _job_recover(
    ops: IFileOps, paths: _Paths
) -> tuple[RecoveryReport, list[tuple[str, str]], tuple[int, int | None]]:
    """
    Create the layout, remove what no live writer owns, and list entries.
    Only the layout's directories are scanned: the C{lock} file and
    anything else under the root are left alone.
    """
    _make_layout(ops, paths)

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
        message = os.path.join(paths.queue, queue_id + _MESSAGE_SUFFIX)
        envelope = os.path.join(paths.queue, queue_id + _ENVELOPE_SUFFIX)
        if found[queue_id] == {_MESSAGE_SUFFIX}:
            # An interrupted commit; a live one holds the lock until its
            # envelope is in place, so check again under the lock.
            removed = _remove_unless_busy(
                ops, message, functools.partial(_absent, ops, envelope)
            )
            if removed:
                unfinished.append(queue_id)
                continue
            if removed is None:
                busy.append("queue/" + queue_id + _MESSAGE_SUFFIX)
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
            _ENVELOPE_SUFFIX
        ):
            continue  # not ours
        if name.endswith(_TEMP_SUFFIX):
            removed = _remove_unless_busy(ops, path)
        elif name == stem + _ENVELOPE_SUFFIX:
            if stem in live or ops.exists(
                os.path.join(paths.queue, stem + _ENVELOPE_SUFFIX)
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


def _job_write_state(ops: IFileOps, paths: _Paths, queue_id: str, data: bytes) -> None:
    final = os.path.join(paths.state, queue_id + _ENVELOPE_SUFFIX)
    temp = f"{final}.{secrets.token_hex(6)}{_TEMP_SUFFIX}"
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
        _close_quietly(ops, fd)


def _job_list_root(
    ops: IFileOps, paths: _Paths
) -> list[tuple[SpoolEntry, dict[str, Any] | None]]:
    if not ops.exists(paths.queue):
        return []
    entries, _ = _job_list(ops, paths)
    out: list[tuple[SpoolEntry, dict[str, Any] | None]] = []
    for entry in entries:
        data = _job_read_state(ops, entry.state_path)
        state = None if data is None else _decode_state(data)
        out.append((entry, state if isinstance(state, dict) else None))
    return out


def _decode_state(data: bytes) -> Any:
    """
    A delivery state file's JSON, or the exception that kept it from being
    read as such.
    """
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return e


def _job_read_state(ops: IFileOps, path: str) -> bytes | None:
    try:
        return ops.read_bytes(path)
    except FileNotFoundError:
        return None


def _job_remove(ops: IFileOps, paths: _Paths, queue_id: str) -> None:
    """
    Remove an entry: envelope first, made durable, then message and state.

    Taking the envelope away first turns the entry incomplete in one step:
    a crash after it leaves a message without envelope and maybe a state
    file, both cleaned by recovery. Removing the state or the message first
    could leave a complete-looking entry with no state (delivered again to
    every recipient) or an envelope without message (reported as corrupt).
    """
    _unlink_quietly(ops, os.path.join(paths.queue, queue_id + _ENVELOPE_SUFFIX))
    ops.fsync_directory(paths.queue)
    _unlink_quietly(ops, os.path.join(paths.queue, queue_id + _MESSAGE_SUFFIX))
    _unlink_quietly(ops, os.path.join(paths.state, queue_id + _ENVELOPE_SUFFIX))


def _job_adopt_entry(
    ops: IFileOps, ours: _Paths, source: _Paths, queue_id: str
) -> bool:
    """
    Move one complete entry from the root C{source} into C{ours} under its
    own id, complete in at least one of the two at every instant.

    The message and the state (if any) are hard-linked in and made durable,
    then the envelope, which completes the entry here, and C{queue/} is made
    durable. Only then does the source lose the envelope (made durable
    first, as in L{_job_remove}), the state and the message.

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
        join(source.queue, queue_id + _MESSAGE_SUFFIX),
        join(ours.queue, queue_id + _MESSAGE_SUFFIX),
    )
    state = (
        join(source.state, queue_id + _ENVELOPE_SUFFIX),
        join(ours.state, queue_id + _ENVELOPE_SUFFIX),
    )
    envelope = (
        join(source.queue, queue_id + _ENVELOPE_SUFFIX),
        join(ours.queue, queue_id + _ENVELOPE_SUFFIX),
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


def _job_remove_root(ops: IFileOps, paths: _Paths) -> list[str]:
    """
    Remove the root C{paths} if nothing is left in it but its empty layout
    directories and its lock file: those, the lock file, then the root.

    @return: what is left (paths relative to the root), in which case
        nothing was removed; C{[]} when the root is gone.
    """
    remains: list[str] = []
    for name in sorted(ops.listdir(paths.root)):
        path = os.path.join(paths.root, name)
        if name == SCRATCH:
            # The processing scratch of the process that owned the root:
            # copies of parts, never the only copy of anything.
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


# --------------------------------------------------------------------------
# Writer


class ISpoolWriter(Interface):
    """
    One message being received into the spool.

    Call L{write} for each piece of the body as it arrives; pause reading
    from the client when it returns C{False} and resume when the callback
    given to L{on_drained} runs. Then either L{commit} (answer C{250} when it
    returns) or L{abort}.
    """

    queue_id = Attribute("The entry's queue id (str), fixed at open.")
    opened_at = Attribute("When the writer was opened (float, epoch seconds).")
    size = Attribute("Bytes accepted by write() so far (int).")
    buffered_bytes = Attribute("Bytes held in memory, not yet on disk (int).")
    error = Attribute(
        "The SpoolError that killed this writer, or None; once set, write() "
        "discards data and commit() raises it."
    )
    full = Attribute("Whether error is a SpoolFullError (answer 452 4.3.1).")

    def write(data: bytes) -> bool:  # noqa: N805
        """
        Take some message bytes without blocking. Return C{False} when the
        caller should stop reading from the client until L{on_drained} fires.
        """

    def on_drained(callback: Callable[[], object]) -> None:  # noqa: N805
        """
        Call C{callback} once, on the reactor thread, when the buffer has
        drained enough to read again (at once if it already has). Not called
        after L{abort}.
        """

    def commit(envelope: Envelope) -> Deferred[SpoolEntry]:  # noqa: N805
        """
        Flush, fsync and move the message and its envelope into the queue.
        Fires with the L{SpoolEntry} once both are durable; fails with
        L{SpoolFullError} or L{SpoolError}, and then nothing is queued.
        """

    def abort() -> Deferred[None]:  # noqa: N805
        """
        Drop the message and delete its partial file. Idempotent and safe
        while a flush is in flight; a no-op once L{commit} was called.
        """


class _Phase(enum.Enum):
    OPEN = "open"
    COMMITTING = "committing"
    COMMITTED = "committed"
    FAILED = "failed"
    ABORTED = "aborted"


@implementer(ISpoolWriter)
class SpoolWriter:
    """
    Streams one message into C{incoming/<id>.eml}.

    Writes go to an in-memory buffer; once it holds C{flush_size} bytes they
    are handed to the thread pool, one job at a time per writer so the file
    is written in order. C{write} returns C{False} when C{buffer_size} bytes
    are held (buffered plus in flight), and drain callbacks run when that
    falls to half. A caller that pauses on C{False} keeps the memory of one
    message near C{buffer_size} plus one read.

    Create with L{Spool.open_writer}.
    """

    _log = Logger()

    def __init__(self, spool: Spool, queue_id: str, opened_at: float) -> None:
        self._spool = spool
        self.queue_id = queue_id
        self.opened_at = opened_at
        self.size = 0
        self.error: SpoolError | None = None
        self._path = os.path.join(spool._paths.incoming, queue_id + _MESSAGE_SUFFIX)
        self._phase = _Phase.OPEN
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._inflight_size = 0
        self._fd: int | None = None
        self._opened = False
        self._busy = False
        self._discarded = False
        self._drain_callbacks: list[Callable[[], object]] = []
        self._commit_waiter: Deferred[SpoolEntry] | None = None
        self._abort_waiters: list[Deferred[None]] = []
        self._envelope: Envelope | None = None
        self._envelope_bytes = b""
        self._start(
            self._opened_file, self._job_failed, _job_create, spool._ops, self._path
        )

    def __repr__(self) -> str:
        return f"<SpoolWriter {self.queue_id} {self._phase.value} size={self.size}>"

    @property
    def buffered_bytes(self) -> int:
        return self._pending_size + self._inflight_size

    @property
    def full(self) -> bool:
        return isinstance(self.error, SpoolFullError)

    def _below_limit(self) -> bool:
        return self.buffered_bytes < self._spool._buffer_size

    def write(self, data: bytes) -> bool:
        if self._phase is _Phase.ABORTED or self.error is not None:
            return True  # discarded; keep reading to the end of the message
        if self._phase is not _Phase.OPEN:
            raise RuntimeError(f"write() on a {self._phase.value} spool writer")
        if data:
            data = bytes(data)
            self._pending.append(data)
            self._pending_size += len(data)
            self.size += len(data)
            self._pump()
        return self._below_limit()

    def on_drained(self, callback: Callable[[], object]) -> None:
        if self._phase is _Phase.ABORTED:
            return
        if self.error is not None or self._drained():
            callback()
        else:
            self._drain_callbacks.append(callback)

    def _drained(self) -> bool:
        return self.buffered_bytes <= self._spool._buffer_size // 2

    def commit(self, envelope: Envelope) -> Deferred[SpoolEntry]:
        if self._phase is not _Phase.OPEN:
            return fail(SpoolError(f"commit() on a {self._phase.value} writer"))
        if envelope.queue_id not in ("", self.queue_id):
            raise ValueError(
                f"envelope for {envelope.queue_id!r} committed to {self.queue_id}"
            )
        envelope = attrs.evolve(envelope, queue_id=self.queue_id)
        try:
            data = envelope.to_json().encode("utf-8")
        except (TypeError, ValueError) as e:
            self.abort()
            return fail(SpoolError(f"envelope cannot be stored: {e}"))
        if self.error is not None:
            self._phase = _Phase.FAILED
            self._spool._forget(self)
            return fail(self.error)
        self._phase = _Phase.COMMITTING
        self._envelope, self._envelope_bytes = envelope, data
        waiter: Deferred[SpoolEntry] = Deferred()
        self._commit_waiter = waiter
        self._pump()
        return waiter

    def abort(self) -> Deferred[None]:
        if self._phase in (_Phase.COMMITTING, _Phase.COMMITTED):
            return succeed(None)
        if self._phase is _Phase.ABORTED and self._discarded and not self._busy:
            return succeed(None)
        self._phase = _Phase.ABORTED
        self._pending, self._pending_size = [], 0
        self._drain_callbacks = []
        waiter: Deferred[None] = Deferred()
        self._abort_waiters.append(waiter)
        self._pump()
        return waiter

    # The job queue: at most one job in the pool at a time.

    def _take_pending(self) -> list[bytes]:
        chunks, self._pending = self._pending, []
        self._inflight_size, self._pending_size = self._pending_size, 0
        return chunks

    def _pump(self) -> None:
        if self._busy:
            return
        if self._phase is _Phase.ABORTED:
            if not self._discarded:
                self._discarded = True
                fd, self._fd = self._fd, None
                self._start(
                    self._discarded_file,
                    self._discard_failed,
                    _job_discard,
                    self._spool._ops,
                    fd,
                    self._path,
                )
            return
        if self.error is not None or not self._opened or self._fd is None:
            return  # failed, not yet open, or already committed
        if self._phase is _Phase.COMMITTING:
            self._start(
                self._committed,
                self._job_failed,
                _job_commit,
                self._spool._ops,
                self._spool._paths,
                self.queue_id,
                self._fd,
                self._take_pending(),
                self._envelope_bytes,
            )
        elif self._pending_size >= self._spool._flush_size:
            self._start(
                self._appended,
                self._job_failed,
                _job_append,
                self._spool._ops,
                self._fd,
                self._path,
                self._take_pending(),
            )

    def _start(
        self,
        on_result: Callable[[Any], None],
        on_failure: Callable[[Failure], None],
        job: Callable[..., Any],
        *args: Any,
    ) -> None:
        self._busy = True
        d = self._spool._run(job, *args)
        d.addCallbacks(on_result, on_failure)
        d.addErrback(self._log_bug)
        d.addCallback(self._job_done)
        d.addErrback(self._log_bug)

    def _job_done(self, _: object) -> None:
        self._busy = False
        self._pump()
        if self._drain_callbacks and (self.error is not None or self._drained()):
            callbacks, self._drain_callbacks = self._drain_callbacks, []
            for callback in callbacks:
                callback()

    def _log_bug(self, failure: Failure) -> None:
        self._log.failure(
            "spool writer {queue_id} bug", failure, queue_id=self.queue_id
        )

    def _opened_file(self, fd: int) -> None:
        self._fd = fd
        self._opened = True

    def _appended(self, _: None) -> None:
        self._inflight_size = 0

    def _committed(self, _: None) -> None:
        self._fd = None
        self._inflight_size = 0
        self._phase = _Phase.COMMITTED
        assert self._envelope is not None and self._commit_waiter is not None
        entry = self._spool._paths.entry(self.queue_id, self._envelope, self.size)
        self._spool._committed(self, entry)
        waiter, self._commit_waiter = self._commit_waiter, None
        waiter.callback(entry)

    def _discarded_file(self, _: None) -> None:
        self._spool._forget(self)
        waiters, self._abort_waiters = self._abort_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _discard_failed(self, failure: Failure) -> None:
        self._log.failure(
            "could not remove aborted spool file {path}", failure, path=self._path
        )
        self._discarded_file(None)

    def _job_failed(self, failure: Failure) -> None:
        # The job closed the file and removed it before failing.
        self._fd = None
        self._inflight_size = 0
        self._pending, self._pending_size = [], 0
        self.error = _spool_error(failure.value or SpoolError("unknown failure"))
        self._spool._write_failed(self.error)
        self._log.warn(
            "spool writer {queue_id} failed: {error}",
            queue_id=self.queue_id,
            error=str(self.error),
        )
        if self._phase is _Phase.COMMITTING:
            self._phase = _Phase.FAILED
            self._spool._forget(self)
            waiter, self._commit_waiter = self._commit_waiter, None
            assert waiter is not None
            waiter.errback(self.error)


# --------------------------------------------------------------------------
# Spool


class Spool:
    """
    The spool directory of one gateway instance.

    Call L{recover} once at start, before any L{open_writer}: it takes the
    root's lock, creates the layout, removes what a crash left half done
    and returns the entries to process. The lock is held until L{close},
    so a second process on the same root fails at start with
    L{SpoolInUseError} instead of delivering this one's mail twice. To
    wait for a predecessor that is still draining, or to L{adopt} the
    entries of other roots, call L{acquire} before L{recover}::

        await spool.acquire(wait=30)
        for root in stale_roots:
            await spool.adopt(root)
        entries = await spool.recover()

    (Besides the lock, entry ids are unique across processes and files a
    live writer holds are flock-ed, so recovery never cleans away the work
    of a live writer.)

    @ivar last_recovery: what the last L{recover} found.
    """

    _log = Logger()

    def __init__(
        self,
        root: FilePath[str] | str,
        reactor: IReactorTime,
        threadpool: ThreadPool,
        *,
        fileops: IFileOps | None = None,
        new_queue_id: Callable[[], str] | None = None,
        buffer_size: int = 256 * 1024,
        flush_size: int = 64 * 1024,
        min_free_bytes: int = 64 * 1024 * 1024,
        min_free_inodes: int = 1000,
        space_check_interval: float = 1.0,
    ) -> None:
        """
        @param root: the spool directory (created by L{acquire} if missing).
        @param reactor: provides L{IReactorTime} and L{IReactorFromThreads}.
        @param threadpool: runs every blocking call; started by the caller.
        @param fileops: the file-system calls; L{OSFileOps} by default.
        @param new_queue_id: makes queue ids; a L{QueueIdGenerator} on
            C{reactor} by default.
        @param buffer_size: bytes a writer holds before asking to pause.
        @param flush_size: bytes a writer gathers before writing them out.
        @param min_free_bytes: below this much free space L{writable} is
            false.
        @param min_free_inodes: below this many free inodes (where the file
            system counts them) L{writable} is false.
        @param space_check_interval: seconds a free-space reading is reused.
        """
        path = root.path if isinstance(root, FilePath) else os.fspath(root)
        self._paths = _Paths.under(os.path.abspath(path))
        self._clock = reactor
        self._threads = IReactorFromThreads(reactor)
        self._pool = threadpool
        self._ops: IFileOps = fileops if fileops is not None else OSFileOps()
        self._new_queue_id = new_queue_id or QueueIdGenerator(reactor)
        self._buffer_size = buffer_size
        self._flush_size = min(flush_size, buffer_size)
        self._min_free_bytes = min_free_bytes
        self._min_free_inodes = min_free_inodes
        self._space_interval = space_check_interval
        self._space_ok = True
        self._space_checked = float("-inf")
        self._space_checking = False
        self._recovered = False
        self._writers: set[SpoolWriter] = set()
        self._settled_waiters: dict[SpoolWriter, list[Deferred[None]]] = {}
        self._closed = False
        self._entries: dict[str, float] = {}
        self._locks: dict[str, DeferredLock] = {}
        self._lock_fd: int | None = None
        self._acquiring = DeferredLock()
        self.last_recovery: RecoveryReport | None = None
        self.corrupt_count = 0

    @property
    def root(self) -> str:
        """
        The spool directory.
        """
        return self._paths.root

    def _run(self, job: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(self._threads, self._pool, job, *args)

    # Start-up

    async def acquire(self, wait: float = 0.0) -> None:
        """
        Create the root if needed and take its lock (C{flock} on
        C{<root>/lock}), held until L{close}. Does nothing once held.

        @param wait: seconds of the injected clock to keep trying, every
            0.25 s, while another process holds the lock (a predecessor
            still draining); the wait is logged once.
        @raise SpoolInUseError: when another process still holds it.
        @raise SpoolError: when the root or the lock file cannot be made.
        @raise RuntimeError: after L{close}.
        """
        await self._acquiring.acquire()
        try:
            if self._lock_fd is None:
                try:
                    self._lock_fd = await self._take_lock(self._paths, wait, True)
                except OSError as e:
                    raise _spool_error(e) from e
        finally:
            self._acquiring.release()

    async def _take_lock(self, paths: _Paths, wait: float, create_root: bool) -> int:
        """
        The open lock file of the root C{paths}, locked by us.

        @raise SpoolInUseError: when another holds it for C{wait} seconds.
        @raise OSError: from L{_job_lock}.
        """
        deadline = self._clock.seconds() + wait
        waiting = False
        while True:
            if self._closed:
                raise RuntimeError("the spool is closed")
            fd = await self._run(_job_lock, self._ops, paths, create_root)
            if fd is not None:
                if self._closed:
                    await self._run(_close_quietly, self._ops, fd)
                    raise RuntimeError("the spool is closed")
                return fd
            now = self._clock.seconds()
            if now >= deadline:
                raise SpoolInUseError(
                    f"spool directory {paths.root} is in use by another process"
                )
            if not waiting:
                waiting = True
                self._log.warn(
                    "spool directory {directory} is in use by another process; "
                    "waiting up to {wait} s for it",
                    directory=paths.root,
                    wait=wait,
                )
            await deferLater(self._clock, min(_LOCK_RETRY, deadline - now), _nothing)

    async def adopt(self, source_root: FilePath[str] | str | os.PathLike[str]) -> int:
        """
        Move the complete entries of another spool root into this one,
        keeping their queue ids, and remove that root if nothing else is
        left in it; L{recover} then returns them with this spool's own.

        For a root no process uses any more (a worker that is no longer
        configured), so that its mail is not stranded. Call it after
        L{acquire} and before L{recover}: the entries must be in place when
        recovery lists them.

        The source's lock is taken first. Its leftovers of a crash are
        cleaned up as its own recovery would (partial files removed,
        unusable envelopes kept in its C{corrupt/}); then each complete
        entry is moved so that a crash at any point leaves it complete in
        at least one of the two roots (see L{_job_adopt_entry}); an
        adoption cut short is completed by the next one without
        duplicates. An entry whose id exists here already stays in the
        source, with a warning; so does anything else not a spool entry.

        @param source_root: the root to empty; a missing one adopts nothing.
        @return: the number of entries moved.
        @raise RuntimeError: without our lock, after L{recover}, or after
            L{close}.
        @raise ValueError: when C{source_root} is this spool's root.
        @raise SpoolInUseError: when another process holds the source's
            lock; nothing was touched.
        @raise SpoolError: when the disk failed; what was moved is here,
            the rest is still in the source (and perhaps in both).
        """
        if self._lock_fd is None or self._recovered or self._closed:
            raise RuntimeError(
                "Spool.adopt() must come after acquire() and before recover()"
            )
        path = source_root.path if isinstance(source_root, FilePath) else source_root
        source = _Paths.under(os.path.abspath(os.fspath(path)))
        if source.root == self._paths.root:
            raise ValueError(f"a spool cannot adopt its own root {source.root}")
        try:
            fd = await self._take_lock(source, 0.0, False)
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise _spool_error(e) from e
        try:
            adopted = await self._adopt_locked(source)
        except OSError as e:
            raise _spool_error(e) from e
        finally:
            await self._run(_close_quietly, self._ops, fd)
        self._log.info(
            "adopted {count} spool entries from {source}",
            count=adopted,
            source=source.root,
        )
        return adopted

    async def _adopt_locked(self, source: _Paths) -> int:
        await self._run(_make_layout, self._ops, self._paths)
        report, problems, _ = await self._run(_job_recover, self._ops, source)
        self._report_recovery(source, report, problems)
        adopted = 0
        for entry in report.entries:
            moved = await self._run(
                _job_adopt_entry, self._ops, self._paths, source, entry.queue_id
            )
            if moved:
                adopted += 1
            else:
                self._log.warn(
                    "spool entry {queue_id} of {source} is not adopted: its id "
                    "is taken in {root}; it stays in {source}",
                    queue_id=entry.queue_id,
                    source=source.root,
                    root=self._paths.root,
                )
        remains = await self._run(_job_remove_root, self._ops, source)
        if remains:
            self._log.warn(
                "spool directory {source} is kept: it still holds {remains}",
                source=source.root,
                remains=remains,
            )
        return adopted

    async def recover(self) -> list[SpoolEntry]:
        """
        Take the root's lock (see L{acquire}) unless held, create the
        layout if needed and clean up after a crash.

        Removes partial files in C{incoming/} and messages in C{queue/}
        without an envelope (interrupted commits, never acknowledged);
        moves envelopes without message, or unreadable ones, to
        C{corrupt/} with a critical log line; removes orphan state files.
        Files locked by a live writer are left alone, and so is everything
        outside the layout's directories.

        @return: the complete entries, oldest first.
        @raise SpoolInUseError: when another process holds the lock.
        """
        if self._lock_fd is None:
            await self.acquire()
        report, problems, space = await self._run(_job_recover, self._ops, self._paths)
        self.last_recovery = report
        self._entries = {e.queue_id: e.envelope.received_at for e in report.entries}
        self._recovered = True
        self._space_result(space)
        self._report_recovery(self._paths, report, problems)
        self._log.info(
            "spool recovered: {entries} entries, {partials} partial files removed",
            entries=len(report.entries),
            partials=len(report.removed_partials),
        )
        return list(report.entries)

    def _report_recovery(
        self, paths: _Paths, report: RecoveryReport, problems: list[tuple[str, str]]
    ) -> None:
        """
        Count and log what the recovery of the root C{paths} found wrong.
        """
        self.corrupt_count += len(report.corrupt)
        for queue_id, problem in problems:
            self._log.critical(
                "spool entry {queue_id} is corrupt ({problem}); moved to {corrupt}",
                queue_id=queue_id,
                problem=problem,
                corrupt=paths.corrupt,
            )
        if report.removed_unfinished:
            self._log.warn(
                "removed {count} unfinished spool entries: {queue_ids}",
                count=len(report.removed_unfinished),
                queue_ids=list(report.removed_unfinished),
            )
        if report.unknown:
            self._log.warn(
                "unknown files in {queue}: {names}",
                queue=paths.queue,
                names=list(report.unknown),
            )

    # Receiving

    def open_writer(self) -> SpoolWriter:
        """
        Start receiving a message. Returns at once; the file is created in
        the pool, and a failure to create it surfaces as the writer's
        C{error} and from C{commit}.

        @raise RuntimeError: before L{recover} has completed, or after
            L{close}.
        """
        if not self._recovered:
            raise RuntimeError("Spool.recover() must complete before open_writer()")
        if self._closed:
            raise RuntimeError("the spool is closed")
        writer = SpoolWriter(self, self._new_queue_id(), self._clock.seconds())
        if writer.error is None and writer._phase is _Phase.OPEN:
            self._writers.add(writer)
        return writer

    def _committed(self, writer: SpoolWriter, entry: SpoolEntry) -> None:
        self._entries[entry.queue_id] = entry.envelope.received_at
        self._forget(writer)

    def _forget(self, writer: SpoolWriter) -> None:
        """
        C{writer} is done (committed, failed or its file removed).
        """
        self._writers.discard(writer)
        waiters = self._settled_waiters.pop(writer, [])
        for waiter in waiters:
            waiter.callback(None)

    async def close(self) -> None:
        """
        Stop taking messages and let disk work in flight finish, so the
        thread pool can be stopped: writers still receiving are aborted
        (their files removed), commits under way complete, state changes
        under way land; then the root's lock is released. After this,
        L{open_writer} raises and L{writable} is false.
        """
        self._closed = True
        waits: list[Deferred[Any]] = []
        for writer in list(self._writers):
            waiter: Deferred[None] = Deferred()
            self._settled_waiters.setdefault(writer, []).append(waiter)
            waits.append(waiter)
            writer.abort()
        for lock in list(self._locks.values()):
            waits.append(lock.acquire().addCallback(lambda lock: lock.release()))
        try:
            await gatherResults(waits)
        finally:
            fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                await self._run(_close_quietly, self._ops, fd)

    def _write_failed(self, error: SpoolError) -> None:
        self._space_ok = False
        self._space_checked = self._clock.seconds()

    # Readiness and metrics

    def writable(self) -> bool:
        """
        Whether new mail should be accepted: recovery is done, free space
        and inodes are above their thresholds, and no write failed in the
        last C{space_check_interval}. Cheap: the reading is cached and
        refreshed in the pool.
        """
        now = self._clock.seconds()
        if self._recovered and not self._closed and not self._space_checking:
            if now - self._space_checked >= self._space_interval:
                self._space_checking = True
                d = self._run(_job_free_space, self._ops, self._paths.root)
                d.addCallbacks(self._space_result, self._space_failed)
        return self._recovered and not self._closed and self._space_ok

    def _space_result(self, space: tuple[int, int | None]) -> None:
        free_bytes, free_inodes = space
        self._space_checking = False
        self._space_checked = self._clock.seconds()
        self._space_ok = free_bytes >= self._min_free_bytes and (
            free_inodes is None or free_inodes >= self._min_free_inodes
        )

    def _space_failed(self, failure: Failure) -> None:
        self._space_checking = False
        self._space_checked = self._clock.seconds()
        self._space_ok = False
        self._log.failure("cannot read free space of the spool", failure)

    @property
    def entry_count(self) -> int:
        """
        Number of committed entries not yet removed.
        """
        return len(self._entries)

    @property
    def active_writers(self) -> int:
        """
        Number of messages being received.
        """
        return len(self._writers)

    def oldest_age(self) -> float:
        """
        Seconds since the oldest entry was received; 0 when empty.
        """
        if not self._entries:
            return 0.0
        return max(0.0, self._clock.seconds() - min(self._entries.values()))

    # Entries

    async def list_entries(self) -> list[SpoolEntry]:
        """
        The complete entries now in the queue, oldest first. Changes
        nothing; unreadable envelopes are logged and left for L{recover}.
        """
        entries, bad = await self._run(_job_list, self._ops, self._paths)
        for queue_id, problem in bad:
            self._log.critical(
                "spool entry {queue_id} is unreadable: {problem}",
                queue_id=queue_id,
                problem=problem,
            )
        return entries

    async def list_root(
        self, root: str
    ) -> list[tuple[SpoolEntry, dict[str, Any] | None]]:
        """
        The complete entries of another process's spool root (a worker's),
        with their delivery state, oldest first. Reads only: the owner
        renames every file into place, so what is read is whole.
        """
        return await self._run(_job_list_root, self._ops, _Paths.under(root))

    async def _serially(self, queue_id: str, job: Callable[..., _T], *args: Any) -> _T:
        """
        Run C{job} after any earlier state change of the same entry, so
        the last write wins on disk as it did in the caller.
        """
        lock = self._locks.get(queue_id)
        if lock is None:
            lock = self._locks[queue_id] = DeferredLock()
        await lock.acquire()
        try:
            return await self._run(job, *args)
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(queue_id, None)

    async def read_state(self, entry: SpoolEntry) -> dict[str, Any] | None:
        """
        The delivery state last written for C{entry}, or C{None} if none was
        (or it is unreadable, which is logged: the entry is then treated as
        new, giving duplicates rather than loss).
        """
        data = await self._serially(
            entry.queue_id, _job_read_state, self._ops, entry.state_path
        )
        if data is None:
            return None
        state = _decode_state(data)
        if not isinstance(state, dict):
            self._log.critical(
                "delivery state of {queue_id} is unreadable ({problem}); starting over",
                queue_id=entry.queue_id,
                problem=repr(state),
            )
            return None
        return state

    async def write_state(self, entry: SpoolEntry, state: Mapping[str, Any]) -> None:
        """
        Replace the delivery state of C{entry} atomically and durably
        (temporary file, fsync, rename, fsync of the directory).

        @param state: a JSON object; serialised now, so later changes to it
            do not leak into this write.
        @raise SpoolError: when it could not be written; the old state stands.
        """
        data = json.dumps(dict(state), ensure_ascii=False, allow_nan=False)
        try:
            await self._serially(
                entry.queue_id,
                _job_write_state,
                self._ops,
                self._paths,
                entry.queue_id,
                data.encode("utf-8"),
            )
        except OSError as e:
            raise _spool_error(e) from e

    async def remove(self, entry: SpoolEntry) -> None:
        """
        Remove a finished entry: envelope first (made durable), then
        message and state; see L{_job_remove} for why this order.
        """
        try:
            await self._serially(
                entry.queue_id, _job_remove, self._ops, self._paths, entry.queue_id
            )
        except OSError as e:
            raise _spool_error(e) from e
        self._entries.pop(entry.queue_id, None)
