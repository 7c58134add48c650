# -*- test-case-name: tests.test_dsn -*-
"""
Delivery status notifications (RFC 3464): bounces, delay warnings and
success reports, sent to the envelope sender with the null reverse-path.

L{write_dsn} writes one C{multipart/report; report-type=delivery-status}
message into a file: a plain-English C{text/plain} part, the
C{message/delivery-status} part, and the original (headers only, or whole,
streamed from the spool file).  It is blocking code for a worker thread.

What is never reported (L{DsnSuppressedError}):

  - anything about a message with the null reverse-path: there is nobody
    to tell, and answering bounces with bounces is how loops start;
  - a message that is itself a delivery report (C{Content-Type:
    multipart/report; report-type=delivery-status}) or an automatic reply
    (C{Auto-Submitted: auto-replied}), even with a non-null sender.  Other
    C{Auto-Submitted} values (C{auto-generated}: mailing lists, alerts) are
    still bounced: their senders are bounce processors that need to hear
    (RFC 5321 6.1), and our report, sent from C{<>} with
    C{Auto-Submitted: auto-replied}, cannot start a loop;
  - recipients whose C{NOTIFY} parameter (RFC 3461) does not ask for it:
    C{NEVER} asks for nothing; an explicit list asks for what it names;
    no C{NOTIFY} means failures and delays.  Success (C{delivered},
    C{relayed}) is reported only to an explicit C{SUCCESS}.

Non-ASCII addresses use RFC 6533's C{utf-8} address type in its 7-bit
C{utf-8-addr-xtext} form, so the report stays plain
C{message/delivery-status}.  A message received with C{SMTPUTF8} is
returned as C{message/global} (or C{message/global-headers}), and the report
must then be relayed with C{SMTPUTF8} (L{DsnMessage.smtputf8}).

This module belongs to the mail layer: it takes any envelope shaped like
L{mdgateway.queue.spool.Envelope} (L{DsnEnvelope}) rather than importing it.
"""

from __future__ import annotations

import enum
import os
import quopri
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from email.utils import format_datetime
from io import FileIO
from typing import BinaryIO, Protocol

import attrs

from mdgateway.message.fields import get_parameter, split_parameters
from mdgateway.message.headers import decode_value, format_field, read_header_block

#: The actions a report can give a recipient (RFC 3464 2.3.3; C{expanded}
#: is not something the gateway does).
ACTIONS = ("failed", "delayed", "delivered", "relayed")
#: Without C{RET}, a failure report returns the whole original up to this
#: size and its headers beyond it; delay reports return headers.
DEFAULT_FULL_LIMIT = 1024 * 1024
#: The most of the original's header block read (and returned).
HEADER_LIMIT = 256 * 1024
#: Bytes copied at a time.
CHUNK_SIZE = 64 * 1024

_SUBJECTS = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}
_STATUS = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}")
_STATUS_CLASSES = {
    "failed": "45",
    "delayed": "4",
    "delivered": "2",
    "relayed": "2",
}
_NOTIFY_FOR = {
    "failed": "FAILURE",
    "delayed": "DELAY",
    "delivered": "SUCCESS",
    "relayed": "SUCCESS",
}
_TYPED = re.compile(r"([A-Za-z][A-Za-z0-9-]*)[ \t]*;[ \t]*(.*)", re.DOTALL)
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]{0,251}[A-Za-z0-9_])?")
_XTEXT_HEX = re.compile(rb"\+([0-9A-Fa-f]{2})")
_UNICODE_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_ID_TEXT = re.compile(r"[^A-Za-z0-9._-]")
#: RFC 6533 QCHAR: printable ASCII except "+", "=" and "\".
_QCHAR = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"+", "=", "\\"}


class SuppressReason(enum.Enum):
    """
    Why no report was written.
    """

    NULL_SENDER = "the sender is the null reverse-path"
    ORIGINAL_IS_REPORT = "the original is itself a delivery report"
    ORIGINAL_IS_AUTO_REPLY = "the original is an automatic reply"
    NOTHING_TO_REPORT = "no recipient asked for this report (NOTIFY)"


class DsnSuppressedError(Exception):
    """
    No report may be sent; the caller logs the reason and carries on as if
    it had been (the recipients are done).

    @ivar reason: why.
    """

    def __init__(self, reason: SuppressReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


def _check_action(instance: object, attribute: object, value: str) -> None:
    if value not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}: {value!r}")


def _check_status(instance: object, attribute: object, value: str) -> None:
    if not _STATUS.fullmatch(value):
        raise ValueError(f"status must look like 5.1.1: {value!r}")


@attrs.frozen
class RecipientReport:
    """
    What happened to one recipient, for the report.

    @ivar address: the recipient as relayed (the final recipient).
    @ivar action: C{failed}, C{delayed}, C{delivered} or C{relayed}.
    @ivar status: the enhanced status code, such as C{5.1.1}; its class
        must fit the action (C{failed}: 4 or 5, after a temporary failure
        expired; C{delayed}: 4; C{delivered}, C{relayed}: 2).
    @ivar original_recipient: the C{ORCPT} parameter as received (xtext,
        such as C{rfc822;bob+40example.org}); C{None} takes it from the
        envelope recipient with the same address.
    @ivar remote_mta: the host name of the server that answered, if any.
    @ivar diagnostic_code: what it said, typed: C{smtp; 550 5.1.1 user
        unknown}; text without a type is given the type C{X-Mdgateway}.
    @ivar last_attempt: when delivery was last tried (seconds since the
        epoch).
    @ivar will_retry_until: for C{delayed}: when the gateway gives up.
    """

    address: str
    action: str = attrs.field(validator=_check_action)
    status: str = attrs.field(validator=_check_status)
    original_recipient: str | None = None
    remote_mta: str | None = None
    diagnostic_code: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.status[0] not in _STATUS_CLASSES[self.action]:
            raise ValueError(f"status {self.status} does not fit {self.action}")


class DsnRecipient(Protocol):
    """
    The parts of a spool L{mdgateway.queue.spool.Recipient} a report needs.
    """

    @property
    def address(self) -> str: ...

    @property
    def parameters(self) -> Mapping[str, str | None]: ...


class DsnEnvelope(Protocol):
    """
    The parts of a spool L{mdgateway.queue.spool.Envelope} a report needs.
    """

    @property
    def queue_id(self) -> str: ...

    @property
    def received_at(self) -> float: ...

    @property
    def sender(self) -> str: ...

    @property
    def mail_parameters(self) -> Mapping[str, str | None]: ...

    @property
    def recipients(self) -> Sequence[DsnRecipient]: ...


@attrs.frozen
class DsnMessage:
    """
    A report written to a file, and the envelope to send it with.

    @ivar path: the file (CRLF lines, ready to relay as is).
    @ivar sender: the reverse-path to send it from: always C{""} (C{<>}).
    @ivar recipients: the forward-paths: the original sender.
    @ivar reported: the recipients in the report, in the given order.
    @ivar omitted: the results left out because of their C{NOTIFY}.
    @ivar kind: C{failure} (some recipient failed), C{delay} (some are
        delayed, none failed) or C{success}.
    @ivar message_id: the report's C{Message-ID}, with angle brackets.
    @ivar returned: C{full} (the whole original) or C{headers}.
    @ivar size: the file's size in bytes.
    @ivar body_8bit: send with C{BODY=8BITMIME}: the returned original is
        8-bit (declared so, or found so).
    @ivar smtputf8: send with C{SMTPUTF8}: the original sender's address or
        the returned message needs it.
    """

    path: str
    sender: str
    recipients: tuple[str, ...]
    reported: tuple[RecipientReport, ...]
    omitted: tuple[RecipientReport, ...]
    kind: str
    message_id: str
    returned: str
    size: int
    body_8bit: bool
    smtputf8: bool


# --------------------------------------------------------------------------
# Which recipients are reported


def notify_allows(parameters: Mapping[str, str | None], action: str) -> bool:
    """
    Whether a recipient's C{NOTIFY} parameter (RFC 3461 4.1) asks for a
    report with this action.

    @param parameters: the recipient's RCPT parameters.
    """
    raw = parameters.get("NOTIFY")
    wanted = _NOTIFY_FOR[action]
    if raw is None:
        return wanted != "SUCCESS"
    values = {value.strip().upper() for value in raw.split(",")}
    return wanted in values and "NEVER" not in values


def select_reported(
    envelope: DsnEnvelope, results: Iterable[RecipientReport]
) -> tuple[tuple[RecipientReport, ...], tuple[RecipientReport, ...]]:
    """
    Split results into those the report carries and those the recipient's
    C{NOTIFY} leaves out.  A result for an address not in the envelope is
    treated as having no C{NOTIFY}.

    @return: C{(reported, omitted)}, each in the given order.
    """
    parameters = {r.address: r.parameters for r in reversed(envelope.recipients)}
    reported: list[RecipientReport] = []
    omitted: list[RecipientReport] = []
    for result in results:
        allowed = notify_allows(parameters.get(result.address, {}), result.action)
        (reported if allowed else omitted).append(result)
    return tuple(reported), tuple(omitted)


# --------------------------------------------------------------------------
# Field values


def _utf8_xtext(address: str) -> str:
    """
    RFC 6533 C{utf-8-addr-xtext}: everything but QCHAR as C{\\x{HEX}}.
    """
    return "".join(c if c in _QCHAR else f"\\x{{{ord(c):02X}}}" for c in address)


def _printable(text: str) -> bool:
    return all(" " <= c <= "~" for c in text)


def _ascii_text(text: str) -> str:
    """
    Text for a report field: whitespace and controls become single spaces,
    non-ASCII becomes C{\\x{HEX}}, so a field can neither break the report's
    lines nor need an encoding.
    """
    out = []
    for c in " ".join(text.split()):
        if " " <= c <= "~":
            out.append(c)
        elif c.isprintable():
            out.append(f"\\x{{{ord(c):02X}}}")
        else:
            out.append(" ")
    return "".join(out)


def _xtext_decode(value: str) -> str | None:
    """
    Undo RFC 3461 xtext (C{+HH}); C{None} when the bytes are not UTF-8.
    """
    try:
        data = _XTEXT_HEX.sub(lambda m: bytes([int(m[1], 16)]), value.encode("utf-8"))
        return data.decode("utf-8")
    except UnicodeError:
        return None


def address_field(address: str) -> str:
    """
    An address for C{Final-Recipient}: C{rfc822; ADDRESS} when it is ASCII,
    RFC 6533 C{utf-8; utf-8-addr-xtext} otherwise.
    """
    if _printable(address) and " " not in address:
        return f"rfc822; {address}"
    return f"utf-8; {_utf8_xtext(address)}"


def original_recipient_field(orcpt: str) -> str | None:
    """
    The C{Original-Recipient} value for an C{ORCPT} parameter as received:
    its address type, then its address with the xtext undone (RFC 3464
    2.3.1).  A C{utf-8} address stays in C{utf-8-addr-xtext} form, as does
    any decoded address that is not plain printable ASCII.

    @return: the value, or C{None} when C{orcpt} has no address type.
    """
    match = _TYPED.fullmatch(orcpt.strip())
    if match is None:
        return None
    kind, value = match[1], match[2].strip()
    if kind.lower() == "utf-8":
        text = _UNICODE_ESCAPE.sub(lambda m: _chr(m[1]), value)
        return f"utf-8; {_utf8_xtext(text)}"
    decoded = _xtext_decode(value)
    if decoded is not None and _printable(decoded) and " " not in decoded:
        return f"{kind}; {decoded}"
    return f"utf-8; {_utf8_xtext(decoded if decoded is not None else value)}"


def _chr(hex_digits: str) -> str:
    point = int(hex_digits, 16)
    return chr(point) if point <= 0x10FFFF else "\ufffd"


def envelope_id_field(envid: str) -> str:
    """
    The C{Original-Envelope-Id} value for an C{ENVID} parameter as
    received: the xtext undone when that gives printable ASCII, the
    parameter as sent otherwise.
    """
    decoded = _xtext_decode(envid)
    if decoded is not None and _printable(decoded):
        return decoded.strip()
    return _ascii_text(envid)


def _typed(value: str, default_type: str) -> str:
    text = _ascii_text(value)
    if _TYPED.fullmatch(text):
        return text
    return f"{default_type}; {text}"


def _date(seconds: float) -> str:
    return format_datetime(datetime.fromtimestamp(seconds, UTC))


def _diagnostic_text(code: str) -> str:
    match = _TYPED.fullmatch(code.strip())
    return " ".join((match[2] if match else code).split())


# --------------------------------------------------------------------------
# The original's headers


@attrs.frozen
class _Original:
    block: bytes
    complete: bool
    fields: dict[bytes, bytes]


def _fields(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """
    C{(lowercased name, raw value)} for each field, until a line that is
    not a field.
    """
    name: bytes | None = None
    value = b""
    for line in block.split(b"\r\n"):
        if name is not None and line[:1] in (b" ", b"\t"):
            value += b"\r\n" + line
            continue
        if name is not None:
            yield name, value
        match = _FIELD.match(line)
        if match is None:
            return
        name, value = match[1].lower(), line[match.end() :]
    if name is not None:
        yield name, value


def _read_original(source: BinaryIO, limit: int) -> _Original:
    block, complete = read_header_block(source, limit)
    fields: dict[bytes, bytes] = {}
    for name, value in _fields(block):
        fields.setdefault(name, value)
    return _Original(block, complete, fields)


def _report_reason(original: _Original) -> SuppressReason | None:
    content_type = original.fields.get(b"content-type")
    if content_type is not None:
        main, parameters = split_parameters(decode_value(content_type))
        report_type = get_parameter(parameters, "report-type", words=False) or ""
        if (
            main.lower() == "multipart/report"
            and report_type.strip().lower() == "delivery-status"
        ):
            return SuppressReason.ORIGINAL_IS_REPORT
    auto = original.fields.get(b"auto-submitted")
    if auto is not None:
        keyword = decode_value(auto).split(";", 1)[0].strip().lower()
        if keyword == "auto-replied":
            return SuppressReason.ORIGINAL_IS_AUTO_REPLY
    return None


# --------------------------------------------------------------------------
# The report


_SECTIONS = {
    "failed": "Delivery to these recipients failed:",
    "delayed": "Delivery to these recipients is delayed:",
    "delivered": "Your message was delivered to:",
    "relayed": (
        "Your message was passed on to a mail system that does not send\n"
        "delivery reports, for:"
    ),
}


def _intro(kind: str, host: str) -> list[str]:
    lines = [f"This is the mail system at {host}.", ""]
    if kind == "failure":
        lines += [
            "I'm sorry: your message could not be delivered to one or more",
            "recipients. The mail system has given up on them; the reasons",
            "are below. The message was not delivered to them and you may",
            "need to send it again, to a corrected address.",
        ]
    elif kind == "delay":
        lines += [
            "Your message has not been delivered yet to one or more recipients.",
            "The mail system keeps trying; you will be told if it gives up.",
            "You do not need to send the message again.",
        ]
    else:
        lines += ["This is the delivery report you asked for."]
    return lines


def _human_text(
    kind: str,
    host: str,
    envelope: DsnEnvelope,
    arrival: float,
    original: _Original,
    reported: Sequence[RecipientReport],
    originals: Mapping[str, str | None],
) -> str:
    lines = _intro(kind, host)
    lines += ["", "Your message:"]
    subject = original.fields.get(b"subject")
    if subject is not None:
        lines.append(f"    Subject: {decode_value(subject)}")
    message_id = original.fields.get(b"message-id")
    if message_id is not None:
        lines.append(f"    Message-ID: {decode_value(message_id)}")
    lines.append(f"    Received: {_date(arrival)}")
    lines.append(f"    Queue ID: {envelope.queue_id}")
    for action in ACTIONS:
        group = [r for r in reported if r.action == action]
        if not group:
            continue
        lines += ["", _SECTIONS[action]]
        for result in group:
            lines += ["", f"  <{result.address}>"]
            orcpt = originals.get(result.address)
            if orcpt is not None:
                match = _TYPED.fullmatch(orcpt)
                shown = match[2] if match else orcpt
                if shown != result.address:
                    lines.append(f"    Originally addressed to: {shown}")
            lines.append(f"    Status: {result.status}")
            if result.remote_mta:
                lines.append(f"    Remote server: {_ascii_text(result.remote_mta)}")
            if result.diagnostic_code:
                reply = _diagnostic_text(result.diagnostic_code)
                lines.append(f"    What it said: {reply}")
            if result.last_attempt is not None:
                lines.append(f"    Last attempt: {_date(result.last_attempt)}")
            if result.will_retry_until is not None and action == "delayed":
                until = _date(result.will_retry_until)
                lines.append(f"    Will keep trying until: {until}")
    lines.append("")
    return "\n".join(lines)


def _text_part(text: str) -> bytes:
    lines = text.split("\n")
    if text.isascii() and all(len(line) <= 78 for line in lines):
        head = b"Content-Type: text/plain; charset=us-ascii\r\n"
        body = "\r\n".join(lines).encode("ascii")
        return head + b"Content-Transfer-Encoding: 7bit\r\n\r\n" + body
    encoded = quopri.encodestring(text.encode("utf-8")).replace(b"\n", b"\r\n")
    return (
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded
    )


def _status_part(
    host: str,
    envelope: DsnEnvelope,
    arrival: float,
    reported: Sequence[RecipientReport],
    originals: Mapping[str, str | None],
) -> bytes:
    fields = [("Reporting-MTA", f"dns; {host}")]
    envid = envelope.mail_parameters.get("ENVID")
    if envid:
        fields.append(("Original-Envelope-Id", envelope_id_field(envid)))
    if envelope.queue_id:
        fields.append(("X-Mdgateway-Queue-Id", _ascii_text(envelope.queue_id)))
    fields.append(("Arrival-Date", _date(arrival)))
    blocks = [b"".join(format_field(name, value) for name, value in fields)]
    for result in reported:
        fields = []
        orcpt = originals.get(result.address)
        if orcpt is not None:
            fields.append(("Original-Recipient", orcpt))
        fields += [
            ("Final-Recipient", address_field(result.address)),
            ("Action", result.action),
            ("Status", result.status),
        ]
        if result.remote_mta:
            fields.append(("Remote-MTA", _typed(result.remote_mta, "dns")))
        if result.diagnostic_code:
            fields.append(
                ("Diagnostic-Code", _typed(result.diagnostic_code, "X-Mdgateway"))
            )
        if result.last_attempt is not None:
            fields.append(("Last-Attempt-Date", _date(result.last_attempt)))
        if result.will_retry_until is not None and result.action == "delayed":
            fields.append(("Will-Retry-Until", _date(result.will_retry_until)))
        blocks.append(b"".join(format_field(name, value) for name, value in fields))
    return b"Content-Type: message/delivery-status\r\n\r\n" + b"\r\n".join(blocks)


def _original_recipients(
    envelope: DsnEnvelope, reported: Sequence[RecipientReport]
) -> dict[str, str | None]:
    orcpts = {
        r.address: r.parameters.get("ORCPT") for r in reversed(envelope.recipients)
    }
    fields: dict[str, str | None] = {}
    for result in reported:
        raw = result.original_recipient or orcpts.get(result.address)
        fields[result.address] = original_recipient_field(raw) if raw else None
    return fields


def _sender_field(sender: str) -> bytes:
    if any(ord(c) < 0x20 or c == "\x7f" for c in sender):
        raise ValueError(f"sender {sender!r} cannot go into a header")
    if sender.isascii():
        return format_field("To", f"<{sender}>")
    # An internationalised address goes as UTF-8 (RFC 6532): an encoded
    # word is not allowed in an address.
    return b"To: <" + sender.encode("utf-8") + b">\r\n"


def _copy(source: FileIO, output: BinaryIO) -> bool:
    """
    Copy the rest of C{source} in chunks.

    @return: whether any byte was 8-bit.
    """
    eight_bit = False
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    while True:
        count = source.readinto(buffer)
        if not count:
            return eight_bit
        chunk = view[:count]
        if not eight_bit:
            eight_bit = not (
                buffer if count == CHUNK_SIZE else chunk.tobytes()
            ).isascii()
        output.write(chunk)


def _kind(reported: Sequence[RecipientReport]) -> str:
    actions = {result.action for result in reported}
    if "failed" in actions:
        return "failure"
    if "delayed" in actions:
        return "delay"
    return "success"


def _report_head(
    host: str,
    sender: str,
    kind: str,
    now: float,
    message_id: str,
    boundary: str,
    eight_bit: bool,
) -> bytes:
    """
    The report's header block, its blank line and the preamble.
    """
    return b"".join(
        [
            format_field("From", f"Mail Delivery System <MAILER-DAEMON@{host}>"),
            _sender_field(sender),
            format_field("Subject", _SUBJECTS[kind]),
            format_field("Date", _date(now)),
            format_field("Message-ID", message_id),
            b"Auto-Submitted: auto-replied\r\n",
            b"MIME-Version: 1.0\r\n",
            b"Content-Type: multipart/report; report-type=delivery-status;\r\n",
            f' boundary="{boundary}"\r\n'.encode("ascii"),
            b"Content-Transfer-Encoding: 8bit\r\n" if eight_bit else b"",
            b"\r\nThis is a MIME-encapsulated message.\r\n",
        ]
    )


def _returned_head(full: bool, kind: str, smtputf8: bool, eight_bit: bool) -> bytes:
    """
    The header of the part returning the original, with its blank line.
    """
    if full:
        what = "Undelivered Message" if kind == "failure" else "Message"
        content_type = "message/global" if smtputf8 else "message/rfc822"
    else:
        what = "Undelivered Message Headers" if kind == "failure" else "Headers"
        content_type = "message/global-headers" if smtputf8 else "text/rfc822-headers"
    head = f"Content-Description: {what}\r\nContent-Type: {content_type}\r\n"
    if eight_bit:
        head += "Content-Transfer-Encoding: 8bit\r\n"
    return head.encode("ascii") + b"\r\n"


def write_dsn(
    path: str,
    original_path: str,
    envelope: DsnEnvelope,
    results: Iterable[RecipientReport],
    *,
    reporting_mta: str,
    now: float,
    arrival_date: float | None = None,
    full_limit: int = DEFAULT_FULL_LIMIT,
    header_limit: int = HEADER_LIMIT,
) -> DsnMessage:
    """
    Write a delivery status notification about C{original_path} into a new
    file C{path} (created exclusively, mode 0600, fsynced; removed again
    if anything fails).  Blocking: run it in a worker thread.

    The original is returned whole when the sender asked C{RET=FULL}, or
    asked nothing and this is a failure report of at most C{full_limit}
    bytes; otherwise its header block is returned.

    @param path: where to write the report.
    @param original_path: the spooled message, as received.
    @param envelope: its envelope (sender, C{RET}, C{ENVID}, recipients
        with C{NOTIFY} and C{ORCPT}).
    @param results: what happened to the recipients to report.
    @param reporting_mta: this gateway's name (C{sender_helo_domain}).
    @param now: seconds since the epoch (injected clock), for C{Date}.
    @param arrival_date: when the message arrived; the envelope's
        C{received_at} by default.
    @raise DsnSuppressedError: when no report may be sent.
    @raise ValueError: for a bad C{reporting_mta}.
    @raise OSError: when a file cannot be read or written.
    """
    if not envelope.sender:
        raise DsnSuppressedError(SuppressReason.NULL_SENDER)
    if not _HOST.fullmatch(reporting_mta):
        raise ValueError(f"reporting MTA {reporting_mta!r} is not a host name")
    arrival = envelope.received_at if arrival_date is None else arrival_date
    with open(original_path, "rb", buffering=0) as source:
        size = os.fstat(source.fileno()).st_size
        original = _read_original(source, header_limit)
        reason = _report_reason(original)
        if reason is not None:
            raise DsnSuppressedError(reason)
        reported, omitted = select_reported(envelope, results)
        if not reported:
            raise DsnSuppressedError(SuppressReason.NOTHING_TO_REPORT)
        kind = _kind(reported)
        ret = (envelope.mail_parameters.get("RET") or "").upper()
        full = ret == "FULL" or (not ret and kind == "failure" and size <= full_limit)
        smtputf8 = "SMTPUTF8" in envelope.mail_parameters
        body = (envelope.mail_parameters.get("BODY") or "").upper()
        eight_bit = smtputf8 or body == "8BITMIME" or not original.block.isascii()
        queue_part = _ID_TEXT.sub("", envelope.queue_id) or "dsn"
        message_id = f"<{queue_part}.{secrets.token_hex(8)}@{reporting_mta}>"
        boundary = f"=_{secrets.token_hex(16)}/{reporting_mta}"[:70]
        head = _report_head(
            reporting_mta, envelope.sender, kind, now, message_id, boundary, eight_bit
        )
        originals = _original_recipients(envelope, reported)
        text = _human_text(
            kind, reporting_mta, envelope, arrival, original, reported, originals
        )
        status = _status_part(reporting_mta, envelope, arrival, reported, originals)
        delimiter = f"\r\n--{boundary}\r\n".encode("ascii")

        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=CHUNK_SIZE) as output:
                output.write(head)
                output.write(delimiter)
                output.write(b"Content-Description: Notification\r\n")
                output.write(_text_part(text))
                output.write(delimiter)
                output.write(b"Content-Description: Delivery report\r\n")
                output.write(status)
                output.write(delimiter)
                output.write(_returned_head(full, kind, smtputf8, eight_bit))
                if full:
                    source.seek(0)
                    eight_bit = _copy(source, output) or eight_bit
                else:
                    output.write(original.block)
                output.write(f"\r\n--{boundary}--\r\n".encode("ascii"))
                output.flush()
                os.fsync(output.fileno())
                written = output.tell()
        except BaseException:
            with suppress(OSError):
                os.unlink(path)
            raise
    return DsnMessage(
        path=path,
        sender="",
        recipients=(envelope.sender,),
        reported=reported,
        omitted=omitted,
        kind=kind,
        message_id=message_id,
        returned="full" if full else "headers",
        size=written,
        body_8bit=eight_bit,
        smtputf8=smtputf8 or not envelope.sender.isascii(),
    )
