# -*- test-case-name: tests.test_store -*-
"""
History, refused log and quarantine behind one interface, L{IStore}.

L{SqliteStore} is the embedded default (one host); L{PostgresStore} lets
several gateway instances share one history and quarantine. L{store_for}
picks one from a configured location.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.python.threadpool import ThreadPool

from mdgateway.store.interfaces import (
    CorruptOriginalError,
    DeliveryStatus,
    InstanceActivity,
    IStore,
    MessageFilter,
    MessageRecord,
    MessageStatus,
    MessageSummary,
    NotFoundError,
    Page,
    PageRequest,
    PartVerdict,
    PurgeCounts,
    QuarantineFilter,
    QuarantineItem,
    QuarantineSource,
    ReceivedMessage,
    RecipientDelivery,
    Refusal,
    RefusalFilter,
    ScanVerdict,
    SchemaVersionError,
    StoreError,
    TimelineEvent,
    VerdictCount,
    copy_id,
    overall_verdict,
)
from mdgateway.store.sqlite import SqliteStore
from mdgateway.store.upstream import parse_upstream_queue_id

__all__ = [
    "CorruptOriginalError",
    "DeliveryStatus",
    "IStore",
    "InstanceActivity",
    "MessageFilter",
    "MessageRecord",
    "MessageStatus",
    "MessageSummary",
    "NotFoundError",
    "Page",
    "PageRequest",
    "PartVerdict",
    "PurgeCounts",
    "QuarantineFilter",
    "QuarantineItem",
    "QuarantineSource",
    "ReceivedMessage",
    "RecipientDelivery",
    "Refusal",
    "RefusalFilter",
    "ScanVerdict",
    "SchemaVersionError",
    "SqliteStore",
    "StoreError",
    "TimelineEvent",
    "VerdictCount",
    "copy_id",
    "overall_verdict",
    "parse_upstream_queue_id",
    "store_for",
]

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def store_for(location: str, reactor: IReactorTime, threadpool: ThreadPool) -> IStore:
    """
    The store a config's location names: a C{postgresql://} (or
    C{postgres://}) URL for L{PostgresStore}, else a SQLite file path
    (C{sqlite:///abs/path} or a plain path). Call C{open()} on it next.

    psycopg is imported only when PostgreSQL is asked for.
    """
    if location.startswith(_POSTGRES_SCHEMES):
        from mdgateway.store.postgres import PostgresStore

        return PostgresStore(location, reactor, threadpool)
    if location.startswith("sqlite://"):
        location = location[len("sqlite://") :]
        if not location:
            raise ValueError("sqlite:// needs a path, e.g. sqlite:///var/lib/x.db")
    return SqliteStore(location, reactor, threadpool)
