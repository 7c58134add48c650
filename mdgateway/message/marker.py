# -*- test-case-name: tests.test_loop -*-
"""
The processed marker: proof, in a header, that this gateway cluster has
already handled this very content under a given rule, with a given result.

Every message the gateway relays carries one more C{X-MD-Email-Security-Id}
field (the product's own header, so an Office 365 transport-rule exception
keyed on it keeps working)::

    X-MD-Email-Security-Id: <message id>; t=<unix time>; r=<rule>;
     p=<Core profile>/<Core rule>; a=<actions>; v=<result>; s=<0|1>;
     mac=<base64url>

The MAC is HMAC-SHA256, keyed with a secret that every instance of the
cluster shares (L{load_or_create_secret}), over all of these and the
content digest of L{mdgateway.message.digest}: the body byte for byte and
the top-level MIME fields, canonicalised.  So:

  - only a holder of the secret can mint a marker; a marker from another
    gateway (another secret) counts for nothing;
  - a marker copied onto other content, or onto the same body under other
    MIME fields (a text body turned into a base64 attachment by a new
    top-level C{Content-Type}), counts for nothing;
  - the rule, Core profile, actions and result it names are ours: a copy
    that went through a lax rule cannot pass for one a strict rule
    processed (see L{Stamp.permits});
  - markers go stale (L{DEFAULT_MAX_AGE}), so a marker is not a permanent
    pass; the pipeline allows the relay-once pass only for a much younger
    one.

Loop handling by the count of valid markers (L{MarkerCount}): none, a new
message; one, a message we processed coming back once (relayed without a
second scan if L{MarkerCount.relay_once} allows it, otherwise scanned); two
or more, a loop (refused with C{554 5.4.6}).
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
from urllib.parse import quote, unquote

import attrs

from mdgateway.message.digest import HEADER_LIMIT, content_digest
from mdgateway.message.headers import read_header_block

#: The marker header: the product's id header, carrying our MAC.
MARKER_HEADER = "X-MD-Email-Security-Id"
#: Bytes of a newly created secret.
SECRET_SIZE = 32
#: The largest secret file read.
MAX_SECRET_SIZE = 4096
#: How long a marker stays valid (for the loop count), in seconds.
DEFAULT_MAX_AGE = 7 * 24 * 3600.0
#: How long a marker lets a message be relayed once without a second scan.
DEFAULT_RELAY_ONCE_MAX_AGE = 3600.0
#: How far in the future a marker may be (clocks of instances differ).
DEFAULT_MAX_SKEW = 300.0

#: L{MarkerCheck.reason} of a valid marker.
OK = "ok"
#: Reason of a marker whose MAC does not match (forged, another secret, or
#: made for other content).
FORGED = "forged"
#: Reason of a marker older than the maximum age.
STALE = "stale"
#: Reason of a marker from further in the future than the allowed skew.
FUTURE = "future"
#: Prefix of the reason of a value that is not a marker at all.
MALFORMED = "malformed"

#: Blocked actions from the laxest to the strictest.
BLOCKED_RANKS = {"deliver": 0, "strip": 1, "block": 2}
#: Action flags: Deep CDR applied, S/MIME content may be modified.
_FLAGS = ("cdr", "smime")
#: Results of a copy whose content Core scanned: only such a copy may be
#: relayed again without a second scan.
SCANNED_RESULTS = ("Allowed", "Blocked/")

_DOMAIN = b"mdgateway-marker-v2\x00"
_ID = re.compile(r"[A-Za-z0-9._@+-]{1,128}")
_TIME = re.compile(r"[0-9]{1,12}")
_MAC = re.compile(r"[A-Za-z0-9_-]{43}")
_ACTIONS = re.compile(r"(deliver|strip|block)((?:\.(?:cdr|smime))*)")
_SAFE = "/@:+-._~!*"
_KEYS = ("t", "r", "p", "a", "v", "s", "mac")
_LINK_UNSUPPORTED = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK})
# Group write and any access by others.
_UNSAFE_MODE = 0o027


class SecretFileError(Exception):
    """
    The marker secret file cannot be used (too short, too long, not a
    regular file, or open to other users).
    """


def actions_code(blocked_action: str, apply_sanitized: bool, modify_smime: bool) -> str:
    """
    The C{a=} value of a rule's content actions, such as C{strip.cdr}.

    @raise ValueError: for an unknown blocked action.
    """
    if blocked_action not in BLOCKED_RANKS:
        raise ValueError(f"unknown blocked action {blocked_action!r}")
    wanted = (apply_sanitized, modify_smime)
    flags = [flag for flag, on in zip(_FLAGS, wanted, strict=True) if on]
    return ".".join([blocked_action, *flags])


@attrs.frozen
class Stamp:
    """
    What a marker vouches for besides the content: under which rule and
    Core profile the copy was processed, with which content actions, and
    with what result.

    @ivar rule: the security rule's name (for history and logs).
    @ivar profile: C{<Core profile name>/<Core rule>}.
    @ivar actions: L{actions_code} of the rule.
    @ivar result: the C{X-Metadefender-Core-Result} value given.
    @ivar sanitized: whether Deep CDR output replaced content.
    """

    rule: str
    profile: str
    actions: str
    result: str
    sanitized: bool = False

    @property
    def scanned(self) -> bool:
        """
        Whether Core scanned the content (not bypassed, skipped or failed).
        """
        return self.result.startswith(SCANNED_RESULTS)

    def permits(self, current: Stamp) -> bool:
        """
        Whether a copy processed as this stamp says may be relayed without
        a second scan under the rule described by C{current}: its content
        was scanned, with the same Core profile and Core rule, and C{current}
        asks for nothing stricter (a blocked action at most as strict, Deep
        CDR or S/MIME modification only if this copy had it).
        """
        if not self.scanned or self.profile != current.profile:
            return False
        mine, theirs = _parse_actions(self.actions), _parse_actions(current.actions)
        if mine is None or theirs is None:
            return False
        if BLOCKED_RANKS[theirs[0]] > BLOCKED_RANKS[mine[0]]:
            return False
        return theirs[1] <= mine[1]


def _parse_actions(code: str) -> tuple[str, frozenset[str]] | None:
    match = _ACTIONS.fullmatch(code)
    if match is None:
        return None
    return match.group(1), frozenset(filter(None, match.group(2).split(".")))


def _field(value: str) -> bytes:
    data = value.encode("utf-8")
    return b"%d:%s" % (len(data), data)


def _mac(
    secret: bytes, message_id: str, timestamp: int, digest: bytes, stamp: Stamp
) -> bytes:
    data = b"".join(
        [
            _DOMAIN,
            _field(message_id),
            _field(str(timestamp)),
            b"%d:%s" % (len(digest), digest),
            _field(stamp.rule),
            _field(stamp.profile),
            _field(stamp.actions),
            _field(stamp.result),
            _field("1" if stamp.sanitized else "0"),
        ]
    )
    return hmac.new(secret, data, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_marker(
    secret: bytes, message_id: str, now: float, digest: bytes, stamp: Stamp
) -> tuple[str, str]:
    """
    A new marker for a message the gateway processed.

    @param message_id: the gateway's id of the copy (such as its queue id
        and copy number): 1 to 128 of C{A-Z a-z 0-9 . _ @ + -}.
    @param now: seconds since the epoch, from the injected clock.
    @param digest: the L{mdgateway.message.digest} of the message being
        marked, exactly as it is delivered.
    @param stamp: the rule, profile, actions and result to vouch for.
    @return: C{(header name, value)}, ready for
        L{mdgateway.message.headers.format_fields}.
    @raise ValueError: for an id outside that alphabet, bad actions, or an
        empty secret.
    """
    if not secret:
        raise ValueError("empty marker secret")
    if not _ID.fullmatch(message_id):
        raise ValueError(f"message id {message_id!r} cannot go into a marker")
    if _parse_actions(stamp.actions) is None:
        raise ValueError(f"actions {stamp.actions!r} cannot go into a marker")
    timestamp = int(now)
    if not _TIME.fullmatch(str(timestamp)):
        raise ValueError(f"time {now!r} cannot go into a marker")
    mac = _b64(_mac(secret, message_id, timestamp, digest, stamp))
    value = "; ".join(
        [
            message_id,
            f"t={timestamp}",
            f"r={quote(stamp.rule, safe=_SAFE)}",
            f"p={quote(stamp.profile, safe=_SAFE)}",
            f"a={stamp.actions}",
            f"v={quote(stamp.result, safe=_SAFE)}",
            f"s={1 if stamp.sanitized else 0}",
            f"mac={mac}",
        ]
    )
    return MARKER_HEADER, value


@attrs.frozen
class MarkerCheck:
    """
    What one marker value turned out to be.

    @ivar valid: minted with our secret for this content, and neither stale
        nor from the future.
    @ivar reason: L{OK}, L{FORGED}, L{STALE}, L{FUTURE}, or L{MALFORMED}
        followed by C{": "} and what is wrong (for the log).
    @ivar message_id: the id the marker names (C{None} when malformed).
    @ivar time: the marker's time (C{None} when malformed).
    @ivar stamp: what the marker claims (C{None} when malformed); to be
        believed only when C{valid}.
    @ivar value: the field value as it arrived, unfolded.
    """

    valid: bool
    reason: str
    message_id: str | None = None
    time: int | None = None
    stamp: Stamp | None = None
    value: str = ""


def _malformed(detail: str, value: str) -> MarkerCheck:
    return MarkerCheck(False, f"{MALFORMED}: {detail}", value=value)


def check_marker(
    secret: bytes,
    value: str,
    now: float,
    max_age: float = DEFAULT_MAX_AGE,
    max_skew: float = DEFAULT_MAX_SKEW,
    digest: bytes | None = None,
) -> MarkerCheck:
    """
    Check a marker header value (folded or not).

    The MAC is compared in constant time; only a marker with a good MAC is
    then judged by its age, so a forged one is always reported L{FORGED}.

    @param now: seconds since the epoch, from the injected clock.
    @param max_age: seconds after which a marker is L{STALE}.
    @param max_skew: seconds a marker may lie in the future.
    @param digest: the content digest of the message the marker arrived
        on; a marker made for other content is L{FORGED}, and so is every
        marker when there is no digest (a header block too large).
    """
    value = re.sub(r"\r?\n(?=[ \t])", "", value).strip(" \t\r\n")
    parts = [part.strip(" \t") for part in value.split(";")]
    message_id = parts[0]
    if not _ID.fullmatch(message_id):
        return _malformed("bad message id", value)
    params: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, text = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in _KEYS or key in params:
            return _malformed(f"unexpected parameter {key[:20]!r}", value)
        params[key] = text.strip()
    missing = [key for key in _KEYS if key not in params]
    if missing:
        return _malformed(f"no {missing[0]}=", value)
    if not _TIME.fullmatch(params["t"]):
        return _malformed("bad t=", value)
    if not _MAC.fullmatch(params["mac"]):
        return _malformed("bad mac=", value)
    if params["s"] not in ("0", "1") or _parse_actions(params["a"]) is None:
        return _malformed("bad a= or s=", value)
    try:
        given = base64.urlsafe_b64decode(params["mac"] + "=")
        stamp = Stamp(
            rule=unquote(params["r"], errors="strict"),
            profile=unquote(params["p"], errors="strict"),
            actions=params["a"],
            result=unquote(params["v"], errors="strict"),
            sanitized=params["s"] == "1",
        )
    except (binascii.Error, ValueError):
        return _malformed("bad encoding", value)
    timestamp = int(params["t"])
    found = MarkerCheck(False, FORGED, message_id, timestamp, stamp, value)
    if (
        not secret
        or digest is None
        or not hmac.compare_digest(
            given, _mac(secret, message_id, timestamp, digest, stamp)
        )
    ):
        return found
    if timestamp > now + max_skew:
        return attrs.evolve(found, reason=FUTURE)
    if timestamp < now - max_age:
        return attrs.evolve(found, reason=STALE)
    return attrs.evolve(found, valid=True, reason=OK)


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
        The message has been through this cluster before.
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

    @property
    def valid_checks(self) -> tuple[MarkerCheck, ...]:
        """
        The valid markers, each distinct one once, in order.
        """
        seen: set[tuple[str | None, int | None]] = set()
        found = []
        for check in self.checks:
            key = (check.message_id, check.time)
            if check.valid and key not in seen:
                seen.add(key)
                found.append(check)
        return tuple(found)

    def relay_once(
        self, current: Stamp, now: float, max_age: float = DEFAULT_RELAY_ONCE_MAX_AGE
    ) -> MarkerCheck | None:
        """
        The marker that lets this message be relayed once more without a
        second scan under the rule C{current} describes, if any: exactly
        one valid marker (two are a loop), at most C{max_age} seconds old,
        whose stamp L{permits <Stamp.permits>} C{current}.  A C{max_age}
        of 0 turns the pass off.
        """
        if self.valid != 1 or max_age <= 0:
            return None
        (check,) = self.valid_checks
        assert check.stamp is not None and check.time is not None
        if check.time < now - max_age or not check.stamp.permits(current):
            return None
        return check


def scan_markers(
    source: BinaryIO,
    secret: bytes,
    now: float,
    *,
    max_age: float = DEFAULT_MAX_AGE,
    max_skew: float = DEFAULT_MAX_SKEW,
    limit: int = HEADER_LIMIT,
    digest: bytes | None = None,
) -> MarkerCount:
    """
    Find and check every marker field in the top-level header block of a
    message, reading from the file's current position (blocking: run it in
    a worker thread).

    @param limit: the most bytes read; markers beyond are not seen.
    @param digest: the content digest of the message (see
        L{mdgateway.message.digest}).
    """
    block, complete = read_header_block(source, limit)
    headers = BytesHeaderParser(policy=compat32).parsebytes(block)
    checks = tuple(
        check_marker(secret, str(value), now, max_age, max_skew, digest)
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
    L{scan_markers} on a spooled message file, bound to its content
    (blocking).
    """
    digest = content_digest(path)
    with open(path, "rb") as source:
        return scan_markers(
            source,
            secret,
            now,
            max_age=max_age,
            max_skew=max_skew,
            limit=limit,
            digest=digest,
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
