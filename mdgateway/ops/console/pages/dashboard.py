# -*- test-case-name: tests.test_console -*-
"""
The dashboard: traffic by verdict over the last hour and day, this
instance's readiness and spools, the cluster's instances, and the health
of every Core server and relay profile. The page's script reloads it
every half minute; without script it is a page like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.template import tags

from mdgateway.ops.console.chart import traffic_chart, windows
from mdgateway.ops.console.http import Call, Response
from mdgateway.ops.console.render import (
    badge,
    duration,
    facts,
    href,
    table,
    when,
    yes_no,
)

if TYPE_CHECKING:
    from mdgateway.ops.console.app import Console

#: Seconds between the script's reloads of the dashboard.
REFRESH = 30


async def page(console: Console, call: Call) -> Response:
    ops = console.operations
    now = call.now
    status = await ops.status()
    hour, day = windows(now)
    store = ops.store
    charts = [
        traffic_chart(w, await store.count_by_verdict(w.since, w.until, w.step), cid)
        for w, cid in ((hour, "chart-hour"), (day, "chart-day"))
    ]
    instances = await ops.instances(now - 3600)
    ready = status.readiness
    summary = facts(
        [
            ("Instance", status.instance),
            (
                "Ready",
                badge("ready", "ok")
                if ready.ready
                else badge("not ready: " + ", ".join(ready.reasons), "bad"),
            ),
            (
                "Configuration",
                f"version {status.config_version} from {status.config_path}",
            ),
            ("Page drawn (UTC)", when(now)),
        ]
    )
    spools = table(
        ("Process", "Queued", "Oldest"),
        (
            [
                "primary" if s.process == 0 else f"worker {s.process}",
                str(s.depth),
                duration(s.oldest_age) if s.depth else "",
            ]
            for s in status.spools
        ),
        id="spools",
    )
    cluster = table(
        (
            "Instance",
            "Received in the last hour",
            "Last received (UTC)",
            "Pending",
            "Oldest pending",
        ),
        (
            [
                tags.strong(i.name) if i.this else i.name,
                str(i.received),
                when(i.last_received),
                str(i.pending),
                duration(now - i.oldest_pending)
                if i.oldest_pending is not None
                else "",
            ]
            for i in instances
        ),
        id="instances",
    )
    core = table(
        (
            "Profile",
            "Server",
            "Up",
            "Busy",
            "Scanning",
            "Waiting",
            "Failures",
            "Used by a rule",
        ),
        (
            [
                c.profile,
                c.url,
                yes_no(c.up),
                yes_no(c.busy, good=False),
                str(c.in_flight),
                str(c.queued),
                str(c.failures),
                "yes" if c.in_use else "no",
            ]
            for c in status.core
        ),
        empty="No Core server profile.",
        id="core",
    )
    relays = table(
        ("Profile", "Servers", "Healthy", "Throttled until (UTC)", "Used by a rule"),
        (
            [
                r.profile,
                ", ".join(r.servers),
                yes_no(r.healthy),
                when(r.throttled_until) if r.throttled_until else "",
                "yes" if r.in_use else "no",
            ]
            for r in status.relays
        ),
        empty="No relay profile.",
        id="relays",
    )
    content = [
        summary,
        tags.section(tags.h2("Traffic"), tags.div(*charts, class_="charts")),
        tags.div(
            tags.section(
                tags.h2("Spools of this instance"),
                spools,
                tags.p(tags.a("Queue", href=href("queue"))),
            ),
            tags.section(tags.h2("Instances"), cluster),
            class_="columns",
        ),
        tags.section(tags.h2("MetaDefender Core servers"), core),
        tags.section(tags.h2("Relays"), relays),
    ]
    return await console.page(call, "Dashboard", "dashboard", content, refresh=REFRESH)
