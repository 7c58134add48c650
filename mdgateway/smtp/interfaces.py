# -*- test-case-name: tests.test_smtp_protocol -*-
"""
The seams between the SMTP server and whatever decides and stores mail.

The protocol layer knows nothing of rules, Core or the spool. It asks an
L{IEnvelopeHandler} about each connection, sender and recipient, and streams
message content into the L{IMessageSink} the handler opens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from mdgateway.smtp.parse import MailFrom, RcptTo
    from mdgateway.smtp.replies import Reply


@attrs.define
class ConnectionInfo:
    """
    What is known about one client connection; it grows as the session does.

    @ivar client: the real client (after a PROXY header) as (host, port).
    @ivar server: the local address the client connected to.
    """

    session_id: str
    listener: str
    client: tuple[str, int]
    server: tuple[str, int]
    proxied: bool = False
    helo: str | None = None
    esmtp: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    authenticated_user: str | None = None
    config_version: str = ""
    #: Why TLS failed on this connection (OpenSSL's reason), if it did.
    tls_error: str | None = None
    #: The handler's own per-connection state, e.g. the policy in force when
    #: the client connected, so a reload never changes a session midway.
    context: Any = None

    @property
    def protocol_name(self) -> str:
        """
        The C{with} keyword of RFC 3848 for the Received header.
        """
        return self.protocol_for(smtputf8=False)

    def protocol_for(self, smtputf8: bool) -> str:
        """
        The C{with} keyword for a transaction: RFC 6531's C{UTF8SMTP} family
        when its MAIL carried C{SMTPUTF8}, else RFC 3848's C{ESMTP} family.
        """
        if not self.esmtp:
            return "SMTP"
        name = "UTF8SMTP" if smtputf8 else "ESMTP"
        if self.tls_version:
            name += "S"
        if self.authenticated_user:
            name += "A"
        return name


@attrs.frozen
class RecipientDecision:
    """
    The answer to a recipient: the reply, and what it was bound to (the
    security rule) when accepted.
    """

    reply: Reply
    binding: object = None


class IMessageSink(Interface):
    """
    Where the content of one message goes while it is received.
    """

    def write(data: bytes) -> bool:
        """
        Take the next piece of message content.

        @return: L{False} when the sink would like the sender paused until
            the callback given to L{on_drained} runs.
        """

    def on_drained(callback: object) -> None:
        """
        Call C{callback()} once buffered content has been written out.
        """

    def finish() -> object:
        """
        All content is in: make it durable.

        @return: a L{Deferred} firing with the L{Reply} for the client
            (C{250} with the queue id, or a 4xx such as C{452 4.3.1}).
        """

    def abort() -> None:
        """
        Discard the message (refused, or the client went away).
        """


class IEnvelopeHandler(Interface):
    """
    Decides connections, senders and recipients, and opens message sinks.
    """

    def connected(info: ConnectionInfo) -> Reply | None:
        """
        A client connected (after the PROXY header when there is one).

        @return: L{None} to greet it, or a refusal reply to send and close.
        """

    def check_sender(info: ConnectionInfo, mail: MailFrom) -> object:
        """
        @return: a L{Reply} or a L{Deferred} firing with one.
        """

    def check_recipient(info: ConnectionInfo, mail: MailFrom, rcpt: RcptTo) -> object:
        """
        @return: a L{RecipientDecision} or a L{Deferred} firing with one.
        """

    def open_message(
        info: ConnectionInfo,
        mail: MailFrom,
        recipients: list[tuple[RcptTo, object]],
    ) -> IMessageSink:
        """
        The client is about to send content for this transaction.
        """

    def authenticate(info: ConnectionInfo, username: str, password: str) -> object:
        """
        @return: a L{Deferred} firing with the authenticated user name, or
            with L{None} when the credentials are refused.
        """

    def message_refused(info: ConnectionInfo, mail: MailFrom, reply: Reply) -> None:
        """
        Message content was refused by the server itself (too big, bare
        CR/LF, too many hops); the refused log hears of it through
        L{refusal_sent} like of every other refusal.
        """

    def refusal_sent(
        info: ConnectionInfo,
        reply: Reply,
        mail: MailFrom | None,
        rcpt: RcptTo | None,
    ) -> None:
        """
        The server sent C{reply}, a 4xx or 5xx, to the client: called once
        for every negative reply, whoever decided it (this handler's own
        answers, the session's syntax and sequence errors, limits, TLS and
        AUTH requirements, timeouts, draining, connection limits), so the
        refused log and its counter see them all, and see each once.

        @param mail: the transaction's sender, when there is one.
        @param rcpt: the recipient the reply refused, for a RCPT refusal.
        """

    def disconnected(info: ConnectionInfo) -> None:
        """
        The connection is gone.
        """

    accepting = Attribute("False while the gateway drains: new commands get 421 4.3.2.")
