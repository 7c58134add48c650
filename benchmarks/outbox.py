"""
The outbox of records for the store: how fast records are kept on disk (each
append fsynced, appends batched) and how fast a backlog left by a store
outage is applied once the store is back.

    python3 benchmarks/outbox.py [--records 20000] [--writers 16]

A writer appends one record and waits until it is on disk, as the pipeline
does; C{--writers} of them run at once. With the store switched off the
records pile up; then the store comes back and the backlog is timed until
the last record is applied (to a SQLite store).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mdgateway.store import MessageStatus, ReceivedMessage
from mdgateway.store.outbox import Outbox
from mdgateway.store.owed import OwedReceived, OwedStatus
from mdgateway.testing.store import OutageSqliteStore


def record(n: int) -> OwedReceived | OwedStatus:
    message_id = f"B{n // 2}.1"
    if n % 2 == 0:
        message = ReceivedMessage(
            id=message_id,
            queue_id=f"B{n // 2}",
            received_at=time.time(),
            client_address="192.0.2.1",
            helo="bench.example",
            sender="a@example.com",
            recipients=("b@example.org",),
            rule="bench",
            direction="inbound",
            size=10240,
        )
        return OwedReceived(
            message, "received", time.time(), MessageStatus.PROCESSING, "processing"
        )
    return OwedStatus(message_id, MessageStatus.DELIVERED, "delivered", time.time())


async def run(args: argparse.Namespace) -> None:
    pool = ThreadPool(minthreads=1, maxthreads=8, name="bench")
    pool.start()
    work = Path(tempfile.mkdtemp(prefix="mdgateway-outbox-bench-"))
    store = OutageSqliteStore(str(work / "history.sqlite"), reactor, pool)
    await store.open()
    outbox = Outbox(str(work / "outbox"), store, reactor, pool, limit=10**9)
    await outbox.open()
    store.down = True
    latencies: list[float] = []
    counter = iter(range(args.records))

    async def writer() -> None:
        for n in counter:
            started = time.perf_counter()
            await outbox.append(record(n))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(writer()) for _ in range(args.writers)]
    )
    kept = time.perf_counter() - started
    store.down = False
    started = time.perf_counter()
    while outbox.depth:
        await task.deferLater(reactor, 0.01, lambda: None)
    applied = time.perf_counter() - started
    latencies.sort()
    print(f"{args.records} records, {args.writers} writers at once, SQLite store")
    print(
        f"kept on disk:   {kept:6.2f} s  {args.records / kept:8.0f} records/s  "
        f"append p50 {statistics.median(latencies) * 1000:.1f} ms  "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms"
    )
    print(f"backlog applied: {applied:6.2f} s  {args.records / applied:8.0f} records/s")
    await outbox.close()
    await store.close()
    pool.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--writers", type=int, default=16)
    args = parser.parse_args()
    failures: list[BaseException] = []

    def done(result: object) -> None:
        if isinstance(result, Failure):
            failures.append(result.value)
        reactor.stop()

    reactor.callWhenRunning(
        lambda: defer.Deferred.fromCoroutine(run(args)).addBoth(done)
    )
    reactor.run()
    if failures:
        print(f"failed: {failures[0]!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
