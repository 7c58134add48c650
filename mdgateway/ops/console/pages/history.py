# -*- test-case-name: tests.test_console -*-
"""
The email history: search with paging, and one message copy's page (its
timeline, parts with Core's result for each, actions, deliveries per
recipient and links to its quarantined original).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.web.template import Tag, tags

from mdgateway.ops.console.forms import (
    MESSAGE_FIELDS,
    message_filter,
    pager,
    problems_box,
    search_form,
)
from mdgateway.ops.console.http import Call, ConsoleError, Response
from mdgateway.ops.console.render import (
    facts,
    href,
    size,
    status_badge,
    table,
    verdict_badge,
    when,
)
from mdgateway.store.interfaces import (
    MAX_PAGE,
    MessageSummary,
    NotFoundError,
    Page,
    PageRequest,
    QuarantineFilter,
)

if TYPE_CHECKING:
    from mdgateway.ops.console.app import Console

_T = TypeVar("_T")


async def paged(
    search: Callable[[PageRequest], Awaitable[Page[_T]]],
    page: PageRequest,
    problems: list[str],
) -> Page[_T]:
    """
    One page of a search; a stale or forged page link starts over at the
    first page, with a notice.
    """
    try:
        return await search(page)
    except ValueError:
        problems.append("the page link was not valid: showing the first page")
        return await search(PageRequest(limit=page.limit))


def recipients_text(recipients: tuple[str, ...], most: int = 3) -> str:
    shown = ", ".join(recipients[:most])
    if len(recipients) > most:
        shown += f" and {len(recipients) - most} more"
    return shown


def message_row(m: MessageSummary) -> list[Any]:
    return [
        when(m.received_at),
        m.sender or "<>",
        recipients_text(m.recipients),
        tags.a(
            m.subject or "(no subject)", href=href("messages", m.id), class_="subject"
        ),
        m.rule or "",
        status_badge(m.status),
        verdict_badge(m.verdict),
    ]


async def search(console: Console, call: Call) -> Response:
    filters, page, problems = message_filter(call)
    store = console.operations.store
    result = await paged(lambda p: store.search_messages(filters, p), page, problems)
    content = [
        search_form("messages", MESSAGE_FIELDS, call),
        problems_box(problems),
        pager("messages", call, result.total, len(result.items), result.next_cursor),
        table(
            (
                "Received (UTC)",
                "Sender",
                "Recipients",
                "Subject",
                "Rule",
                "Status",
                "Verdict",
            ),
            (message_row(m) for m in result.items),
            empty="No message matches.",
            id="results",
        ),
    ]
    return await console.page(call, "Email history", "messages", content)


async def message(console: Console, call: Call) -> Response:
    (message_id,) = call.args
    store = console.operations.store
    try:
        record = await store.get_message(message_id)
    except NotFoundError:
        raise ConsoleError(404, f"There is no history entry {message_id}.") from None
    items = await store.list_quarantine(
        QuarantineFilter(message_id=message_id), PageRequest(limit=MAX_PAGE)
    )
    m = record.summary
    summary = facts(
        [
            ("History id", m.id),
            ("Queue id", m.queue_id),
            ("Received (UTC)", when(m.received_at)),
            ("From client", f"{m.helo} [{m.client_address}]"),
            ("Sender", m.sender or "<>"),
            ("Recipients", ", ".join(m.recipients)),
            ("Subject", tags.span(m.subject, class_="subject")),
            ("Message-ID", m.message_id_header),
            ("Size", size(m.size)),
            ("Rule", f"{m.rule or '(none)'} ({m.direction or '-'})"),
            ("Status", status_badge(m.status)),
            ("Verdict", verdict_badge(m.verdict)),
            ("Processed", when(m.processed_at)),
            ("Delivered", when(m.delivered_at)),
            ("Finished", when(m.finished_at)),
            ("Instance", m.instance),
            (
                "Forked from",
                tags.a(m.parent_id, href=href("messages", m.parent_id))
                if m.parent_id
                else "",
            ),
        ]
    )
    quarantine: Tag | str = ""
    if items.items:
        quarantine = tags.section(
            tags.h2("Quarantined original"),
            tags.ul(
                *(
                    tags.li(
                        tags.a(
                            f"{item.id} ({item.reason})",
                            href=href("quarantine", item.id),
                            class_="quarantine-link",
                        ),
                        " released " + when(item.released_at)
                        if item.released_at
                        else "",
                    )
                    for item in items.items
                )
            ),
        )
    content = [
        summary,
        quarantine,
        tags.section(
            tags.h2("Parts and Core's verdicts"),
            table(
                (
                    "Part",
                    "Type",
                    "File name",
                    "Size",
                    "Result",
                    "Blocked reason",
                    "Sanitized",
                    "Sensitive data",
                ),
                (
                    [
                        p.part_id,
                        p.content_type,
                        p.filename or "",
                        size(p.size),
                        p.result,
                        p.blocked_reason or "",
                        "yes" if p.sanitized else "",
                        "; ".join(p.dlp_hits),
                    ]
                    for p in record.parts
                ),
                empty="Not scanned (yet).",
                id="parts",
            ),
        ),
        tags.section(
            tags.h2("Actions"),
            tags.ul(*(tags.li(a) for a in record.actions))
            if record.actions
            else tags.p("None.", class_="empty"),
        ),
        tags.section(
            tags.h2("Deliveries"),
            table(
                (
                    "Recipient",
                    "Status",
                    "Reply",
                    "Upstream id",
                    "Server",
                    "At (UTC)",
                    "Attempts",
                ),
                (
                    [
                        d.recipient,
                        d.status.value,
                        " ".join(str(x) for x in (d.code, d.enhanced, d.text) if x),
                        d.upstream_queue_id or "",
                        d.server or "",
                        when(d.at),
                        str(d.attempts),
                    ]
                    for d in record.deliveries
                ),
                empty="No delivery yet.",
                id="deliveries",
            ),
        ),
        tags.section(
            tags.h2("Timeline"),
            table(
                ("At (UTC)", "Event", "Status"),
                (
                    [when(e.at), e.text, e.status.value if e.status else ""]
                    for e in record.timeline
                ),
                id="timeline",
            ),
        ),
    ]
    return await console.page(call, f"Message {m.id}", "messages", content)
