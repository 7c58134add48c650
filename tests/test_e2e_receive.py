"""
End to end: the real gateway (C{twist mdgateway} as a subprocess) receiving
mail from real clients over loopback: smtplib over plain TCP, STARTTLS and
implicit TLS, a pipelining client, PROXY v1/v2 clients and hostile input.
"""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mdgateway.message.digest import content_digest
from tests.gatewayproc import (
    ETC,
    REPO,
    GatewayProcess,
    default_toml,
    environment,
    free_port,
    log_events,
    queued_files,
    running_gateway,
    wait_for_port,
)

pytestmark = pytest.mark.timeout(120)

MESSAGE = (
    b"From: a@example.com\r\nTo: r@example.org\r\nSubject: hello\r\n\r\n"
    b"First line\r\n.leading dot\r\n..two dots\r\nlast\r\n"
)


def client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ETC / "tls" / "localhost.crt"))
    return context


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, int, Path]]:
    tmp = tmp_path_factory.mktemp("gw")
    with running_gateway(tmp) as (gw, port):
        yield gw, port, tmp / "spool"


def spooled(spool: Path, queue_id: str) -> tuple[bytes, dict[str, Any]]:
    message = (spool / "queue" / f"{queue_id}.eml").read_bytes()
    envelope = json.loads((spool / "queue" / f"{queue_id}.json").read_text())
    return message, envelope


def queue_id_of(reply: bytes) -> str:
    text = reply.decode()
    assert "queued as " in text, text
    return text.rsplit("queued as ", 1)[1].strip()


class Raw:
    """
    A line-oriented raw SMTP client for exact-byte tests.
    """

    def __init__(self, port: int, proxy_header: bytes = b"") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        if proxy_header:
            self.sock.sendall(proxy_header)
        self.file = self.sock.makefile("rb")

    def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed")
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: bytes) -> tuple[int, list[str]]:
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def test_plain_smtplib_queues_exact_bytes(gateway) -> None:
    """
    A message sent with smtplib over plain TCP gets 250 2.0.0 with a queue
    id only once spooled; the spool holds a Received header naming the
    client, HELO, protocol and queue id, followed by the content exactly as
    sent (dot-unstuffed), and an envelope with sender, recipients and the
    content digest (the marker's binding) computed while it streamed in,
    equal to the digest of the spooled file.
    """
    gw, port, spool = gateway
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test") as client:
        client.ehlo()
        client.mail("a@example.com", [f"SIZE={len(MESSAGE)}", "BODY=8BITMIME"])
        client.rcpt("r@example.org", ["NOTIFY=FAILURE"])
        code, text = client.data(MESSAGE)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    queue_id = queue_id_of(text)
    message, envelope = spooled(spool, queue_id)
    header, _, rest = message.partition(b"\r\nFrom: ")
    assert rest == MESSAGE[len(b"From: ") :]
    assert header.startswith(b"Received: from client.test ([127.0.0.1])")
    assert b"with ESMTP" in header and queue_id.encode() in header
    assert b"for <r@example.org>" in header
    assert envelope["sender"] == "a@example.com"
    assert [r["address"] for r in envelope["recipients"]] == ["r@example.org"]
    assert envelope["recipients"][0]["parameters"] == {"NOTIFY": "FAILURE"}
    assert envelope["mail_parameters"]["BODY"] == "8BITMIME"
    assert envelope["client_helo"] == "client.test"
    path = spool / "queue" / f"{queue_id}.eml"
    digest = content_digest(str(path))
    assert digest is not None
    assert envelope["extra"]["content_digest"] == digest.hex()


def test_starttls_smtplib(gateway) -> None:
    """
    smtplib with starttls() (certificate verified against the example CA)
    delivers; the Received header says ESMTPS with the TLS version and cipher
    and the envelope records them.
    """
    gw, port, spool = gateway
    with smtplib.SMTP("127.0.0.1", port, local_hostname="tls.test") as client:
        client.starttls(context=client_tls())
        client.ehlo()
        assert client.sendmail("a@example.com", ["r@example.org"], MESSAGE) == {}
    queued = queued_files(spool)
    newest = max(queued, key=lambda p: p.stat().st_mtime)
    message, envelope = spooled(spool, newest.stem)
    assert b"with ESMTPS (using TLSv1." in message.split(b"\r\n\r\n")[0]
    assert envelope["tls"] is True and envelope["tls_version"].startswith("TLSv1.")
    assert envelope["protocol"] == "ESMTPS"


def test_smtputf8_received_keyword(tmp_path: Path) -> None:
    """
    A transaction whose MAIL carries SMTPUTF8 over STARTTLS is stamped
    C{with UTF8SMTPS} (RFC 6531) in the Received header and the envelope;
    the next one on the same connection, without it, is C{ESMTPS}.
    """
    with running_gateway(tmp_path) as (gw, port):
        check_utf8_keyword(port, tmp_path / "spool")


def check_utf8_keyword(port: int, spool: Path) -> None:
    body = "From: jörg@example.com\r\nSubject: grüße\r\n\r\nhallo\r\n".encode()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="utf8.test") as client:
        client.starttls(context=client_tls())
        client.ehlo()
        refused = client.sendmail(
            "jörg@example.com", ["r@example.org"], body, mail_options=["SMTPUTF8"]
        )
        assert refused == {}
        assert client.sendmail("ascii@utf8.test", ["r@example.org"], MESSAGE) == {}
    by_sender = {}
    for path in queued_files(spool):
        message, envelope = spooled(spool, path.stem)
        by_sender[envelope["sender"]] = (message.split(b"\r\n\r\n")[0], envelope)
    head, envelope = by_sender["jörg@example.com"]
    assert b"with UTF8SMTPS (using TLSv1." in head
    assert envelope["protocol"] == "UTF8SMTPS"
    head, envelope = by_sender["ascii@utf8.test"]
    assert b"with ESMTPS (using TLSv1." in head
    assert envelope["protocol"] == "ESMTPS"


def test_pipelined_replies_in_order(tmp_path: Path) -> None:
    """
    A client that sends EHLO, MAIL, three RCPTs (one refused), DATA, the
    content and QUIT in one write gets every reply in order, and the
    message is queued for the two accepted recipients only.
    """
    port = free_port()
    spool = tmp_path / "spool"
    toml = default_toml(port, spool, rule_filters='recipients = ["example.org"]')
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, port):
        raw = Raw(port)
        assert raw.reply()[0] == 220
        raw.send(
            b"EHLO pipe.test\r\nMAIL FROM:<a@example.com>\r\n"
            b"RCPT TO:<one@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\n"
            b"RCPT TO:<two@EXAMPLE.org>\r\nDATA\r\n"
            b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n"
        )
        codes = [raw.reply() for _ in range(8)]
        assert [c for c, _ in codes] == [250, 250, 250, 550, 250, 354, 250, 221]
        assert "5.7.1 No security rule" in codes[3][1][0]
        queue_id = codes[6][1][0].rsplit(" ", 1)[1]
        _, envelope = spooled(spool, queue_id)
        assert [r["address"] for r in envelope["recipients"]] == [
            "one@example.org",
            "two@EXAMPLE.org",
        ]
        log = gw.log_text()
        assert "x@elsewhere.example" in log and "No security rule" in log


def test_implicit_tls(tmp_path: Path) -> None:
    """
    On an implicit-TLS listener smtplib.SMTP_SSL delivers and the message is
    recorded as received over TLS.
    """
    port = free_port()
    spool = tmp_path / "spool"
    toml = default_toml(port, spool).replace('tls = "starttls"', 'tls = "implicit"')
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, port):
        with smtplib.SMTP_SSL(
            "127.0.0.1", port, local_hostname="ssl.test", context=client_tls()
        ) as client:
            client.sendmail("a@example.com", ["r@example.org"], MESSAGE)
        (entry,) = queued_files(spool)
        message, envelope = spooled(spool, entry.stem)
        assert envelope["tls"] is True
        assert b"with ESMTPS" in message


def proxy_v2(client: str, port: int) -> bytes:
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    addresses = socket.inet_aton(client) + socket.inet_aton("127.0.0.1")
    body = addresses + struct.pack("!HH", port, 25)
    return signature + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def test_proxy_protocol(tmp_path: Path) -> None:
    """
    On a PROXY listener the banner waits for the header; after a v1 or v2
    header the real client address is the one recorded and checked (an
    address no rule covers is refused); a v2 LOCAL health
    check with QUIT is answered quietly; a client that is not a trusted proxy
    is dropped without a banner.
    """
    port = free_port()
    spool = tmp_path / "spool"
    toml = default_toml(
        port,
        spool,
        listener_extra='proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]',
        rule_filters='client_networks = ["203.0.113.0/24"]',
    )
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, port):
        raw = Raw(port)
        raw.sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            raw.sock.recv(10)  # no banner before the header
        raw.sock.settimeout(15)
        raw.send(b"PROXY TCP4 203.0.113.7 127.0.0.1 4000 25\r\n")
        assert raw.reply()[0] == 220
        raw.command(b"EHLO v1.test")
        raw.command(b"MAIL FROM:<a@example.com>")
        assert raw.command(b"RCPT TO:<r@example.org>")[0] == 250
        assert raw.command(b"DATA")[0] == 354
        code, lines = raw.command(b"Subject: v1\r\n\r\nhi\r\n.")
        assert code == 250
        message, envelope = spooled(spool, lines[0].rsplit(" ", 1)[1])
        assert envelope["client_address"] == "203.0.113.7"
        assert message.startswith(b"Received: from v1.test ([203.0.113.7])")
        raw.close()

        v2 = Raw(port, proxy_v2("198.51.100.9", 5000))
        assert v2.reply()[0] == 220
        v2.command(b"EHLO v2.test")
        v2.command(b"MAIL FROM:<a@example.com>")
        code, lines = v2.command(b"RCPT TO:<r@example.org>")
        assert (code, lines[0][4:9]) == (550, "5.7.1")
        v2.close()

        local = Raw(port, b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0, 0]))
        assert local.reply()[0] == 220
        assert local.command(b"QUIT")[0] == 221
        local.close()

    port = free_port()
    toml = default_toml(
        port,
        spool,
        listener_extra='proxy_protocol = true\ntrusted_proxies = ["10.0.0.0/8"]',
    )
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, port):
        untrusted = Raw(port)
        assert untrusted.closed()
        assert "untrusted" in gw.log_text()


def test_starttls_injection_discarded(gateway) -> None:
    """
    Commands pipelined in plaintext after STARTTLS are discarded, not run
    inside the TLS session (CVE-2011-0411): after the handshake the session
    has no sender and no EHLO.
    """
    gw, port, spool = gateway
    raw = Raw(port)
    raw.reply()
    raw.command(b"EHLO inject.test")
    raw.send(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\n")
    assert raw.reply()[0] == 220
    tls = client_tls().wrap_socket(raw.sock, server_hostname="localhost")
    tls.sendall(b"RCPT TO:<r@example.org>\r\n")
    reply = tls.recv(1000)
    assert reply.startswith(b"503 5.5.1"), reply
    tls.close()


def test_long_command_line_then_disconnect(gateway) -> None:
    """
    An over-long command line gets 500 5.5.2 and the session continues;
    the third gets 421 4.7.0 and a disconnect.
    """
    gw, port, spool = gateway
    raw = Raw(port)
    raw.reply()
    code, lines = raw.command(b"NOOP " + b"x" * 5000)
    assert (code, lines[0][4:9]) == (500, "5.5.2")
    assert raw.command(b"NOOP")[0] == 250
    raw.send(b"X" * 5000 + b"\r\n")
    raw.reply()
    raw.send(b"Y" * 100000)
    code, lines = raw.reply()
    assert (code, lines[0][4:9]) == (421, "4.7.0")
    assert raw.closed()


def test_long_data_line_rejects_message_only(gateway) -> None:
    """
    An over-long line in DATA refuses that message with 550 5.6.0 without
    desynchronising: the rest of the content is not run as commands and
    the next transaction works.
    """
    gw, port, spool = gateway
    raw = Raw(port)
    raw.reply()
    raw.command(b"EHLO long.test")
    raw.command(b"MAIL FROM:<a@example.com>")
    raw.command(b"RCPT TO:<r@example.org>")
    assert raw.command(b"DATA")[0] == 354
    code, lines = raw.command(
        b"Subject: x\r\n\r\n" + b"A" * 3000 + b"\r\nMAIL FROM:<inject@example.com>\r\n."
    )
    assert (code, lines[0][4:9]) == (550, "5.6.0")
    assert raw.command(b"MAIL FROM:<a@example.com>")[0] == 250
    assert raw.command(b"RSET")[0] == 250


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r"],
)
def test_smuggling_never_ends_data(gateway, smuggle: bytes) -> None:
    """
    Bare-LF and bare-CR variants of end-of-data never end DATA; the message
    is refused with 550 5.6.11 at the real CRLF.CRLF and nothing smuggled is
    accepted as a command.
    """
    gw, port, spool = gateway
    raw = Raw(port)
    raw.reply()
    raw.command(b"EHLO smuggle.test")
    raw.command(b"MAIL FROM:<a@example.com>")
    raw.command(b"RCPT TO:<r@example.org>")
    assert raw.command(b"DATA")[0] == 354
    before = len(queued_files(spool))
    raw.send(
        b"Subject: s\r\n\r\nhello" + smuggle + b"MAIL FROM:<smuggled@example.com>\r\n"
        b"RCPT TO:<victim@example.org>\r\nDATA\r\n"
    )
    raw.sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        raw.sock.recv(100)  # DATA has not ended: no reply yet
    raw.sock.settimeout(15)
    code, lines = raw.command(b"\r\n.")
    assert (code, lines[0][4:10]) == (550, "5.6.11")
    assert len(queued_files(spool)) == before


def test_limits(tmp_path: Path) -> None:
    """
    Too many recipients gets 452 4.5.3; SIZE= over the limit 552 5.3.4 at
    MAIL; content over the limit 552 5.3.4 at the end of DATA; more than the
    allowed Received headers 554 5.4.6; the error limit 421 and a disconnect.
    """
    port = free_port()
    spool = tmp_path / "spool"
    extra = """
[limits]
recipients = 2
message_size = 2048
received_headers = 3
errors = 4
"""
    with running_gateway(
        tmp_path, toml=default_toml(port, spool, extra), port=port
    ) as (gw, port):
        raw = Raw(port)
        raw.reply()
        raw.command(b"EHLO limits.test")
        assert raw.command(b"MAIL FROM:<a@example.com> SIZE=4096")[0] == 552
        raw.command(b"MAIL FROM:<a@example.com>")
        raw.command(b"RCPT TO:<1@example.org>")
        raw.command(b"RCPT TO:<2@example.org>")
        code, lines = raw.command(b"RCPT TO:<3@example.org>")
        assert (code, lines[0][4:9]) == (452, "4.5.3")
        assert raw.command(b"DATA")[0] == 354
        code, lines = raw.command(
            b"Subject: big\r\n\r\n" + b"x" * 900 + b"\r\n" * 3 + b"y\r\n" * 600 + b"."
        )
        assert (code, lines[0][4:9]) == (552, "5.3.4")
        raw.command(b"MAIL FROM:<a@example.com>")
        raw.command(b"RCPT TO:<1@example.org>")
        raw.command(b"DATA")
        code, lines = raw.command(
            b"Received: a\r\nReceived: b\r\nReceived: c\r\nReceived: d\r\n\r\nloop\r\n."
        )
        assert (code, lines[0][4:9]) == (554, "5.4.6")
        code, _ = raw.command(b"FROB")
        assert code == 502
        code, lines = raw.reply()
        assert (code, lines[0][4:9]) == (421, "4.7.0")
        assert raw.closed()
        assert queued_files(spool) == []


def test_idle_timeout_and_deadline(tmp_path: Path) -> None:
    """
    A silent client gets 421 4.4.2 after the idle timeout; a client that
    keeps talking is still cut off at the session deadline.
    """
    port = free_port()
    spool = tmp_path / "spool"
    extra = """
[limits]
idle_timeout = "1s"
session_deadline = "3s"
"""
    with running_gateway(
        tmp_path, toml=default_toml(port, spool, extra), port=port
    ) as (gw, port):
        idle = Raw(port)
        idle.reply()
        code, lines = idle.reply()
        assert (code, lines[0][4:9]) == (421, "4.4.2")
        busy = Raw(port)
        busy.reply()
        started = time.monotonic()
        code = 250
        while code == 250 and time.monotonic() - started < 10:
            time.sleep(0.5)
            code, lines = busy.command(b"NOOP")
        assert (code, lines[0][4:9]) == (421, "4.4.2")
        assert "time limit" in lines[0]


def test_25mb_starttls_memory_and_sigkill(tmp_path: Path) -> None:
    """
    A 25 MB message over STARTTLS is spooled while the gateway's peak
    resident memory grows by far less than the message; SIGKILL right after
    the 250 loses nothing: after a restart the message is still in the spool.
    """
    with running_gateway(tmp_path) as (gw, port):
        before = gw.memory_kib("VmRSS")
        line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * (25 * 1024 * 1024 // len(line))
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.starttls(context=client_tls())
            client.ehlo()
            client.mail("a@example.com")
            client.rcpt("r@example.org")
            code, text = client.data(body)
            peak = gw.memory_kib("VmHWM")
            gw.kill()  # SIGKILL right after the 250
        assert code == 250
        queue_id = queue_id_of(text)
        growth_mib = (peak - before) / 1024
        assert growth_mib < 10, (
            f"peak grew by {growth_mib:.1f} MiB for a 25 MiB message"
        )
        gw.start(port)
        message = (tmp_path / "spool" / "queue" / f"{queue_id}.eml").read_bytes()
        assert message.endswith(body)
        recovered = [e for e in gw.log_events() if "recovered" in e["msg"]]
        assert recovered[-1]["count"] == 1


def test_sigterm_drains(tmp_path: Path) -> None:
    """
    On SIGTERM an idle session gets 421 4.3.2, the listener stops taking
    connections and the process exits cleanly (twist re-raises SIGTERM after
    its orderly shutdown, as daemons do, so the status is -15 or 0).
    """
    with running_gateway(tmp_path) as (gw, port):
        raw = Raw(port)
        raw.reply()
        raw.command(b"EHLO drain.test")
        assert gw.terminate() in (0, -15)
        assert any(e["msg"] == "stopped" for e in gw.log_events())
        code, lines = raw.reply()
        assert (code, lines[0][4:9]) == (421, "4.3.2")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2)


def test_bad_config_exits_with_key_paths(tmp_path: Path) -> None:
    """
    A bad config file gives one line per problem naming the key path, a
    non-zero exit and no traceback.
    """
    config = tmp_path / "bad.toml"
    config.write_text(
        '[[listeners]]\nname = "smtp"\nendpoint = "tcp:2525"\ntls = "startls"\n'
        '[spool]\ndirectory = "s"\n[limits]\nmessage_size = "huge"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "twisted", "mdgateway", "--config", str(config)],
        capture_output=True,
        env=environment(),
        cwd=str(REPO),
        timeout=60,
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode != 0
    assert 'listeners[0].tls: unknown mode "startls"' in output
    assert "limits.message_size: not a size: 'huge'" in output
    assert "Traceback" not in output


def test_auth_over_starttls(tmp_path: Path) -> None:
    """
    On a listener with AUTH required, AUTH is not offered before STARTTLS
    and MAIL is refused; after STARTTLS, smtplib logs in (PLAIN and LOGIN,
    checked through twisted.cred against the users file), a wrong password
    gets 535 5.7.8, and the message is recorded as ESMTPSA with the user.
    """
    users = tmp_path / "users.txt"
    users.write_text("alice:wonderland\n")
    port = free_port()
    spool = tmp_path / "spool"
    toml = default_toml(
        port,
        spool,
        listener_extra=f'auth = "required"\nauth_users_file = "{users}"',
    )
    with running_gateway(tmp_path, toml=toml, port=port) as (gw, port):
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.ehlo()
            assert not client.has_extn("auth")
            code, _ = client.docmd("MAIL", "FROM:<a@example.com>")
            assert code == 530
            client.starttls(context=client_tls())
            client.ehlo()
            assert client.has_extn("auth")
            with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
                client.login("alice", "wrong")
            assert caught.value.smtp_code == 535
            client.login("alice", "wonderland")
            client.sendmail("a@example.com", ["r@example.org"], MESSAGE)
        for mechanism in ("PLAIN", "LOGIN"):
            with smtplib.SMTP("127.0.0.1", port) as client:
                client.starttls(context=client_tls())
                client.ehlo()
                client.user, client.password = "alice", "wonderland"
                code, _ = client.auth(
                    mechanism, getattr(client, f"auth_{mechanism.lower()}")
                )
                assert code == 235
        (entry,) = queued_files(spool)
        _, envelope = spooled(spool, entry.stem)
        assert envelope["protocol"] == "ESMTPSA"
        assert envelope["authenticated_user"] == "alice"


def test_twistd_runs_plugin_and_logs_structured_fields(tmp_path: Path) -> None:
    """
    'twistd -n mdgateway --config FILE' runs the gateway too; with twist's
    JSON log, the queued event carries the message id, session id and client
    as structured fields.
    """
    port = free_port()
    config = tmp_path / "mdgateway.toml"
    config.write_text(default_toml(port, tmp_path / "spool"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            f"--logfile={tmp_path / 'twistd.log'}",
            "mdgateway",
            "--config",
            str(config),
        ],
        env=environment(),
        cwd=str(REPO),
    )
    twistd_log = tmp_path / "twistd.log"
    try:
        wait_for_port(port, proc=proc)
        deadline = time.monotonic() + 30
        while not any(e.get("gateway_ready") for e in log_events(twistd_log)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("a@example.com", ["r@example.org"], MESSAGE)
    finally:
        proc.terminate()
        proc.wait(30)
    # twistd logs JSON Lines too (the plugin names its observer as --logger).
    lines = twistd_log.read_text().splitlines()
    assert all(json.loads(line)["level"] for line in lines)
    assert any("queued" in json.loads(line)["msg"] for line in lines)

    (tmp_path / "json").mkdir()
    with running_gateway(tmp_path / "json") as (gw, port):
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.ehlo()
            assert client.mail("a@example.com")[0] == 250
            assert client.rcpt("r@example.org")[0] == 250
            _, text = client.data(MESSAGE)
        queued = [e for e in gw.log_events() if "message_id" in e]
        assert queued and queued[-1]["message_id"] == queue_id_of(text)
        assert queued[-1]["client"] == "127.0.0.1"
        session = queued[-1]["session_id"]
        assert any(
            e.get("session_id") == session and "connect from" in e["msg"]
            for e in gw.log_events()
        )
