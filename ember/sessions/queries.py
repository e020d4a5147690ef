"""Row-level helpers shared by SessionStore's operations, each run inside a transaction already open.

The store owns the connection, the lock and the transactions; these functions
read and write rows, check that ids exist and belong together, and raise the
lookup errors users see.
"""

import json
import secrets
import sqlite3
import time

from ember.errors import InvalidRequestError
from ember.sessions.records import Message, Session

# 16 hex characters (2**64 possible ids): served over HTTP, ids must not be guessable from
# each other; `ember chat` users type a short prefix.
ID_BYTES = 8


class NotFoundError(InvalidRequestError):
    """No session or message has the given id."""


class AmbiguousIdError(InvalidRequestError):
    """A typed id prefix matches more than one session."""


MESSAGE_COLUMNS = "id, session_id, parent_id, role, content, created_at, token_count, status"

# Walks from each selected session's head up to its root; counts give the active path's length.
PATH_LENGTHS = """
WITH RECURSIVE path(session_id, message_id) AS (
    SELECT id, head_message_id FROM sessions WHERE head_message_id IS NOT NULL {condition}
    UNION ALL
    SELECT path.session_id, messages.parent_id FROM messages JOIN path ON messages.id = path.message_id
    WHERE messages.parent_id IS NOT NULL
)
SELECT session_id, count(*) FROM path GROUP BY session_id
"""

ACTIVE_PATH = f"""
WITH RECURSIVE path(message_id, depth) AS (
    SELECT ?, 0
    UNION ALL
    SELECT messages.parent_id, path.depth + 1 FROM messages JOIN path ON messages.id = path.message_id
    WHERE messages.parent_id IS NOT NULL
)
SELECT {MESSAGE_COLUMNS} FROM path JOIN messages ON messages.id = path.message_id ORDER BY path.depth DESC
"""


def resolve_session_id(connection: sqlite3.Connection, typed_id: str) -> str:
    typed_id = typed_id.strip().lower()
    if connection.execute("SELECT 1 FROM sessions WHERE id = ?", (typed_id,)).fetchone():
        return typed_id
    rows = connection.execute(
        "SELECT id FROM sessions WHERE ? != '' AND substr(id, 1, ?) = ? ORDER BY id LIMIT 5",
        (typed_id, len(typed_id), typed_id),
    ).fetchall()
    if not rows:
        raise NotFoundError(f"no session with id {typed_id!r}")
    if len(rows) > 1:
        matches = ", ".join(row["id"] for row in rows)
        raise AmbiguousIdError(f"session id {typed_id!r} is ambiguous (matches {matches}); type more of it")
    return rows[0]["id"]


def require_owned_session(connection: sqlite3.Connection, session_id: str, owner: str | None) -> sqlite3.Row:
    """The session with exactly this id and owner; any other id (a prefix, another user's) is not found.

    One message for every miss, so a caller cannot tell another user's id from a missing one.
    """
    row = connection.execute(
        "SELECT * FROM sessions WHERE id = ? AND owner IS ?", (session_id, owner)
    ).fetchone()
    if row is None:
        raise NotFoundError(f"no session with id {session_id!r}")
    return row


def require_session(connection: sqlite3.Connection, session_id: str) -> sqlite3.Row:
    row = connection.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no session with id {session_id!r}")
    return row


def read_session(connection: sqlite3.Connection, session_id: str) -> Session:
    row = require_session(connection, session_id)
    count = connection.execute(PATH_LENGTHS.format(condition="AND id = ?"), (session_id,)).fetchone()
    return session_from_row(row, count[1] if count else 0)


def read_message(connection: sqlite3.Connection, message_id: str) -> Message:
    row = connection.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no message with id {message_id!r}")
    return message_from_row(row)


def read_active_path(connection: sqlite3.Connection, session_id: str) -> list[Message]:
    head_id = require_session(connection, session_id)["head_message_id"]
    if head_id is None:
        return []
    return [message_from_row(row) for row in connection.execute(ACTIVE_PATH, (head_id,))]


def insert_message(
    connection: sqlite3.Connection,
    session_id: str,
    parent_id: str | None,
    role: str,
    content: str,
    status: str,
    token_count: int | None,
    writer: str | None = None,
) -> Message:
    """Add a message (with its writer, for a streaming reply) and make it the head.

    Runs in the caller's transaction."""
    require_session(connection, session_id)
    if parent_id is not None and read_message(connection, parent_id).session_id != session_id:
        raise InvalidRequestError(f"message {parent_id} belongs to another session")
    message_id = new_id(connection, "messages")
    connection.execute(
        f"INSERT INTO messages ({MESSAGE_COLUMNS}, writer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (message_id, session_id, parent_id, role, content, time.time(), token_count, status, writer),
    )
    set_head(connection, session_id, message_id)
    return read_message(connection, message_id)


def set_head(connection: sqlite3.Connection, session_id: str, message_id: str | None) -> None:
    require_session(connection, session_id)
    if message_id is not None and read_message(connection, message_id).session_id != session_id:
        raise InvalidRequestError(f"message {message_id} belongs to another session")
    connection.execute("UPDATE sessions SET head_message_id = ? WHERE id = ?", (message_id, session_id))
    touch(connection, session_id)


def sibling_ids(connection: sqlite3.Connection, session_id: str) -> dict[str, list[str]]:
    """Message id -> ids of it and its siblings (same parent and role), oldest first, where any exist."""
    groups: dict[tuple[str | None, str], list[str]] = {}
    rows = connection.execute(
        "SELECT id, parent_id, role FROM messages WHERE session_id = ? ORDER BY created_at, rowid",
        (session_id,),
    )
    for row in rows:
        groups.setdefault((row["parent_id"], row["role"]), []).append(row["id"])
    return {message_id: ids for ids in groups.values() if len(ids) > 1 for message_id in ids}


def touch(connection: sqlite3.Connection, session_id: str) -> None:
    connection.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (time.time(), session_id))


def new_id(connection: sqlite3.Connection, table: str) -> str:
    while True:
        candidate = secrets.token_hex(ID_BYTES)
        if not connection.execute(f"SELECT 1 FROM {table} WHERE id = ?", (candidate,)).fetchone():
            return candidate


def session_from_row(row: sqlite3.Row, message_count: int) -> Session:
    # The sessions table's columns are exactly Session's fields, bar the computed count.
    return Session(**{**dict(row), "sampling": json.loads(row["sampling"]), "message_count": message_count})


def message_from_row(row: sqlite3.Row) -> Message:
    return Message(**dict(row))  # rows are selected with MESSAGE_COLUMNS, Message's fields
