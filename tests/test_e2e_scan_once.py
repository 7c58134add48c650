"""
End to end, scan once per copy: the real gateway (twistd plugin as a
subprocess) with the Core emulator in a process of its own, the uploads it
receives counted on the wire by a relay in front of it, and a downstream
server that is down, then up. Retries only deliver; a crash after the scan
neither loses the verdicts nor scans again. Also: real-world mail with
empty bodies and parts passes the default configuration without a bounce.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.coresamples import docx
from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import (
    ETC,
    REPO,
    GatewayProcess,
    environment,
    free_port,
    running_gateway,
    wait_for_port,
)
from tests.test_e2e_admin import call
from tests.test_e2e_pipeline import (
    headers_of,
    message,
    pipeline_toml,
    send,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


class UploadCounter:
    """
    A TCP relay in front of the Core emulator that counts the uploads
    (C{POST /file} and C{POST /file/sync} requests) passing through it,
    on the wire.
    """

    _REQUESTS = (b"POST /file HTTP/1.1\r\n", b"POST /file/sync HTTP/1.1\r\n")
    _LONGEST = max(len(r) for r in _REQUESTS)

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.uploads = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(
                target=self._pipe, args=(client, upstream, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pipe, args=(upstream, client, False), daemon=True
            ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        tail = b""
        try:
            while data := source.recv(65536):
                if count:
                    seen = tail + data
                    with self._lock:
                        # A request line ending inside the old tail was
                        # counted with the previous chunk.
                        self.uploads += sum(
                            1
                            for r in self._REQUESTS
                            for m in re.finditer(re.escape(r), seen)
                            if m.end() > len(tail)
                        )
                    tail = seen[-(self._LONGEST - 1) :]
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.server.close()


@pytest.fixture
def core(tmp_path: Path) -> Iterator[UploadCounter]:
    """
    The Core emulator as a process of its own, behind an upload counter.
    """
    port = free_port()
    log = open(tmp_path / "emulator.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "twisted", "mdcore-emulator", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=environment(),
        cwd=str(REPO),
    )
    log.close()
    counter = None
    try:
        wait_for_port(port, proc=proc)
        counter = UploadCounter(port)
        yield counter
    finally:
        if counter is not None:
            counter.close()
        proc.terminate()
        proc.wait(10)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def counted_toml(
    port: int, tmp_path: Path, downstream: int, core: UploadCounter
) -> str:
    toml, core_port = pipeline_toml(port, tmp_path, downstream, emulator=False)
    return toml.replace(
        f"http://127.0.0.1:{core_port}", f"http://127.0.0.1:{core.port}"
    )


def deferrals(gw: GatewayProcess, queue_id: str) -> int:
    return sum(
        1
        for e in gw.log_events()
        if e.get("message_id") == queue_id
        and e["msg"].startswith(f"{queue_id} deferred")
    )


def test_retries_never_rescan(tmp_path: Path, core: UploadCounter) -> None:
    """
    With the relay down, a copy with two parts is deferred again and again
    and Core receives its two uploads once; when the relay is back the copy
    is delivered, scanned (the verdict headers present) and without any
    further upload.
    """
    down = closed_port()
    port = free_port()
    toml = counted_toml(port, tmp_path, down, core)
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        queue_id = send(port, message("patience", (b"%PDF-1.4 data\n", "a.pdf")))
        wait_for(lambda: deferrals(gw, queue_id) >= 4, timeout=60)
        assert core.uploads == 2
        handler = RecordingHandler()
        controller = _Controller(handler, hostname="127.0.0.1", port=down)
        controller.start()
        try:
            (got,) = wait_for(lambda: handler.messages, timeout=30)
            wait_for(lambda: not list((tmp_path / "spool" / "queue").glob("*")))
            # The kept files go right after the entry.
            wait_for(lambda: not list((tmp_path / "spool" / "processed").glob("*")))
        finally:
            controller.stop()
    assert core.uploads == 2
    assert headers_of(got)["X-Metadefender-Core-Result"] == "Allowed"


def test_crash_after_scan_keeps_verdicts(tmp_path: Path, core: UploadCounter) -> None:
    """
    A gateway killed (SIGKILL) after a copy was scanned and deferred
    restarts, finds the kept verdicts and rebuilt copy in its spool, and
    delivers the very copy it had built (the Deep CDR output the first
    process downloaded) without uploading anything again.
    """
    down = closed_port()
    port = free_port()
    toml = counted_toml(port, tmp_path, down, core)
    document = docx(b"pretend this is a report " * 20)
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, _):
        queue_id = send(port, message("crash", (document, "report.docx")))
        wait_for(lambda: deferrals(gw, queue_id) >= 1, timeout=60)
        assert core.uploads == 2
        kept = list((tmp_path / "spool" / "processed" / queue_id).glob("*.eml"))
        assert kept
        gw.kill()
        handler = RecordingHandler()
        controller = _Controller(handler, hostname="127.0.0.1", port=down)
        controller.start()
        try:
            gw.start(port)
            (got,) = wait_for(lambda: handler.messages, timeout=30)
        finally:
            controller.stop()
    assert core.uploads == 2
    parsed = email.message_from_bytes(got.content, policy=email.policy.default)
    assert parsed["X-Metadefender-EmailSecurity-Sanitized"] == "True"
    (attachment,) = parsed.iter_attachments()
    content = attachment.get_content()
    assert content != document and len(content) > 0


CORPUS = Path(__file__).parent / "corpus"


def empty_messages() -> list[tuple[str, bytes]]:
    """
    Real-world shapes with nothing in a body or part: a reply with an empty
    body, a calendar response with an empty text part, mail whose only
    content is an attachment after an empty text part, an empty
    attachment, and a message with no body at all.
    """
    head = (
        b"From: alice@example.com\r\nTo: r@example.org\r\n"
        b"Date: Tue, 04 Nov 2025 09:12:40 +0000\r\n"
    )
    mixed = (
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\r\n"
        b'--b1\r\nContent-Type: application/pdf; name="a.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="a.pdf"\r\n\r\n'
        b"JVBERi0xLjQK\r\n--b1--\r\n"
    )
    calendar = (
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="c1"\r\n\r\n'
        b"--c1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\r\n"
        b"--c1\r\nContent-Type: text/calendar; method=REPLY; charset=utf-8\r\n\r\n"
        b"BEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nEND:VCALENDAR\r\n--c1--\r\n"
    )
    empty_attachment = (
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="e1"\r\n\r\n'
        b"--e1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        b'--e1\r\nContent-Type: application/octet-stream; name="empty.txt"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="empty.txt"\r\n\r\n'
        b"\r\n--e1--\r\n"
    )
    return [
        ("reply", head + b"Subject: Re: ok\r\n\r\n"),
        ("calendar", head + b"Subject: Accepted: meeting\r\n" + calendar),
        ("attachment only", head + b"Subject: scan\r\n" + mixed),
        ("empty attachment", head + b"Subject: empty file\r\n" + empty_attachment),
        ("no body", head + b"Subject: nothing\r\n"),
    ]


def test_empty_parts_pass_default_configuration(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> None:
    """
    The shipped configuration (etc/mdgateway.toml, its emulator and rule,
    relaying here to a real SMTP server instead of the maildir) delivers
    real-world mail with empty bodies and parts, each Allowed, and bounces
    nothing: no DSN reaches the sender. The history gives each a verdict
    (Allowed; Sanitized for the rebuilt PDF) and lists its empty parts as
    Empty.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    config = (ETC / "mdgateway.toml").read_text()
    port, core_port, admin = free_port(), free_port(), free_port()
    shutil.copytree(ETC / "tls", tmp_path / "tls")
    replaced = (
        config.replace(
            "tcp:10025:interface=127.0.0.1", f"tcp:{port}:interface=127.0.0.1"
        )
        .replace('"../var/spool"', f'"{tmp_path / "spool"}"')
        .replace('"../var/history.sqlite"', f'"{tmp_path / "history.sqlite"}"')
        .replace("tcp:8008:interface=127.0.0.1", f"tcp:{core_port}:interface=127.0.0.1")
        .replace("http://127.0.0.1:8008", f"http://127.0.0.1:{core_port}")
        .replace('"maildir:../var/delivered"', f'"smtp://127.0.0.1:{downstream.port}"')
        .replace("tcp:10080:interface=127.0.0.1", f"tcp:{admin}:interface=127.0.0.1")
        .replace('"../var/admin.token"', f'"{tmp_path / "admin.token"}"')
    )
    # Every path the example sets is ours (commented-out examples aside).
    assert not [
        line
        for line in replaced.splitlines()
        if '"../var' in line and not line.lstrip().startswith("#")
    ]
    assert replaced.count(str(tmp_path)) >= 2
    assert f"smtp://127.0.0.1:{downstream.port}" in replaced
    shapes = empty_messages()
    with running_gateway(tmp_path, toml=replaced, port=port) as (gw, _):
        wait_for_port(core_port)
        for _, data in shapes:
            send(port, data, recipients=("r@example.org",))
        wait_for(lambda: len(handler.messages) == len(shapes), timeout=60)
        wait_for(lambda: not list((tmp_path / "spool" / "queue").glob("*")))
        token = (tmp_path / "admin.token").read_text().strip()

        def finished() -> list[dict[str, Any]]:
            _, body = call(admin, "/api/messages", token=token)
            items = json.loads(body)["items"]
            done = [i for i in items if i["finished_at"]]
            return done if len(done) == len(shapes) else []

        history = {i["subject"]: i for i in wait_for(finished)}
        # The PDF beside an empty text part is rebuilt by Deep CDR.
        assert history.pop("scan")["verdict"] == "Sanitized"
        assert {i["verdict"] for i in history.values()} == {"Allowed"}
        results = []
        for item in history.values():
            _, body = call(admin, f"/api/messages/{item['id']}", token=token)
            results += [p["result"] for p in json.loads(body)["parts"]]
        assert "Empty" in results
        assert set(results) <= {"Empty", "Allowed"}
    subjects = sorted(headers_of(m)["Subject"] for m in handler.messages)
    assert subjects == sorted(email.message_from_bytes(d)["Subject"] for _, d in shapes)
    for got in handler.messages:
        assert got.mail_from == "alice@example.com"
        assert headers_of(got)["X-Metadefender-Core-Result"] == "Allowed"
