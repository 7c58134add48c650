# -*- test-case-name: tests.test_policy -*-
"""
Security rules: the model and first-match rule selection.

The gateway picks, for each recipient, the first enabled rule whose filters
(previous-hop address, envelope sender, recipient) all match; no match means
the recipient is refused. Everything here is decided once at load time so
that selection at RCPT time is a few set look-ups and no I/O.

Their TOML form is read by L{mdgateway.policy.parse.parse_policy}, which
also refuses the unsafe ones (an open relay, a loop).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

import attrs

from mdgateway.policy.patterns import (
    ANY_ADDRESS,
    AddressFilter,
    NormalAddress,
    normalize_address,
)
from mdgateway.policy.profiles import (
    CoreProfile,
    SmtpProfile,
)
from mdgateway.policy.tenants import normal_tenant_ids

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

#: Rule direction: a label for history and statistics; it never affects
#: matching.
DIRECTIONS = ("inbound", "outbound")

#: What a rule does with content Core blocked: refuse the whole message,
#: strip the blocked parts, or deliver them anyway.
BLOCKED_ACTIONS = ("block", "strip", "deliver")

#: Per-condition error handling: retry later, fail (bounce) at once, or
#: deliver without that processing (marked as bypassed).
ERROR_ACTIONS = ("retry", "fail", "bypass")

#: STARTTLS policy towards a relay, see L{SmtpProfile}.
RELAY_TLS_MODES = ("none", "opportunistic", "required", "verify")

CORE_SCHEMES = {"http": 8008, "https": 8008}
RELAY_SCHEMES = {"smtp": 25, "smtps": 465, "mx": 25, "maildir": 0}

#: Header names a rule may not set: the gateway's own verdict headers (a
#: custom header must never be able to fake a verdict) and the headers that
#: give a message its structure, origin or signatures.
RESERVED_HEADER_PREFIXES = ("x-metadefender-", "x-md-email-security-", "x-mdgateway-")
RESERVED_HEADERS = frozenset(
    {
        "arc-authentication-results",
        "arc-message-signature",
        "arc-seal",
        "authentication-results",
        "bcc",
        "cc",
        "content-disposition",
        "content-id",
        "content-transfer-encoding",
        "content-type",
        "date",
        "delivered-to",
        "dkim-signature",
        "from",
        "in-reply-to",
        "message-id",
        "mime-version",
        "received",
        "references",
        "reply-to",
        "return-path",
        "sender",
        "subject",
        "to",
    }
)
HEADER_NAME = re.compile(r"[!-9;-~]{1,64}")
HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?\Z"
)
MAX_NAME = 128
MAX_TAG = 64
MAX_HEADER_VALUE = 900


# -- the model --------------------------------------------------------------


@attrs.frozen
class ErrorHandling:
    """
    What a rule does when processing cannot complete, per condition; each is
    one of L{ERROR_ACTIONS}. The defaults fail closed: nothing unscanned is
    delivered unless the operator says so.

    @ivar core_unreachable: no server of the Core profile answered.
    @ivar core_busy: Core refused the file because its queue is full (503).
    @ivar scan_timeout: the scan did not finish within C{scan_timeout}.
    @ivar processing_failed: Core reported that processing failed.
    @ivar not_scanned: Core's workflow skipped the object.
    @ivar modification_failure: the message could not be rebuilt with the
        sanitized or stripped content.
    """

    core_unreachable: str = "retry"
    core_busy: str = "retry"
    scan_timeout: str = "retry"
    processing_failed: str = "fail"
    not_scanned: str = "fail"
    modification_failure: str = "fail"

    def action_for(self, condition: str) -> str:
        """
        The action for a condition named as in L{ERROR_CONDITIONS}.
        """
        if condition not in ERROR_CONDITIONS:
            raise KeyError(condition)
        action: str = getattr(self, condition)
        return action


#: The conditions of L{ErrorHandling}, in its field order.
ERROR_CONDITIONS = tuple(f.name for f in attrs.fields(ErrorHandling))


def unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _normal_network(network: IPNetwork) -> IPNetwork:
    """
    Rewrite an IPv4-mapped IPv6 network (C{::ffff:10.0.0.0/120}) as IPv4,
    matching how client addresses from a dual-stack listener are compared.
    """
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(mapped):
        base = network.network_address.ipv4_mapped
        assert base is not None
        return ipaddress.IPv4Network(f"{base}/{network.prefixlen - 96}")
    return network


def _normal_networks(networks: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(_normal_network(n) for n in networks)


def covers_every_client(networks: Sequence[IPNetwork]) -> bool:
    """
    Whether a previous-hop filter lets any client in: no networks, or
    networks that together cover all of IPv4 or all of IPv6.
    """
    if not networks:
        return True
    v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    all_v4 = [ipaddress.IPv4Network("0.0.0.0/0")]
    all_v6 = [ipaddress.IPv6Network("::/0")]
    return (
        list(ipaddress.collapse_addresses(v4)) == all_v4
        or list(ipaddress.collapse_addresses(v6)) == all_v6
    )


@attrs.frozen
class Rule:
    """
    One security rule: which mail it takes (filters) and what it does with it.

    An empty filter matches everything. The rule carries its profiles
    themselves, so the pipeline needs no second look-up.

    @ivar name: unique; recorded in history and headers.
    @ivar enabled: a disabled rule is skipped for new mail but still applies
        when a quarantined message it handled is rescanned.
    @ivar direction: one of L{DIRECTIONS}; a label only.
    @ivar client_networks: previous-hop filter (the connecting client's IP).
    @ivar senders: envelope sender filter; C{<>} matches the null sender.
    @ivar recipients: recipient filter.
    @ivar tenant_ids: Office 365 tenant binding (lower-case GUIDs): when
        set, a message is taken only if its C{X-MS-Exchange-CrossTenant-Id}
        names one of these tenants, checked at the end of DATA since
        headers are unknown at RCPT (L{mdgateway.policy.tenants}). Needs
        C{client_networks}: the header is trusted only from them.
    @ivar core_profile: the Core servers (and Core rule) that scan the mail.
    @ivar relay_profile: where processed mail is sent next.
    @ivar recipient_verification: probe the relay with RCPT before accepting.
    @ivar blocked_action: one of L{BLOCKED_ACTIONS}.
    @ivar apply_sanitized: replace parts with Core's sanitized (Deep CDR)
        output.
    @ivar quarantine_blocked: keep originals of blocked mail.
    @ivar quarantine_sanitized: keep originals of sanitized mail.
    @ivar external_quarantine: instead of keeping those originals, deliver
        them with C{X-Metadefender-To-Quarantine: True} for the mail server
        downstream to quarantine.
    @ivar notify_recipient: tell the recipient when mail to them is blocked.
    @ivar custom_headers: C{(name, value)} pairs added to processed mail.
    @ivar subject_tag_blocked: prefix for the subject of mail with blocked
        content that is still delivered (stripped or delivered blocked).
    @ivar subject_tag_sanitized: prefix for the subject of sanitized mail.
    @ivar modify_smime: whether S/MIME signed or encrypted mail may be
        modified (which breaks the signature).
    @ivar allow_open_relay: let this rule take any client's mail for any
        recipient; refused otherwise.
    @ivar on_error: per-condition error handling.
    """

    name: str
    core_profile: CoreProfile
    relay_profile: SmtpProfile
    enabled: bool = True
    description: str = ""
    direction: str = "inbound"
    client_networks: tuple[IPNetwork, ...] = attrs.field(
        default=(), converter=_normal_networks
    )
    senders: AddressFilter = ANY_ADDRESS
    recipients: AddressFilter = ANY_ADDRESS
    tenant_ids: tuple[str, ...] = attrs.field(default=(), converter=normal_tenant_ids)
    recipient_verification: bool = False
    blocked_action: str = "block"
    apply_sanitized: bool = True
    quarantine_blocked: bool = True
    quarantine_sanitized: bool = False
    external_quarantine: bool = False
    notify_recipient: bool = False
    custom_headers: tuple[tuple[str, str], ...] = ()
    subject_tag_blocked: str | None = None
    subject_tag_sanitized: str | None = None
    modify_smime: bool = False
    allow_open_relay: bool = False
    on_error: ErrorHandling = ErrorHandling()

    def from_client(self, client_ip: IPAddress) -> bool:
        """
        Whether the previous-hop filter admits C{client_ip} (IPv4-mapped
        IPv6 addresses count as their IPv4 address).
        """
        if not self.client_networks:
            return True
        address = unmapped(client_ip)
        return any(address in network for network in self.client_networks)

    def matches(self, client_ip: IPAddress, sender: str, recipient: str) -> bool:
        """
        Whether all three filters match (ignores C{enabled}); C{sender} is
        C{""} for the null reverse-path.
        """
        return self.matches_normal(
            client_ip, normalize_address(sender), normalize_address(recipient)
        )

    def matches_normal(
        self, client_ip: IPAddress, sender: NormalAddress, recipient: NormalAddress
    ) -> bool:
        """
        L{matches} for addresses already normalised by L{normalize_address}.
        """
        return (
            self.from_client(client_ip)
            and self.recipients.matches_normal(recipient)
            and self.senders.matches_normal(sender)
        )

    @property
    def open_relay(self) -> bool:
        """
        Whether this rule takes mail from any client for any domain.
        """
        return covers_every_client(self.client_networks) and (
            self.recipients.open_ended()
        )


def _frozen_mapping(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


def _rule_tuple(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    return tuple(rules)


@attrs.frozen
class Policy:
    """
    The ordered security rules and the server profiles they use.

    An empty or all-disabled policy is valid: it refuses all mail, as the
    product does out of the box.
    """

    core_profiles: Mapping[str, CoreProfile] = attrs.field(
        factory=dict, converter=_frozen_mapping
    )
    smtp_profiles: Mapping[str, SmtpProfile] = attrs.field(
        factory=dict, converter=_frozen_mapping
    )
    rules: tuple[Rule, ...] = attrs.field(default=(), converter=_rule_tuple)
    _enabled: tuple[Rule, ...] = attrs.field(init=False, eq=False, repr=False)
    _by_name: Mapping[str, Rule] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(
            self, "_enabled", tuple(rule for rule in self.rules if rule.enabled)
        )
        by_name: dict[str, Rule] = {}
        for rule in self.rules:
            by_name.setdefault(rule.name, rule)
        object.__setattr__(self, "_by_name", MappingProxyType(by_name))

    @property
    def enabled_rules(self) -> tuple[Rule, ...]:
        """
        The enabled rules, in order.
        """
        return self._enabled

    def candidates(
        self, client_ip: IPAddress, sender: str, recipient: str
    ) -> tuple[Rule, ...]:
        """
        Every enabled rule that matches, in order: the first is the rule to
        apply; recipient verification's automatic rule selection tries the
        next one when a rule's relay refuses the recipient.

        @param sender: the envelope sender, C{""} for the null reverse-path.
        """
        normal_sender = normalize_address(sender)
        normal_recipient = normalize_address(recipient)
        return tuple(
            rule
            for rule in self._enabled
            if rule.matches_normal(client_ip, normal_sender, normal_recipient)
        )

    def select(self, client_ip: IPAddress, sender: str, recipient: str) -> Rule | None:
        """
        The first enabled rule that matches, or L{None} (refuse: "No security
        rule").
        """
        normal_sender = normalize_address(sender)
        normal_recipient = normalize_address(recipient)
        for rule in self._enabled:
            if rule.matches_normal(client_ip, normal_sender, normal_recipient):
                return rule
        return None

    def rule_named(self, name: str) -> Rule | None:
        """
        The rule called C{name}, enabled or not (a rescan applies the rule
        that handled the message even if it has been disabled since).
        """
        return self._by_name.get(name)

    def core_profiles_in_use(self) -> tuple[CoreProfile, ...]:
        """
        The Core profiles enabled rules use, in order of first use (what
        readiness checks must reach).
        """
        return tuple(
            {r.core_profile.name: r.core_profile for r in self._enabled}.values()
        )

    def smtp_profiles_in_use(self) -> tuple[SmtpProfile, ...]:
        """
        The relay profiles enabled rules use, in order of first use.
        """
        return tuple(
            {r.relay_profile.name: r.relay_profile for r in self._enabled}.values()
        )
