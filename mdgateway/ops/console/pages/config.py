# -*- test-case-name: tests.test_console -*-
"""
The configuration in force, read-only with secrets masked, and a button
that reloads the file: the answer is the new version, or every problem by
key (the running configuration then stays as it was).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.template import tags

from mdgateway.ops.console.http import Call, Response, redirect
from mdgateway.ops.console.render import button, facts, post_form, table

if TYPE_CHECKING:
    from mdgateway.ops.console.app import Console


async def page(console: Console, call: Call) -> Response:
    view = console.operations.configuration()
    restart = ", ".join(view.restart_keys)
    content = [
        facts(
            [
                ("Version", tags.code(view.version, id="config-version")),
                ("File", view.path),
            ]
        ),
        post_form(
            "/console/config/reload",
            call.user,
            button("Reload the configuration file", id="reload"),
            tags.p(
                "A reload reads the file again; if it is valid, new sessions "
                "use it at once, otherwise the running configuration stays. "
                + (f"Changes to {restart} need a restart." if restart else ""),
                class_="meta",
            ),
            class_="reload",
        ),
        table(
            ("Key", "Value"),
            (
                [
                    tags.code(e.key),
                    tags.code(e.value, class_="masked" if e.masked else ""),
                ]
                for e in view.entries
            ),
            empty="No keys (every setting at its default).",
            id="config",
        ),
    ]
    return await console.page(call, "Configuration", "config", content)


async def reload(console: Console, call: Call) -> Response:
    result = console.operations.reload()
    problems = result.problems
    if result.loaded:
        version = console.operations.configuration().version
        console.audit(call, "configuration reload", "loaded", version=version)
        details = []
        if result.applied:
            details.append("Applied now: " + ", ".join(result.applied))
        if result.restart_required:
            details.append(
                "Changed, but in force only after a restart: "
                + ", ".join(result.restart_required)
            )
        call.user.flash(
            "ok",
            f"Configuration reloaded: version {version} is in force.",
            tuple(details),
        )
    else:
        console.audit(call, "configuration reload", "refused", problems=list(problems))
        call.user.flash(
            "error",
            f"Configuration not reloaded: {len(problems)} problem(s); the "
            "running configuration stays.",
            tuple(problems),
        )
    return redirect("/console/config")
