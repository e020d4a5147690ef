"""The session store's SQLite schema and its migrations.

The file's `PRAGMA user_version` is the schema version. `MIGRATIONS[n]` takes a
file from version n to n + 1, so a fresh file is built by running all of them
from version 0: the same path an old user's file takes, which keeps the
migrations exercised on every run. Never edit a released migration; append one.
"""

import sqlite3
from collections.abc import Sequence

from ember.errors import EmberError


class SchemaVersionError(EmberError):
    """The store was written by a newer ember whose schema this code does not know."""


# Version 1: the first release. Messages form a tree through parent_id; the
# session's head_message_id is the leaf of the active conversation.
_VERSION_1 = (
    """CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        title TEXT,
        system_prompt TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        head_message_id TEXT
    )""",
    """CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
)

# Version 2: model and sampling settings per session; token counts and a status
# per message so a reply cut off by a killed process is kept and marked.
_VERSION_2 = (
    "ALTER TABLE sessions ADD COLUMN model TEXT",
    "ALTER TABLE sessions ADD COLUMN sampling TEXT NOT NULL DEFAULT '{}'",
    "ALTER TABLE messages ADD COLUMN token_count INTEGER",
    """ALTER TABLE messages ADD COLUMN status TEXT NOT NULL DEFAULT 'complete'
        CHECK (status IN ('complete', 'streaming', 'interrupted'))""",
    "CREATE INDEX IF NOT EXISTS messages_by_session ON messages(session_id)",
    "CREATE INDEX IF NOT EXISTS messages_by_parent ON messages(parent_id)",
    "CREATE INDEX IF NOT EXISTS messages_by_status ON messages(status)",
)

# Version 3: which process is streaming a reply ("host:pid:start time"), so a store
# opened elsewhere recovers only replies whose writer is gone, not live ones.
_VERSION_3 = ("ALTER TABLE messages ADD COLUMN writer TEXT",)

# Version 4: who owns a session (the API key's user that created it over HTTP); NULL is the
# local user, the one `ember chat` and a server without keys act for.
_VERSION_4 = (
    "ALTER TABLE sessions ADD COLUMN owner TEXT",
    "CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions(owner, updated_at)",
)

# Version 5: an RNN model's (RWKV) state after a session's last turn, a few MB, so a conversation
# continued after a restart reads only its new message. One row per session; `model` names the
# model file and weight form the state belongs to, so another model never restores it.
_VERSION_5 = (
    """CREATE TABLE rnn_states (
        session_id TEXT PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
        model TEXT NOT NULL,
        state BLOB NOT NULL
    )""",
)

MIGRATIONS: tuple[Sequence[str], ...] = (_VERSION_1, _VERSION_2, _VERSION_3, _VERSION_4, _VERSION_5)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(connection: sqlite3.Connection) -> int:
    """The version recorded in the open database file (0 for a new, empty file)."""
    return connection.execute("PRAGMA user_version").fetchone()[0]


def migrate(connection: sqlite3.Connection, path: str) -> None:
    """Bring the file up to SCHEMA_VERSION, or refuse a file from a newer ember.

    Each step runs in its own write transaction and re-reads the version inside
    it, so two processes opening an old file at once migrate it exactly once.
    `connection` must be in autocommit mode (isolation_level=None).
    """
    _refuse_newer(connection, path)
    while schema_version(connection) < SCHEMA_VERSION:
        connection.execute("BEGIN IMMEDIATE")
        try:
            version = schema_version(connection)
            _refuse_newer(connection, path)
            if version < SCHEMA_VERSION:
                for statement in MIGRATIONS[version]:
                    connection.execute(statement)
                # PRAGMA takes no parameters; version is an int we computed.
                connection.execute(f"PRAGMA user_version = {version + 1}")
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise


def _refuse_newer(connection: sqlite3.Connection, path: str) -> None:
    version = schema_version(connection)
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"session store {path} has schema version {version}, newer than the {SCHEMA_VERSION} "
            "this ember understands; upgrade ember or use another data directory"
        )
