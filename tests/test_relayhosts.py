"""
Tests for expanding relay servers into hosts: MX order, fallback, null MX.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mdgateway.policy.profiles import RelayServer
from mdgateway.relay.hosts import (
    DNSPythonResolver,
    IMXResolver,
    NullMXError,
    expand,
    order_mx,
)
from mdgateway.testing.relay import TableResolver
from mdgateway.testing.threads import ThreadsClock


def no_shuffle(hosts: list[str]) -> None:
    hosts.sort()


class OrderTests(SynchronousTestCase):
    """
    MX ordering (RFC 5321 5.1).
    """

    def test_verified(self) -> None:
        """
        The table resolver and the dnspython resolver provide IMXResolver.
        """
        verifyObject(IMXResolver, TableResolver({}))
        verifyObject(IMXResolver, DNSPythonResolver(ThreadsClock(), ThreadPool()))

    def test_by_preference(self) -> None:
        """
        Lower preference first; equal preferences are shuffled among
        themselves; duplicates and trailing dots are dropped.
        """
        records = [
            (20, "b.mx.example."),
            (10, "z.mx.example"),
            (20, "a.mx.example"),
            (10, "Z.MX.example"),
        ]
        self.assertEqual(
            order_mx(records, no_shuffle),
            ["z.mx.example", "a.mx.example", "b.mx.example"],
        )
        reversed_order = order_mx(records, lambda hosts: hosts.sort(reverse=True))
        self.assertEqual(reversed_order[0], "z.mx.example")
        self.assertEqual(reversed_order[1:], ["b.mx.example", "a.mx.example"])

    def test_null_mx(self) -> None:
        """
        A null MX ("0 .") means the domain accepts no mail.
        """
        with self.assertRaises(NullMXError):
            order_mx([(0, ".")], no_shuffle)


class ExpandTests(SynchronousTestCase):
    """
    Expanding one configured server.
    """

    def test_plain_servers_unchanged(self) -> None:
        """
        smtp:// and smtps:// servers are used as configured.
        """
        server = RelayServer("smtps", "relay.example", 465)
        d = Deferred.fromCoroutine(expand(server, TableResolver({})))
        self.assertEqual(self.successResultOf(d), [server])

    def test_mx(self) -> None:
        """
        mx://domain becomes the MX hosts in order, on port 25.
        """
        resolver = TableResolver(
            {"example.com": [(5, "mx2.example.com"), (1, "mx1.example.com")]}
        )
        d = Deferred.fromCoroutine(
            expand(RelayServer("mx", "example.com", 25), resolver, no_shuffle)
        )
        self.assertEqual(
            self.successResultOf(d),
            [
                RelayServer("smtp", "mx1.example.com", 25),
                RelayServer("smtp", "mx2.example.com", 25),
            ],
        )

    def test_no_mx_falls_back_to_domain(self) -> None:
        """
        A domain without MX records is its own mail host (implicit MX).
        """
        d = Deferred.fromCoroutine(
            expand(
                RelayServer("mx", "example.net", 25), TableResolver({"example.net": []})
            )
        )
        self.assertEqual(
            self.successResultOf(d), [RelayServer("smtp", "example.net", 25)]
        )

    def test_lookup_failure(self) -> None:
        """
        A failed lookup is a LookupError for the caller.
        """
        d = Deferred.fromCoroutine(
            expand(RelayServer("mx", "nowhere.invalid", 25), TableResolver({}))
        )
        self.failureResultOf(d, LookupError)
