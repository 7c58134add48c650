# -*- test-case-name: tests.test_loop -*-
"""
The processed marker: proof, in a header, that this gateway cluster has
already handled a message.

Every message the gateway relays carries one more C{X-MD-Email-Security-Id}
field (the product's own header, so an Office 365 transport-rule exception
keyed on it keeps working)::

    X-MD-Email-Security-Id: <message id>; t=<unix time>; mac=<base64url>

The MAC is HMAC-SHA256, keyed with a secret that every instance of the
cluster shares (L{load_or_create_secret}), over the message id, the time and
the body.
The secret is the cluster's identity: only a holder can mint a marker, so a
forged one cannot make the gateway skip scanning, and a marker from another
gateway (another secret) counts for nothing.  Old markers go stale
(L{DEFAULT_MAX_AGE}), so a marker is not a permanent pass.

A marker alone would prove that I{we} minted it, not that this content is
what we scanned, so the MAC also covers a digest of the body (L{BodyHasher}):
a marker copied onto another message counts for nothing, and only content
this cluster scanned can skip a second scan.

Loop handling by the count of valid markers (L{MarkerCount}): none, a new
message; one, a message we processed coming back once (relay it); two or
more, a loop (refuse with C{554 5.4.6}).
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import BinaryIO

import attrs

from mdgateway.message.headers import read_header_block

#: The marker header: the product's id header, carrying our MAC.
MARKER_HEADER = "X-MD-Email-Security-Id"
#: Bytes of a newly created secret.
SECRET_SIZE = 32
#: The largest secret file read.
MAX_SECRET_SIZE = 4096
#: How long a marker stays valid, in seconds.
DEFAULT_MAX_AGE = 7 * 24 * 3600.0
#: How far in the future a marker may be (clocks of instances differ).
DEFAULT_MAX_SKEW = 300.0
#: The most of a message's top-level header block read for markers.
HEADER_LIMIT = 256 * 1024

#: L{MarkerCheck.reason} of a valid marker.
OK = "ok"
#: Reason of a marker whose MAC does not match (forged, or another secret).
FORGED = "forged"
#: Reason of a marker older than the maximum age.
STALE = "stale"
#: Reason of a marker from further in the future than the allowed skew.
FUTURE = "future"
#: Prefix of the reason of a value that is not a marker at all.
MALFORMED = "malformed"

_DOMAIN = b"mdgateway-marker-v1\x00"
_ID = re.compile(r"[A-Za-z0-9._@+-]{1,128}")
_TIME = re.compile(r"[0-9]{1,12}")
_MAC = re.compile(r"[A-Za-z0-9_-]{43}")
_LINK_UNSUPPORTED = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK})
# Group write and any access by others.
_UNSAFE_MODE = 0o027


class SecretFileError(Exception):
    """
    The marker secret file cannot be used (too short, too long, not a
    regular file, or open to other users).
    """


def _mac(secret: bytes, message_id: str, timestamp: int, body: bytes) -> bytes:
    data = _DOMAIN + message_id.encode("ascii") + b"\x00" + b"%d" % timestamp
    return hmac.new(secret, data + b"\x00" + body, hashlib.sha256).digest()


class BodyHasher:
    """
    SHA-256 of a message's body (everything after the top-level header
    block), fed in pieces as the message streams.

    Binding the marker to the body means a marker copied onto another
    message counts for nothing: only the content we scanned can skip a
    second scan.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._tail = b"\r\n"
        self._in_body = False

    def feed(self, data: bytes) -> None:
        if self._in_body:
            self._hash.update(data)
            return
        text = self._tail + data
        end = text.find(b"\r\n\r\n")
        if end < 0:
            self._tail = text[-3:]
            return
        self._in_body = True
        self._hash.update(text[end + 4 :])

    def digest(self) -> bytes:
        return self._hash.digest()


def body_digest(path: str, chunk: int = 1 << 20) -> bytes:
    """
    L{BodyHasher} over a whole file (blocking).
    """
    hasher = BodyHasher()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            hasher.feed(data)
    return hasher.digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_marker(
    secret: bytes, message_id: str, now: float, body: bytes = b""
) -> tuple[str, str]:
    """
    A new marker for a message the gateway processed.

    @param message_id: the gateway's id of the message (such as its queue
        id): 1 to 128 of C{A-Z a-z 0-9 . _ @ + -}.
    @param now: seconds since the epoch, from the injected clock.
    @param body: the L{BodyHasher} digest of the message being marked.
    @return: C{(header name, value)}, ready for
        L{mdgateway.message.headers.format_fields}.
    @raise ValueError: for an id outside that alphabet, or an empty secret.
    """
    if not secret:
        raise ValueError("empty marker secret")
    if not _ID.fullmatch(message_id):
        raise ValueError(f"message id {message_id!r} cannot go into a marker")
    timestamp = int(now)
    if not _TIME.fullmatch(str(timestamp)):
        raise ValueError(f"time {now!r} cannot go into a marker")
    mac = _b64(_mac(secret, message_id, timestamp, body))
    return MARKER_HEADER, f"{message_id}; t={timestamp}; mac={mac}"


@attrs.frozen
class MarkerCheck:
    """
    What one marker value turned out to be.

    @ivar valid: minted with our secret, and neither stale nor from the
        future.
    @ivar reason: L{OK}, L{FORGED}, L{STALE}, L{FUTURE}, or L{MALFORMED}
        followed by C{": "} and what is wrong (for the log).
    @ivar message_id: the id the marker names (C{None} when malformed).
    @ivar time: the marker's time (C{None} when malformed).
    """

    valid: bool
    reason: str
    message_id: str | None = None
    time: int | None = None


def _malformed(detail: str) -> MarkerCheck:
    return MarkerCheck(False, f"{MALFORMED}: {detail}")


def check_marker(
    secret: bytes,
    value: str,
    now: float,
    max_age: float = DEFAULT_MAX_AGE,
    max_skew: float = DEFAULT_MAX_SKEW,
    body: bytes = b"",
) -> MarkerCheck:
    """
    Check a marker header value (folded or not).

    The MAC is compared in constant time; only a marker with a good MAC is
    then judged by its age, so a forged one is always reported L{FORGED}.

    @param now: seconds since the epoch, from the injected clock.
    @param max_age: seconds after which a marker is L{STALE}.
    @param max_skew: seconds a marker may lie in the future.
    @param body: the digest of the body the marker arrived with; a marker
        made for another body is L{FORGED}.
    """
    parts = [part.strip(" \t\r\n") for part in value.split(";")]
    if len(parts) != 3:
        return _malformed(f"{len(parts)} parts, expected 3")
    message_id = parts[0]
    if not _ID.fullmatch(message_id):
        return _malformed("bad message id")
    params: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, text = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in ("t", "mac") or key in params:
            return _malformed(f"unexpected parameter {key[:20]!r}")
        params[key] = text.strip()
    if "t" not in params or not _TIME.fullmatch(params["t"]):
        return _malformed("bad t=")
    if "mac" not in params or not _MAC.fullmatch(params["mac"]):
        return _malformed("bad mac=")
    timestamp = int(params["t"])
    try:
        given = base64.urlsafe_b64decode(params["mac"] + "=")
    except (binascii.Error, ValueError):
        return _malformed("bad mac=")
    if not secret or not hmac.compare_digest(
        given, _mac(secret, message_id, timestamp, body)
    ):
        return MarkerCheck(False, FORGED, message_id, timestamp)
    if timestamp > now + max_skew:
        return MarkerCheck(False, FUTURE, message_id, timestamp)
    if timestamp < now - max_age:
        return MarkerCheck(False, STALE, message_id, timestamp)
    return MarkerCheck(True, OK, message_id, timestamp)


@attrs.frozen
class MarkerCount:
    """
    The markers found in a message's top-level header block.

    @ivar valid: how many distinct valid markers (distinct by id and time:
        a copied field counts once).
    @ivar checks: every marker field, in order, with its verdict.
    @ivar complete: the header block ended within the read limit (when it
        did not, markers after the limit were not seen).
    """

    valid: int
    checks: tuple[MarkerCheck, ...]
    complete: bool

    @property
    def processed(self) -> bool:
        """
        The message has been through this cluster before (relay it once).
        """
        return self.valid >= 1

    @property
    def looped(self) -> bool:
        """
        The message came back again: refuse it with C{554 5.4.6}.
        """
        return self.valid >= 2

    @property
    def invalid(self) -> tuple[MarkerCheck, ...]:
        """
        The markers that count for nothing (forged, stale, future,
        malformed), for the log.
        """
        return tuple(check for check in self.checks if not check.valid)


def scan_markers(
    source: BinaryIO,
    secret: bytes,
    now: float,
    *,
    max_age: float = DEFAULT_MAX_AGE,
    max_skew: float = DEFAULT_MAX_SKEW,
    limit: int = HEADER_LIMIT,
    body: bytes = b"",
) -> MarkerCount:
    """
    Find and check every marker field in the top-level header block of a
    message, reading from the file's current position (blocking: run it in
    a worker thread).

    @param limit: the most bytes read; markers beyond are not seen.
    @param body: the L{BodyHasher} digest of the message's body.
    """
    block, complete = read_header_block(source, limit)
    headers = BytesHeaderParser(policy=compat32).parsebytes(block)
    checks = tuple(
        check_marker(secret, str(value), now, max_age, max_skew, body)
        for value in headers.get_all(MARKER_HEADER, [])
    )
    distinct = {(c.message_id, c.time) for c in checks if c.valid}
    return MarkerCount(valid=len(distinct), checks=checks, complete=complete)


def read_markers(
    path: str,
    secret: bytes,
    now: float,
    *,
    max_age: float = DEFAULT_MAX_AGE,
    max_skew: float = DEFAULT_MAX_SKEW,
    limit: int = HEADER_LIMIT,
) -> MarkerCount:
    """
    L{scan_markers} on a spooled message file, bound to its body (blocking).
    """
    body = body_digest(path)
    with open(path, "rb") as source:
        return scan_markers(
            source,
            secret,
            now,
            max_age=max_age,
            max_skew=max_skew,
            limit=limit,
            body=body,
        )


# --------------------------------------------------------------------------
# The secret file


class _IncompleteError(Exception):
    pass


def _read_secret(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{path} is not a regular file")
        if info.st_mode & _UNSAFE_MODE:
            raise SecretFileError(
                f"{path} is open to other users (mode {info.st_mode & 0o777:o}); "
                "make it 0600 or 0400 (0640 or 0440 for a group)"
            )
        data = b""
        while len(data) <= MAX_SECRET_SIZE:
            more = os.read(fd, MAX_SECRET_SIZE + 1 - len(data))
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_SIZE:
        raise SecretFileError(f"{path} is longer than {MAX_SECRET_SIZE} bytes")
    if len(data) < SECRET_SIZE:
        raise _IncompleteError(len(data))
    return data


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_secret(path: str) -> None:
    """
    Publish a new secret at C{path} unless one exists: written whole into
    a private temporary file, then linked to C{path}, which fails if another
    instance got there first.  Readers therefore never see a partial file.
    """
    directory = os.path.dirname(path)
    temp = os.path.join(
        directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp"
    )
    secret = secrets.token_bytes(SECRET_SIZE)
    _write_new(temp, secret)
    try:
        os.link(temp, path)
    except FileExistsError:
        return
    except OSError as e:
        if e.errno not in _LINK_UNSUPPORTED:
            raise
        # No hard links (some network file systems): create the name itself
        # exclusively; a racing reader may see it short and waits.
        try:
            _write_new(path, secret)
        except FileExistsError:
            return
    finally:
        os.unlink(temp)
    _fsync_directory(directory)


def load_or_create_secret(
    path: str, *, sleep: Callable[[float], None] = time.sleep
) -> bytes:
    """
    The cluster's marker secret, read from C{path}; on first start, 32
    random bytes are written there (mode 0600, missing folders made 0700).

    Blocking: call it from a worker thread, or before the reactor runs.
    Instances starting at once on a shared folder all end up with the one
    secret that was created first; copy the file to instances that do not
    share a folder.  Any file of 32 to 4096 bytes is used whole as the key,
    so an operator may also provide one (not readable by other users).

    @param sleep: waits while another instance finishes a file on a file
        system without hard links.
    @raise SecretFileError: when the file cannot be used.
    @raise OSError: when it can neither be read nor created.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
    problem = "keeps disappearing"
    for _ in range(100):
        try:
            return _read_secret(path)
        except FileNotFoundError:
            _create_secret(path)
        except _IncompleteError as e:
            problem = f"holds {e.args[0]} bytes; a secret needs {SECRET_SIZE} or more"
            sleep(0.02)
    raise SecretFileError(f"{path} {problem}")
