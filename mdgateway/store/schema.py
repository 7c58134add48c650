# -*- test-case-name: tests.test_store -*-
"""
The store's schema as numbered migrations, applied when a store opens.

Each migration is a list of DDL templates (type names in braces, see
L{mdgateway.store.dialect}) applied in one transaction together with its row
in C{schema_version}, so a database is always at a whole version. Concurrent
opens (several instances starting against one PostgreSQL database) are
serialized by the dialect's migration lock, and the statements use
C{IF NOT EXISTS}, so applying a migration is idempotent. Migrations are only
ever appended; a released one never changes.

Layout (version 1)::

    messages            one row per message copy (id = <queue_id>.<n>)
    message_recipients  its recipients with their latest delivery outcome
    message_events      the timeline, append-only
    message_parts       per-part verdicts
    refusals            the refused log
    quarantine          quarantined originals (metadata)
    quarantine_chunks   their bytes, in chunks of at most CHUNK_SIZE

Version 2 adds C{record_key} to C{message_events} and C{refusals} (the key
of the outbox record that wrote the row, see L{mdgateway.store.owed}),
C{category} and C{repeats} to C{refusals}, and the C{audit} table.

Version 3 adds the cluster's notice board, C{cluster_members} and
C{cluster_commands} (see L{mdgateway.store.board}).

Columns ending in C{_key} hold the case-folded text that substring
searches run on (C{record_key} excepted). Times are POSIX seconds in floating point.
"""

from __future__ import annotations

import attrs

from mdgateway.store.dialect import Dialect, Tx
from mdgateway.store.interfaces import SchemaVersionError


@attrs.frozen
class Migration:
    """
    One step of the schema.
    """

    version: int
    name: str
    statements: tuple[str, ...]


_V1 = (
    """
    CREATE TABLE IF NOT EXISTS messages (
        id TEXT PRIMARY KEY,
        queue_id TEXT NOT NULL,
        parent_id TEXT,
        instance TEXT NOT NULL,
        received_at {float} NOT NULL,
        client_address TEXT NOT NULL,
        helo TEXT NOT NULL,
        sender TEXT NOT NULL,
        sender_key TEXT NOT NULL,
        rule TEXT,
        direction TEXT,
        size {bigint} NOT NULL,
        subject TEXT NOT NULL,
        subject_key TEXT NOT NULL,
        message_id_header TEXT NOT NULL,
        status TEXT NOT NULL,
        verdict TEXT,
        actions TEXT NOT NULL,
        processed_at {float},
        delivered_at {float},
        finished_at {float},
        updated_at {float} NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at, id)",
    "CREATE INDEX IF NOT EXISTS messages_queue_id ON messages (queue_id)",
    "CREATE INDEX IF NOT EXISTS messages_status ON messages (status, received_at)",
    """
    CREATE TABLE IF NOT EXISTS message_recipients (
        message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        address TEXT NOT NULL,
        address_key TEXT NOT NULL,
        status TEXT NOT NULL,
        reply_code INTEGER,
        enhanced_code TEXT,
        reply_text TEXT NOT NULL,
        upstream_queue_id TEXT,
        server TEXT,
        at {float},
        attempts INTEGER NOT NULL,
        PRIMARY KEY (message_id, address)
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS message_recipients_key
        ON message_recipients (address_key)
    """,
    """
    CREATE TABLE IF NOT EXISTS message_events (
        id {serial_pk},
        message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        at {float} NOT NULL,
        status TEXT,
        text TEXT NOT NULL
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS message_events_message
        ON message_events (message_id, at, id)
    """,
    """
    CREATE TABLE IF NOT EXISTS message_parts (
        message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        part_id TEXT NOT NULL,
        filename TEXT,
        content_type TEXT NOT NULL,
        size {bigint} NOT NULL,
        data_id TEXT,
        core_url TEXT,
        result TEXT NOT NULL,
        blocked_reason TEXT,
        sanitized {bool} NOT NULL,
        dlp_hits TEXT NOT NULL,
        PRIMARY KEY (message_id, position)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS refusals (
        id {serial_pk},
        at {float} NOT NULL,
        listener TEXT NOT NULL,
        client_address TEXT NOT NULL,
        helo TEXT,
        sender TEXT,
        sender_key TEXT,
        recipient TEXT,
        recipient_key TEXT,
        reply_code INTEGER NOT NULL,
        enhanced_code TEXT,
        reason TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS refusals_at ON refusals (at, id)",
    """
    CREATE TABLE IF NOT EXISTS quarantine (
        id TEXT PRIMARY KEY,
        message_id TEXT NOT NULL REFERENCES messages (id),
        reason TEXT NOT NULL,
        reason_key TEXT NOT NULL,
        quarantined_at {float} NOT NULL,
        expires_at {float},
        size {bigint} NOT NULL,
        sha256 TEXT NOT NULL,
        chunks INTEGER NOT NULL,
        pinned {bool} NOT NULL,
        released_at {float},
        released_by TEXT
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS quarantine_at
        ON quarantine (quarantined_at, id)
    """,
    "CREATE INDEX IF NOT EXISTS quarantine_message ON quarantine (message_id)",
    "CREATE INDEX IF NOT EXISTS quarantine_expires ON quarantine (expires_at)",
    """
    CREATE TABLE IF NOT EXISTS quarantine_chunks (
        item_id TEXT NOT NULL REFERENCES quarantine (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        data {blob} NOT NULL,
        PRIMARY KEY (item_id, seq)
    )
    """,
)

# Version 2: records applied from the outbox carry their key (a replay is
# recognized and changes nothing); refusals carry their category and how
# many refusals a (flood summary) row stands for; the operator audit; and
# verdicts that claimed more than Core said are cleared: a copy that failed
# or was bypassed, or has a part Core never judged, has no verdict unless
# Core blocked a part.
_V2 = (
    "ALTER TABLE message_events ADD COLUMN record_key TEXT",
    """
    CREATE UNIQUE INDEX IF NOT EXISTS message_events_key
        ON message_events (record_key)
    """,
    "ALTER TABLE refusals ADD COLUMN record_key TEXT",
    "ALTER TABLE refusals ADD COLUMN category TEXT",
    "ALTER TABLE refusals ADD COLUMN repeats INTEGER NOT NULL DEFAULT 1",
    "CREATE UNIQUE INDEX IF NOT EXISTS refusals_key ON refusals (record_key)",
    """
    CREATE TABLE IF NOT EXISTS audit (
        id {serial_pk},
        at {float} NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        result TEXT NOT NULL,
        detail TEXT NOT NULL,
        claim TEXT,
        request_key TEXT,
        outcome TEXT NOT NULL,
        finished_at {float}
    )
    """,
    "CREATE INDEX IF NOT EXISTS audit_at ON audit (at, id)",
    "CREATE UNIQUE INDEX IF NOT EXISTS audit_claim ON audit (claim)",
    """
    UPDATE messages SET verdict = NULL
    WHERE verdict IS NOT NULL AND verdict <> 'Blocked' AND (
        status IN ('failed', 'bypassed')
        OR NOT EXISTS (
            SELECT 1 FROM message_parts p WHERE p.message_id = messages.id
        )
        OR EXISTS (
            SELECT 1 FROM message_parts p WHERE p.message_id = messages.id
            AND LOWER(p.result) NOT IN ('allowed', 'blocked')
        )
        OR (status = 'deferred' AND processed_at IS NOT NULL AND EXISTS (
            SELECT 1 FROM message_events e WHERE e.message_id = messages.id
            AND e.at >= messages.processed_at AND SUBSTR(e.text, 1, 7) = 'Failed/'
        ))
    )
    """,
)

_V3 = (
    """
    CREATE TABLE IF NOT EXISTS cluster_members (
        name TEXT PRIMARY KEY,
        started_at {float} NOT NULL,
        seen_at {float} NOT NULL,
        stopped_at {float}
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS cluster_commands (
        id {serial_pk},
        instance TEXT NOT NULL,
        sender TEXT NOT NULL,
        request TEXT NOT NULL,
        posted_at {float} NOT NULL,
        state TEXT NOT NULL,
        answer TEXT,
        answered_at {float}
    )
    """,
    "CREATE INDEX IF NOT EXISTS cluster_commands_waiting "
    "ON cluster_commands (instance, state, id)",
    "CREATE INDEX IF NOT EXISTS cluster_commands_posted "
    "ON cluster_commands (posted_at)",
)

#: Every migration, in order. Append; never edit a released one.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _V1),
    Migration(2, "outbox keys, refusal categories, audit, honest verdicts", _V2),
    Migration(3, "the cluster's notice board", _V3),
)

#: The version this code writes and reads.
SCHEMA_VERSION = MIGRATIONS[-1].version

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at {float} NOT NULL
)
"""


def current_version(tx: Tx) -> int:
    """
    The highest version recorded in C{schema_version} (0 when empty).
    """
    row = tx.one("SELECT MAX(version) FROM schema_version")
    return 0 if row is None or row[0] is None else int(row[0])


def migrate(
    tx: Tx,
    now: float,
    migrations: tuple[Migration, ...] = MIGRATIONS,
) -> list[int]:
    """
    Bring the database in C{tx} up to the last of C{migrations}.

    Runs inside the caller's write transaction, which commits every applied
    migration at once, or none.

    @return: the versions applied (empty when already current).
    @raise SchemaVersionError: the database is newer than C{migrations}.
    """
    dialect: Dialect = tx.dialect
    if dialect.migration_lock is not None:
        tx.execute(dialect.migration_lock)
    tx.execute(dialect.ddl(_VERSION_TABLE))
    have = current_version(tx)
    newest = migrations[-1].version if migrations else 0
    if have > newest:
        raise SchemaVersionError(
            f"database schema is at version {have}; this mdgateway knows up to "
            f"{newest}: upgrade mdgateway"
        )
    applied = []
    for migration in migrations:
        if migration.version <= have:
            continue
        for statement in migration.statements:
            tx.execute(dialect.ddl(statement))
        tx.execute(
            "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.name, now),
        )
        applied.append(migration.version)
    return applied
