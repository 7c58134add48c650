# -*- test-case-name: tests.test_e2e_admin -*-
"""
The refused log: every refusal the SMTP edge answers is counted and kept in
the store, so an operator can see who was turned away and why.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mdgateway.smtp.interfaces import ConnectionInfo
from mdgateway.smtp.replies import Reply
from mdgateway.store.interfaces import IStore, Refusal

log = Logger()


class RefusalRecorder:
    """
    Counts a refusal in the metrics and records it in the store's refused
    log, in the background: a slow or absent store never holds up a reply.
    """

    def __init__(self, store: IStore, metrics: Any, clock: IReactorTime) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock

    def __call__(
        self,
        info: ConnectionInfo,
        sender: str | None,
        recipient: str | None,
        reply: Reply,
    ) -> None:
        self._metrics.refused(reply.code, reply.status or None, reply.text)
        refusal = Refusal(
            at=self._clock.seconds(),
            listener=info.listener,
            client_address=info.client[0],
            code=reply.code,
            reason=reply.text,
            enhanced=reply.status or None,
            helo=info.helo,
            sender=sender,
            recipient=recipient,
        )
        d = Deferred.fromCoroutine(self._store.record_refusal(refusal))
        d.addErrback(lambda f: log.failure("could not record a refusal", f))
