# -*- test-case-name: tests.test_tenants -*-
"""
Office 365 tenant binding: the tenant ids a security rule admits, and the
judgement of the tenant-attribution header Exchange Online stamps on the
mail it sends through a connector.

Exchange Online's sending addresses are shared by every tenant, so a rule
that trusts those addresses alone would take any tenant's mail. A bound
rule (C{tenant_ids}) also needs exactly one well-formed
C{X-MS-Exchange-CrossTenant-Id} naming one of its tenants; the header is
trusted only because the rule's previous-hop filter admits nothing but
Exchange Online (see C{docs/office365.md} for the reasoning and the
residual risks). Everything here is pure: the receiving side collects the
header values as the message streams in and asks L{judge} at the end.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import attrs

#: The header Exchange Online stamps with the GUID of the tenant a message
#: was attributed to.
TENANT_HEADER = "X-MS-Exchange-CrossTenant-Id"

#: The nil GUID: never a tenant.
NIL_TENANT = "00000000-0000-0000-0000-000000000000"
#: The tenant every consumer Outlook.com / Hotmail mailbox shares; binding a
#: rule to it would admit millions of strangers.
CONSUMER_TENANT = "84df9e7f-e9f6-40af-b435-aaaaaaaaaaaa"

#: Tenant ids that can never be configured, with the reason.
FORBIDDEN_TENANTS = {
    NIL_TENANT: "is the nil GUID, not a tenant",
    CONSUMER_TENANT: (
        "is the tenant shared by every consumer Outlook.com mailbox; binding "
        "a rule to it would admit anyone with a free account"
    ),
}

#: The longest header value looked at; a GUID is 36 characters.
MAX_VALUE = 256

_GUID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    re.IGNORECASE | re.ASCII,
)

#: Verdict causes.
OK = "ok"
MISSING = "missing"
REPEATED = "repeated"
MALFORMED = "malformed"
FOREIGN = "foreign"
OUTSIDE = "outside"


def parse_tenant_id(text: str) -> str:
    """
    A tenant id as configured: a GUID in the 8-4-4-4-12 form (no braces,
    no C{urn:uuid:}), any case, surrounding white space ignored.

    @return: its lower-case form, which is how ids are compared.
    @raise ValueError: with a message fit for a problem line.
    """
    stripped = text.strip()
    if not _GUID.fullmatch(stripped):
        raise ValueError(
            f"not a tenant id: {text!r} (a GUID such as "
            "3f2504e0-4f89-41d3-9a0c-0305e82c3301)"
        )
    canonical = stripped.lower()
    forbidden = FORBIDDEN_TENANTS.get(canonical)
    if forbidden is not None:
        raise ValueError(f"{canonical} {forbidden}")
    return canonical


def normal_tenant_ids(ids: Iterable[str]) -> tuple[str, ...]:
    """
    Lower-case tenant ids, for the rule model (validation with key paths is
    the TOML reader's job).
    """
    return tuple(i.strip().lower() for i in ids)


@attrs.frozen
class TenantVerdict:
    """
    The judgement of one message's tenant-attribution header for one rule.

    @ivar cause: L{OK}, or why not: L{MISSING}, L{REPEATED}, L{MALFORMED},
        L{FOREIGN} (another tenant's id), L{OUTSIDE} (the previous hop is not
        one the rule trusts the header from).
    @ivar tenant: the well-formed tenant id found (lower case), for the log;
        L{None} when there was none.
    """

    cause: str
    tenant: str | None = None

    @property
    def ok(self) -> bool:
        return self.cause == OK

    def describe(self) -> str:
        """
        A short, client-safe explanation for the SMTP reply.
        """
        return _DESCRIPTIONS[self.cause]


_DESCRIPTIONS = {
    OK: "tenant accepted",
    MISSING: f"no {TENANT_HEADER} header",
    REPEATED: f"{TENANT_HEADER} given more than once",
    MALFORMED: f"malformed {TENANT_HEADER}",
    FOREIGN: f"{TENANT_HEADER} names another tenant",
    OUTSIDE: "tenant header not trusted from this address",
}


def judge(allowed: Sequence[str], values: Sequence[bytes]) -> TenantVerdict:
    """
    Judge the values of every top-level C{X-MS-Exchange-CrossTenant-Id}
    field of a message against a rule's tenant ids.

    Exactly one field, holding exactly one GUID that is one of C{allowed}
    (case-insensitive), passes. Two fields fail even when they agree:
    Exchange stamps one, so a second can only have come from the sender.

    @param allowed: lower-case tenant ids (see L{parse_tenant_id}).
    @param values: the raw, unfolded field values, in order.
    """
    if not values:
        return TenantVerdict(MISSING)
    if len(values) > 1:
        return TenantVerdict(REPEATED)
    raw = values[0]
    if len(raw) > MAX_VALUE:
        return TenantVerdict(MALFORMED)
    text = raw.decode("ascii", "replace").strip(" \t\r\n")
    if not _GUID.fullmatch(text):
        return TenantVerdict(MALFORMED)
    tenant = text.lower()
    if tenant not in allowed:
        return TenantVerdict(FOREIGN, tenant)
    return TenantVerdict(OK, tenant)
