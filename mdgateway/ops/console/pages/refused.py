# -*- test-case-name: tests.test_console -*-
"""
The refused log: SMTP-level refusals with their reasons, searchable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mdgateway.ops.console.forms import (
    REFUSAL_FIELDS,
    pager,
    problems_box,
    refusal_filter,
    search_form,
)
from mdgateway.ops.console.http import Call, Response
from mdgateway.ops.console.pages.history import paged
from mdgateway.ops.console.render import table, when

if TYPE_CHECKING:
    from mdgateway.ops.console.app import Console


async def listing(console: Console, call: Call) -> Response:
    filters, page, problems = refusal_filter(call)
    store = console.operations.store
    result = await paged(lambda p: store.search_refusals(filters, p), page, problems)
    content = [
        search_form("refused", REFUSAL_FIELDS, call),
        problems_box(problems),
        pager("refused", call, result.total, len(result.items), result.next_cursor),
        table(
            (
                "At (UTC)",
                "Listener",
                "Client",
                "HELO",
                "Sender",
                "Recipient",
                "Reply",
                "Reason",
            ),
            (
                [
                    when(r.at),
                    r.listener,
                    r.client_address,
                    r.helo or "",
                    r.sender if r.sender is not None else "",
                    r.recipient or "",
                    f"{r.code} {r.enhanced or ''}".strip(),
                    r.reason,
                ]
                for r in result.items
            ),
            empty="No refusal matches.",
            id="results",
        ),
    ]
    return await console.page(call, "Refused", "refused", content)
