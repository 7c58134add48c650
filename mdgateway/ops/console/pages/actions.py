# -*- test-case-name: tests.test_console -*-
"""
What an operator does to quarantined originals: release (confirmed; twice
when Core found malware), rescan, forward, pin, delete (confirmed), one
by one or on a selection. Each action passes the operator's name to
L{IOperations} and is logged with it.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING

from twisted.web.template import tags

from mdgateway.ops.console.http import Call, ConsoleError, Response, redirect
from mdgateway.ops.console.pages.quarantine import Examined, back_path, examine
from mdgateway.ops.console.render import button, href, post_form, table
from mdgateway.ops.interfaces import ActionResult, OperationError
from mdgateway.smtp.parse import ParseError, parse_mailbox

if TYPE_CHECKING:
    from mdgateway.ops.console.app import Console

#: Most addresses one forward may name; most items one bulk action takes.
MAX_FORWARD = 100
MAX_BULK = 500

_ADDRESS_SPLIT = re.compile(r"[\s,;]+")
_BULK_ACTIONS = ("release", "rescan", "pin", "unpin", "delete")


# --------------------------------------------------------------------------
# Confirmations


async def _confirm_page(
    console: Console,
    call: Call,
    action: str,
    items: list[Examined],
    *,
    status: int = 200,
    error: str | None = None,
    single: bool,
) -> Response:
    what = {"release": "deliver", "delete": "delete"}[action]
    heading = {
        "release": "Release: deliver to the original recipients, unscanned",
        "delete": "Delete for good",
    }[action]
    fields = {"back": back_path(call), "step": "confirm"} if not single else {}
    form_action = (
        href("quarantine", items[0].item.id, action)
        if single
        else href("quarantine", "bulk")
    )
    blocked = [e for e in items if e.blocked]
    cancel = href("quarantine", items[0].item.id) if single else back_path(call)
    body = post_form(
        form_action,
        call.user,
        *(
            tags.input(type="hidden", name="ids", value=e.item.id)
            for e in items
            if not single
        ),
        tags.input(type="hidden", name="action", value=action) if not single else "",
        table(
            ("Item", "Sender", "Recipients", "Subject", "Reason", "Core found"),
            (
                [
                    tags.a(e.item.id, href=href("quarantine", e.item.id)),
                    e.item.message.sender or "<>",
                    ", ".join(e.item.message.recipients),
                    tags.span(e.item.message.subject, class_="subject"),
                    e.item.reason,
                    e.findings() if e.blocked else "nothing blocked",
                ]
                for e in items
            ),
            id="confirm-items",
        ),
        tags.label(
            tags.input(type="checkbox", name="confirm", value="yes", id="confirm"),
            f" Yes, {what} {_these(items)}.",
        ),
        tags.div(
            tags.p(
                tags.strong(_blocked_summary(items, blocked)),
                "Releasing sends what Core found (malware, or data the rule "
                "keeps in) to the recipients.",
            ),
            tags.label(
                tags.input(
                    type="checkbox",
                    name="confirm_infected",
                    value="yes",
                    id="confirm-infected",
                ),
                f" I understand what Core found, and {what} it anyway.",
            ),
            class_="danger",
        )
        if blocked and action == "release"
        else "",
        tags.input(type="hidden", name="key", value=secrets.token_urlsafe(18)),
        tags.div(
            button(
                f"{action.capitalize()}",
                id=f"do-{action}",
                class_="danger" if action == "delete" else "",
            ),
            " ",
            tags.a("Cancel", href=cancel),
            class_="actions",
        ),
        fields=fields,
    )
    content = [
        tags.div(tags.p(error), class_="flash error", role="alert") if error else "",
        body,
    ]
    return await console.page(call, heading, "quarantine", content, status=status)


def _blocked_summary(items: list[Examined], blocked: list[Examined]) -> str:
    found = "found malware in" if any(e.infected for e in blocked) else "blocked"
    if len(items) > 1:
        return f"Core {found} {len(blocked)} of them. "
    return f"Core {found} this original. "


def _these(items: list[Examined]) -> str:
    return "this original" if len(items) == 1 else f"these {len(items)} originals"


def _unconfirmed(call: Call, action: str, items: list[Examined]) -> str | None:
    """
    Why the confirmation is not enough, or C{None}.
    """
    if not call.checked("confirm"):
        return f"Not done: {action} was not confirmed. Nothing was changed."
    if (
        action == "release"
        and any(e.blocked for e in items)
        and not call.checked("confirm_infected")
    ):
        return (
            "Not done: Core blocked what you asked to release, and that "
            "second confirmation was not given. Nothing was released."
        )
    return None


async def confirm_release(console: Console, call: Call) -> Response:
    (item_id,) = call.args
    return await _confirm_page(
        console, call, "release", [await examine(console, item_id)], single=True
    )


async def confirm_delete(console: Console, call: Call) -> Response:
    (item_id,) = call.args
    return await _confirm_page(
        console, call, "delete", [await examine(console, item_id)], single=True
    )


# --------------------------------------------------------------------------
# Actions


async def release(console: Console, call: Call) -> Response:
    (item_id,) = call.args
    e = await examine(console, item_id)
    why = _unconfirmed(call, "release", [e])
    if why is not None:
        console.audit(call, "release refused (not confirmed)", item_id)
        return await _confirm_page(
            console, call, "release", [e], status=400, error=why, single=True
        )
    queue_id = str(await _release(console, call, e, call.field("key")))
    console.audit(
        call,
        "released quarantined original",
        item_id,
        queue_id=queue_id,
        infected=bool(e.infected),
    )
    call.user.flash("ok", f"Released {item_id}: queued as {queue_id} for delivery.")
    return redirect(href("quarantine", item_id))


async def _release(
    console: Console, call: Call, e: Examined, key: str | None
) -> ActionResult:
    """
    Release C{e}; an original Core blocked was confirmed twice by now, so it
    goes with C{force}, but never twice from the console: its own form key
    makes a resubmission replay the first answer, and an original released
    before is refused here.
    """
    if not e.blocked:
        result: ActionResult = await console.operations.release(
            e.item.id, call.user.by, key=key or None, origin="console"
        )
        return result
    if e.item.released_at is not None:
        raise OperationError(
            409,
            f"{e.item.id} was released already by {e.item.released_by}; "
            "release it again with the CLI or API and force if you must",
        )
    result = await console.operations.release(
        e.item.id, call.user.by, force=True, key=key or None, origin="console"
    )
    return result


async def rescan(console: Console, call: Call) -> Response:
    (item_id,) = call.args
    queue_id = str(await console.operations.rescan(item_id, call.user.by))
    console.audit(call, "rescanning quarantined original", item_id, queue_id=queue_id)
    call.user.flash("ok", f"Rescanning {item_id}: queued as {queue_id}.")
    return redirect(href("quarantine", item_id))


async def forward(console: Console, call: Call) -> Response:
    (item_id,) = call.args
    e = await examine(console, item_id)
    addresses = [a for a in _ADDRESS_SPLIT.split(call.field("to") or "") if a]
    problem = None
    if not addresses:
        problem = "Not forwarded: give at least one address."
    elif len(addresses) > MAX_FORWARD:
        problem = f"Not forwarded: at most {MAX_FORWARD} addresses."
    else:
        for address in addresses:
            try:
                parse_mailbox(address, utf8=True)
            except ParseError:
                problem = f"Not forwarded: not an address: {address}"
                break
    if problem is None and e.blocked and not call.checked("confirm_infected"):
        problem = (
            "Not forwarded: Core blocked this original; tick the "
            "confirmation to forward it anyway."
        )
    if problem is not None:
        call.user.flash("error", problem)
        return redirect(href("quarantine", item_id))
    key = call.field("key") or None
    queue_id = str(
        await console.operations.forward(
            item_id, addresses, call.user.by, force=e.blocked, key=key, origin="console"
        )
    )
    console.audit(
        call, "forwarded quarantined original", item_id, to=addresses, queue_id=queue_id
    )
    call.user.flash(
        "ok", f"Forwarded {item_id} to {', '.join(addresses)}: queued as {queue_id}."
    )
    return redirect(href("quarantine", item_id))


async def pin(console: Console, call: Call) -> Response:
    (item_id,) = call.args
    pinned = call.field("pinned") == "true"
    await console.operations.pin(item_id, pinned, call.user.by)
    console.audit(call, "pinned" if pinned else "unpinned", item_id)
    call.user.flash("ok", f"{'Pinned' if pinned else 'Unpinned'} {item_id}.")
    return redirect(href("quarantine", item_id))


async def delete(console: Console, call: Call) -> Response:
    (item_id,) = call.args
    e = await examine(console, item_id)
    why = _unconfirmed(call, "delete", [e])
    if why is not None:
        return await _confirm_page(
            console, call, "delete", [e], status=400, error=why, single=True
        )
    await console.operations.delete(item_id, call.user.by)
    console.audit(call, "deleted quarantined original", item_id)
    call.user.flash("ok", f"Deleted {item_id}.")
    return redirect("/console/quarantine")


async def bulk(console: Console, call: Call) -> Response:
    action = call.field("action") or ""
    ids = list(dict.fromkeys(call.fields("ids")))
    back = back_path(call)
    if action not in _BULK_ACTIONS:
        raise ConsoleError(400, f"Unknown action {action!r}.")
    if not ids:
        call.user.flash("error", "Select at least one item first.")
        return redirect(back)
    if len(ids) > MAX_BULK:
        raise ConsoleError(400, f"At most {MAX_BULK} items at once.")
    if action in ("release", "delete"):
        items = [await examine(console, i) for i in ids]
        if call.field("step") != "confirm":
            return await _confirm_page(console, call, action, items, single=False)
        why = _unconfirmed(call, action, items)
        if why is not None:
            return await _confirm_page(
                console, call, action, items, status=400, error=why, single=False
            )
    done, failed = [], []
    by = call.user.by
    ops = console.operations
    examined = {e.item.id: e for e in items} if action == "release" else {}
    form_key = call.field("key")
    for item_id in ids:
        try:
            if action == "release":
                key = f"{form_key}:{item_id}" if form_key else None
                released = await _release(console, call, examined[item_id], key)
                done.append(f"{item_id} as {released}")
            elif action == "rescan":
                done.append(f"{item_id} as {await ops.rescan(item_id, by)}")
            elif action in ("pin", "unpin"):
                await ops.pin(item_id, action == "pin", by)
                done.append(item_id)
            else:
                await ops.delete(item_id, by)
                done.append(item_id)
        except OperationError as e:
            failed.append(f"{item_id}: {e.message}")
            console.audit(call, f"bulk {action} failed for", item_id, error=e.message)
        else:
            console.audit(call, f"bulk {action}", item_id)
    if done:
        call.user.flash("ok", f"{action.capitalize()}: {len(done)} done.", tuple(done))
    if failed:
        call.user.flash(
            "error", f"{action.capitalize()}: {len(failed)} failed.", tuple(failed)
        )
    return redirect(back)
