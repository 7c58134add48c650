# -*- test-case-name: tests.test_testing -*-
"""
Verified fakes of mdgateway's seams, for tests here and in embedding programs.

Each fake provides the real interface (checked with C{verifyObject} in
C{tests/test_testing.py}) and records what it was asked, so tests assert on
behaviour instead of patching our own code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mdgateway.smtp.interfaces import (
    ConnectionInfo,
    IEnvelopeHandler,
    IMessageSink,
    RecipientDecision,
)
from mdgateway.smtp.parse import MailFrom, RcptTo
from mdgateway.smtp.replies import Reply

SENDER_OK = Reply.of(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply.of(250, "2.1.5", "Ok")


@implementer(IMessageSink)
class MemorySink:
    """
    Keeps message content in memory; C{finish} answers with C{reply}, or
    waits for the test to fire C{pending} when C{hold} is set.

    @ivar paused: the next C{write} asks the sender to pause.
    """

    def __init__(self, queue_id: str = "TESTID", hold: bool = False) -> None:
        self.queue_id = queue_id
        self.content = b""
        self.finished = False
        self.aborted = False
        self.hold = hold
        self.pending: Deferred[Reply] | None = None
        self.paused = False
        self._drained: list[Callable[[], object]] = []
        self.reply = Reply.of(250, "2.0.0", f"Ok: queued as {queue_id}")

    def write(self, data: bytes) -> bool:
        self.content += data
        return not self.paused

    def on_drained(self, callback: Any) -> None:
        self._drained.append(callback)

    def drain(self) -> None:
        """
        Test helper: the buffered content has been written out.
        """
        self.paused = False
        callbacks, self._drained = self._drained, []
        for callback in callbacks:
            callback()

    def finish(self) -> Deferred[Reply]:
        self.finished = True
        if self.hold:
            self.pending = Deferred()
            return self.pending
        return succeed(self.reply)

    def abort(self) -> None:
        self.aborted = True


@implementer(IEnvelopeHandler)
class FakeEnvelopeHandler:
    """
    An envelope handler driven by the test.

    Answers are immediate by default. Set C{hold_checks} to get Deferreds in
    C{pending} that the test fires, to exercise asynchronous checks.
    C{events} records every call as a tuple.
    """

    def __init__(self) -> None:
        self.accepting = True
        self.events: list[tuple[Any, ...]] = []
        self.hold_checks = False
        self.pending: list[Deferred[Any]] = []
        self.refuse_connection: Reply | None = None
        self.sender_reply = SENDER_OK
        self.refused_recipients: dict[str, Reply] = {}
        self.users: dict[str, str] = {}
        self.sinks: list[MemorySink] = []
        self.hold_finish = False
        self.infos: list[ConnectionInfo] = []
        #: Every negative reply the server reported, as
        #: C{(code, sender or None, recipient or None)}.
        self.refusals: list[tuple[int, str | None, str | None]] = []

    def _answer(self, value: Any) -> Any:
        if not self.hold_checks:
            return value
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        d.addCallback(lambda _: value)
        return d

    def connected(self, info: ConnectionInfo) -> Reply | None:
        self.infos.append(info)
        self.events.append(("connected", info.client))
        return self.refuse_connection

    def check_sender(self, info: ConnectionInfo, mail: MailFrom) -> Any:
        self.events.append(("sender", mail.sender_text))
        return self._answer(self.sender_reply)

    def check_recipient(
        self, info: ConnectionInfo, mail: MailFrom, rcpt: RcptTo
    ) -> Any:
        address = str(rcpt.recipient)
        self.events.append(("recipient", address))
        reply = self.refused_recipients.get(address, RECIPIENT_OK)
        return self._answer(
            RecipientDecision(reply, "rule" if reply.is_positive else None)
        )

    def open_message(
        self,
        info: ConnectionInfo,
        mail: MailFrom,
        recipients: list[tuple[RcptTo, object]],
    ) -> IMessageSink:
        self.events.append(
            ("open", mail.sender_text, [str(r.recipient) for r, _ in recipients])
        )
        sink = MemorySink(f"ID{len(self.sinks)}", hold=self.hold_finish)
        self.sinks.append(sink)
        return sink

    def authenticate(self, info: ConnectionInfo, username: str, password: str) -> Any:
        self.events.append(("auth", username))
        ok = self.users.get(username) == password
        return succeed(username if ok else None)

    def message_refused(
        self, info: ConnectionInfo, mail: MailFrom, reply: Reply
    ) -> None:
        self.events.append(("message refused", reply.code))

    def refusal_sent(
        self,
        info: ConnectionInfo,
        reply: Reply,
        mail: MailFrom | None,
        rcpt: RcptTo | None,
    ) -> None:
        self.refusals.append(
            (
                reply.code,
                None if mail is None else mail.sender_text,
                None if rcpt is None else str(rcpt.recipient),
            )
        )

    def disconnected(self, info: ConnectionInfo) -> None:
        self.events.append(("disconnected", info.client))
