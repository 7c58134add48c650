# -*- test-case-name: tests.test_relayhosts -*-
"""
Turning a relay profile's servers into the hosts to connect to, in order.

C{mx://domain} becomes the domain's MX hosts by preference (RFC 5321 5.1),
or the domain itself when it has no MX record. The lookup is dnspython's
blocking resolver, so it runs in a thread; tests inject their own resolver.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from mdgateway.policy.profiles import RelayServer


class NullMXError(Exception):
    """
    The domain publishes a null MX (RFC 7505): it accepts no mail.
    """


class IMXResolver(Interface):
    """
    Looks up MX records.
    """

    def mx(domain: str) -> Any:  # noqa: N805
        """
        @return: a L{Deferred} firing with C{[(preference, host), ...]}, an
            empty list when the domain has no MX record; failing with
            L{LookupError} when the domain does not exist or DNS fails.
        """


@implementer(IMXResolver)
@attrs.frozen
class DNSPythonResolver:
    """
    dnspython's resolver, run in a thread pool so the reactor never waits
    on DNS.
    """

    reactor: IReactorFromThreads
    threadpool: ThreadPool
    lifetime: float = 10.0

    def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        return deferToThreadPool(self.reactor, self.threadpool, self._lookup, domain)

    def _lookup(self, domain: str) -> list[tuple[int, str]]:
        import dns.exception
        import dns.resolver

        resolver = dns.resolver.Resolver()
        resolver.lifetime = self.lifetime
        try:
            answer = resolver.resolve(domain, "MX")
        except dns.resolver.NoAnswer:
            return []
        except dns.resolver.NXDOMAIN:
            raise LookupError(f"{domain}: no such domain") from None
        except dns.exception.DNSException as e:
            raise LookupError(f"{domain}: DNS lookup failed: {e}") from None
        return [
            (int(record.preference), record.exchange.to_text(omit_final_dot=True))
            for record in answer
        ]


def order_mx(
    records: Sequence[tuple[int, str]], shuffle: Callable[[list[str]], None]
) -> list[str]:
    """
    MX hosts by preference, equal preferences in random order (RFC 5321
    5.1), duplicates removed.

    @raise NullMXError: the records are a null MX.
    """
    if any(host in ("", ".") for _, host in records):
        raise NullMXError("null MX: the domain accepts no mail")
    by_preference: dict[int, list[str]] = {}
    for preference, host in records:
        by_preference.setdefault(preference, []).append(host.rstrip(".").lower())
    ordered: list[str] = []
    for preference in sorted(by_preference):
        hosts = by_preference[preference]
        shuffle(hosts)
        for host in hosts:
            if host not in ordered:
                ordered.append(host)
    return ordered


async def expand(
    server: RelayServer,
    resolver: IMXResolver,
    shuffle: Callable[[list[str]], None] = random.shuffle,
) -> list[RelayServer]:
    """
    The concrete servers for one configured server: itself, or for
    C{mx://domain} its MX hosts (falling back to the domain's own address).

    @raise LookupError: the MX lookup failed.
    @raise NullMXError: the domain accepts no mail.
    """
    if server.scheme != "mx":
        return [server]
    records: list[tuple[int, str]] = await resolver.mx(server.host)
    hosts = order_mx(records, shuffle) if records else [server.host]
    return [RelayServer("smtp", host, server.port or 25) for host in hosts]
