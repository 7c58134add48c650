"""
The queue tools across processes and instances, in process: real gateway
processes (built by L{build_gateway}, each with its spool on disk) whose
L{QueueOperations} find the process or instance holding a message, and
the cluster link between instances through a shared store's notice board.

The pipes to a real worker process are tested end to end in
C{tests/test_e2e_queue_tools.py}; here the primary reaches its "worker"
(a second process object on the worker's spool root) by a direct call.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool

from mdgateway.ops.cluster import ClusterLink
from mdgateway.ops.interfaces import (
    OperationError,
    QueueAction,
    QueuedMessage,
    QueuedPart,
    QueueEntry,
    QueueRecipient,
)
from mdgateway.ops.queueops import QueueOperations
from mdgateway.ops.queuewire import (
    entry_from_json,
    entry_json,
    message_from_json,
    message_json,
)
from mdgateway.queue.tools import ToolRequest
from mdgateway.run.control import WorkerUnavailableError
from mdgateway.store import SqliteStore
from mdgateway.store.audit import AuditFilter
from mdgateway.store.interfaces import MessageFilter
from tests.test_queue_tools import Process, _Silent, config_file, start, stop, until

pytestmark = pytest.mark.timeout(90)


@attrs.define
class Site:
    """
    Gateway processes started for one test, stopped at its end.
    """

    tmp_path: Path
    stall: int
    processes: list[Process] = attrs.Factory(list)
    links: list[ClusterLink] = attrs.Factory(list)

    async def process(self, config: Path, worker: int = 0) -> Process:
        process = await start(config, worker=worker)
        self.processes.append(process)
        return process


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    port = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
    s = Site(tmp_path, port.getHost().port)
    yield s
    for link in s.links:
        await link.stop()
    for process in s.processes:
        await stop(process)
    await port.stopListening()


def direct(worker: Process) -> Any:
    """
    An C{ask_worker} that hands the request to C{worker}'s queue tools.
    """

    async def ask(index: int, request: dict[str, Any]) -> dict[str, Any]:
        assert index == 1
        answer = await worker.tools.run(ToolRequest.from_json(request["queue"]))
        return answer.to_json()

    return ask


def operations(process: Process, instance: str, **kw: Any) -> QueueOperations:
    gateway = process.gateway
    return QueueOperations(
        reactor=reactor,
        threadpool=gateway.threads.spool,
        spool=gateway.spool,
        manager=gateway.queue,
        store=gateway.store,
        instance=lambda: instance,
        **kw,
    )


def act(action: str, queue_id: str, **kw: Any) -> QueueAction:
    return QueueAction(action, queue_id, "alice", origin="test", **kw)


async def audit(process: Process) -> list[tuple[str, str, str, str]]:
    page = await process.gateway.store.search_audit(AuditFilter())
    return [(e.actor, e.action, e.target, e.result) for e in reversed(page.items)]


@pytest_twisted.ensureDeferred
async def test_a_workers_message(site: Site) -> None:
    """
    A message in a worker's spool is listed by the primary with its
    process and hold, shown (headers and parts) from the worker's files,
    held and deleted with a bounce in the worker, which alone changes it;
    flush counts every process; each action is audited with the
    operator's name; a message nowhere is refused (409) and audited so.
    """
    config = config_file(site.tmp_path, site.stall, "gw1", workers=2)
    primary = await site.process(config)
    worker = await site.process(config, worker=1)
    ops = operations(
        primary,
        "gw1",
        worker_spools=lambda: [(1, worker.spool.root)],
        ask_worker=direct(worker),
    )
    queue_id = await worker.queue("r@down.test", sender="s@down.test")
    await until(lambda: worker.state(queue_id)["attempts"] == 1)
    (listed,) = await ops.local()
    assert (listed.queue_id, listed.worker, listed.instance) == (queue_id, 1, "gw1")

    result = await ops.action(act("hold", queue_id))
    assert (result.process, result.instance, result.changed) == (1, "gw1", True)
    assert worker.state(queue_id)["held_by"] == "alice"
    assert worker.gateway.queue.held_by(queue_id) == "alice"
    (listed,) = await ops.local()
    assert (listed.held_by, listed.next_attempt) == ("alice", None)
    shown = await ops.content(queue_id)
    assert "Subject: queued" in shown.headers
    assert shown.parts[0].content_type == "text/plain"
    assert shown.entry.worker == 1
    assert (await ops.flush("alice")).tried == {"gw1": 0}

    await ops.action(act("delete", queue_id, bounce=True))
    await until(lambda: queue_id not in [e.queue_id for e in worker.entries()])
    (dsn,) = await until(lambda: worker.entries())
    assert dsn.envelope.extra["generated"] == "dsn"
    with pytest.raises(OperationError) as caught:
        await ops.action(act("hold", queue_id))
    assert caught.value.status == 409
    with pytest.raises(OperationError) as caught:
        await ops.content(queue_id)
    assert caught.value.status == 409
    with pytest.raises(OperationError) as caught:
        await ops.action(act("hold", "../../etc/passwd"))
    assert caught.value.status == 400
    with pytest.raises(OperationError) as caught:
        await ops.action(act("explode", queue_id))
    assert caught.value.status == 400
    assert await audit(primary) == [
        ("alice", "hold", queue_id, "done"),
        ("alice", "flush", "all instances", "done"),
        ("alice", "delete-queued", queue_id, "done"),
        ("alice", "hold", queue_id, "refused"),
        ("alice", "hold", "../../etc/passwd", "refused"),
    ]


@pytest_twisted.ensureDeferred
async def test_a_worker_that_cannot_be_asked(site: Site) -> None:
    """
    When the worker holding the message cannot answer (it is restarting),
    the action fails with 503, saying why, and the audit says it failed.
    """
    config = config_file(site.tmp_path, site.stall, "gw1", workers=2)
    primary = await site.process(config)
    worker = await site.process(config, worker=1)

    async def down(index: int, request: dict[str, Any]) -> dict[str, Any]:
        raise WorkerUnavailableError("worker 1 is not running")

    ops = operations(
        primary, "gw1", worker_spools=lambda: [(1, worker.spool.root)], ask_worker=down
    )
    queue_id = await worker.queue("r@down.test", delay=3600)
    with pytest.raises(OperationError) as caught:
        await ops.action(act("hold", queue_id))
    assert caught.value.status == 503
    assert "worker 1 is not running" in caught.value.message
    assert await audit(primary) == [("alice", "hold", queue_id, "failed")]


@pytest_twisted.ensureDeferred
async def test_across_instances(site: Site) -> None:
    """
    Two instances sharing one store: from gw1, gw2's messages are listed
    (named gw2), shown, held and released in gw2's spool (by name, and
    found through the shared history without one), and flushed; once gw2
    stops, gw1 lists it as stopped and an action there fails at once
    with 503 instead of waiting.
    """
    store = site.tmp_path / "shared.sqlite"
    one = await site.process(config_file(site.tmp_path, site.stall, "gw1", store))
    two = await site.process(config_file(site.tmp_path, site.stall, "gw2", store))
    ops: dict[str, QueueOperations] = {}
    for name, process in (("gw1", one), ("gw2", two)):
        link = ClusterLink(
            board=process.gateway.store,
            clock=reactor,
            instance=name,
            serve=lambda request, name=name: ops[name].serve(request),
            poll_every=0.05,
        )
        ops[name] = operations(process, name, cluster=link)
        await link.start()
        site.links.append(link)
    here = await one.queue("r@down.test", delay=3600)
    there = await two.queue("r@down.test", sender="s@down.test")
    await until(lambda: two.state(there)["attempts"] == 1)

    listing = await ops["gw1"].listing()
    assert [(e.queue_id, e.instance) for e in listing.entries] == [
        (here, "gw1"),
        (there, "gw2"),
    ]
    assert [(i.name, i.this, i.listed) for i in listing.instances] == [
        ("gw1", True, 1),
        ("gw2", False, 1),
    ]
    only = await ops["gw1"].listing("gw2")
    assert [e.queue_id for e in only.entries] == [there]
    shown = await ops["gw1"].content(there, "gw2")
    assert (shown.entry.instance, shown.entry.sender) == ("gw2", "s@down.test")

    held = await ops["gw1"].action(act("hold", there, instance="gw2"))
    assert (held.instance, held.process, held.changed) == ("gw2", 0, True)
    assert two.state(there)["held_by"] == "alice"
    # Without naming the instance: the shared history says where it is.
    for _ in range(200):
        if await received_by(one, there):
            break
        await deferLater(reactor, 0.05, lambda: None)
    else:
        raise AssertionError("the history never recorded the message")
    released = await ops["gw1"].action(act("release-hold", there))
    assert (released.instance, released.changed) == ("gw2", True)
    await until(lambda: two.state(there)["attempts"] == 2)
    tried = await ops["gw1"].flush("alice")
    assert set(tried.tried) == {"gw1", "gw2"} and not tried.problems

    await site.links[1].stop()
    site.links.remove(site.links[1])
    listing = await ops["gw1"].listing()
    (stopped,) = [i for i in listing.instances if i.name == "gw2"]
    assert stopped.problem is not None and stopped.problem.startswith("stopped")
    with pytest.raises(OperationError) as caught:
        await ops["gw1"].action(act("hold", there, instance="gw2"))
    assert caught.value.status == 503
    with pytest.raises(OperationError) as caught:
        await ops["gw1"].action(act("hold", there, instance="gw9"))
    assert caught.value.status == 404
    assert ("alice", "hold", there, "done") in await audit(one)


async def received_by(process: Process, queue_id: str) -> bool:
    """
    Whether the shared history has recorded C{queue_id} yet.
    """
    page = await process.gateway.store.search_messages(MessageFilter(queue_id=queue_id))
    return bool(page.items)


# --------------------------------------------------------------------------
# The link alone


@pytest.fixture
def threadpool() -> Any:
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-cluster")
    pool.start()
    yield pool
    pool.stop()


@pytest_twisted.async_yield_fixture
async def board(tmp_path: Path, threadpool: ThreadPool) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(str(tmp_path / "board.sqlite"), reactor, threadpool)
    await store.open()
    yield store
    await store.close()


@pytest_twisted.ensureDeferred
async def test_link_asks_and_answers(board: SqliteStore) -> None:
    """
    A request reaches the instance it is for and its answer comes back;
    the other instance's refusal comes back with its status; an instance
    the board never saw is 404.
    """
    seen: list[dict[str, Any]] = []

    async def serve(request: dict[str, Any]) -> dict[str, Any]:
        seen.append(request)
        if request.get("refuse"):
            raise OperationError(409, "not any more")
        return {"echo": request["n"]}

    two = ClusterLink(
        board=board, clock=reactor, instance="gw2", serve=serve, poll_every=0.05
    )
    one = ClusterLink(
        board=board, clock=reactor, instance="gw1", serve=serve, poll_every=0.05
    )
    await two.start()
    try:
        assert await one.ask("gw2", {"n": 1}) == {"echo": 1}
        with pytest.raises(OperationError) as caught:
            await one.ask("gw2", {"n": 2, "refuse": True})
        assert (caught.value.status, caught.value.message) == (409, "gw2: not any more")
        with pytest.raises(OperationError) as caught:
            await one.ask("gw3", {"n": 3})
        assert caught.value.status == 404
        assert [m.name for m in await one.members()] == ["gw1", "gw2"]
        assert seen == [{"n": 1}, {"n": 2, "refuse": True}]
    finally:
        await two.stop()


@pytest_twisted.ensureDeferred
async def test_a_request_not_taken_is_withdrawn(board: SqliteStore) -> None:
    """
    An instance that joined but does not look at the board (hung) does
    not take the request in time: the asker withdraws it and says nothing
    was done; when that instance looks again, it is not handed the
    withdrawn request.
    """
    served: list[dict[str, Any]] = []

    async def serve(request: dict[str, Any]) -> dict[str, Any]:
        served.append(request)
        return {}

    await board.join("gw2", reactor.seconds())
    one = ClusterLink(
        board=board,
        clock=reactor,
        instance="gw1",
        serve=serve,
        take_within=0.5,
    )
    with pytest.raises(OperationError) as caught:
        await one.ask("gw2", {"n": 1})
    assert caught.value.status == 503
    assert "nothing was done" in caught.value.message
    assert await board.take_commands("gw2") == ()


def test_wire_forms_round_trip() -> None:
    """
    Entries and content views survive the JSON they travel between
    instances as.
    """
    entry = QueueEntry(
        "Q1",
        1.5,
        "a@x.test",
        10,
        (QueueRecipient("b@x.test", "pending", "in", "451 later"),),
        2,
        None,
        "451 later",
        "dsn",
        1,
        "gw2",
        "alice",
        3.0,
    )
    assert entry_from_json(json.loads(json.dumps(entry_json(entry)))) == entry
    message = QueuedMessage(
        entry,
        "192.0.2.1",
        "mx",
        "Subject: x\r\n",
        True,
        (QueuedPart("1", 0, "text/plain", None, None, None, "7bit", 3, "hey"),),
    )
    assert message_from_json(json.loads(json.dumps(message_json(message)))) == message
