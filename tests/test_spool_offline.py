"""
C{mdgateway spool}: a spool directory no gateway runs on, listed, shown and
moved into another root from the command line (L{mdgateway.queue.offline}
underneath). Entries are made by a real L{Spool}, which is then closed, as
a stopped gateway leaves its spool.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from mdgateway.ops.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from mdgateway.queue.envelope import Envelope, Recipient
from mdgateway.queue.offline import in_use, locked, move_entries
from mdgateway.queue.spool import Spool

pytestmark = pytest.mark.timeout(60)

MESSAGE = (
    b"From: a@example.com\r\nTo: r@example.org\r\nSubject: <b>offline</b>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
    b"--XX\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
    b"--XX\r\nContent-Type: application/pdf\r\n"
    b'Content-Disposition: attachment; filename="a.pdf"\r\n\r\n%PDF-1\r\n'
    b"--XX--\r\n"
)


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-offline")
    pool.start()
    yield pool
    pool.stop()


async def spool_with(
    root: Path, threadpool: ThreadPool, count: int, held: bool = False
) -> list[str]:
    """
    Commit C{count} messages into the spool at C{root} (the first held by
    alice when C{held}), then close it as a stopped gateway does.
    """
    spool = Spool(str(root), reactor, threadpool)
    await spool.recover()
    ids = []
    for n in range(count):
        writer = spool.open_writer()
        writer.write(MESSAGE)
        entry = await writer.commit(
            Envelope(
                queue_id=writer.queue_id,
                received_at=1_800_000_000.0 + n,
                sender="a@example.com",
                recipients=(Recipient(f"r{n}@example.org", {}, "inbound", "inbound"),),
                client_address="192.0.2.7",
                client_helo="mx.example.com",
            )
        )
        state = {"version": 2, "attempts": 1, "recipients": {}}
        if held and n == 0:
            state.update(held_by="alice", held_at=1_800_000_100.0)
        await spool.write_state(entry, state)
        ids.append(entry.queue_id)
    await spool.close()
    return ids


@attrs.frozen
class Run:
    code: int
    out: str
    err: str


def spool_cli(*argv: str, json_output: bool = False) -> Run:
    out, err = io.StringIO(), io.StringIO()
    first = ["--json"] if json_output else []
    code = main([*first, "spool", *argv], stdout=out, stderr=err, environ={})
    return Run(code, out.getvalue(), err.getvalue())


@pytest_twisted.ensureDeferred
async def test_list_and_show(tmp_path: Path, threadpool: ThreadPool) -> None:
    """
    C{spool list} lists the messages of the directory and of its worker
    roots (with the process and a hold); C{spool show} prints the
    envelope, the header block and the MIME structure; an id that is not
    there exits 1.
    """
    root = tmp_path / "spool"
    primary = await spool_with(root, threadpool, 2, held=True)
    (worker,) = await spool_with(root / "workers" / "2", threadpool, 1)
    result = spool_cli("list", "--dir", str(root))
    assert result.code == EXIT_OK, result.err
    lines = result.out.splitlines()
    assert lines[-1] == f"3 message(s) in {root}"
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert set(rows) == {*primary, worker}
    assert "held (alice)" in rows[primary[0]]
    assert rows[worker].split()[1] == "2"
    data = json.loads(spool_cli("list", "--dir", str(root), json_output=True).out)
    assert [i["queue_id"] for i in data["items"]] == [primary[0], worker, primary[1]]

    shown = spool_cli("show", worker, "--dir", str(root))
    assert shown.code == EXIT_OK, shown.err
    assert f"queue id:   {worker} (process 2)" in shown.out
    assert "mx.example.com [192.0.2.7]" in shown.out
    assert "Subject: <b>offline</b>" in shown.out
    assert '1.2 application/pdf "a.pdf"' in shown.out
    missing = spool_cli("show", "NOSUCHID", "--dir", str(root))
    assert (missing.code, missing.err) == (
        EXIT_FAILED,
        f"mdgateway: NOSUCHID: not in {root}\n",
    )


@pytest_twisted.ensureDeferred
async def test_move_is_refused_while_a_gateway_runs(
    tmp_path: Path, threadpool: ThreadPool
) -> None:
    """
    While a process holds the lock of the source (or of the target), a
    move is refused and nothing moves; the listing says the spool is in
    use.
    """
    root, target = tmp_path / "spool", tmp_path / "target"
    await spool_with(root, threadpool, 1)
    running = Spool(str(root), reactor, threadpool)
    await running.acquire()
    try:
        assert in_use(str(root))
        result = spool_cli("move", "--all", "--into", str(target), "--dir", str(root))
        assert result.code == EXIT_FAILED
        assert "in use by a running gateway: nothing was moved" in result.err
        assert (
            "note: a running gateway uses this spool (primary)"
            in spool_cli("list", "--dir", str(root)).out
        )
    finally:
        await running.close()
    assert len(list((root / "queue").glob("*.json"))) == 1
    live = Spool(str(target), reactor, threadpool)
    await live.acquire()
    try:
        result = spool_cli("move", "--all", "--into", str(target), "--dir", str(root))
        assert result.code == EXIT_FAILED
        assert len(list((root / "queue").glob("*.json"))) == 1
    finally:
        await live.close()


@pytest_twisted.ensureDeferred
async def test_move_hands_the_messages_over(
    tmp_path: Path, threadpool: ThreadPool
) -> None:
    """
    Moving named messages (and then all) takes them, with their delivery
    state, from the directory and its worker roots into the target, where
    a gateway starting on it recovers them; an unknown id is reported and
    exits 1.
    """
    root, target = tmp_path / "spool", tmp_path / "other" / "workers" / "7"
    ids = await spool_with(root, threadpool, 2, held=True)
    (worker,) = await spool_with(root / "workers" / "1", threadpool, 1)
    result = spool_cli(
        "move", ids[0], "NOSUCHID", "--into", str(target), "--dir", str(root)
    )
    assert result.code == EXIT_FAILED
    assert f"{ids[0]}: moved to {target}" in result.out
    assert f"NOSUCHID: not in {root}" in result.out
    result = spool_cli("move", "--all", "--into", str(target), "--dir", str(root))
    assert result.code == EXIT_OK, result.err
    assert result.out.splitlines()[-1] == "2 message(s) moved"
    assert not list((root / "queue").iterdir())
    assert not list((root / "workers" / "1" / "queue").iterdir())

    adopter = Spool(str(target), reactor, threadpool)
    entries = await adopter.recover()
    try:
        assert sorted(e.queue_id for e in entries) == sorted([*ids, worker])
        (first,) = [e for e in entries if e.queue_id == ids[0]]
        assert (await adopter.read_state(first) or {})["held_by"] == "alice"
        assert Path(first.message_path).read_bytes() == MESSAGE
    finally:
        await adopter.close()
    usage = spool_cli("move", "--into", str(target), "--dir", str(root))
    assert usage.code == EXIT_USAGE


@pytest_twisted.ensureDeferred
async def test_a_move_cut_short_completes_without_duplicates(
    tmp_path: Path, threadpool: ThreadPool
) -> None:
    """
    A move that crashed after the entry was linked into the target (both
    roots hold it) is completed by the next move: the entry is in the
    target once and gone from the source, not reported as a collision.
    """
    root, target = tmp_path / "spool", tmp_path / "target"
    (queue_id,) = await spool_with(root, threadpool, 1)
    with locked(str(target), create=True):
        pass
    for sub, suffix in (("queue", ".eml"), ("state", ".json"), ("queue", ".json")):
        os.link(
            root / sub / f"{queue_id}{suffix}", target / sub / f"{queue_id}{suffix}"
        )
    report = move_entries(str(root), str(target))
    assert (report.moved, report.collided) == ((queue_id,), ())
    assert sorted(p.name for p in (target / "queue").iterdir()) == [
        f"{queue_id}.eml",
        f"{queue_id}.json",
    ]
    assert not list((root / "queue").iterdir())
    assert not list((root / "state").iterdir())


def test_move_into_its_own_root_is_refused(tmp_path: Path) -> None:
    """
    A move whose target is the source (or one of its worker roots) is
    refused before anything is touched.
    """
    root = tmp_path / "spool"
    (root / "workers" / "1").mkdir(parents=True)
    result = spool_cli(
        "move", "--all", "--into", str(root / "workers" / "1"), "--dir", str(root)
    )
    assert result.code == EXIT_FAILED
    assert "one of the roots the entries come from" in result.err


@pytest_twisted.ensureDeferred
async def test_move_across_file_systems_is_refused(
    tmp_path: Path, threadpool: ThreadPool
) -> None:
    """
    A move into a directory on another file system (where hard links
    cannot reach) is refused before anything is touched, saying to copy
    the spool over first; the messages stay listed in the source.
    """
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    root = tmp_path / "spool"
    ids = await spool_with(root, threadpool, 1)
    with tempfile.TemporaryDirectory(dir=shm) as other:
        target = Path(other) / "spool" / "workers" / "9"
        result = spool_cli("move", "--all", "--into", str(target), "--dir", str(root))
        assert result.code == EXIT_FAILED
        assert "on another file system" in result.err
        assert "copy the spool directory" in result.err
        assert not target.exists()
    listed = spool_cli("list", "--dir", str(root))
    assert ids[0] in listed.out
