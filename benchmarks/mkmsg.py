# -*- test-case-name: tests.test_faults_short -*-
"""
Benchmark messages: plain text, or text with a base64 attachment, of an
exact size, deterministic for a seed so reruns send the same bytes.

    python3 benchmarks/mkmsg.py text 10240 text.eml
    python3 benchmarks/mkmsg.py attach 1048576 attach.eml

Files written by the command line end their lines in LF, the form
C{smtp-source -F} wants (it adds the CR itself; a CR already there would
reach the gateway as a bare CR, which it refuses). L{wire} turns a message
into what an SMTP client sends after C{DATA}.
"""

from __future__ import annotations

import argparse
import base64
import random
import sys
from pathlib import Path

KINDS = ("text", "attach")

#: Words for the text parts: ordinary business prose, no digits, so no
#: part can look like a card number to the emulator's DLP check.
_VOCABULARY = (
    "the quarterly figures are attached for review before our meeting on "
    "thursday please confirm the delivery schedule and the revised invoice "
    "totals we expect the shipment to arrive early next week regards from "
    "the accounts team with thanks for your patience and prompt reply"
).split()

_BOUNDARY = "mdgw-bench-boundary-7f3a"


def _prose(rng: random.Random, size: int) -> str:
    """
    About C{size} bytes of text in lines of at most 72 characters.
    """
    lines: list[str] = []
    total = 0
    while total < size:
        words: list[str] = []
        length = 0
        while length < 60:
            word = rng.choice(_VOCABULARY)
            words.append(word)
            length += len(word) + 1
        line = " ".join(words)[:72]
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines) + "\n"


def _headers(kind: str, size: int, extra: dict[str, str]) -> str:
    fields = {
        "From": "Bench Sender <bench@example.com>",
        "To": "Bench Recipient <user@example.com>",
        "Subject": f"mdgateway benchmark: {kind}, {size} bytes",
        "Date": "Mon, 30 Nov 2026 09:00:00 +0000",
        "Message-ID": f"<bench-{kind}-{size}@bench.test>",
        "MIME-Version": "1.0",
    }
    fields.update(extra)
    return "".join(f"{name}: {value}\n" for name, value in fields.items())


def text_message(
    size: int, seed: int = 1, headers: dict[str, str] | None = None
) -> bytes:
    """
    A C{text/plain} message of C{size} bytes (LF line ends).
    """
    head = _headers("text", size, headers or {}) + (
        "Content-Type: text/plain; charset=us-ascii\n"
        "Content-Transfer-Encoding: 7bit\n\n"
    )
    body = _prose(random.Random(seed), max(0, size - len(head)))
    return _exact(head + body, size).encode("ascii")


def attach_message(
    size: int, seed: int = 1, headers: dict[str, str] | None = None
) -> bytes:
    """
    A C{multipart/mixed} message of about C{size} bytes (LF line ends): a
    short text part and a random binary attachment in base64 (76-character
    lines), so the gateway decodes and scans two parts.
    """
    rng = random.Random(seed)
    head = _headers("attach", size, headers or {}) + (
        f'Content-Type: multipart/mixed; boundary="{_BOUNDARY}"\n\n'
        "A message with an attachment.\n\n"
    )
    text = (
        f"--{_BOUNDARY}\nContent-Type: text/plain; charset=us-ascii\n"
        "Content-Transfer-Encoding: 7bit\n\n" + _prose(rng, 1200) + "\n"
    )
    attachment_head = (
        f"--{_BOUNDARY}\nContent-Type: application/octet-stream; "
        'name="figures.bin"\nContent-Transfer-Encoding: base64\n'
        'Content-Disposition: attachment; filename="figures.bin"\n\n'
    )
    tail = f"\n--{_BOUNDARY}--\n"
    room = size - len(head) - len(text) - len(attachment_head) - len(tail)
    # Each 57 raw bytes become one 76-character line plus its LF.
    raw = rng.randbytes(max(57, room // 77 * 57))
    encoded = base64.encodebytes(raw).decode("ascii").rstrip("\n")
    return (head + text + attachment_head + encoded + tail).encode("ascii")


def _exact(text: str, size: int) -> str:
    """
    C{text} cut to C{size} bytes at a line end, or padded with one more
    line, so the message is exactly C{size} bytes long and ends in LF.
    """
    if len(text) >= size:
        return text[: size - 1] + "\n"
    missing = size - len(text)
    return text + "y" * (missing - 1) + "\n" if missing > 1 else text + "\n"


def make(
    kind: str, size: int, seed: int = 1, headers: dict[str, str] | None = None
) -> bytes:
    """
    A message of C{kind} (C{text} or C{attach}).
    """
    if kind == "text":
        return text_message(size, seed, headers)
    if kind == "attach":
        return attach_message(size, seed, headers)
    raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")


def wire(message: bytes) -> bytes:
    """
    The DATA payload of C{message}: CRLF line ends, dot-stuffed, with the
    terminating C{.} line.
    """
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(stuffed) + b"\r\n.\r\n"


def write(kind: str, size: int, path: Path, seed: int = 1) -> Path:
    """
    Write a message with LF line ends for C{smtp-source -F}.
    """
    path.write_bytes(make(kind, size, seed))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("size", type=int, help="bytes, as written (LF line ends)")
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    write(args.kind, args.size, args.output, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
