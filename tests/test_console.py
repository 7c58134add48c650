"""
Tests for the web console (L{mdgateway.ops.console}) over HTTP.

The console is served beside the admin API (as the gateway mounts it) on a
real listening port on 127.0.0.1, over a real SQLite store seeded through
its own API, with L{FakeOperations} as the gateway; treq is the client,
keeping cookies the way a browser does. The console's clock is a L{Clock},
so session expiry and the login brake are tested without waiting.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from mdgateway.ops.admin import AdminAPI
from mdgateway.ops.configview import configuration_view
from mdgateway.ops.console import Console, mount
from mdgateway.ops.console.auth import token_checker
from mdgateway.ops.console.passwords import set_password
from mdgateway.ops.interfaces import (
    OperationError,
    QueueEntry,
    QueueRecipient,
    ReloadResult,
)
from mdgateway.run.reactor import global_reactor
from mdgateway.store import PartVerdict, ReceivedMessage, SqliteStore
from mdgateway.testing.ops import FakeOperations
from tests.test_admin import NOW, Recorder, listen, seed

pytestmark = pytest.mark.timeout(60)

TOKEN = "console-test-token"
LIFETIME = 3600.0
HOSTILE_SUBJECT = '<img src=x onerror=alert(1)><script>alert("s")</script>'
HOSTILE_FILE = '"><svg onload=alert(3)>.exe'
HOSTILE_ORIGINAL = (
    b"From: <script>alert(4)</script> <evil@example.net>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: <img src=x onerror=alert(1)>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n'
    b"\r\n"
    b"--b\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<b>bold</b><script>alert(5)</script>\r\n"
    b"--b--\r\n"
)


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-console")
    pool.start()
    yield pool
    pool.stop()


@attrs.define
class Page:
    code: int
    headers: Any
    body: str

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def location(self) -> str | None:
        return self.header("location")

    def csrf(self) -> str:
        match = re.search(r'name="csrf" value="([^"]+)"', self.body)
        assert match, self.body[:2000]
        return match.group(1)


@attrs.define
class Client:
    """
    A browser-like client: keeps the cookies the console sets.
    """

    url: str
    pool: HTTPConnectionPool
    cookies: dict[str, str] = attrs.Factory(dict)
    set_cookies: list[str] = attrs.Factory(list)

    async def request(
        self,
        method: str,
        path: str,
        form: dict[str, Any] | list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Page:
        all_headers: dict[str | bytes, str | bytes] = {}
        all_headers.update(headers or {})
        if self.cookies:
            all_headers["Cookie"] = "; ".join(
                f"{k}={v}" for k, v in self.cookies.items()
            )
        kw: dict[str, Any] = {}
        if form is not None:
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
            kw["data"] = urlencode(form, doseq=True).encode()
        response = await treq.request(
            method,
            self.url + path,
            headers=all_headers,
            pool=self.pool,
            allow_redirects=False,
            **kw,
        )
        body = (await response.content()).decode("utf-8", "replace")
        for raw in response.headers.getRawHeaders("set-cookie", []):
            self.set_cookies.append(raw)
            name, _, value = raw.split(";")[0].partition("=")
            if "Max-Age=0" in raw:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return Page(response.code, response.headers, body)

    async def get(self, path: str, **kw: Any) -> Page:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, form: Any, **kw: Any) -> Page:
        return await self.request("POST", path, form=form, **kw)

    async def login(self, token: str = TOKEN) -> Page:
        form = await self.get("/console/login")
        return await self.post("/console/login", {"csrf": form.csrf(), "token": token})

    async def csrf(self) -> str:
        return (await self.get("/console/dashboard")).csrf()


@attrs.define
class Env:
    store: SqliteStore
    ops: FakeOperations
    console: Console
    clock: Clock
    port: IListeningPort
    pool: HTTPConnectionPool
    item_id: str
    hostile_id: str
    original: bytes
    users_file: str

    @property
    def url(self) -> str:
        host: Any = self.port.getHost()
        return f"http://127.0.0.1:{host.port}"

    def client(self) -> Client:
        return Client(self.url, self.pool)


async def _seed_hostile(store: SqliteStore) -> str:
    await store.record_received(
        ReceivedMessage(
            id="H1.1",
            queue_id="H1",
            received_at=NOW - 120,
            client_address="192.0.2.66",
            helo="<b>helo</b>",
            sender='"<script>x</script>"@evil.example',
            recipients=("bob@example.org",),
            rule="Inbound",
            direction="inbound",
            size=len(HOSTILE_ORIGINAL),
            subject=HOSTILE_SUBJECT,
            message_id_header="<x@evil.example>",
            instance="gw-other",
        )
    )
    await store.record_verdicts(
        "H1.1",
        [
            PartVerdict(
                "1.2",
                "application/octet-stream",
                10,
                "Blocked",
                filename=HOSTILE_FILE,
                blocked_reason="Infected",
            )
        ],
        at=NOW - 119,
    )
    item = await store.quarantine("H1.1", "blocked", HOSTILE_ORIGINAL, at=NOW - 118)
    return item.id


@pytest_twisted.async_yield_fixture
async def env(threadpool: ThreadPool, tmp_path: Path) -> Any:
    clock = Clock()
    clock.advance(NOW)
    store = SqliteStore(":memory:", reactor, threadpool)
    await store.open()
    seeded = await seed(store)
    hostile = await _seed_hostile(store)
    ops = FakeOperations(store)
    users = str(tmp_path / "users")
    console = await Console.create(
        operations=ops,
        reactor=global_reactor(),
        threadpool=threadpool,
        users_file=users,
        token_name=token_checker({"admin": TOKEN}),
        session_lifetime=LIFETIME,
        clock=clock,
        scratch_dir=str(tmp_path),
    )
    site = AdminAPI(ops, "api-token", clock).site()
    site.resource = mount(site.resource, console)
    port = await listen(site)
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield Env(
        store,
        ops,
        console,
        clock,
        port,
        pool,
        seeded.item_id,
        hostile,
        seeded.original,
        users,
    )
    await pool.closeCachedConnections()
    await maybeDeferred(port.stopListening)
    await store.close()


@pytest.fixture
def logged() -> Iterator[Recorder]:
    recorder = Recorder()
    globalLogPublisher.addObserver(recorder)
    yield recorder
    globalLogPublisher.removeObserver(recorder)


def _texts(recorder: Recorder) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in recorder.events]


# --------------------------------------------------------------------------
# Headers, login, sessions


@pytest_twisted.ensureDeferred
async def test_security_headers_and_login_cookie(env: Env) -> None:
    """
    The login page carries a strict CSP (only our own script and style,
    no inline, no framing), X-Frame-Options, nosniff and no-store; its
    CSRF cookie is HttpOnly, SameSite=Strict, scoped to /console/ and not
    Secure on a plain connection. Static files are served with their
    types and may be cached; the admin API still answers beside them.
    """
    client = env.client()
    page = await client.get("/console/login")
    assert page.code == 200
    csp = page.header("content-security-policy") or ""
    assert "default-src 'self'" in csp
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert page.header("x-frame-options") == "DENY"
    assert page.header("x-content-type-options") == "nosniff"
    assert page.header("cache-control") == "no-store"
    (cookie,) = client.set_cookies
    assert cookie.startswith("mdgw_login=")
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/console/"):
        assert flag in cookie
    assert "Secure" not in cookie
    assert "<script" not in page.body
    js = await client.get("/console/static/console.js")
    assert js.code == 200
    assert (js.header("content-type") or "").startswith("text/javascript")
    assert (js.header("cache-control") or "").startswith("private")
    assert (await client.get("/console/static/console.css")).code == 200
    assert (await client.get("/console/static/nope.js")).code == 404
    assert (await client.get("/healthz")).code == 200
    assert (await client.get("/api/messages")).code == 401


@pytest_twisted.ensureDeferred
async def test_pages_need_a_session(env: Env) -> None:
    """
    Without a session, a page redirects to the login form (remembering
    where it was going) and an action is not done.
    """
    client = env.client()
    page = await client.get("/console/messages?subject=x")
    assert page.code == 303
    assert page.location == "/console/login?next=%2Fconsole%2Fmessages%3Fsubject%3Dx"
    post = await client.post(
        f"/console/quarantine/{env.item_id}/release", {"confirm": "yes"}
    )
    assert post.code == 303
    assert (post.location or "").startswith("/console/login")
    assert not [c for c in env.ops.calls if c[0] == "release"]
    assert (await client.get("/console")).location == "/console/"


@pytest_twisted.ensureDeferred
async def test_token_login_and_every_page(env: Env, logged: Recorder) -> None:
    """
    The admin token logs in (session cookie HttpOnly, SameSite=Strict,
    path /console/); the login is logged by name; every section renders;
    a login cannot be bounced to another site through C{next}.
    """
    client = env.client()
    form = await client.get("/console/login?next=//evil.example/")
    page = await client.post(
        "/console/login",
        {"csrf": form.csrf(), "token": TOKEN, "next": "//evil.example/"},
    )
    assert page.code == 303
    assert page.location == "/console/dashboard"
    session_cookie = [c for c in client.set_cookies if c.startswith("mdgw_session=")]
    assert session_cookie and "HttpOnly" in session_cookie[0]
    assert "SameSite=Strict" in session_cookie[0]
    assert any("token:admin logged in" in t for t in _texts(logged))
    expected = {
        "/console/": None,
        "/console/dashboard": "Dashboard",
        "/console/messages": "Invoice with a very long subject",
        "/console/messages/Q2.1": "invoice.zip",
        "/console/quarantine": "Quarantine",
        f"/console/quarantine/{env.item_id}": "Download .eml",
        "/console/refused": "No security rule",
        "/console/queue": "The queue is empty.",
        "/console/config": "fakeversion0",
    }
    for path, text in expected.items():
        page = await client.get(path)
        if text is None:
            assert page.code == 303 and page.location == "/console/dashboard"
            continue
        assert page.code == 200, (path, page.body[:500])
        assert text in page.body, path
        assert page.header("cache-control") == "no-store"
    assert (await client.get("/console/messages/NOPE.1")).code == 404
    assert (await client.get("/console/nothing")).code == 404


@pytest_twisted.ensureDeferred
async def test_account_login(env: Env, logged: Recorder) -> None:
    """
    An operator from the users file logs in with their password; a wrong
    password or an unknown name is refused alike (401) and logged with
    the name tried, never the password.
    """
    set_password(env.users_file, "alice", "correct horse", n=2**10)
    client = env.client()
    for name, password in (("alice", "wrong password"), ("mallory", "correct horse")):
        form = await client.get("/console/login")
        page = await client.post(
            "/console/login",
            {"csrf": form.csrf(), "name": name, "password": password},
        )
        assert page.code == 401
        assert "Wrong name, password or token." in page.body
    texts = _texts(logged)
    assert any("failed login with 'mallory'" in t for t in texts)
    assert not any("correct horse" in t or "wrong password" in t for t in texts)
    form = await client.get("/console/login")
    page = await client.post(
        "/console/login",
        {"csrf": form.csrf(), "name": "alice", "password": "correct horse"},
    )
    assert page.code == 303
    dashboard = await client.get("/console/dashboard")
    assert '<span class="operator">alice</span>' in dashboard.body


@pytest_twisted.ensureDeferred
async def test_login_rate_limited(env: Env, logged: Recorder) -> None:
    """
    After five failed logins from one address even the right token is
    refused (429) until the window has passed; then it works.
    """
    client = env.client()
    for _ in range(5):
        assert (await client.login("wrong")).code == 401
    page = await client.login(TOKEN)
    assert page.code == 429
    assert "Too many failed attempts" in page.body
    assert any("too many failed attempts" in t for t in _texts(logged))
    env.clock.advance(301)
    assert (await client.login(TOKEN)).code == 303


@pytest_twisted.ensureDeferred
async def test_login_form_needs_its_csrf_token(env: Env) -> None:
    """
    A login POST without the login form's token (a cross-site login) is
    refused, even with the right admin token.
    """
    client = env.client()
    page = await client.post("/console/login", {"token": TOKEN, "csrf": "forged"})
    assert page.code == 403
    assert "mdgw_session" not in client.cookies


@pytest_twisted.ensureDeferred
async def test_session_expiry_and_logout(env: Env) -> None:
    """
    A session ends on the server at its lifetime whatever the browser
    keeps; logout ends it at once and the old cookie opens nothing.
    """
    client = env.client()
    await client.login()
    assert (await client.get("/console/queue")).code == 200
    env.clock.advance(LIFETIME + 1)
    assert (await client.get("/console/queue")).code == 303
    await client.login()
    old = client.cookies["mdgw_session"]
    csrf = await client.csrf()
    page = await client.post("/console/logout", {"csrf": csrf})
    assert page.code == 303 and page.location == "/console/login?out=1"
    assert "mdgw_session" not in client.cookies
    client.cookies["mdgw_session"] = old
    assert (await client.get("/console/queue")).code == 303


@pytest_twisted.ensureDeferred
async def test_csrf_and_origin_enforced(env: Env, logged: Recorder) -> None:
    """
    A state-changing POST is refused (403, nothing done) without the
    session's CSRF token, with a wrong one, or from another origin; with
    it, the action reaches the gateway with the operator's name.
    """
    client = env.client()
    await client.login()
    path = f"/console/quarantine/{env.item_id}/pin"
    assert (await client.post(path, {"pinned": "true"})).code == 403
    assert (await client.post(path, {"pinned": "true", "csrf": "nope"})).code == 403
    csrf = await client.csrf()
    cross = await client.post(
        path,
        {"pinned": "true", "csrf": csrf},
        headers={"Origin": "http://evil.example"},
    )
    assert cross.code == 403
    assert not [c for c in env.ops.calls if c[0] == "pin"]
    assert any("without a valid CSRF token" in t for t in _texts(logged))
    done = await client.post(
        path, {"pinned": "true", "csrf": csrf}, headers={"Origin": env.url}
    )
    assert done.code == 303
    assert ("pin", env.item_id, True, "console:token:admin") in env.ops.calls
    assert (await env.store.get_quarantined(env.item_id)).pinned


# --------------------------------------------------------------------------
# Hostile content


@pytest_twisted.ensureDeferred
async def test_hostile_mail_is_escaped_everywhere(env: Env) -> None:
    """
    A subject, sender, HELO, file name, header value and HTML part made of
    markup are shown as text on every page: the markup's characters are
    escaped and no element of it reaches the page.
    """
    client = env.client()
    await client.login()
    pages = [
        "/console/messages",
        "/console/messages/H1.1",
        "/console/quarantine",
        f"/console/quarantine/{env.hostile_id}",
        f"/console/quarantine/{env.hostile_id}/release",
    ]
    for path in pages:
        page = await client.get(path)
        assert page.code == 200, path
        for raw in ("<img src=x", "<script>alert", "<svg onload", "<b>helo"):
            assert raw not in page.body, (path, raw)
        assert page.body.count("<script") == 1  # the console's own file
    item = (await client.get(f"/console/quarantine/{env.hostile_id}")).body
    assert "&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;" in item
    assert "From: &lt;script&gt;alert(4)&lt;/script&gt;" in item
    assert "&lt;b&gt;bold&lt;/b&gt;&lt;script&gt;alert(5)&lt;/script&gt;" in item
    assert '"&gt;&lt;svg onload=alert(3)&gt;.exe' in item


# --------------------------------------------------------------------------
# Quarantine actions


@pytest_twisted.ensureDeferred
async def test_release_needs_confirmation_and_second_one_when_infected(
    env: Env,
) -> None:
    """
    Releasing takes a ticked confirmation; an original Core found infected
    takes a second one; without them nothing is released (400, the page
    says why); with them the release reaches the gateway with the
    operator's name and the result shows on the next page.
    """
    client = env.client()
    await client.login()
    path = f"/console/quarantine/{env.item_id}/release"
    confirm = await client.get(path)
    assert 'name="confirm_infected"' in confirm.body
    assert "Core found malware" in confirm.body
    csrf = confirm.csrf()
    refused = await client.post(path, {"csrf": csrf})
    assert refused.code == 400
    assert "release was not confirmed" in refused.body
    half = await client.post(path, {"csrf": csrf, "confirm": "yes"})
    assert half.code == 400
    assert "second confirmation was not given" in half.body
    assert not [c for c in env.ops.calls if c[0] == "release"]
    done = await client.post(
        path, {"csrf": csrf, "confirm": "yes", "confirm_infected": "yes"}
    )
    assert done.code == 303
    # Core blocked it: confirmed twice, it goes with force (the fake records
    # the force flag and the form's idempotency key, absent in this post).
    assert ("release", env.item_id, "console:token:admin", True, None) in env.ops.calls
    after = await client.get(done.location or "")
    assert "queued as FAKEQ0001" in after.body
    assert "by console:token:admin" in after.body


@pytest_twisted.ensureDeferred
async def test_bulk_actions(env: Env) -> None:
    """
    Pinning a selection pins each item; releasing a selection first shows
    a confirmation listing every item (and the second confirmation, one
    being infected), then releases each; nothing selected is a notice.
    """
    client = env.client()
    await client.login()
    csrf = await client.csrf()
    ids = [env.item_id, env.hostile_id]
    back = "/console/quarantine?subject=x"
    page = await client.post(
        "/console/quarantine/bulk",
        [("csrf", csrf), ("action", "pin"), ("back", back), *(("ids", i) for i in ids)],
    )
    assert page.code == 303 and page.location == back
    for item_id in ids:
        assert (await env.store.get_quarantined(item_id)).pinned
    step = await client.post(
        "/console/quarantine/bulk",
        [("csrf", csrf), ("action", "release"), *(("ids", i) for i in ids)],
    )
    assert step.code == 200
    assert all(i in step.body for i in ids)
    assert 'name="confirm_infected"' in step.body
    assert not [c for c in env.ops.calls if c[0] == "release"]
    form = [("csrf", csrf), ("action", "release"), ("step", "confirm")]
    form += [("ids", i) for i in ids]
    assert (
        await client.post("/console/quarantine/bulk", form + [("confirm", "yes")])
    ).code == 400
    final = await client.post(
        "/console/quarantine/bulk",
        form + [("confirm", "yes"), ("confirm_infected", "yes")],
    )
    assert final.code == 303
    released = [c[1] for c in env.ops.calls if c[0] == "release"]
    assert released == ids
    nothing = await client.post(
        "/console/quarantine/bulk", {"csrf": csrf, "action": "rescan"}
    )
    assert nothing.code == 303
    assert "Select at least one item" in (await client.get("/console/quarantine")).body


@pytest_twisted.ensureDeferred
async def test_forward_rescan_delete_retry(env: Env) -> None:
    """
    Forward checks its addresses and, for an infected original, its
    confirmation before anything is sent; rescan, delete (confirmed) and
    retry reach the gateway with the operator's name; a refusal from the
    gateway shows as a page with its status.
    """
    client = env.client()
    await client.login()
    csrf = await client.csrf()
    base = f"/console/quarantine/{env.item_id}"
    bad = await client.post(base + "/forward", {"csrf": csrf, "to": "not an address"})
    assert bad.code == 303
    assert "not an address" in (await client.get(base)).body
    unconfirmed = await client.post(
        base + "/forward", {"csrf": csrf, "to": "x@example.org"}
    )
    assert unconfirmed.code == 303
    assert not [c for c in env.ops.calls if c[0] == "forward"]
    await client.post(
        base + "/forward",
        {"csrf": csrf, "to": "x@example.org\ny@example.org", "confirm_infected": "yes"},
    )
    assert (
        "forward",
        env.item_id,
        ["x@example.org", "y@example.org"],
        "console:token:admin",
        True,
        None,
    ) in env.ops.calls
    await client.post(base + "/rescan", {"csrf": csrf})
    assert ("rescan", env.item_id, "console:token:admin", False, None) in env.ops.calls
    assert (await client.post(base + "/delete", {"csrf": csrf})).code == 400
    deleted = await client.post(base + "/delete", {"csrf": csrf, "confirm": "yes"})
    assert deleted.code == 303
    assert ("delete", env.item_id, "console:token:admin") in env.ops.calls
    assert (await client.get(base)).code == 404

    env.ops.entries.append(
        QueueEntry(
            "QUEUED1",
            NOW - 60,
            "a@example.net",
            100,
            (QueueRecipient("b@example.org", "pending", "Inbound", "451 4.4.1 later"),),
            2,
            NOW + 60,
            "451 4.4.1 later",
        )
    )
    queue = await client.get("/console/queue")
    assert "QUEUED1" in queue.body and "451 4.4.1 later" in queue.body
    assert (
        await client.post("/console/queue/QUEUED1/retry", {"csrf": csrf})
    ).code == 303
    assert (
        "queue_action",
        "retry",
        "QUEUED1",
        "console:token:admin",
        False,
    ) in env.ops.calls
    env.ops.error = OperationError(409, "already released once")
    refused = await client.post(
        f"/console/quarantine/{env.hostile_id}/rescan", {"csrf": csrf}
    )
    assert refused.code == 409
    assert "already released once" in refused.body


@pytest_twisted.ensureDeferred
async def test_download(env: Env) -> None:
    """
    The original downloads byte for byte as an attachment that the
    browser must not render (octet-stream, sandboxed, never cached).
    """
    client = env.client()
    await client.login()
    response = await treq.get(
        f"{env.url}/console/quarantine/{env.item_id}/eml",
        headers=Headers({"Cookie": [f"mdgw_session={client.cookies['mdgw_session']}"]}),
        pool=env.pool,
    )
    assert response.code == 200
    assert await response.content() == env.original
    headers = response.headers
    assert headers.getRawHeaders("content-type") == ["application/octet-stream"]
    assert headers.getRawHeaders("content-disposition")[0].startswith("attachment;")
    assert "sandbox" in headers.getRawHeaders("content-security-policy")[0]
    assert headers.getRawHeaders("cache-control") == ["no-store"]


# --------------------------------------------------------------------------
# Configuration and dashboard


@pytest_twisted.ensureDeferred
async def test_configuration_page_and_reload(env: Env) -> None:
    """
    The configuration page shows every key with secrets masked (an API
    key in a Core URL, a password in a database URL, a key named as a
    secret) and the paths as they are; reload shows the new version, or
    every problem by key.
    """
    env.ops.config = configuration_view(
        {
            "store": {"location": "postgresql://gw:hunter2@db/mdgw"},
            "profiles": {
                "core": {"c": {"servers": ["http://core:8008?apikey=SECRETKEY"]}}
            },
            "tls": {"key": "tls/server.key"},
            "office365": {"client_secret": "s3cr3t"},
        },
        "v123",
        "/etc/mdgateway/mdgateway.toml",
        ("listeners",),
    )
    client = env.client()
    await client.login()
    page = await client.get("/console/config")
    for secret in ("hunter2", "SECRETKEY", "s3cr3t"):
        assert secret not in page.body
    assert "postgresql://gw:********@db/mdgw" in page.body
    assert "tls/server.key" in page.body
    assert "Changes to listeners need a restart." in page.body
    csrf = page.csrf()
    await client.post("/console/config/reload", {"csrf": csrf})
    assert "version v123 is in force" in (await client.get("/console/config")).body
    env.ops.reload_result = ReloadResult(
        False, ("rules[0].core_profile: no profile 'x'",)
    )
    await client.post("/console/config/reload", {"csrf": csrf})
    page = await client.get("/console/config")
    assert "Configuration not reloaded: 1 problem(s)" in page.body
    assert "rules[0].core_profile: no profile &#x27;x&#x27;" in page.body or (
        "rules[0].core_profile: no profile 'x'" in page.body
    )


@pytest_twisted.ensureDeferred
async def test_dashboard(env: Env) -> None:
    """
    The dashboard draws both traffic charts as inline SVG (a bar for the
    message of the last hour, with its numbers in its title), lists this
    instance and the others the history names, its spools and readiness,
    and asks the script to refresh it.
    """
    client = env.client()
    await client.login()
    page = await client.get("/console/dashboard")
    assert page.code == 200
    assert 'data-refresh="30"' in page.body
    assert '<svg viewBox="0 0 720 200"' in page.body
    hour = page.body.split('id="chart-hour"')[1].split("</svg>")[0]
    assert "1 Blocked (1 per minute)" in hour
    assert "fake-gw" in page.body and "gw-other" in page.body
    assert "ready" in page.body
