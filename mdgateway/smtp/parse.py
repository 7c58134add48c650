# -*- test-case-name: tests.test_smtp_parse -*-
"""
Pure parsing of SMTP command lines, addresses and ESMTP parameters.

RFC 5321 section 4.1 grammar, with RFC 6531 (SMTPUTF8) extensions. Nothing
here does I/O or knows about policy; every refusal is a L{ParseError} that
carries the exact reply to send.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

import attrs

from mdgateway.smtp.replies import Reply

#: RFC 5321 4.5.3.1: local part 64 octets, domain 255, path 256.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class ParseError(Exception):
    """
    The input is not acceptable; C{reply} says why, ready to send.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def _syntax(status: str, text: str) -> ParseError:
    return ParseError(Reply.of(501, status, text))


@attrs.frozen
class Command:
    """
    One command line: the upper-cased verb and the rest, undecoded spacing kept.
    """

    verb: str
    argument: str


def parse_command(line: bytes) -> Command:
    """
    Split a command line (without its CRLF) into verb and argument.

    Command lines are UTF-8 (RFC 6531 allows UTF-8 addresses); anything that
    does not decode is refused rather than guessed at.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError(
            Reply.of(500, "5.5.2", "Error: invalid characters in command")
        ) from None
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in text):
        raise ParseError(Reply.of(500, "5.5.2", "Error: control characters in command"))
    verb, _, argument = text.strip(" \t").partition(" ")
    if not verb.isascii() or not verb.isalpha():
        raise ParseError(Reply.of(500, "5.5.2", "Error: command not recognized"))
    return Command(verb.upper(), argument.strip(" \t"))


_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_UTF8 = r"\u0080-\U0010ffff"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_UTF8 = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"')
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_LABEL_UTF8 = rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9{_UTF8}-]*[A-Za-z0-9{_UTF8}])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DOMAIN_UTF8 = re.compile(rf"{_LABEL_UTF8}(?:\.{_LABEL_UTF8})*")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
_SOURCE_ROUTE = re.compile(rf"@{_LABEL}(?:\.{_LABEL})*(?:,@{_LABEL}(?:\.{_LABEL})*)*:")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_VALUE_UTF8 = re.compile(rf"[\x21-\x3c\x3e-\x7e{_UTF8}]+")


@attrs.frozen
class Mailbox:
    """
    A parsed mailbox (RFC 5321 C{Mailbox}).

    @ivar local_part: as written, quotes and escapes included, so relaying
        reproduces the address exactly.
    @ivar domain: the domain or address literal (with brackets), as written.
    """

    local_part: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local_part}@{self.domain}" if self.domain else self.local_part

    @property
    def is_ascii(self) -> bool:
        return self.local_part.isascii() and self.domain.isascii()

    @property
    def domain_key(self) -> str:
        """
        The domain for comparisons: case-folded, without brackets.
        """
        return self.domain.strip("[]").casefold()


def _check_domain(domain: str, utf8: bool) -> None:
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise _syntax("5.1.3", "Bad address syntax: unterminated address literal")
        literal = domain[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                if "%" in literal:
                    # ipaddress takes an RFC 4007 zone id; RFC 5321 has none.
                    raise ValueError(literal)
                ipaddress.IPv6Address(literal[5:])
            elif ":" in literal:
                if not _GENERAL_LITERAL.fullmatch(literal):
                    raise ValueError(literal)
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise _syntax("5.1.3", "Bad address syntax: bad address literal") from None
        return
    pattern = _DOMAIN_UTF8 if utf8 else _DOMAIN
    if not pattern.fullmatch(domain):
        raise _syntax("5.1.3", "Bad address syntax: invalid domain")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise _syntax("5.1.3", "Bad address syntax: domain too long")


def parse_mailbox(text: str, utf8: bool) -> Mailbox:
    """
    Parse C{local@domain}. Non-ASCII is allowed only when C{utf8} is set
    (the client said SMTPUTF8 on MAIL).
    """
    if not utf8 and not text.isascii():
        raise ParseError(Reply.of(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"))
    if text.startswith('"'):
        match = (_QUOTED_UTF8 if utf8 else _QUOTED).match(text)
    else:
        match = (_DOT_STRING_UTF8 if utf8 else _DOT_STRING).match(text)
    if match is None or text[match.end() : match.end() + 1] != "@":
        raise _syntax("5.1.3", "Bad address syntax")
    local = match.group(0)
    domain = text[match.end() + 1 :]
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise _syntax("5.1.3", "Bad address syntax: local part too long")
    _check_domain(domain, utf8)
    return Mailbox(local, domain)


def _split_path(argument: str, prefix: str) -> tuple[str, str]:
    """
    Split C{"FROM:<path> params"} into the path text and the parameter text.

    A space after the colon and a missing pair of angle brackets are both
    tolerated, as Postfix does, because real senders produce them.
    """
    if argument[: len(prefix)].upper() != prefix:
        raise _syntax("5.5.4", f"Syntax: expected {prefix}<address>")
    rest = argument[len(prefix) :].lstrip(" ")
    if rest.startswith("<"):
        end = _find_path_end(rest)
        if end < 0:
            raise _syntax(
                "5.1.7" if prefix == "FROM:" else "5.1.3", "Bad address syntax"
            )
        path, params = rest[1:end], rest[end + 1 :]
        if params and not params.startswith(" "):
            raise _syntax("5.5.4", "Syntax: garbage after address")
    else:
        path, _, params = rest.partition(" ")
    if len(path.encode("utf-8")) + 2 > MAX_PATH:
        raise _syntax("5.1.3", "Bad address syntax: path too long")
    return path, params.strip(" ")


def _find_path_end(text: str) -> int:
    """
    Index of the C{>} closing the path, skipping any inside a quoted string
    or an address literal (whose dcontent may hold C{>} and C{"}).
    """
    quoted = False
    escaped = False
    literal = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif literal:
            literal = char != "]"
        elif char == "[" and not quoted:
            literal = True
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def parse_parameters(text: str, utf8_values: bool = False) -> dict[str, str | None]:
    """
    Parse C{KEY=VALUE KEY2} into an upper-cased keyword map.
    """
    params: dict[str, str | None] = {}
    for word in text.split():
        keyword, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(keyword):
            raise _syntax("5.5.4", f"Bad parameter syntax: {word[:40]!a}")
        if eq and not (_VALUE_UTF8 if utf8_values else _VALUE).fullmatch(value):
            raise _syntax("5.5.4", f"Bad parameter value for {keyword.upper()}")
        key = keyword.upper()
        if key in params:
            raise _syntax("5.5.4", f"Duplicate parameter {key}")
        params[key] = value if eq else None
    return params


@attrs.frozen
class MailFrom:
    """
    A parsed C{MAIL FROM}: the reverse-path (L{None} for C{<>}) and parameters.
    """

    sender: Mailbox | None
    size: int | None
    body: str | None
    smtputf8: bool
    parameters: Mapping[str, str | None]

    @property
    def sender_text(self) -> str:
        return "" if self.sender is None else str(self.sender)


@attrs.frozen
class RcptTo:
    """
    A parsed C{RCPT TO}: the forward-path and its parameters.
    """

    recipient: Mailbox
    parameters: Mapping[str, str | None]


_MAIL_PARAMETERS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"})
_RCPT_PARAMETERS = frozenset({"NOTIFY", "ORCPT"})


def _unsupported(params: Mapping[str, str | None], known: frozenset[str]) -> None:
    for key in params:
        if key not in known:
            raise ParseError(Reply.of(555, "5.5.4", f"Unsupported parameter {key}"))


def parse_mail_from(argument: str) -> MailFrom:
    """
    Parse the argument of C{MAIL}: C{FROM:<path> [SIZE=n] [BODY=...] ...}.
    """
    path, param_text = _split_path(argument, "FROM:")
    params = parse_parameters(param_text)
    _unsupported(params, _MAIL_PARAMETERS)
    smtputf8 = "SMTPUTF8" in params
    if smtputf8 and params["SMTPUTF8"] is not None:
        raise _syntax("5.5.4", "SMTPUTF8 takes no value")
    size = None
    if "SIZE" in params:
        raw = params["SIZE"] or ""
        if not raw.isdigit() or len(raw) > 20:
            raise _syntax("5.5.4", "Bad SIZE parameter")
        size = int(raw)
    body = None
    if "BODY" in params:
        body = (params["BODY"] or "").upper()
        if body not in ("7BIT", "8BITMIME"):
            raise _syntax("5.5.4", "BODY must be 7BIT or 8BITMIME")
    if "RET" in params and (params["RET"] or "").upper() not in ("FULL", "HDRS"):
        raise _syntax("5.5.4", "RET must be FULL or HDRS")
    path = _strip_source_route(path)
    sender = None if path == "" else _mailbox_or(path, smtputf8, "5.1.7")
    return MailFrom(sender, size, body, smtputf8, params)


def parse_rcpt_to(argument: str, smtputf8: bool) -> RcptTo:
    """
    Parse the argument of C{RCPT}: C{TO:<path> [NOTIFY=...] [ORCPT=...]}.

    C{<Postmaster>} without a domain is accepted, as RFC 5321 4.5.1 demands.
    """
    path, param_text = _split_path(argument, "TO:")
    params = parse_parameters(param_text, utf8_values=smtputf8)
    _unsupported(params, _RCPT_PARAMETERS)
    if "NOTIFY" in params:
        notify = {v.strip().upper() for v in (params["NOTIFY"] or "").split(",")}
        valid = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
        if not notify <= valid or ("NEVER" in notify and len(notify) > 1):
            raise _syntax("5.5.4", "Bad NOTIFY parameter")
    path = _strip_source_route(path)
    if path.isascii() and path.lower() == "postmaster":
        return RcptTo(Mailbox(path, ""), params)
    if path == "":
        raise _syntax("5.1.3", "Bad recipient address syntax")
    return RcptTo(_mailbox_or(path, smtputf8, "5.1.3"), params)


def _strip_source_route(path: str) -> str:
    # RFC 5321 4.1.1.3: source routes must be accepted and should be ignored.
    match = _SOURCE_ROUTE.match(path)
    return path[match.end() :] if match else path


def _mailbox_or(path: str, utf8: bool, status: str) -> Mailbox:
    try:
        return parse_mailbox(path, utf8)
    except ParseError as e:
        if e.reply.code == 501 and e.reply.status != status:
            raise ParseError(Reply(501, status, e.reply.lines)) from None
        raise


def parse_bdat(argument: str) -> tuple[int, bool]:
    """
    Parse C{BDAT <size> [LAST]} (RFC 3030).
    """
    words = argument.split()
    size = words[0] if words else ""
    if len(words) > 2 or not (size.isascii() and size.isdigit()) or len(size) > 20:
        raise _syntax("5.5.4", "Syntax: BDAT <size> [LAST]")
    if len(words) == 2 and words[1].upper() != "LAST":
        raise _syntax("5.5.4", "Syntax: BDAT <size> [LAST]")
    return int(words[0]), len(words) == 2
