"""`ember chat` as a user drives it: a real process in a pseudo-terminal, typed lines, the screen.

Each test starts the command under pexpect, types messages and slash
commands, checks what the terminal shows, and then opens the session store
the process wrote to check what lasted. The parsers behind the commands get
a few direct tests at the top.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import sys
import time
from contextlib import closing
from pathlib import Path

import pexpect
import pytest

from ember.cli.chat_input import parse_settings, read_message, title_from
from ember.cli.chat_repl import COMMANDS, parse_command
from ember.errors import InvalidRequestError
from ember.sessions import SessionStore, default_store_path
from tests.conftest import REPO_ROOT, STORY_MODEL

PROMPT = ">>> "
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")
SESSION_ID = re.compile(r"session ([0-9a-f]{10,})")
SAVED_AS = re.compile(r"\(saved as session ([0-9a-f]{10,})\)\n?")

# ------------------------------------------------------------ the parsers


def test_set_parses_typed_values_and_chatrwkv_aliases():
    changes = parse_settings(
        'temperature=0.7 top_p=0.9 -temp=0.5 top-k=20 seed=none stop="User:" stop=### max=50'
    )
    assert changes == {
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 20,
        "seed": None,
        "stop": ["User:", "###"],
        "max_tokens": 50,
    }
    assert parse_settings("ignore_eos=yes alpha_presence=0.2 alpha_decay=0.99") == {
        "ignore_eos": True,
        "presence_penalty": 0.2,
        "penalty_decay": 0.99,
    }


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("temperature=hot", "temperature expects a number"),
        ("top_k=1.5", "top_k expects a whole number"),
        ("ignore_eos=maybe", "ignore_eos expects true or false"),
        ("warmth=1", "unknown setting 'warmth'"),
        ("temperature", "expected name=value"),
        ("temperature=nan", "expects a number"),
        ("", "needs name=value"),
    ],
)
def test_set_rejects_bad_values_in_one_line(text, fragment):
    with pytest.raises(InvalidRequestError) as caught:
        parse_settings(text)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_commands_parse_from_a_table():
    command, argument = parse_command("/switch  ab12 ")
    assert command.name == "switch" and argument == "ab12"
    assert parse_command("/exit")[0].name == "quit"
    assert parse_command("hello /there") is None
    assert parse_command("//etc is a folder") is None  # '//' sends a message that starts with '/'
    with pytest.raises(InvalidRequestError, match="unknown command /frob"):
        parse_command("/frob")
    assert all(command.help for command in COMMANDS.values())


def test_multi_line_input():
    more = iter(["second \\", "third"])
    assert read_message("first \\", lambda: next(more)) == ("first \nsecond \nthird", False)
    more = iter(["/not a command", "ends with \\", '"""'])
    assert read_message('"""', lambda: next(more)) == ("/not a command\nends with \\", True)
    # A bracketed paste arrives as one line with newlines: fenced or not, it is one message.
    assert read_message('"""\n/a\nb\n"""', lambda: "unread") == ("/a\nb", True)
    assert read_message("/a\nb", lambda: "unread") == ("/a\nb", True)
    assert read_message("hello", lambda: "unread") == ("hello", False)
    assert title_from("a " * 40).endswith("…") and len(title_from("a " * 40)) == 40


# ------------------------------------------------------------ the terminal


class Terminal:
    """`ember chat` in a pseudo-terminal; `say` types lines, returns what appeared before the next prompt."""

    def __init__(self, data_dir: Path, *options: str, model: Path | str = STORY_MODEL):
        env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "ember.cli.main", "chat", "--model", str(model), "--data-dir", str(data_dir), *options],
            cwd=str(REPO_ROOT),
            env=env,
            encoding="utf-8",
            timeout=120,  # generous: a loaded machine may take a while to load SmolLM2
            dimensions=(40, 1000),  # wide enough that readline never wraps a typed line
        )
        self.banner = self.wait_for_prompt()

    def wait_for_prompt(self) -> str:
        self.child.expect_exact(PROMPT)
        return clean(self.child.before)

    def say(self, *lines: str) -> str:
        """Type lines (several for multi-line input); the screen after the last one's echo."""
        for line in lines:
            self.child.sendline(line)
        screen = self.wait_for_prompt()
        echo = lines[-1]
        return screen.split(echo, 1)[1].strip("\n") if echo in screen else screen

    def first_say(self, *lines: str) -> tuple[str, str]:
        """Type a new session's first message: (the screen without the saved-as note, the session's id)."""
        screen = self.say(*lines)
        saved = SAVED_AS.search(screen)
        assert saved, screen
        return SAVED_AS.sub("", screen, count=1), saved.group(1)

    def quit(self) -> None:
        self.child.sendline("/quit")
        self.child.expect(pexpect.EOF)
        self.child.close()
        assert self.child.exitstatus == 0


def clean(text: str) -> str:
    return ANSI_ESCAPE.sub("", text).replace("\r\n", "\n").replace("\r", "")


def one_line_error(screen: str, fragment: str) -> None:
    lines = [line for line in screen.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], screen


def open_store(data_dir: Path) -> SessionStore:
    return SessionStore(default_store_path(str(data_dir)))


def test_turns_branches_and_settings(tmp_path):
    terminal = Terminal(tmp_path, "--temperature", "0", "--max-tokens", "30")
    assert "story" in terminal.banner and "new session" in terminal.banner

    help_screen = terminal.say("/help")
    for name in COMMANDS:
        assert f"/{name}" in help_screen

    first, session_id = terminal.first_say("Once upon a time there was a little dog.")
    assert len(first.split()) >= 3
    assert "rolled back" in terminal.say("/undo")
    assert terminal.say("Once upon a time there was a little dog.") == first  # greedy: the same answer

    one_line_error(terminal.say("/frobnicate"), "unknown command /frobnicate")
    one_line_error(terminal.say("/set temperature=hot"), "temperature expects a number")
    one_line_error(terminal.say("/alt seven"), "usage: /alt N")
    assert "temperature=0.5" in terminal.say("/set temperature=0.5 top_p=0.9")

    # /regen with a seed: another answer, and /alt 1 brings back the first.
    terminal.say("/set temp=1.0 seed=7")
    original = terminal.say("The cat went to the park.")
    regenerated = terminal.say("/regen")
    assert "answer 2 of 2" in regenerated
    assert regenerated.split("(answer")[0].strip() != original
    listing = terminal.say("/alt")
    assert "1:" in listing and "* 2:" in listing
    assert original in terminal.say("/alt 1")
    with open_store(tmp_path) as store:  # the process is still running: the store is shared
        answers = store.alternatives(store.active_path(session_id)[-1].id)
        assert [answer.content.strip() for answer in answers][0] == original
        assert len(answers) == 2 and answers[1].content.strip() != original

    assert terminal.say("/edit A bird sang in the tree.").strip()
    terminal.quit()

    with open_store(tmp_path) as store:
        session = store.get_session(session_id)
        assert session.sampling["temperature"] == 1.0 and session.sampling["top_p"] == 0.9
        assert session.sampling["seed"] == 7
        assert session.title == "Once upon a time there was a little dog."
        history = store.active_path(session_id)
        assert [m.role for m in history] == ["user", "assistant"] * 2
        # The undone exchange stays as a branch: the same question, asked twice.
        assert [m.content for m in store.alternatives(history[0].id)] == [history[0].content] * 2
        # The edit replaced the last question; the original stays as an alternative.
        assert history[2].content == "A bird sang in the tree."
        assert [m.content for m in store.alternatives(history[2].id)] == [
            "The cat went to the park.",
            "A bird sang in the tree.",
        ]


def wait_for_reply_text(terminal: Terminal, message: str, first: bool = False) -> str | None:
    """Type a message and return once the reply has started to appear (a first one: the new session's id)."""
    terminal.child.sendline(message)
    terminal.child.expect_exact(message)
    session_id = None
    if first:
        terminal.child.expect(SAVED_AS)
        session_id = terminal.child.match.group(1)
    terminal.child.expect(r"\w+ \w+ \w+")
    return session_id


def test_ctrl_c_stops_a_reply_and_keeps_the_session(tmp_path):
    terminal = Terminal(tmp_path, "--temperature", "0", "--max-tokens", "400", "--ignore-eos")
    session_id = wait_for_reply_text(terminal, "Once upon a time there was a big dragon.", first=True)
    terminal.child.send("\x03")
    terminal.child.expect_exact("[interrupted]")
    terminal.wait_for_prompt()
    assert "/set: " not in terminal.say("/set max_tokens=20 ignore_eos=false")
    assert len(terminal.say("The dragon was hungry.").split()) >= 3  # the chat goes on
    terminal.child.send("\x03")  # at the prompt: a hint, then a second Ctrl-C leaves
    terminal.child.expect_exact("Ctrl-C again")
    terminal.child.send("\x03")
    terminal.child.expect(pexpect.EOF)
    terminal.child.close()
    assert terminal.child.exitstatus == 0

    with open_store(tmp_path) as store:
        history = store.active_path(session_id)
        assert [(m.role, m.status) for m in history] == [
            ("user", "complete"),
            ("assistant", "interrupted"),
            ("user", "complete"),
            ("assistant", "complete"),
        ]
        assert 0 < history[1].token_count < 400 and history[1].content.strip()


def test_sessions_multi_line_generation_and_export(tmp_path):
    # --ignore-eos: every answer is cut at 24 tokens, so /continue always has more to write.
    terminal = Terminal(
        tmp_path, "--temperature", "0", "--max-tokens", "24", "--ignore-eos", "--title", "Cats"
    )
    _, first_id = terminal.first_say("Tell me a story \\", "about a cat.")
    block = terminal.say('"""', "line one", "/not a command", '"""')
    assert "error" not in block and block.strip()

    with open_store(tmp_path) as store:
        before = store.active_path(first_id)[-1].content
    continued = terminal.say("/continue")
    assert continued.startswith(before.strip()[:20])

    generated = terminal.say("/gen Once upon a time")
    assert generated.startswith("Once upon a time") and len(generated) > len("Once upon a time") + 5
    more = terminal.say("/continue")  # after /gen, /continue goes on with the free text
    assert more.startswith(generated) and len(more) > len(generated)

    assert "title: Cat stories" in terminal.say("/title Cat stories")
    assert "system prompt: You like cats." in terminal.say("/system You like cats.")
    terminal.say(f"/export {tmp_path / 'chat.md'}")
    assert "(JSON)" in terminal.say(f"/export {tmp_path / 'chat.json'}")

    assert "new session" in terminal.say("/new Dogs")
    _, second_id = terminal.first_say("Tell me about a dog.")
    assert second_id != first_id
    listing = terminal.say("/sessions")
    rows = {
        session: line for session in (first_id, second_id) for line in listing.splitlines() if session in line
    }
    assert re.match(rf"\* {second_id} +2 .* Dogs$", rows[second_id]), listing
    assert re.match(rf"  {first_id} +4 .* Cat stories$", rows[first_id]), listing

    switched = terminal.say(f"/switch {first_id[:5]}")
    assert f"session {first_id}" in switched and "line one" in switched
    assert "about a cat." in terminal.say("/history")
    assert "started over" in terminal.say("/reset")
    terminal.quit()

    with open_store(tmp_path) as store:
        assert store.active_path(first_id) == []  # /reset moved the head; nothing was deleted
        assert store.get_session(first_id).system_prompt == "You like cats."
        assert store.get_session(second_id).message_count == 2
    exported = json.loads((tmp_path / "chat.json").read_text())
    assert exported["id"] == first_id and exported["title"] == "Cat stories"
    assert exported["system_prompt"] == "You like cats."
    messages = exported["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert messages[0]["content"] == "Tell me a story \nabout a cat."
    assert messages[2]["content"] == "line one\n/not a command"
    assert messages[3]["content"].startswith(before) and len(messages[3]["content"]) > len(before)
    markdown = (tmp_path / "chat.md").read_text()
    assert "# Cat stories" in markdown and "## User" in markdown and "line one\n/not a command" in markdown


def streaming_text(data_dir: Path, session_id: str) -> str:
    """The stored text of a reply still being written, read without opening a SessionStore.

    (Opening a SessionStore marks every 'streaming' reply as interrupted, as after a crash.)
    """
    uri = f"file:{default_store_path(str(data_dir))}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as connection:
        row = connection.execute(
            "SELECT content FROM messages WHERE session_id = ? AND status = 'streaming'", (session_id,)
        ).fetchone()
    return row[0] if row else ""


def test_killed_during_a_reply_keeps_every_session(tmp_path, smollm2_gguf):
    # SmolLM2: its 8k context leaves room for a reply long enough to be killed in the middle of.
    terminal = Terminal(
        tmp_path, "--temperature", "0", "--max-tokens", "30", "--title", "Sums", model=smollm2_gguf
    )
    _, first_id = terminal.first_say("What is 2 + 2?")
    terminal.say("/new Moon")
    terminal.say("/set max_tokens=3000 ignore_eos=true")
    second_id = wait_for_reply_text(terminal, "Tell me a long story about the moon.", first=True)
    deadline = time.monotonic() + 30
    while not streaming_text(tmp_path, second_id) and time.monotonic() < deadline:
        time.sleep(0.1)  # the store sees a streaming reply's text every half second
    terminal.child.kill(signal.SIGKILL)
    terminal.child.expect(pexpect.EOF)
    terminal.child.close()
    assert terminal.child.signalstatus == signal.SIGKILL

    resumed = Terminal(tmp_path, "--session", second_id[:6], model=smollm2_gguf)
    assert "1 reply(ies) cut off by an earlier exit were kept" in resumed.banner
    assert f"resumed session {second_id}" in resumed.banner
    assert "you: Tell me a long story about the moon." in resumed.banner
    assert re.search(r"assistant: \S.*\[interrupted\]", resumed.banner, re.DOTALL)
    switched = resumed.say(f"/switch {first_id}")
    assert "you: What is 2 + 2?" in switched and "assistant: " in switched
    resumed.child.sendeof()  # Ctrl-D leaves
    resumed.child.expect(pexpect.EOF)
    resumed.child.close()
    assert resumed.child.exitstatus == 0

    with open_store(tmp_path) as store:
        assert [m.status for m in store.active_path(first_id)] == ["complete", "complete"]
        moon = store.active_path(second_id)
        assert [(m.role, m.status) for m in moon] == [("user", "complete"), ("assistant", "interrupted")]
        assert moon[1].content.strip()  # the text written before the kill survived


def test_a_long_conversation_keeps_answering_with_its_system_prompt(tmp_path):
    system = "You are a kind storyteller for small children."
    terminal = Terminal(
        tmp_path, "--context-length", "160", "--max-tokens", "32", "--temperature", "0", "--system", system
    )
    notices = 0
    session_id = None
    for part in range(5):
        screen = terminal.say(f"Tell me part {part} of the story about the brave little fox.")
        if session_id is None:
            session_id = SAVED_AS.search(screen).group(1)
            screen = SAVED_AS.sub("", screen)
        reply, _, notice = screen.partition("note: ")
        assert reply.strip() and "error" not in screen
        notices += "oldest message(s) were left out to fit the 160-token context" in notice
    terminal.quit()
    assert notices >= 2

    with open_store(tmp_path) as store:
        session = store.get_session(session_id)
        assert session.system_prompt == system
        assert session.message_count == 10  # dropped from the prompt, never from the session


def test_default_model_answers_follow_ups_from_its_cache(tmp_path, smollm2_gguf):
    terminal = Terminal(tmp_path, "--temperature", "0", "--max-tokens", "40", "--verbose", model=smollm2_gguf)
    assert "gguf" in terminal.banner
    assert "4" in terminal.say("What is 2 + 2?")
    follow_up = terminal.say("Now add 3 to that.")
    assert "7" in follow_up  # the first exchange reached the model through its chat template
    stats = re.search(r"\[prompt (\d+) tok: (\d+) computed, (\d+) reused", follow_up)
    computed, reused = int(stats.group(2)), int(stats.group(3))
    assert reused > computed > 0  # the second turn computed only its new tokens
    terminal.quit()
