"""
Tests for Office 365 tenant binding: L{mdgateway.policy.tenants} (tenant
ids, the header verdict), its C{tenant_ids} configuration, and
L{mdgateway.receive.tenant} (the streaming header watch and the
end-of-DATA gate).
"""

from __future__ import annotations

import tomllib
from ipaddress import ip_network

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.policy.parse import parse_policy
from mdgateway.policy.profiles import CoreProfile, CoreServer, RelayServer, SmtpProfile
from mdgateway.policy.rules import Rule
from mdgateway.policy.tenants import (
    CONSUMER_TENANT,
    FOREIGN,
    MALFORMED,
    MISSING,
    NIL_TENANT,
    OK,
    OUTSIDE,
    REPEATED,
    judge,
    parse_tenant_id,
)
from mdgateway.receive.tenant import HeaderFieldWatch, TenantGate, bound_rules
from mdgateway.smtp.categories import categorize
from mdgateway.tomlreader import Problems, Section

OURS = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
SISTER = "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d"
OTHER = "6ec0bd7f-11c0-43da-975e-2a8ad9ebae0b"
EXO = "40.107.22.5"

CORE = CoreProfile("local", (CoreServer("http://127.0.0.1:8008"),))
RELAY = SmtpProfile("mail", (RelayServer("smtp", "10.0.0.9"),))


def rule(name: str, tenants: tuple[str, ...] = (), networks: str = "40.107.0.0/16"):
    return Rule(
        name=name,
        core_profile=CORE,
        relay_profile=RELAY,
        client_networks=(ip_network(networks),),
        tenant_ids=tenants,
    )


def header(value: str, name: str = "X-MS-Exchange-CrossTenant-Id") -> bytes:
    return f"{name}: {value}\r\n".encode()


def message(*fields: bytes, body: bytes = b"body\r\n") -> bytes:
    return b"From: a@example.com\r\n" + b"".join(fields) + b"\r\n" + body


# -- tenant ids and the verdict -------------------------------------------------


class TenantIdTests(SynchronousTestCase):
    """
    L{parse_tenant_id}: only the 8-4-4-4-12 GUID form, never the nil or the
    consumer tenant.
    """

    def test_guid_any_case(self) -> None:
        """
        A GUID in any case, with surrounding spaces, is taken in lower case.
        """
        self.assertEqual(parse_tenant_id(f"  {OURS.upper()} "), OURS)

    def test_malformed_refused(self) -> None:
        """
        Braces, URNs, missing or extra digits, non-hex and empty strings are
        refused with a message showing the expected form.
        """
        for text in (
            "{" + OURS + "}",
            "urn:uuid:" + OURS,
            OURS[:-1],
            OURS + "0",
            OURS.replace("-", ""),
            OURS.replace("f", "g"),
            "",
            "example.onmicrosoft.com",
        ):
            with self.assertRaises(ValueError) as caught:
                parse_tenant_id(text)
            self.assertIn("not a tenant id", str(caught.exception))

    def test_nil_and_consumer_refused(self) -> None:
        """
        The nil GUID and the consumer Outlook.com tenant are refused, in any
        case, with the reason.
        """
        with self.assertRaises(ValueError) as caught:
            parse_tenant_id(NIL_TENANT)
        self.assertIn("nil GUID", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            parse_tenant_id(CONSUMER_TENANT.upper())
        self.assertIn("consumer Outlook.com", str(caught.exception))


class JudgeTests(SynchronousTestCase):
    """
    L{judge}: exactly one well-formed header naming an allowed tenant.
    """

    def test_ours_passes(self) -> None:
        """
        One header with an allowed id passes, whatever its case and the
        white space around it; any of several allowed ids will do.
        """
        self.assertEqual(judge((OURS,), [OURS.encode()]).cause, OK)
        self.assertEqual(judge((OURS,), [f"\t{OURS.upper()}  ".encode()]).cause, OK)
        verdict = judge((OURS, SISTER), [SISTER.encode()])
        self.assertEqual((verdict.cause, verdict.tenant), (OK, SISTER))

    def test_missing(self) -> None:
        """
        No header at all is refused.
        """
        self.assertEqual(judge((OURS,), []).cause, MISSING)

    def test_repeated_even_when_identical(self) -> None:
        """
        Two headers are refused, even when both name our tenant: Exchange
        stamps one, so the other came from the sender.
        """
        self.assertEqual(judge((OURS,), [OURS.encode()] * 2).cause, REPEATED)
        self.assertEqual(
            judge((OURS,), [OURS.encode(), OTHER.encode()]).cause, REPEATED
        )

    def test_malformed(self) -> None:
        """
        Anything but one bare GUID is malformed: two ids in one field,
        braces, encoded words, truncation, an over-long value.
        """
        for value in (
            f"{OURS} {OURS}",
            f"{OURS},{OTHER}",
            "{" + OURS + "}",
            "=?utf-8?q?" + OURS + "?=",
            OURS[:-1],
            "",
            OURS + " " + "x" * 300,
        ):
            self.assertEqual(judge((OURS,), [value.encode()]).cause, MALFORMED, value)

    def test_foreign(self) -> None:
        """
        Another tenant's id is refused, and the id is kept for the log.
        """
        verdict = judge((OURS,), [OTHER.encode()])
        self.assertEqual((verdict.cause, verdict.tenant), (FOREIGN, OTHER))
        self.assertFalse(verdict.ok)
        self.assertEqual(
            verdict.describe(), "X-MS-Exchange-CrossTenant-Id names another tenant"
        )


# -- configuration ----------------------------------------------------------------

PROFILES = """
[profiles.core.local]
servers = ["http://127.0.0.1:8008"]
[profiles.smtp.mail]
servers = ["smtp://10.0.0.9:25"]
"""


def load(rule_text: str) -> tuple[list[Rule], list[str]]:
    problems = Problems()
    text = PROFILES + "[[rules]]\n" + rule_text
    policy = parse_policy(Section(tomllib.loads(text), "", problems), [("0.0.0.0", 25)])
    return list(policy.rules), problems.lines


BASE = """
name = "outbound"
core_profile = "local"
relay_profile = "mail"
client_networks = ["40.107.0.0/16", "2a01:111:f403::/48"]
"""


class ConfigTests(SynchronousTestCase):
    """
    C{tenant_ids} in a rule: checked when the configuration loads, each
    problem naming its key.
    """

    def test_several_ids(self) -> None:
        """
        Several ids are kept, in lower case and in order.
        """
        rules, lines = load(BASE + f'tenant_ids = ["{OURS.upper()}", "{SISTER}"]\n')
        self.assertEqual(lines, [])
        self.assertEqual(rules[0].tenant_ids, (OURS, SISTER))

    def test_absent_means_unbound(self) -> None:
        """
        Without the key a rule is not bound.
        """
        rules, lines = load(BASE)
        self.assertEqual((lines, rules[0].tenant_ids), ([], ()))

    def test_each_bad_id_named(self) -> None:
        """
        A malformed id, the nil GUID, the consumer tenant, a duplicate and a
        non-string each give one problem at their index.
        """
        _, lines = load(
            BASE + f'tenant_ids = ["{OURS}", "nope", "{NIL_TENANT}", '
            f'"{CONSUMER_TENANT}", "{OURS.upper()}", 7]\n'
        )
        self.assertEqual(
            [line.split(":")[0] for line in lines],
            [
                "rules[0].tenant_ids[5]",
                "rules[0].tenant_ids[1]",
                "rules[0].tenant_ids[2]",
                "rules[0].tenant_ids[3]",
                "rules[0].tenant_ids[4]",
            ],
        )
        self.assertIn("not a tenant id: 'nope'", lines[1])
        self.assertIn("nil GUID", lines[2])
        self.assertIn("consumer Outlook.com", lines[3])
        self.assertIn("listed twice", lines[4])

    def test_empty_list_refused(self) -> None:
        """
        An empty list is refused rather than read as "not bound".
        """
        _, lines = load(BASE + "tenant_ids = []\n")
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].startswith("rules[0].tenant_ids: needs at least one"))

    def test_needs_client_networks(self) -> None:
        """
        A bound rule without client_networks, or with networks covering
        every address, is refused: the header would then be trusted from
        anyone.
        """
        for networks in ("", 'client_networks = ["0.0.0.0/0"]\n'):
            _, lines = load(
                'name = "r"\ncore_profile = "local"\nrelay_profile = "mail"\n'
                'recipients = ["example.com"]\n'
                + networks
                + f'tenant_ids = ["{OURS}"]\n'
            )
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(
                lines[0].startswith("rules[0].tenant_ids: needs client_networks")
            )

    def test_not_a_list(self) -> None:
        """
        A string instead of a list is a type problem at the key.
        """
        _, lines = load(BASE + f'tenant_ids = "{OURS}"\n')
        self.assertEqual(
            lines, ["rules[0].tenant_ids: expected an array, got a string"]
        )


# -- the header watch ---------------------------------------------------------------


def watched(data: bytes, pieces: int = 0) -> list[bytes]:
    watch = HeaderFieldWatch(["X-MS-Exchange-CrossTenant-Id"])
    if pieces:
        for index in range(0, len(data), pieces):
            watch.feed(data[index : index + pieces])
    else:
        watch.feed(data)
    watch.close()
    return watch.get("x-ms-exchange-crosstenant-id")


class HeaderFieldWatchTests(SynchronousTestCase):
    """
    L{HeaderFieldWatch}: every top-level field a reader could take for the
    watched one, wherever the pieces are cut.
    """

    def test_values_in_order(self) -> None:
        """
        Each field's value is collected, in order, and fields in the body
        are not.
        """
        data = message(
            header(OURS),
            b"Subject: hi\r\n",
            header(OTHER),
            body=header("in-the-body"),
        )
        self.assertEqual(watched(data), [b" " + OURS.encode(), b" " + OTHER.encode()])

    def test_name_variants(self) -> None:
        """
        The name matches in any case and with white space before the colon;
        longer names sharing the prefix do not match.
        """
        data = message(
            b"x-ms-exchange-crosstenant-id:" + OURS.encode() + b"\r\n",
            b"X-MS-Exchange-CrossTenant-Id \t: " + OTHER.encode() + b"\r\n",
            b"X-MS-Exchange-CrossTenant-Id-Extra: no\r\n",
            b"X-MS-Exchange-CrossTenant-AuthAs: Internal\r\n",
        )
        self.assertEqual(watched(data), [OURS.encode(), b" " + OTHER.encode()])

    def test_folded_value(self) -> None:
        """
        A folded field is unfolded (line breaks removed, white space kept).
        """
        data = message(b"X-MS-Exchange-CrossTenant-Id:\r\n\t" + OURS.encode() + b"\r\n")
        self.assertEqual(watched(data), [b"\t" + OURS.encode()])
        self.assertEqual(judge((OURS,), watched(data)).cause, OK)

    def test_non_field_lines_skipped(self) -> None:
        """
        A line that is neither a field nor a continuation, or a field with a
        name far longer than a line is kept for, does not end the header
        block: a field after it still counts (only the empty line ends it).
        """
        data = b"From: a\r\nnot a header line\r\n" + header(OURS) + b"\r\nbody\r\n"
        self.assertEqual(watched(data), [b" " + OURS.encode()])
        long_name = b"X-" + b"n" * 2000 + b": v\r\n"
        data = message(header(OURS), long_name, header(OTHER))
        self.assertEqual(len(watched(data)), 2)

    def test_colon_beyond_the_kept_part(self) -> None:
        """
        The watched name followed by so much white space that the colon is
        beyond the kept part of the line still counts, as a malformed value.
        """
        padded = b"X-MS-Exchange-CrossTenant-Id" + b" " * 3000 + b": " + OURS.encode()
        data = message(header(OURS), padded + b"\r\n")
        values = watched(data)
        self.assertEqual(len(values), 2)
        self.assertEqual(judge((OURS,), values[1:]).cause, MALFORMED)

    def test_large_header_block(self) -> None:
        """
        There is no limit on the header block: a field after 200 KiB of
        other fields (and a single 100 KiB folded one) is still found.
        """
        filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 90) for i in range(2000))
        folded = b"To: " + b",\r\n ".join([b"u@example.com"] * 7000) + b"\r\n"
        data = message(filler, folded, header(OURS))
        self.assertGreater(len(data), 300_000)
        self.assertEqual(watched(data, 4096), [b" " + OURS.encode()])

    def test_overlong_value_is_cut_and_malformed(self) -> None:
        """
        An over-long line or folded value is kept only in part, enough to be
        judged malformed.
        """
        long_line = message(header(OURS + " " + "z" * 5000))
        (value,) = watched(long_line)
        self.assertLessEqual(len(value), 257)
        self.assertEqual(judge((OURS,), [value]).cause, MALFORMED)
        folds = message(header(OURS + "\r\n " + "\r\n ".join(["z" * 50] * 100)))
        (value,) = watched(folds)
        self.assertLessEqual(len(value), 257)
        self.assertEqual(judge((OURS,), [value]).cause, MALFORMED)

    def test_no_final_newline(self) -> None:
        """
        Content that ends inside the header block without CRLF (possible
        with BDAT) still yields its last field.
        """
        self.assertEqual(
            watched(b"From: a\r\nX-MS-Exchange-CrossTenant-Id: " + OURS.encode()),
            [b" " + OURS.encode()],
        )

    @given(
        st.lists(st.sampled_from([OURS, OTHER, "junk"]), max_size=3),
        st.integers(min_value=1, max_value=97),
    )
    def test_any_cut(self, values: list[str], size: int) -> None:
        """
        However the content is cut into pieces, the result is the same as
        when it comes in one piece.
        """
        data = message(
            *(header(v) for v in values),
            b"Received: from x\r\n\tby y\r\n",
            body=header(OURS),
        )
        self.assertEqual(watched(data, size), watched(data))
        self.assertEqual(len(watched(data, size)), len(values))


# -- the gate -------------------------------------------------------------------------


def gate_verdict(rules, data: bytes, client: str = EXO):
    gate = TenantGate.for_message(rules, client)
    assert gate is not None
    for index in range(0, len(data), 7):
        gate.feed(data[index : index + 7])
    return gate.refusal()


class TenantGateTests(SynchronousTestCase):
    """
    L{TenantGate}: the end-of-DATA decision over every bound rule that took
    a recipient.
    """

    def test_unbound_message_has_no_gate(self) -> None:
        """
        Recipients bound only to unbound rules (or to nothing, before rules
        exist) need no gate; bound rules are listed once each, in order.
        """
        unbound = rule("plain")
        a, b = rule("a", (OURS,)), rule("b", (SISTER,))
        self.assertIsNone(TenantGate.for_message([unbound, None, unbound], EXO))
        self.assertEqual(bound_rules([a, unbound, b, a, None]), (a, b))

    def test_our_tenant_passes(self) -> None:
        """
        A message with our tenant's id from an address the rule trusts
        passes.
        """
        self.assertIsNone(gate_verdict([rule("r", (OURS,))], message(header(OURS))))

    def test_refusals(self) -> None:
        """
        Missing, repeated, malformed and foreign ids are refused with
        550 5.7.1, a text saying why, and the refused-log reason "tenant".
        """
        bound = [rule("r", (OURS,))]
        cases = {
            MISSING: message(),
            REPEATED: message(header(OURS), header(OURS)),
            MALFORMED: message(header("not-a-guid")),
            FOREIGN: message(header(OTHER)),
        }
        for cause, data in cases.items():
            refusal = gate_verdict(bound, data)
            assert refusal is not None
            self.assertEqual(refusal.verdict.cause, cause)
            reply = refusal.reply
            self.assertEqual((reply.code, reply.status), (550, "5.7.1"))
            self.assertTrue(
                reply.text.startswith("Not from an allowed Office 365 tenant: ")
            )
            self.assertEqual(reply.category, "tenant")
            self.assertEqual(categorize(reply.code, reply.status, reply.text), "tenant")

    def test_untrusted_previous_hop(self) -> None:
        """
        The header counts for nothing from an address outside the rule's
        client networks (or an address that is not an IP at all).
        """
        for client in ("198.51.100.7", "unix-socket"):
            refusal = gate_verdict([rule("r", (OURS,))], message(header(OURS)), client)
            assert refusal is not None
            self.assertEqual(refusal.verdict.cause, OUTSIDE)

    def test_every_bound_rule_must_admit(self) -> None:
        """
        With recipients under two bound rules, the message passes only when
        both admit its tenant; otherwise the refusal names the rule that did
        not. Unbound rules among them change nothing.
        """
        ours, sister = rule("ours", (OURS,)), rule("sister", (SISTER,))
        both = rule("both", (OURS, SISTER))
        plain = rule("plain")
        self.assertIsNone(gate_verdict([ours, both, plain], message(header(OURS))))
        refusal = gate_verdict([ours, plain, sister], message(header(OURS)))
        assert refusal is not None
        self.assertEqual(
            (refusal.rule.name, refusal.verdict.cause), ("sister", FOREIGN)
        )
