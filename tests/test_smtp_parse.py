"""
Tests for L{mdgateway.smtp.parse}: command lines, mailboxes and ESMTP
parameters (RFC 5321 section 4.1, RFC 6531), by example and by property.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from functools import partial
from random import Random

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.smtp.parse import (
    Command,
    Mailbox,
    ParseError,
    parse_bdat,
    parse_command,
    parse_mail_from,
    parse_mailbox,
    parse_parameters,
    parse_rcpt_to,
)

PROPERTY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# -- strategies ------------------------------------------------------------

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
#: RFC 5321 qtextSMTP: %d32-33 / %d35-91 / %d93-126.
QTEXT = "".join(chr(c) for c in range(32, 127) if c not in (34, 92))
#: RFC 5321 quoted-pairSMTP takes any of %d32-126 after the backslash.
QUOTABLE = "".join(chr(c) for c in range(32, 127))
#: RFC 5321 dcontent: %d33-90 / %d94-126, less C{"} and C{>}, which the path
#: splitter mistakes for a quote or the end of the path (see
#: L{ParseMailFromTests.test_general_literal_with_quote_or_bracket}).
DCONTENT = "".join(chr(c) for c in range(33, 127) if c not in (34, 62, 91, 92, 93))
#: RFC 5321 esmtp-value: %d33-60 / %d62-126.
ESMTP_VALUE = "".join(chr(c) for c in range(33, 127) if c != 61)
ALNUM = string.ascii_letters + string.digits
#: Non-ASCII characters as they arrive from a decoded UTF-8 line.
NON_ASCII = st.characters(min_codepoint=0x80, exclude_categories=["Cs"])


def _atoms(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(
        st.text(alphabet, min_size=1, max_size=8), min_size=1, max_size=4
    ).map(".".join)


def _labels(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    alnum = st.sampled_from(ALNUM) | alphabet
    middle = st.text(alnum | st.just("-"), max_size=6)
    label = st.one_of(
        alnum,
        st.tuples(alnum, middle, alnum).map("".join),
    )
    return st.lists(label, min_size=1, max_size=4).map(".".join)


quoted_local = st.lists(
    st.sampled_from(QTEXT) | st.sampled_from(QUOTABLE).map(lambda c: "\\" + c),
    max_size=12,
).map(lambda parts: '"' + "".join(parts) + '"')
ascii_local = _atoms(st.sampled_from(ATEXT)) | quoted_local
ascii_domain = _labels(st.sampled_from(ALNUM))
ipv4_literal = st.ip_addresses(v=4).map(lambda a: f"[{a}]")
ipv6_literal = st.ip_addresses(v=6).flatmap(
    lambda a: st.sampled_from([f"[IPv6:{a}]", f"[IPv6:{a.exploded}]", f"[ipv6:{a}]"])
)
general_literal = st.tuples(
    st.tuples(st.text(st.sampled_from(ALNUM + "-"), max_size=5), st.sampled_from(ALNUM))
    .map("".join)
    .filter(lambda tag: tag.casefold() != "ipv6"),
    st.text(st.sampled_from(DCONTENT), min_size=1, max_size=12),
).map(lambda parts: f"[{parts[0]}:{parts[1]}]")
any_domain = ascii_domain | ipv4_literal | ipv6_literal | general_literal


def _fits(parts: tuple[str, str]) -> bool:
    local, domain = parts
    return len(local.encode()) <= 64 and len(f"{local}@{domain}".encode()) + 2 <= 256


def _addresses(
    local: st.SearchStrategy[str], domain: st.SearchStrategy[str]
) -> st.SearchStrategy[str]:
    return st.tuples(local, domain).filter(_fits).map("@".join)


ascii_addresses = _addresses(ascii_local, any_domain)
utf8_local = _atoms(st.sampled_from(ATEXT) | NON_ASCII) | quoted_local
utf8_addresses = _addresses(utf8_local, _labels(NON_ASCII) | any_domain)

STATUS = re.compile(r"5\.[0-9]{1,3}\.[0-9]{1,3}")


class _RefusalAssertions(SynchronousTestCase):
    """
    Assertions about the reply a L{ParseError} carries.
    """

    def assertRefused(
        self, call: Callable[[], object], code: int, status: str
    ) -> ParseError:
        """
        C{call} raises L{ParseError} with exactly this code and status.
        """
        with self.assertRaises(ParseError) as caught:
            call()
        self.assertEqual(
            (caught.exception.reply.code, caught.exception.reply.status), (code, status)
        )
        return caught.exception

    def assertWellFormedRefusal(self, error: ParseError) -> None:
        """
        A refusal is permanent and has an RFC 3463 class-5 status code.
        """
        self.assertTrue(500 <= error.reply.code <= 599, error.reply)
        self.assertRegex(error.reply.status, STATUS)


# -- parse_command ---------------------------------------------------------


class ParseCommandTests(_RefusalAssertions):
    """
    L{parse_command} splits a line into an upper-cased verb and its argument.
    """

    def test_verb_upper_cased_argument_kept(self) -> None:
        """
        The verb is upper-cased; the argument keeps its case and inner spacing.
        """
        self.assertEqual(
            parse_command(b"mail From:<A@b.example>  SIZE=10"),
            Command("MAIL", "From:<A@b.example>  SIZE=10"),
        )

    def test_outer_whitespace_stripped(self) -> None:
        """
        Spaces and tabs around the line and between verb and argument go.
        """
        self.assertEqual(
            parse_command(b" \tRcpt   TO:<a@b.example> \t"),
            Command("RCPT", "TO:<a@b.example>"),
        )

    def test_no_argument(self) -> None:
        """
        A bare verb has an empty argument.
        """
        self.assertEqual(parse_command(b"quit"), Command("QUIT", ""))

    def test_utf8_argument(self) -> None:
        """
        A UTF-8 argument (RFC 6531) is decoded, not refused.
        """
        line = "MAIL FROM:<jürgen@bücher.example> SMTPUTF8".encode()
        self.assertEqual(
            parse_command(line).argument, "FROM:<jürgen@bücher.example> SMTPUTF8"
        )

    def test_tab_in_argument_allowed(self) -> None:
        """
        A tab is whitespace, not a control character to refuse.
        """
        self.assertEqual(parse_command(b"NOOP a\tb").argument, "a\tb")

    def test_invalid_utf8_refused(self) -> None:
        """
        Bytes that are not UTF-8 get 500 5.5.2 instead of being guessed at.
        """
        for line in (b"MAIL FROM:<\xff@b.example>", b"\xc3", b"NOOP \xed\xa0\x80"):
            self.assertRefused(partial(parse_command, line), 500, "5.5.2")

    def test_control_characters_refused(self) -> None:
        """
        NUL, ESC, DEL, and a stray CR or LF inside a line get 500 5.5.2.
        """
        for control in (b"\x00", b"\x1b", b"\x7f", b"\r", b"\n", b"\x0b"):
            line = b"NOOP a" + control + b"b"
            self.assertRefused(partial(parse_command, line), 500, "5.5.2")

    def test_bad_verbs_refused(self) -> None:
        """
        An empty line, a verb with digits or punctuation, and a non-ASCII verb
        are all refused with 500 5.5.2.
        """
        for line in (b"", b"   ", b"HEL0 x", b"MAIL:FROM", "M\u00c4IL x".encode()):
            self.assertRefused(partial(parse_command, line), 500, "5.5.2")

    @PROPERTY
    @given(st.binary(max_size=80))
    def test_arbitrary_bytes_only_parse_errors(self, line: bytes) -> None:
        """
        Any bytes give a L{Command} or a well-formed 5xx L{ParseError}.
        """
        try:
            command = parse_command(line)
        except ParseError as e:
            self.assertWellFormedRefusal(e)
        else:
            self.assertTrue(command.verb.isascii() and command.verb.isupper())

    @PROPERTY
    @given(
        st.text(string.ascii_letters, min_size=1, max_size=10),
        st.text(
            st.characters(exclude_categories=["Cs", "Cc"], exclude_characters="\x7f"),
            max_size=40,
        ).map(lambda s: s.strip(" \t")),
    )
    def test_verb_and_argument_round_trip(self, verb: str, argument: str) -> None:
        """
        C{VERB SP argument}, encoded as UTF-8, parses back to the upper-cased
        verb and the same argument.
        """
        line = f"{verb} {argument}".encode()
        self.assertEqual(parse_command(line), Command(verb.upper(), argument))


# -- parse_mailbox ---------------------------------------------------------


class ParseMailboxTests(_RefusalAssertions):
    """
    L{parse_mailbox} accepts the RFC 5321 C{Mailbox} grammar and keeps the
    address exactly as written.
    """

    def test_dot_atom(self) -> None:
        """
        A dot-atom local part and a domain are split at the C{@}.
        """
        self.assertEqual(
            parse_mailbox("first.last+tag@mail.Example.COM", False),
            Mailbox("first.last+tag", "mail.Example.COM"),
        )

    def test_bad_dot_atoms_refused(self) -> None:
        """
        Empty atoms (leading, trailing or doubled dots), a missing local part
        or domain and a missing C{@} are 501 5.1.3.
        """
        for text in (
            "a..b@example.com",
            ".a@example.com",
            "a.@example.com",
            "@example.com",
            "a@",
            "a",
            "a b@example.com",
            "a@b@example.com",
            "a(comment)@example.com",
        ):
            self.assertRefused(partial(parse_mailbox, text, False), 501, "5.1.3")

    def test_quoted_local_part_with_escapes(self) -> None:
        """
        A quoted local part may hold spaces, C{@} and escaped quotes and
        backslashes; it is kept with its quotes and escapes.
        """
        text = r'"john \"jr\" doe\\ @home"@example.com'
        mailbox = parse_mailbox(text, False)
        self.assertEqual(mailbox.local_part, r'"john \"jr\" doe\\ @home"')
        self.assertEqual(str(mailbox), text)

    def test_bad_quoted_local_parts_refused(self) -> None:
        """
        An unterminated quote, an unescaped quote inside, text after the
        closing quote and an escape of a control character are 501 5.1.3.
        """
        for text in (
            '"abc@example.com',
            '"a"b"@example.com',
            '"ab"c@example.com',
            '"a\\"@example.com',
            '"a\tb"@example.com',
            '"a\\\x01"@example.com',
        ):
            self.assertRefused(partial(parse_mailbox, text, False), 501, "5.1.3")

    def test_address_literals(self) -> None:
        """
        IPv4, IPv6 (tag in any case) and general address literals are accepted
        and kept with their brackets; C{domain_key} drops the brackets.
        """
        for domain in (
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "[ipv6:::ffff:192.0.2.1]",
            "[IPv6:2001:0db8:0000:0000:0000:0000:0000:0001]",
            "[x-tag:some!content]",
        ):
            mailbox = parse_mailbox(f"user@{domain}", False)
            self.assertEqual(mailbox.domain, domain)
            self.assertEqual(mailbox.domain_key, domain[1:-1].casefold())

    def test_bad_address_literals_refused(self) -> None:
        """
        Malformed address literals are 501 5.1.3.
        """
        for domain in (
            "[192.0.2.1",
            "[300.1.1.1]",
            "[192.0.2]",
            "[192.0.2.1.5]",
            "[]",
            "[IPv6:2001:db8::g]",
            "[IPv6:192.0.2.1]",
            "[tag:]",
            "[tag:a[b]",
            "[tag:a\\b]",
            "[tag:a b]",
        ):
            self.assertRefused(
                partial(parse_mailbox, f"user@{domain}", False), 501, "5.1.3"
            )

    def test_ipv6_literal_zone_id_refused(self) -> None:
        """
        An IPv6 address literal may not carry a zone id: RFC 5321 has no
        grammar for it, and its free text could hold spaces or brackets.
        """
        for domain in ("[IPv6:fe80::1%eth0]", "[IPv6:::1%a b]", "[IPv6:::1%x]y]"):
            self.assertRefused(
                partial(parse_mailbox, f"user@{domain}", False), 501, "5.1.3"
            )

    def test_bad_domains_refused(self) -> None:
        """
        Labels that start or end with a hyphen, empty labels and a trailing
        dot are 501 5.1.3.
        """
        for domain in ("-a.example", "a-.example", "a..example", "example.", "a_b.c"):
            self.assertRefused(
                partial(parse_mailbox, f"user@{domain}", False), 501, "5.1.3"
            )

    def test_utf8_needs_smtputf8(self) -> None:
        """
        Non-ASCII in the local part or the domain is 553 5.6.7 unless the
        transaction is SMTPUTF8, and accepted when it is.
        """
        for text in ("jürgen@example.com", "user@bücher.example", '"ü"@example.com'):
            self.assertRefused(partial(parse_mailbox, text, False), 553, "5.6.7")
            mailbox = parse_mailbox(text, True)
            self.assertEqual(str(mailbox), text)
            self.assertFalse(mailbox.is_ascii)

    def test_ascii_mailbox_is_ascii(self) -> None:
        """
        An all-ASCII mailbox says so.
        """
        self.assertTrue(parse_mailbox("a@b.example", True).is_ascii)

    def test_local_part_length_limit(self) -> None:
        """
        A local part of 64 octets is accepted, 65 is 501 5.1.3; UTF-8 counts
        octets, not characters.
        """
        parse_mailbox("a" * 64 + "@example.com", False)
        self.assertRefused(
            lambda: parse_mailbox("a" * 65 + "@example.com", False), 501, "5.1.3"
        )
        parse_mailbox("é" * 32 + "@example.com", True)
        self.assertRefused(
            lambda: parse_mailbox("é" * 32 + "a@example.com", True), 501, "5.1.3"
        )
        parse_mailbox('"' + "a" * 62 + '"@example.com', False)
        self.assertRefused(
            lambda: parse_mailbox('"' + "a" * 63 + '"@example.com', False),
            501,
            "5.1.3",
        )

    def test_domain_length_limit(self) -> None:
        """
        A domain of 255 octets is accepted, 256 is 501 5.1.3.
        """
        domain = ".".join(["a" * 63] * 4)
        self.assertEqual(len(domain), 255)
        self.assertEqual(parse_mailbox(f"u@{domain}", False).domain, domain)
        self.assertRefused(lambda: parse_mailbox(f"u@{domain}a", False), 501, "5.1.3")
        self.assertRefused(lambda: parse_mailbox("u@" + "é" * 128, True), 501, "5.1.3")

    def test_domain_key(self) -> None:
        """
        C{domain_key} is case-folded for comparisons; C{str} keeps the case.
        """
        mailbox = parse_mailbox("User@Example.COM", False)
        self.assertEqual(mailbox.domain_key, "example.com")
        self.assertEqual(str(mailbox), "User@Example.COM")

    @PROPERTY
    @given(ascii_addresses)
    def test_ascii_address_round_trips(self, address: str) -> None:
        """
        Any generated ASCII address (dot-atoms or quoted local parts; domains
        or IPv4, IPv6 and general literals) parses, with or without SMTPUTF8,
        and C{str} of the mailbox gives the input back.
        """
        for utf8 in (False, True):
            mailbox = parse_mailbox(address, utf8)
            self.assertEqual(str(mailbox), address)
            self.assertTrue(mailbox.is_ascii)

    @PROPERTY
    @given(utf8_addresses)
    def test_utf8_address_round_trips(self, address: str) -> None:
        """
        Any generated address with UTF-8 atoms or labels round-trips under
        SMTPUTF8 and, if it is not ASCII, is 553 5.6.7 without it.
        """
        self.assertEqual(str(parse_mailbox(address, True)), address)
        if not address.isascii():
            self.assertRefused(lambda: parse_mailbox(address, False), 553, "5.6.7")


# -- parse_mail_from -------------------------------------------------------


class ParseMailFromTests(_RefusalAssertions):
    """
    L{parse_mail_from} parses the reverse-path and the MAIL parameters.
    """

    def test_plain(self) -> None:
        """
        A bare reverse-path has no parameters.
        """
        mail = parse_mail_from("FROM:<a@b.example>")
        self.assertEqual(mail.sender, Mailbox("a", "b.example"))
        self.assertEqual(
            (mail.size, mail.body, mail.smtputf8, dict(mail.parameters)),
            (None, None, False, {}),
        )

    def test_null_sender(self) -> None:
        """
        C{<>} is the null reverse-path: no sender, empty text.
        """
        mail = parse_mail_from("FROM:<> SIZE=10")
        self.assertIsNone(mail.sender)
        self.assertEqual(mail.sender_text, "")
        self.assertEqual(mail.size, 10)

    def test_prefix_case_insensitive(self) -> None:
        """
        C{from:} is as good as C{FROM:}.
        """
        self.assertEqual(
            parse_mail_from("from:<a@b.example>").sender_text, "a@b.example"
        )

    def test_space_after_colon_tolerated(self) -> None:
        """
        C{FROM: <addr>} is accepted, as real senders produce it.
        """
        self.assertEqual(
            parse_mail_from("FROM: <a@b.example> BODY=8BITMIME").sender_text,
            "a@b.example",
        )

    def test_missing_brackets_tolerated(self) -> None:
        """
        C{FROM:addr} without angle brackets is accepted, parameters too.
        """
        mail = parse_mail_from("FROM:a@b.example SIZE=99")
        self.assertEqual((mail.sender_text, mail.size), ("a@b.example", 99))

    def test_source_route_stripped(self) -> None:
        """
        A source route (RFC 5321 4.1.1.3) is accepted and dropped.
        """
        for path in (
            "@relay.example:a@b.example",
            "@r1.example,@r2.example:a@b.example",
        ):
            self.assertEqual(
                parse_mail_from(f"FROM:<{path}>").sender, Mailbox("a", "b.example")
            )

    def test_quoted_angle_bracket(self) -> None:
        """
        A C{>} inside a quoted local part does not end the path.
        """
        mail = parse_mail_from('FROM:<"a>b"@c.example> SIZE=1')
        self.assertEqual((mail.sender_text, mail.size), ('"a>b"@c.example', 1))

    def test_general_literal_with_quote_or_bracket(self) -> None:
        """
        RFC 5321 dcontent includes C{>} and C{"}; inside a general address
        literal they neither end the path nor start a quoted string.
        """
        for address in ("a@[x-tag:>]", 'a@[x-tag:"]', '"q"@[x-tag:a>"b]'):
            self.assertEqual(parse_mail_from(f"FROM:<{address}>").sender_text, address)

    def test_size(self) -> None:
        """
        SIZE is an integer of up to 20 digits.
        """
        self.assertEqual(parse_mail_from("FROM:<> SIZE=0").size, 0)
        self.assertEqual(parse_mail_from("FROM:<> size=" + "9" * 20).size, 10**20 - 1)

    def test_bad_size_refused(self) -> None:
        """
        SIZE without a value, with a sign, non-digits or more than 20 digits is
        501 5.5.4.
        """
        for param in (
            "SIZE",
            "SIZE=",
            "SIZE=-1",
            "SIZE=+1",
            "SIZE=1k",
            "SIZE=" + "1" * 21,
        ):
            self.assertRefused(
                partial(parse_mail_from, f"FROM:<> {param}"), 501, "5.5.4"
            )

    def test_body(self) -> None:
        """
        BODY=7BIT and BODY=8BITMIME are accepted in any case and upper-cased.
        """
        self.assertEqual(parse_mail_from("FROM:<> BODY=7bit").body, "7BIT")
        self.assertEqual(parse_mail_from("FROM:<> body=8BitMime").body, "8BITMIME")

    def test_bad_body_refused(self) -> None:
        """
        BINARYMIME (we do not offer it), an unknown value or no value is
        501 5.5.4.
        """
        for param in ("BODY=BINARYMIME", "BODY=8BIT", "BODY"):
            self.assertRefused(
                partial(parse_mail_from, f"FROM:<> {param}"), 501, "5.5.4"
            )

    def test_smtputf8(self) -> None:
        """
        SMTPUTF8 takes no value and allows a UTF-8 reverse-path.
        """
        mail = parse_mail_from("FROM:<jürgen@bücher.example> SMTPUTF8")
        self.assertTrue(mail.smtputf8)
        self.assertEqual(mail.sender_text, "jürgen@bücher.example")
        self.assertRefused(
            lambda: parse_mail_from("FROM:<a@b.example> SMTPUTF8=yes"), 501, "5.5.4"
        )

    def test_utf8_sender_without_smtputf8(self) -> None:
        """
        A UTF-8 reverse-path without SMTPUTF8 is 553 5.6.7.
        """
        self.assertRefused(
            lambda: parse_mail_from("FROM:<jürgen@example.com>"), 553, "5.6.7"
        )

    def test_ret_envid_auth(self) -> None:
        """
        RET (FULL or HDRS), ENVID and AUTH are kept among the parameters.
        """
        mail = parse_mail_from("FROM:<a@b.example> RET=hdrs ENVID=QQ314159 AUTH=<>")
        self.assertEqual(
            dict(mail.parameters), {"RET": "hdrs", "ENVID": "QQ314159", "AUTH": "<>"}
        )
        self.assertRefused(lambda: parse_mail_from("FROM:<> RET=ALL"), 501, "5.5.4")

    def test_unknown_parameter(self) -> None:
        """
        A parameter we did not advertise is 555 5.5.4.
        """
        for param in ("XFOO=1", "NOTIFY=NEVER", "MT-PRIORITY=3"):
            self.assertRefused(
                partial(parse_mail_from, f"FROM:<> {param}"), 555, "5.5.4"
            )

    def test_duplicate_parameter(self) -> None:
        """
        The same parameter twice (in any case) is 501 5.5.4.
        """
        self.assertRefused(
            lambda: parse_mail_from("FROM:<> SIZE=1 size=2"), 501, "5.5.4"
        )

    def test_bad_parameter_syntax(self) -> None:
        """
        A keyword starting with a hyphen, an empty value or a value with C{=}
        is 501 5.5.4.
        """
        for param in ("-X=1", "ENVID=", "ENVID=a=b", "=1"):
            self.assertRefused(
                partial(parse_mail_from, f"FROM:<> {param}"), 501, "5.5.4"
            )

    def test_wrong_prefix(self) -> None:
        """
        Anything but C{FROM:} is 501 5.5.4.
        """
        for argument in ("TO:<a@b.example>", "FROM <a@b.example>", "", "FRO:<>"):
            self.assertRefused(partial(parse_mail_from, argument), 501, "5.5.4")

    def test_bad_path(self) -> None:
        """
        An unterminated path or a bad sender is 501 5.1.7; text glued to the
        closing bracket is 501 5.5.4.
        """
        self.assertRefused(lambda: parse_mail_from("FROM:<a@b.example"), 501, "5.1.7")
        self.assertRefused(
            lambda: parse_mail_from("FROM:<a..b@c.example>"), 501, "5.1.7"
        )
        self.assertRefused(lambda: parse_mail_from("FROM:<a@-b.example>"), 501, "5.1.7")
        self.assertRefused(
            lambda: parse_mail_from("FROM:<a@b.example>SIZE=1"), 501, "5.5.4"
        )

    def test_path_length_limit(self) -> None:
        """
        A path of 256 octets, brackets included, is accepted; 257 is
        501 5.1.3.
        """
        address = "a" * 64 + "@" + ".".join(["b" * 63, "c" * 63, "d" * 61])
        self.assertEqual(len(address) + 2, 256)
        self.assertEqual(parse_mail_from(f"FROM:<{address}>").sender_text, address)
        self.assertRefused(lambda: parse_mail_from(f"FROM:<{address}d>"), 501, "5.1.3")

    @PROPERTY
    @given(ascii_addresses)
    def test_address_round_trips(self, address: str) -> None:
        """
        C{FROM:<addr>} gives the generated address back as the sender.
        """
        self.assertEqual(parse_mail_from(f"FROM:<{address}>").sender_text, address)

    @PROPERTY
    @given(utf8_addresses)
    def test_utf8_address_round_trips(self, address: str) -> None:
        """
        C{FROM:<addr> SMTPUTF8} gives a generated UTF-8 address back.
        """
        mail = parse_mail_from(f"FROM:<{address}> SMTPUTF8")
        self.assertEqual(mail.sender_text, address)

    @PROPERTY
    @given(
        st.one_of(st.just(""), ascii_addresses),
        st.none() | st.integers(0, 10**20 - 1),
        st.none() | st.sampled_from(["7BIT", "8bitmime", "8BITMIME", "7bit"]),
        st.booleans(),
        st.none() | st.sampled_from(["FULL", "HDRS", "hdrs"]),
        st.none() | st.text(st.sampled_from(ESMTP_VALUE), min_size=1, max_size=20),
        st.none() | st.text(st.sampled_from(ESMTP_VALUE), min_size=1, max_size=20),
        st.randoms(use_true_random=False),
    )
    def test_parameters_round_trip(
        self,
        address: str,
        size: int | None,
        body: str | None,
        smtputf8: bool,
        ret: str | None,
        envid: str | None,
        auth: str | None,
        rng: Random,
    ) -> None:
        """
        Every combination of the supported MAIL parameters, in any order and
        keyword case, is parsed into the right fields and kept as given.
        """
        words = {
            "SIZE": None if size is None else f"SIZE={size}",
            "BODY": None if body is None else f"Body={body}",
            "SMTPUTF8": "smtputf8" if smtputf8 else None,
            "RET": None if ret is None else f"RET={ret}",
            "ENVID": None if envid is None else f"envid={envid}",
            "AUTH": None if auth is None else f"AUTH={auth}",
        }
        present = [w for w in words.values() if w is not None]
        rng.shuffle(present)
        mail = parse_mail_from(" ".join([f"FROM:<{address}>", *present]))
        self.assertEqual(mail.sender_text, address)
        self.assertEqual(mail.size, size)
        self.assertEqual(mail.body, None if body is None else body.upper())
        self.assertEqual(mail.smtputf8, smtputf8)
        expected = {
            key: word.partition("=")[2] if "=" in word else None
            for key, word in words.items()
            if word is not None
        }
        self.assertEqual(dict(mail.parameters), expected)


# -- parse_rcpt_to ---------------------------------------------------------


class ParseRcptToTests(_RefusalAssertions):
    """
    L{parse_rcpt_to} parses the forward-path and the RCPT parameters.
    """

    def test_plain(self) -> None:
        """
        A forward-path with no parameters.
        """
        rcpt = parse_rcpt_to("TO:<r@b.example>", False)
        self.assertEqual(
            (rcpt.recipient, dict(rcpt.parameters)), (Mailbox("r", "b.example"), {})
        )

    def test_postmaster_without_domain(self) -> None:
        """
        C{<Postmaster>} with no domain is accepted in any case (RFC 5321
        4.5.1) and kept as written.
        """
        for path in ("Postmaster", "postmaster", "POSTMASTER"):
            rcpt = parse_rcpt_to(f"TO:<{path}>", False)
            self.assertEqual(rcpt.recipient, Mailbox(path, ""))
            self.assertEqual(str(rcpt.recipient), path)

    def test_other_local_part_without_domain_refused(self) -> None:
        """
        Only Postmaster may go without a domain; the null path is no recipient.
        """
        for path in ("<abuse>", "<>", "<postmaster.x>"):
            self.assertRefused(
                partial(parse_rcpt_to, f"TO:{path}", False), 501, "5.1.3"
            )

    def test_postmaster_lookalike_needs_smtputf8(self) -> None:
        """
        A non-ASCII path that merely case-folds to "postmaster" is not the
        Postmaster special case: without SMTPUTF8 it is 553 5.6.7.
        """
        for path in ("postma\u017fter", "po\ufb06master"):
            self.assertRefused(
                partial(parse_rcpt_to, f"TO:<{path}>", False), 553, "5.6.7"
            )

    def test_notify(self) -> None:
        """
        NOTIFY takes NEVER alone or any of SUCCESS, FAILURE and DELAY, in any
        case.
        """
        for value in ("NEVER", "never", "SUCCESS", "success,failure,DELAY", "DELAY"):
            rcpt = parse_rcpt_to(f"TO:<r@b.example> NOTIFY={value}", False)
            self.assertEqual(rcpt.parameters["NOTIFY"], value)

    def test_bad_notify_refused(self) -> None:
        """
        NEVER combined with anything else, an unknown keyword, an empty item
        or no value is 501 5.5.4.
        """
        for param in (
            "NOTIFY=NEVER,SUCCESS",
            "NOTIFY=SOMETIMES",
            "NOTIFY=SUCCESS,",
            "NOTIFY",
        ):
            self.assertRefused(
                partial(parse_rcpt_to, f"TO:<r@b.example> {param}", False),
                501,
                "5.5.4",
            )

    def test_orcpt(self) -> None:
        """
        ORCPT is kept as given.
        """
        rcpt = parse_rcpt_to("TO:<r@b.example> ORCPT=rfc822;r+2B@b.example", False)
        self.assertEqual(rcpt.parameters, {"ORCPT": "rfc822;r+2B@b.example"})

    def test_utf8_orcpt_needs_smtputf8(self) -> None:
        """
        A UTF-8 ORCPT value is accepted only in an SMTPUTF8 transaction.
        """
        argument = "TO:<r@b.example> ORCPT=utf-8;jürgen@b.example"
        self.assertEqual(
            parse_rcpt_to(argument, True).parameters["ORCPT"], "utf-8;jürgen@b.example"
        )
        self.assertRefused(lambda: parse_rcpt_to(argument, False), 501, "5.5.4")

    def test_utf8_recipient(self) -> None:
        """
        A UTF-8 recipient is accepted under SMTPUTF8 and 553 5.6.7 otherwise.
        """
        self.assertEqual(
            str(parse_rcpt_to("TO:<ü@b.example>", True).recipient), "ü@b.example"
        )
        self.assertRefused(
            lambda: parse_rcpt_to("TO:<ü@b.example>", False), 553, "5.6.7"
        )

    def test_mail_parameter_on_rcpt(self) -> None:
        """
        A MAIL-only parameter on RCPT is 555 5.5.4.
        """
        self.assertRefused(
            lambda: parse_rcpt_to("TO:<r@b.example> SIZE=1", False), 555, "5.5.4"
        )

    def test_bad_recipient(self) -> None:
        """
        Bad forward-paths are 501 5.1.3, and a wrong prefix 501 5.5.4.
        """
        self.assertRefused(lambda: parse_rcpt_to("TO:<r..x@b>", False), 501, "5.1.3")
        self.assertRefused(lambda: parse_rcpt_to("TO:<r@b", False), 501, "5.1.3")
        self.assertRefused(lambda: parse_rcpt_to("FROM:<r@b>", False), 501, "5.5.4")

    def test_tolerated_forms(self) -> None:
        """
        A space after the colon, missing brackets and a source route are
        tolerated on RCPT as on MAIL.
        """
        for argument in (
            "TO: <r@b.example>",
            "to:r@b.example",
            "TO:<@relay.example:r@b.example>",
        ):
            self.assertEqual(
                str(parse_rcpt_to(argument, False).recipient), "r@b.example"
            )

    @PROPERTY
    @given(ascii_addresses)
    def test_address_round_trips(self, address: str) -> None:
        """
        C{TO:<addr>} gives the generated address back as the recipient.
        """
        rcpt = parse_rcpt_to(f"TO:<{address}> NOTIFY=NEVER", False)
        self.assertEqual(str(rcpt.recipient), address)


# -- parse_parameters and parse_bdat ---------------------------------------


keywords = st.tuples(
    st.sampled_from(ALNUM), st.text(st.sampled_from(ALNUM + "-"), max_size=10)
).map("".join)
values = st.none() | st.text(st.sampled_from(ESMTP_VALUE), min_size=1, max_size=20)


class ParseParametersTests(_RefusalAssertions):
    """
    L{parse_parameters} turns C{KEY=VALUE} words into an upper-cased map.
    """

    @PROPERTY
    @given(
        st.dictionaries(keywords, values, max_size=6).filter(
            lambda d: len({k.upper() for k in d}) == len(d)
        ),
        st.sampled_from([" ", "  ", "\t"]),
    )
    def test_round_trip(self, params: dict[str, str | None], separator: str) -> None:
        """
        Any set of distinct keywords with or without values parses back with
        the keywords upper-cased and the values as given.
        """
        text = separator.join(k if v is None else f"{k}={v}" for k, v in params.items())
        self.assertEqual(
            parse_parameters(text), {k.upper(): v for k, v in params.items()}
        )

    @PROPERTY
    @given(st.dictionaries(keywords, values, min_size=1, max_size=4))
    def test_duplicate_refused(self, params: dict[str, str | None]) -> None:
        """
        Repeating any keyword, in another case, is 501 5.5.4.
        """
        text = " ".join(k if v is None else f"{k}={v}" for k, v in params.items())
        first = next(iter(params))
        self.assertRefused(
            lambda: parse_parameters(f"{text} {first.swapcase()}=1"), 501, "5.5.4"
        )

    def test_utf8_values(self) -> None:
        """
        Non-ASCII values are allowed only when asked for.
        """
        self.assertEqual(parse_parameters("X=é", utf8_values=True), {"X": "é"})
        self.assertRefused(lambda: parse_parameters("X=é"), 501, "5.5.4")
        self.assertRefused(
            lambda: parse_parameters("é=1", utf8_values=True), 501, "5.5.4"
        )


class ParseBdatTests(_RefusalAssertions):
    """
    L{parse_bdat} parses C{BDAT <size> [LAST]} (RFC 3030).
    """

    def test_valid(self) -> None:
        """
        A size, optionally followed by LAST in any case.
        """
        self.assertEqual(parse_bdat("100"), (100, False))
        self.assertEqual(parse_bdat("0 LAST"), (0, True))
        self.assertEqual(parse_bdat(" 7  last "), (7, True))
        self.assertEqual(parse_bdat("9" * 20), (10**20 - 1, False))

    def test_invalid(self) -> None:
        """
        No size, a signed or non-numeric or over-long size, or anything but
        LAST after it is 501 5.5.4.
        """
        for argument in ("", "LAST", "-1", "+1", "1k", "1 FIRST", "1 LAST x", "1" * 21):
            self.assertRefused(partial(parse_bdat, argument), 501, "5.5.4")

    def test_non_ascii_digits_refused(self) -> None:
        """
        Only ASCII digits make a chunk size; anything else is 501 5.5.4, never
        an exception other than L{ParseError}.
        """
        for argument in ("\u00b2", "\u0661\u0660 LAST", "\uff11"):
            self.assertRefused(partial(parse_bdat, argument), 501, "5.5.4")

    @PROPERTY
    @given(st.integers(0, 10**20 - 1), st.sampled_from(["", " LAST", " last"]))
    def test_round_trip(self, size: int, last: str) -> None:
        """
        Any size and flag round-trips.
        """
        self.assertEqual(parse_bdat(f"{size}{last}"), (size, bool(last)))


# -- robustness ------------------------------------------------------------

#: Pieces that steer random text into the interesting corners of the grammar.
_FRAGMENTS = st.sampled_from(
    [
        "FROM:", "TO:", "<", ">", "<>", "@", '"', "\\", ".", " ", ":", ",",
        "[", "]", "IPv6:", "=", "SIZE=", "BODY=", "NOTIFY=", "ORCPT=", "RET=",
        "SMTPUTF8", "postmaster", "@r.example:", "a", "é", "1", "-", "%",
    ]
)  # fmt: skip
fuzz_text = st.text(max_size=60) | st.lists(_FRAGMENTS, max_size=20).map("".join)


class RobustnessTests(_RefusalAssertions):
    """
    Whatever the client sends, parsing ends in a result or a 5xx
    L{ParseError} with an enhanced status code, never another exception.
    """

    @PROPERTY
    @given(fuzz_text, st.booleans())
    def test_arbitrary_text(self, text: str, utf8: bool) -> None:
        """
        L{parse_mailbox}, L{parse_mail_from}, L{parse_rcpt_to} and
        L{parse_parameters} raise only well-formed L{ParseError}s.
        """
        calls: list[Callable[[], object]] = [
            lambda: parse_mailbox(text, utf8),
            lambda: parse_mail_from(text),
            lambda: parse_mail_from("FROM:" + text),
            lambda: parse_rcpt_to(text, utf8),
            lambda: parse_rcpt_to("TO:" + text, utf8),
            lambda: parse_parameters(text, utf8),
        ]
        for call in calls:
            try:
                call()
            except ParseError as e:
                self.assertWellFormedRefusal(e)

    @PROPERTY
    @given(st.text(st.characters(max_codepoint=127), max_size=30))
    def test_arbitrary_ascii_bdat(self, text: str) -> None:
        """
        L{parse_bdat} on any ASCII text raises only well-formed
        L{ParseError}s. (Non-ASCII: see L{ParseBdatTests}.)
        """
        try:
            parse_bdat(text)
        except ParseError as e:
            self.assertWellFormedRefusal(e)

    @PROPERTY
    @given(fuzz_text)
    def test_parsed_sender_is_valid(self, text: str) -> None:
        """
        Whatever MAIL accepts, its sender text parses again as a mailbox to the
        same value, so a relay never emits a path it could not read itself.
        """
        assume(text.isascii())
        try:
            mail = parse_mail_from("FROM:" + text)
        except ParseError:
            return
        if mail.sender is not None:
            self.assertEqual(parse_mailbox(str(mail.sender), False), mail.sender)
