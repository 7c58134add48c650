"""
The console over HTTP against the running gateway (twistd plugin, Core
emulator, aiosmtpd relay): what L{GatewayOperations} adds for it, with the
real store, spool and configuration.
"""

from __future__ import annotations

import http.cookiejar
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.console_screenshots import TOKEN, console_toml
from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import free_port, running_gateway, wait_for_port
from tests.test_e2e_pipeline import EICAR, message, send, wait_for

pytestmark = pytest.mark.timeout(120)


class Browser:
    """
    urllib with cookies and without following redirects.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: object, **kw: object) -> None:
                return None

        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), NoRedirect()
        )

    def open(self, path: str, form: dict[str, str] | None = None) -> tuple[int, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        try:
            with self.opener.open(self.base + path, data, timeout=20) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def csrf(self, path: str = "/console/dashboard") -> str:
        match = re.search(r'name="csrf" value="([^"]+)"', self.open(path)[1])
        assert match
        return match.group(1)

    def login(self) -> None:
        csrf = self.csrf("/console/login")
        status, _ = self.open("/console/login", {"csrf": csrf, "token": TOKEN})
        assert status == 303


def test_console_on_the_running_gateway(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    On a real gateway the dashboard shows this instance (by its
    configured name), its spool and its Core server up; pinning and
    deleting a quarantined original through the console change the store
    and add the operator's name to the history's timeline; the
    configuration page shows the running version and reloads it.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port, admin = free_port(), free_port()
    toml = console_toml(tmp_path, port, admin, downstream.port)
    toml = toml.replace("[spool]", '[store]\ninstance = "gw-e2e"\n[spool]')
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        wait_for_port(admin)
        send(port, message("clean"))
        send(port, message("infected", (EICAR, "eicar.com")))
        wait_for(lambda: len(handler.messages) == 1)
        browser = Browser(f"http://127.0.0.1:{admin}")
        browser.login()

        def item_id() -> str | None:
            body = browser.open("/console/quarantine")[1]
            found = re.findall(r"/console/quarantine/([0-9a-f]{32})\"", body)
            return found[0] if found else None

        item = wait_for(item_id)
        status, body = browser.open("/console/dashboard")
        assert status == 200
        instances = body.split('id="instances"')[1].split("</table>")[0]
        assert "<strong>gw-e2e</strong>" in instances
        core = body.split('id="core"')[1].split("</table>")[0]
        assert "http://127.0.0.1:" in core and '<span class="badge ok">yes' in core
        assert 'id="spools"' in body and "primary" in body

        csrf = browser.csrf()
        status, _ = browser.open(
            f"/console/quarantine/{item}/pin", {"csrf": csrf, "pinned": "true"}
        )
        assert status == 303
        page = browser.open(f"/console/quarantine/{item}")[1]
        assert "<dt>Pinned</dt><dd>yes</dd>" in page
        history = re.search(r'href="/console/messages/([^"]+)"', page)
        assert history
        status, _ = browser.open(
            f"/console/quarantine/{item}/delete", {"csrf": csrf, "confirm": "yes"}
        )
        assert status == 303
        assert browser.open(f"/console/quarantine/{item}")[0] == 404
        timeline = browser.open(f"/console/messages/{history.group(1)}")[1]
        assert "quarantined original pinned by console:token:admin" in timeline
        assert "deleted by console:token:admin" in timeline
        assert any(
            e.get("action") == "deleted quarantined original"
            and e.get("by") == "console:token:admin"
            for e in gw.log_events()
        )

        config = browser.open("/console/config")[1]
        version = re.search(r'id="config-version">([0-9a-f]+)<', config)
        assert version
        assert TOKEN not in config
        gw.config.write_text(gw.config.read_text() + "\n# edited\n")
        status, _ = browser.open("/console/config/reload", {"csrf": csrf})
        assert status == 303
        after = browser.open("/console/config")[1]
        assert "Configuration reloaded" in after
        assert version.group(1) not in after.split('id="config-version">')[1][:20]
