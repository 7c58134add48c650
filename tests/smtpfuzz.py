# -*- test-case-name: tests.test_fuzz_session -*-
"""
A bounded random SMTP session fuzzer for the live gateway (stdlib only).

Each session is driven by C{random.Random(seed)}, so a failing session is
replayed from its seed alone. The client mirrors the server's framing
(command lines, over-long lines, DATA, BDAT chunks, AUTH continuations,
STARTTLS and the error limit) so that it knows exactly how many replies every
byte it sends must produce: a missing reply is a hang, an extra one a
desynchronised server, and every reply is checked against RFC 5321 4.2 and
RFC 2034 as it is read.

Run against a gateway you started yourself, never anything else::

    python -m tests.smtpfuzz --port 10025 --sessions 5000 --seed 1 --concurrency 4
"""

from __future__ import annotations

import argparse
import base64
import enum
import os
import random
import re
import socket
import ssl
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CERTIFICATE = Path(__file__).resolve().parent.parent / "etc" / "tls" / "localhost.crt"
TERMINATOR = b"\r\n.\r\n"
#: The users file line the CI gateway is given, so AUTH can also succeed.
USER, PASSWORD = "alice", "wonderland"

_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])([ -])([\t\x20-\x7e]*)")
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_LOOKS_ENHANCED = re.compile(r"\d\.\d+\.\d+(?: |$)")
_DEFANG = re.compile(rb"(?i)starttls|bdat")


class ServerFaultError(Exception):
    """
    The server misbehaved: a malformed reply, a hang, an unexpected close or
    a reply the protocol does not allow at that point.
    """


@dataclass(frozen=True)
class FuzzLimits:
    """
    The server limits the client mirrors (defaults: the gateway's) and the
    bounds of one session.

    @ivar command_line: C{limits.command_line_length}; longer lines get 500.
    @ivar max_errors: C{limits.errors}; the error reply that reaches it is
        followed by C{421} and a close.
    @ivar max_long_lines: over-long lines after which the server answers the
        last one with C{421} and closes (fixed in L{ProtocolLimits}).
    @ivar reply_timeout: seconds one reply may take; longer is a hang.
    @ivar max_steps: random steps in one session.
    @ivar max_bytes: bytes one session sends, roughly (one step may overshoot).
    @ivar session_seconds: after this a session stops generating and ends.
    @ivar check_ascii: reply text must be US-ASCII (RFC 5321 C{textstring}).
    @ivar floods: some steps pipeline thousands of RCPT commands at once.
    """

    command_line: int = 2048
    max_errors: int = 20
    max_long_lines: int = 3
    reply_timeout: float = 10.0
    max_steps: int = 40
    max_bytes: int = 200 * 1024
    session_seconds: float = 60.0
    check_ascii: bool = True
    floods: bool = True


@dataclass(frozen=True)
class Reply:
    """
    One complete, already validated reply.
    """

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def __str__(self) -> str:
        return " | ".join(f"{self.code} {line}" for line in self.lines)


def check_reply(
    raw_lines: Sequence[bytes], exempt: bool, check_ascii: bool = True
) -> Reply:
    """
    Validate one reply's raw lines (each with its CRLF) and parse it.

    Every line is C{DDD-text CRLF} except the last, C{DDD text CRLF}
    (RFC 5321 4.2; the code's digits as in its C{Reply-code} rule), all with
    the same code, at most 512 octets (4.5.3.1.5), text of HT and printable
    US-ASCII only (C{textstring}). Unless C{exempt} (the greeting, replies to
    HELO/EHLO: RFC 2034 section 4) every line of a 2xx, 4xx or 5xx reply
    starts with an enhanced status code (RFC 3463) of the reply's class; 3xx
    replies (334, 354) carry none. An exempt reply that has one anyway must
    still have the right class.

    @raise ServerFaultError: if anything is wrong.
    """
    if not raw_lines:
        raise ServerFaultError("empty reply")
    code = None
    texts = []
    for index, raw in enumerate(raw_lines):
        last = index == len(raw_lines) - 1
        if not raw.endswith(b"\r\n") or b"\r" in raw[:-2] or b"\n" in raw[:-2]:
            raise ServerFaultError(
                f"reply line not ended by a lone CRLF: {raw[:120]!r}"
            )
        if len(raw) > 512:
            raise ServerFaultError(f"reply line longer than 512 octets: {raw[:120]!r}")
        match = _REPLY_LINE.fullmatch(re.sub(rb"[\x80-\xff]", b"?", raw[:-2]))
        if match is None:
            raise ServerFaultError(f"malformed reply line: {raw[:120]!r}")
        if check_ascii and not raw.isascii():
            raise ServerFaultError(f"reply text is not US-ASCII: {raw[:120]!r}")
        line_code = int(match.group(1))
        if code is None:
            code = line_code
        elif line_code != code:
            raise ServerFaultError(f"reply lines with codes {code} and {line_code}")
        if (match.group(2) == b" ") != last:
            raise ServerFaultError(f"continuation marker wrong: {raw[:120]!r}")
        texts.append(raw[4:-2].decode("utf-8", "replace"))
    assert code is not None
    needs_status = not exempt and code // 100 in (2, 4, 5)
    for text in texts:
        status = _ENHANCED.match(text)
        if status is None:
            if needs_status:
                raise ServerFaultError(
                    f"{code} reply without enhanced status: {text!r}"
                )
            if _LOOKS_ENHANCED.match(text):
                raise ServerFaultError(
                    f"{code} reply with bad enhanced status: {text!r}"
                )
        elif int(status.group(1)) != code // 100:
            raise ServerFaultError(
                f"{code} reply with status class {status.group(0)!r}"
            )
    return Reply(code, tuple(texts))


class ReplyReader:
    """
    Reads replies line by line from a socket, each within a deadline.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buffer = b""

    def _fill(self, deadline: float, what: str) -> bool:
        """
        Read more; L{False} at end of stream.
        """
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServerFaultError(f"hang: no {what} within {self.timeout:.0f}s")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise ServerFaultError(
                f"hang: no {what} within {self.timeout:.0f}s"
            ) from None
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return False
        except ssl.SSLError as e:
            raise ServerFaultError(f"TLS error reading {what}: {e!r}") from None
        if not data:
            return False
        self.buffer += data
        return True

    def read(self, exempt: bool, check_ascii: bool = True) -> Reply:
        """
        The next complete reply, validated with L{check_reply}.

        @raise EOFError: the server closed before a whole reply came.
        """
        deadline = time.monotonic() + self.timeout
        lines: list[bytes] = []
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > 4096:
                    raise ServerFaultError(
                        f"reply line too long: {self.buffer[:120]!r}"
                    )
                if not self._fill(deadline, "reply"):
                    if lines or self.buffer:
                        raise ServerFaultError(
                            f"connection closed inside a reply: {lines!r} "
                            f"{self.buffer[:120]!r}"
                        )
                    raise EOFError
                continue
            line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return check_reply(lines, exempt, check_ascii)
            if len(lines) > 100:
                raise ServerFaultError("reply of more than 100 lines")

    def expect_eof(self) -> None:
        """
        Nothing more may come but the end of the stream.
        """
        deadline = time.monotonic() + self.timeout
        while not self.buffer:
            if not self._fill(deadline, "close after a closing reply"):
                return
        raise ServerFaultError(f"data after a closing reply: {self.buffer[:120]!r}")

    def stray(self) -> bytes | None:
        """
        Bytes the server sent unasked (C{b""} if it closed), or L{None}.
        """
        if self.buffer:
            return self.buffer
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return b""
        except ssl.SSLError as e:
            raise ServerFaultError(f"TLS error: {e!r}") from None
        finally:
            self.sock.settimeout(self.timeout)
        self.buffer += data
        return data


class Mode(enum.Enum):
    """
    How the server reads the client's bytes right now.
    """

    COMMAND = "command"
    DATA = "data"
    BDAT = "bdat"
    CLOSED = "closed"


def _command_text(line: bytes) -> tuple[str, str] | None:
    """
    Verb and argument as the server splits a command line, or L{None} where
    it refuses the line before looking at the verb.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in text):
        return None
    verb, _, argument = text.strip(" \t").partition(" ")
    if not verb.isascii() or not verb.isalpha():
        return None
    return verb.upper(), argument.strip(" \t")


def command_verb(line: bytes) -> str | None:
    """
    The upper-cased verb the server sees in C{line} (no line ending).
    """
    parsed = _command_text(line)
    return None if parsed is None else parsed[0]


def bdat_command(line: bytes) -> tuple[int, bool] | None:
    """
    C{(size, last)} when the server takes C{line} as a valid BDAT command,
    which it follows by reading exactly C{size} bytes whatever its state.
    """
    parsed = _command_text(line)
    if parsed is None or parsed[0] != "BDAT":
        return None
    words = parsed[1].split()
    size = words[0] if words else ""
    if len(words) > 2 or not (size.isascii() and size.isdigit()) or len(size) > 20:
        return None
    if len(words) == 2 and words[1].upper() != "LAST":
        return None
    return int(size), len(words) == 2


def _show(data: bytes, limit: int = 160) -> str:
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit]!r}... ({len(data)} bytes)"


class Conversation:
    """
    One client connection that mirrors the server's framing.

    L{send} writes bytes and then walks through them as the server does,
    reading and validating exactly the replies they must produce, switching
    to TLS on a C{220} to STARTTLS and expecting the connection to end after
    a closing reply (221 to QUIT or any 421, including the one to the
    over-long line that reaches C{max_long_lines}).

    @ivar helo: a HELO/EHLO was accepted since the last reset.
    @ivar transaction: a MAIL was accepted and no message ended it yet.
    @ivar recipients: recipients accepted in that transaction.
    """

    def __init__(
        self,
        host: str,
        port: int,
        limits: FuzzLimits | None = None,
        verify_tls: bool = True,
        transcript: list[str] | None = None,
    ) -> None:
        self.limits = limits or FuzzLimits()
        self.host = host
        self.port = port
        self.verify_tls = verify_tls
        self.transcript: list[str] = [] if transcript is None else transcript
        self.sock: socket.socket | None = None
        self.reader: ReplyReader | None = None
        self.mode = Mode.COMMAND
        self.tls = False
        self.greeting: Reply | None = None
        self.closing: Reply | None = None
        self.pending = b""
        self.discarding = False
        self.data_tail = b""
        self.bdat_left = 0
        self.bdat_last = False
        self.auth_pending = False
        self.errors = 0
        self.long_lines = 0
        self.helo = False
        self.transaction = False
        self.recipients = 0
        self.replies: list[Reply] = []
        self.bytes_sent = 0
        self.accepted = 0
        self.tls_started = 0

    # -- connection --------------------------------------------------------

    def connect(self) -> Reply | None:
        """
        Connect and read the greeting; L{None} if refused with 421.
        """
        try:
            self.sock = socket.create_connection(
                (self.host, self.port), timeout=self.limits.reply_timeout
            )
        except OSError as e:
            raise ServerFaultError(f"cannot connect: {e!r}") from None
        self.reader = ReplyReader(self.sock, self.limits.reply_timeout)
        self.transcript.append(f"connect {self.host}:{self.port}")
        reply = self._reply("greeting", exempt=True)
        self.greeting = reply
        if reply.code == 421:
            self._closed_by(reply)
            return None
        if reply.code != 220:
            raise ServerFaultError(f"greeting is not 220 or 421: {reply}")
        return reply

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.mode = Mode.CLOSED

    @property
    def closed(self) -> bool:
        return self.mode is Mode.CLOSED

    @property
    def clean(self) -> bool:
        """
        Between commands, with nothing half-sent: STARTTLS may go now.
        """
        return (
            self.mode is Mode.COMMAND
            and not self.pending
            and not self.discarding
            and not self.auth_pending
        )

    # -- sending -----------------------------------------------------------

    def send(self, data: bytes, label: str = "") -> list[Reply]:
        """
        Write C{data} in one go and read every reply it must produce.
        """
        if self.closed:
            raise RuntimeError("conversation is closed")
        assert self.sock is not None
        self.transcript.append(f"C{' ' + label if label else ''}: {_show(data)}")
        self.bytes_sent += len(data)
        first = len(self.replies)
        try:
            self.sock.settimeout(self.limits.reply_timeout)
            self.sock.sendall(data)
        except TimeoutError:
            raise ServerFaultError(
                f"hang: sending {len(data)} bytes blocked for "
                f"{self.limits.reply_timeout:.0f}s"
            ) from None
        except OSError as e:
            # The server may close mid-write after a closing reply; walking
            # through the bytes below says whether it was allowed to.
            self.transcript.append(f"(send: {e!r})")
        self._walk(data)
        if not self.closed:
            assert self.reader is not None
            stray = self.reader.stray()
            if stray == b"":
                raise ServerFaultError("connection closed without a closing reply")
            if stray is not None:
                raise ServerFaultError(f"unexpected reply data: {_show(stray)}")
        return self.replies[first:]

    def finish(self) -> None:
        """
        Bring the server back to commands and QUIT; a 221 and a close must
        follow.
        """
        for _ in range(6):
            if self.closed:
                return
            if self.mode is Mode.DATA:
                self.send(TERMINATOR, "end data")
            elif self.mode is Mode.BDAT:
                self.send(b"x" * self.bdat_left, "end chunk")
            elif self.pending or self.discarding:
                self.send(b"\r\n", "end line")
            elif self.auth_pending:
                self.send(b"*\r\n", "cancel auth")
            else:
                replies = self.send(b"QUIT\r\n")
                if not self.closed:
                    raise ServerFaultError(f"QUIT did not close: {replies[-1:]}")
        raise ServerFaultError("could not bring the session to an end")

    # -- the server's framing, mirrored -------------------------------------

    def _walk(self, data: bytes) -> None:
        self.pending += data
        while self.pending and not self.closed:
            if self.mode is Mode.DATA:
                self._walk_data()
            elif self.mode is Mode.BDAT:
                take = min(self.bdat_left, len(self.pending))
                self.pending = self.pending[take:]
                self.bdat_left -= take
                if self.bdat_left == 0:
                    self._chunk_done()
            elif self.discarding:
                end = self.pending.find(b"\n")
                if end < 0:
                    self.pending = b""
                else:
                    self.pending = self.pending[end + 1 :]
                    self.discarding = False
            elif not self._walk_line():
                break

    def _walk_line(self) -> bool:
        limit = self.limits.command_line
        end = self.pending.find(b"\n")
        if end < 0:
            if len(self.pending) > limit:
                self.pending = b""
                self._long_line(self._reply("over-long line"))
                if not self.closed:
                    self.discarding = True
            return False
        raw, self.pending = self.pending[:end], self.pending[end + 1 :]
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if len(line) > limit:
            self._long_line(self._reply("over-long line"))
            return True
        # A line of exactly the limit whose CR arrived in one packet and LF
        # in the next counts as over-long: the reply says which it was.
        self._command(line, ambiguous=len(raw) > limit)
        return True

    def _long_line(self, reply: Reply) -> None:
        self.long_lines += 1
        if self.long_lines >= self.limits.max_long_lines:
            if reply.code != 421:
                raise ServerFaultError(f"last over-long line answered with {reply}")
            self._closed_by(reply)
            return
        if reply.code == 421:
            self._closed_by(reply)
            return
        self._count(reply)

    def _command(self, line: bytes, ambiguous: bool) -> None:
        auth = self.auth_pending
        verb = None if auth else command_verb(line)
        if not auth:
            bdat = bdat_command(line)
            if bdat is not None:
                if ambiguous:
                    raise RuntimeError("fuzzer sent an ambiguous BDAT line")
                self.mode = Mode.BDAT
                self.bdat_left, self.bdat_last = bdat
                if self.bdat_left == 0:
                    self._chunk_done()
                return
        reply = self._reply(verb or "line", exempt=verb in ("EHLO", "HELO"))
        if ambiguous and reply.code == 500 and "line too long" in reply.text:
            self._long_line(reply)
            return
        self.auth_pending = reply.code == 334
        if reply.code == 334 and not (auth or verb == "AUTH"):
            raise ServerFaultError(f"334 to a {verb} line")
        if reply.code == 354:
            if auth or verb != "DATA":
                raise ServerFaultError(f"354 to a {verb} line")
            self.mode = Mode.DATA
            self.data_tail = b"\r\n"
        elif reply.code == 220:
            if verb != "STARTTLS":
                raise ServerFaultError(f"220 to a {verb} line")
            self._start_tls()
        elif reply.code == 221:
            if verb != "QUIT":
                raise ServerFaultError(f"221 to a {verb} line")
            self._closed_by(reply)
            return
        elif reply.code == 421:
            self._closed_by(reply)
            return
        self._remember(verb, reply)
        self._count(reply)

    def _remember(self, verb: str | None, reply: Reply) -> None:
        if reply.code // 100 != 2:
            return
        if verb in ("EHLO", "HELO", "RSET"):
            self.helo = self.helo or verb != "RSET"
            self.transaction = False
            self.recipients = 0
        elif verb == "MAIL":
            self.transaction = True
            self.recipients = 0
        elif verb == "RCPT":
            self.recipients += 1

    def _walk_data(self) -> None:
        stream = self.data_tail + self.pending
        end = stream.find(TERMINATOR)
        if end < 0:
            self.data_tail = stream[-4:]
            self.pending = b""
            return
        self.pending = stream[end + len(TERMINATOR) :]
        self.mode = Mode.COMMAND
        self._message_done(self._reply("end of data"))

    def _chunk_done(self) -> None:
        self.mode = Mode.COMMAND
        reply = self._reply("end of chunk")
        if reply.code == 250 and not self.bdat_last:
            self._count(reply)
            return
        self._message_done(reply)

    def _message_done(self, reply: Reply) -> None:
        if reply.code == 421:
            self._closed_by(reply)
            return
        if reply.code == 250:
            self.accepted += 1
        self.transaction = False
        self.recipients = 0
        self._count(reply)

    def _count(self, reply: Reply) -> None:
        if reply.code < 500:
            return
        self.errors += 1
        if self.errors >= self.limits.max_errors:
            closing = self._reply("error limit")
            if closing.code != 421:
                raise ServerFaultError(f"error limit reached but no 421: {closing}")
            self._closed_by(closing)

    def _closed_by(self, reply: Reply) -> None:
        assert self.reader is not None
        self.closing = reply
        self.mode = Mode.CLOSED
        self.pending = b""
        self.reader.expect_eof()
        self.transcript.append("closed by server")

    def _reply(self, context: str, exempt: bool = False) -> Reply:
        assert self.reader is not None
        try:
            reply = self.reader.read(exempt, self.limits.check_ascii)
        except EOFError:
            raise ServerFaultError(
                f"connection closed without a closing reply (awaiting {context})"
            ) from None
        except ServerFaultError as e:
            raise ServerFaultError(f"{e} (awaiting {context})") from None
        self.replies.append(reply)
        self.transcript.append(f"S: {reply}")
        return reply

    def _start_tls(self) -> None:
        assert self.sock is not None and self.reader is not None
        if self.reader.buffer:
            raise ServerFaultError(f"plaintext after 220: {_show(self.reader.buffer)}")
        if self.pending:
            self.transcript.append(f"(discarded by server: {_show(self.pending)})")
        self.pending = b""
        context = tls_context(self.verify_tls)
        self.sock.settimeout(self.limits.reply_timeout)
        try:
            tls = context.wrap_socket(self.sock, server_hostname="localhost")
        except OSError as e:
            raise ServerFaultError(f"TLS handshake failed: {e!r}") from None
        self.sock = self.reader.sock = tls
        self.tls = True
        self.tls_started += 1
        self.helo = self.transaction = False
        self.recipients = 0
        self.transcript.append(f"TLS {tls.version()} (verified: {self.verify_tls})")


def tls_context(verify: bool) -> ssl.SSLContext:
    """
    A client context that trusts the example certificate, or trusts anything.
    """
    if verify:
        return ssl.create_default_context(cafile=str(CERTIFICATE))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# -- the random session -------------------------------------------------------

_DOMAINS = ["example.org", "example.com", "sub.example.net", "EXAMPLE.org", "localhost"]
_LOCALS = ["a", "r", "user+tag", "first.last", '"quoted local"', '"a\\"b"', "x" * 64]
_BAD_ADDRESSES = [
    "noat",
    "a@",
    "@example.org",
    "a@@example.org",
    "a@[127.0.0.1",
    "a@[300.1.1.1]",
    "a@[IPv6:fe80::1%eth0]",
    "a@-bad-.example",
    "a@exa mple.org",
    '"unterminated@example.org',
    "a." * 40 + "@example.org",
    "y" * 65 + "@example.org",
    "a@" + "d" * 256,
    "a@" + "l." * 130 + "org",
    "<nested>@example.org",
    "a@example.org>",
]
_BODY_TYPES = ["7BIT", "8BITMIME", "8bitmime", "BINARYMIME", ""]
_UTF8_ADDRESSES = ["δοκιμή@παράδειγμα.δοκιμή", "用户@例子.广告", "jörg@bücher.example"]


class SessionGenerator:
    """
    Chooses each step of one session from C{rng} and the conversation state.
    """

    def __init__(self, rng: random.Random, conv: Conversation) -> None:
        self.rng = rng
        self.conv = conv
        # Some sessions are mostly polite and get deep into transactions
        # before the error limit ends them; others are mostly garbage.
        self.nasty = rng.random()

    def _case(self, verb: str) -> str:
        rng = self.rng
        choice = rng.random()
        if choice < 0.7:
            return verb
        if choice < 0.85:
            return verb.lower()
        return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in verb)

    def address(self, utf8: bool = False) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.55:
            return f"{rng.choice(_LOCALS)}@{rng.choice(_DOMAINS)}"
        if roll < 0.65:
            return rng.choice(["postmaster", "Postmaster", "a@[127.0.0.1]"])
        if roll < 0.72:
            return rng.choice(
                ["a@[IPv6:::1]", "@relay.example,@b.example:a@example.org"]
            )
        if roll < 0.8 or utf8 or rng.random() > self.nasty:
            return rng.choice(_UTF8_ADDRESSES)
        return rng.choice(_BAD_ADDRESSES)

    def mail(self) -> bytes:
        rng = self.rng
        utf8 = rng.random() < 0.15
        sender = "" if rng.random() < 0.1 else self.address(utf8)
        params = []
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3])):
            params.append(
                rng.choice(
                    [
                        f"SIZE={rng.choice([0, 1, 1000, 52428800, 52428801, 10**25])}",
                        rng.choice(["SIZE=", "SIZE=-1", "SIZE=1e3", "SIZE"]),
                        "BODY=" + rng.choice(_BODY_TYPES),
                        "SMTPUTF8",
                        "SMTPUTF8=yes",
                        f"RET={rng.choice(['FULL', 'HDRS', 'hdrs', 'BOTH'])}",
                        f"ENVID={rng.choice(['abc123', 'x+2Bvalue', 'é', '=='])}",
                        "AUTH=<>",
                        "FOO=bar",
                        "X-=1",
                        "=novalue",
                        "SIZE=10 SIZE=20",
                    ]
                )
            )
        if utf8:
            params.append("SMTPUTF8")
        colon = rng.choice(["FROM:", "FROM:", "FROM:", "from: ", "FROM ", "FROM:: "])
        path = f"<{sender}>" if rng.random() < 0.9 else sender
        return self._line(f"{self._case('MAIL')} {colon}{path} {' '.join(params)}")

    def rcpt(self) -> bytes:
        rng = self.rng
        params = []
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            params.append(
                rng.choice(
                    [
                        "NOTIFY=NEVER",
                        "NOTIFY=SUCCESS,FAILURE",
                        "NOTIFY=DELAY",
                        "NOTIFY=NEVER,SUCCESS",
                        "NOTIFY=",
                        "NOTIFY=bogus",
                        "ORCPT=rfc822;a@example.org",
                        "ORCPT=utf-8;δ@example.org",
                        "FOO=1",
                    ]
                )
            )
        colon = rng.choice(["TO:", "TO:", "TO:", "to: ", "TO "])
        path = f"<{self.address()}>" if rng.random() < 0.9 else self.address()
        return self._line(f"{self._case('RCPT')} {colon}{path} {' '.join(params)}")

    def hello(self) -> bytes:
        rng = self.rng
        verb = rng.choice(["EHLO", "EHLO", "EHLO", "HELO"])
        name = rng.choice(
            ["client.test", "[127.0.0.1]", "[IPv6:::1]", "bücher.test", "", "two words"]
        )
        return self._line(f"{self._case(verb)} {name}")

    def auth(self) -> bytes:
        rng = self.rng
        plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        wrong = base64.b64encode(f"\0{USER}\0nope".encode()).decode()
        user = base64.b64encode(USER.encode()).decode()
        return self._line(
            self._case("AUTH")
            + rng.choice(
                [
                    f" PLAIN {plain}",
                    f" PLAIN {wrong}",
                    " PLAIN",
                    " plain =",
                    " LOGIN",
                    f" LOGIN {user}",
                    " CRAM-MD5",
                    "",
                    " PLAIN !!!notbase64",
                ]
            )
        )

    def auth_response(self) -> bytes:
        rng = self.rng
        return self._line(
            rng.choice(
                [
                    base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(),
                    base64.b64encode(USER.encode()).decode(),
                    base64.b64encode(PASSWORD.encode()).decode(),
                    base64.b64encode(b"\xff\xfe").decode(),
                    "*",
                    "",
                    "!!!",
                    "dGVzdA",
                ]
            )
        )

    def simple(self) -> bytes:
        """
        One command line that cannot switch the server into another mode
        except by a reply the client reads (354, 334, 221).
        """
        rng = self.rng
        conv = self.conv
        roll = rng.random()
        if roll < 0.18 or not conv.helo and roll < 0.4:
            return self.hello()
        if roll < 0.45:
            return self.mail()
        if roll < 0.62:
            return self.rcpt()
        if roll < 0.66:
            return self._line(self._case("DATA") + rng.choice(["", "", " now"]))
        if roll < 0.7:
            return self.auth()
        if roll < 0.95 or rng.random() > self.nasty:
            return self._line(
                rng.choice(
                    [
                        "RSET",
                        "NOOP",
                        "NOOP hello",
                        "VRFY a@example.org",
                        "VRFY",
                        "HELP",
                        "HELP MAIL",
                        "EXPN list",
                        "STARTTLS now",
                        "XCLIENT ADDR=1.2.3.4",
                        "ETRN example.org",
                        "FROB",
                        "MAIL",
                        "RCPT",
                        "MAIL FROM",
                        "RCPT TO:",
                        "MAIL FROM:<",
                        "MAIL FROM:<a@example.org>junk",
                        "",
                        " ",
                        "\tNOOP",
                    ]
                )
            )
        return self.garbled()

    def garbled(self) -> bytes:
        """
        A mangled command: control bytes, invalid UTF-8, 8-bit addresses,
        bare CR or LF, absurd parameter counts.
        """
        rng = self.rng
        base = rng.choice([self.mail(), self.rcpt(), self.hello(), b"NOOP\r\n"])
        base = base.rstrip(b"\r\n")
        mutation = rng.randrange(9)
        if mutation == 0:
            at = rng.randrange(len(base) + 1)
            base = base[:at] + rng.choice([b"\0", b"\x7f", b"\x1b", b"\r"]) + base[at:]
        elif mutation == 1:
            base = base + rng.choice([b"\xff\xfe", b"\xe9", b"\xc3", b"\xed\xa0\x80"])
        elif mutation == 2:
            base = b"MAIL FROM:<j\xe9r\xf4me@example.com>"
        elif mutation == 3:
            base = b"RCPT TO:<" + "用户@例子.广告".encode() + b">"
        elif mutation == 4:
            base = base + b" " + b" ".join(b"K%d=V" % i for i in range(300))
        elif mutation == 5:
            base = base[: rng.randrange(len(base) + 1)]
        elif mutation == 6:
            base = bytes(rng.choice([b"Q", b"q", b"\x80"])) * rng.randint(1, 900)
        elif mutation == 7:
            base = b"\xef\xbb\xbf" + base  # a UTF-8 byte order mark
        ending = rng.choice([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r\r\n", b"\n\r\n"])
        return defang(base) + ending

    def long_line(self) -> bytes:
        rng = self.rng
        limit = self.conv.limits.command_line
        size = rng.choice(
            [
                rng.randint(1001, limit - 48),
                rng.randint(limit + 52, 10000),
                rng.randint(65537, 70000),
            ]
        )
        verb = rng.choice([b"NOOP ", b"MAIL FROM:<", b"", b"X"])
        filler = rng.choice([b"x", b"\xff", b"a@", b" "])
        line = (verb + filler * size)[:size]
        return line + rng.choice([b"\r\n", b"\n"])

    def raw(self) -> bytes:
        """
        Random bytes with random line breaks; the unterminated tail stays
        short so that no line sits on the length limit across two sends.
        """
        rng = self.rng
        size = rng.choice(
            [
                rng.randint(1, 64),
                rng.randint(64, 2000),
                rng.randint(2000, 16000),
                65536,
            ]
        )
        data = bytearray(rng.randbytes(size))
        for _ in range(rng.randint(0, max(1, size // 200))):
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.choice([b"\r\n", b"\n", b"\r"])
        out = defang(bytes(data))
        tail = len(out) - (out.rfind(b"\n") + 1)
        if tail + len(self.conv.pending) > 200:
            out += b"\r\n"
        return out

    def body(self) -> bytes:
        """
        Message content with dot lines, 8-bit, NUL, bare CR/LF, long lines
        and loops of Received headers now and then, never containing the end
        of data before its end.
        """
        rng = self.rng
        lines = [b"Subject: fuzz", b"From: <a@example.com>"]
        if rng.random() < 0.05:
            lines += [b"Received: from x by y; hop %d" % i for i in range(55)]
        lines.append(b"")
        for _ in range(rng.randint(0, 30)):
            lines.append(
                rng.choice(
                    [
                        b"plain text line",
                        b".",
                        b"..",
                        b".leading dot",
                        b"..two dots",
                        b"",
                        b"caf\xc3\xa9 \xe9\xff",
                        b"nul\0byte",
                        b"bare\nlf",
                        b"bare\rcr",
                        b"x" * rng.choice([997, 998, 999, 1500]),
                        b"MAIL FROM:<smuggled@example.com>",
                        b"\r\n.\n",
                        rng.randbytes(rng.randint(1, 100)),
                    ]
                )
            )
        if rng.random() < 0.03:
            lines.append(rng.randbytes(rng.randint(16000, 60000)))
        if rng.random() < 0.05:
            # Unstuffed: the first lone "." ends DATA and the rest of the
            # content is read as commands.
            return defang(b"\r\n".join(lines))
        body = b"\r\n".join(
            b"." + line if line.startswith(b".") else line for line in lines
        )
        stream = b"\r\n" + body
        while TERMINATOR in stream:
            stream = stream.replace(TERMINATOR, b"\r\n..\r\n", 1)
        return defang(stream[2:])

    def data_content(self) -> bytes:
        rng = self.rng
        body = self.body()
        roll = rng.random()
        if roll < 0.75:
            end = b".\r\n" if body.endswith(b"\r\n") else TERMINATOR
            tail = b""
            if rng.random() < 0.2:
                tail = b"".join(self.simple() for _ in range(rng.randint(1, 3)))
            return body + end + tail
        if roll < 0.85:
            return body + b"\r\n."
        if roll < 0.9:
            return TERMINATOR
        return body

    def chunk(self) -> bytes:
        rng = self.rng
        size = rng.choice([0, 1, 10, rng.randint(1, 3000)])
        content = self.body()[:size] if rng.random() < 0.7 else rng.randbytes(size)
        content = content.ljust(size, b"z")
        last = rng.random() < 0.6
        verb = self._case("BDAT")
        command = f"{verb} {size}{' LAST' if last else ''}\r\n".encode()
        roll = rng.random()
        if roll < 0.1 and size > 1:
            return command + content[: rng.randrange(size)]  # rest follows later
        return command + content

    def bad_bdat(self) -> bytes:
        return self._line(
            self.rng.choice(
                [
                    "BDAT",
                    "BDAT x",
                    "BDAT -1",
                    "BDAT 5 NOTLAST",
                    "BDAT 5 LAST more",
                    "BDAT 123456789012345678901",
                    "BDAT ５",
                ]
            )
        )

    def transaction(self) -> bytes:
        """
        MAIL, RCPTs and DATA or a BDAT chunk pipelined in one write.
        """
        rng = self.rng
        parts = []
        if not self.conv.helo:
            parts.append(b"EHLO fuzz.test\r\n")
        parts.append(b"MAIL FROM:<a@example.com>\r\n")
        for _ in range(rng.randint(1, 3)):
            parts.append(
                b"RCPT TO:<r@example.org>\r\n" if rng.random() < 0.8 else self.rcpt()
            )
        parts.append(b"DATA\r\n" if rng.random() < 0.7 else self.chunk())
        return b"".join(parts)

    def starttls(self) -> bytes:
        rng = self.rng
        before = b""
        if rng.random() < 0.3:
            before = rng.choice([b"EHLO tls.test\r\n", b"NOOP\r\n", b"RSET\r\n"])
        after = b""
        if rng.random() < 0.4:
            after = rng.choice(
                [
                    b"MAIL FROM:<evil@example.com>\r\n",
                    b"EHLO injected.test\r\nMAIL FROM:<evil@example.com>\r\n",
                    b"RSET\r\n",
                    b"\x16\x03\x01\x00\x05junk",
                    b"QUIT\r\n",
                ]
            )
        return before + self._line(self._case("STARTTLS")) + after

    def burst(self) -> bytes:
        rng = self.rng
        parts = [self.simple() for _ in range(rng.randint(2, 8))]
        roll = rng.random()
        if roll < 0.15:
            parts.append(self.chunk())
        elif roll < 0.25:
            parts.append(self.raw()[:300].replace(b"\n", b" ") + b"\r\n")
        elif roll < 0.3:
            parts.append(b"QUIT\r\n")
        return b"".join(parts)

    def flood(self) -> bytes:
        """
        Thousands of pipelined commands whose replies wait on the recipient
        check: the server holds and pauses the input while it answers them.
        """
        rng = self.rng
        count = rng.randint(1000, 7000)
        rcpt = b"RCPT TO:<r@example.org>\r\n"
        return b"MAIL FROM:<a@example.com>\r\n" + rcpt * count + b"RSET\r\n"

    # -- driving ------------------------------------------------------------

    def step(self) -> None:
        conv = self.conv
        rng = self.rng
        if conv.mode is Mode.DATA:
            conv.send(
                self.data_content() if rng.random() < 0.95 else self.raw(), "data"
            )
            return
        if conv.mode is Mode.BDAT:
            left = conv.bdat_left
            take = left if rng.random() < 0.7 else rng.randint(1, left)
            extra = self.simple() if take == left and rng.random() < 0.3 else b""
            conv.send(rng.randbytes(take) + extra, "chunk rest")
            return
        if conv.auth_pending:
            conv.send(self.auth_response(), "auth")
            return
        nasty = 2 * self.nasty
        steps: list[tuple[float, Callable[[], bytes], str]] = [
            (34, self.simple, "command"),
            (12, self.burst, "burst"),
            (10 * nasty, self.garbled, "garbled"),
            (6 * nasty, self.raw, "raw"),
            (4 * nasty, self.long_line, "long line"),
            (10, self.transaction, "transaction"),
            (5, self.chunk, "bdat"),
            (2 * nasty, self.bad_bdat, "bad bdat"),
            (3, self.auth, "auth"),
            (6, self.starttls, "starttls"),
            (0.5 if conv.limits.floods else 0, self.flood, "flood"),
            (0.5, lambda: b"QUIT\r\n", "quit"),
        ]
        weights = [w for w, _, _ in steps]
        _, make, label = rng.choices(steps, weights)[0]
        if label == "starttls" and not conv.clean:
            make, label = self.simple, "command"
        conv.send(make(), label)

    def _line(self, text: str) -> bytes:
        return text.rstrip(" ").encode("utf-8") + b"\r\n"


def defang(data: bytes) -> bytes:
    """
    Spoil STARTTLS and BDAT in random input: where they land the server
    would take a handshake or wait for a chunk the generator never planned.
    """
    return _DEFANG.sub(lambda m: b"#" + m.group(0)[1:], data)


@dataclass
class SessionResult:
    """
    What one session did and, if the server misbehaved, why it failed.
    """

    seed: int
    failure: str | None = None
    transcript: list[str] = field(default_factory=list)
    replies: int = 0
    bytes_sent: int = 0
    steps: int = 0
    closing: int | None = None
    refused: bool = False
    tls: bool = False
    accepted: int = 0

    @property
    def ok(self) -> bool:
        return self.failure is None

    def report(self, last: int = 60) -> str:
        """
        The seed, the failure and the end of the transcript, runs of the
        same line shown once with their count.
        """
        compact: list[str] = []
        count = 0
        for index, line in enumerate(self.transcript):
            count += 1
            following = self.transcript[index + 1 : index + 2]
            if following != [line]:
                compact.append(line if count == 1 else f"{line}  (x{count})")
                count = 0
        lines = [f"seed {self.seed}: {self.failure or 'ok'}"]
        if len(compact) > last:
            lines.append(f"  ... {len(compact) - last} earlier lines")
        lines += ["  " + line for line in compact[-last:]]
        return "\n".join(lines)


def run_session(
    host: str, port: int, seed: int, limits: FuzzLimits | None = None
) -> SessionResult:
    """
    One random session from C{seed} against C{host}:C{port}.
    """
    limits = limits or FuzzLimits()
    rng = random.Random(seed)
    result = SessionResult(seed)
    conv = Conversation(host, port, limits, rng.random() < 0.5, result.transcript)
    started = time.monotonic()
    try:
        if conv.connect() is None:
            result.refused = True
        else:
            generator = SessionGenerator(rng, conv)
            for _ in range(rng.randint(1, limits.max_steps)):
                if (
                    conv.closed
                    or conv.bytes_sent >= limits.max_bytes
                    or time.monotonic() - started > limits.session_seconds
                ):
                    break
                generator.step()
                result.steps += 1
            conv.finish()
    except ServerFaultError as e:
        result.failure = str(e)
    except Exception as e:
        result.failure = f"fuzzer error {e!r}: {traceback.format_exc(limit=-3)}"
    finally:
        conv.close()
    result.replies = len(conv.replies)
    result.bytes_sent = conv.bytes_sent
    result.closing = conv.closing.code if conv.closing else None
    result.tls = conv.tls_started > 0
    result.accepted = conv.accepted
    return result


@dataclass
class FuzzSummary:
    """
    The totals of a run of sessions.
    """

    results: list[SessionResult]
    elapsed: float

    @property
    def failures(self) -> list[SessionResult]:
        return [r for r in self.results if not r.ok]

    def text(self, transcripts: bool = True) -> str:
        closing = Counter(str(r.closing) for r in self.results if r.ok)
        lines = [
            f"sessions: {len(self.results)} in {self.elapsed:.1f}s",
            f"replies checked: {sum(r.replies for r in self.results)}",
            f"bytes sent: {sum(r.bytes_sent for r in self.results)}",
            f"steps: {sum(r.steps for r in self.results)}",
            f"sessions with TLS: {sum(r.tls for r in self.results)}",
            f"messages accepted: {sum(r.accepted for r in self.results)}",
            f"refused at connect: {sum(r.refused for r in self.results)}",
            "closed by: "
            + ", ".join(f"{code} x{count}" for code, count in sorted(closing.items())),
            f"failures: {len(self.failures)}",
        ]
        for result in self.failures:
            lines.append(result.report() if transcripts else f"seed {result.seed}")
        return "\n".join(lines)


def run_sessions(
    host: str,
    port: int,
    seeds: Iterable[int],
    concurrency: int = 1,
    limits: FuzzLimits | None = None,
) -> FuzzSummary:
    """
    Run a session for each seed, C{concurrency} at a time.
    """
    started = time.monotonic()
    seeds = list(seeds)
    if concurrency <= 1:
        results = [run_session(host, port, seed, limits) for seed in seeds]
    else:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(
                pool.map(lambda seed: run_session(host, port, seed, limits), seeds)
            )
    return FuzzSummary(results, time.monotonic() - started)


def session_seeds(base: int, count: int) -> list[int]:
    """
    The seeds of a run: each names its session on its own.
    """
    return [base * 1_000_000 + index for index in range(count)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.smtpfuzz",
        description="Random SMTP sessions against a gateway you run yourself.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--replay", type=int, default=None, help="one session seed")
    parser.add_argument("--max-errors", type=int, default=20)
    parser.add_argument("--command-line-length", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument(
        "--no-ascii-check", action="store_true", help="allow 8-bit reply text"
    )
    parser.add_argument(
        "--no-floods", action="store_true", help="no steps of 1000+ pipelined RCPT"
    )
    args = parser.parse_args(argv)
    limits = FuzzLimits(
        command_line=args.command_line_length,
        max_errors=args.max_errors,
        reply_timeout=args.timeout,
        check_ascii=not args.no_ascii_check,
        floods=not args.no_floods,
    )
    if args.replay is not None:
        result = run_session(args.host, args.port, args.replay, limits)
        print(result.report(last=10_000))
        return 0 if result.ok else 1
    base = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "big")
    print(f"base seed {base}: {args.host}:{args.port}", flush=True)
    summary = run_sessions(
        args.host,
        args.port,
        session_seeds(base, args.sessions),
        args.concurrency,
        limits,
    )
    print(summary.text())
    return 0 if not summary.failures else 1


if __name__ == "__main__":
    sys.exit(main())
