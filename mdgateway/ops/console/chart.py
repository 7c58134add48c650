# -*- test-case-name: tests.test_console_units -*-
"""
The dashboard's traffic chart: messages per minute by verdict, as stacked
bars in an SVG drawn on the server (no chart library, no script).

Colours come from the style sheet (one class per verdict), so the page's
content security policy needs no inline style; each bar has a C{<title>}
with its numbers, which browsers show on hover and screen readers read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime

import attrs
from twisted.web.template import Tag, tags

from mdgateway.store.interfaces import ScanVerdict, VerdictCount

#: Stacking order, bottom up: label and CSS class.
SERIES: tuple[tuple[ScanVerdict | None, str, str], ...] = (
    (ScanVerdict.ALLOWED, "Allowed", "v-allowed"),
    (ScanVerdict.SANITIZED, "Sanitized", "v-sanitized"),
    (ScanVerdict.BLOCKED, "Blocked", "v-blocked"),
    (None, "No verdict", "v-none"),
)

WIDTH, HEIGHT = 720, 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 8, 10, 22


@attrs.frozen
class Window:
    """
    The time span a chart shows.

    @ivar step: seconds per bar.
    @ivar label_every: an axis label every this many bars.
    """

    title: str
    since: float
    step: float
    bars: int
    label_every: int

    @property
    def until(self) -> float:
        return self.since + self.step * self.bars


def windows(now: float) -> tuple[Window, Window]:
    """
    The last hour in minutes and the last day in quarter hours, both
    ending at the end of the current minute.
    """
    end = math.floor(now / 60) * 60 + 60
    return (
        Window("Last hour", end - 3600, 60, 60, 10),
        Window("Last 24 hours", end - 86400, 900, 96, 12),
    )


def _nice(value: float) -> float:
    """
    A round axis maximum at or above C{value}.
    """
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    for factor in (1, 2, 2.5, 5, 10):
        if value <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def _svg(name: str, **attributes: str) -> Tag:
    return Tag(name)(**attributes)


def traffic_chart(window: Window, counts: Iterable[VerdictCount], chart_id: str) -> Tag:
    """
    Stacked bars of messages per minute for each of the window's bars.
    """
    grid: dict[int, dict[ScanVerdict | None, int]] = {}
    for c in counts:
        index = int(round((c.start - window.since) / window.step))
        if 0 <= index < window.bars:
            row = grid.setdefault(index, {})
            row[c.verdict] = row.get(c.verdict, 0) + c.count
    per_minute = window.step / 60.0
    totals = [sum(grid.get(i, {}).values()) / per_minute for i in range(window.bars)]
    top = _nice(max(totals, default=0.0))
    plot_w = WIDTH - _LEFT - _RIGHT
    plot_h = HEIGHT - _TOP - _BOTTOM
    bar_w = plot_w / window.bars
    total_messages = sum(sum(r.values()) for r in grid.values())
    svg = _svg(
        "svg",
        viewBox=f"0 0 {WIDTH} {HEIGHT}",
        role="img",
        class_="chart",
        id=chart_id,
        **{
            "aria-label": f"{window.title}: {total_messages} messages, "
            f"at most {_number(max(totals, default=0.0))} per minute"
        },
    )
    for fraction in (0.0, 0.5, 1.0):
        y = _TOP + plot_h * (1 - fraction)
        svg(
            _svg(
                "line",
                x1=str(_LEFT),
                x2=str(WIDTH - _RIGHT),
                y1=f"{y:.1f}",
                y2=f"{y:.1f}",
                class_="grid",
            ),
            _svg("text", x=str(_LEFT - 4), y=f"{y + 4:.1f}", class_="axis y")(
                _number(top * fraction)
            ),
        )
    for i in range(window.bars):
        start = window.since + i * window.step
        x = _LEFT + i * bar_w
        base = 0.0
        row = grid.get(i, {})
        for verdict, label, css in SERIES:
            count = row.get(verdict, 0)
            if not count:
                continue
            rate = count / per_minute
            h = plot_h * rate / top
            y = _TOP + plot_h * (1 - base / top) - h
            svg(
                _svg(
                    "rect",
                    x=f"{x + 0.5:.2f}",
                    y=f"{y:.2f}",
                    width=f"{max(bar_w - 1, 0.5):.2f}",
                    height=f"{h:.2f}",
                    class_=f"bar {css}",
                )(
                    _svg("title")(
                        f"{_clock(start)} UTC: {count} {label} "
                        f"({_number(rate)} per minute)"
                    )
                )
            )
            base += rate
        if i % window.label_every == 0:
            svg(
                _svg("text", x=f"{x:.1f}", y=str(HEIGHT - 6), class_="axis x")(
                    _clock(start)
                )
            )
    legend = tags.ul(
        *(
            tags.li(tags.span(class_=f"swatch {css}"), " ", label)
            for _, label, css in SERIES
        ),
        class_="legend",
    )
    return tags.figure(
        svg,
        tags.figcaption(
            f"{window.title}: messages per minute by verdict (UTC), "
            f"{total_messages} in all.",
            legend,
        ),
        class_="traffic",
    )


def _clock(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M")
