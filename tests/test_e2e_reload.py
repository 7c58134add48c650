"""
A reload applies everything it says it applied, end to end: the real
gateway (the twistd plugin), a reload through the admin API, and real
clients (smtplib, a TLS socket, an aiosmtpd downstream) looking at what
changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import smtplib
import socket
import ssl
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.certs import make_test_pki
from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import free_port, running_gateway, wait_for_port
from tests.test_e2e_pipeline import message, send, wait_for

pytestmark = pytest.mark.timeout(120)

TOKEN = "reload-test-token"


def config_toml(
    tmp: Path, port: int, implicit: int, admin: int, down: int, helo: str, size: str
) -> str:
    return f"""
sender_helo_domain = "{helo}"
[[listeners]]
name = "smtp"
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "starttls"
[[listeners]]
name = "smtps"
endpoint = "tcp:{implicit}:interface=127.0.0.1"
tls = "implicit"
[tls]
certificate = "{tmp / "tls" / "cert.pem"}"
key = "{tmp / "tls" / "key.pem"}"
[limits]
message_size = "{size}"
[spool]
directory = "{tmp / "spool"}"
[admin]
endpoint = "tcp:{admin}:interface=127.0.0.1"
token_file = "{tmp / "token"}"
[profiles.core.nocore]
servers = ["http://127.0.0.1:9"]
[profiles.smtp.downstream]
servers = ["smtp://127.0.0.1:{down}"]
tls = "none"
[[rules]]
name = "inbound"
client_networks = ["127.0.0.0/8"]
core_profile = "nocore"
relay_profile = "downstream"
on_error = {{ core_unreachable = "bypass" }}
"""


def install(pki_dir: Path, tls: Path) -> str:
    """
    Put a fresh certificate and key where the configuration names them;
    returns the certificate's SHA-256 fingerprint.
    """
    pki = make_test_pki(pki_dir)
    tls.mkdir(exist_ok=True)
    shutil.copy(pki.server_cert, tls / "cert.pem")
    shutil.copy(pki.server_key, tls / "key.pem")
    return fingerprint_of_pem(tls / "cert.pem")


def fingerprint_of_pem(path: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).hexdigest()


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def starttls_fingerprint(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=unverified())
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    return hashlib.sha256(der).hexdigest()


def implicit_fingerprint(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with unverified().wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return hashlib.sha256(der).hexdigest()


def greeting_and_ehlo(port: int) -> tuple[str, list[str]]:
    with smtplib.SMTP(timeout=10) as client:
        _, banner = client.connect("127.0.0.1", port)
        _, ehlo = client.ehlo("client.test")
    return banner.decode(), ehlo.decode().splitlines()


def reload(admin: int) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin}/api/config/reload",
        method="POST",
        data=b"{}",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return dict(json.loads(response.read()))


def test_reload_applies_names_limits_and_certificate(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    After C{sender_helo_domain}, a limit and the certificate files change
    and the gateway reloads: new sessions get the new name in the banner
    and the EHLO reply and the new SIZE; the relay greets the downstream
    with the new name; STARTTLS and implicit TLS present the new
    certificate; the answer lists what was applied, and a listener change
    is named as needing a restart (the old listener keeps serving).
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port, implicit, admin = free_port(), free_port(), free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    tls = tmp_path / "tls"
    first = install(tmp_path / "pki1", tls)
    config = tmp_path / "mdgateway.toml"

    def write(helo: str, size: str, listener_port: int) -> None:
        config.write_text(
            config_toml(
                tmp_path, listener_port, implicit, admin, downstream.port, helo, size
            )
        )

    write("before.test", "10MB", port)
    with running_gateway(tmp_path, toml=config.read_text(), port=port):
        wait_for_port(admin)
        banner, ehlo = greeting_and_ehlo(port)
        assert banner.startswith("before.test ESMTP")
        assert ehlo[0] == "before.test" and f"SIZE {10 * 1024 * 1024}" in ehlo
        assert starttls_fingerprint(port) == implicit_fingerprint(implicit) == first
        send(port, message("one"))
        wait_for(lambda: handler.ehlo_names)
        assert handler.ehlo_names[-1] == "before.test"

        second = install(tmp_path / "pki2", tls)
        assert second != first
        write("after.test", "20MB", port)
        answer = reload(admin)
        assert answer["loaded"] is True
        assert answer["restart_required"] == []
        assert set(answer["applied"]) == {"sender_helo_domain", "limits.message_size"}

        banner, ehlo = greeting_and_ehlo(port)
        assert banner.startswith("after.test ESMTP")
        assert ehlo[0] == "after.test" and f"SIZE {20 * 1024 * 1024}" in ehlo
        assert starttls_fingerprint(port) == second
        assert implicit_fingerprint(implicit) == second
        send(port, message("two"))
        wait_for(lambda: len(handler.messages) == 2)
        assert handler.ehlo_names[-1] == "after.test"

        write("after.test", "20MB", free_port())
        answer = reload(admin)
        assert answer["loaded"] is True
        assert answer["restart_required"] == ["listeners"]
        assert greeting_and_ehlo(port)[0].startswith("after.test ESMTP")
