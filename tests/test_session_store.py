"""The session store on real SQLite files: branches, rollback, durability, migration, export."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ember.errors import EmberError, InvalidRequestError
from ember.sessions import ANY_OWNER, AmbiguousIdError, NotFoundError, SessionStore, default_data_dir
from ember.sessions.data_dir import default_store_path
from ember.sessions.schema import SCHEMA_VERSION, SchemaVersionError

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    with SessionStore(tmp_path / "sessions.sqlite3") as opened:
        yield opened


def contents(messages):
    return [message.content for message in messages]


def test_session_fields_round_trip_and_list_newest_first(store):
    first = store.create_session(title="first", sampling={"temperature": 0.7, "top_k": 40})
    second = store.create_session(system_prompt="Be brief.", model="smollm2")
    store.append_message(first.id, "user", "hello")
    store.append_message(first.id, "assistant", "hi", token_count=3)

    assert len(first.id) == 16 and int(first.id, 16) >= 0
    assert store.get_session(first.id).sampling == {"temperature": 0.7, "top_k": 40}
    sessions = store.list_sessions()
    assert [session.id for session in sessions] == [first.id, second.id]  # first was updated last
    assert [session.message_count for session in sessions] == [2, 0]

    updated = store.update_session(second.id, title="renamed", sampling={"seed": 1})
    assert (updated.title, updated.system_prompt, updated.model) == ("renamed", "Be brief.", "smollm2")
    assert store.update_session(second.id, system_prompt=None).system_prompt is None
    assert store.get_session(second.id).sampling == {"seed": 1}
    with pytest.raises(InvalidRequestError):
        store.update_session(second.id, sampling={"bad": object()})

    store.delete_session(first.id)
    assert [session.id for session in store.list_sessions()] == [second.id]
    with pytest.raises(NotFoundError):
        store.get_session(first.id)


def test_id_prefix_lookup(store):
    sessions = [store.create_session(title=str(number)) for number in range(17)]
    by_first_character: dict[str, list[str]] = {}
    for session in sessions:
        by_first_character.setdefault(session.id[0], []).append(session.id)
    shared = next(ids for ids in by_first_character.values() if len(ids) > 1)  # pigeonhole: 17 > 16

    with pytest.raises(AmbiguousIdError, match="ambiguous"):
        store.get_session(shared[0][0])
    assert store.get_session(shared[0][:9]).id == shared[0]
    assert store.get_session(" " + sessions[3].id.upper() + " ").id == sessions[3].id
    with pytest.raises(NotFoundError):
        store.get_session("zz")
    with pytest.raises(NotFoundError):
        store.get_session("")


def test_regenerate_keeps_both_answers_and_choose_alternative_follows_the_branch(store):
    session = store.create_session()
    question = store.append_message(session.id, "user", "Q1")
    first_reply = store.start_reply(session.id)
    store.finish_reply(first_reply.id, "A1", token_count=2)
    store.append_message(session.id, "user", "Q2")
    deep_reply = store.start_reply(session.id)
    store.finish_reply(deep_reply.id, "A2", token_count=2)

    store.undo(session.id)  # back to A1, then regenerate A1
    second_reply = store.start_alternative_reply(session.id)
    assert second_reply.parent_id == question.id and second_reply.status == "streaming"
    store.update_reply(second_reply.id, "A1 b")
    store.finish_reply(second_reply.id, "A1 bis", token_count=4)

    alternatives = store.alternatives(second_reply.id)
    assert [message.id for message in alternatives] == [first_reply.id, second_reply.id]
    assert contents(store.active_path(session.id)) == ["Q1", "A1 bis"]

    head = store.choose_alternative(session.id, alternatives[0].id)  # /alt 1: back to the deep branch
    assert head.id == deep_reply.id
    assert contents(store.active_path(session.id)) == ["Q1", "A1", "Q2", "A2"]
    assert store.get_session(session.id).message_count == 4


def test_edit_starts_a_new_branch_from_the_edited_message(store):
    session = store.create_session()
    store.append_message(session.id, "user", "Q1")
    store.append_message(session.id, "assistant", "A1")
    original = store.append_message(session.id, "user", "Q2 typo")
    store.append_message(session.id, "assistant", "A2")

    edited = store.edit_message(original.id, "Q2 fixed")
    assert edited.parent_id == original.parent_id
    assert contents(store.active_path(session.id)) == ["Q1", "A1", "Q2 fixed"]
    reply = store.start_alternative_reply(session.id)  # head is the user message: answer it
    store.finish_reply(reply.id, "A2 new")
    assert contents(store.active_path(session.id)) == ["Q1", "A1", "Q2 fixed", "A2 new"]
    assert contents(store.alternatives(edited.id)) == ["Q2 typo", "Q2 fixed"]

    store.choose_alternative(session.id, original.id)
    assert contents(store.active_path(session.id)) == ["Q1", "A1", "Q2 typo", "A2"]


def test_undo_and_reset_move_the_head_but_keep_messages(store):
    session = store.create_session()
    store.append_message(session.id, "system", "You are terse.")
    store.append_message(session.id, "user", "Q1")
    first_answer = store.append_message(session.id, "assistant", "A1")
    second_question = store.append_message(session.id, "user", "Q2")
    store.append_message(session.id, "assistant", "A2")

    assert store.undo(session.id).id == first_answer.id
    assert contents(store.active_path(session.id)) == ["You are terse.", "Q1", "A1"]
    assert store.get_message(second_question.id).content == "Q2"  # kept as a branch
    store.choose_alternative(session.id, second_question.id)
    assert contents(store.active_path(session.id))[-1] == "A2"

    store.reset(session.id)
    assert contents(store.active_path(session.id)) == ["You are terse."]
    assert store.get_message(first_answer.id).content == "A1"
    with pytest.raises(InvalidRequestError, match="undo"):
        store.undo(session.id)
    store.set_head(session.id, None)
    assert store.active_path(session.id) == []


def test_reply_status_rules_and_continue(store):
    session = store.create_session()
    other = store.create_session()
    store.append_message(session.id, "user", "Write a poem.")
    reply = store.start_reply(session.id)
    store.finish_reply(reply.id, "Roses are red", token_count=4)
    with pytest.raises(InvalidRequestError, match="complete"):
        store.update_reply(reply.id, "late text")
    with pytest.raises(InvalidRequestError):
        store.finish_reply(reply.id, "again")
    with pytest.raises(InvalidRequestError):
        store.append_message(session.id, "robot", "x")
    with pytest.raises(InvalidRequestError, match="another session"):
        store.append_message(other.id, "user", "x", parent_id=reply.id)
    with pytest.raises(NotFoundError):
        store.update_reply("0000000000", "x")

    resumed = store.resume_reply(reply.id)  # /continue extends the same message
    assert resumed.status == "streaming"
    finished = store.finish_reply(reply.id, "Roses are red, violets are blue", token_count=9)
    assert (finished.status, finished.token_count) == ("complete", 9)
    assert len(store.active_path(session.id)) == 2


def test_persists_across_reopen(tmp_path):
    path = tmp_path / "sessions.sqlite3"
    with SessionStore(path) as store:
        session = store.create_session(title="kept", model="m", sampling={"temperature": 0.0})
        store.append_message(session.id, "user", "Q")
        reply = store.start_reply(session.id)
        store.finish_reply(reply.id, "A", token_count=1)
    with SessionStore(path) as store:
        reopened = store.get_session(session.id)
        assert (reopened.title, reopened.model, reopened.sampling) == ("kept", "m", {"temperature": 0.0})
        assert reopened.head_message_id == reply.id
        path_messages = store.active_path(session.id)
        assert [(message.role, message.content, message.status) for message in path_messages] == [
            ("user", "Q", "complete"),
            ("assistant", "A", "complete"),
        ]
        assert path_messages[1].token_count == 1
        assert store.recovered_replies == 0


CHILD_SCRIPT = """
import sys, time
from ember.sessions import SessionStore
store = SessionStore(sys.argv[1])
session = store.get_session(sys.argv[2])
reply = store.start_reply(session.id)
store.update_reply(reply.id, "The answer is")
store.update_reply(reply.id, "The answer is forty")
print(reply.id, flush=True)
time.sleep(60)
"""


def test_killed_writer_loses_only_the_unfinished_reply_which_is_kept_as_interrupted(tmp_path):
    path = tmp_path / "sessions.sqlite3"
    with SessionStore(path) as store:
        session = store.create_session(title="crash")
        store.append_message(session.id, "user", "Q1")
        store.append_message(session.id, "assistant", "A1", token_count=2)
        store.append_message(session.id, "user", "Q2")

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, str(path), session.id],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        reply_id = child.stdout.readline().strip()
        assert reply_id, "child process did not start its reply"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()

    with SessionStore(path) as store:
        assert store.recovered_replies == 1
        messages = store.active_path(session.id)
        assert [(message.content, message.status) for message in messages] == [
            ("Q1", "complete"),
            ("A1", "complete"),
            ("Q2", "complete"),
            ("The answer is forty", "interrupted"),
        ]
        assert messages[-1].id == reply_id
        reply = store.start_alternative_reply(session.id)  # the user can answer again; both are kept
        assert [message.id for message in store.alternatives(reply.id)] == [reply_id, reply.id]
    with SessionStore(path) as store:
        assert store.get_message(reply_id).status == "interrupted"  # marked once, stays marked


VERSION_1_SQL = """
CREATE TABLE sessions (id TEXT PRIMARY KEY, title TEXT, system_prompt TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, head_message_id TEXT);
CREATE TABLE messages (id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL, created_at REAL NOT NULL);
INSERT INTO sessions VALUES ('aaaa000001', 'old chat', 'Be kind.', 100.0, 200.0, 'cccc000003');
INSERT INTO messages VALUES ('bbbb000001', 'aaaa000001', NULL, 'user', 'hi', 101.0);
INSERT INTO messages VALUES ('bbbb000002', 'aaaa000001', 'bbbb000001', 'assistant', 'hello', 102.0);
INSERT INTO messages VALUES ('cccc000003', 'aaaa000001', 'bbbb000001', 'assistant', 'hey there', 103.0);
PRAGMA user_version = 1;
"""


def test_version_1_file_is_migrated_with_all_data(tmp_path):
    path = tmp_path / "old.sqlite3"
    connection = sqlite3.connect(path)
    connection.executescript(VERSION_1_SQL)
    connection.close()

    with SessionStore(path) as store:
        session = store.get_session("aaaa")
        assert (session.title, session.system_prompt, session.model, session.sampling) == (
            "old chat",
            "Be kind.",
            None,
            {},
        )
        assert (session.created_at, session.message_count) == (100.0, 2)
        messages = store.active_path(session.id)
        assert [(message.content, message.status, message.token_count) for message in messages] == [
            ("hi", "complete", None),
            ("hey there", "complete", None),
        ]
        assert contents(store.alternatives("cccc000003")) == ["hello", "hey there"]
        store.update_session(session.id, model="new-model", sampling={"top_p": 0.9})
        store.append_message(session.id, "user", "still works", token_count=3)

    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    assert connection.execute("SELECT count(*) FROM messages").fetchone()[0] == 4
    connection.close()


def test_newer_schema_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "future.sqlite3"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY)")
    connection.execute("PRAGMA user_version = 99")
    connection.commit()
    connection.close()
    with pytest.raises(SchemaVersionError, match="newer") as raised:
        SessionStore(path)
    assert isinstance(raised.value, EmberError) and "\n" not in str(raised.value)

    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("this is not SQLite " * 100)
    with pytest.raises(EmberError, match="cannot open session store"):
        SessionStore(not_a_database)


def test_two_connections_share_the_file(tmp_path):
    path = tmp_path / "sessions.sqlite3"
    with SessionStore(path) as writer, SessionStore(path) as reader:
        assert reader._connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert reader._connection.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        session = writer.create_session(title="shared")
        for number in range(5):
            (writer if number % 2 else reader).append_message(session.id, "user", f"m{number}")
        assert contents(reader.active_path(session.id)) == [f"m{number}" for number in range(5)]

        reply = writer.start_reply(session.id)
        with SessionStore(path) as late_opener:  # the writer is alive: its reply is left alone
            assert late_opener.get_message(reply.id).status == "streaming"
        writer.update_reply(reply.id, "still alive")
        assert reader.get_message(reply.id).status == "streaming"
        writer.finish_reply(reply.id, "still alive, done")
        assert reader.get_message(reply.id).status == "complete"


def test_exports(store, tmp_path):
    session = store.create_session(title="Trip", system_prompt="Plan trips.", sampling={"temperature": 0.5})
    store.append_message(session.id, "user", "Where to?")
    reply = store.start_reply(session.id)
    store.finish_reply(reply.id, "Lisbon", token_count=2, status="interrupted")

    markdown = store.export_markdown(session.id)
    assert markdown.startswith("# Trip\n")
    assert "- Sampling: temperature=0.5" in markdown
    for section in ("## System\n\nPlan trips.", "## User\n\nWhere to?", "## Assistant\n\nLisbon"):
        assert section in markdown
    assert "*(interrupted)*" in markdown

    data = json.loads(store.export_json(session.id))
    assert (data["id"], data["title"], data["sampling"]) == (session.id, "Trip", {"temperature": 0.5})
    assert [(message["role"], message["content"]) for message in data["messages"]] == [
        ("user", "Where to?"),
        ("assistant", "Lisbon"),
    ]
    assert data["messages"][1]["status"] == "interrupted" and data["messages"][1]["token_count"] == 2

    json_path = store.export_to_file(session.id, tmp_path / "trip.JSON")
    assert json.loads(json_path.read_text())["messages"][0]["content"] == "Where to?"
    markdown_path = store.export_to_file(session.id, tmp_path / "trip.md")
    assert markdown_path.read_text() == markdown
    with pytest.raises(EmberError, match="cannot write export"):
        store.export_to_file(session.id, tmp_path / "missing-folder" / "trip.md")


def test_repeated_reply_updates_keep_the_latest_text(store):
    session = store.create_session()
    store.append_message(session.id, "user", "Q")
    reply = store.start_reply(session.id)
    text = ""
    for number in range(50):
        text += f"word{number} " * 10
        store.update_reply(reply.id, text)
    message = store.get_message(reply.id)
    assert message.content == text and message.status == "streaming"


def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EMBER_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "ember"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "ember"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "ember"
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "ember-home"))
    assert default_data_dir() == tmp_path / "ember-home"
    assert default_store_path(str(tmp_path / "flag")) == tmp_path / "flag" / "sessions.sqlite3"
    assert (tmp_path / "flag").is_dir() and (tmp_path / "ember-home").is_dir()
    assert (tmp_path / "flag").stat().st_mode & 0o077 == 0
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(EmberError, match="not a directory"):
        default_data_dir(str(tmp_path / "a-file"))


WRITER_SCRIPT = """
import sys
import threading
from ember.sessions import SessionStore
with SessionStore(sys.argv[1]) as store:
    for number in range(20):
        store.append_message(sys.argv[2], "user", f"child {number}")
"""


def test_threads_and_processes_write_at_once(tmp_path):
    path = tmp_path / "sessions.sqlite3"
    with SessionStore(path) as store:
        child_session = store.create_session(title="child")
        thread_sessions = [store.create_session(title=f"thread {number}") for number in range(3)]
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER_SCRIPT, str(path), child_session.id], cwd=REPO_ROOT
        )

        def write(session_id: str) -> None:
            for number in range(20):
                store.append_message(session_id, "user", f"{session_id} {number}")

        threads = [threading.Thread(target=write, args=(session.id,)) for session in thread_sessions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert child.wait(timeout=30) == 0
        counts = {session.id: session.message_count for session in store.list_sessions()}
        assert counts == {session.id: 20 for session in [child_session, *thread_sessions]}
        assert contents(store.active_path(child_session.id))[-1] == "child 19"


def test_opening_the_store_leaves_a_live_writers_reply_alone(tmp_path):
    path = tmp_path / "sessions.sqlite3"
    with SessionStore(path) as writer:
        session = writer.create_session()
        writer.append_message(session.id, "user", "hello")
        live = writer.start_reply(session.id)
        writer.update_reply(live.id, "still being written")
        dead = writer.start_alternative_reply(session.id)
        # A reply whose writer was another, vanished process (a pid that cannot be running).
        writer._connection.execute(
            "UPDATE messages SET writer = ? WHERE id = ?",
            (f"{socket.gethostname()}:999999999:12345", dead.id),
        )
        with SessionStore(path) as reader:  # e.g. a second terminal or the server opening the same file
            assert reader.recovered_replies == 1
            assert reader.get_message(live.id).status == "streaming"
            assert reader.get_message(dead.id).status == "interrupted"
        writer.finish_reply(live.id, "still being written, now done")
        assert writer.get_message(live.id).status == "complete"


def test_sessions_belong_to_their_owner_and_are_found_only_by_exact_id(store):
    local = store.create_session(title="Local notes")
    alice = store.create_session(title="Alice's trip", owner="alice")
    bob = store.create_session(title="Bob's TRIP plans", owner="bob")

    assert store.get_owned_session(alice.id, "alice").owner == "alice"
    assert store.get_owned_session(local.id, None).title == "Local notes"
    for session_id, owner in [
        (alice.id, "bob"),
        (alice.id, None),
        (local.id, "alice"),
        (alice.id[:6], "alice"),
    ]:
        with pytest.raises(NotFoundError, match="no session"):
            store.get_owned_session(session_id, owner)
    assert [session.id for session in store.list_sessions(owner="alice")] == [alice.id]
    assert [session.id for session in store.list_sessions(owner=None)] == [local.id]
    assert {session.id for session in store.list_sessions()} == {local.id, alice.id, bob.id}
    assert store.list_sessions(owner=ANY_OWNER) == store.list_sessions()
    assert [session.id for session in store.list_sessions(title_contains="trip")] == [bob.id, alice.id]
    assert store.list_sessions(owner="bob", title_contains="trip")[0].id == bob.id
    assert store.list_sessions(owner="alice", title_contains="bob") == []
    assert store.list_sessions(title_contains="%") == []  # not a LIKE pattern


def test_start_reply_writes_the_message_and_its_writer_in_one_transaction(store):
    session = store.create_session()
    store.append_message(session.id, "user", "Q")
    statements: list[str] = []
    store._connection.set_trace_callback(statements.append)
    try:
        reply = store.start_reply(session.id)
    finally:
        store._connection.set_trace_callback(None)
    assert sum(statement.startswith("BEGIN") for statement in statements) == 1
    assert sum(statement == "COMMIT" for statement in statements) == 1
    row = store._connection.execute(
        "SELECT writer, status FROM messages WHERE id = ?", (reply.id,)
    ).fetchone()
    assert row["writer"] and row["status"] == "streaming"

    statements.clear()
    store.finish_reply(reply.id, "A")
    store._connection.set_trace_callback(statements.append)
    try:
        again = store.start_alternative_reply(session.id)
    finally:
        store._connection.set_trace_callback(None)
    assert sum(statement == "COMMIT" for statement in statements) == 1
    assert store._connection.execute("SELECT writer FROM messages WHERE id = ?", (again.id,)).fetchone()[0]


def test_siblings_session_messages_and_removing_a_fresh_branch(store):
    session = store.create_session()
    other = store.create_session()
    question = store.append_message(session.id, "user", "Q")
    first = store.append_message(session.id, "assistant", "A1")
    second = store.start_alternative_reply(session.id)
    store.finish_reply(second.id, "A2")

    assert store.sibling_ids(session.id) == {
        first.id: [first.id, second.id],
        second.id: [first.id, second.id],
    }
    assert store.session_message(session.id, question.id).content == "Q"
    with pytest.raises(NotFoundError):
        store.session_message(other.id, question.id)
    with pytest.raises(NotFoundError):
        store.session_message(session.id, "not-an-id")

    edited = store.edit_message(question.id, "Q edited")
    reply = store.start_alternative_reply(session.id)
    updated_at = store.get_session(session.id).updated_at
    store.remove_branch(edited.id, second.id, updated_at - 5)  # takes the edit and its reply back
    assert store.get_session(session.id).updated_at == updated_at - 5
    assert contents(store.active_path(session.id)) == ["Q", "A2"]
    with pytest.raises(NotFoundError):
        store.get_message(reply.id)
    assert store.sibling_ids(session.id)[second.id] == [first.id, second.id]
    assert question.id not in store.sibling_ids(session.id)


VERSION_3_SQL = """
CREATE TABLE sessions (id TEXT PRIMARY KEY, title TEXT, system_prompt TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, head_message_id TEXT,
    model TEXT, sampling TEXT NOT NULL DEFAULT '{}');
CREATE TABLE messages (id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL, created_at REAL NOT NULL, token_count INTEGER,
    status TEXT NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'streaming', 'interrupted')),
    writer TEXT);
INSERT INTO sessions VALUES ('aaaa000001', 'terminal chat', NULL, 100.0, 200.0, 'bbbb000002', 'm', '{}');
INSERT INTO messages VALUES ('bbbb000001', 'aaaa000001', NULL, 'user', 'hi', 101.0, 1, 'complete', NULL);
INSERT INTO messages VALUES ('bbbb000002', 'aaaa000001', 'bbbb000001', 'assistant', 'hello', 102.0, 1,
    'complete', NULL);
PRAGMA user_version = 3;
"""


def test_version_3_file_gains_owners_and_its_sessions_belong_to_the_local_user(tmp_path):
    path = tmp_path / "v3.sqlite3"
    connection = sqlite3.connect(path)
    connection.executescript(VERSION_3_SQL)
    connection.close()

    with SessionStore(path) as store:
        session = store.get_owned_session("aaaa000001", None)
        assert (session.title, session.owner, session.message_count) == ("terminal chat", None, 2)
        assert [s.id for s in store.list_sessions(owner=None)] == ["aaaa000001"]
        assert store.list_sessions(owner="alice") == []
        store.create_session(title="over http", owner="alice")
    with SessionStore(path) as store:  # opening again migrates nothing twice
        assert [s.title for s in store.list_sessions(owner="alice")] == ["over http"]
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == 5
    connection.close()
