# -*- test-case-name: tests.test_refusals -*-
"""
The refused log: every negative reply the SMTP edge sends is counted, and
kept in the store, so an operator can see who was turned away and why.

A flood of refusals (a scanner hammering bad commands, a botnet trying
relaying) must not turn into a flood of writes. So the log keeps
individual rows only up to a budget, per fixed minute, and summarises the
rest (the counter always counts every refusal):

  - at most L{PER_CLIENT} rows per client address and category;
  - at most L{PER_MINUTE} individual rows in all;
  - what exceeds either is summarised at the end of the minute in one row
    per client and category (its C{repeats} says how many refusals it
    stands for), for at most L{SUMMARIES} client-and-category pairs; the
    rest are summarised in one row per category with the client C{*}.

So one minute writes at most C{PER_MINUTE + SUMMARIES + categories} rows,
whatever arrives. Rows go through the outbox (L{mdgateway.store.outbox}),
so a store outage loses none of them.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mdgateway.smtp.categories import refusal_category
from mdgateway.smtp.interfaces import ConnectionInfo
from mdgateway.smtp.replies import Reply
from mdgateway.store.interfaces import Refusal
from mdgateway.store.outbox import Outbox
from mdgateway.store.owed import OwedRefusal

log = Logger()

#: Individual rows per client address and category per minute.
PER_CLIENT = 10
#: Individual rows per minute in all.
PER_MINUTE = 600
#: Client-and-category summary rows per minute; beyond, per category.
SUMMARIES = 100
#: The length of one budget window, in seconds.
WINDOW = 60.0
#: Client-and-category pairs counted one by one per window; refusals of
#: further pairs are summarised per category (memory stays bounded).
TRACKED = 10_000


@attrs.define
class _Suppressed:
    """
    Refusals of one kind not logged one by one in the current window.

    @ivar last: the latest of them, the model of the summary row.
    """

    count: int
    first_at: float
    last: Refusal


class RefusalRecorder:
    """
    Counts every refusal in the metrics and records it in the refused log
    through the outbox, in the background: a slow or absent store never
    holds up a reply.
    """

    def __init__(
        self,
        outbox: Outbox,
        metrics: Any,
        clock: IReactorTime,
        *,
        per_client: int = PER_CLIENT,
        per_minute: int = PER_MINUTE,
        summaries: int = SUMMARIES,
        window: float = WINDOW,
    ) -> None:
        self._outbox = outbox
        self._metrics = metrics
        self._clock = clock
        self._per_client = per_client
        self._per_minute = per_minute
        self._summaries = summaries
        self._window = window
        self._current = -1
        self._counts: dict[tuple[str, str], int] = {}
        self._stored = 0
        self._suppressed: dict[tuple[str, str], _Suppressed] = {}
        self._timer: IDelayedCall | None = None
        #: Rows handed to the outbox (individual and summaries).
        self.rows = 0

    def __call__(
        self,
        info: ConnectionInfo,
        sender: str | None,
        recipient: str | None,
        reply: Reply,
    ) -> None:
        category = refusal_category(reply)
        self._metrics.refused(category)
        now = self._clock.seconds()
        self._roll(now)
        refusal = Refusal(
            at=now,
            listener=info.listener,
            client_address=info.client[0],
            code=reply.code,
            reason=reply.text,
            enhanced=reply.status or None,
            helo=info.helo,
            sender=sender,
            recipient=recipient,
            category=category,
        )
        key = (refusal.client_address, category)
        seen = self._counts.get(key)
        if seen is not None or len(self._counts) < TRACKED:
            seen = (seen or 0) + 1
            self._counts[key] = seen
            if seen <= self._per_client and self._stored < self._per_minute:
                self._stored += 1
                self._write(refusal)
                return
        self._suppress(key, refusal)

    def _suppress(self, key: tuple[str, str], refusal: Refusal) -> None:
        held = self._suppressed.get(key)
        if held is None and len(self._suppressed) >= self._summaries:
            key = ("*", key[1])
            held = self._suppressed.get(key)
        if held is None:
            self._suppressed[key] = _Suppressed(1, refusal.at, refusal)
        else:
            held.count += 1
            held.last = refusal
        if self._timer is None:
            end = (self._current + 1) * self._window
            self._timer = self._clock.callLater(
                max(0.0, end - self._clock.seconds()), self.flush
            )

    def _roll(self, now: float) -> None:
        window = math.floor(now / self._window)
        if window != self._current:
            self._summarise()
            self._current = window
            self._counts.clear()
            self._stored = 0

    def flush(self) -> None:
        """
        Write the summaries of the window that is over (or, at stop, of
        the current one).
        """
        self._timer = None
        self._roll(self._clock.seconds())
        self._summarise()

    def stop(self) -> None:
        """
        Write what is held back, and stop the timer (at gateway stop).
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._summarise()

    def _summarise(self) -> None:
        held, self._suppressed = self._suppressed, {}
        for (client, _), kept in sorted(held.items()):
            last = kept.last
            whom = "this client" if client != "*" else "several clients"
            self._write(
                attrs.evolve(
                    last,
                    client_address=client,
                    reason=f"{last.reason} [{kept.count} refusals like this from "
                    f"{whom} within {self._window:g}s, not logged one by one]",
                    repeats=kept.count,
                    sender=last.sender if client != "*" else None,
                    recipient=last.recipient if client != "*" else None,
                    helo=last.helo if client != "*" else None,
                )
            )

    def _write(self, refusal: Refusal) -> None:
        self.rows += 1
        d: Deferred[None] = self._outbox.append(OwedRefusal(refusal))
        d.addErrback(lambda f: log.failure("could not record a refusal", f))
