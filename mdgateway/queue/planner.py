# -*- test-case-name: tests.test_queue_planner -*-
"""
What the queue manager does next with a message, decided by a pure
function of its delivery state, the time and the retry policy.

The manager only carries plans out: it asks L{plan}, does what the plan
says (attempt, warn, expire, bounce, wait), records the result in the
state, and asks again. Every timing rule of the queue (lifetime expiry
with 5.4.7, the one delay warning, exponential backoff, a relay's
throttling, partial delivery, an operator's hold) lives here, where a test
can drive it with nothing but numbers. So do the changes an operator makes
to a state (L{held}, L{unheld}, L{cancelled}): a hold is part of the saved
state, so it survives a restart.
"""

from __future__ import annotations

import attrs

from mdgateway.queue.state import DeliveryState, RecipientStatus


@attrs.frozen
class RetryPolicy:
    """
    When to try again, in the spirit of Postfix: from five minutes, doubling
    up to an hour, for at most five days.

    @ivar delay_warning: warn the sender once after this long (L{None}:
        never).
    """

    first: float = 300.0
    maximum: float = 3600.0
    lifetime: float = 5 * 86400.0
    delay_warning: float | None = None

    def delay(self, attempts: int) -> float:
        """
        The wait after the C{attempts}-th attempt.
        """
        return float(min(self.first * 2 ** max(attempts - 1, 0), self.maximum))


@attrs.frozen
class Deliver:
    """
    Attempt these recipients now (process their copies and relay).
    """

    recipients: tuple[str, ...]


@attrs.frozen
class Retry:
    """
    Nothing is due: look again at C{at}.
    """

    at: float


@attrs.frozen
class Warn:
    """
    Tell the sender these recipients are delayed (once per message).
    """

    recipients: tuple[str, ...]


@attrs.frozen
class Expire:
    """
    These recipients have waited their lifetime: they fail with C{5.4.7}.
    """

    recipients: tuple[str, ...]


@attrs.frozen
class Bounce:
    """
    Report these failed recipients to the sender.
    """

    recipients: tuple[str, ...]


@attrs.frozen
class Done:
    """
    Every recipient is final and reported: remove the entry.
    """


@attrs.frozen
class Hold:
    """
    An operator put the message on hold: nothing is due until the hold is
    released (no attempt, no warning, no expiry; the time on hold does not
    count against the lifetime).
    """

    by: str


Plan = Deliver | Retry | Warn | Expire | Bounce | Done | Hold

#: The enhanced status of a recipient whose lifetime ran out (RFC 3463).
EXPIRED_STATUS = "5.4.7"
#: The enhanced status of a recipient an operator deleted or bounced
#: (RFC 3463 has no code of its own for it: "other undefined status").
CANCELLED_STATUS = "5.0.0"


class NotApplicableError(ValueError):
    """
    An operator's change does not apply to the message as it stands now
    (its message says why); the state is unchanged.
    """


def plan(
    state: DeliveryState,
    now: float,
    policy: RetryPolicy,
    throttled_until: float | None = None,
) -> Plan:
    """
    The next step for a message.

    @param throttled_until: the relay asked us to slow down until then
        (Office 365's 4.7.500-range replies): no attempt before.
    """
    pending = tuple(state.pending)
    if pending and state.held_by is not None:
        return Hold(state.held_by)
    # Time on hold is not counted: the lifetime runs from reception, later
    # by as long as the message was held.
    start = state.received_at + state.held_for
    age = now - start
    if pending:
        if age >= policy.lifetime:
            return Expire(pending)
        warn_at = _warning_due_at(state, policy)
        if warn_at is not None and now >= warn_at:
            return Warn(pending)
        due_at = max(state.next_attempt_at or now, throttled_until or now)
        if now >= due_at:
            return Deliver(pending)
        wake = [due_at, start + policy.lifetime]
        if warn_at is not None:
            wake.append(warn_at)
        return Retry(min(wake))
    failed = tuple(state.failed)
    if failed and state.bounceable and not state.bounced:
        return Bounce(failed)
    return Done()


def _warning_due_at(state: DeliveryState, policy: RetryPolicy) -> float | None:
    if policy.delay_warning is None or state.warned or not state.bounceable:
        return None
    return state.received_at + state.held_for + policy.delay_warning


def attempted(
    state: DeliveryState,
    now: float,
    policy: RetryPolicy,
    throttled_until: float | None = None,
) -> DeliveryState:
    """
    The state after an attempt: one more attempt counted, the next one
    backed off (and not before a relay's throttling ends).
    """
    attempts = state.attempts + 1
    next_at = now + policy.delay(attempts)
    if throttled_until is not None:
        next_at = max(next_at, throttled_until)
    return attrs.evolve(state, attempts=attempts, next_attempt_at=next_at)


def expired(
    state: DeliveryState, recipients: tuple[str, ...], now: float
) -> DeliveryState:
    """
    The state after L{Expire}: each recipient failed with C{5.4.7}, its last
    problem kept in the text for the DSN.
    """
    for address in recipients:
        last = state.recipients[address].text
        state = state.update(
            address,
            status=RecipientStatus.FAILED,
            code=554,
            enhanced=EXPIRED_STATUS,
            text=f"delivery time expired; last problem: {last}"
            if last
            else "delivery time expired",
            at=now,
        )
    return state


def retry_now(state: DeliveryState) -> DeliveryState:
    """
    The state after an operator asked for an attempt now.
    """
    return attrs.evolve(state, next_attempt_at=None)


# -- an operator's changes (see L{mdgateway.queue.tools}) ------------------------


def held(state: DeliveryState, by: str, now: float) -> DeliveryState:
    """
    The state after an operator put the message on hold; a message held
    already stays held by whoever held it first.

    @raise NotApplicableError: nothing is left to deliver.
    """
    if state.held_by is not None:
        return state
    if not state.pending:
        raise NotApplicableError("nothing is left to deliver: it is about to leave")
    return attrs.evolve(state, held_by=by, held_at=now)


def unheld(state: DeliveryState, now: float) -> DeliveryState:
    """
    The state after an operator released a hold: attempted at once, and
    the time it spent on hold added to L{DeliveryState.held_for}. A message
    not held is unchanged.
    """
    if state.held_by is None:
        return state
    spent = max(0.0, now - state.held_at) if state.held_at is not None else 0.0
    return attrs.evolve(
        state,
        held_by=None,
        held_at=None,
        held_for=state.held_for + spent,
        next_attempt_at=None,
    )


def cancelled(
    state: DeliveryState, now: float, why: str, report: bool
) -> DeliveryState:
    """
    The state after an operator deleted the message or bounced it: every
    pending recipient failed with C{5.0.0} and C{why}, the hold (if any)
    gone. With C{report} the sender gets a bounce as for any failure (the
    planner's L{Bounce}); without, nothing is reported, not even earlier
    failures (a silent delete), and the planner's next step is L{Done}.

    @raise NotApplicableError: with C{report}, when nothing is pending (there
        is nothing left to bounce).
    """
    pending = state.pending
    if report and not pending:
        raise NotApplicableError("nothing is left to deliver, so nothing to bounce")
    state = state.update_all(
        pending,
        status=RecipientStatus.FAILED,
        code=None,
        enhanced=CANCELLED_STATUS,
        text=why,
        at=now,
    )
    state = unheld(state, now)
    if not report:
        state = attrs.evolve(state, bounced=True)
    return state
