"""
Every seam is a zope interface, and both sides of it provide it: the
production object (as the composition root builds it) and the verified fake
in L{mdgateway.testing} that tests and embedders use in its place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface
from zope.interface.verify import verifyClass, verifyObject

from mdgateway.config import parse_config
from mdgateway.fileops import IFileOps, OSFileOps
from mdgateway.ops.interfaces import IOperations
from mdgateway.policy.profiles import CoreServer
from mdgateway.queue.bounces import IBounceWriter
from mdgateway.queue.copies import ICopyProcessor
from mdgateway.queue.history import IHistory, LogHistory
from mdgateway.queue.loopguard import ILoopGuard
from mdgateway.queue.writer import ISpoolWriter, SpoolWriter
from mdgateway.receive.admission import IRecipientVerifier
from mdgateway.receive.handler import IRecipientPolicy, SpoolSink
from mdgateway.relay.hosts import DNSPythonResolver, IMXResolver
from mdgateway.relay.interfaces import IRelay
from mdgateway.run.compose import Gateway, build_gateway
from mdgateway.run.service import GatewayService
from mdgateway.scan.client import CoreClient, build_http_client
from mdgateway.scan.interfaces import ICoreServerClient, IScanner
from mdgateway.smtp.interfaces import IEnvelopeHandler, IMessageSink
from mdgateway.store.interfaces import IStore
from mdgateway.store.sqlite import SqliteStore
from mdgateway.testing import FakeEnvelopeHandler, MemorySink
from mdgateway.testing.core import FakeCoreServerClient
from mdgateway.testing.disk import DyingFileOps, FaultyFileOps, WatchedFileOps
from mdgateway.testing.ops import FakeOperations
from mdgateway.testing.queue import (
    FakeLoopGuard,
    RecordingBounces,
    RecordingHistory,
    ScriptedProcessor,
)
from mdgateway.testing.receive import ScriptedVerifier
from mdgateway.testing.relay import FakeRelay, TableResolver
from mdgateway.testing.scan import FakeScanner
from mdgateway.testing.store import OutageSqliteStore
from mdgateway.testing.threads import ThreadsMemoryReactor


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    """
    A whole gateway, built but never started, on a memory reactor.
    """
    values = {
        "sender_helo_domain": "gw.test",
        "listeners": [{"name": "smtp", "endpoint": "tcp:0", "tls": "none"}],
        "spool": {"directory": "spool"},
        "profiles": {
            "core": {"core": {"servers": ["http://127.0.0.1:8008"]}},
            "smtp": {"out": {"servers": ["maildir:out"]}},
        },
        "rules": [
            {
                "name": "local",
                "client_networks": ["127.0.0.0/8"],
                "core_profile": "core",
                "relay_profile": "out",
            }
        ],
    }
    config = parse_config(values, base=tmp_path)
    built = build_gateway(config, ThreadsMemoryReactor())  # type: ignore[arg-type]
    built.runtimes.sync(config.policy.core_profiles)
    yield built


def production(gateway: Gateway) -> list[tuple[type[Interface], Any]]:
    """
    The production side of every seam, as the composition root wired it.
    """
    config = gateway.config
    profile = config.policy.core_profiles["core"]
    http, _ = build_http_client(gateway.reactor, profile)
    return [
        (IEnvelopeHandler, gateway.handler),
        (IRecipientPolicy, gateway.handler.policy),
        (IRecipientVerifier, gateway.verifier),
        (IScanner, gateway.runtimes["core"]),
        (
            ICoreServerClient,
            CoreClient(profile.servers[0], profile, http, gateway.reactor),
        ),
        (ICopyProcessor, gateway.processor),
        (IRelay, gateway.relay),
        (IMXResolver, DNSPythonResolver(gateway.reactor, ThreadPool())),
        (IHistory, gateway.history),
        (IHistory, LogHistory()),
        (IBounceWriter, gateway.queue.bounces),
        (ILoopGuard, gateway.loop_guard),
        (IStore, gateway.store),
        (IFileOps, OSFileOps()),
        (IOperations, GatewayService(gateway).operations),
    ]


def memory_store() -> SqliteStore:
    return SqliteStore(":memory:", ThreadsMemoryReactor(), ThreadPool())


FAKES: list[tuple[type[Interface], Callable[[], Any]]] = [
    (IEnvelopeHandler, FakeEnvelopeHandler),
    (IMessageSink, MemorySink),
    (IRecipientVerifier, ScriptedVerifier),
    (IScanner, FakeScanner),
    (ICoreServerClient, lambda: FakeCoreServerClient(CoreServer("http://core.test"))),
    (ICopyProcessor, ScriptedProcessor),
    (IRelay, FakeRelay),
    (IMXResolver, lambda: TableResolver({})),
    (IHistory, RecordingHistory),
    (IBounceWriter, lambda: RecordingBounces(ThreadsMemoryReactor())),
    (ILoopGuard, FakeLoopGuard),
    (IFileOps, FaultyFileOps),
    (IFileOps, DyingFileOps),
    (IFileOps, WatchedFileOps),
    (
        IStore,
        lambda: OutageSqliteStore(":memory:", ThreadsMemoryReactor(), ThreadPool()),
    ),
    (
        IOperations,
        lambda: FakeOperations(
            SqliteStore(":memory:", ThreadsMemoryReactor(), ThreadPool())
        ),
    ),
]


def test_production_objects_provide_their_seams(gateway: Gateway) -> None:
    """
    Every production object the composition root builds for a seam
    provides that seam's interface, methods and attributes alike.
    """
    checked = []
    for interface, obj in production(gateway):
        assert verifyObject(interface, obj), (interface, obj)
        checked.append(interface)
    assert set(checked) >= {interface for interface, _ in FAKES} - {IMessageSink}


@pytest.mark.parametrize(
    "interface,make", FAKES, ids=lambda v: getattr(v, "__name__", repr(v))
)
def test_fakes_provide_their_seams(
    interface: type[Interface], make: Callable[[], Any]
) -> None:
    """
    Every fake provides the interface of the seam it stands in for.
    """
    assert verifyObject(interface, make())


def test_classes_built_per_message() -> None:
    """
    The two seams whose production objects exist only while a message is
    received (a spool writer, the sink feeding it) are checked as classes.
    """
    assert verifyClass(ISpoolWriter, SpoolWriter)
    assert verifyClass(IMessageSink, SpoolSink)


def test_every_fake_module_is_checked() -> None:
    """
    Each fake class that L{mdgateway.testing} offers for an interface is in
    the table above, so a new fake cannot go unverified.
    """
    import inspect

    import mdgateway.testing as package
    from mdgateway.testing import core, disk, ops, queue, receive, relay, scan, store

    listed = {make for _, make in FAKES if inspect.isclass(make)}
    listed |= {
        TableResolver,
        RecordingBounces,
        OutageSqliteStore,
        FakeOperations,
        FakeCoreServerClient,
    }
    for module in (package, core, disk, ops, queue, receive, relay, scan, store):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            provided = list(getattr(cls, "__implemented__", ()) or ())
            if provided:
                assert cls in listed, f"{module.__name__}.{cls.__name__}"
