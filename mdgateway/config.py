# -*- test-case-name: tests.test_config -*-
"""
The gateway's configuration: one TOML file mapped onto frozen attrs classes.

L{load_config} reads and validates the whole file and raises one
L{ConfigError} listing every problem, each line naming its key path, so an
operator fixes a file in one go and never sees a traceback.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from mdgateway.endpoints import (
    ADMIN_KINDS,
    LISTENER_KINDS,
    TCP_KINDS,
    EndpointError,
    check_endpoint,
    endpoint_address,
)
from mdgateway.policy.parse import parse_policy
from mdgateway.policy.rules import Policy
from mdgateway.smtp.server import TLS_MODES
from mdgateway.smtp.tls import TLS_VERSIONS, cipher_problem, default_cipher_policy
from mdgateway.tomlreader import ConfigError, Problems, Section

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

AUTH_MODES = ("off", "optional", "required")


@attrs.frozen
class ListenerConfig:
    """
    One SMTP listener.

    @ivar endpoint: a Twisted server endpoint description (C{tcp:10025:...}).
    @ivar tls: C{none}, C{starttls}, C{starttls-required} or C{implicit}.
    @ivar trusted_proxies: when set, a PROXY v1/v2 header is required and
        accepted only from these networks.
    """

    name: str
    endpoint: str
    tls: str = "none"
    proxy_protocol: bool = False
    trusted_proxies: tuple[Network, ...] = ()
    max_connections: int = 1000
    max_connections_per_client: int = 50
    auth: str = "off"
    auth_users_file: str | None = None
    #: C{intermediate}, C{opportunistic} or an OpenSSL cipher string;
    #: C{None}: C{[tls] ciphers}, else the policy its mode and AUTH call for.
    tls_ciphers: str | None = None

    def cipher_policy(self, default: str | None = None) -> str:
        """
        The cipher policy (name or OpenSSL string) this listener serves TLS
        with: its own, else C{default} (C{[tls] ciphers}), else
        C{intermediate} where TLS is required or AUTH offered and
        C{opportunistic} where TLS is optional (RFC 7435).
        """
        return self.tls_ciphers or default or default_cipher_policy(self.tls, self.auth)

    def bound_address(self) -> tuple[str, int]:
        """
        The (interface, port) this listener binds, for loop detection.
        """
        _, interface, port = endpoint_address(self.endpoint)
        return interface, port


@attrs.frozen
class TLSConfig:
    """
    The server certificate used by STARTTLS and implicit-TLS listeners.
    """

    certificate: str | None = None
    key: str | None = None
    chain: str | None = None
    min_version: str = "TLSv1.2"
    ciphers: str | None = None


@attrs.frozen
class LimitsConfig:
    """
    Per-session limits at the SMTP edge.
    """

    message_size: int = 50 * 1024 * 1024
    recipients: int = 1000
    command_line_length: int = 2048
    data_line_length: int = 998
    idle_timeout: float = 300.0
    session_deadline: float = 3600.0
    errors: int = 20
    received_headers: int = 50


@attrs.frozen
class SpoolConfig:
    """
    The local spool.

    @ivar min_free: below this much free space new mail gets
        C{452 4.3.1}, so the spool never fills its disk.
    @ivar max_queue: with this many messages waiting in one process's
        spool, new mail gets C{452 4.3.1} until delivery catches up
        (0: no limit but C{min_free}).
    """

    directory: str
    threads: int = 4
    min_free: int = 64 * 1024 * 1024
    max_queue: int = 0


@attrs.frozen
class DeliveryConfig:
    """
    Processing and relaying after the 250.

    @ivar loop_secret_file: the HMAC key of the processed marker; every
        instance of a cluster must share it. Created on first start.
    @ivar concurrency: messages under C{big_message} bytes processed and
        relayed at once.
    @ivar big_message: messages of at least this size travel in their own
        lane, C{big_concurrency} at a time, so small mail never waits for
        them.
    """

    concurrency: int = 16
    big_message: int = 4 * 1024 * 1024
    big_concurrency: int = 2
    retry_first: float = 300.0
    retry_max: float = 3600.0
    lifetime: float = 5 * 86400.0
    delay_warning: float | None = None
    loop_secret_file: str = ""
    marker_max_age: float = 7 * 86400.0
    #: How old a marker may be to let a message this cluster processed be
    #: relayed once more without a second scan (older: scanned again).
    relay_once_max_age: float = 3600.0


@attrs.frozen
class EmulatorSettings:
    """
    A MetaDefender Core emulator started with the gateway, for trials and
    tests (the default config scans with it).
    """

    enabled: bool = False
    endpoint: str = "tcp:8008:interface=127.0.0.1"
    latency: float = 0.0
    #: A benchmark stand-in: every file clean at once, never read.
    instant: bool = False


@attrs.frozen
class StoreConfig:
    """
    Email history, refused log and quarantine.

    @ivar location: a SQLite file (the default, one host) or a
        C{postgresql://} URL (a cluster shares one database).
    @ivar outbox_limit: records kept on disk for the store (while it is
        unreachable or slow) at which new mail gets C{451 4.3.0}.
    """

    location: str
    history_days: float | None = 30.0
    quarantine_days: float | None = 30.0
    instance: str = ""
    outbox_limit: int = 100_000


@attrs.frozen
class AdminConfig:
    """
    The admin HTTP API (history, quarantine, queue, health, metrics).

    @ivar endpoint: a Twisted server endpoint; empty means no admin API.
    @ivar token_file: the bearer token; created (random, 0600) on first
        start when missing.
    @ivar users_file: the console's operator accounts (scrypt hashes,
        written by C{mdgateway users add}); a missing file means none.
    @ivar session_lifetime: seconds a console login lasts.
    """

    endpoint: str = ""
    token_file: str = ""
    tls: bool = False
    users_file: str = ""
    session_lifetime: float = 8 * 3600.0


@attrs.frozen
class GatewayConfig:
    """
    The whole configuration.

    @ivar umask: the file-creation mask of the gateway's processes (set by
        the twistd plugin and the workers, not when embedded).
    @ivar version: a short hash of the file's bytes, stamped on log lines and
        Received headers so every decision names the config it was made under.
    """

    sender_helo_domain: str
    listeners: tuple[ListenerConfig, ...]
    tls: TLSConfig
    limits: LimitsConfig
    policy: Policy
    spool: SpoolConfig
    delivery: DeliveryConfig = DeliveryConfig()
    emulator: EmulatorSettings = EmulatorSettings()
    store: StoreConfig = StoreConfig(location=":memory:")
    admin: AdminConfig = AdminConfig()
    drain_timeout: float = 30.0
    drain_grace: float = 0.0
    workers: int = 1
    umask: int = 0o027
    version: str = ""
    path: str = ""
    #: The TOML document as loaded, for the console's configuration page.
    document: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


def load_config(path: str | Path, check_files: bool = True) -> GatewayConfig:
    """
    Read and validate a configuration file.

    @param check_files: check that the files it names exist; off to check
        a file meant for another host.
    @raise ConfigError: with one line per problem.
    """
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise ConfigError([f"{file}: cannot read: {e.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{file}: not UTF-8"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{file}: invalid TOML: {e}"]) from None
    version = hashlib.sha256(raw).hexdigest()[:12]
    return parse_config(
        data,
        base=file.resolve().parent,
        version=version,
        path=str(file),
        check_files=check_files,
    )


def parse_config(
    data: Mapping[str, Any],
    base: Path,
    version: str = "",
    path: str = "",
    check_files: bool = True,
) -> GatewayConfig:
    """
    Validate an already-parsed TOML document; relative paths are taken
    from C{base} (the config file's folder).
    """
    problems = Problems()
    root = Section(data, "", problems)
    helo = root.string("sender_helo_domain", default=socket.getfqdn())
    root.check("sender_helo_domain", _is_hostname(helo), f"not a host name: {helo!r}")
    tls = _tls(root.table("tls"), base, check_files)
    listeners = tuple(_listener(s, base, check_files) for s in root.tables("listeners"))
    if not listeners and "listeners" not in data:
        problems.add("listeners", "at least one listener is required")
    names = [listener.name for listener in listeners]
    for index, name in enumerate(names):
        if name in names[:index]:
            problems.add(
                f"listeners[{index}].name", f"duplicate listener name {name!r}"
            )
    for index, listener in enumerate(listeners):
        if listener.tls != "none" and not (tls.certificate and tls.key):
            problems.add(
                f"listeners[{index}].tls",
                f"mode {listener.tls!r} needs tls.certificate and tls.key",
            )
    limits = _limits(root.table("limits"))
    policy = parse_policy(
        root,
        [_bound(listener) for listener in listeners],
        check_files=check_files,
        base=str(base),
    )
    spool_section = root.table("spool")
    spool = SpoolConfig(
        directory=_path(
            base, spool_section.string("directory", required=True) or "spool"
        ),
        threads=spool_section.integer("threads", 4, minimum=1, maximum=64),
        min_free=spool_section.size("min_free", 64 * 1024 * 1024),
        max_queue=spool_section.integer("max_queue", 0, minimum=0),
    )
    spool_section.finish()
    delivery = _delivery(root.table("delivery"), base, spool.directory)
    store = _store(root.table("store"), base, spool.directory)
    admin = _admin(root.table("admin"), base, spool.directory, check_files)
    emulator_section = root.table("emulator")
    emulator = EmulatorSettings(
        enabled=emulator_section.boolean("enabled", False),
        endpoint=emulator_section.string("endpoint", "tcp:8008:interface=127.0.0.1"),
        latency=emulator_section.duration("latency", 0.0),
        instant=emulator_section.boolean("instant", False),
    )
    _endpoint(emulator_section, "endpoint", emulator.endpoint, TCP_KINDS, False)
    emulator_section.finish()
    drain = root.table("drain")
    drain_timeout = drain.duration("timeout", 30.0)
    drain_grace = drain.duration("grace", 0.0)
    drain.finish()
    processes = root.table("processes")
    workers = _workers(processes)
    umask = _umask(processes)
    processes.finish()
    root.finish()
    problems.raise_if_any()
    return GatewayConfig(
        sender_helo_domain=helo,
        listeners=listeners,
        tls=tls,
        limits=limits,
        policy=policy,
        spool=spool,
        delivery=delivery,
        emulator=emulator,
        store=store,
        admin=admin,
        drain_timeout=drain_timeout,
        drain_grace=drain_grace,
        workers=workers,
        umask=umask,
        version=version,
        path=path,
        document=data,
    )


def _workers(section: Section) -> int:
    """
    C{[processes] workers}: a count, or C{"auto"} for one per usable CPU.
    """
    if isinstance(section.data.get("workers"), str):
        value = section.string("workers")
        section.check(
            "workers", value == "auto", f"expected a count or 'auto', got {value!r}"
        )
        return max(1, min(64, usable_cpus()))
    return section.integer("workers", 1, minimum=1, maximum=64)


def usable_cpus() -> int:
    """
    The CPUs this process may run on (its affinity, which a container or
    C{taskset} narrows), else every CPU of the host.
    """
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return len(affinity(0))
    return os.cpu_count() or 1


def _umask(section: Section) -> int:
    """
    C{[processes] umask}: octal text such as C{"0027"} (the default),
    the file-creation mask the gateway's processes run with.
    """
    text = section.string("umask", "0027") or "0027"
    ok = len(text) in (3, 4) and all(c in "01234567" for c in text)
    section.check("umask", ok, f"expected an octal mask such as '0027', got {text!r}")
    return int(text, 8) if ok else 0o027


def _is_hostname(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return 0 < len(name) <= 253 and all(
        0 < len(label) <= 63
        and label.replace("-", "").isalnum()
        and label.isascii()
        and not label.startswith("-")
        and not label.endswith("-")
        for label in labels
    )


def _path(base: Path, value: str) -> str:
    return str((base / value).resolve()) if value else value


def _bound(listener: ListenerConfig) -> tuple[str, int]:
    try:
        return listener.bound_address()
    except Exception:
        return ("", 0)


def _readable(section: Section, key: str, base: Path, check: bool) -> str | None:
    value = section.string(key)
    if value is None:
        return None
    full = _path(base, value)
    section.check(key, not check or Path(full).is_file(), f"file not found: {full}")
    return full


def _tls(section: Section, base: Path, check: bool) -> TLSConfig:
    config = TLSConfig(
        certificate=_readable(section, "certificate", base, check),
        key=_readable(section, "key", base, check),
        chain=_readable(section, "chain", base, check),
        min_version=section.choice(
            "min_version", TLS_VERSIONS, "TLSv1.2", what="version"
        ),
        ciphers=section.string("ciphers"),
    )
    if config.ciphers is not None:
        problem = cipher_problem(config.ciphers)
        section.check("ciphers", problem is None, problem or "")
    section.check(
        "key",
        bool(config.certificate) == bool(config.key),
        "certificate and key go together",
    )
    if (
        config.certificate
        and config.key
        and Path(config.certificate).is_file()
        and Path(config.key).is_file()
    ):
        from mdgateway.smtp.tls import server_tls_options

        try:
            server_tls_options(
                config.certificate, config.key, config.chain, config.min_version
            )
        except (OSError, ValueError) as e:
            section.problems.add(section.path or "tls", str(e))
    section.finish()
    return config


def _listener(section: Section, base: Path, check: bool) -> ListenerConfig:
    name = section.string("name", required=True) or section.path
    endpoint = section.string("endpoint", required=True) or "tcp:0"
    _endpoint(
        section,
        "endpoint",
        endpoint,
        LISTENER_KINDS,
        check,
        hint="TLS and PROXY are set with the tls and proxy_protocol keys",
    )
    tls = section.choice("tls", TLS_MODES, "none", what="mode")
    proxy = section.boolean("proxy_protocol", False)
    trusted = section.networks("trusted_proxies")
    section.check(
        "trusted_proxies",
        not proxy or bool(trusted),
        "proxy_protocol needs at least one trusted proxy network",
    )
    auth = section.choice("auth", AUTH_MODES, "off", what="mode")
    users = section.string("auth_users_file")
    if users is not None:
        users = _path(base, users)
        section.check(
            "auth_users_file", Path(users).is_file(), f"file not found: {users}"
        )
    section.check(
        "auth_users_file",
        auth == "off" or users is not None,
        f"auth {auth!r} needs auth_users_file",
    )
    section.check(
        "auth",
        auth == "off" or tls != "none",
        "AUTH is offered only under TLS: set tls",
    )
    ciphers = section.string("tls_ciphers")
    if ciphers is not None:
        problem = cipher_problem(ciphers)
        section.check("tls_ciphers", problem is None, problem or "")
    config = ListenerConfig(
        name=name,
        endpoint=endpoint,
        tls=tls,
        proxy_protocol=proxy,
        trusted_proxies=trusted,
        max_connections=section.integer("max_connections", 1000, minimum=1),
        max_connections_per_client=section.integer(
            "max_connections_per_client", 50, minimum=1
        ),
        auth=auth,
        auth_users_file=users,
        tls_ciphers=ciphers,
    )
    section.finish()
    return config


def _endpoint(
    section: Section,
    key: str,
    description: str,
    kinds: tuple[str, ...],
    check_files: bool,
    hint: str = "",
) -> None:
    """
    Record at most one problem for an endpoint that cannot be served.
    """
    try:
        check_endpoint(description, kinds, check_files)
    except EndpointError as e:
        text = str(e)
        if hint and text.startswith("unsupported endpoint type"):
            text = text[:-1] + f"; {hint})"
        section.check(key, False, f"{text}: {description!r}")


def _store(section: Section, base: Path, spool: str) -> StoreConfig:
    location = section.string("location") or str(Path(spool) / "history.sqlite")
    if "://" not in location and location != ":memory:":
        location = _path(base, location)
    section.check(
        "location",
        "://" not in location or location.startswith(("postgresql://", "postgres://")),
        "use a SQLite file path or a postgresql:// URL",
    )
    history = section.integer("history_days", 30, minimum=0)
    quarantine = section.integer("quarantine_days", 30, minimum=0)
    config = StoreConfig(
        location=location,
        history_days=history or None,
        quarantine_days=quarantine or None,
        instance=section.string("instance", socket.gethostname()),
        outbox_limit=section.integer("outbox_limit", 100_000, minimum=100),
    )
    section.finish()
    return config


def _admin(section: Section, base: Path, spool: str, check_files: bool) -> AdminConfig:
    endpoint = section.string("endpoint", "")
    if endpoint:
        _endpoint(section, "endpoint", endpoint, ADMIN_KINDS, check_files)
    token = section.string("token_file")
    users = section.string("users_file")
    config = AdminConfig(
        endpoint=endpoint,
        token_file=_path(base, token) if token else str(Path(spool) / "admin.token"),
        tls=section.boolean("tls", False),
        users_file=_path(base, users) if users else str(Path(spool) / "admin.users"),
        session_lifetime=section.duration("session_lifetime", 8 * 3600.0, minimum=60.0),
    )
    section.finish()
    return config


def _delivery(section: Section, base: Path, spool: str) -> DeliveryConfig:
    secret = section.string("loop_secret_file")
    warning = section.duration("delay_warning", 0.0)
    config = DeliveryConfig(
        concurrency=section.integer("concurrency", 16, minimum=1, maximum=1000),
        big_message=section.size("big_message", 4 * 1024 * 1024, minimum=1),
        big_concurrency=section.integer("big_concurrency", 2, minimum=1, maximum=1000),
        retry_first=section.duration("retry_first", 300.0, minimum=1.0),
        retry_max=section.duration("retry_max", 3600.0, minimum=1.0),
        lifetime=section.duration("lifetime", 5 * 86400.0, minimum=60.0),
        delay_warning=warning or None,
        loop_secret_file=_path(base, secret)
        if secret
        else str(Path(spool) / "loop.secret"),
        marker_max_age=section.duration("marker_max_age", 7 * 86400.0, minimum=60.0),
        relay_once_max_age=section.duration("relay_once_max_age", 3600.0, minimum=0.0),
    )
    section.check(
        "relay_once_max_age",
        config.relay_once_max_age <= config.marker_max_age,
        "must be at most marker_max_age",
    )
    section.check(
        "retry_max",
        config.retry_max >= config.retry_first,
        "must be at least retry_first",
    )
    section.finish()
    return config


def _limits(section: Section) -> LimitsConfig:
    config = LimitsConfig(
        message_size=section.size("message_size", 50 * 1024 * 1024, minimum=1024),
        recipients=section.integer("recipients", 1000, minimum=1),
        command_line_length=section.integer(
            "command_line_length", 2048, minimum=512, maximum=65536
        ),
        data_line_length=section.integer(
            "data_line_length", 998, minimum=998, maximum=1_000_000
        ),
        idle_timeout=section.duration("idle_timeout", 300.0, minimum=1.0),
        session_deadline=section.duration("session_deadline", 3600.0, minimum=1.0),
        errors=section.integer("errors", 20, minimum=1),
        received_headers=section.integer("received_headers", 50, minimum=1),
    )
    section.finish()
    return config


def load_admin_settings(path: str | Path) -> AdminConfig:
    """
    Only the C{[admin]} table of a configuration file (and the spool folder
    its token file defaults into), as the C{mdgateway} command needs: it
    need not be allowed to read the rest (TLS keys), nor care about a
    problem elsewhere in the file.

    @raise ConfigError: the file cannot be read, or C{[admin]} has problems.
    """
    file = Path(path)
    try:
        data = tomllib.loads(file.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError([f"{file}: cannot read: {e.strerror}"]) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError([f"{file}: invalid TOML: {e}"]) from None
    problems = Problems()
    root = Section(data, "", problems)
    base = file.resolve().parent
    spool = _path(base, root.table("spool").string("directory") or "spool")
    admin = _admin(root.table("admin"), base, spool, check_files=False)
    problems.raise_if_any()
    return admin


__all__ = [
    "ConfigError",
    "GatewayConfig",
    "load_admin_settings",
    "load_config",
    "parse_config",
]
