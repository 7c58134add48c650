# -*- test-case-name: tests.test_core_client -*-
"""
The HTTP layer under the Core client: a plain L{Agent} over a persistent
connection pool, and nothing else.

treq's L{HTTPClient} wraps every request in a cookie agent (a cookie jar
emulating C{urllib} requests), a gzip decoder, a redirect agent unless told
not to, and parses and re-encodes the URL with C{hyperlink} and C{idna};
Twisted's own L{Agent} builds a new endpoint (another IDNA encoding) per
request. A profile of the client against an instant Core put those layers
at about a fifth of the client's time. Core sets no cookies, never
compresses and never redirects (following one would send the API key
wherever it pointed), so the client uses the plain agent with its endpoints
cached per server, and treq only to read bodies (L{treq.collect}).
"""

from __future__ import annotations

import re

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from mdgateway.endpoints import client_endpoint
from mdgateway.policy.profiles import CoreProfile

_PEM = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


@implementer(IAgentEndpointFactory)
class _CachedEndpoints:
    """
    One endpoint per scheme, host and port, made once (a profile names a
    handful of servers, and the client never follows a redirect elsewhere).
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        policy: BrowserLikePolicyForHTTPS,
        connect_timeout: float,
    ) -> None:
        """
        @param reactor: connects (L{IReactorTCP}) and times connection
            attempts out (L{IReactorTime}, which L{CoreHttp} checks).
        """
        self._reactor = reactor
        self._policy = policy
        self._connect_timeout = connect_timeout
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            plain = client_endpoint(
                self._reactor, uri.host.decode("ascii"), uri.port, self._connect_timeout
            )
            if uri.scheme == b"https":
                creator = self._policy.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, plain)
            else:
                endpoint = plain
            self._endpoints[key] = endpoint
        return endpoint


class CoreHttp:
    """
    Sends requests for the Core client: C{request(method, url, headers,
    body)} over a plain agent and a shared persistent pool.

    @ivar pool: the connections, kept alive between requests.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        pool: HTTPConnectionPool,
        policy: BrowserLikePolicyForHTTPS,
        connect_timeout: float = 10.0,
    ) -> None:
        """
        @param reactor: times requests and idle connections out, and
            connects: adapted to L{IReactorTCP} here, so a reactor that
            cannot connect fails when the gateway is assembled.
        """
        self.pool = pool
        endpoints = _CachedEndpoints(IReactorTCP(reactor), policy, connect_timeout)
        self._agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """
        One request; the response's body is read by the caller (with
        L{treq.collect}), which returns the connection to the pool.
        """
        sent: Deferred[IResponse] = self._agent.request(method, url, headers, body)
        return sent


def build_http_client(
    reactor: IReactorTime, profile: CoreProfile, *, connect_timeout: float = 10.0
) -> tuple[CoreHttp, HTTPConnectionPool]:
    """
    The HTTP layer with its own connection pool for one profile.

    Keeps up to C{profile.concurrency} idle connections per server (the
    runtime's semaphores bound the busy ones); trusts C{profile.ca_file}
    (one or more PEM certificates) instead of the system roots when set.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max(1, profile.concurrency)
    pool.cachedConnectionTimeout = 60
    if profile.ca_file:
        with open(profile.ca_file, "rb") as f:
            pems = _PEM.findall(f.read())
        if not pems:
            raise ValueError(f"no PEM certificate in {profile.ca_file}")
        roots = trustRootFromCertificates([Certificate.loadPEM(p) for p in pems])
        policy = BrowserLikePolicyForHTTPS(trustRoot=roots)
    else:
        policy = BrowserLikePolicyForHTTPS()
    return CoreHttp(reactor, pool, policy, connect_timeout), pool
