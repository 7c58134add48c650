# -*- test-case-name: tests.test_message_decompose -*-
"""
Other readings of a message whose structure we cannot be sure of.

When the structure parser finds a message ambiguous (a boundary not found
or found twice, a duplicate or conflicting MIME field or parameter, a
field name followed by space, a transfer encoding that is not a bare token
or does not decode, nesting beyond the limits ...), readers may split it
differently from us and from each other.  Besides the whole message, the
decomposer then submits every payload Python's C{email} package extracts
from it, under C{policy.compat32} and under C{policy.default} (its two
readings differ), each once: whatever such a reader (and a mail client
built like it) would show is scanned, byte for byte as decoded.

A reading holds the whole message in memory, so readings run one at a
time (the lock below), in the decomposer's worker thread, never on the
reactor thread.  A reading that fails (Python's parser gives up, such as
on nesting deeper than its recursion allows) or that yields more parts
than L{MAX_READING_PARTS} raises L{ReadingError}: the copy then cannot be
called scanned.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import threading
from collections.abc import Iterator
from email.message import Message
from os import PathLike
from pathlib import Path

import attrs

#: The readings, by name: Python's email package under each policy.
POLICIES = (
    ("compat32", email.policy.compat32),
    ("default", email.policy.default),
)
#: The most distinct payloads all readings of one message may give.
MAX_READING_PARTS = 1000

_LOCK = threading.Lock()


class ReadingError(Exception):
    """
    A reading could not be completed: the message cannot be called
    scanned.
    """


@attrs.frozen
class ReadingPart:
    """
    One payload of another reading, written to a file.

    @ivar reading: the reading's name (see L{POLICIES}).
    @ivar index: its position among the reading's leaves, from 1.
    @ivar content_type: the type the reading gives it, lowercased.
    @ivar path: the file holding the decoded payload.
    @ivar size: its size in bytes (never 0: empty payloads are not kept).
    """

    reading: str
    index: int
    content_type: str
    path: Path
    size: int


def _leaves(message: Message) -> Iterator[Message]:
    for part in message.walk():
        if not part.is_multipart():
            yield part


def _content_type(part: Message) -> str:
    try:
        return str(part.get_content_type()).lower()[:200]
    except Exception:  # a reading's own parsing error: name it plainly
        return "application/octet-stream"


def read_alternatives(
    message: str | PathLike[str],
    directory: str | PathLike[str],
    known: set[bytes],
) -> list[ReadingPart]:
    """
    Write every non-empty payload of every reading of C{message} whose
    SHA-256 is not in C{known} to C{directory/reading-<name>-<n>}, each
    distinct payload once (blocking: run it in a worker thread).

    @param known: digests of payloads already submitted; the digests of
        the payloads written are added.
    @raise ReadingError: when a reading fails or gives too many parts.
    @raise OSError: when a file cannot be read or written.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    found: list[ReadingPart] = []
    with _LOCK:
        data = Path(message).read_bytes()
        for name, policy in POLICIES:
            try:
                parsed = email.message_from_bytes(data, policy=policy)
                for index, part in enumerate(_leaves(parsed), 1):
                    payload = part.get_payload(decode=True)
                    if not isinstance(payload, bytes) or not payload:
                        continue
                    digest = hashlib.sha256(payload).digest()
                    if digest in known:
                        continue
                    known.add(digest)
                    if len(found) >= MAX_READING_PARTS:
                        raise ReadingError(
                            f"the {name} reading gives more than "
                            f"{MAX_READING_PARTS} parts"
                        )
                    path = target / f"reading-{name}-{index}"
                    path.write_bytes(payload)
                    found.append(
                        ReadingPart(
                            name, index, _content_type(part), path, len(payload)
                        )
                    )
            except ReadingError:
                raise
            except RecursionError:
                raise ReadingError(
                    f"the {name} reading nests deeper than it can follow"
                ) from None
            except Exception as error:  # the reader's bug, not ours to hide
                raise ReadingError(
                    f"the {name} reading failed: {type(error).__name__}: {error}"
                ) from None
    return found
