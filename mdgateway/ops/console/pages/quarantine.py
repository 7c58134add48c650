# -*- test-case-name: tests.test_console -*-
"""
The quarantine: the list with its filters and a form for actions on a
selection, one item's page (what the history knows, what Core found, the
original's headers and parts as escaped text, its action buttons) and the
download. The actions themselves are in L{mdgateway.ops.console.pages.actions}.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.basic import FileSender
from twisted.web.template import Tag, tags

from mdgateway.message.view import MessageView, inspect_message
from mdgateway.ops.console.forms import (
    QUARANTINE_FIELDS,
    pager,
    problems_box,
    quarantine_filter,
    search_form,
)
from mdgateway.ops.console.http import (
    SECURITY_HEADERS,
    Call,
    ConsoleError,
    Response,
)
from mdgateway.ops.console.pages.history import paged, recipients_text
from mdgateway.ops.console.render import (
    button,
    facts,
    href,
    post_form,
    size,
    table,
    verdict_badge,
    when,
)
from mdgateway.ops.operations import needs_force
from mdgateway.store.interfaces import (
    NotFoundError,
    PartVerdict,
    QuarantineItem,
)

if TYPE_CHECKING:
    from mdgateway.ops.console.app import Console

#: Words in Core's blocked reason that mean malware was found.
_INFECTED = ("infect", "suspicious", "malware", "virus", "threat")

_FILENAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@attrs.frozen
class Examined:
    """
    An item with what its history says Core found.

    @ivar infected: Core's findings on parts it found infected (one line
        per part), empty when none.
    @ivar blocked: Core blocked the original, so releasing or forwarding it
        takes a second, explicit confirmation (and C{force} below).
    """

    item: QuarantineItem
    parts: tuple[PartVerdict, ...]
    infected: tuple[str, ...]
    blocked: bool = False

    def findings(self) -> str:
        """
        What Core found, for the second confirmation.
        """
        if self.infected:
            return "; ".join(self.infected)
        reasons = sorted({p.blocked_reason for p in self.parts if p.blocked_reason})
        return "blocked: " + ("; ".join(reasons) or self.item.reason)


def infected_parts(parts: tuple[PartVerdict, ...]) -> tuple[str, ...]:
    """
    A line per part Core blocked as malware (infected or suspicious).
    """
    out = []
    for p in parts:
        reason = (p.blocked_reason or "").casefold()
        if p.blocked and any(word in reason for word in _INFECTED):
            out.append(
                f"part {p.part_id} {p.filename or p.content_type}: {p.blocked_reason}"
            )
    return tuple(out)


async def examine(console: Console, item_id: str) -> Examined:
    store = console.operations.store
    try:
        item = await store.get_quarantined(item_id)
    except NotFoundError:
        raise ConsoleError(
            404, f"There is no quarantined original {item_id}."
        ) from None
    try:
        parts = (await store.get_message(item.message.id)).parts
    except NotFoundError:
        parts = ()
    return Examined(item, parts, infected_parts(parts), needs_force(item))


async def _read_original(console: Console, item_id: str) -> MessageView:
    fd, path = tempfile.mkstemp(prefix="mdgateway-console-", dir=console.scratch_dir)
    os.close(fd)
    try:
        await console.operations.store.read_quarantined(item_id, path)
        return await deferToThreadPool(
            console.reactor, console.threadpool, inspect_message, path
        )
    finally:
        with suppress(OSError):
            os.unlink(path)


def back_path(call: Call) -> str:
    """
    The list page to return to (with its filters), from the form.
    """
    back = call.field("back") or ""
    if (
        back.startswith("/console/quarantine")
        and back.isprintable()
        and "//" not in back
    ):
        return back
    return "/console/quarantine"


# --------------------------------------------------------------------------
# The list


def _item_row(item: QuarantineItem) -> list[Any]:
    m = item.message
    return [
        tags.input(
            type="checkbox",
            name="ids",
            value=item.id,
            class_="select-item",
            **{"aria-label": f"select {item.id}"},
        ),
        when(item.quarantined_at),
        m.sender or "<>",
        recipients_text(m.recipients),
        tags.a(
            m.subject or "(no subject)",
            href=href("quarantine", item.id),
            class_="subject",
        ),
        item.reason,
        m.rule or "",
        size(item.size),
        "pinned" if item.pinned else "",
        f"{when(item.released_at)} by {item.released_by}" if item.released_at else "",
    ]


async def listing(console: Console, call: Call) -> Response:
    filters, page, problems = quarantine_filter(call)
    store = console.operations.store
    result = await paged(lambda p: store.list_quarantine(filters, p), page, problems)
    back = call.request.uri.decode("ascii", "replace")
    rows = table(
        (
            tags.input(
                type="checkbox",
                id="select-all",
                hidden="hidden",
                **{"aria-label": "select all"},
            ),
            "Quarantined (UTC)",
            "Sender",
            "Recipients",
            "Subject",
            "Reason",
            "Rule",
            "Size",
            "Pinned",
            "Released",
        ),
        (_item_row(item) for item in result.items),
        empty="The quarantine holds nothing that matches.",
        id="results",
    )
    actions = tags.div(
        "With the selected: ",
        *(
            button(label, name="action", value=action, class_=f"bulk-{action}")
            for action, label in (
                ("release", "Release…"),
                ("rescan", "Rescan"),
                ("pin", "Pin"),
                ("unpin", "Unpin"),
                ("delete", "Delete…"),
            )
        ),
        class_="actions bulk",
    )
    content = [
        search_form("quarantine", QUARANTINE_FIELDS, call),
        problems_box(problems),
        pager("quarantine", call, result.total, len(result.items), result.next_cursor),
        post_form(
            href("quarantine", "bulk"),
            call.user,
            rows,
            actions if result.items else "",
            fields={"back": back},
            id="bulk",
        ),
    ]
    return await console.page(call, "Quarantine", "quarantine", content)


# --------------------------------------------------------------------------
# One item


def headers_and_parts(view: MessageView, scanned: bool = True) -> list[Any]:
    """
    A message's header block and MIME parts, as escaped text (never
    rendered); C{scanned}: the message went through Core (a quarantined
    original has, a queued message may not have yet).
    """
    headers = tags.section(
        tags.h2("Headers"),
        tags.pre(view.headers, class_="headers", id="headers"),
        ""
        if view.headers_complete
        else tags.p("(the header block is longer; cut here)", class_="empty"),
    )
    if view.unreliable:
        then = (
            "the message was scanned as one file. Download it to look closer."
            if scanned
            else "it is scanned as one file."
        )
        parts: Tag = tags.p(
            f"The MIME structure cannot be trusted ({view.unreliable}); {then}",
            class_="empty",
        )
    else:
        parts = tags.div(id="mime-parts")
        for p in view.parts:
            title = f"{p.part_id} {p.content_type}"
            if p.filename:
                title += f" “{p.filename}”"
            block = tags.div(
                tags.h3(title),
                tags.p(
                    f"{size(p.size)} encoded, {p.transfer_encoding}"
                    + (f", charset {p.charset}" if p.charset else "")
                    + (f", {p.disposition}" if p.disposition else ""),
                    class_="meta",
                ),
                class_=f"mime-part depth-{min(p.depth, 6)}",
            )
            if p.preview is not None:
                block(tags.pre(p.preview, class_="part-text"))
                if p.truncated:
                    block(
                        tags.p("(preview cut; download for all of it)", class_="empty")
                    )
            parts(block)
    return [headers, tags.section(tags.h2("Parts (as text, never rendered)"), parts)]


def _item_facts(e: Examined) -> Tag:
    item, m = e.item, e.item.message
    return facts(
        [
            ("Item", item.id),
            ("History entry", tags.a(m.id, href=href("messages", m.id))),
            ("Sender", m.sender or "<>"),
            ("Recipients", ", ".join(m.recipients)),
            ("Subject", tags.span(m.subject, class_="subject")),
            ("Rule", m.rule or ""),
            ("Verdict", verdict_badge(m.verdict)),
            ("Reason", item.reason),
            ("Core found", "; ".join(e.infected) if e.infected else "no malware"),
            ("Quarantined (UTC)", when(item.quarantined_at)),
            ("Expires", when(item.expires_at) or "by the retention in force"),
            ("Size", size(item.size)),
            ("SHA-256", tags.code(item.sha256)),
            ("Pinned", "yes" if item.pinned else "no"),
            (
                "Released",
                f"{when(item.released_at)} by {item.released_by}"
                if item.released_at
                else "no",
            ),
        ]
    )


def _infected_box(e: Examined, what: str) -> Tag | str:
    """
    The second confirmation, for an original Core blocked.
    """
    if not e.blocked:
        return ""
    return tags.div(
        tags.p(
            tags.strong(
                "Core found malware in this original: "
                if e.infected
                else "Core blocked this original: "
            ),
            e.findings(),
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
        tags.input(type="hidden", name="key", value=secrets.token_urlsafe(18)),
        class_="danger",
    )


async def item(console: Console, call: Call) -> Response:
    (item_id,) = call.args
    e = await examine(console, item_id)
    view = await _read_original(console, item_id)
    session = call.user
    pinned = e.item.pinned
    actions = tags.section(
        tags.h2("Actions"),
        tags.div(
            tags.a(
                "Download .eml",
                href=href("quarantine", item_id, "eml"),
                class_="button",
                id="download",
            ),
            " ",
            tags.a(
                "Release…",
                href=href("quarantine", item_id, "release"),
                class_="button",
                id="release",
            ),
            " ",
            post_form(
                href("quarantine", item_id, "rescan"),
                session,
                button("Rescan", id="rescan"),
                class_="inline",
            ),
            " ",
            post_form(
                href("quarantine", item_id, "pin"),
                session,
                button("Unpin" if pinned else "Pin", id="pin"),
                fields={"pinned": "false" if pinned else "true"},
                class_="inline",
            ),
            " ",
            tags.a(
                "Delete…",
                href=href("quarantine", item_id, "delete"),
                class_="button danger",
                id="delete",
            ),
            class_="actions",
        ),
        post_form(
            href("quarantine", item_id, "forward"),
            session,
            tags.label(
                "Forward the original, unscanned, to (one address per line): ",
                tags.textarea(name="to", rows="2", cols="40", id="forward-to"),
            ),
            _infected_box(e, "forward"),
            button("Forward", id="forward"),
            class_="forward",
        ),
    )
    content = [_item_facts(e), actions, *headers_and_parts(view), _verdicts(e)]
    return await console.page(call, f"Quarantined {item_id}", "quarantine", content)


def _verdicts(e: Examined) -> Tag:
    return tags.section(
        tags.h2("Core's verdicts"),
        table(
            ("Part", "Type", "File name", "Size", "Result", "Blocked reason"),
            (
                [
                    p.part_id,
                    p.content_type,
                    p.filename or "",
                    size(p.size),
                    p.result,
                    p.blocked_reason or "",
                ]
                for p in e.parts
            ),
            empty="No verdicts recorded.",
        ),
    )


async def download(console: Console, call: Call) -> Response | None:
    (item_id,) = call.args
    fd, path = tempfile.mkstemp(
        prefix="mdgateway-console-", suffix=".eml", dir=console.scratch_dir
    )
    os.close(fd)
    try:
        try:
            found = await console.operations.store.read_quarantined(item_id, path)
        except NotFoundError:
            raise ConsoleError(
                404, f"There is no quarantined original {item_id}."
            ) from None
        original = open(path, "rb")  # noqa: SIM115 (closed below)
    finally:
        with suppress(OSError):
            os.unlink(path)
    console.audit(call, "downloaded quarantined original", item_id)
    with original:
        await _send(console, call, original, found.id)
    return None


async def _send(console: Console, call: Call, original: Any, item_id: str) -> None:
    request = call.request
    if call.gone:
        return
    name = _FILENAME_UNSAFE.sub("_", item_id) or "original"
    request.setResponseCode(200)
    for header, value in SECURITY_HEADERS:
        request.setHeader(header, value)
    # A download, never a page: the browser must not render it.
    request.setHeader(b"content-security-policy", b"sandbox; default-src 'none'")
    request.setHeader(b"content-type", b"application/octet-stream")
    request.setHeader(b"content-length", b"%d" % os.fstat(original.fileno()).st_size)
    request.setHeader(
        b"content-disposition", f'attachment; filename="{name}.eml"'.encode("ascii")
    )
    request.setHeader(b"cache-control", b"no-store")
    if request.method.upper() != b"HEAD":
        try:
            await FileSender().beginFileTransfer(original, request)
        except OSError:
            console.log.failure("Console: streaming {item} failed", item=item_id)
            request.loseConnection()
            return
        except Exception:
            return
    if not call.gone:
        request.finish()
