# -*- test-case-name: tests.test_console -*-
"""
The queue: every spooled message of every instance of the cluster (each
named with its instance and process) with its recipients' state, what can
be done to one (hold, release the hold, retry now, bounce, delete; the
last two after a confirmation) and to all (flush), and one message's
content view (its header block and MIME structure, as escaped text).

Every action goes to L{IOperations.queue_action} with the operator's
name, which finds the process and instance holding the message and
audits it; a form names the instance the listing showed, so the action
reaches the right one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from twisted.web.template import Tag, tags

from mdgateway.message.view import MessagePart, MessageView
from mdgateway.ops.console.http import Call, Response, redirect
from mdgateway.ops.console.pages.quarantine import headers_and_parts
from mdgateway.ops.console.render import (
    button,
    duration,
    facts,
    href,
    post_form,
    size,
    table,
    when,
)
from mdgateway.ops.interfaces import QueueAction, QueuedMessage, QueueEntry

if TYPE_CHECKING:
    from mdgateway.ops.console.app import Console
    from mdgateway.ops.console.auth import Session

#: What each action's button and notice say.
_DONE = {
    "hold": "Held",
    "release-hold": "Hold released for",
    "retry": "Retrying",
    "bounce": "Bounced",
    "delete": "Deleted",
}


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


def _process(entry: QueueEntry) -> str:
    return "primary" if entry.worker == 0 else f"worker {entry.worker}"


def _small_form(
    entry: QueueEntry, session: Session, action: str, label: str, **kw: str
) -> Tag:
    return post_form(
        href("queue", entry.queue_id, action),
        session,
        button(label, **kw),
        fields={"instance": entry.instance},
        class_="inline",
    )


def _actions(entry: QueueEntry, session: Session) -> Any:
    """
    The buttons of one message: hold or release, retry, bounce and delete
    (those two lead to a confirmation page).
    """
    query = {"instance": entry.instance}
    out = tags.div(class_="queue-actions")
    if entry.held_by is not None:
        out(
            _small_form(
                entry, session, "release-hold", "Release hold", class_="release-hold"
            )
        )
    else:
        out(
            _small_form(entry, session, "hold", "Hold", class_="hold"),
            _small_form(entry, session, "retry", "Retry now", class_="retry"),
        )
    out(
        tags.a(
            "Bounce…",
            href=href("queue", entry.queue_id, "bounce", query=query),
            class_="bounce",
        ),
        " ",
        tags.a(
            "Delete…",
            href=href("queue", entry.queue_id, "delete", query=query),
            class_="delete",
        ),
    )
    return out


def _held(entry: QueueEntry) -> Any:
    if entry.held_by is None:
        return ""
    return tags.span(f"held by {entry.held_by}", class_="badge warn held")


def _row(entry: QueueEntry, now: float, session: Session) -> list[Any]:
    return [
        tags.a(
            tags.code(entry.queue_id),
            href=href("queue", entry.queue_id, query={"instance": entry.instance}),
            class_="queue-id",
        ),
        entry.instance,
        _process(entry),
        when(entry.received_at),
        duration(now - entry.received_at),
        entry.sender or "<>",
        _recipients(entry),
        size(entry.size),
        str(entry.attempts),
        when(entry.next_attempt),
        _held(entry),
        entry.last_error,
        entry.generated or "",
        _actions(entry, session),
    ]


async def listing(console: Console, call: Call) -> Response:
    instance = call.param("instance")
    result = await console.operations.cluster_queue(instance)
    entries = result.entries
    problems = [i for i in result.instances if i.problem]
    truncated = [i for i in result.instances if i.total > i.listed]
    content = [
        tags.p(
            f"{len(entries)} message(s) in the queues of "
            f"{len(result.instances) - len(problems)} instance(s), oldest first.",
            class_="pager",
        ),
        tags.ul(
            *(tags.li(f"{i.name}: not listed ({i.problem})") for i in problems),
            *(
                tags.li(f"{i.name}: the first {i.listed} of {i.total} shown")
                for i in truncated
            ),
            class_="flash error",
            id="instance-problems",
        )
        if problems or truncated
        else "",
        post_form(
            href("queue", "flush"),
            call.user,
            button("Flush: try every message now", id="flush"),
            " (not those on hold)",
            fields={"instance": instance} if instance else {},
            class_="inline",
        ),
        table(
            (
                "Queue id",
                "Instance",
                "Process",
                "Received (UTC)",
                "Age",
                "Sender",
                "Recipients",
                "Size",
                "Attempts",
                "Next attempt (UTC)",
                "Hold",
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


# --------------------------------------------------------------------------
# One message


def _view(message: QueuedMessage) -> MessageView:
    return MessageView(
        size=message.entry.size,
        headers=message.headers,
        headers_complete=message.headers_complete,
        parts=tuple(MessagePart(**_part_fields(p)) for p in message.parts),
        unreliable=message.unreliable,
    )


def _part_fields(part: Any) -> dict[str, Any]:
    return attrs.asdict(part)


async def show(console: Console, call: Call) -> Response:
    (queue_id,) = call.args
    message = await console.operations.queued_message(queue_id, call.param("instance"))
    entry = message.entry
    content = [
        facts(
            [
                ("Queue id", tags.code(entry.queue_id)),
                ("Instance", entry.instance),
                ("Process", _process(entry)),
                ("Received (UTC)", when(entry.received_at)),
                ("From client", f"{message.client_helo} [{message.client_address}]"),
                ("Sender", entry.sender or "<>"),
                ("Recipients", _recipients(entry)),
                ("Size", size(entry.size)),
                ("Attempts", str(entry.attempts)),
                ("Next attempt (UTC)", when(entry.next_attempt)),
                ("On hold", f"yes, by {entry.held_by}" if entry.held_by else "no"),
                ("Generated", entry.generated or "no"),
            ]
        ),
        _actions(entry, call.user),
        *headers_and_parts(_view(message), scanned=False),
    ]
    return await console.page(call, f"Queued message {queue_id}", "queue", content)


async def _confirm(
    console: Console, call: Call, action: str, error: str | None = None
) -> Response:
    (queue_id,) = call.args
    instance = call.param("instance") or call.field("instance")
    message = await console.operations.queued_message(queue_id, instance)
    entry = message.entry
    pending = [r.address for r in entry.recipients if r.status == "pending"]
    what = (
        "Bounce: fail the recipients still pending and tell the sender now"
        if action == "bounce"
        else "Delete from the queue"
    )
    form = post_form(
        href("queue", queue_id, action),
        call.user,
        facts(
            [
                ("Queue id", tags.code(queue_id)),
                ("Instance", entry.instance),
                ("Sender", entry.sender or "<>"),
                ("Pending", ", ".join(pending) or "none"),
            ]
        ),
        tags.label(
            tags.input(type="checkbox", name="bounce", value="yes", id="with-bounce"),
            " Send the sender a bounce (a DSN saying the message was deleted "
            "by the administrator)",
        )
        if action == "delete"
        else "",
        tags.label(
            tags.input(type="checkbox", name="confirm", value="yes", id="confirm"),
            f" Yes, {action} this message.",
        ),
        tags.div(
            button(action.capitalize(), id=f"do-{action}", class_="danger"),
            " ",
            tags.a("Cancel", href=href("queue")),
            class_="actions",
        ),
        fields={"instance": entry.instance},
    )
    content = [
        tags.div(tags.p(error), class_="flash error", role="alert") if error else "",
        form,
    ]
    return await console.page(
        call, what, "queue", content, status=400 if error else 200
    )


async def confirm_bounce(console: Console, call: Call) -> Response:
    return await _confirm(console, call, "bounce")


async def confirm_delete(console: Console, call: Call) -> Response:
    return await _confirm(console, call, "delete")


# --------------------------------------------------------------------------
# Actions


async def _act(console: Console, call: Call, action: str) -> Response:
    (queue_id,) = call.args
    if action in ("bounce", "delete") and not call.checked("confirm"):
        console.audit(call, f"queue {action} refused (not confirmed)", queue_id)
        return await _confirm(
            console,
            call,
            action,
            f"Not done: {action} was not confirmed. Nothing was changed.",
        )
    result = await console.operations.queue_action(
        QueueAction(
            action=action,
            queue_id=queue_id,
            by=call.user.by,
            instance=call.field("instance") or None,
            bounce=action == "delete" and call.checked("bounce"),
            origin="console",
        )
    )
    console.audit(call, f"queue {action}", queue_id, detail=result.detail)
    note = f"{_DONE[action]} {queue_id}: {result.detail}"
    call.user.flash("ok", note)
    return redirect(href("queue"))


async def hold(console: Console, call: Call) -> Response:
    return await _act(console, call, "hold")


async def release_hold(console: Console, call: Call) -> Response:
    return await _act(console, call, "release-hold")


async def retry(console: Console, call: Call) -> Response:
    return await _act(console, call, "retry")


async def bounce(console: Console, call: Call) -> Response:
    return await _act(console, call, "bounce")


async def delete(console: Console, call: Call) -> Response:
    return await _act(console, call, "delete")


async def flush(console: Console, call: Call) -> Response:
    instance = call.field("instance") or None
    result = await console.operations.flush(call.user.by, instance, "console")
    console.audit(call, "queue flush", instance or "all", tried=result.tried)
    tried = ", ".join(f"{n} on {name}" for name, n in result.tried.items())
    call.user.flash(
        "ok" if not result.problems else "error",
        f"Flushed: {tried or 'nothing'} tried now.",
        tuple(f"{name}: {why}" for name, why in result.problems.items()),
    )
    return redirect(href("queue"))
