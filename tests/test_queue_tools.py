"""
The queue tools of one process, in process: a real gateway's queue manager
(built by L{build_gateway} from a configuration file, its spool on disk)
held, released, deleted, bounced, retried and flushed by L{QueueTools}, with
relays that are down (a closed port), up (a maildir folder) or stalling (a
server that never greets).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from mdgateway.config import load_config
from mdgateway.fileops import OSFileOps
from mdgateway.queue.attempt import GENERATED_RELEASE
from mdgateway.queue.entry import SpoolEntry, SpoolPaths
from mdgateway.queue.envelope import Envelope, Recipient
from mdgateway.queue.jobs import job_list
from mdgateway.queue.state import RecipientStatus
from mdgateway.queue.tools import (
    BOUNCE,
    DELETE,
    FLUSH,
    HOLD,
    RELEASE_HOLD,
    RETRY,
    QueueTools,
    ToolAnswer,
    ToolFormatError,
    ToolRequest,
)
from mdgateway.run.compose import Gateway, build_gateway
from mdgateway.run.reactor import global_reactor
from mdgateway.run.supervisor import WorkerRole
from tests.gatewayproc import free_port
from tests.listening import listen_local, stop_listening

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: a@example.com\r\nTo: r@example.org\r\nSubject: queued\r\n\r\nbody\r\n"


class _Silent(Protocol):
    """
    Accepts a connection and never says a word: an attempt through it
    lasts until the greeting times out.
    """


def config_file(
    tmp_path: Path,
    stall_port: int,
    instance: str = "gw-test",
    store: Path | None = None,
    workers: int = 1,
) -> Path:
    """
    A configuration under C{tmp_path/instance} with relays down, up and
    stalling; instances share the store C{store} (a SQLite file).
    """
    closed = free_port()
    folder = tmp_path / instance
    folder.mkdir(exist_ok=True)
    store = store or tmp_path / "history.sqlite"
    path = folder / "mdgateway.toml"
    path.write_text(
        f"""
sender_helo_domain = "gw.test"
[[listeners]]
name = "smtp"
endpoint = "tcp:{free_port()}:interface=127.0.0.1"
tls = "none"
[processes]
workers = {workers}
[spool]
directory = "{folder / "spool"}"
[store]
location = "{store}"
instance = "{instance}"
[delivery]
retry_first = "1h"
retry_max = "1h"
loop_secret_file = "{tmp_path / "loop.secret"}"
[profiles.core.core]
servers = ["http://127.0.0.1:{closed}"]
[profiles.smtp.down]
servers = ["smtp://127.0.0.1:{closed}"]
tls = "none"
[profiles.smtp.up]
servers = ["maildir:{folder / "box"}"]
[profiles.smtp.stall]
servers = ["smtp://127.0.0.1:{stall_port}"]
tls = "none"
[profiles.smtp.stall.timeouts]
greeting = "1s"
[[rules]]
name = "down"
recipients = ["*@down.test"]
core_profile = "core"
relay_profile = "down"
[[rules]]
name = "up"
recipients = ["*@up.test"]
core_profile = "core"
relay_profile = "up"
[[rules]]
name = "stall"
recipients = ["*@stall.test"]
core_profile = "core"
relay_profile = "stall"
"""
    )
    return path


@attrs.define
class Process:
    """
    One gateway process's queue, started as the service starts it.
    """

    gateway: Gateway
    tools: QueueTools

    @property
    def spool(self) -> Any:
        return self.gateway.spool

    async def queue(
        self, *addresses: str, sender: str = "a@example.com", delay: float = 0.0
    ) -> str:
        """
        Spool a message (one the gateway made itself, so it is relayed
        unscanned) and hand it to the queue manager, due after C{delay}.
        """
        writer = self.spool.open_writer()
        writer.write(MESSAGE)
        entry = await writer.commit(
            Envelope(
                queue_id=writer.queue_id,
                received_at=reactor.seconds(),
                sender=sender,
                recipients=tuple(
                    Recipient(a, {}, a.split("@")[1].split(".")[0], "inbound")
                    for a in addresses
                ),
                extra={"generated": GENERATED_RELEASE},
            )
        )
        self.gateway.queue.submit(entry, delay)
        return str(entry.queue_id)

    def state(self, queue_id: str) -> dict[str, Any]:
        path = Path(self.spool.root) / "state" / f"{queue_id}.json"
        return dict(json.loads(path.read_text()))

    def entries(self) -> list[SpoolEntry]:
        found, _ = job_list(OSFileOps(), SpoolPaths.under(self.spool.root))
        return list(found)

    async def run(self, action: str, queue_id: str = "", **kw: Any) -> ToolAnswer:
        return await self.tools.run(ToolRequest(action, queue_id, "alice", **kw))


async def start(config: Path, patience: float = 10.0, worker: int = 0) -> Process:
    gateway = build_gateway(
        load_config(config), global_reactor(), role=WorkerRole(worker)
    )
    gateway.threads.start()
    await gateway.loop_guard.load(global_reactor(), gateway.threads.spool)
    await gateway.store.open()
    await gateway.spool.acquire()
    await gateway.outbox.open()
    entries = await gateway.spool.recover()
    await gateway.queue.clear_scratch()
    gateway.queue.start(entries)
    return Process(gateway, QueueTools(gateway.queue, reactor, patience))


async def stop(process: Process) -> None:
    gateway = process.gateway
    await gateway.queue.stop()
    await gateway.outbox.close(timeout=5)
    await gateway.store.close()
    await gateway.spool.close()
    gateway.threads.stop()


async def until(predicate: Callable[[], object], timeout: float = 20.0) -> Any:
    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        try:
            value = predicate()
        except FileNotFoundError:
            value = None
        if value:
            return value
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("condition not met in time")


@pytest_twisted.async_yield_fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Path, list[Process]]]:
    port, number = await listen_local(Factory.forProtocol(_Silent))
    config = config_file(tmp_path, number)
    started: list[Process] = []
    yield config, started
    for process in started:
        await stop(process)
    await stop_listening(port)


async def begin(setup: tuple[Path, list[Process]], **kw: Any) -> Process:
    config, started = setup
    process = await start(config, **kw)
    started.append(process)
    return process


@pytest_twisted.ensureDeferred
async def test_hold_survives_a_restart_and_release_tries_at_once(
    setup: tuple[Path, list[Process]],
) -> None:
    """
    A deferred message put on hold is refused a retry and skipped by a
    flush; it is still held after the process restarts (not attempted
    again); releasing the hold tries it at once.
    """
    process = await begin(setup)
    queue_id = await process.queue("r@down.test")
    await until(lambda: process.state(queue_id)["attempts"] == 1)

    answer = await process.run(HOLD, queue_id)
    assert answer == ToolAnswer(True, f"{queue_id} is on hold (by alice)")
    state = process.state(queue_id)
    assert state["held_by"] == "alice" and state["attempts"] == 1
    again = await process.run(HOLD, queue_id)
    assert (again.changed, again.refused) == (False, None)
    assert "on hold already (by alice)" in again.detail

    retry = await process.run(RETRY, queue_id)
    assert retry.refused is not None and "release the hold" in retry.refused
    assert (await process.run(FLUSH)).count == 0

    # A restart: the new manager finds the hold in the saved state.
    await stop(process)
    setup[1].remove(process)
    process = await begin(setup)
    await until(lambda: process.gateway.queue.held_by(queue_id) == "alice")
    assert process.state(queue_id)["attempts"] == 1

    released = await process.run(RELEASE_HOLD, queue_id)
    assert released.changed and "hold released by alice" in released.detail
    await until(lambda: process.state(queue_id)["attempts"] == 2)
    assert "held_by" not in process.state(queue_id)
    assert process.state(queue_id)["held_for"] > 0
    not_held = await process.run(RELEASE_HOLD, queue_id)
    assert (not_held.changed, not_held.detail) == (False, f"{queue_id} was not on hold")
    await until(lambda: not process.gateway.queue.attempting(queue_id))
    assert (await process.run(FLUSH)).count == 1
    await until(lambda: process.state(queue_id)["attempts"] == 3)


@pytest_twisted.ensureDeferred
async def test_release_delivers(setup: tuple[Path, list[Process]]) -> None:
    """
    A message held before its first attempt is not delivered; released,
    it is delivered and leaves the spool.
    """
    process = await begin(setup)
    gate = process.gateway.queue
    queue_id = await process.queue("r@up.test", delay=3600)
    answer = await process.run(HOLD, queue_id)
    assert answer.changed
    box = Path(process.spool.root).parent / "box" / "new"
    assert gate.held_by(queue_id) == "alice"
    assert gate.next_attempt(queue_id) is None
    assert process.state(queue_id)["attempts"] == 0
    await process.run(RELEASE_HOLD, queue_id)
    await until(lambda: box.exists() and list(box.glob("*")))
    await until(lambda: not gate.entry(queue_id))
    assert b"Subject: queued" in next(box.glob("*")).read_bytes()


@pytest_twisted.ensureDeferred
async def test_delete_silently_and_with_a_bounce(
    setup: tuple[Path, list[Process]],
) -> None:
    """
    A silent delete removes the entry and sends nothing; a delete with a
    bounce removes it and queues a DSN to the sender saying the message
    was deleted by the administrator (5.0.0); a second delete is told the
    message is gone.
    """
    process = await begin(setup)
    silent = await process.queue("r@down.test")
    bounced = await process.queue("s@down.test", "t@down.test", sender="b@down.test")
    await until(lambda: process.state(silent)["attempts"] == 1)
    await until(lambda: process.state(bounced)["attempts"] == 1)

    answer = await process.run(DELETE, silent)
    assert answer.changed and "no bounce" in answer.detail
    await until(lambda: silent not in [e.queue_id for e in process.entries()])
    assert [e.envelope.extra.get("generated") for e in process.entries()] == [
        GENERATED_RELEASE
    ]

    answer = await process.run(DELETE, bounced, bounce=True)
    assert "the sender gets a bounce for 2 recipient(s)" in answer.detail
    # The bounce is queued first, then the message removed: wait for both.
    await until(lambda: bounced not in [e.queue_id for e in process.entries()])
    (dsn,) = await until(
        lambda: [
            e for e in process.entries() if e.envelope.extra.get("generated") == "dsn"
        ]
    )
    assert dsn.envelope.sender == ""
    assert [r.address for r in dsn.envelope.recipients] == ["b@down.test"]
    report = Path(dsn.message_path).read_bytes()
    assert b"Status: 5.0.0" in report
    assert b"deleted from the queue by the gateway's administrator" in report

    gone = await process.run(DELETE, bounced)
    assert gone.gone and not gone.changed
    assert (await process.run(HOLD, "NOSUCHID")).gone


@pytest_twisted.ensureDeferred
async def test_bounce_now(setup: tuple[Path, list[Process]]) -> None:
    """
    Bounce now fails the pending recipients and the sender gets one DSN
    for them; a message with nothing pending cannot be bounced (refused,
    nothing changed).
    """
    process = await begin(setup)
    queue_id = await process.queue("r@down.test", sender="s@down.test")
    await until(lambda: process.state(queue_id)["attempts"] == 1)
    answer = await process.run(BOUNCE, queue_id)
    assert answer.changed and "bounced by alice" in answer.detail
    (dsn,) = await until(
        lambda: [
            e for e in process.entries() if e.envelope.extra.get("generated") == "dsn"
        ]
    )
    report = Path(dsn.message_path).read_bytes()
    assert b"returned to the sender by the gateway's administrator" in report
    await until(lambda: not process.gateway.queue.entry(queue_id))
    # Bouncing the DSN (a null sender) removes it; no report about a report.
    await until(lambda: process.state(dsn.queue_id)["attempts"] == 1)
    assert (await process.run(BOUNCE, dsn.queue_id)).changed
    await until(lambda: not process.entries())


@pytest_twisted.ensureDeferred
async def test_a_change_during_an_attempt_applies_after_it(
    setup: tuple[Path, list[Process]],
) -> None:
    """
    A hold asked while the message is being attempted (the relay has not
    greeted yet) is answered at once as accepted for later; when the
    attempt ends (the greeting times out), the hold is in the saved state
    and nothing more is attempted.
    """
    process = await begin(setup, patience=0.2)
    queue_id = await process.queue("r@stall.test")
    await until(lambda: process.gateway.queue.attempting(queue_id))
    answer = await process.run(HOLD, queue_id)
    assert answer.later and answer.changed
    assert "applies when that attempt ends" in answer.detail
    await until(lambda: process.state(queue_id).get("held_by") == "alice")
    assert process.state(queue_id)["attempts"] == 1
    assert process.gateway.queue.held_by(queue_id) == "alice"
    recipient = process.state(queue_id)["recipients"]["r@stall.test"]
    assert recipient["status"] == RecipientStatus.PENDING.value


def test_wire_forms() -> None:
    """
    Requests and answers survive JSON; malformed ones are refused with a
    reason rather than guessed at.
    """
    request = ToolRequest(DELETE, "Q1", "alice", bounce=True)
    assert ToolRequest.from_json(json.loads(json.dumps(request.to_json()))) == request
    answer = ToolAnswer(True, "done", later=True, count=3)
    assert ToolAnswer.from_json(json.loads(json.dumps(answer.to_json()))) == answer
    bad: object
    for bad in (
        [],
        {"action": "explode", "queue_id": "Q"},
        {"action": HOLD},
        {"action": HOLD, "queue_id": "Q", "bounce": "yes"},
        {"action": HOLD, "queue_id": 5},
    ):
        with pytest.raises(ToolFormatError):
            ToolRequest.from_json(bad)
    for bad_answer in ({}, {"changed": "yes", "detail": ""}, {"changed": True}):
        with pytest.raises(ToolFormatError):
            ToolAnswer.from_json(bad_answer)
