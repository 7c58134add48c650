# -*- test-case-name: tests.test_tenants -*-
"""
The end-of-DATA half of Office 365 tenant binding: watch the header block
as a message streams into the spool, then decide whether every tenant-bound
rule that took a recipient admits it.

The session has one reply to DATA (or BDAT LAST) for all recipients, so a
message is refused as a whole when any bound rule among its recipients'
rules refuses it. Accepting it for some recipients only would need a silent
drop or a bounce to a sender that may be forged; and a message that fails
the binding of one rule was not sent by the tenant that rule trusts, so it
is suspect for every recipient.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

import attrs

from mdgateway.policy.rules import IPAddress, Rule
from mdgateway.policy.tenants import (
    MAX_VALUE,
    OUTSIDE,
    TENANT_HEADER,
    TenantVerdict,
    judge,
)
from mdgateway.smtp.replies import Reply

#: The most of one header line kept while looking for a field name.
_LINE_PREFIX = MAX_VALUE + 128
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_NAME = re.compile(rb"([!-9;-~]+)[ \t]*")


class HeaderFieldWatch:
    """
    Collect the values of some top-level header fields from message content
    fed in arbitrary pieces, without a limit on the header block's size and
    with bounded memory (at most L{_LINE_PREFIX} bytes of a line, and
    C{MAX_VALUE + 1} bytes of a value: longer ones are cut, which is enough
    to tell they are too long).

    Strict on purpose: it counts every field that any reader could take for
    a watched one. Names are compared case-insensitively, white space before
    the colon (RFC 5322's obsolete syntax) is allowed, and the block runs to
    the first empty line: a line that is neither a field nor a continuation
    is skipped, not taken as the start of the body, so a field after it is
    still counted (parsers that stop there see a subset of these fields).
    """

    def __init__(self, names: Iterable[str]) -> None:
        self._values: dict[bytes, list[bytes]] = {
            name.lower().encode("ascii"): [] for name in names
        }
        self.complete = False
        self._line = bytearray()
        self._cut = False
        self._open: tuple[bytes, bytearray] | None = None

    def feed(self, data: bytes) -> None:
        """
        The next piece of the message, from its first byte on.
        """
        start = 0
        while not self.complete:
            end = data.find(b"\n", start)
            if end < 0:
                self._take(data[start:])
                return
            self._take(data[start : end + 1])
            self._end_line()
            start = end + 1

    def close(self) -> None:
        """
        The message ended (BDAT content need not end with CRLF).
        """
        if not self.complete and (self._line or self._cut):
            self._end_line()
        self._end_block()

    def get(self, name: str) -> list[bytes]:
        """
        The unfolded values of the field C{name} seen so far, in order (a
        field is complete once the next line starts another one).
        """
        return list(self._values.get(name.lower().encode("ascii"), []))

    def _take(self, piece: bytes) -> None:
        room = _LINE_PREFIX - len(self._line)
        if len(piece) > room:
            self._cut = True
        if room > 0:
            self._line += piece[:room]

    def _end_line(self) -> None:
        line, cut = bytes(self._line), self._cut
        self._line = bytearray()
        self._cut = False
        text = line.rstrip(b"\r\n")
        if not cut and not text:
            self._end_block()
            return
        if line[:1] in (b" ", b"\t"):
            if self._open is not None:
                self._extend(self._open[1], text, cut)
            return
        self._end_field()
        match = _FIELD.match(line)
        if match is not None:
            name, value = match.group(1).lower(), text[match.end() :]
        else:
            # Not a field; unless the kept part of an over-long line is a
            # name and white space whose colon was cut off.
            match = _NAME.fullmatch(line) if cut else None
            if match is None:
                return
            name, value = match.group(1).lower(), b""
        if name in self._values:
            self._open = (name, bytearray())
            self._extend(self._open[1], value, cut)

    def _extend(self, value: bytearray, text: bytes, cut: bool) -> None:
        value += text
        if cut:
            # The line went on past what was kept: too long to be valid.
            value += b"\x00" * (MAX_VALUE + 1)
        del value[MAX_VALUE + 1 :]

    def _end_field(self) -> None:
        if self._open is not None:
            name, value = self._open
            self._values[name].append(bytes(value))
            self._open = None

    def _end_block(self) -> None:
        self._end_field()
        self.complete = True


@attrs.frozen
class TenantRefusal:
    """
    Why a message was refused: the rule whose binding it failed, and the
    verdict.
    """

    rule: Rule
    verdict: TenantVerdict

    @property
    def reply(self) -> Reply:
        return Reply.of(
            550,
            "5.7.1",
            f"Not from an allowed Office 365 tenant: {self.verdict.describe()}",
            category="tenant",
        )


def bound_rules(bindings: Iterable[object]) -> tuple[Rule, ...]:
    """
    The distinct tenant-bound rules among recipients' bindings, in order.
    """
    rules: dict[str, Rule] = {}
    for binding in bindings:
        if isinstance(binding, Rule) and binding.tenant_ids:
            rules.setdefault(binding.name, binding)
    return tuple(rules.values())


class TenantGate:
    """
    The tenant check of one message: fed its content as it streams in,
    asked once at the end.
    """

    def __init__(self, rules: Sequence[Rule], client: str) -> None:
        """
        @param rules: the tenant-bound rules that took recipients (see
            L{bound_rules}); at least one.
        @param client: the previous hop's address.
        """
        self.rules = tuple(rules)
        self.client = client
        self.watch = HeaderFieldWatch([TENANT_HEADER])

    @classmethod
    def for_message(cls, bindings: Iterable[object], client: str) -> TenantGate | None:
        """
        The gate for a message whose recipients have these bindings, or
        L{None} when no bound rule took any of them.
        """
        rules = bound_rules(bindings)
        return cls(rules, client) if rules else None

    def feed(self, data: bytes) -> None:
        if not self.watch.complete:
            self.watch.feed(data)

    def refusal(self) -> TenantRefusal | None:
        """
        The end of the message: L{None} when every bound rule admits it,
        else the first rule that does not and why.
        """
        self.watch.close()
        values = self.watch.get(TENANT_HEADER)
        address = _address(self.client)
        for rule in self.rules:
            if address is None or not rule.from_client(address):
                return TenantRefusal(rule, TenantVerdict(OUTSIDE))
            verdict = judge(rule.tenant_ids, values)
            if not verdict.ok:
                return TenantRefusal(rule, verdict)
        return None


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
