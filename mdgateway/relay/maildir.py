# -*- test-case-name: tests.test_maildir -*-
"""
The C{maildir:} relay server type: delivery into a local folder.

Operators use it for archive copies, air gaps and the default
configuration's C{delivered} folder.  A message is written once, not once
per recipient, as C{FOLDER/new/<unique>.eml}: readable by any mail client,
and one file however many recipients.  The envelope goes into the first
lines, as a delivery agent records it::

    Return-Path: <sender>
    X-Mdgateway-Envelope-To: <first recipient>
    X-Mdgateway-Envelope-To: <second recipient>

(not C{Delivered-To}, which MTAs read as a loop when a file is fed back to
them with several.)  Then come the caller's new header bytes and the
spooled message from an offset, copied in 64 KiB chunks.

Delivery is Maildir's: the file is written under C{tmp/} with a unique
name, fsynced, linked into C{new/} (never over an existing name) and the
folder fsynced, so a reader of C{new/} sees whole messages only, and a
crash leaves at most a stray file in C{tmp/}.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import socket
from collections.abc import Sequence
from contextlib import suppress

from mdgateway.fileops import IFileOps, OSFileOps

#: Bytes copied at a time.
CHUNK_SIZE = 64 * 1024
#: Suffix of delivered files.
SUFFIX = ".eml"
#: The header carrying each envelope recipient.
ENVELOPE_TO = "X-Mdgateway-Envelope-To"

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_ATTEMPTS = 5
_counter = itertools.count()


class MaildirError(OSError):
    """
    A delivery into a folder failed; nothing was delivered.  Always
    temporary: the operator frees space or fixes permissions and the relay
    tries again.  An L{OSError}, so a caller catching those catches it; its
    C{strerror} names the folder.

    @ivar status: the enhanced status code for the retry and the log:
        C{4.3.1} when the disk is full or over quota, C{4.3.0} otherwise.
    @ivar errno: the number of the underlying L{OSError}, if it had one.
    """

    def __init__(self, message: str, status: str, number: int | None) -> None:
        if number is None:
            super().__init__(message)
        else:
            super().__init__(number, message)
        self.status = status


def _error(folder: str, exc: OSError) -> MaildirError:
    status = "4.3.1" if exc.errno in _FULL_ERRNOS else "4.3.0"
    what = "full" if status == "4.3.1" else "failed"
    error = MaildirError(f"maildir {folder} {what}: {exc}", status, exc.errno)
    error.__cause__ = exc
    return error


def _header_address(address: str) -> bytes:
    if any(ord(c) < 0x20 or c == "\x7f" for c in address):
        raise ValueError(f"address {address!r} cannot go into a header")
    return b"<" + address.encode("utf-8") + b">"


def envelope_header(sender: str, recipients: Sequence[str]) -> bytes:
    """
    The lines that record the envelope at the top of a delivered file
    (UTF-8 addresses as they are).

    @param sender: the reverse-path, C{""} for C{<>}.
    @raise ValueError: for an address with control characters (which the
        SMTP parser never lets through).
    """
    lines = [b"Return-Path: " + _header_address(sender) + b"\r\n"]
    for recipient in recipients:
        lines.append(
            ENVELOPE_TO.encode("ascii") + b": " + _header_address(recipient) + b"\r\n"
        )
    return b"".join(lines)


def _host_part(hostname: str) -> str:
    # Maildir's escapes for the two characters a host part may not hold.
    return hostname.replace("/", "\\057").replace(":", "\\072") or "localhost"


def unique_name(now: float, hostname: str) -> str:
    """
    A file name no other delivery uses: seconds, microseconds, process,
    a per-process counter and 64 random bits, then the host (Maildir's
    convention), then L{SUFFIX}.
    """
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    unique = f"M{micros:06d}P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(8)}"
    return f"{seconds}.{unique}.{_host_part(hostname)}{SUFFIX}"


def _write_all(ops: IFileOps, fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = ops.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def _copy(ops: IFileOps, fd: int, message_path: str, offset: int) -> None:
    with open(message_path, "rb", buffering=0) as source:
        source.seek(offset)
        buffer = bytearray(CHUNK_SIZE)
        view = memoryview(buffer)
        while True:
            count = source.readinto(buffer)
            if not count:
                return
            _write_all(ops, fd, view[:count])


def deliver(
    folder: str,
    message_path: str,
    *,
    sender: str,
    recipients: Sequence[str],
    now: float,
    prefix: bytes = b"",
    offset: int = 0,
    hostname: str | None = None,
    fileops: IFileOps | None = None,
) -> str:
    """
    Deliver one message into C{folder} (blocking: run it in a worker
    thread); C{tmp/}, C{new/} and C{cur/} are created (0700) if missing.

    The file holds L{envelope_header}, then C{prefix}, then the bytes of
    C{message_path} from C{offset} to its end.

    @param now: seconds since the epoch (injected clock), for the name.
    @param prefix: new header bytes to put before the message (CRLF lines).
    @param hostname: for the name; this machine's name by default.
    @param fileops: the file-system calls; L{OSFileOps} by default.
    @return: the path of the delivered file under C{new/}.
    @raise MaildirError: when nothing could be delivered (temporary).
    @raise ValueError: for an address that cannot go into a header.
    """
    ops: IFileOps = fileops if fileops is not None else OSFileOps()
    header = envelope_header(sender, recipients)
    host = socket.gethostname() if hostname is None else hostname
    tmp_dir = os.path.join(folder, "tmp")
    new_dir = os.path.join(folder, "new")
    try:
        for sub in (tmp_dir, new_dir, os.path.join(folder, "cur")):
            ops.mkdir(sub)
        for attempt in range(_ATTEMPTS):
            name = unique_name(now, host)
            try:
                return _deliver_once(
                    ops,
                    os.path.join(tmp_dir, name),
                    os.path.join(new_dir, name),
                    [header, prefix],
                    message_path,
                    offset,
                )
            except FileExistsError:
                if attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover
    except OSError as e:
        raise _error(folder, e) from e


def _deliver_once(
    ops: IFileOps,
    temp: str,
    final: str,
    head: list[bytes],
    message_path: str,
    offset: int,
) -> str:
    fd = ops.create(temp)
    is_open = True
    moved = False
    try:
        for data in head:
            _write_all(ops, fd, data)
        _copy(ops, fd, message_path, offset)
        ops.fsync(fd)
        is_open = False
        ops.close(fd)
        ops.move_noreplace(temp, final)
        moved = True
        ops.fsync_directory(os.path.dirname(final))
    except BaseException:
        if is_open:
            with suppress(OSError):
                ops.close(fd)
        if not moved:
            with suppress(OSError):
                ops.unlink(temp)
        raise
    return final
