"""`ember chat` sessions as a user meets them: export safety, flags on resume, no empty sessions, /delete,
--resume, notices, Ctrl-D in a block and Ctrl-C during a long prompt (a real process in a pseudo-terminal)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pexpect
import pytest

from ember.sessions import default_store_path
from tests.conftest import STORY_MODEL
from tests.test_chat_cli import Terminal, clean, open_store, wait_for_reply_text


def answer(terminal: Terminal, question_end: str, reply: str) -> str:
    """Wait for a yes/no question, answer it; the screen up to the next prompt."""
    terminal.child.expect_exact(question_end)
    terminal.child.sendline(reply)
    return terminal.wait_for_prompt()


def session_count(data_dir: Path) -> int:
    with open_store(data_dir) as store:
        return len(store.list_sessions())


def test_export_never_writes_over_the_store_and_asks_before_replacing_a_file(tmp_path):
    terminal = Terminal(tmp_path, "--temperature", "0", "--max-tokens", "12")
    _, session_id = terminal.first_say("Once upon a time there was a cat.")
    store_file = default_store_path(str(tmp_path))
    # The data (-shm is only the readers' shared index, which every read touches).
    companions = [store_file, Path(f"{store_file}-wal")]
    before = {path: path.read_bytes() for path in companions if path.exists()}
    link = tmp_path / "link.md"
    link.symlink_to(store_file)
    for target in [store_file, Path(f"{store_file}-wal"), Path(f"{store_file}-shm"), link]:
        screen = terminal.say(f"/export {target}")
        assert "error:" in screen and "session store" in screen, screen
        screen = terminal.say(f"/export! {target}")  # not even when told to replace
        assert "error:" in screen, screen
    assert {path: path.read_bytes() for path in companions if path.exists()} == before

    notes = tmp_path / "notes.md"
    notes.write_text("precious\n")
    terminal.child.sendline(f"/export {notes}")
    assert "not exported" in answer(terminal, "exists; replace it? [y/N] ", "n")
    terminal.child.sendline(f"/export {notes}")
    assert "not exported" in answer(terminal, "[y/N] ", "")  # Enter means no
    assert notes.read_text() == "precious\n"
    terminal.child.sendline(f"/export {notes}")
    assert "exported 2 messages" in answer(terminal, "[y/N] ", "y")
    assert "Once upon a time there was a cat." in notes.read_text()
    notes.write_text("precious again\n")
    assert "exported 2 messages" in terminal.say(f"/export! {notes}")
    assert "# Once upon a time" in notes.read_text()
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")]
    terminal.quit()
    with open_store(tmp_path) as store:  # the store is whole
        assert len(store.active_path(session_id)) == 2


def test_flags_given_with_a_session_apply_even_at_their_defaults(tmp_path):
    first = Terminal(tmp_path, "--temperature", "0.5", "--max-tokens", "12", "--ignore-eos")
    _, session_id = first.first_say("Once upon a time")
    first.quit()
    resumed = Terminal(
        tmp_path, "--session", session_id, "--temperature", "0.8", "--max-tokens", "256", "--no-ignore-eos"
    )
    note = next(line for line in resumed.banner.splitlines() if "stored settings changed" in line)
    for change in ("temperature 0.5 -> 0.8", "max_tokens 12 -> 256", "ignore_eos True -> False"):
        assert change in note, note
    resumed.quit()
    with open_store(tmp_path) as store:
        sampling = store.get_session(session_id).sampling
    assert (sampling["temperature"], sampling["max_tokens"], sampling["ignore_eos"]) == (0.8, 256, False)
    again = Terminal(tmp_path, "--session", session_id, "--temperature", "0.8")
    assert "stored settings changed" not in again.banner  # nothing changed: nothing said
    again.quit()


def test_sessions_are_stored_with_their_first_message_resumed_and_deleted(tmp_path):
    empty = Terminal(tmp_path, "--title", "Nothing said")
    assert "saved with its first message" in empty.banner
    assert "temperature=0.2" in empty.say("/set temperature=0.2")
    empty.quit()
    assert session_count(tmp_path) == 0  # starting and leaving leaves nothing behind

    terminal = Terminal(tmp_path, "--max-tokens", "8")
    terminal.say("/set temperature=0")
    terminal.say("/system You tell stories.")
    _, kept_id = terminal.first_say("Once upon a time there was a frog.")
    terminal.say("/new")
    _, deleted_id = terminal.first_say("The sun was warm.")
    terminal.quit()
    with open_store(tmp_path) as store:
        kept = store.get_session(kept_id)
        assert kept.sampling["temperature"] == 0.0 and kept.system_prompt == "You tell stories."

    resumed = Terminal(tmp_path, "--resume")
    assert f"resumed session {deleted_id}" in resumed.banner and "The sun was warm." in resumed.banner
    resumed.child.sendline(f"/delete {kept_id[:6]}")
    assert "not deleted" in answer(resumed, "(2 messages)? [y/N] ", "n")
    resumed.child.sendline("/delete")
    screen = answer(resumed, "[y/N] ", "y")
    assert f"deleted session {deleted_id}" in screen and "new session" in screen
    assert "error" in resumed.say("/delete")  # the new one is not saved yet: nothing to delete
    resumed.quit()
    with open_store(tmp_path) as store:
        assert [session.id for session in store.list_sessions()] == [kept_id]


def test_resuming_with_another_model_and_a_model_without_template_are_announced(tmp_path):
    tale = tmp_path / "tale"
    shutil.copytree(STORY_MODEL, tale)
    first = Terminal(tmp_path, "--max-tokens", "8", model=tale)
    assert first.banner.count("tale has no chat template; using ChatML") == 1
    _, session_id = first.first_say("Once upon a time")
    first.quit()
    resumed = Terminal(tmp_path, "--session", session_id)
    assert "note: this session was written with tale; story answers now" in resumed.banner
    resumed.quit()


def test_ctrl_d_inside_a_block_ends_the_block(tmp_path):
    terminal = Terminal(tmp_path, "--temperature", "0", "--max-tokens", "8")
    terminal.child.sendline('"""')
    terminal.child.sendline("Once upon a time")
    terminal.child.sendline("there was a bear.")
    terminal.child.sendeof()
    terminal.child.expect_exact("(Ctrl-D ended the message)")
    terminal.wait_for_prompt()  # still running: the block was sent, not lost with the program
    terminal.quit()
    with open_store(tmp_path) as store:
        (session,) = store.list_sessions()
        history = store.active_path(session.id)
    assert history[0].content == "Once upon a time\nthere was a bear." and history[1].role == "assistant"


def test_an_over_long_message_without_system_prompt_does_not_mention_one(tmp_path):
    terminal = Terminal(tmp_path, "--context-length", "64", "--max-tokens", "8")
    screen = terminal.say("Once upon a time there was a very long story " * 8)
    lines = [line for line in screen.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the message needs"), screen
    assert "system prompt" not in screen
    terminal.quit()
    assert session_count(tmp_path) == 0  # the refused first message created nothing


@pytest.mark.slow
def test_ctrl_c_while_a_long_prompt_is_read_stops_before_the_answer(tmp_path, smollm2_gguf):
    # ~6,000 tokens of system prompt: reading it takes seconds on a CPU; one Ctrl-C must end it
    # within a chunk, before any token of the answer (before the fix it was ignored until the end).
    system = "The quick brown fox jumps over the lazy dog near the river bank. " * 430
    terminal = Terminal(
        tmp_path, "--device", "cpu", "--max-tokens", "50", "--system", system, model=smollm2_gguf
    )
    terminal.child.sendline("Summarize.")
    terminal.child.expect_exact("Summarize.")
    terminal.child.expect_exact("(saved as session")
    try:
        terminal.child.expect_exact("prompt", timeout=20)  # the prompt's progress bar: it is being read
    except pexpect.TIMEOUT:
        pass
    terminal.child.send("\x03")
    terminal.child.expect_exact("[interrupted]")
    terminal.wait_for_prompt()
    terminal.quit()
    with open_store(tmp_path) as store:
        (session,) = store.list_sessions()
        history = store.active_path(session.id)
    assert [(m.role, m.status) for m in history] == [("user", "complete"), ("assistant", "interrupted")]
    assert history[1].content == "" and not history[1].token_count, clean(history[1].content)


__all__ = ["wait_for_reply_text"]


def test_a_stored_infinite_setting_is_reset_and_set_refuses_one(tmp_path):
    with open_store(tmp_path) as store:  # as an earlier version could store it
        session = store.create_session(title="Old", sampling={"temperature": float("inf"), "top_k": 7})
    terminal = Terminal(tmp_path, "--session", session.id, "--max-tokens", "6")
    assert "temperature=inf were not valid and are back at their defaults" in terminal.banner
    settings = terminal.say("/set")
    assert "temperature=0.8" in settings and "top_k=7" in settings and "max_tokens=6" in settings
    screen = terminal.say("/set temperature=inf")
    assert "error: temperature must be a finite number" in screen
    terminal.say("Once upon a time")
    terminal.say(f"/export {tmp_path / 'old.json'}")
    terminal.quit()
    assert "Infinity" not in (tmp_path / "old.json").read_text()
