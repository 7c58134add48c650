# -*- test-case-name: tests.test_spool -*-
"""
Queue ids: sortable, collision-resistant names for spool entries.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

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
