"""
The queue manager, in process: the real spool on a temporary folder, the
verified fakes of processing, relay, history and loop guard, and the real
DSN writer, all on a clock the test advances. The manager only carries out
what the planner decides (tests.test_queue_planner); these tests check that
it does so: delivery, backoff, throttling, expiry with a bounce, the one
delay warning, partial delivery, null senders, "retry now", and state that
survives a restart.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.config import parse_config
from mdgateway.queue.attempt import GENERATED_DSN
from mdgateway.queue.copies import CopyJob, CopyOutcome
from mdgateway.queue.entry import SpoolEntry
from mdgateway.queue.envelope import Envelope, Recipient
from mdgateway.queue.manager import QueueManager
from mdgateway.queue.planner import RetryPolicy
from mdgateway.queue.spool import Spool
from mdgateway.queue.state import DeliveryState, RecipientStatus
from mdgateway.relay.delivery import Status
from mdgateway.testing.queue import (
    FakeLoopGuard,
    RecordingBounces,
    RecordingHistory,
    ScriptedProcessor,
)
from mdgateway.testing.relay import FakeRelay
from mdgateway.testing.threads import SynchronousThreadPool, ThreadsClock

T0 = 1_800_000_000.0
POLICY = RetryPolicy(first=300, maximum=3600, lifetime=86400, delay_warning=None)
MESSAGE = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: hi\r\n\r\nHello\r\n"


class Harness:
    """
    A queue manager over a real spool, with recording fakes around it.
    """

    def __init__(
        self,
        test: SynchronousTestCase,
        root: Path,
        retry: RetryPolicy,
        **lanes: int,
    ):
        self.lanes = lanes
        self.test = test
        self.root = root
        self.clock = ThreadsClock()
        self.clock.advance(T0)
        self.pool = SynchronousThreadPool()
        self.retry = retry
        self.relay = FakeRelay()
        self.processor = ScriptedProcessor()
        self.history = RecordingHistory()
        self.bounces = RecordingBounces(self.clock)
        values = {
            "listeners": [{"name": "smtp", "endpoint": "tcp:0", "tls": "none"}],
            "spool": {"directory": "spool"},
            "profiles": {
                "core": {"core": {"servers": ["http://127.0.0.1:8008"]}},
                "smtp": {"out": {"servers": ["smtp://127.0.0.1:2525"]}},
            },
            "rules": [
                {
                    "name": "r",
                    "client_networks": ["127.0.0.0/8"],
                    "core_profile": "core",
                    "relay_profile": "out",
                }
            ],
        }
        self.policy = parse_config(values, base=root).policy
        self.start()

    def start(self) -> None:
        """
        A new spool and manager over the same folder (a restart).
        """
        self.spool = Spool(
            str(self.root / "spool"),
            self.clock,
            self.pool,  # type: ignore[arg-type]  # a duck-typed ThreadPool
            min_free_bytes=0,
        )
        self.test.successResultOf(self.spool.acquire())
        self.recovered = self.test.successResultOf(self.spool.recover())
        self.manager = QueueManager(
            spool=self.spool,
            policy=lambda: self.policy,
            processor=self.processor,
            relay=self.relay,
            reactor=self.clock,
            threadpool=self.pool,  # type: ignore[arg-type]
            loop_guard=FakeLoopGuard(),
            bounces=self.bounces,
            history=self.history,
            retry=self.retry,
            **self.lanes,
        )

    def stop(self) -> None:
        self.test.assertEqual(self.manager.in_progress, 0)
        self.manager._stopping = True
        self.test.successResultOf(self.spool.close())

    def queue(
        self, *recipients: str, sender: str = "a@x.test", padding: int = 0
    ) -> SpoolEntry:
        writer = self.spool.open_writer()
        writer.write(MESSAGE + b"x" * padding + b"\r\n" if padding else MESSAGE)
        envelope = Envelope(
            queue_id=writer.queue_id,
            received_at=self.clock.seconds(),
            sender=sender,
            recipients=tuple(Recipient(r, {}, "r", "inbound") for r in recipients),
        )
        entry = self.test.successResultOf(writer.commit(envelope))
        self.manager.submit(entry)
        return entry

    def run(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)

    def entries(self) -> list[SpoolEntry]:
        return self.test.successResultOf(self.spool.list_entries())

    def state(self, entry: SpoolEntry) -> DeliveryState:
        return self.test.successResultOf(self.manager.load_state(entry))

    def reports(self) -> list[SpoolEntry]:
        """
        The DSNs the manager queued (generated entries).
        """
        return [
            e
            for e in self.entries()
            if e.envelope.extra.get("generated") == GENERATED_DSN
        ]


class QueueManagerTests(SynchronousTestCase):
    """
    The manager carrying out the planner's steps.
    """

    def harness(self, retry: RetryPolicy = POLICY, **lanes: int) -> Harness:
        return Harness(self, Path(self.mktemp()), retry, **lanes)

    def test_big_messages_have_a_lane_of_their_own(self) -> None:
        """
        Messages of at least C{big_message} bytes wait only for the big
        lane's slots: while the big lane is full, a small message is
        processed at once, and a second big one waits until the first is
        done.
        """
        h = self.harness(concurrency=1, big_message=4096, big_concurrency=1)
        gates: dict[str, Deferred[None]] = {}
        started: list[str] = []

        class Gated(ScriptedProcessor):
            async def process(self, job: CopyJob) -> CopyOutcome:
                started.append(job.security_id)
                gates[job.security_id] = Deferred()
                await gates[job.security_id]
                return await super().process(job)

        h.stop()
        h.processor = Gated()
        h.start()
        big1 = h.queue("b@y.test", padding=10_000)
        big2 = h.queue("b@y.test", padding=10_000)
        small = h.queue("b@y.test")
        h.run()
        copy = "{}.1".format
        self.assertEqual(started, [copy(big1.queue_id), copy(small.queue_id)])
        gates[copy(small.queue_id)].callback(None)
        h.run()
        self.assertEqual(len(h.relay.deliveries), 1)
        gates[copy(big1.queue_id)].callback(None)
        h.run()
        self.assertEqual(started[-1], copy(big2.queue_id))
        gates[copy(big2.queue_id)].callback(None)
        h.run()
        self.assertEqual(len(h.relay.deliveries), 3)
        self.assertEqual(h.entries(), [])

    def test_clean_message_delivered_and_removed(self) -> None:
        """
        A message whose copy is clean is processed once, relayed once to
        every recipient, recorded, and its spool entry removed.
        """
        h = self.harness()
        h.queue("b@y.test", "c@y.test")
        h.run()
        self.assertEqual(len(h.processor.jobs), 1)
        ((profile, outgoing),) = h.relay.deliveries
        self.assertEqual(profile, "out")
        self.assertEqual(
            [r.address for r in outgoing.recipients], ["b@y.test", "c@y.test"]
        )
        self.assertEqual(h.entries(), [])
        self.assertEqual(h.manager.completed, 1)
        self.assertEqual(
            [e[0] for e in h.history.events][:3], ["received", "processed", "delivered"]
        )

    def test_deferred_recipient_backs_off_and_is_not_rescanned(self) -> None:
        """
        A recipient the relay defers is tried again after the first retry
        interval, then after twice that; the copy is processed only once
        (its outcome is kept), and the entry goes once delivered.
        """
        h = self.harness()
        h.relay.answers["b@y.test"] = Status.DEFERRED
        entry = h.queue("b@y.test")
        h.run()
        self.assertEqual(len(h.relay.deliveries), 1)
        state = h.state(entry)
        self.assertEqual(state.attempts, 1)
        self.assertEqual(state.next_attempt_at, T0 + 300)
        h.run(299)
        self.assertEqual(len(h.relay.deliveries), 1)
        h.run(1)
        self.assertEqual(len(h.relay.deliveries), 2)
        self.assertEqual(h.state(entry).next_attempt_at, T0 + 300 + 600)
        del h.relay.answers["b@y.test"]
        h.run(600)
        self.assertEqual(len(h.relay.deliveries), 3)
        self.assertEqual(h.entries(), [])
        self.assertEqual(len(h.processor.jobs), 1)

    def test_throttling_postpones_attempts(self) -> None:
        """
        While the relay profile is throttled, the next attempt waits for
        the throttling to end, however short the backoff.
        """
        h = self.harness()
        h.relay.answers["b@y.test"] = Status.DEFERRED
        entry = h.queue("b@y.test")
        h.relay.throttled["out"] = T0 + 1800
        h.run()
        self.assertEqual(len(h.relay.deliveries), 0)
        self.assertEqual(h.manager.next_attempt(entry.queue_id), T0 + 1800)
        h.run(1800)
        self.assertEqual(len(h.relay.deliveries), 1)

    def test_expiry_bounces_with_5_4_7(self) -> None:
        """
        A recipient still deferred when the lifetime runs out fails with
        5.4.7 and its last problem; the sender gets one bounce about it
        and the entry goes.
        """
        h = self.harness(RetryPolicy(first=300, maximum=3600, lifetime=1000))
        h.relay.answers["b@y.test"] = Status.DEFERRED
        entry = h.queue("b@y.test")
        h.run()
        h.run(1000)
        self.assertNotIn(entry.queue_id, [e.queue_id for e in h.entries()])
        (report,) = h.bounces.reports
        self.assertEqual(
            (report.about, report.recipients, report.delayed),
            (entry.queue_id, ("b@y.test",), False),
        )
        record = report.records["b@y.test"]
        self.assertEqual((record["code"], record["enhanced"]), (554, "5.4.7"))
        self.assertIn("try again later", record["text"])
        # The bounce was queued as a message of its own and relayed, as
        # generated (unscanned) mail, from the null sender to the sender.
        (_, bounce) = h.relay.deliveries[-1]
        self.assertEqual(bounce.sender, "")
        self.assertEqual([r.address for r in bounce.recipients], ["a@x.test"])
        self.assertEqual(h.processor.jobs[-1][0], "generated")

    def test_one_delay_warning(self) -> None:
        """
        A message delayed past the warning time makes one delay warning,
        however many attempts follow.
        """
        h = self.harness(
            RetryPolicy(first=300, maximum=300, lifetime=86400, delay_warning=600)
        )
        h.relay.answers["b@y.test"] = Status.DEFERRED
        h.queue("b@y.test")
        h.run()
        for _ in range(6):
            h.run(300)
        warnings = [r for r in h.bounces.reports if r.delayed]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0].recipients, ("b@y.test",))

    def test_partial_delivery_bounces_only_the_failed(self) -> None:
        """
        Of two recipients, the delivered one is done and the refused one is
        bounced alone; the entry goes at once.
        """
        h = self.harness()
        h.relay.answers["bad@y.test"] = Status.FAILED
        h.queue("good@y.test", "bad@y.test")
        h.run()
        (report,) = h.bounces.reports
        self.assertEqual(report.recipients, ("bad@y.test",))
        self.assertEqual([e for e in h.entries() if e not in h.reports()], [])

    def test_no_bounce_for_a_null_sender(self) -> None:
        """
        A refused recipient of a message from the null sender ends the
        entry without any report (a bounce is never bounced).
        """
        h = self.harness()
        h.relay.answers["bad@y.test"] = Status.FAILED
        h.queue("bad@y.test", sender="")
        h.run()
        self.assertEqual(h.bounces.reports, [])
        self.assertEqual(h.entries(), [])

    def test_retry_now(self) -> None:
        """
        An operator's "retry now" makes a waiting entry's attempt happen at
        once, without resetting its backoff for the attempts after.
        """
        h = self.harness()
        h.relay.answers["b@y.test"] = Status.DEFERRED
        entry = h.queue("b@y.test")
        h.run()
        self.assertTrue(h.manager.retry_now(entry.queue_id))
        h.run()
        self.assertEqual(len(h.relay.deliveries), 2)
        self.assertEqual(h.state(entry).attempts, 2)
        self.assertFalse(h.manager.retry_now("NOSUCHID"))

    def test_state_survives_a_restart(self) -> None:
        """
        After a restart the entry keeps its backoff (no attempt before its
        next attempt time) and its recipients' outcomes.
        """
        h = self.harness()
        h.relay.answers["b@y.test"] = Status.DEFERRED
        h.relay.answers["c@y.test"] = Status.DELIVERED
        entry = h.queue("b@y.test", "c@y.test")
        h.run()
        h.stop()
        h.start()
        (again,) = h.recovered
        h.manager.start(h.recovered)
        h.run()
        self.assertEqual(len(h.relay.deliveries), 1)
        state = h.state(again)
        self.assertEqual(state.recipients["c@y.test"].status, RecipientStatus.DELIVERED)
        self.assertEqual(state.next_attempt_at, T0 + 300)
        h.run(300)
        (_, outgoing) = h.relay.deliveries[-1]
        self.assertEqual([r.address for r in outgoing.recipients], ["b@y.test"])
        self.assertEqual(again.queue_id, entry.queue_id)
