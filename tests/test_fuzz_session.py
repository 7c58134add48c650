"""
Random SMTP sessions (L{tests.smtpfuzz}) against the real gateway process:
every reply well formed and in step, no hang, no crash, no traceback in the
log, bounded memory; plus the fuzzer's own checks and the deterministic
nasty cases it found or is built around.
"""

from __future__ import annotations

import json
import os
import random
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.smtp.parse import ParseError, parse_bdat, parse_command
from tests.gatewayproc import GatewayProcess, default_toml, free_port, running_gateway
from tests.smtpfuzz import (
    PASSWORD,
    USER,
    Conversation,
    FuzzLimits,
    FuzzSummary,
    ServerFaultError,
    bdat_command,
    check_reply,
    command_verb,
    defang,
    run_session,
    run_sessions,
    session_seeds,
)

HOST = "127.0.0.1"
#: Sessions from this base seed run on every run, one at a time.
FIXED_SEED = 8
FIXED_SESSIONS = 120
#: Sessions from a fresh seed (printed; SMTPFUZZ_SEED replays it), in threads.
RANDOM_SESSIONS = 240
THREADS = 4
WARMUP_SEED = 7
#: Resident memory the gateway may gain over the run, after a warm-up that
#: has been down every code path once. The run sends some 8 MiB and spools
#: about a hundred messages; the gateway should keep none of it, and the
#: measured growth is 1-2 MiB (SQLite page cache, history rows, allocator
#: arenas). 8 MiB is four times that, so allocator noise does not trip it,
#: while keeping the input, or the buffers of every session, would. Slower
#: leaks are for long CLI runs (python -m tests.smtpfuzz) with RSS watched.
RSS_GROWTH_KIB = 8 * 1024
#: Every check on: reply text ASCII-only, and pipelining floods.
CI_LIMITS = FuzzLimits()


def gateway_toml(tmp: Path, port: int) -> str:
    """
    The test configuration with AUTH offered under TLS and a Core emulator
    on a free port, so recipients are accepted and messages are spooled.
    """
    users = tmp / "users.txt"
    users.write_text(f"{USER}:{PASSWORD}\n")
    core = free_port()
    return default_toml(
        port,
        tmp / "spool",
        extra=f'[emulator]\nenabled = true\nendpoint = "tcp:{core}:interface={HOST}"\n',
        listener_extra=f'auth = "optional"\nauth_users_file = "{users}"',
        core_url=f"http://{HOST}:{core}",
    )


def send_one(port: int) -> int:
    """
    The reply code smtplib gets for one ordinary message.
    """
    with smtplib.SMTP(HOST, port, local_hostname="after.test", timeout=15) as client:
        client.ehlo()
        client.mail("a@example.com")
        client.rcpt("r@example.org")
        code, _ = client.data(b"Subject: after\r\n\r\nstill works\r\n")
    return code


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, int]]:
    """
    One gateway for the module; tests that leave errors in its log use
    their own.
    """
    tmp = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    with running_gateway(tmp, toml=gateway_toml(tmp, port), port=port) as (gw, port):
        yield gw, port


def log_problems(gw: GatewayProcess) -> list[str]:
    """
    Tracebacks, unhandled errors and error-level events in the gateway log.
    """
    problems = [
        line[:300]
        for line in gw.log_text().splitlines()
        if "Traceback" in line or "Unhandled" in line
    ]
    for event in gw.log_events():
        if "traceback" in event or event["level"] in ("error", "critical"):
            problems.append(json.dumps(event)[:500])
    return problems


def failures_text(*summaries: FuzzSummary) -> str:
    return "\n\n".join(r.report() for s in summaries for r in s.failures)


@pytest.mark.timeout(60)
def test_random_sessions(gateway, capsys: pytest.CaptureFixture[str]) -> None:
    """
    A few hundred random sessions (valid and garbled commands, pipelining
    bursts, DATA and BDAT content, AUTH, STARTTLS mid-session with injected
    plaintext, over-long lines, raw bytes), some in four threads at once,
    get only well-formed replies, each within the timeout and exactly as
    many as the input calls for, and the server closes only after a
    closing reply. Afterwards the gateway is alive, still takes an ordinary
    message with 250, has logged no traceback or error, and its resident
    memory grew by less than L{RSS_GROWTH_KIB}.
    """
    gw, port = gateway
    run_seed = int(os.environ.get("SMTPFUZZ_SEED") or os.urandom(3).hex(), 16)
    print(f"smtpfuzz: fixed seed {FIXED_SEED}, run seed {run_seed:x} (SMTPFUZZ_SEED)")
    warmup = run_sessions(HOST, port, session_seeds(WARMUP_SEED, 20), 1, CI_LIMITS)
    assert send_one(port) == 250
    before = gw.memory_kib("VmRSS")
    fixed = run_sessions(
        HOST, port, session_seeds(FIXED_SEED, FIXED_SESSIONS), 1, CI_LIMITS
    )
    mixed = run_sessions(
        HOST, port, session_seeds(run_seed, RANDOM_SESSIONS), THREADS, CI_LIMITS
    )
    after = gw.memory_kib("VmRSS")
    with capsys.disabled():
        print(f"\nsmtpfuzz run seed {run_seed:x}:\n{mixed.text(transcripts=False)}")
        sent = sum(r.bytes_sent for r in fixed.results + mixed.results)
        print(f"{sent} bytes sent; gateway RSS {before} -> {after} KiB")
    assert not (warmup.failures or fixed.failures or mixed.failures), (
        f"run seed {run_seed:x}\n" + failures_text(warmup, fixed, mixed)
    )
    results = fixed.results + mixed.results
    assert sum(r.replies for r in results) > 5000
    assert any(r.tls for r in results) and any(r.accepted for r in results)
    assert {421, 221} <= {r.closing for r in results}
    assert gw.proc is not None and gw.proc.poll() is None
    assert send_one(port) == 250
    assert log_problems(gw) == []
    growth = after - before
    assert growth < RSS_GROWTH_KIB, f"RSS grew by {growth} KiB"


def test_sessions_replay_from_their_seed(gateway) -> None:
    """
    A session is reproducible from its seed alone: the same seed sends the
    same bytes in the same steps.
    """
    gw, port = gateway
    for seed in (11, 12, 13):
        first = run_session(HOST, port, seed, CI_LIMITS)
        again = run_session(HOST, port, seed, CI_LIMITS)
        assert first.ok and again.ok, first.report() + again.report()
        sent = [
            [line for line in r.transcript if line.startswith("C")]
            for r in (first, again)
        ]
        assert sent[0] == sent[1] and sent[0]


def test_starttls_burst_discards_injected_plaintext(gateway) -> None:
    """
    EHLO, NOOP, STARTTLS and two commands in one write: the first three are
    answered, the two after STARTTLS are discarded without a reply (not run
    inside TLS), so over TLS RCPT needs a MAIL first and EHLO offers AUTH
    but no STARTTLS.
    """
    gw, port = gateway
    conv = Conversation(HOST, port, CI_LIMITS, verify_tls=True)
    try:
        conv.connect()
        replies = conv.send(
            b"EHLO burst.test\r\nNOOP\r\nSTARTTLS\r\n"
            b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<r@example.org>\r\n"
        )
        assert [r.code for r in replies] == [250, 250, 220] and conv.tls
        rcpt, ehlo = conv.send(b"RCPT TO:<r@example.org>\r\nEHLO after.test\r\n")
        assert (rcpt.code, rcpt.lines[0][:5]) == (503, "5.5.1")
        assert "STARTTLS" not in ehlo.lines and "AUTH PLAIN LOGIN" in ehlo.lines
        conv.finish()
        assert conv.closing is not None and conv.closing.code == 221
    finally:
        conv.close()


def test_64k_random_bytes(gateway) -> None:
    """
    64 KiB of random bytes get only well-formed replies, one per line, until
    the error limit's 421 (or the last over-long line's 500) closes the
    session; 64 KiB without a line break get one 500 and the session goes
    on; either way the gateway keeps serving.
    """
    gw, port = gateway
    rng = random.Random(64)
    conv = Conversation(HOST, port, CI_LIMITS)
    try:
        conv.connect()
        conv.send(defang(rng.randbytes(65536)))
        assert conv.closed and conv.closing is not None
        assert conv.closing.code in (421, 500)
    finally:
        conv.close()
    conv = Conversation(HOST, port, CI_LIMITS)
    try:
        conv.connect()
        noise = defang(rng.randbytes(65536).replace(b"\n", b"-"))
        (reply,) = conv.send(noise)
        assert (reply.code, reply.lines[0][:5]) == (500, "5.5.2")
        assert conv.send(b"\r\nNOOP\r\n")[0].code == 250
        conv.finish()
    finally:
        conv.close()
    assert send_one(port) == 250


def test_bdat_chunk_across_writes(gateway) -> None:
    """
    A BDAT chunk split over two writes, holding command lines and a lone
    dot, is read to its exact size as content: one reply for the chunk
    (the message queued), then the reply to the command pipelined behind it.
    """
    gw, port = gateway
    conv = Conversation(HOST, port, CI_LIMITS)
    try:
        conv.connect()
        content = b"Subject: split\r\n\r\nNOOP\r\n.\r\nQUIT\r\n"
        first = conv.send(
            b"EHLO chunk.test\r\nMAIL FROM:<a@example.com>\r\n"
            b"RCPT TO:<r@example.org>\r\n"
            + f"BDAT {len(content)} LAST\r\n".encode()
            + content[:20]
        )
        assert [r.code for r in first] == [250, 250, 250]
        done, noop = conv.send(content[20:] + b"NOOP\r\n")
        assert done.code == 250 and "queued as" in done.text
        assert noop.code == 250
        conv.finish()
    finally:
        conv.close()


def test_third_long_line_closes(gateway) -> None:
    """
    The server's own rule, which the fuzzer relies on: the first two
    over-long command lines get 500 5.5.2 and the session goes on; the
    third gets 421 4.7.0 and the connection is closed.
    """
    gw, port = gateway
    conv = Conversation(HOST, port, CI_LIMITS)
    try:
        conv.connect()
        long_line = b"NOOP " + b"y" * 5000 + b"\r\n"
        assert [r.code for r in conv.send(long_line * 2 + b"NOOP\r\n")] == [
            500,
            500,
            250,
        ]
        conv.send(long_line)
        assert conv.closed and conv.closing is not None
        assert conv.closing.code == 421
        assert conv.closing.text.startswith("4.7.0")
    finally:
        conv.close()


def test_reply_text_is_us_ascii(gateway) -> None:
    """
    A MAIL parameter with UTF-8 in it is refused with reply text that is
    US-ASCII only (RFC 5321 4.2 C{textstring}).
    """
    gw, port = gateway
    conv = Conversation(HOST, port, FuzzLimits())
    try:
        conv.connect()
        conv.send(b"EHLO utf8.test\r\n")
        (reply,) = conv.send("MAIL FROM:<a@example.org> DÉJÀ=1\r\n".encode())
        assert reply.code == 501
    finally:
        conv.close()


@pytest.mark.timeout(60)
def test_deep_pipeline_gets_every_reply(tmp_path: Path) -> None:
    """
    MAIL and 300 RCPTs pipelined in one write (as a bulk sender may do) get
    all 301 replies in order, and the gateway logs no error.
    """
    port = free_port()
    with running_gateway(tmp_path, toml=gateway_toml(tmp_path, port), port=port) as (
        gw,
        port,
    ):
        conv = Conversation(HOST, port, FuzzLimits(reply_timeout=5))
        try:
            conv.connect()
            conv.send(b"EHLO bulk.test\r\n")
            replies = conv.send(
                b"MAIL FROM:<a@example.com>\r\n" + b"RCPT TO:<r@example.org>\r\n" * 300
            )
            assert [r.code for r in replies] == [250] * 301
        finally:
            conv.close()
        assert log_problems(gw) == []


class ReplyCheckTests(SynchronousTestCase):
    """
    L{check_reply}, the fuzzer's judge of every reply.
    """

    def test_accepts_well_formed(self) -> None:
        """
        Single and multi-line replies with matching enhanced codes pass, as
        do a greeting and an EHLO reply without them and a 354 (3xx carry
        none).
        """
        reply = check_reply([b"250-2.0.0 one\r\n", b"250 2.0.0 two\r\n"], False)
        self.assertEqual((reply.code, reply.lines), (250, ("2.0.0 one", "2.0.0 two")))
        check_reply([b"220 gw.test ESMTP\r\n"], True)
        check_reply([b"250-gw.test\r\n", b"250 DSN\r\n"], True)
        check_reply([b"354 End data with <CR><LF>.<CR><LF>\r\n"], False)
        check_reply([b"501 5.5.4 Syntax: EHLO hostname\r\n"], True)

    def test_rejects_malformed(self) -> None:
        """
        Bare LF, a stray CR, a code outside 2xx-5xx, mixed codes, a wrong
        continuation marker, a missing or wrong-class enhanced code, 8-bit
        text and over-long lines are all failures.
        """
        bad = [
            ([b"250 2.0.0 ok\n"], False),
            ([b"250 2.0.0 o\rk\r\n"], False),
            ([b"199 2.0.0 ok\r\n"], False),
            ([b"600 2.0.0 ok\r\n"], False),
            ([b"250-2.0.0 a\r\n", b"251 2.0.0 b\r\n"], False),
            ([b"250-2.0.0 a\r\n", b"250-2.0.0 b\r\n"], False),
            ([b"250 ok\r\n"], False),
            ([b"550 2.0.0 refused\r\n"], False),
            ([b"501 4.5.4 bad\r\n"], True),
            ([b"250 2.0.0 caf\xc3\xa9\r\n"], False),
            ([b"250 2.0.0 " + b"x" * 600 + b"\r\n"], False),
            ([b"250\r\n"], False),
        ]
        for lines, exempt in bad:
            with self.assertRaises(ServerFaultError, msg=repr(lines)):
                check_reply(lines, exempt)


def _server_bdat(line: bytes) -> tuple[int, bool] | None:
    try:
        command = parse_command(line)
        if command.verb != "BDAT":
            return None
        return parse_bdat(command.argument)
    except ParseError:
        return None


def _server_verb(line: bytes) -> str | None:
    try:
        return parse_command(line).verb
    except ParseError:
        return None


_PIECES = st.sampled_from(
    [b"BDAT", b"bdat", b"BdAt", b"STARTTLS", b"DATA", b" ", b"\t", b"  ", b"0", b"7"]
    + [
        b"12",
        b"LAST",
        b"last",
        b"la\xc5\xbft",
        b"\xef\xbc\x95",
        b"\xc2\xa0",
        b"\xc2\x85",
    ]
    + [b"\xe2\x80\xa8", b"\x00", b"\x7f", b"\r", b"\xff", b"x", b"-1", b"9" * 21]
)


class FramingMirrorTests(SynchronousTestCase):
    """
    The fuzzer mirrors the server's command parsing where it decides the
    framing; these keep the mirror in step with L{mdgateway.smtp.parse}.
    """

    @settings(max_examples=400, deadline=None)
    @given(st.lists(_PIECES | st.binary(max_size=4), max_size=8).map(b"".join))
    def test_bdat_and_verb_match_server(self, line: bytes) -> None:
        """
        For any line, L{bdat_command} and L{command_verb} agree with the
        server's parser on whether it is a BDAT command, its size and LAST,
        and the verb.
        """
        self.assertEqual(bdat_command(line), _server_bdat(line))
        self.assertEqual(command_verb(line), _server_verb(line))
