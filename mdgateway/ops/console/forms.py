# -*- test-case-name: tests.test_console -*-
"""
The search forms of the history, quarantine and refused pages: the fields
each offers, their parsing into the store's filters (the same as the admin
API's query parameters), and the form and pager as HTML.

A value that does not parse is not an error page: the field is ignored and
named in a notice above the results, so the operator sees what to fix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.web.template import Tag, tags

from mdgateway.ops.adminhttp import parse_time
from mdgateway.ops.console.http import Call
from mdgateway.ops.console.render import href
from mdgateway.policy.rules import DIRECTIONS
from mdgateway.store.interfaces import (
    MAX_PAGE,
    MessageFilter,
    MessageStatus,
    PageRequest,
    QuarantineFilter,
    RefusalFilter,
    ScanVerdict,
)

#: Rows per page unless the form asks for another number.
PAGE_SIZE = 50


@attrs.frozen
class Field:
    """
    One input of a search form.

    @ivar choices: for a select: C{(value, label)} pairs (the first is
        "any", value C{""}).
    """

    name: str
    label: str
    hint: str = ""
    choices: tuple[tuple[str, str], ...] = ()


_ANY = (("", "any"),)
_TIME_HINT = "2026-05-01T10:00, epoch seconds, or 30m / 2h / 7d ago"
_BOOL = (*_ANY, ("true", "yes"), ("false", "no"))

MESSAGE_FIELDS = (
    Field("since", "Received since", _TIME_HINT),
    Field("until", "Received before", _TIME_HINT),
    Field("sender", "Sender"),
    Field("recipient", "Recipient"),
    Field("subject", "Subject"),
    Field(
        "status",
        "Status",
        choices=(*_ANY, *((s.value, s.value) for s in MessageStatus)),
    ),
    Field(
        "verdict",
        "Verdict",
        choices=(*_ANY, *((v.value, v.value) for v in ScanVerdict)),
    ),
    Field("rule", "Rule"),
    Field("direction", "Direction", choices=(*_ANY, *((d, d) for d in DIRECTIONS))),
    Field("queue_id", "Queue id"),
    Field("message_id", "Message-ID"),
)

QUARANTINE_FIELDS = (
    Field("since", "Quarantined since", _TIME_HINT),
    Field("until", "Quarantined before", _TIME_HINT),
    Field("sender", "Sender"),
    Field("recipient", "Recipient"),
    Field("subject", "Subject"),
    Field("reason", "Reason"),
    Field("rule", "Rule"),
    Field("direction", "Direction", choices=(*_ANY, *((d, d) for d in DIRECTIONS))),
    Field("pinned", "Pinned", choices=_BOOL),
    Field("released", "Released", choices=_BOOL),
)

REFUSAL_FIELDS = (
    Field("since", "Since", _TIME_HINT),
    Field("until", "Before", _TIME_HINT),
    Field("client", "Client address"),
    Field("sender", "Sender"),
    Field("recipient", "Recipient"),
    Field("listener", "Listener"),
    Field("code", "Reply code"),
)


@attrs.define
class Parsed:
    """
    A form's values read, with a problem line per value that did not parse.
    """

    call: Call
    problems: list[str] = attrs.Factory(list)

    def text(self, name: str) -> str | None:
        value = self.call.param(name)
        return value[:500] if value is not None else None

    def time(self, name: str, label: str) -> float | None:
        text = self.text(name)
        if text is None:
            return None
        value = parse_time(text, self.call.now)
        if value is None:
            self.problems.append(f"{label}: not a time ({_TIME_HINT}): {text!r}")
        return value

    def window(self, labels: tuple[str, str]) -> tuple[float | None, float | None]:
        since, until = self.time("since", labels[0]), self.time("until", labels[1])
        if since is not None and until is not None and since >= until:
            self.problems.append(f"{labels[1]}: must be later than {labels[0]}")
            return since, None
        return since, until

    def choice(self, name: str, label: str, convert: Callable[[str], Any]) -> Any:
        text = self.text(name)
        if text is None:
            return None
        try:
            return convert(text)
        except (ValueError, KeyError):
            self.problems.append(f"{label}: unknown value {text!r}")
            return None

    def boolean(self, name: str, label: str) -> bool | None:
        value: bool | None = self.choice(
            name, label, lambda t: {"true": True, "false": False}[t]
        )
        return value

    def page(self) -> PageRequest:
        limit = PAGE_SIZE
        text = self.text("limit")
        if text is not None:
            if text.isdigit() and 1 <= int(text) <= MAX_PAGE:
                limit = int(text)
            else:
                self.problems.append(f"rows per page: 1 to {MAX_PAGE}, not {text!r}")
        return PageRequest(limit=limit, cursor=self.text("cursor"))


def _direction(text: str) -> str:
    if text.lower() not in DIRECTIONS:
        raise ValueError(text)
    return text.lower()


def message_filter(call: Call) -> tuple[MessageFilter, PageRequest, list[str]]:
    p = Parsed(call)
    since, until = p.window(("Received since", "Received before"))
    status = p.choice("status", "Status", MessageStatus)
    verdict = p.choice("verdict", "Verdict", ScanVerdict)
    filters = MessageFilter(
        since=since,
        until=until,
        sender=p.text("sender"),
        recipient=p.text("recipient"),
        subject=p.text("subject"),
        statuses=frozenset({status}) if status else frozenset(),
        rule=p.text("rule"),
        direction=p.choice("direction", "Direction", _direction),
        verdicts=frozenset({verdict}) if verdict else frozenset(),
        queue_id=p.text("queue_id"),
        message_id_header=p.text("message_id"),
    )
    return filters, p.page(), p.problems


def quarantine_filter(call: Call) -> tuple[QuarantineFilter, PageRequest, list[str]]:
    p = Parsed(call)
    since, until = p.window(("Quarantined since", "Quarantined before"))
    filters = QuarantineFilter(
        since=since,
        until=until,
        sender=p.text("sender"),
        recipient=p.text("recipient"),
        subject=p.text("subject"),
        reason=p.text("reason"),
        rule=p.text("rule"),
        direction=p.choice("direction", "Direction", _direction),
        pinned=p.boolean("pinned", "Pinned"),
        released=p.boolean("released", "Released"),
    )
    return filters, p.page(), p.problems


def _code(text: str) -> int:
    if not text.isdigit() or not 200 <= int(text) <= 599:
        raise ValueError(text)
    return int(text)


def refusal_filter(call: Call) -> tuple[RefusalFilter, PageRequest, list[str]]:
    p = Parsed(call)
    since, until = p.window(("Since", "Before"))
    filters = RefusalFilter(
        since=since,
        until=until,
        client_address=p.text("client"),
        sender=p.text("sender"),
        recipient=p.text("recipient"),
        listener=p.text("listener"),
        code=p.choice("code", "Reply code", _code),
    )
    return filters, p.page(), p.problems


# --------------------------------------------------------------------------
# HTML


def search_form(section: str, fields: Sequence[Field], call: Call) -> Tag:
    """
    A GET form with C{fields}, filled with the current query.
    """
    form = tags.form(method="get", action=href(section), class_="search")
    grid = tags.div(class_="fields")
    for field in fields:
        value = call.param(field.name) or ""
        if field.choices:
            control = tags.select(name=field.name, id=f"f-{field.name}")
            for option, label in field.choices:
                o = tags.option(label, value=option)
                if option == value:
                    o(selected="selected")
                control(o)
        else:
            control = tags.input(
                type="text", name=field.name, id=f"f-{field.name}", value=value
            )
            if field.hint:
                control(title=field.hint, placeholder=field.hint.split(",")[0])
        grid(tags.label(field.label, " ", control, for_=f"f-{field.name}"))
    form(grid)
    return form(
        tags.div(
            tags.button("Search", type="submit"),
            " ",
            tags.a("Clear", href=href(section)),
            class_="actions",
        )
    )


def problems_box(problems: Sequence[str]) -> Tag | str:
    if not problems:
        return ""
    return tags.div(
        tags.p("Some filters were ignored:"),
        tags.ul(*(tags.li(p) for p in problems)),
        class_="flash error",
        role="status",
    )


def pager(
    section: str, call: Call, total: int, shown: int, next_cursor: str | None
) -> Tag:
    """
    The count of matches and links to the first and next pages, keeping
    the filters.
    """
    query = {k: v for k, v in call.query.items() if k != "cursor"}
    links = tags.p(f"{total} match(es); {shown} shown. ", class_="pager")
    if call.param("cursor"):
        links(tags.a("First page", href=href(section, query=query)), " ")
    if next_cursor:
        links(
            tags.a(
                "Next page",
                href=href(section, query={**query, "cursor": next_cursor}),
                rel="next",
                id="next-page",
            )
        )
    return links
