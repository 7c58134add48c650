# -*- test-case-name: tests.test_queue_planner -*-
"""
What the queue manager does next with a message, decided by a pure
function of its delivery state, the time and the retry policy.

The manager only carries plans out: it asks L{plan}, does what the plan
says (attempt, warn, expire, bounce, wait), records the result in the
state, and asks again. Every timing rule of the queue (lifetime expiry
with 5.4.7, the one delay warning, exponential backoff, a relay's
throttling, partial delivery) lives here, where a test can drive it with
nothing but numbers.
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


Plan = Deliver | Retry | Warn | Expire | Bounce | Done

#: The enhanced status of a recipient whose lifetime ran out (RFC 3463).
EXPIRED_STATUS = "5.4.7"


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
    age = now - state.received_at
    if pending:
        if age >= policy.lifetime:
            return Expire(pending)
        warn_at = _warning_due_at(state, policy)
        if warn_at is not None and now >= warn_at:
            return Warn(pending)
        due_at = max(state.next_attempt_at or now, throttled_until or now)
        if now >= due_at:
            return Deliver(pending)
        wake = [due_at, state.received_at + policy.lifetime]
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
    return state.received_at + policy.delay_warning


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
