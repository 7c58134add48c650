"""
Quarantine actions end to end, through the admin API of the real gateway
(the twistd plugin) with named admin tokens: a release happens once, a
retry with the same idempotency key is answered without delivering again,
an original Core blocked needs C{force}, and the audit names who did what.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.coresamples import docx
from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import free_port, running_gateway, wait_for_port
from tests.test_e2e_pipeline import EICAR, message, pipeline_toml, send, wait_for

pytestmark = pytest.mark.timeout(120)

TOKENS = {"alice": "alice-secret-token", "bob": "bob-secret-token"}


def api(
    port: int, path: str, who: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method="GET" if body is None else "POST",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKENS[who]}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def originals(handler: RecordingHandler) -> int:
    return sum(
        b"X-Metadefender-EmailSecurity-OriginalCopy: True" in m.content
        for m in handler.messages
    )


def test_release_once_force_for_blocked_and_audit(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    A sanitized original released by alice is delivered once; a second
    release (by anyone, with or without a key) is refused with 409. A
    blocked original is refused without force; bob's forced release with
    an idempotency key delivers it, and his retry with the same key answers
    the same queue id without delivering again. The audit lists every
    attempt with the operator's token name and its result, and the item
    says who released it.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port, admin = free_port(), free_port()
    toml, _ = pipeline_toml(
        port,
        tmp_path,
        downstream.port,
        rule='blocked_action = "block"\nquarantine_blocked = true\n'
        "quarantine_sanitized = true",
    )
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{n}:{t}\n" for n, t in TOKENS.items()))
    admin_toml = (
        f'[admin]\nendpoint = "tcp:{admin}:interface=127.0.0.1"\n'
        f'token_file = "{tokens}"\n'
    )
    toml = toml.replace("[emulator]", admin_toml + "[emulator]")
    with running_gateway(tmp_path, toml=toml, port=port):
        wait_for_port(admin)
        send(port, message("infected", (EICAR, "eicar.com")))
        send(port, message("report", (docx(b"a document" * 20), "r.docx")))
        items = wait_for(
            lambda: (lambda got: got if len(got) == 2 else None)(
                api(admin, "/api/quarantine", "alice")[1]["items"]
            )
        )
        by_reason = {i["reason"]: i["id"] for i in items}
        blocked, sanitized = by_reason["blocked"], by_reason["sanitized"]
        wait_for(lambda: len(handler.messages) == 1)  # the sanitized copy

        release = "/api/quarantine/{}/release"
        code, first = api(admin, release.format(sanitized), "alice", {})
        assert code == 202 and first["replayed"] is False
        wait_for(lambda: originals(handler) == 1)
        code, body = api(admin, release.format(sanitized), "alice", {})
        assert code == 409 and "released already by alice" in body["error"]
        code, body = api(
            admin, release.format(sanitized), "bob", {"idempotency_key": "b-1"}
        )
        assert code == 409

        code, body = api(admin, release.format(blocked), "alice", {})
        assert code == 409 and "blocked by Core" in body["error"]
        forced = {"force": True, "idempotency_key": "b-2"}
        code, second = api(admin, release.format(blocked), "bob", forced)
        assert code == 202
        code, again = api(admin, release.format(blocked), "bob", forced)
        assert code == 202
        assert (again["queue_id"], again["replayed"]) == (second["queue_id"], True)
        forward = {"to": ["soc@example.org"]}
        code, _ = api(admin, f"/api/quarantine/{blocked}/forward", "bob", forward)
        assert code == 409
        code, _ = api(
            admin, f"/api/quarantine/{blocked}/forward", "bob", {**forward, "force": 1}
        )
        assert code == 400
        code, _ = api(
            admin,
            f"/api/quarantine/{blocked}/forward",
            "bob",
            {**forward, "force": True},
        )
        assert code == 202
        # The forward is the positive control: once it has arrived, every
        # copy the releases above could have sent has arrived too.
        wait_for(lambda: len(handler.messages) == 4)
        assert originals(handler) == 3

        code, item = api(admin, f"/api/quarantine/{sanitized}", "bob")
        assert item["released_by"] == "alice"
        code, audit = api(admin, "/api/audit?limit=100", "alice")
        got = [
            (e["actor"], e["action"], e["target"], e["result"])
            for e in reversed(audit["items"])
        ]
        assert got == [
            ("alice", "release", sanitized, "done"),
            ("alice", "release", sanitized, "refused"),
            ("bob", "release", sanitized, "refused"),
            ("alice", "release", blocked, "refused"),
            ("bob", "release", blocked, "done"),
            ("bob", "release", blocked, "replayed"),
            ("bob", "forward", blocked, "refused"),
            ("bob", "forward", blocked, "done"),
        ]
        done = audit["items"][0]
        assert done["outcome"] and "127.0.0.1" in done["detail"]
