# -*- test-case-name: tests.test_store -*-
"""
The operator audit: who did what to which item, when, and how it ended.

Every change an operator makes through the admin API (release, forward,
rescan, pin, delete, retry, reload) is one L{AuditEntry}. An action that
must not happen twice (a release delivers mail) is first I{claimed}: its
entry is written with a claim string before the action starts, and the
store refuses a second entry with the same claim, across every instance
that shares the store. The claim is the client's idempotency key, or
something that names the action itself (release of this item), so a
repeat is answered from the first entry instead of being done again.
"""

from __future__ import annotations

import attrs

#: L{AuditEntry.result} while the action is under way.
STARTED = "started"
#: The action was done.
DONE = "done"
#: The action was not done (its detail says why).
REFUSED = "refused"
FAILED = "failed"
#: A retry of a done action with the same idempotency key: answered from
#: the first, nothing done again.
REPLAYED = "replayed"

AUDIT_RESULTS = (STARTED, DONE, REFUSED, FAILED, REPLAYED)


@attrs.frozen
class AuditEntry:
    """
    One operator action.

    @ivar actor: who: the name of the admin token that authorized it.
    @ivar action: C{release}, C{forward}, C{rescan}, C{pin}, C{unpin},
        C{delete}, C{retry}, C{reload}.
    @ivar target: what: a quarantine item id, a queue id, C{config}.
    @ivar result: one of L{AUDIT_RESULTS}.
    @ivar detail: the outcome in words (C{queued as X}, the error), and
        the client address the request came from.
    @ivar claim: the claim that makes the action happen at most once, or
        C{None}.
    @ivar key: the idempotency key the client sent with the request, if
        any (a retry with the same key is answered from this entry).
    @ivar outcome: what a repeat of a done action answers with (the new
        queue id of a release).
    @ivar id: assigned by the store; C{None} on input.
    """

    at: float
    actor: str
    action: str
    target: str
    result: str
    detail: str = ""
    claim: str | None = None
    key: str | None = None
    outcome: str = ""
    finished_at: float | None = None
    id: int | None = None


@attrs.frozen
class AuditFilter:
    """
    Audit filters; every one that is set must match (exact, except the
    time window: C{since} inclusive, C{until} exclusive).
    """

    since: float | None = None
    until: float | None = None
    actor: str | None = None
    action: str | None = None
    target: str | None = None
