# -*- test-case-name: tests.test_policy -*-
"""
Security rules and server profiles from their TOML form.

L{parse_policy} reads C{[profiles.core.*]}, C{[profiles.smtp.*]} and
C{[[rules]]} and records every mistake, with its key path, in the shared
L{Problems}: unknown profiles, bad server URIs, bad networks, unsafe
patterns, bad Office 365 tenant ids (or ones without the networks their
header is trusted from), a relay profile that points back at one of the gateway's own
listeners (a loop) and a rule that would relay for anyone (an open relay).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs

from mdgateway.policy.patterns import (
    ANY_ADDRESS,
    AddressFilter,
    AddressPattern,
    parse_pattern,
)
from mdgateway.policy.profiles import (
    STRATEGIES,
    SUBMIT_MODES,
    CoreProfile,
    SmtpProfile,
)
from mdgateway.policy.regexshape import PatternError
from mdgateway.policy.rules import (
    BLOCKED_ACTIONS,
    DIRECTIONS,
    ERROR_ACTIONS,
    ERROR_CONDITIONS,
    HEADER_NAME,
    MAX_HEADER_VALUE,
    MAX_NAME,
    MAX_TAG,
    RELAY_TLS_MODES,
    RESERVED_HEADER_PREFIXES,
    RESERVED_HEADERS,
    ErrorHandling,
    IPNetwork,
    Policy,
    Rule,
    T,
    covers_every_client,
)
from mdgateway.policy.servers import (
    ServerUriError,
    loops_back,
    parse_core_server,
    parse_relay_server,
)
from mdgateway.policy.tenants import TENANT_HEADER, parse_tenant_id
from mdgateway.smtp.clientmodel import SmtpTimeouts
from mdgateway.tomlreader import Section

#: The longest C{verdict_cache} of a Core profile, in seconds.
MAX_VERDICT_CACHE = 3600.0


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
    rule = _text(section, "rule", MAX_NAME, defaults.rule)
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
        submit=section.choice(
            "submit", SUBMIT_MODES, defaults.submit, what="submit mode"
        ),
        verdict_cache=section.duration("verdict_cache", defaults.verdict_cache),
        verdict_cache_size=section.integer(
            "verdict_cache_size",
            defaults.verdict_cache_size,
            minimum=1,
            maximum=1_000_000,
        ),
        big_part=section.size("big_part", defaults.big_part, minimum=1),
        big_concurrency=section.integer(
            "big_concurrency", defaults.big_concurrency, minimum=1, maximum=1000
        ),
    )
    if profile.verdict_cache > MAX_VERDICT_CACHE:
        # A verdict older than this may predate what Core knows now.
        section.check("verdict_cache", False, "must be at most 1h")
        profile = attrs.evolve(profile, verdict_cache=defaults.verdict_cache)
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


def _tenant_ids(
    section: Section, networks: Sequence[IPNetwork], networks_ok: bool
) -> tuple[str, ...]:
    """
    Read a rule's C{tenant_ids}: GUIDs, none twice, never the nil or the
    consumer Outlook.com tenant, and only on a rule whose previous-hop
    filter names the networks the tenant header is trusted from.
    """
    if not section.has("tenant_ids"):
        return ()
    texts = section.strings("tenant_ids")
    if isinstance(section.data.get("tenant_ids"), list) and not texts:
        section.check(
            "tenant_ids",
            False,
            "needs at least one tenant id (remove the key for a rule that is "
            "not bound to a tenant)",
        )
    ids: list[str] = []
    for index, text in enumerate(texts):
        where = f"{_path(section, 'tenant_ids')}[{index}]"
        try:
            tenant = parse_tenant_id(text)
        except ValueError as e:
            section.problems.add(where, str(e))
            continue
        if tenant in ids:
            section.problems.add(where, f"{tenant} is listed twice")
            continue
        ids.append(tenant)
    if networks_ok and covers_every_client(networks):
        section.check(
            "tenant_ids",
            False,
            f"needs client_networks naming Exchange Online's addresses: "
            f"{TENANT_HEADER} is trusted only from them, and anyone else "
            "could write it",
        )
    return tuple(ids)


def _custom_headers(section: Section) -> tuple[tuple[str, str], ...]:
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name in section.data:
        value = section.string(name)
        if value is None:
            continue
        lower = name.lower()
        if not HEADER_NAME.fullmatch(name):
            section.check(
                name,
                False,
                "a header name is 1 to 64 printable ASCII characters, no ':'",
            )
        elif lower in RESERVED_HEADERS or lower.startswith(RESERVED_HEADER_PREFIXES):
            section.check(name, False, "is set by the gateway or the mail itself")
        elif lower in seen:
            section.check(name, False, "is given twice (header names ignore case)")
        elif len(value) > MAX_HEADER_VALUE or not all(
            c == "\t" or c.isprintable() for c in value
        ):
            section.check(
                name,
                False,
                f"a header value is one line of at most {MAX_HEADER_VALUE} characters",
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
        if not name or len(name) > MAX_NAME or not name.isprintable():
            section.check(
                "name", False, f"must be 1 to {MAX_NAME} printable characters"
            )
    networks, networks_ok = _networks(section, "client_networks")
    senders, _ = _filter(section, "senders")
    recipients, recipients_ok = _filter(section, "recipients")
    tenant_ids = _tenant_ids(section, networks, networks_ok)
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
    tag_blocked = _text(section, "subject_tag_blocked", MAX_TAG)
    tag_sanitized = _text(section, "subject_tag_sanitized", MAX_TAG)
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
        tenant_ids=tenant_ids,
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
