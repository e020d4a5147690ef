"""SessionStore: many conversations, each a tree of messages, in one SQLite file.

A session's `head_message_id` names the leaf of its active conversation, which
is the path root -> head. Regenerating or editing adds a sibling instead of
overwriting, so every earlier answer stays reachable as an alternative. Nothing
is ever deleted except by `delete_session`.

Durability: WAL journal, synchronous=FULL, every write one transaction. A reply
is written while it streams (status 'streaming'); a store opened after its
writer died marks it 'interrupted' and keeps the partial text. Each streaming
reply records its writer (host, pid and the process's start time), so a store
opened by another live process leaves replies that are still being written
alone.
"""

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Self

from ember.errors import EmberError, InvalidRequestError
from ember.sessions import export, queries
from ember.sessions.queries import NotFoundError
from ember.sessions.records import ROLES, STATUSES, Message, Session
from ember.sessions.schema import migrate
from ember.sessions.writer import THIS_WRITER, writer_is_alive


class _Marker(Enum):
    AT_HEAD = "at head"
    UNCHANGED = "unchanged"
    ANY_OWNER = "any owner"


AT_HEAD = _Marker.AT_HEAD  # append_message's default parent: the session's current head
UNCHANGED = _Marker.UNCHANGED  # update_session's default: leave that field as it is
ANY_OWNER = _Marker.ANY_OWNER  # list_sessions' default: every session in the file, whoever owns it


class SessionStore:
    """Sessions and their message trees in one SQLite file; safe to open from several processes.

    One connection per store, guarded by a lock, so threads of one process may
    share a store. Use as a context manager or call `close()`.
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0):
        self.path = Path(path).expanduser()
        self._lock = threading.RLock()
        try:
            self._connection = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as error:
            raise EmberError(f"cannot open session store {self.path}: {error}") from error
        self._connection.row_factory = sqlite3.Row
        try:
            self._connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._connection.execute("PRAGMA journal_mode = WAL")
            self._connection.execute("PRAGMA synchronous = FULL")
            self._connection.execute("PRAGMA foreign_keys = ON")
            migrate(self._connection, str(self.path))
            with self._transaction() as connection:
                orphans = [
                    row["id"]
                    for row in connection.execute(
                        "SELECT id, writer FROM messages WHERE status = 'streaming'"
                    )
                    if not writer_is_alive(row["writer"])
                ]
                connection.executemany(
                    "UPDATE messages SET status = 'interrupted' WHERE id = ?", [(i,) for i in orphans]
                )
            # How many unfinished replies from a killed process were found and kept.
            self.recovered_replies: int = len(orphans)
        except BaseException as error:
            self._connection.close()
            if isinstance(error, sqlite3.Error):
                raise EmberError(f"cannot open session store {self.path}: {error}") from error
            raise

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Sessions

    def create_session(
        self,
        title: str | None = None,
        system_prompt: str | None = None,
        model: str | None = None,
        sampling: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> Session:
        """A new, empty session; `owner` is the API user creating it (None: the local user)."""
        now = time.time()
        sampling_text = _sampling_json(sampling or {})
        with self._transaction() as connection:
            session_id = queries.new_id(connection, "sessions")
            connection.execute(
                "INSERT INTO sessions"
                " (id, title, system_prompt, model, sampling, created_at, updated_at, owner)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (session_id, title, system_prompt, model, sampling_text, now, now, owner),
            )
            return queries.read_session(connection, session_id)

    def get_session(self, session_id: str) -> Session:
        """The session with this id, or the only one whose id starts with it (users type prefixes)."""
        with self._transaction(write=False) as connection:
            return queries.read_session(connection, queries.resolve_session_id(connection, session_id))

    def get_owned_session(self, session_id: str, owner: str | None) -> Session:
        """The session with exactly this id if `owner` owns it; NotFoundError otherwise (no prefixes).

        The HTTP API's lookup: another user's session and a missing one look the same.
        """
        with self._transaction(write=False) as connection:
            queries.require_owned_session(connection, session_id, owner)
            return queries.read_session(connection, session_id)

    def list_sessions(
        self, *, owner: str | None | _Marker = ANY_OWNER, title_contains: str | None = None
    ) -> list[Session]:
        """Sessions, most recently updated first: all of them, or `owner`'s, optionally by title words."""
        conditions, parameters = [], []
        if owner is not ANY_OWNER:
            conditions.append("owner IS ?")
            parameters.append(owner)
        if title_contains:
            conditions.append("instr(lower(coalesce(title, '')), lower(?)) > 0")
            parameters.append(title_contains)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._transaction(write=False) as connection:
            counts = dict(connection.execute(queries.PATH_LENGTHS.format(condition="")).fetchall())
            rows = connection.execute(
                f"SELECT * FROM sessions {where} ORDER BY updated_at DESC, rowid DESC", parameters
            )
            return [queries.session_from_row(row, counts.get(row["id"], 0)) for row in rows]

    def update_session(
        self,
        session_id: str,
        *,
        title: str | None | _Marker = UNCHANGED,
        system_prompt: str | None | _Marker = UNCHANGED,
        model: str | None | _Marker = UNCHANGED,
        sampling: dict[str, Any] | None | _Marker = UNCHANGED,
    ) -> Session:
        """Change the given fields (None clears one); fields left UNCHANGED keep their value."""
        changes: dict[str, Any] = {"title": title, "system_prompt": system_prompt, "model": model}
        if sampling is not UNCHANGED:
            changes["sampling"] = _sampling_json(sampling or {})
        changes = {name: value for name, value in changes.items() if value is not UNCHANGED}
        changes["updated_at"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in changes)  # names are ours, never user input
        with self._transaction() as connection:
            queries.require_session(connection, session_id)
            connection.execute(
                f"UPDATE sessions SET {assignments} WHERE id = ?", (*changes.values(), session_id)
            )
            return queries.read_session(connection, session_id)

    def delete_session(self, session_id: str) -> None:
        """Delete the session and all of its messages, branches included."""
        with self._transaction() as connection:
            queries.require_session(connection, session_id)
            connection.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            connection.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    # Reading messages

    def get_message(self, message_id: str) -> Message:
        with self._transaction(write=False) as connection:
            return queries.read_message(connection, message_id)

    def active_path(self, session_id: str) -> list[Message]:
        """The active conversation, root first and head last (empty when the head is None)."""
        with self._transaction(write=False) as connection:
            return queries.read_active_path(connection, session_id)

    def session_message(self, session_id: str, message_id: str) -> Message:
        """The message with this id if it belongs to this session; NotFoundError otherwise."""
        with self._transaction(write=False) as connection:
            row = connection.execute(
                f"SELECT {queries.MESSAGE_COLUMNS} FROM messages WHERE id = ? AND session_id = ?",
                (message_id, session_id),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no message with id {message_id!r} in this session")
            return queries.message_from_row(row)

    def sibling_ids(self, session_id: str) -> dict[str, list[str]]:
        """Message id -> the ids of it and its alternatives (oldest first), for messages that have any."""
        with self._transaction(write=False) as connection:
            return queries.sibling_ids(connection, session_id)

    def alternatives(self, message_id: str) -> list[Message]:
        """The message and its siblings of the same role, oldest first: /alt N picks index N - 1."""
        with self._transaction(write=False) as connection:
            message = queries.read_message(connection, message_id)
            rows = connection.execute(
                f"SELECT {queries.MESSAGE_COLUMNS} FROM messages"
                " WHERE session_id = ? AND parent_id IS ? AND role = ? ORDER BY created_at, rowid",
                (message.session_id, message.parent_id, message.role),
            )
            return [queries.message_from_row(row) for row in rows]

    # Writing messages

    def append_message(
        self,
        session_id: str,
        role: str,
        content: str,
        *,
        status: str = "complete",
        token_count: int | None = None,
        parent_id: str | None | _Marker = AT_HEAD,
    ) -> Message:
        """Add a message under `parent_id` (the head by default, None for a new root) and make it the head."""
        if role not in ROLES:
            raise InvalidRequestError(f"unknown message role {role!r}; expected one of {', '.join(ROLES)}")
        if status not in STATUSES:
            raise InvalidRequestError(f"unknown message status {status!r}")
        with self._transaction() as connection:
            if parent_id is AT_HEAD:
                parent_id = queries.require_session(connection, session_id)["head_message_id"]
            return queries.insert_message(
                connection, session_id, parent_id, role, content, status, token_count
            )

    def start_reply(self, session_id: str, *, parent_id: str | None | _Marker = AT_HEAD) -> Message:
        """Create an empty assistant message in status 'streaming', written by this process, as the head.

        One transaction: a reader (another process opening the store) never sees a
        streaming reply without its writer, which it would take for orphaned.
        """
        with self._transaction() as connection:
            if parent_id is AT_HEAD:
                parent_id = queries.require_session(connection, session_id)["head_message_id"]
            return queries.insert_message(
                connection, session_id, parent_id, "assistant", "", "streaming", None, writer=THIS_WRITER
            )

    def start_alternative_reply(self, session_id: str) -> Message:
        """/regen: start another answer to the last user message, keeping the current one as a sibling."""
        with self._transaction() as connection:
            path = queries.read_active_path(connection, session_id)
            if not path:
                raise InvalidRequestError("there is no message to answer again")
            head = path[-1]
            parent_id = head.parent_id if head.role == "assistant" else head.id
            return queries.insert_message(
                connection, session_id, parent_id, "assistant", "", "streaming", None, writer=THIS_WRITER
            )

    def update_reply(self, message_id: str, content: str) -> None:
        """Store the reply's text so far (the whole text, not a delta); one small write, fine every 0.5 s."""
        with self._transaction() as connection:
            cursor = connection.execute(
                "UPDATE messages SET content = ?, status = 'streaming', writer = ?"
                " WHERE id = ? AND status != 'complete'",
                (content, THIS_WRITER, message_id),
            )
            if cursor.rowcount == 0:
                queries.read_message(connection, message_id)  # raises NotFoundError when missing
                raise InvalidRequestError(f"message {message_id} is complete; call resume_reply first")

    def finish_reply(
        self,
        message_id: str,
        content: str,
        token_count: int | None = None,
        status: str = "complete",
        rnn_state: tuple[str, bytes] | None = None,
    ) -> Message:
        """Store the reply's final text and mark it 'complete' or 'interrupted' (stopped early).

        `rnn_state` (model key, bytes): the RNN state after this turn, kept in the same transaction
        in place of the session's previous one.
        """
        if status not in ("complete", "interrupted"):
            raise InvalidRequestError(f"a reply finishes as 'complete' or 'interrupted', not {status!r}")
        with self._transaction() as connection:
            message = queries.read_message(connection, message_id)
            if message.status == "complete":
                raise InvalidRequestError(f"message {message_id} is already complete")
            connection.execute(
                "UPDATE messages SET content = ?, token_count = ?, status = ? WHERE id = ?",
                (content, token_count, status, message_id),
            )
            if rnn_state is not None:
                connection.execute(
                    "INSERT OR REPLACE INTO rnn_states (session_id, model, state) VALUES (?, ?, ?)",
                    (message.session_id, rnn_state[0], rnn_state[1]),
                )
            queries.touch(connection, message.session_id)
            return queries.read_message(connection, message_id)

    def rnn_state(self, session_id: str, model: str) -> bytes | None:
        """The RNN state stored after the session's last turn, if it belongs to `model`."""
        with self._transaction(write=False) as connection:
            row = connection.execute(
                "SELECT state FROM rnn_states WHERE session_id = ? AND model = ?", (session_id, model)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def resume_reply(self, message_id: str) -> Message:
        """/continue: reopen the head assistant message for streaming so the model can extend it."""
        with self._transaction() as connection:
            message = queries.read_message(connection, message_id)
            head_id = queries.require_session(connection, message.session_id)["head_message_id"]
            if message.role != "assistant" or message.id != head_id:
                raise InvalidRequestError("only the last answer of the conversation can be continued")
            connection.execute(
                "UPDATE messages SET status = 'streaming', writer = ? WHERE id = ?", (THIS_WRITER, message_id)
            )
            return queries.read_message(connection, message_id)

    def edit_message(self, message_id: str, content: str) -> Message:
        """/edit: a sibling with the new content becomes the head; the original stays as an alternative."""
        with self._transaction() as connection:
            original = queries.read_message(connection, message_id)
            return queries.insert_message(
                connection, original.session_id, original.parent_id, original.role, content, "complete", None
            )

    # Moving the head

    def remove_branch(self, message_id: str, head_id: str | None, updated_at: float | None = None) -> None:
        """Delete a message and everything under it; `head_id` is the head again (and `updated_at` the time).

        Only for taking back a branch that was just made and could not be answered
        (an edit whose reply failed to start): the session is left as it was before.
        """
        with self._transaction() as connection:
            message = queries.read_message(connection, message_id)
            queries.set_head(connection, message.session_id, head_id)
            connection.execute("DELETE FROM messages WHERE id = ?", (message_id,))  # children cascade
            if updated_at is not None:
                connection.execute(
                    "UPDATE sessions SET updated_at = ? WHERE id = ?", (updated_at, message.session_id)
                )

    def set_head(self, session_id: str, message_id: str | None) -> None:
        with self._transaction() as connection:
            queries.set_head(connection, session_id, message_id)

    def choose_alternative(self, session_id: str, message_id: str) -> Message:
        """/alt: follow `message_id`'s branch to its newest leaf and make that the head."""
        with self._transaction() as connection:
            leaf_id = message_id
            while child := connection.execute(
                "SELECT id FROM messages WHERE parent_id = ? ORDER BY created_at DESC, rowid DESC LIMIT 1",
                (leaf_id,),
            ).fetchone():
                leaf_id = child["id"]
            queries.set_head(connection, session_id, leaf_id)
            return queries.read_message(connection, leaf_id)

    def undo(self, session_id: str) -> Message | None:
        """/undo: move the head to just before the last user message; the exchange stays as a branch."""
        with self._transaction() as connection:
            path = queries.read_active_path(connection, session_id)
            user_messages = [message for message in path if message.role == "user"]
            if not user_messages:
                raise InvalidRequestError("there is no exchange to undo")
            new_head_id = user_messages[-1].parent_id
            queries.set_head(connection, session_id, new_head_id)
            return None if new_head_id is None else queries.read_message(connection, new_head_id)

    def reset(self, session_id: str) -> None:
        """/reset: start the conversation over (keeping leading system messages); nothing is deleted."""
        with self._transaction() as connection:
            new_head_id = None
            for message in queries.read_active_path(connection, session_id):
                if message.role != "system":
                    break
                new_head_id = message.id
            queries.set_head(connection, session_id, new_head_id)

    # Export

    def export_markdown(self, session_id: str) -> str:
        return export.render_markdown(*self._session_and_path(session_id))

    def export_json(self, session_id: str) -> str:
        return export.render_json(*self._session_and_path(session_id))

    def export_to_file(self, session_id: str, path: str | Path) -> Path:
        """/export FILE: JSON when the name ends in .json, Markdown otherwise."""
        return export.write_export(*self._session_and_path(session_id), path)

    # Internals

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; IMMEDIATE for writes so a read never has to be upgraded (no deadlock)."""
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._connection
                self._connection.execute("COMMIT")
            except BaseException:
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                raise

    def _session_and_path(self, session_id: str) -> tuple[Session, list[Message]]:
        with self._transaction(write=False) as connection:
            session = queries.read_session(connection, session_id)
            return session, queries.read_active_path(connection, session_id)


def _sampling_json(sampling: Any) -> str:
    if not isinstance(sampling, dict):
        raise InvalidRequestError("sampling settings must be a mapping of names to values")
    try:
        return json.dumps(sampling, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise InvalidRequestError(f"sampling settings are not JSON values: {error}") from error
