# -*- test-case-name: tests.test_console -*-
"""
The queue: every spooled message of this instance's processes with its
recipients' state, and what L{IOperations} can do to one today (retry
now, for a message the primary process holds).

Each row is built by L{_row} and each action by L{_actions}, so the queue
tools still to come (hold, delete, bounce, flush, a content view, other
instances) add a column or a button here, and a route in the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web.template import Tag, tags

from mdgateway.ops.console.http import Call, Response, redirect
from mdgateway.ops.console.render import (
    button,
    duration,
    href,
    post_form,
    size,
    table,
    when,
)
from mdgateway.ops.interfaces import QueueEntry

if TYPE_CHECKING:
    from mdgateway.ops.console.app import Console
    from mdgateway.ops.console.auth import Session


def _recipients(entry: QueueEntry) -> Tag:
    return tags.ul(
        *(
            tags.li(
                f"{r.address}: {r.status}",
                f" ({r.last_reply})" if r.last_reply else "",
            )
            for r in entry.recipients
        ),
        class_="plain",
    )


def _actions(entry: QueueEntry, session: Session) -> Any:
    if entry.worker != 0:
        return tags.span(f"worker {entry.worker} retries it", class_="empty")
    return post_form(
        href("queue", entry.queue_id, "retry"),
        session,
        button("Retry now", class_="retry"),
        class_="inline",
    )


def _row(entry: QueueEntry, now: float, session: Session) -> list[Any]:
    return [
        tags.code(entry.queue_id),
        "primary" if entry.worker == 0 else f"worker {entry.worker}",
        when(entry.received_at),
        duration(now - entry.received_at),
        entry.sender or "<>",
        _recipients(entry),
        size(entry.size),
        str(entry.attempts),
        when(entry.next_attempt),
        entry.last_error,
        entry.generated or "",
        _actions(entry, session),
    ]


async def listing(console: Console, call: Call) -> Response:
    entries = await console.operations.queue()
    content = [
        tags.p(
            f"{len(entries)} message(s) in this instance's spools, oldest first.",
            class_="pager",
        ),
        table(
            (
                "Queue id",
                "Process",
                "Received (UTC)",
                "Age",
                "Sender",
                "Recipients",
                "Size",
                "Attempts",
                "Next attempt (UTC)",
                "Last error",
                "Generated",
                "",
            ),
            (_row(e, call.now, call.user) for e in entries),
            empty="The queue is empty.",
            id="queue",
        ),
    ]
    return await console.page(call, "Queue", "queue", content)


async def retry(console: Console, call: Call) -> Response:
    (queue_id,) = call.args
    await console.operations.retry_now(queue_id)
    console.audit(call, "retry now of queued message", queue_id)
    call.user.flash("ok", f"Retrying {queue_id} now.")
    return redirect(href("queue"))
