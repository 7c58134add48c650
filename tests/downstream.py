"""
Real downstream SMTP servers for tests: aiosmtpd on 127.0.0.1, each in its
own thread with its own asyncio loop, recording what it receives and
answering RCPT and DATA as told.
"""

from __future__ import annotations

import asyncio
from typing import Any

import attrs
from aiosmtpd.controller import Controller


@attrs.define
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]


class RecordingHandler:
    """
    An aiosmtpd handler that records messages and answers RCPT and DATA as
    told.
    """

    def __init__(
        self,
        rcpt_replies: dict[str, str] | None = None,
        data_reply: str | None = None,
        pipelining: bool = False,
    ) -> None:
        self.rcpt_replies = rcpt_replies or {}
        self.data_reply = data_reply
        self.pipelining = pipelining
        self.messages: list[Received] = []
        self.ehlo_names: list[str] = []

    async def handle_EHLO(
        self,
        server: Any,
        session: Any,
        envelope: Any,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        self.ehlo_names.append(hostname)
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                list(envelope.mail_options),
            )
        )
        return self.data_reply or "250 2.0.0 Ok: queued"


class _Controller(Controller):
    """
    A controller that may listen on port 0: it learns the real port before
    its own readiness check connects.
    """

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server), self.server
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()
