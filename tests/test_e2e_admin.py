"""
End to end through the admin API of a running gateway: history of what was
processed, rescan of a quarantined original under a rule disabled since,
the queue, readiness and metrics as Prometheus parses them.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import free_port, running_gateway, wait_for_port
from tests.test_e2e_pipeline import EICAR, message, pipeline_toml, send, wait_for

pytestmark = pytest.mark.timeout(120)

TOKEN = "e2e-admin-token"


def admin_section(port: int, tmp_path: Path) -> str:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    endpoint = f"tcp:{port}:interface=127.0.0.1"
    return f'[admin]\nendpoint = "{endpoint}"\ntoken_file = "{token}"\n'


def call(
    port: int, path: str, method: str = "GET", token: str | None = TOKEN
) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        data=b"{}" if method == "POST" else None,
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _queue(admin: int) -> list[dict[str, Any]]:
    queue = json.loads(call(admin, "/api/queue")[1])
    return queue["items"] if isinstance(queue, dict) else queue


def test_history_rescan_queue_metrics(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    A clean and an infected message show up in the history with their
    verdicts; the infected original is quarantined; after its rule is
    disabled (SIGHUP), a rescan still processes it under that rule and
    quarantines it again; the queue is empty once all is done; /readyz is
    200; without the token the API answers 401; /metrics parses and counts
    the accepted messages and verdicts.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port, admin = free_port(), free_port()
    toml, _ = pipeline_toml(
        port,
        tmp_path,
        downstream.port,
        rule='blocked_action = "block"\nquarantine_blocked = true',
    )
    toml = toml.replace("[emulator]", admin_section(admin, tmp_path) + "[emulator]")
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        wait_for_port(admin)
        assert call(admin, "/api/messages", token=None)[0] == 401
        assert call(admin, "/api/messages", token="wrong")[0] == 401
        send(port, message("clean"))
        send(port, message("infected", (EICAR, "eicar.com")))
        wait_for(lambda: len(handler.messages) == 1)

        def finished() -> list[dict[str, Any]]:
            items = json.loads(call(admin, "/api/messages")[1])["items"]
            return [i for i in items if i["finished_at"]] if len(items) == 2 else []

        history = {i["subject"]: i for i in wait_for(finished)}
        assert history["clean"]["verdict"] == "Allowed"
        assert history["clean"]["status"] == "delivered"
        assert history["infected"]["verdict"] == "Blocked"
        assert history["infected"]["status"] == "quarantined"
        detail = json.loads(
            call(admin, f"/api/messages/{history['infected']['id']}")[1]
        )
        assert any(p["result"] == "Blocked" for p in detail["parts"])
        assert call(admin, "/api/messages/NOPE.1")[0] == 404
        assert call(admin, "/api/messages?status=bogus")[0] == 400

        (item,) = json.loads(call(admin, "/api/quarantine")[1])["items"]
        config = gw.config
        config.write_text(
            config.read_text().replace(
                'name = "inbound"', 'name = "inbound"\nenabled = false'
            )
        )
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any("loaded from" in e["msg"] for e in gw.log_events()))
        status, body = call(admin, f"/api/quarantine/{item['id']}/rescan", "POST")
        assert status == 202, body
        wait_for(
            lambda: len(json.loads(call(admin, "/api/quarantine")[1])["items"]) == 2,
            timeout=30,
        )
        assert len(handler.messages) == 1
        wait_for(lambda: not _queue(admin))

        assert call(admin, "/readyz", token=None)[0] == 200
        status, text = call(admin, "/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        accepted = families["mdgateway_smtp_messages_accepted"].samples
        assert sum(s.value for s in accepted if s.name.endswith("_total")) == 2
        verdicts = {
            s.labels["result"]: s.value
            for s in families["mdgateway_verdicts"].samples
            if s.name.endswith("_total")
        }
        assert verdicts["Allowed"] == 1 and verdicts["Blocked"] == 2
