# -*- test-case-name: tests.test_console -*-
"""
Pages as HTML: the layout and login templates (XML files shipped in the
package, read by C{twisted.web.template}) and the small building blocks
every page body is made of.

Every value goes into the tree as text or as an attribute value, which the
flattener escapes; nothing from mail (subjects, addresses, file names,
header values) is ever wrapped in C{raw} or parsed as markup, so hostile
content shows as the characters it is and never runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import attrs
from twisted.web.iweb import ITemplateLoader
from twisted.web.template import Element, Tag, XMLString, flattenString, renderer, tags

from mdgateway.ops.console.auth import Flash, Session

#: The console's sections: path and label, in menu order.
SECTIONS = (
    ("dashboard", "Dashboard"),
    ("messages", "History"),
    ("quarantine", "Quarantine"),
    ("refused", "Refused"),
    ("queue", "Queue"),
    ("config", "Configuration"),
)

BASE = "/console/"


@attrs.frozen
class Templates:
    """
    The console's templates, parsed once at start.
    """

    layout: ITemplateLoader
    login: ITemplateLoader

    @classmethod
    def load(cls) -> Templates:
        """
        Read the templates from the package (blocking: run in a thread).
        """
        folder = resources.files("mdgateway.ops.console") / "templates"
        return cls(
            layout=XMLString((folder / "layout.xml").read_text("utf-8")),
            login=XMLString((folder / "login.xml").read_text("utf-8")),
        )


@attrs.frozen
class PageData:
    """
    What the layout needs besides the body.

    @ivar section: which menu entry is current.
    @ivar refresh: seconds after which the page's script reloads it (the
        dashboard), if any.
    """

    title: str
    section: str
    content: Any
    session: Session
    flashes: tuple[Flash, ...]
    version: str
    instance: str
    refresh: int | None = None


class _Layout(Element):
    def __init__(self, loader: ITemplateLoader, data: PageData) -> None:
        super().__init__(loader)
        self.data = data

    @renderer
    def page(self, request: object, tag: Tag) -> Tag:
        d = self.data
        return tag.fillSlots(
            title=d.title,
            content=d.content,
            operator=d.session.operator,
            csrf=d.session.csrf,
            version=d.version,
            instance=d.instance,
        )

    @renderer
    def body(self, request: object, tag: Tag) -> Tag:
        tag(class_=f"section-{self.data.section}")
        if self.data.refresh:
            tag(**{"data-refresh": str(self.data.refresh)})
        return tag

    @renderer
    def nav(self, request: object, tag: Tag) -> Tag:
        for path, label in SECTIONS:
            link = tags.a(label, href=BASE + path)
            if path == self.data.section:
                link(class_="current", **{"aria-current": "page"})
            tag(link, " ")
        return tag

    @renderer
    def flashes(self, request: object, tag: Tag) -> Tag:
        return tag(*(flash_box(f) for f in self.data.flashes))


class _Login(Element):
    def __init__(
        self, loader: ITemplateLoader, csrf: str, next_path: str, notice: Flash | None
    ) -> None:
        super().__init__(loader)
        self.csrf = csrf
        self.next_path = next_path
        self._notice = notice

    @renderer
    def page(self, request: object, tag: Tag) -> Tag:
        return tag.fillSlots(csrf=self.csrf, next=self.next_path)

    @renderer
    def notice(self, request: object, tag: Tag) -> Any:
        if self._notice is None:
            return ""
        return flash_box(self._notice)


async def flatten(root: Any) -> bytes:
    """
    A whole HTML document from a template element.
    """
    body: bytes = await flattenString(None, root)
    return b"<!DOCTYPE html>\n" + body


async def render_layout(templates: Templates, data: PageData) -> bytes:
    return await flatten(_Layout(templates.layout, data))


async def render_login(
    templates: Templates, csrf: str, next_path: str, notice: Flash | None
) -> bytes:
    return await flatten(_Login(templates.login, csrf, next_path, notice))


# --------------------------------------------------------------------------
# Building blocks


def flash_box(flash: Flash) -> Tag:
    box = tags.div(tags.p(flash.text), class_=f"flash {flash.kind}", role="status")
    if flash.details:
        box(tags.ul(*(tags.li(line) for line in flash.details)))
    return box


def when(at: float | None) -> str:
    """
    A time as the console shows it (UTC, to the second).
    """
    if at is None or not math.isfinite(at):
        return ""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    """
    A short span: C{45s}, C{12m}, C{3h 05m}, C{2d 4h}.
    """
    if seconds is None:
        return ""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def size(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def href(*segments: str, query: Mapping[str, Any] | None = None) -> str:
    """
    A console URL from path segments (each percent-encoded, so an id can
    never add a path or a query) and query parameters.
    """
    path = BASE + "/".join(quote(s, safe="") for s in segments)
    if query:
        pairs = [
            (k, v)
            for k, vs in query.items()
            for v in (vs if isinstance(vs, list | tuple) else [vs])
            if v not in (None, "")
        ]
        if pairs:
            path += "?" + urlencode(pairs)
    return path


def table(
    headers: Sequence[Any],
    rows: Iterable[Sequence[Any]],
    empty: str = "Nothing to show.",
    **attributes: str,
) -> Tag:
    body = [tags.tr(*(tags.td(cell) for cell in row)) for row in rows]
    if not body:
        return tags.p(empty, class_="empty")
    return tags.table(
        tags.thead(tags.tr(*(tags.th(h, scope="col") for h in headers))),
        tags.tbody(*body),
        **attributes,
    )


def facts(pairs: Iterable[tuple[str, Any]]) -> Tag:
    """
    A definition list of label and value pairs.
    """
    out = tags.dl(class_="facts")
    for label, value in pairs:
        out(tags.dt(label), tags.dd(value))
    return out


def csrf_field(session: Session) -> Tag:
    return tags.input(type="hidden", name="csrf", value=session.csrf)


def post_form(
    action: str,
    session: Session,
    *content: Any,
    fields: Mapping[str, str] | None = None,
    **attributes: str,
) -> Tag:
    """
    A POST form that carries the session's CSRF token.
    """
    form = tags.form(method="post", action=action, **attributes)
    form(csrf_field(session))
    for name, value in (fields or {}).items():
        form(tags.input(type="hidden", name=name, value=value))
    return form(*content)


def button(
    label: str, name: str | None = None, value: str | None = None, **kw: str
) -> Tag:
    b = tags.button(label, type="submit", **kw)
    if name is not None:
        b(name=name, value=value or "")
    return b


def badge(text: str, kind: str) -> Tag:
    return tags.span(text, class_=f"badge {kind}")


def yes_no(value: bool, good: bool = True) -> Tag:
    """
    A coloured yes/no; C{good} says whether yes is the healthy answer.
    """
    kind = "ok" if value == good else "bad"
    return badge("yes" if value else "no", kind)


def verdict_badge(verdict: Any) -> Tag:
    if verdict is None:
        return badge("N/A", "none")
    text = getattr(verdict, "value", str(verdict))
    return badge(text, f"v-{text.lower()}")


def status_badge(status: Any) -> Tag:
    text = getattr(status, "value", str(status))
    return badge(text, "s-" + text.replace(" ", "-"))
