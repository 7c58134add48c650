# -*- test-case-name: tests.test_policy -*-
"""
Security rules and server profiles: the model, its TOML form, the checks that
protect operators, and first-match rule selection.

The gateway picks, for each recipient, the first enabled rule whose filters
(previous-hop address, envelope sender, recipient) all match; no match means
the recipient is refused. Everything here is decided once at load time so
that selection at RCPT time is a few set look-ups and no I/O.

L{parse_policy} reads C{[profiles.core.*]}, C{[profiles.smtp.*]} and
C{[[rules]]} and records every mistake, with its key path, in the shared
L{Problems}: unknown profiles, bad server URIs, bad networks, unsafe
patterns, a relay profile that points back at one of the gateway's own
listeners (a loop) and a rule that would relay for anyone (an open relay).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qsl, urlsplit

import attrs

from mdgateway.policy.patterns import (
    ANY_ADDRESS,
    AddressFilter,
    AddressPattern,
    NormalAddress,
    PatternError,
    normalize_address,
    parse_pattern,
)
from mdgateway.policy.profiles import (
    STRATEGIES,
    CoreProfile,
    CoreServer,
    RelayServer,
    SmtpProfile,
    SmtpTimeouts,
)
from mdgateway.tomlreader import Section

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
_HEADER_NAME = re.compile(r"[!-9;-~]{1,64}")
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?\Z"
)
_MAX_NAME = 128
_MAX_TAG = 64
_MAX_HEADER_VALUE = 900


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


def _unmapped(address: IPAddress) -> IPAddress:
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
        address = _unmapped(client_ip)
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


# -- server URIs ------------------------------------------------------------


class ServerUriError(ValueError):
    """
    A server URI cannot be used; the message says why.
    """


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_host(host: str) -> str:
    """
    Validate a URI host and return its canonical form (IDN as A-labels).
    """
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ServerUriError(f"not a host name: {host!r}") from None
    if not _HOSTNAME.match(host):
        raise ServerUriError(f"not a host name: {host!r}")
    return host


def _split_network_uri(uri: str, scheme: str) -> tuple[SplitResult, str, int | None]:
    """
    Split C{scheme://host[:port][/][?query]}; return the parts, the host and
    the port (L{None} when absent).
    """
    if not uri[len(scheme) + 1 :].startswith("//"):
        raise ServerUriError(f"expected {scheme}://host")
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise ServerUriError(f"not a server URI: {e}") from None
    if parts.username is not None or parts.password is not None:
        raise ServerUriError(
            "credentials do not belong in the URI (use auth_user and "
            "auth_password_file, or ?apikey= for Core)"
        )
    if not parts.hostname:
        raise ServerUriError("missing host")
    if port == 0:
        raise ServerUriError("port 0 is not a port")
    if parts.path not in ("", "/"):
        raise ServerUriError(f"server URIs have no path (got {parts.path!r})")
    if parts.fragment:
        raise ServerUriError("server URIs have no #fragment")
    return parts, _check_host(parts.hostname), port


def _scheme(uri: str, schemes: Iterable[str]) -> str:
    if any(c.isspace() or not c.isprintable() for c in uri):
        raise ServerUriError("white space or control characters in a server URI")
    scheme, colon, _ = uri.partition(":")
    options = ", ".join(schemes)
    if not colon or not scheme:
        raise ServerUriError(f"missing scheme (use {options})")
    scheme = scheme.lower()
    if scheme not in schemes:
        raise ServerUriError(f"unknown scheme {scheme!r} (use {options})")
    return scheme


def parse_core_server(uri: str) -> CoreServer:
    """
    Parse a MetaDefender Core server URI, C{http[s]://host[:port][?apikey=KEY]}
    (port 8008 by default).

    @raise ServerUriError: when it is not one.
    """
    scheme = _scheme(uri, CORE_SCHEMES)
    parts, host, port = _split_network_uri(uri, scheme)
    apikey = None
    if parts.query:
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise ServerUriError(f"bad query string {parts.query!r}") from None
        for key, value in pairs:
            if key != "apikey":
                raise ServerUriError(
                    f"unknown query parameter {key!r} (only apikey is known)"
                )
            if apikey is not None:
                raise ServerUriError("apikey given twice")
            if not value:
                raise ServerUriError("empty apikey")
            apikey = value
    if port is None:
        port = CORE_SCHEMES[scheme]
    return CoreServer(f"{scheme}://{_url_host(host)}:{port}", apikey)


def parse_relay_server(uri: str, base: str | None = None) -> RelayServer:
    """
    Parse an SMTP relay server URI: C{smtp://host[:port]} (port 25,
    STARTTLS by the profile's C{tls}), C{smtps://host[:port]} (port 465,
    implicit TLS), C{mx://domain} (the domain's MX hosts, port 25) or
    C{maildir:folder} (write C{.eml} files, for tests, archives and air
    gaps; a relative folder is taken from C{base}, the config file's folder).

    @raise ServerUriError: when it is not one.
    """
    scheme = _scheme(uri, RELAY_SCHEMES)
    if scheme == "maildir":
        path = uri[len("maildir:") :]
        if path.startswith("//"):
            raise ServerUriError("write maildir:/absolute/folder (one slash)")
        if not path:
            raise ServerUriError("maildir needs a folder (maildir:/var/...)")
        if not path.startswith("/"):
            if base is None:
                raise ServerUriError("maildir path must be absolute (maildir:/var/...)")
            path = os.path.join(base, path)
        return RelayServer("maildir", os.path.normpath(path), 0)
    parts, host, port = _split_network_uri(uri, scheme)
    if parts.query:
        if "apikey" in dict(parse_qsl(parts.query, keep_blank_values=True)):
            raise ServerUriError("apikey is only for MetaDefender Core servers")
        raise ServerUriError("SMTP server URIs take no query parameters")
    if scheme == "mx":
        if port is not None:
            raise ServerUriError("mx:// takes no port (MX hosts listen on 25)")
        if _literal_addresses(host) is not None:
            raise ServerUriError("mx:// needs a domain; use smtp:// for an address")
        return RelayServer("mx", host, 25)
    return RelayServer(scheme, host, RELAY_SCHEMES[scheme] if port is None else port)


# -- the loop guard ---------------------------------------------------------

_LOOPBACKS: frozenset[IPAddress] = frozenset(
    {ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")}
)


def _literal_addresses(host: str) -> frozenset[IPAddress] | None:
    """
    The addresses a host stands for without DNS: an IP literal, or
    C{localhost}; L{None} for any other name.
    """
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return _LOOPBACKS
    try:
        return frozenset({_unmapped(ipaddress.ip_address(host))})
    except ValueError:
        return None


def _all_interfaces(host: str) -> tuple[int, ...]:
    """
    The IP versions a listener host binds on every interface (C{""} and
    C{::} are dual-stack, C{0.0.0.0} IPv4 only); empty for a specific host.
    """
    host = host.strip("[]")
    if host in ("", "*"):
        return (4, 6)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ()
    if not address.is_unspecified:
        return ()
    return (4, 6) if address.version == 6 else (4,)


def loops_back(
    server: RelayServer, own_endpoints: Iterable[tuple[str, int]]
) -> str | None:
    """
    Which of the gateway's own listeners C{server} would reach, if any.

    Only literal IPs and C{localhost} are recognised (no DNS at load time):
    a relay on the same port at a loopback or unspecified address when the
    listener binds all interfaces, or at the listener's own address.

    @return: the listener as C{host:port}, or L{None}.
    """
    if server.scheme not in ("smtp", "smtps"):
        return None
    targets = _literal_addresses(server.host)
    if targets is None:
        return None
    for own_host, own_port in own_endpoints:
        if own_port != server.port:
            continue
        shown = f"{_url_host(own_host.strip('[]') or '*')}:{own_port}"
        families = _all_interfaces(own_host)
        if families:
            if any(
                (a.is_loopback or a.is_unspecified) and a.version in families
                for a in targets
            ):
                return shown
            continue
        own = _literal_addresses(own_host)
        if own is None:
            continue
        if targets & own or (
            any(a.is_unspecified for a in targets) and any(a.is_loopback for a in own)
        ):
            return shown
    return None


# -- parsing ----------------------------------------------------------------


def _path(section: Section, key: str) -> str:
    return f"{section.path}.{key}" if section.path else key


def _text(
    section: Section, key: str, maximum: int, default: str | None = None
) -> str | None:
    """
    An optional one-line string: not empty, no control characters.
    """
    value: str | None = section.string(key, default)
    if value is None or value == default:
        return value
    if not value or len(value) > maximum or not value.isprintable():
        section.check(
            key,
            False,
            f"must be 1 to {maximum} printable characters on one line",
        )
        return default
    return value


@attrs.frozen
class _Files:
    """
    How file names in profiles are checked: relative names are taken from
    C{base} (the config file's folder) when given, and must exist when
    C{check}.
    """

    check: bool = True
    base: str | None = None

    def name(self, section: Section, key: str) -> str | None:
        path: str | None = section.string(key)
        if path is None:
            return None
        if not path:
            section.check(key, False, "empty file name")
            return None
        if not os.path.isabs(path):
            if self.base is None:
                section.check(key, False, f"must be an absolute path (got {path!r})")
                return path
            path = os.path.normpath(os.path.join(self.base, path))
        if self.check and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            section.check(key, False, f"cannot read the file {path!r}")
        return path


def _servers(
    section: Section, parse: Callable[[str], T], show: Callable[[T], str]
) -> list[tuple[str, T]]:
    """
    Parse a profile's C{servers}; return C{(key path, server)} pairs.
    """
    if not section.has("servers"):
        section.check("servers", False, "is required (at least one server URI)")
    texts = section.strings("servers")
    if isinstance(section.data.get("servers"), list) and not texts:
        section.check("servers", False, "needs at least one server URI")
    found: list[tuple[str, T]] = []
    seen: set[str] = set()
    for index, text in enumerate(texts):
        key = f"{_path(section, 'servers')}[{index}]"
        try:
            server = parse(text)
        except ServerUriError as e:
            section.problems.add(key, _redact(f"{e} in {text!r}"))
            continue
        if show(server) in seen:
            section.problems.add(key, f"{show(server)} is listed twice")
            continue
        seen.add(show(server))
        found.append((key, server))
    return found


def _redact(uri: str) -> str:
    """
    A URI fit for a problem line: the apikey is a secret.
    """
    return re.sub(r"(apikey=)[^&#]*", r"\1...", uri, flags=re.IGNORECASE)


def parse_core_profile(
    name: str,
    section: Section,
    *,
    check_files: bool = True,
    base: str | None = None,
) -> CoreProfile:
    """
    Read one C{[profiles.core.NAME]} table.
    """
    servers = [s for _, s in _servers(section, parse_core_server, lambda s: s.url)]
    defaults = CoreProfile(name, ())
    rule = _text(section, "rule", _MAX_NAME, defaults.rule)
    agent = section.string("user_agent", defaults.user_agent)
    if not (agent and agent.isascii() and agent.isprintable()):
        section.check("user_agent", False, "must be printable ASCII on one line")
        agent = defaults.user_agent
    ca_file = _Files(check_files, base).name(section, "ca_file")
    if ca_file is not None and not any(s.url.startswith("https:") for s in servers):
        section.check("ca_file", False, "applies only to https:// servers")
    profile = CoreProfile(
        name=name,
        servers=tuple(servers),
        strategy=section.choice(
            "strategy", STRATEGIES, defaults.strategy, what="strategy"
        ),
        rule=rule or defaults.rule,
        user_agent=agent,
        poll_interval=section.duration(
            "poll_interval", defaults.poll_interval, minimum=0.01
        ),
        scan_timeout=section.duration(
            "scan_timeout", defaults.scan_timeout, minimum=1.0
        ),
        concurrency=section.integer(
            "concurrency", defaults.concurrency, minimum=1, maximum=1000
        ),
        ca_file=ca_file,
        hash_lookup=section.boolean("hash_lookup", defaults.hash_lookup),
        failure_threshold=section.integer(
            "failure_threshold", defaults.failure_threshold, minimum=1, maximum=100
        ),
        retry_after=section.duration("retry_after", defaults.retry_after, minimum=1.0),
    )
    section.finish()
    return profile


def _timeouts(section: Section) -> SmtpTimeouts:
    defaults = SmtpTimeouts()
    values = {
        f.name: section.duration(f.name, getattr(defaults, f.name), minimum=1.0)
        for f in attrs.fields(SmtpTimeouts)
    }
    section.finish()
    return SmtpTimeouts(**values)


def parse_smtp_profile(
    name: str,
    section: Section,
    own_endpoints: Iterable[tuple[str, int]] = (),
    *,
    check_files: bool = True,
    base: str | None = None,
) -> SmtpProfile:
    """
    Read one C{[profiles.smtp.NAME]} table, refusing servers that are the
    gateway's own listeners.
    """
    listed = _servers(section, functools.partial(parse_relay_server, base=base), str)
    for key, server in listed:
        own = loops_back(server, own_endpoints)
        if own is not None:
            section.problems.add(
                key,
                f"{server} is this gateway's own listener {own}; relaying "
                "there would send mail round in a loop",
            )
    servers = tuple(server for _, server in listed)
    network = [s for s in servers if s.scheme != "maildir"]
    tls = section.choice("tls", RELAY_TLS_MODES, "opportunistic", what="tls mode")
    if tls == "none" and any(s.scheme == "smtps" for s in servers):
        section.check("tls", False, 'tls = "none" contradicts an smtps:// server')
    tls_name = _text(section, "tls_name", 253)
    ca_file = _Files(check_files, base).name(section, "ca_file")
    for key, value in (("tls_name", tls_name), ("ca_file", ca_file)):
        if value is not None and tls != "verify":
            section.check(key, False, 'applies only with tls = "verify"')
    for key in ("auth_password", "password"):
        if section.has(key):
            section.string(key)
            section.check(
                key,
                False,
                "passwords are never written in the config file; put it in a "
                "file readable only by the gateway and name it in "
                "auth_password_file",
            )
    auth_user = _text(section, "auth_user", 256)
    password_file = _Files(check_files, base).name(section, "auth_password_file")
    if auth_user is not None and password_file is None:
        section.check("auth_password_file", False, "is required with auth_user")
    if password_file is not None and auth_user is None:
        section.check("auth_user", False, "is required with auth_password_file")
    if auth_user is not None and tls in ("none", "opportunistic"):
        if any(s.scheme != "smtps" for s in network):
            section.check(
                "auth_user",
                False,
                f'tls = "{tls}" could send the password unprotected; use '
                'tls = "required" or "verify"',
            )
    profile = SmtpProfile(
        name=name,
        servers=servers,
        strategy=section.choice("strategy", STRATEGIES, "failover", what="strategy"),
        tls=tls,
        ca_file=ca_file,
        tls_name=tls_name,
        auth_user=auth_user,
        auth_password_file=password_file,
        timeouts=_timeouts(section.table("timeouts")),
    )
    section.finish()
    return profile


def _networks(section: Section, key: str) -> tuple[list[IPNetwork], bool]:
    """
    Read a CIDR list strictly: C{10.0.0.5/24} is refused, since the host
    bits show the operator meant something narrower or wider.
    """
    ok = True
    result: list[IPNetwork] = []
    for index, text in enumerate(section.strings(key)):
        where = f"{_path(section, key)}[{index}]"
        try:
            result.append(ipaddress.ip_network(text.strip()))
            continue
        except ValueError:
            ok = False
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            section.problems.add(where, f"not an IP network: {text!r}")
            continue
        host = text.strip().partition("/")[0]
        section.problems.add(
            where,
            f"{text!r} has host bits set (did you mean {loose} or "
            f"{host}/{loose.max_prefixlen}?)",
        )
    return result, ok


def _filter(section: Section, key: str) -> tuple[AddressFilter, bool]:
    ok = True
    patterns: list[AddressPattern] = []
    for index, text in enumerate(section.strings(key)):
        try:
            patterns.append(parse_pattern(text))
        except PatternError as e:
            section.problems.add(f"{_path(section, key)}[{index}]", str(e))
            ok = False
    if not patterns:
        return ANY_ADDRESS, ok
    return AddressFilter(tuple(patterns)), ok


def _custom_headers(section: Section) -> tuple[tuple[str, str], ...]:
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name in section.data:
        value = section.string(name)
        if value is None:
            continue
        lower = name.lower()
        if not _HEADER_NAME.fullmatch(name):
            section.check(
                name,
                False,
                "a header name is 1 to 64 printable ASCII characters, no ':'",
            )
        elif lower in RESERVED_HEADERS or lower.startswith(RESERVED_HEADER_PREFIXES):
            section.check(name, False, "is set by the gateway or the mail itself")
        elif lower in seen:
            section.check(name, False, "is given twice (header names ignore case)")
        elif len(value) > _MAX_HEADER_VALUE or not all(
            c == "\t" or c.isprintable() for c in value
        ):
            section.check(
                name,
                False,
                f"a header value is one line of at most {_MAX_HEADER_VALUE} characters",
            )
        else:
            seen.add(lower)
            headers.append((name, value))
    section.finish()
    return tuple(headers)


def _error_handling(section: Section) -> ErrorHandling:
    defaults = ErrorHandling()
    values = {
        name: section.choice(
            name, ERROR_ACTIONS, getattr(defaults, name), what="action"
        )
        for name in ERROR_CONDITIONS
    }
    section.finish()
    return ErrorHandling(**values)


def _profile(
    section: Section, key: str, profiles: Mapping[str, T], what: str
) -> T | None:
    name = section.string(key, required=True)
    if name is None:
        return None
    if name not in profiles:
        defined = ", ".join(sorted(profiles)) or "none defined"
        section.check(key, False, f"unknown {what} {name!r} (defined: {defined})")
        return None
    return profiles[name]


def parse_rule(
    section: Section,
    core_profiles: Mapping[str, CoreProfile],
    smtp_profiles: Mapping[str, SmtpProfile],
) -> Rule | None:
    """
    Read one C{[[rules]]} table; L{None} when it names a profile that does
    not exist (the problem is recorded).
    """
    name = section.string("name", "", required=True)
    if section.has("name") and isinstance(name, str):
        if not name or len(name) > _MAX_NAME or not name.isprintable():
            section.check(
                "name", False, f"must be 1 to {_MAX_NAME} printable characters"
            )
    networks, networks_ok = _networks(section, "client_networks")
    senders, _ = _filter(section, "senders")
    recipients, recipients_ok = _filter(section, "recipients")
    core = _profile(section, "core_profile", core_profiles, "MetaDefender Core profile")
    relay = _profile(section, "relay_profile", smtp_profiles, "SMTP relay profile")
    enabled = section.boolean("enabled", True)
    description = _text(section, "description", 1000, "") or ""
    direction = section.choice("direction", DIRECTIONS, "inbound", what="direction")
    verification = section.boolean("recipient_verification", False)
    blocked_action = section.choice(
        "blocked_action", BLOCKED_ACTIONS, "block", what="action"
    )
    apply_sanitized = section.boolean("apply_sanitized", True)
    quarantine_blocked = section.boolean("quarantine_blocked", True)
    quarantine_sanitized = section.boolean("quarantine_sanitized", False)
    external_quarantine = section.boolean("external_quarantine", False)
    notify_recipient = section.boolean("notify_recipient", False)
    custom_headers = _custom_headers(section.table("custom_headers"))
    tag_blocked = _text(section, "subject_tag_blocked", _MAX_TAG)
    tag_sanitized = _text(section, "subject_tag_sanitized", _MAX_TAG)
    modify_smime = section.boolean("modify_smime", False)
    allow_open_relay = section.boolean("allow_open_relay", False)
    on_error = _error_handling(section.table("on_error"))
    section.finish()
    if external_quarantine and not (quarantine_blocked or quarantine_sanitized):
        section.check(
            "external_quarantine",
            False,
            "has nothing to apply to: quarantine_blocked and "
            "quarantine_sanitized are both false",
        )
    if (
        verification
        and relay is not None
        and relay.servers
        and all(s.scheme == "maildir" for s in relay.servers)
    ):
        section.check(
            "recipient_verification",
            False,
            f"relay profile {relay.name!r} has no SMTP server to verify with",
        )
    if core is None or relay is None:
        return None
    rule = Rule(
        name=name,
        core_profile=core,
        relay_profile=relay,
        enabled=enabled,
        description=description,
        direction=direction,
        client_networks=tuple(networks),
        senders=senders,
        recipients=recipients,
        recipient_verification=verification,
        blocked_action=blocked_action,
        apply_sanitized=apply_sanitized,
        quarantine_blocked=quarantine_blocked,
        quarantine_sanitized=quarantine_sanitized,
        external_quarantine=external_quarantine,
        notify_recipient=notify_recipient,
        custom_headers=custom_headers,
        subject_tag_blocked=tag_blocked,
        subject_tag_sanitized=tag_sanitized,
        modify_smime=modify_smime,
        allow_open_relay=allow_open_relay,
        on_error=on_error,
    )
    if networks_ok and recipients_ok and rule.open_relay and not rule.allow_open_relay:
        section.problems.add(
            section.path,
            f"rule {name!r} would take mail from any client for any recipient "
            "domain (an open relay): restrict client_networks or recipients, "
            "or set allow_open_relay = true",
        )
    return rule


def _profiles(section: Section, key: str) -> dict[str, Section]:
    tables = section.named_tables(key)
    for name in tables:
        if not name or not name.isprintable():
            section.check(key, False, f"bad profile name {name!r}")
    return tables


def parse_policy(
    root: Section,
    own_endpoints: Sequence[tuple[str, int]],
    *,
    check_files: bool = True,
    base: str | None = None,
) -> Policy:
    """
    Read C{[profiles.core.*]}, C{[profiles.smtp.*]} and C{[[rules]]} from the
    whole config document.

    Every mistake goes to C{root.problems} with its key path; the caller
    raises L{mdgateway.tomlreader.ConfigError} once the whole file is read.
    Disabled rules are validated like enabled ones.

    @param own_endpoints: C{(host, port)} of each of the gateway's own
        listeners (C{""}, C{0.0.0.0} or C{::} for all interfaces), for the
        loop guard.
    @param check_files: check that C{ca_file} and C{auth_password_file}
        exist and are readable; off to validate a config for another host.
    @param base: the folder relative file names are taken from (the config
        file's); without it they must be absolute.
    """
    profiles = root.table("profiles")
    core_tables = _profiles(profiles, "core")
    smtp_tables = _profiles(profiles, "smtp")
    profiles.finish()
    core = {
        name: parse_core_profile(name, table, check_files=check_files, base=base)
        for name, table in core_tables.items()
    }
    smtp = {
        name: parse_smtp_profile(
            name, table, own_endpoints, check_files=check_files, base=base
        )
        for name, table in smtp_tables.items()
    }
    rules: list[Rule] = []
    first_path: dict[str, str] = {}
    for table in root.tables("rules"):
        rule = parse_rule(table, core, smtp)
        name = table.data.get("name")
        if isinstance(name, str) and name:
            key = name.casefold()
            if key in first_path:
                table.problems.add(
                    _path(table, "name"),
                    f"duplicate rule name {name!r} (also {first_path[key]})",
                )
                continue
            first_path[key] = _path(table, "name")
        if rule is not None:
            rules.append(rule)
    return Policy(core, smtp, tuple(rules))


__all__ = [
    "BLOCKED_ACTIONS",
    "DIRECTIONS",
    "ERROR_ACTIONS",
    "ERROR_CONDITIONS",
    "RELAY_TLS_MODES",
    "ErrorHandling",
    "Policy",
    "Rule",
    "ServerUriError",
    "covers_every_client",
    "loops_back",
    "parse_core_profile",
    "parse_core_server",
    "parse_policy",
    "parse_relay_server",
    "parse_rule",
    "parse_smtp_profile",
]
