"""
Tests for L{mdgateway.ops.admin}, L{mdgateway.ops.adminjson} and
L{mdgateway.testing.ops}.

The API runs on a real listening port on 127.0.0.1, over a real SQLite
store (in memory) filled through its own API, with L{FakeOperations} as the
gateway; treq is the client. Every request opens its own connection
(non-persistent pool), so nothing outlives a test.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mdgateway.ops.admin import AdminAPI
from mdgateway.ops.adminhttp import MAX_BODY, parse_time
from mdgateway.ops.adminjson import iso
from mdgateway.ops.interfaces import (
    ActionResult,
    IOperations,
    OperationError,
    QueueAction,
    QueuedMessage,
    QueuedPart,
    QueueEntry,
    QueueRecipient,
    Readiness,
    ReloadResult,
)
from mdgateway.ops.tokens import (
    TokenFileError,
    load_or_create_tokens,
    parse_tokens,
    pick_token,
)
from mdgateway.store import (
    DeliveryStatus,
    MessageStatus,
    PartVerdict,
    ReceivedMessage,
    RecipientDelivery,
    Refusal,
    ScanVerdict,
    SqliteStore,
)
from mdgateway.testing.ops import FakeOperations

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-admin-token"
NOW = 1_800_000_000.0
T0 = NOW - 86400.0  # the seeded history is one day old


# --------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-admin")
    pool.start()
    yield pool
    pool.stop()


def original_bytes() -> bytes:
    """
    An original of about 300 KB (several store chunks and producer
    writes), with CRLF line ends and every byte value in its body.
    """
    head = (
        b"From: Carol <carol@example.com>\r\n"
        b"To: bob@example.org\r\n"
        b"Subject: Invoice\r\n"
        b"\r\n"
    )
    block = bytes(range(256)) * 4 + b"\r\n"
    return head + block * 300


@attrs.define
class Seeded:
    """
    What L{seed} put in the store.
    """

    item_id: str
    original: bytes


async def seed(store: SqliteStore) -> Seeded:
    """
    Three history entries (delivered, quarantined, deferred), three
    refusals and one quarantine item, through the store's own API.
    """

    def received(mid: str, at: float, **kw: Any) -> ReceivedMessage:
        fields: dict[str, Any] = {
            "id": mid,
            "queue_id": mid.split(".")[0],
            "received_at": at,
            "client_address": "192.0.2.10",
            "helo": "mx.example.net",
            "sender": "alice@example.net",
            "recipients": ("bob@example.org",),
            "rule": "Inbound",
            "direction": "inbound",
            "size": 1234,
            "subject": "Hello",
            "message_id_header": f"<{mid}@example.net>",
        }
        fields.update(kw)
        return ReceivedMessage(**fields)

    await store.record_received(received("Q1.1", T0 + 100))
    await store.record_verdicts(
        "Q1.1", [PartVerdict("1", "text/plain", 100, "Allowed")], at=T0 + 101
    )
    await store.record_delivery(
        "Q1.1",
        RecipientDelivery(
            "bob@example.org",
            DeliveryStatus.DELIVERED,
            250,
            "2.0.0",
            "Ok: queued as ABC",
            at=T0 + 102,
        ),
    )
    await store.update_status("Q1.1", MessageStatus.DELIVERED, "delivered", T0 + 102)

    await store.record_received(
        received(
            "Q2.1",
            T0 + 200,
            sender="carol@example.com",
            subject="Invoice with a very long subject line that a table must cut",
            rule="Outbound",
            direction="outbound",
        )
    )
    await store.record_verdicts(
        "Q2.1",
        [
            PartVerdict("1", "text/plain", 100, "Allowed"),
            PartVerdict(
                "2",
                "application/zip",
                5000,
                "Blocked",
                filename="invoice.zip",
                blocked_reason="Infected",
            ),
        ],
        actions=["blocked part 2"],
        at=T0 + 201,
    )
    original = original_bytes()
    item = await store.quarantine("Q2.1", "blocked", original, at=T0 + 202)
    await store.update_status(
        "Q2.1", MessageStatus.QUARANTINED, "quarantined", T0 + 202
    )

    await store.record_received(
        received("Q3.1", T0 + 300, sender="dave@example.net", subject="Report")
    )
    await store.update_status("Q3.1", MessageStatus.DEFERRED, "relay down", T0 + 301)

    for n, (code, enhanced, reason, listener) in enumerate(
        [
            (550, "5.7.1", "No security rule", "smtp"),
            (552, "5.3.4", "Message size exceeds fixed limit", "smtp"),
            (550, "5.7.1", "No security rule", "submission"),
        ]
    ):
        await store.record_refusal(
            Refusal(
                at=T0 + 400 + n,
                listener=listener,
                client_address=f"198.51.100.{n + 1}",
                code=code,
                enhanced=enhanced,
                reason=reason,
                helo="spammer.example",
                sender="x@spam.example",
                recipient="victim@example.org",
            )
        )
    return Seeded(item.id, original)


@attrs.define
class Env:
    """
    A running admin API over a seeded store.
    """

    store: SqliteStore
    ops: FakeOperations
    api: AdminAPI
    port: IListeningPort
    pool: HTTPConnectionPool
    seeded: Seeded
    scratch: Path

    @property
    def url(self) -> str:
        host: Any = self.port.getHost()
        return f"http://127.0.0.1:{host.port}"

    async def request(
        self,
        method: str,
        path: str,
        token: str | None = TOKEN,
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> Any:
        all_headers: dict[Any, Any] = dict(headers or {})
        if token is not None:
            all_headers.setdefault("Authorization", f"Bearer {token}")
        return await treq.request(
            method, self.url + path, headers=all_headers, pool=self.pool, **kw
        )

    async def json(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        response = await self.request(method, path, **kw)
        body = await response.content()
        assert response.headers.getRawHeaders("content-type") == [
            "application/json; charset=utf-8"
        ]
        return response.code, json.loads(body)


async def listen(site: Site) -> IListeningPort:
    port: IListeningPort = await TCP4ServerEndpoint(
        reactor, 0, interface="127.0.0.1"
    ).listen(site)
    return port


async def start_env(
    threadpool: ThreadPool, scratch: Path, ops_class: type = FakeOperations, **kw: Any
) -> Env:
    clock = Clock()
    clock.advance(NOW)
    store = SqliteStore(":memory:", reactor, threadpool)
    await store.open()
    seeded = await seed(store)
    ops = ops_class(store, clock=clock)
    api = AdminAPI(ops, TOKEN, clock, scratch_dir=str(scratch), **kw)
    port = await listen(api.site())
    pool = HTTPConnectionPool(reactor, persistent=False)
    return Env(store, ops, api, port, pool, seeded, scratch)


async def stop_env(env: Env) -> None:
    await env.pool.closeCachedConnections()
    await maybeDeferred(env.port.stopListening)
    await env.store.close()


@pytest_twisted.async_yield_fixture
async def env(threadpool: ThreadPool, tmp_path: Path) -> Any:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    e = await start_env(threadpool, scratch)
    yield e
    await stop_env(e)


@implementer(ILogObserver)
@attrs.define
class Recorder:
    events: list[LogEvent] = attrs.Factory(list)

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


# --------------------------------------------------------------------------
# The fake and the pure helpers


def test_fake_operations_provides_interface(threadpool: ThreadPool) -> None:
    """
    L{FakeOperations} provides L{IOperations}, every method and attribute
    verified.
    """
    store = SqliteStore(":memory:", reactor, threadpool)
    assert verifyObject(IOperations, FakeOperations(store))


@pytest_twisted.ensureDeferred
async def test_fake_operations_behaviour(env: Env) -> None:
    """
    The fake releases through the real store (released_by recorded),
    hands out new queue ids, answers 404 for unknown items and 409 for
    queue entries it does not hold, fails with a set error, and records
    every call.
    """
    ops, item_id = env.ops, env.seeded.item_id
    assert await ops.release(item_id, "tester") == ActionResult("FAKEQ0001")
    replayed = await ops.rescan(item_id, "tester", key="k1")
    assert await ops.rescan(item_id, "tester", key="k1") == attrs.evolve(
        replayed, replayed=True
    )
    assert (await env.store.get_quarantined(item_id)).released_by == "tester"
    with pytest.raises(OperationError) as caught:
        await ops.rescan("nope", "tester")
    assert caught.value.status == 404
    with pytest.raises(OperationError) as caught:
        await ops.queue_action(QueueAction("retry", "NOPE", "tester"))
    assert caught.value.status == 409
    ops.error = OperationError(409, "busy")
    with pytest.raises(OperationError) as caught:
        await ops.forward(item_id, ["x@example.org"], "tester")
    assert caught.value.status == 409
    assert [c[0] for c in ops.calls] == [
        "release",
        "rescan",
        "rescan",
        "rescan",
        "queue_action",
        "forward",
    ]


def test_parse_time_forms() -> None:
    """
    Time filters take ISO-8601 (UTC without an offset), epoch seconds and
    durations before now; anything else is C{None}.
    """
    assert parse_time("1700000000", NOW) == 1700000000.0
    assert parse_time("1700000000.5", NOW) == 1700000000.5
    assert parse_time("2h", NOW) == NOW - 7200
    assert parse_time("7d", NOW) == NOW - 7 * 86400
    assert parse_time("2023-11-14T22:13:20Z", NOW) == 1700000000.0
    assert parse_time("2023-11-14T22:13:20", NOW) == 1700000000.0
    assert parse_time("2023-11-14T23:13:20+01:00", NOW) == 1700000000.0
    for bad in ("yesterday", "-5", "nan", "1e9", "2h ago", ""):
        assert parse_time(bad, NOW) is None, bad


def test_iso_times() -> None:
    """
    API times are ISO-8601 UTC with milliseconds and C{Z}; C{None} stays.
    """
    assert iso(1700000000.25) == "2023-11-14T22:13:20.250Z"
    assert iso(None) is None


def test_token_required() -> None:
    """
    An empty or padded token is refused: it would let anyone in or never
    match.
    """
    ops: Any = object()
    for bad in ("", " x", "x\n"):
        with pytest.raises(ValueError):
            AdminAPI(ops, bad, Clock())


# --------------------------------------------------------------------------
# Authentication


PROTECTED = [
    ("GET", "/api/messages"),
    ("GET", "/api/messages/Q1.1"),
    ("GET", "/api/refused"),
    ("GET", "/api/quarantine"),
    ("GET", "/api/quarantine/ITEM/eml"),
    ("POST", "/api/quarantine/ITEM/release"),
    ("DELETE", "/api/quarantine/ITEM"),
    ("GET", "/api/queue"),
    ("POST", "/api/config/reload"),
    ("GET", "/metrics"),
    ("GET", "/no/such/path"),
]

BAD_CREDENTIALS = [
    (None, "missing bearer token"),
    ("Bearer wrong-token", "invalid token"),
    (f"Bearer {TOKEN}x", "invalid token"),
    (f"Bearer {TOKEN[:-1]}", "invalid token"),
    ("Bearer", "invalid token"),
    (f"Basic {TOKEN}", "not a bearer token"),
    (TOKEN, "not a bearer token"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(("authorization", "message"), BAD_CREDENTIALS)
@pytest_twisted.ensureDeferred
async def test_unauthorized(
    env: Env, method: str, path: str, authorization: str | None, message: str
) -> None:
    """
    Without the right bearer token every endpoint except the health checks
    answers 401 with a Bearer challenge and a JSON error, before routing
    (unknown paths included) and before any operation is called.
    """
    path = path.replace("ITEM", env.seeded.item_id)
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await env.request(method, path, token=None, headers=headers)
    body = json.loads(await response.content())
    assert response.code == 401
    challenge = response.headers.getRawHeaders("www-authenticate")[0]
    assert challenge.startswith("Bearer ")
    assert body == {"error": message, "status": 401}
    assert [c for c in env.ops.calls if c[0] != "readiness"] == []
    assert (await env.store.get_quarantined(env.seeded.item_id)).released_at is None


@pytest_twisted.ensureDeferred
async def test_wrong_token_challenge(env: Env) -> None:
    """
    A wrong token gets the RFC 6750 C{invalid_token} error in its challenge.
    """
    response = await env.request("GET", "/api/queue", token="nope")
    await response.content()
    assert (
        'error="invalid_token"' in response.headers.getRawHeaders("www-authenticate")[0]
    )


@pytest_twisted.ensureDeferred
async def test_health_without_token(env: Env) -> None:
    """
    C{/healthz} answers 200 alive without a token (also to HEAD, without a
    body); C{/readyz} answers 200 with the checks while ready.
    """
    code, body = await env.json("GET", "/healthz", token=None)
    assert (code, body) == (200, {"status": "alive"})
    response = await env.request("HEAD", "/healthz", token=None)
    assert response.code == 200
    assert await response.content() == b""
    code, body = await env.json("GET", "/readyz", token=None)
    assert code == 200
    assert body == {
        "ready": True,
        "checks": {"listeners": True, "spool": True},
        "reasons": [],
    }


@pytest_twisted.ensureDeferred
async def test_not_ready(env: Env) -> None:
    """
    C{/readyz} answers 503 with the failing checks and the reasons while
    the gateway is not ready.
    """
    env.ops.ready = Readiness(
        False, {"listeners": True, "spool": False}, ("spool not writable",)
    )
    code, body = await env.json("GET", "/readyz", token=None)
    assert code == 503
    assert body == {
        "ready": False,
        "checks": {"listeners": True, "spool": False},
        "reasons": ["spool not writable"],
    }


@pytest_twisted.ensureDeferred
async def test_dependencies_reported_not_judged(env: Env) -> None:
    """
    Shared services that are down leave C{/readyz} at 200 (ready) with a
    short C{dependencies} summary; C{/api/health} (with the token) has the
    full report.
    """
    core = {"c": {"available": False, "condition": "core_unreachable", "servers": []}}
    env.ops.ready = Readiness(
        True,
        {"listening": True},
        (),
        dependencies={
            "core": core,
            "relay": {},
            "store": {"ok": False, "error": "refused"},
        },
    )
    code, body = await env.json("GET", "/readyz", token=None)
    assert code == 200
    assert body["dependencies"] == {"core": {"c": False}, "relay": {}, "store": False}
    code, _ = await env.json("GET", "/api/health", token=None)
    assert code == 401
    code, body = await env.json("GET", "/api/health")
    assert code == 200
    assert body["ready"] is True
    assert body["dependencies"]["core"] == core
    assert body["dependencies"]["store"]["error"] == "refused"


@pytest_twisted.ensureDeferred
async def test_access_log_skips_healthy_probes(env: Env) -> None:
    """
    Every request is one structured access event (method, path, status,
    client), except a health probe that succeeds: C{/healthz} and a ready
    C{/readyz} are not logged, a C{/readyz} answering 503 is.
    """
    recorder = Recorder()
    globalLogPublisher.addObserver(recorder)
    try:
        await env.json("GET", "/healthz", token=None)
        await env.json("GET", "/readyz", token=None)
        await env.json("GET", "/api/queue")
        env.ops.ready = Readiness(False, {"spool": False}, ("spool",))
        await env.json("GET", "/readyz", token=None)
    finally:
        globalLogPublisher.removeObserver(recorder)
    access = [
        (e["method"], e["path"], e["status"], e["client"])
        for e in recorder.events
        if e.get("log_namespace") == "mdgateway.ops.admin.access"
    ]
    assert access == [
        ("GET", "/api/queue", 200, "127.0.0.1"),
        ("GET", "/readyz", 503, "127.0.0.1"),
    ]


@pytest_twisted.ensureDeferred
async def test_metrics_with_token(env: Env) -> None:
    """
    C{/metrics} with the token answers the operations' registry in
    Prometheus text, which prometheus-client parses back.
    """
    env.ops.metrics.bounce()
    response = await env.request("GET", "/metrics")
    body = (await response.content()).decode("utf-8")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    values = {
        s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples
    }
    assert values["mdgateway_bounces_total"] == 1.0


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_metrics_public(threadpool: ThreadPool, tmp_path: Path) -> None:
    """
    With C{metrics_public}, C{/metrics} needs no token, and the rest of the
    API still does.
    """
    e = await start_env(threadpool, tmp_path, metrics_public=True)
    try:
        response = await e.request("GET", "/metrics", token=None)
        assert b"mdgateway_bounces_total" in await response.content()
        assert response.code == 200
        response = await e.request("GET", "/api/queue", token=None)
        await response.content()
        assert response.code == 401
    finally:
        await stop_env(e)


# --------------------------------------------------------------------------
# History and refused log


@pytest_twisted.ensureDeferred
async def test_messages_list(env: Env) -> None:
    """
    The history lists every entry newest first with its total and no next
    cursor when all fit; times are ISO UTC.
    """
    code, body = await env.json("GET", "/api/messages")
    assert code == 200
    assert body["total"] == 3
    assert body["next_cursor"] is None
    assert [m["id"] for m in body["items"]] == ["Q3.1", "Q2.1", "Q1.1"]
    first = body["items"][2]
    assert first["status"] == "delivered"
    assert first["verdict"] == "Allowed"
    assert first["received_at"] == iso(T0 + 100)
    assert first["recipients"] == ["bob@example.org"]


@pytest_twisted.ensureDeferred
async def test_messages_paging(env: Env) -> None:
    """
    With C{limit=1} the cursor walks every entry exactly once, each page
    reporting the full total, and the last page has no cursor.
    """
    seen = []
    cursor = None
    for _ in range(5):
        query = "?limit=1" + (f"&cursor={cursor}" if cursor else "")
        code, body = await env.json("GET", "/api/messages" + query)
        assert code == 200
        assert body["total"] == 3
        assert len(body["items"]) == 1
        seen.append(body["items"][0]["id"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ["Q3.1", "Q2.1", "Q1.1"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("sender=CAROL", ["Q2.1"]),
        ("recipient=bob@", ["Q3.1", "Q2.1", "Q1.1"]),
        ("subject=report", ["Q3.1"]),
        ("status=delivered", ["Q1.1"]),
        ("status=delivered,deferred", ["Q3.1", "Q1.1"]),
        ("status=delivered&status=quarantined", ["Q2.1", "Q1.1"]),
        ("status=partially_delivered", []),
        ("verdict=blocked", ["Q2.1"]),
        ("verdict=Allowed,Blocked", ["Q2.1", "Q1.1"]),
        ("rule=Outbound", ["Q2.1"]),
        ("direction=outbound", ["Q2.1"]),
        ("queue_id=Q3", ["Q3.1"]),
        (f"since={int(T0 + 200)}", ["Q3.1", "Q2.1"]),
        (f"until={int(T0 + 200)}", ["Q1.1"]),
        ("since=" + (iso(T0 + 150) or ""), ["Q3.1", "Q2.1"]),
        ("since=" + (iso(T0 + 150) or "")[:-1], ["Q3.1", "Q2.1"]),
        ("since=2h", []),
        ("since=2d&until=86250s", ["Q1.1"]),
        ("sender=&subject=", ["Q3.1", "Q2.1", "Q1.1"]),
    ],
)
@pytest_twisted.ensureDeferred
async def test_messages_filters(env: Env, query: str, expected: list[str]) -> None:
    """
    Each history filter narrows the results as documented: substrings
    case-insensitively, several statuses or verdicts (repeated or
    comma-separated), times as epoch, ISO or a duration ago (by the
    injected clock); an empty value is no filter.
    """
    code, body = await env.json("GET", f"/api/messages?{query}")
    assert code == 200
    assert [m["id"] for m in body["items"]] == expected
    assert body["total"] == len(expected)


BAD_QUERIES = [
    ("/api/messages?since=yesterday", "since"),
    ("/api/messages?until=14:00", "until"),
    (f"/api/messages?since={int(T0)}&until={int(T0 - 10)}", "until"),
    ("/api/messages?status=lost", "status"),
    ("/api/messages?verdict=clean", "verdict"),
    ("/api/messages?direction=sideways", "direction"),
    ("/api/messages?limit=0", "limit"),
    ("/api/messages?limit=1001", "limit"),
    ("/api/messages?limit=ten", "limit"),
    ("/api/messages?limit=-1", "limit"),
    ("/api/messages?cursor=garbage", "cursor"),
    ("/api/messages?colour=red", "colour"),
    ("/api/messages?sender=a&sender=b", "sender"),
    ("/api/messages/Q1.1?verbose=1", "verbose"),
    ("/api/refused?code=abc", "code"),
    ("/api/refused?code=99", "code"),
    ("/api/refused?since=soon", "since"),
    ("/api/refused?cursor=garbage", "cursor"),
    ("/api/quarantine?pinned=maybe", "pinned"),
    ("/api/quarantine?released=2", "released"),
    ("/api/quarantine?direction=up", "direction"),
    ("/api/quarantine?limit=5000", "limit"),
    ("/api/quarantine?cursor=garbage", "cursor"),
    ("/api/queue?limit=5", "limit"),
]


@pytest.mark.parametrize(("path", "parameter"), BAD_QUERIES)
@pytest_twisted.ensureDeferred
async def test_bad_query(env: Env, path: str, parameter: str) -> None:
    """
    A bad filter, limit or cursor, or an unknown parameter, is refused with
    400 and a reason that names the parameter.
    """
    code, body = await env.json("GET", path)
    assert code == 400
    assert body["status"] == 400
    assert body["parameter"] == parameter
    assert body["error"].startswith(f"{parameter}: ")


@pytest_twisted.ensureDeferred
async def test_message_detail(env: Env) -> None:
    """
    One history entry comes with its timeline, parts, actions, deliveries
    and the ids of its quarantined originals; an unknown id is 404.
    """
    code, body = await env.json("GET", "/api/messages/Q2.1")
    assert code == 200
    assert body["id"] == "Q2.1"
    assert body["verdict"] == "Blocked"
    assert body["status"] == "quarantined"
    assert [p["result"] for p in body["parts"]] == ["Allowed", "Blocked"]
    assert body["parts"][1]["filename"] == "invoice.zip"
    assert body["actions"] == ["blocked part 2"]
    assert body["quarantine"] == [env.seeded.item_id]
    assert [e["text"] for e in body["timeline"]][-1] == "quarantined"
    code, body = await env.json("GET", "/api/messages/Q1.1")
    assert body["deliveries"][0]["code"] == 250
    assert body["deliveries"][0]["status"] == "delivered"
    code, body = await env.json("GET", "/api/messages/NOPE.1")
    assert code == 404
    assert body == {"error": "no history entry 'NOPE.1'", "status": 404}


@pytest_twisted.ensureDeferred
async def test_refused(env: Env) -> None:
    """
    The refused log lists refusals newest first and filters by listener
    and code.
    """
    code, body = await env.json("GET", "/api/refused")
    assert code == 200
    assert body["total"] == 3
    assert [r["client_address"] for r in body["items"]] == [
        "198.51.100.3",
        "198.51.100.2",
        "198.51.100.1",
    ]
    assert body["items"][0]["reason"] == "No security rule"
    code, body = await env.json("GET", "/api/refused?listener=smtp&code=550")
    assert [r["client_address"] for r in body["items"]] == ["198.51.100.1"]
    code, body = await env.json("GET", "/api/refused?client=100.2")
    assert body["total"] == 1


# --------------------------------------------------------------------------
# Quarantine


@pytest_twisted.ensureDeferred
async def test_quarantine_list_and_detail(env: Env) -> None:
    """
    The quarantine lists its items with their history summary and filters
    by pinned; one item is answered by id, an unknown id is 404.
    """
    item_id = env.seeded.item_id
    code, body = await env.json("GET", "/api/quarantine")
    assert code == 200
    assert body["total"] == 1
    item = body["items"][0]
    assert item["id"] == item_id
    assert item["reason"] == "blocked"
    assert item["size"] == len(env.seeded.original)
    assert item["sha256"] == hashlib.sha256(env.seeded.original).hexdigest()
    assert item["message"]["id"] == "Q2.1"
    code, body = await env.json("GET", "/api/quarantine?pinned=true")
    assert body["total"] == 0
    code, body = await env.json("GET", "/api/quarantine?pinned=false&rule=Outbound")
    assert body["total"] == 1
    code, body = await env.json("GET", f"/api/quarantine/{item_id}")
    assert (code, body["id"]) == (200, item_id)
    code, body = await env.json("GET", "/api/quarantine/0123")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_eml_download(env: Env) -> None:
    """
    The original downloads byte for byte as C{message/rfc822}, as an
    attachment named after the item, and the temporary file it was
    streamed from is gone afterwards.
    """
    item_id = env.seeded.item_id
    response = await env.request("GET", f"/api/quarantine/{item_id}/eml")
    body = await response.content()
    assert response.code == 200
    assert body == env.seeded.original
    headers = response.headers
    assert headers.getRawHeaders("content-type") == ["message/rfc822"]
    assert headers.getRawHeaders("content-disposition") == [
        f'attachment; filename="{item_id}.eml"'
    ]
    assert response.length == len(body)
    assert os.listdir(env.scratch) == []


@pytest_twisted.ensureDeferred
async def test_eml_unknown(env: Env) -> None:
    """
    Downloading an unknown item is 404 in JSON and leaves no temporary
    file behind.
    """
    code, body = await env.json("GET", "/api/quarantine/ffff/eml")
    assert code == 404
    assert body["status"] == 404
    assert os.listdir(env.scratch) == []


@pytest_twisted.ensureDeferred
async def test_release_and_rescan(env: Env) -> None:
    """
    Release and rescan reach the operations with the operator identity
    (the name of the token: C{admin} for an unnamed one) and answer 202
    with the new queue id; the release is recorded on the item.
    """
    item_id = env.seeded.item_id
    code, body = await env.json("POST", f"/api/quarantine/{item_id}/release")
    assert code == 202
    assert body == {
        "id": item_id,
        "action": "release",
        "queue_id": "FAKEQ0001",
        "replayed": False,
    }
    code, body = await env.json("POST", f"/api/quarantine/{item_id}/rescan", data=b"{}")
    assert (code, body["queue_id"]) == (202, "FAKEQ0002")
    assert env.ops.calls == [
        ("release", item_id, "admin", False, None),
        ("rescan", item_id, "admin", False, None),
    ]
    item = await env.store.get_quarantined(item_id)
    assert item.released_by == "admin"


@pytest_twisted.ensureDeferred
async def test_operation_errors(env: Env) -> None:
    """
    An L{OperationError} answers with its own status and message: 404 for
    an unknown item, 409 when the gateway says so.
    """
    code, body = await env.json("POST", "/api/quarantine/nope/release")
    assert (code, body) == (404, {"error": "no quarantine item 'nope'", "status": 404})
    env.ops.error = OperationError(409, "already being released")
    code, body = await env.json("POST", f"/api/quarantine/{env.seeded.item_id}/rescan")
    assert (code, body) == (409, {"error": "already being released", "status": 409})


@pytest_twisted.ensureDeferred
async def test_forward(env: Env) -> None:
    """
    Forward passes the validated addresses to the operations and answers
    202 with them and the new queue id.
    """
    item_id = env.seeded.item_id
    code, body = await env.json(
        "POST",
        f"/api/quarantine/{item_id}/forward",
        json={"to": ["sec@example.org", "Soc.Team@example.com"]},
    )
    assert code == 202
    assert body["to"] == ["sec@example.org", "Soc.Team@example.com"]
    assert body["queue_id"] == "FAKEQ0001"
    assert env.ops.calls == [
        (
            "forward",
            item_id,
            ["sec@example.org", "Soc.Team@example.com"],
            "admin",
            False,
            None,
        )
    ]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "to: must be a non-empty list"),
        (b"{}", "to: must be a non-empty list"),
        (b'{"to": []}', "to: must be a non-empty list"),
        (b'{"to": "a@example.org"}', "to: must be a non-empty list"),
        (b'{"to": ["not an address"]}', "to: not an address"),
        (b'{"to": [42]}', "to: not an address"),
        (b'{"to": ["a@example.org"], "cc": []}', "cc: unknown field"),
        (b'["a@example.org"]', "the body must be a JSON object"),
        (b"{to: nope", "the body is not valid JSON"),
        (b"\xff\xfe", "the body is not valid JSON"),
        (
            json.dumps({"to": [f"u{n}@example.org" for n in range(101)]}).encode(),
            "to: at most 100",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_forward_bad_body(env: Env, data: bytes, fragment: str) -> None:
    """
    A forward whose body is not a JSON object with a non-empty list of
    valid addresses (and nothing else) is 400 and reaches no operation.
    """
    code, body = await env.json(
        "POST", f"/api/quarantine/{env.seeded.item_id}/forward", data=data
    )
    assert code == 400
    assert body["error"].startswith(fragment)
    assert env.ops.calls == []


@pytest_twisted.ensureDeferred
async def test_pin(env: Env) -> None:
    """
    Pinning sets and clears the item's flag in the store and answers the
    updated item (whatever content type the JSON body is labelled with);
    bad bodies are 400, an unknown item 404.
    """
    item_id = env.seeded.item_id
    path = f"/api/quarantine/{item_id}/pin"
    code, body = await env.json("POST", path, json={"pinned": True})
    assert (code, body["pinned"]) == (200, True)
    assert (await env.store.get_quarantined(item_id)).pinned
    # As curl -d sends it: a JSON body labelled as a form.
    code, body = await env.json(
        "POST",
        path,
        data=b'{"pinned": false}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert (code, body["pinned"]) == (200, False)
    assert not (await env.store.get_quarantined(item_id)).pinned
    for bad in ({}, {"pinned": "yes"}, {"pinned": 1}, {"pinned": True, "x": 1}):
        code, body = await env.json("POST", path, json=bad)
        assert code == 400, bad
    code, body = await env.json(
        "POST", "/api/quarantine/nope/pin", json={"pinned": True}
    )
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_delete(env: Env) -> None:
    """
    Deleting removes the item (its detail is then 404); deleting it again
    is 404.
    """
    item_id = env.seeded.item_id
    code, body = await env.json("DELETE", f"/api/quarantine/{item_id}")
    assert (code, body) == (200, {"id": item_id, "deleted": True})
    code, _ = await env.json("GET", f"/api/quarantine/{item_id}")
    assert code == 404
    code, _ = await env.json("DELETE", f"/api/quarantine/{item_id}")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_mutations_logged(env: Env) -> None:
    """
    Every successful mutating call is logged with the operator identity.
    """
    recorder = Recorder()
    globalLogPublisher.addObserver(recorder)
    try:
        item_id = env.seeded.item_id
        await env.json("POST", f"/api/quarantine/{item_id}/pin", json={"pinned": True})
        await env.json("POST", f"/api/quarantine/{item_id}/release")
        await env.json("DELETE", f"/api/quarantine/{item_id}")
        await env.json("POST", "/api/config/reload")
    finally:
        globalLogPublisher.removeObserver(recorder)
    logged = [
        (e["action"], e["target"], e["by"])
        for e in recorder.events
        if e.get("log_namespace", "").startswith("mdgateway.ops.admin")
        and "action" in e
    ]
    assert logged == [
        ("pinned", item_id, "admin"),
        ("released quarantine item", item_id, "admin"),
        ("deleted quarantine item", item_id, "admin"),
        ("configuration reload", "loaded", "admin"),
    ]


# --------------------------------------------------------------------------
# Queue and configuration


def entry(queue_id: str, at: float) -> QueueEntry:
    return QueueEntry(
        queue_id=queue_id,
        received_at=at,
        sender="alice@example.net",
        size=2048,
        recipients=(
            QueueRecipient("bob@example.org", "deferred", "Inbound", "451 4.3.0 later"),
        ),
        attempts=2,
        next_attempt=at + 600,
        last_error="451 4.3.0 later",
    )


@pytest_twisted.ensureDeferred
async def test_queue(env: Env) -> None:
    """
    The queue lists the operations' entries oldest first, each with its
    instance and hold, and every instance with what it could list; retry
    reaches the operations for a known id (202) and is 409 for one not in
    the queue.
    """
    env.ops.entries = [entry("QB", NOW - 100), entry("QA", NOW - 500)]
    code, body = await env.json("GET", "/api/queue")
    assert code == 200
    assert body["total"] == 2
    assert [e["queue_id"] for e in body["items"]] == ["QA", "QB"]
    assert body["items"][0]["recipients"][0]["status"] == "deferred"
    assert body["items"][0]["next_attempt"] == iso(NOW - 500 + 600)
    assert body["items"][0]["held_by"] is None
    assert body["instances"] == [
        {"name": "fake-gw", "this": True, "listed": 2, "total": 2, "problem": None}
    ]
    code, body = await env.json("POST", "/api/queue/QA/retry")
    assert code == 202
    assert (body["queue_id"], body["action"], body["instance"]) == (
        "QA",
        "retry",
        "fake-gw",
    )
    code, body = await env.json("POST", "/api/queue/QZ/retry")
    assert code == 409
    assert ("queue_action", "retry", "QA", "admin", False) in env.ops.calls
    code, body = await env.json("GET", "/api/queue?instance=elsewhere")
    assert code == 404
    code, body = await env.json("GET", "/api/queue?colour=red")
    assert (code, body["parameter"]) == (400, "colour")


@pytest_twisted.ensureDeferred
async def test_queue_tools(env: Env) -> None:
    """
    Hold, release the hold, bounce and delete (with a bounce, from the
    body or the query) reach the operations with the token's name and the
    instance asked for; a repeated hold says nothing changed; an action on
    a message no longer queued is 409; bad fields are 400; flush answers
    per instance. Each is in the audit under the operator's name.
    """
    env.ops.entries = [entry("QA", NOW - 500), entry("QB", NOW - 100)]
    code, body = await env.json("POST", "/api/queue/QA/hold", json={})
    assert (code, body["action"], body["changed"]) == (200, "hold", True)
    code, body = await env.json("POST", "/api/queue/QA/hold")
    assert (code, body["changed"]) == (200, False)
    code, body = await env.json("GET", "/api/queue")
    assert body["items"][0]["held_by"] == "admin"
    assert body["items"][0]["next_attempt"] is None
    code, body = await env.json("POST", "/api/queue/QA/retry")
    assert code == 409
    code, body = await env.json("DELETE", "/api/queue/QA/hold")
    assert (code, body["action"], body["changed"]) == (200, "release-hold", True)
    code, body = await env.json(
        "POST", "/api/queue/QA/bounce", json={"instance": "fake-gw"}
    )
    assert (code, body["action"]) == (200, "bounce")
    code, body = await env.json("POST", "/api/queue/QA/bounce")
    assert code == 409
    code, body = await env.json("DELETE", "/api/queue/QB", json={"bounce": True})
    assert (code, body["action"]) == (200, "delete")
    assert env.ops.calls[-1] == ("queue_action", "delete", "QB", "admin", True)
    env.ops.entries = [entry("QC", NOW)]
    code, body = await env.json("DELETE", "/api/queue/QC?bounce=false")
    assert code == 200
    assert env.ops.calls[-1] == ("queue_action", "delete", "QC", "admin", False)
    for path, bad in (
        ("/api/queue/QC/hold", {"colour": "red"}),
        ("/api/queue/QC/hold", {"instance": 5}),
    ):
        code, body = await env.json("POST", path, json=bad)
        assert code == 400, bad
    code, body = await env.json("DELETE", "/api/queue/QC", json={"bounce": "yes"})
    assert code == 400
    code, body = await env.json("POST", "/api/queue/flush", json={})
    assert (code, body) == (202, {"tried": {"fake-gw": 0}, "problems": {}})
    code, body = await env.json("GET", "/api/audit?limit=20")
    got = [(e["actor"], e["action"], e["target"], e["result"]) for e in body["items"]]
    assert got[::-1][:5] == [
        ("admin", "hold", "QA", "done"),
        ("admin", "hold", "QA", "done"),
        ("admin", "retry", "QA", "refused"),
        ("admin", "release-hold", "QA", "done"),
        ("admin", "bounce", "QA", "done"),
    ]
    assert ("admin", "delete-queued", "QB", "done") in got
    assert ("admin", "flush", "all instances", "done") in got


@pytest_twisted.ensureDeferred
async def test_queued_message(env: Env) -> None:
    """
    One queued message's content view: its queue facts, header block and
    parts as the operations give them; 409 for one no longer queued.
    """
    env.ops.entries = [entry("QA", NOW)]
    env.ops.contents["QA"] = QueuedMessage(
        entry=attrs.evolve(entry("QA", NOW), instance="fake-gw"),
        client_address="192.0.2.1",
        client_helo="mx.example.net",
        headers="Subject: <b>hi</b>\r\n",
        headers_complete=True,
        parts=(
            QueuedPart("1", 0, "text/plain", None, None, "utf-8", "7bit", 5, "hello"),
        ),
    )
    code, body = await env.json("GET", "/api/queue/QA")
    assert code == 200
    assert body["headers"] == "Subject: <b>hi</b>\r\n"
    assert body["parts"][0]["preview"] == "hello"
    assert (body["client_helo"], body["instance"]) == ("mx.example.net", "fake-gw")
    code, _ = await env.json("GET", "/api/queue/QZ")
    assert code == 409
    assert ("queued_message", "QZ", None) in env.ops.calls


@pytest_twisted.ensureDeferred
async def test_reload(env: Env) -> None:
    """
    Reload answers 200 with C{loaded} true when the file loaded, with the
    settings it applied and those that need a restart, and 422 with every
    problem line when it did not (also from an older operations object
    that answers with a pair).
    """
    env.ops.reload_result = ReloadResult(
        True, applied=("sender_helo_domain",), restart_required=("workers",)
    )
    code, body = await env.json("POST", "/api/config/reload")
    assert (code, body) == (
        200,
        {
            "loaded": True,
            "problems": [],
            "applied": ["sender_helo_domain"],
            "restart_required": ["workers"],
        },
    )
    env.ops.reload_result = ReloadResult(
        False, ("rules[0].relay_profile: unknown profile 'x'",)
    )
    code, body = await env.json("POST", "/api/config/reload")
    assert code == 422
    assert body == {
        "loaded": False,
        "problems": ["rules[0].relay_profile: unknown profile 'x'"],
        "applied": [],
        "restart_required": [],
    }


# --------------------------------------------------------------------------
# Routing and limits


@pytest.mark.parametrize(
    "path",
    ["/", "/api", "/api/nothing", "/api/messages/Q1.1/extra", "/healthz/x"],
)
@pytest_twisted.ensureDeferred
async def test_not_found(env: Env, path: str) -> None:
    """
    Unknown paths are 404 in JSON.
    """
    code, body = await env.json("GET", path)
    assert (code, body) == (404, {"error": "no such resource", "status": 404})


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/api/messages", "GET, HEAD"),
        ("DELETE", "/api/queue", "GET, HEAD"),
        ("GET", "/api/quarantine/ITEM/release", "POST"),
        ("PUT", "/api/quarantine/ITEM", "GET, DELETE, HEAD"),
        ("GET", "/api/config/reload", "POST"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_method(env: Env, method: str, path: str, allow: str) -> None:
    """
    A known path with the wrong method is 405 with an C{Allow} header.
    """
    response = await env.request(method, path.replace("ITEM", env.seeded.item_id))
    body = json.loads(await response.content())
    assert response.code == 405
    assert body["status"] == 405
    assert response.headers.getRawHeaders("allow") == [allow]


@implementer(IBodyProducer)
class Chunked:
    """
    A request body of unannounced length (sent chunked).
    """

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes) -> None:
        self.data = data

    def startProducing(self, consumer: Any) -> Deferred[None]:
        for start in range(0, len(self.data), 8192):
            consumer.write(self.data[start : start + 8192])
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest.mark.parametrize("chunked", [False, True])
@pytest_twisted.ensureDeferred
async def test_body_too_large(env: Env, chunked: bool) -> None:
    """
    A body over the limit is refused with 413 whether its length was
    announced or it came chunked, and reaches no operation.
    """
    data = b'{"to": ["' + b"a" * MAX_BODY + b'@example.org"]}'
    body: Any = Chunked(data) if chunked else data
    code, answer = await env.json(
        "POST", f"/api/quarantine/{env.seeded.item_id}/forward", data=body
    )
    assert code == 413
    assert answer["status"] == 413
    assert env.ops.calls == []


@pytest_twisted.ensureDeferred
async def test_plain_site_body_limit(threadpool: ThreadPool, tmp_path: Path) -> None:
    """
    Served by a plain L{Site} (C{resource()} only), the API still refuses
    a body over its limit with 413.
    """
    clock = Clock()
    store = SqliteStore(":memory:", reactor, threadpool)
    await store.open()
    ops = FakeOperations(store)
    api = AdminAPI(ops, TOKEN, clock, max_body=100)
    port = await listen(Site(api.resource()))
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        host: Any = port.getHost()
        url = f"http://127.0.0.1:{host.port}/api/config/reload"
        response = await treq.post(
            url,
            data=b"{" + b" " * 200 + b"}",
            headers=Headers({"Authorization": [f"Bearer {TOKEN}"]}),
            pool=pool,
        )
        await response.content()
        assert response.code == 413
        assert ops.calls == []
    finally:
        await pool.closeCachedConnections()
        await maybeDeferred(port.stopListening)
        await store.close()


@pytest_twisted.ensureDeferred
async def test_store_unavailable(env: Env) -> None:
    """
    When the store fails, the API answers 503 rather than a traceback.
    """
    await env.store.close()
    code, body = await env.json("GET", "/api/messages")
    assert (code, body) == (503, {"error": "the store is unavailable", "status": 503})


class BrokenOperations(FakeOperations):
    """
    Operations whose queue view has a bug.
    """

    def cluster_queue(self, instance: str | None = None) -> Deferred[Any]:
        raise RuntimeError("secret internals")


@pytest_twisted.ensureDeferred
async def test_internal_error(threadpool: ThreadPool, tmp_path: Path) -> None:
    """
    A failure nobody expected is 500 with a generic message that does not
    leak the exception.
    """
    e = await start_env(threadpool, tmp_path, ops_class=BrokenOperations)
    try:
        code, body = await e.json("GET", "/api/queue")
        assert (code, body) == (500, {"error": "internal error", "status": 500})
    finally:
        await stop_env(e)


@pytest_twisted.ensureDeferred
async def test_verdict_vocabulary_matches_store(env: Env) -> None:
    """
    Every store verdict is accepted by the verdict filter, in any case.
    """
    for verdict in ScanVerdict:
        code, _ = await env.json(
            "GET", f"/api/messages?verdict={verdict.value.upper()}"
        )
        assert code == 200


@pytest_twisted.ensureDeferred
async def test_encoded_paths_and_queries(env: Env) -> None:
    """
    Path segments and query values are percent-decoded (an id may be
    encoded); a query that is not percent-encoded UTF-8 is 400.
    """
    code, body = await env.json("GET", "/api/messages/Q1%2E1")
    assert (code, body["id"]) == (200, "Q1.1")
    code, body = await env.json("GET", "/api/messages?subject=%48ello")
    assert [m["id"] for m in body["items"]] == ["Q1.1"]
    code, body = await env.json("GET", "/api/messages?sender=%FF")
    assert code == 400


class FailingReadiness(FakeOperations):
    """
    Operations whose readiness check itself fails.
    """

    def readiness(self) -> Readiness:
        raise RuntimeError("check crashed")


@pytest_twisted.ensureDeferred
async def test_readiness_check_fails(threadpool: ThreadPool, tmp_path: Path) -> None:
    """
    When the readiness check raises, C{/readyz} answers 503 (not ready)
    rather than 500, so a load balancer takes the instance out.
    """
    e = await start_env(threadpool, tmp_path, ops_class=FailingReadiness)
    try:
        code, body = await e.json("GET", "/readyz", token=None)
        assert code == 503
        assert body["ready"] is False
        assert body["reasons"] == ["the readiness check failed"]
    finally:
        await stop_env(e)


class AbortingClient(Protocol):
    """
    Asks for one URL and aborts the connection at the first bytes of the
    answer.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        transport: Any = self.transport
        transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_download_aborted(env: Env) -> None:
    """
    A client that drops the connection in the middle of a large download
    leaves no temporary file behind, and the API keeps serving.
    """
    big = os.urandom(1024) * 8 * 1024  # 8 MiB, more than socket buffers hold
    item = await env.store.quarantine("Q1.1", "blocked", big)
    host: Any = env.port.getHost()
    client = AbortingClient(
        f"GET /api/quarantine/{item.id}/eml HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    )
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", host.port), client)
    await client.closed
    assert client.received.startswith(b"HTTP/1.1 200 ")
    code, body = await env.json("GET", "/healthz")
    assert (code, body) == (200, {"status": "alive"})
    assert os.listdir(env.scratch) == []


# --------------------------------------------------------------------------
# Named tokens, idempotency keys, force and the audit


class TokenFileTests(SynchronousTestCase):
    """
    The token file: named tokens, and the single unnamed token of earlier
    versions, which is named C{admin}.
    """

    def test_named_and_legacy_tokens(self) -> None:
        """
        C{name:token} lines give named tokens; comments and blank lines are
        skipped; a bare token is C{admin}.
        """
        text = "# operators\n\nalice:tok-a\nbob:tok-b\n"
        self.assertEqual(parse_tokens(text), {"alice": "tok-a", "bob": "tok-b"})
        self.assertEqual(parse_tokens("just-one-token\n"), {"admin": "just-one-token"})

    def test_bad_files_name_the_line(self) -> None:
        """
        A bad name, a repeated name or token, a token with spaces or a
        file without tokens is refused with the file and line.
        """
        for text, fragment in (
            ("al ice:x\n", "line 1"),
            ("alice:x\nalice:y\n", "used twice"),
            ("alice:x\nbob:x\n", "same token"),
            ("alice:a b\n", "no spaces"),
            ("# nothing\n", "no token"),
        ):
            with self.assertRaises(TokenFileError) as caught:
                parse_tokens(text, "tokens.txt")
            self.assertIn(fragment, str(caught.exception))
            self.assertIn("tokens.txt", str(caught.exception))

    def test_pick_token(self) -> None:
        """
        A client uses the token it names, else the only one, else C{admin};
        several without C{admin} and no name is an error.
        """
        self.assertEqual(pick_token({"alice": "a"}, None), "a")
        self.assertEqual(pick_token({"alice": "a", "admin": "x"}, None), "x")
        self.assertEqual(pick_token({"alice": "a", "bob": "b"}, "bob"), "b")
        with self.assertRaises(TokenFileError):
            pick_token({"alice": "a", "bob": "b"}, None)
        with self.assertRaises(TokenFileError):
            pick_token({"alice": "a"}, "carol")

    def test_first_start_creates_a_private_admin_token(self) -> None:
        """
        Without a file, one random token named C{admin} is written, mode
        0600 in a 0700 folder; an existing legacy file is read as it is.
        """
        import tempfile

        base = Path(tempfile.mkdtemp())
        path = base / "new" / "admin.token"
        tokens = load_or_create_tokens(str(path))
        self.assertEqual(list(tokens), ["admin"])
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        self.assertEqual(path.parent.stat().st_mode & 0o777, 0o700)
        self.assertEqual(load_or_create_tokens(str(path)), tokens)
        legacy = base / "legacy.token"
        legacy.write_text("old-token\n")
        self.assertEqual(load_or_create_tokens(str(legacy)), {"admin": "old-token"})


@pytest_twisted.ensureDeferred
async def test_named_tokens_name_the_operator(
    threadpool: ThreadPool, tmp_path: Path
) -> None:
    """
    With named tokens, each request is done as the token's name: actions
    reach the gateway under it and the audit records it with the action,
    the result and where the request came from; an unknown token is 401.
    """
    env = await start_env(threadpool, tmp_path)
    try:
        env.api.set_tokens({"alice": "alice-token", "bob": "bob-token"})
        item_id = env.seeded.item_id
        code, _ = await env.json("GET", "/api/messages", token=TOKEN)
        assert code == 401
        code, body = await env.json(
            "POST",
            f"/api/quarantine/{item_id}/release",
            token="bob-token",
            json={"force": True, "idempotency_key": "k-1"},
        )
        assert code == 202
        assert env.ops.calls[-1] == ("release", item_id, "bob", True, "k-1")
        code, _ = await env.json(
            "POST",
            f"/api/quarantine/{item_id}/pin",
            token="alice-token",
            json={"pinned": True},
        )
        assert code == 200
        code, _ = await env.json(
            "POST", "/api/queue/NOPE/retry", token="alice-token", data=b"{}"
        )
        assert code == 409
        code, body = await env.json("GET", "/api/audit", token="bob-token")
        assert code == 200
        got = [
            (e["actor"], e["action"], e["target"], e["result"]) for e in body["items"]
        ]
        assert got == [
            ("alice", "retry", "NOPE", "refused"),
            ("alice", "pin", item_id, "done"),
        ]
        assert body["items"][0]["detail"].endswith("from 127.0.0.1")
        code, body = await env.json(
            "GET", "/api/audit?actor=alice&action=pin", token="bob-token"
        )
        assert body["total"] == 1
    finally:
        await stop_env(env)


@pytest_twisted.ensureDeferred
async def test_idempotency_key_and_force(env: Env) -> None:
    """
    The idempotency key comes from the body or the C{Idempotency-Key}
    header; a retry with the same key is answered as a replay; a body and
    header that disagree, a non-boolean C{force} or an unknown field are
    refused with 400 and reach nothing.
    """
    item_id = env.seeded.item_id
    path = f"/api/quarantine/{item_id}/rescan"
    code, first = await env.json("POST", path, headers={"Idempotency-Key": "r-1"})
    code, again = await env.json("POST", path, json={"idempotency_key": "r-1"})
    assert code == 202
    assert (again["queue_id"], again["replayed"]) == (first["queue_id"], True)
    assert first["replayed"] is False
    calls = list(env.ops.calls)
    for kw in (
        {"json": {"idempotency_key": "a"}, "headers": {"Idempotency-Key": "b"}},
        {"json": {"force": "yes"}},
        {"json": {"forcefully": True}},
        {"json": {"idempotency_key": ""}},
    ):
        code, body = await env.json("POST", path, **kw)
        assert code == 400, kw
    assert env.ops.calls == calls
