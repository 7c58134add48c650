"""
The queue's pure core: the delivery state and its JSON form, and the
planner that decides every timing rule of the queue (expiry, the delay
warning, backoff, throttling, partial delivery).
"""

from __future__ import annotations

import json

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.queue.planner import (
    CANCELLED_STATUS,
    EXPIRED_STATUS,
    Bounce,
    Deliver,
    Done,
    Expire,
    Hold,
    NotApplicableError,
    Plan,
    Retry,
    RetryPolicy,
    Warn,
    attempted,
    cancelled,
    expired,
    held,
    plan,
    retry_now,
    unheld,
)
from mdgateway.queue.state import (
    DeliveryState,
    RecipientState,
    RecipientStatus,
    StateFormatError,
)

PENDING = RecipientStatus.PENDING
DELIVERED = RecipientStatus.DELIVERED
FAILED = RecipientStatus.FAILED
BLOCKED = RecipientStatus.BLOCKED

POLICY = RetryPolicy(first=300, maximum=3600, lifetime=5 * 86400)
T0 = 1_800_000_000.0


def fresh(*addresses: str, bounceable: bool = True) -> DeliveryState:
    return DeliveryState.fresh(T0, addresses or ("a@x.test",), bounceable)


class PlanTests(SynchronousTestCase):
    """
    L{plan} for each kind of state.
    """

    def test_new_message_is_delivered_at_once(self) -> None:
        """
        A new message's recipients are all attempted at once.
        """
        state = fresh("a@x.test", "b@x.test")
        self.assertEqual(plan(state, T0, POLICY), Deliver(("a@x.test", "b@x.test")))

    def test_after_an_attempt_it_waits_first(self) -> None:
        """
        After a first attempt that left a recipient pending, the next is
        due after the first retry interval.
        """
        state = attempted(fresh(), T0, POLICY)
        self.assertEqual(state.attempts, 1)
        self.assertEqual(plan(state, T0, POLICY), Retry(T0 + 300))
        self.assertEqual(plan(state, T0 + 299, POLICY), Retry(T0 + 300))
        self.assertEqual(plan(state, T0 + 300, POLICY), Deliver(("a@x.test",)))

    def test_backoff_doubles_up_to_the_maximum(self) -> None:
        """
        Each failed attempt doubles the wait, up to the policy's maximum.
        """
        state, now, waits = fresh(), T0, []
        for _ in range(8):
            state = attempted(state, now, POLICY)
            step = plan(state, now, POLICY)
            assert isinstance(step, Retry)
            waits.append(step.at - now)
            now = step.at
        self.assertEqual(waits, [300, 600, 1200, 2400, 3600, 3600, 3600, 3600])

    def test_expiry_after_the_lifetime(self) -> None:
        """
        A recipient still pending when the lifetime has passed expires: it
        fails with 5.4.7, keeps its last problem in the text, and is then
        bounced once; after that the entry is done.
        """
        state = fresh().update(
            "a@x.test", code=451, enhanced="4.4.1", text="connection refused"
        )
        at = T0 + POLICY.lifetime
        self.assertEqual(plan(state, at - 1, POLICY), Deliver(("a@x.test",)))
        step = plan(state, at, POLICY)
        self.assertEqual(step, Expire(("a@x.test",)))
        state = expired(state, ("a@x.test",), at)
        record = state.recipients["a@x.test"]
        self.assertEqual(
            (record.status, record.code, record.enhanced),
            (FAILED, 554, EXPIRED_STATUS),
        )
        self.assertIn("connection refused", record.text)
        self.assertEqual(plan(state, at, POLICY), Bounce(("a@x.test",)))
        state = attrs.evolve(state, bounced=True)
        self.assertEqual(plan(state, at, POLICY), Done())

    def test_retry_never_sleeps_past_expiry(self) -> None:
        """
        When the next attempt would come after the lifetime, the manager is
        woken at the end of the lifetime instead, so expiry is on time.
        """
        policy = RetryPolicy(first=3600, maximum=3600, lifetime=5000)
        state = attempted(fresh(), T0 + 4000, policy)
        self.assertEqual(plan(state, T0 + 4000, policy), Retry(T0 + 5000))

    def test_delay_warning_once(self) -> None:
        """
        The sender is warned once when the message has waited the warning
        time; the manager is woken for it even between attempts.
        """
        policy = attrs.evolve(POLICY, delay_warning=1000.0)
        state = attempted(fresh(), T0 + 900, policy)
        self.assertEqual(plan(state, T0 + 900, policy), Retry(T0 + 1000))
        self.assertEqual(plan(state, T0 + 1000, policy), Warn(("a@x.test",)))
        state = attrs.evolve(state, warned=True)
        self.assertEqual(plan(state, T0 + 1000, policy), Retry(T0 + 1200))

    def test_no_reports_to_an_unbounceable_sender(self) -> None:
        """
        For a null sender (or our own bounces) there is neither a delay
        warning nor a bounce: failed recipients just end the entry.
        """
        policy = attrs.evolve(POLICY, delay_warning=10.0)
        state = fresh(bounceable=False)
        self.assertEqual(plan(state, T0 + 20, policy), Deliver(("a@x.test",)))
        state = state.update("a@x.test", status=FAILED)
        self.assertEqual(plan(state, T0 + 20, policy), Done())

    def test_throttling_postpones_the_attempt(self) -> None:
        """
        While the relay has asked us to slow down, no attempt is made; the
        backoff after an attempt never ends before the throttling does.
        """
        state = fresh()
        self.assertEqual(
            plan(state, T0, POLICY, throttled_until=T0 + 900), Retry(T0 + 900)
        )
        self.assertEqual(
            plan(state, T0 + 900, POLICY, throttled_until=T0 + 900),
            Deliver(("a@x.test",)),
        )
        state = attempted(state, T0, POLICY, throttled_until=T0 + 7200)
        self.assertEqual(state.next_attempt_at, T0 + 7200)

    def test_partial_delivery(self) -> None:
        """
        Only pending recipients are attempted again; once none is pending,
        only the failed ones are bounced (delivered and blocked ones are
        final and need no report).
        """
        state = fresh("d@x.test", "p@x.test", "f@x.test", "b@x.test")
        state = state.update("d@x.test", status=DELIVERED)
        state = state.update("f@x.test", status=FAILED)
        state = state.update("b@x.test", status=BLOCKED)
        self.assertEqual(plan(state, T0, POLICY), Deliver(("p@x.test",)))
        state = state.update("p@x.test", status=DELIVERED)
        self.assertEqual(plan(state, T0, POLICY), Bounce(("f@x.test",)))

    def test_everything_delivered_is_done(self) -> None:
        """
        A message whose recipients were all delivered is done at once.
        """
        state = fresh("a@x.test").update("a@x.test", status=DELIVERED)
        self.assertEqual(plan(state, T0, POLICY), Done())

    def test_retry_now(self) -> None:
        """
        An operator's "retry now" makes a waiting message due at once, but
        not before a relay's throttling ends.
        """
        state = attempted(fresh(), T0, POLICY)
        self.assertEqual(plan(retry_now(state), T0 + 1, POLICY), Deliver(("a@x.test",)))
        self.assertEqual(
            plan(retry_now(state), T0 + 1, POLICY, throttled_until=T0 + 60),
            Retry(T0 + 60),
        )


class OperatorTests(SynchronousTestCase):
    """
    What an operator's hold, release, delete and bounce make of a state,
    and what the planner then decides.
    """

    def test_a_held_message_waits_for_its_release(self) -> None:
        """
        A held message is never attempted, warned about or expired, however
        long it waits and even when an operator asks for a retry: the
        plan is L{Hold}, naming who held it.
        """
        policy = attrs.evolve(POLICY, delay_warning=3600)
        state = held(fresh(), "alice", T0 + 10)
        self.assertEqual((state.held_by, state.held_at), ("alice", T0 + 10))
        for now in (T0 + 10, T0 + 7200, T0 + 10 * 86400):
            self.assertEqual(plan(state, now, policy), Hold("alice"))
        self.assertEqual(plan(retry_now(state), T0 + 20, policy), Hold("alice"))

    def test_holding_twice_keeps_the_first(self) -> None:
        """
        Holding a held message changes nothing (the first operator and
        time stay): the action is idempotent.
        """
        state = held(fresh(), "alice", T0 + 10)
        self.assertIs(held(state, "bob", T0 + 20), state)

    def test_nothing_pending_cannot_be_held(self) -> None:
        """
        A message with nothing left to deliver (it is about to bounce or
        leave) cannot be held.
        """
        state = fresh().update("a@x.test", status=FAILED)
        with self.assertRaises(NotApplicableError):
            held(state, "alice", T0)
        # Its plan goes on as before.
        self.assertEqual(plan(state, T0, POLICY), Bounce(("a@x.test",)))

    def test_release_attempts_at_once(self) -> None:
        """
        Releasing a hold makes the message due at once, even if its next
        attempt was later; releasing a message not held changes nothing.
        """
        state = held(attempted(fresh(), T0, POLICY), "alice", T0 + 5)
        released = unheld(state, T0 + 60)
        self.assertFalse(released.held)
        self.assertEqual(plan(released, T0 + 60, POLICY), Deliver(("a@x.test",)))
        self.assertIs(unheld(released, T0 + 70), released)

    def test_time_on_hold_does_not_count(self) -> None:
        """
        The lifetime and the delay warning run later by as long as the
        message was held: held for a day, a message five days old is not
        expired, and expires a day after its usual time.
        """
        policy = attrs.evolve(POLICY, delay_warning=3600)
        state = attrs.evolve(fresh(), warned=False)
        state = held(state, "alice", T0 + 60)
        state = unheld(state, T0 + 60 + 86400)
        self.assertEqual(state.held_for, 86400)
        state = attempted(state, T0 + 86400 + 120, policy)
        # The warning is due an hour (of time not on hold) after reception.
        self.assertEqual(
            plan(state, T0 + 86400 + 130, policy), Retry(T0 + 86400 + 120 + 300)
        )
        self.assertEqual(plan(state, T0 + 86400 + 3600, policy), Warn(("a@x.test",)))
        state = attrs.evolve(state, warned=True, next_attempt_at=T0 + 10**7)
        self.assertEqual(
            plan(state, T0 + 5 * 86400 + 1, policy),
            Retry(T0 + 6 * 86400),
        )
        self.assertEqual(plan(state, T0 + 6 * 86400, policy), Expire(("a@x.test",)))

    def test_hold_survives_json(self) -> None:
        """
        The hold (who, since when) and the time spent on earlier holds are
        in the saved state, so a restart keeps the message held.
        """
        state = attrs.evolve(held(fresh(), "alice", T0 + 1), held_for=30.0)
        back = DeliveryState.from_json(
            json.loads(json.dumps(state.to_json())), received_at=0, bounceable=True
        )
        self.assertEqual(back, state)
        self.assertEqual(plan(back, T0 + 2, POLICY), Hold("alice"))
        # A state never held has no hold fields at all.
        self.assertNotIn("held_by", fresh().to_json())

    def test_bounce_now(self) -> None:
        """
        Bouncing fails every pending recipient with 5.0.0 and the reason,
        ends a hold, and leaves the delivered ones alone; the sender then
        gets one bounce naming exactly those, and the entry is done.
        """
        state = held(
            fresh("a@x.test", "b@x.test").update("a@x.test", status=DELIVERED),
            "alice",
            T0,
        )
        bounced = cancelled(state, T0 + 5, "returned by the administrator", True)
        record = bounced.recipients["b@x.test"]
        self.assertEqual(
            (record.status, record.enhanced, record.text, record.at),
            (FAILED, CANCELLED_STATUS, "returned by the administrator", T0 + 5),
        )
        self.assertEqual(bounced.recipients["a@x.test"].status, DELIVERED)
        self.assertFalse(bounced.held)
        self.assertEqual(plan(bounced, T0 + 5, POLICY), Bounce(("b@x.test",)))
        self.assertEqual(
            plan(attrs.evolve(bounced, bounced=True), T0 + 5, POLICY), Done()
        )

    def test_nothing_pending_cannot_be_bounced(self) -> None:
        """
        With nothing pending there is nothing to bounce: refused.
        """
        state = fresh().update("a@x.test", status=DELIVERED)
        with self.assertRaises(NotApplicableError):
            cancelled(state, T0, "returned", True)

    def test_silent_delete(self) -> None:
        """
        A silent delete fails what is pending and reports nothing, not even
        an earlier failure: the next step is L{Done}, whatever was pending
        or held.
        """
        state = held(
            fresh("a@x.test", "b@x.test").update("a@x.test", status=FAILED),
            "alice",
            T0,
        )
        deleted = cancelled(state, T0 + 1, "deleted by the administrator", False)
        self.assertEqual(deleted.pending, [])
        self.assertEqual(plan(deleted, T0 + 1, POLICY), Done())
        done = fresh().update("a@x.test", status=DELIVERED)
        self.assertEqual(plan(cancelled(done, T0, "x", False), T0, POLICY), Done())


class StateJsonTests(SynchronousTestCase):
    """
    The delivery state survives its JSON form, including the version 1
    form that earlier releases wrote.
    """

    def test_round_trip(self) -> None:
        """
        Every field survives a round trip through JSON text.
        """
        state = attrs.evolve(
            fresh("a@x.test", "b@x.test").update(
                "a@x.test",
                status=DELIVERED,
                code=250,
                enhanced="2.0.0",
                text="ok",
                server="smtp://relay:25",
                queue_id="ABC",
                at=T0 + 1,
                result="Allowed",
            ),
            attempts=3,
            next_attempt_at=T0 + 600,
            warned=True,
            bounced=False,
            copies={"Q.1": {"result": "Allowed"}},
        )
        text = json.dumps(state.to_json())
        back = DeliveryState.from_json(
            json.loads(text), received_at=0, bounceable=False
        )
        self.assertEqual(back, state)

    def test_version_1(self) -> None:
        """
        A version 1 state (no lifetime facts of its own) takes them from
        the envelope and keeps its recipients' records.
        """
        old = {
            "version": 1,
            "attempts": 2,
            "warned": True,
            "recipients": {
                "a@x.test": {"status": "delivered", "code": 250},
                "b@x.test": {"status": "pending", "text": "deferred"},
            },
        }
        state = DeliveryState.from_json(old, received_at=T0, bounceable=True)
        self.assertEqual(
            (state.received_at, state.bounceable, state.attempts, state.warned),
            (T0, True, 2, True),
        )
        self.assertEqual(state.pending, ["b@x.test"])
        self.assertEqual(state.recipients["a@x.test"].code, 250)
        self.assertIsNone(state.next_attempt_at)

    def test_bad_states_are_refused(self) -> None:
        """
        A state that is not an object, of an unknown version, without
        recipients, or with an unknown recipient status is refused.
        """
        bad: object
        for bad in (
            [],
            {"version": 99, "recipients": {}},
            {"version": 1},
            {"version": 1, "recipients": {"a@x.test": {"status": "lost"}}},
            {"version": 1, "recipients": {"a@x.test": "pending"}},
        ):
            with self.assertRaises(StateFormatError, msg=repr(bad)):
                DeliveryState.from_json(bad, received_at=T0, bounceable=True)

    def test_state_is_immutable(self) -> None:
        """
        Changes make a new state; the old one is untouched.
        """
        state = fresh("a@x.test")
        changed = state.update("a@x.test", status=DELIVERED)
        self.assertEqual(state.recipients["a@x.test"], RecipientState())
        self.assertEqual(changed.recipients["a@x.test"].status, DELIVERED)
        with self.assertRaises(TypeError):
            state.recipients["a@x.test"] = RecipientState()  # type: ignore[index]


outcome = st.sampled_from([PENDING, DELIVERED, FAILED, BLOCKED])


@attrs.define
class Simulation:
    """
    A queue manager reduced to carrying out plans on a L{Clock}.
    """

    clock: Clock
    policy: RetryPolicy
    state: DeliveryState
    outcomes: list[dict[str, RecipientStatus]]
    attempts: list[tuple[str, ...]] = attrs.Factory(list)
    warnings: int = 0
    bounces: list[tuple[str, ...]] = attrs.Factory(list)

    def run(self, limit: int = 500) -> Plan:
        for _ in range(limit):
            now = self.clock.seconds()
            step = plan(self.state, now, self.policy)
            if isinstance(step, Deliver):
                assert all(
                    self.state.recipients[a].status is PENDING for a in step.recipients
                ), "a final recipient was attempted again"
                self.attempts.append(step.recipients)
                results = self.outcomes.pop(0) if self.outcomes else {}
                for address in step.recipients:
                    status = results.get(address, PENDING)
                    self.state = self.state.update(address, status=status, at=now)
                self.state = attempted(self.state, now, self.policy)
            elif isinstance(step, Retry):
                assert step.at > now, (step, now)
                self.clock.advance(step.at - now)
            elif isinstance(step, Warn):
                self.warnings += 1
                self.state = attrs.evolve(self.state, warned=True)
            elif isinstance(step, Expire):
                self.state = expired(self.state, step.recipients, now)
            elif isinstance(step, Bounce):
                self.bounces.append(step.recipients)
                self.state = attrs.evolve(self.state, bounced=True)
            else:
                return step
        raise AssertionError("the plans never ended")


@settings(max_examples=300, deadline=None)
@given(
    recipients=st.integers(min_value=1, max_value=4),
    outcomes=st.lists(
        st.lists(outcome, min_size=4, max_size=4), min_size=0, max_size=12
    ),
    warning=st.one_of(st.none(), st.floats(min_value=1, max_value=86400)),
    bounceable=st.booleans(),
)
def test_every_run_ends_in_order(
    recipients: int,
    outcomes: list[list[RecipientStatus]],
    warning: float | None,
    bounceable: bool,
) -> None:
    """
    Whatever each attempt brings, carrying out the plans ends with every
    recipient final, within the lifetime (plus one wake-up); a recipient is
    never attempted after it became final; at most one warning and one
    bounce are sent, only to a bounceable sender, and the bounce names
    exactly the failed recipients.
    """
    addresses = [f"r{i}@x.test" for i in range(recipients)]
    policy = attrs.evolve(POLICY, delay_warning=warning)
    clock = Clock()
    clock.advance(T0)
    sim = Simulation(
        clock,
        policy,
        DeliveryState.fresh(T0, addresses, bounceable),
        [dict(zip(addresses, row, strict=False)) for row in outcomes],
    )
    assert sim.run() == Done()
    assert not sim.state.pending
    assert clock.seconds() <= T0 + policy.lifetime
    assert sim.warnings <= (1 if bounceable and warning is not None else 0)
    failed = tuple(sim.state.failed)
    if bounceable and failed:
        assert sim.bounces == [failed]
    else:
        assert sim.bounces == []
