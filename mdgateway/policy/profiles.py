# -*- test-case-name: tests.test_policy -*-
"""
Server profiles: the named sets of MetaDefender Core and SMTP relay servers.

These are plain values shared by the config loader (which builds them), the
Core runtime and the relay (which use them). They live here, below both, so
neither has to import the other.
"""

from __future__ import annotations

import attrs

from mdgateway.smtp.clientmodel import SmtpTimeouts

#: How a profile spreads work: C{failover} prefers the first healthy server,
#: C{round_robin} takes turns.
STRATEGIES = ("failover", "round_robin")

#: How files are submitted to Core: C{sync} is one C{POST /file/sync} that
#: answers with the result (Core 4.21+; polled after a 408), C{poll} is
#: C{POST /file} and then polling, C{auto} chooses per server from the
#: version C{GET /version} reports.
SUBMIT_MODES = ("auto", "sync", "poll")


@attrs.frozen
class CoreServer:
    """
    One MetaDefender Core server.

    @ivar url: base URL without query string, e.g. C{http://127.0.0.1:8008};
        this is what headers, logs and history show.
    @ivar apikey: the C{?apikey=} of the configured URI; never logged.
    """

    url: str
    apikey: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class CoreProfile:
    """
    A named MetaDefender Core server profile.

    @ivar submit: one of L{SUBMIT_MODES}.
    @ivar verdict_cache: seconds a definitive verdict is reused for a file
        with the same SHA-256, name and Core rule (0: no verdict cache).
    @ivar verdict_cache_size: verdicts the cache holds at most.
    @ivar concurrency: scans in flight per server for parts smaller than
        C{big_part}.
    @ivar big_part: a part of at least this many bytes scans in the big
        lane, so a few large files never hold every slot small ones need.
    @ivar big_concurrency: scans in flight per server in the big lane, on
        top of C{concurrency}.
    """

    name: str
    servers: tuple[CoreServer, ...]
    strategy: str = "failover"
    rule: str = "Automatic"
    user_agent: str = "mdemailsecurity"
    poll_interval: float = 0.2
    scan_timeout: float = 300.0
    concurrency: int = 20
    ca_file: str | None = None
    hash_lookup: bool = False
    #: Consecutive failures before a server is taken out of rotation.
    failure_threshold: int = 3
    #: Seconds a server stays out before it is probed again.
    retry_after: float = 30.0
    submit: str = "auto"
    verdict_cache: float = 60.0
    verdict_cache_size: int = 10_000
    big_part: int = 4 * 1024 * 1024
    big_concurrency: int = 2


@attrs.frozen
class RelayServer:
    """
    One next-hop server of an SMTP profile.

    @ivar scheme: C{smtp} (plain, STARTTLS by policy), C{smtps} (implicit
        TLS), C{mx} (the MX hosts of C{host}, a domain) or C{maildir}
        (write C{.eml} files into the folder C{host}).
    """

    scheme: str
    host: str
    port: int = 25

    def __str__(self) -> str:
        if self.scheme == "maildir":
            return f"maildir:{self.host}"
        if self.scheme == "mx":
            return f"mx://{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@attrs.frozen
class SmtpProfile:
    """
    A named SMTP relay server profile.

    @ivar tls: C{none}, C{opportunistic} (STARTTLS when offered, no
        certificate check), C{required} (STARTTLS or fail, no check) or
        C{verify} (required, certificate and name checked).
    """

    name: str
    servers: tuple[RelayServer, ...]
    strategy: str = "failover"
    tls: str = "opportunistic"
    ca_file: str | None = None
    tls_name: str | None = None
    auth_user: str | None = None
    auth_password_file: str | None = None
    timeouts: SmtpTimeouts = SmtpTimeouts()
