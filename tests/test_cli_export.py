"""Exporting a conversation to a file: never over the store or another database, never half a file."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

from ember.errors import EmberError
from ember.sessions import SessionStore
from ember.sessions.export import ExportExistsError, write_export


@pytest.fixture
def stored(tmp_path):
    store = SessionStore(tmp_path / "sessions.sqlite3")
    session = store.create_session(title="Trip", sampling={"temperature": 0.5})
    store.append_message(session.id, "user", "Where to?")
    yield store, store.get_session(session.id), store.active_path(session.id)
    store.close()


def test_the_store_and_its_files_are_never_written_over(stored, tmp_path):
    store, session, messages = stored
    link = tmp_path / "innocent.md"
    link.symlink_to(store.path)
    targets = [store.path, tmp_path / "sessions.sqlite3-wal", tmp_path / "sessions.sqlite3-shm", link]
    before = {path: path.read_bytes() for path in targets if path.exists()}
    for target in targets:
        for overwrite in (False, True):
            with pytest.raises(EmberError, match="session store|SQLite database"):
                write_export(session, messages, target, overwrite=overwrite, protected_paths=(store.path,))
    # Without being told which file is the store, an SQLite database is still recognized.
    for target in (store.path, link, tmp_path / "sessions.sqlite3-wal"):
        with pytest.raises(EmberError, match="SQLite database"):
            write_export(session, messages, target, overwrite=True)
    assert {path: path.read_bytes() for path in targets if path.exists()} == before
    assert store.active_path(session.id)[0].content == "Where to?"


def test_an_existing_file_is_replaced_only_when_confirmed(stored, tmp_path):
    _, session, messages = stored
    target = tmp_path / "notes.md"
    target.write_text("precious\n")
    target.chmod(0o640)
    with pytest.raises(ExportExistsError, match="already exists"):
        write_export(session, messages, target)
    assert target.read_text() == "precious\n"
    write_export(session, messages, target, overwrite=True)
    assert "# Trip" in target.read_text() and (target.stat().st_mode & 0o777) == 0o640
    with pytest.raises(EmberError, match="is a directory"):
        write_export(session, messages, tmp_path, overwrite=True)


def test_a_failed_export_leaves_the_old_file_and_no_temporary(stored, tmp_path, monkeypatch):
    _, session, messages = stored
    target = tmp_path / "notes.json"
    target.write_text("precious\n")

    def failing_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(EmberError, match="No space left on device"):
        write_export(session, messages, target, overwrite=True)
    assert target.read_text() == "precious\n"
    assert sorted(path.name for path in tmp_path.iterdir() if "notes" in path.name) == ["notes.json"]


def test_json_export_is_strict_json_even_for_a_stored_infinity(stored, tmp_path):
    store, session, messages = stored
    # As a session stored before non-finite settings were refused.
    session = dataclasses.replace(session, sampling={"temperature": math.inf, "top_p": 0.9})
    target = write_export(session, messages, tmp_path / "trip.json")
    text = target.read_text()
    assert "Infinity" not in text
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert data["sampling"] == {"temperature": None, "top_p": 0.9}
