"""The Python chat API on the default model: cache reuse, branches, overflow, persistence."""

from __future__ import annotations

import pytest

import ember
from ember.chat import Chat
from ember.errors import ContextOverflowError
from ember.sampling import SamplingParams
from ember.sessions import SessionStore

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


@pytest.fixture(scope="module")
def model():
    return ember.load("smollm2")


@pytest.fixture()
def store(tmp_path):
    with SessionStore(tmp_path / "sessions.sqlite3") as store:
        yield store


def _from_scratch(model: ember.ModelHandle, chat: Chat) -> str:
    """The reply to the chat's current history computed with an empty cache."""
    messages = [message for _, message in chat._entries_for(chat.history[:-1])]
    prompt = model.encode(chat.template.render(messages, add_generation_prompt=True))
    return "".join(model.generate(prompt, **GREEDY.to_dict()))


def test_second_turn_prefills_only_new_tokens_and_matches_recompute(model, store):
    chat = Chat(model, store, sampling_params=GREEDY)
    first = "".join(chat.send("What is the capital of France?"))
    assert first.strip()
    assert chat.last_turn.reused_tokens == 0
    turn1_prompt = chat.last_turn.prompt_tokens

    message = "And of Italy?"
    second = "".join(chat.send(message))
    stats = chat.last_turn
    new_message_tokens = len(model.encode(message, add_special_tokens=False))
    # Only the new message and the template's turn markers are computed.
    assert stats.reused_tokens >= turn1_prompt
    assert stats.prefilled_tokens <= new_message_tokens + 12
    assert stats.prefilled_tokens + stats.reused_tokens == stats.prompt_tokens
    assert second == _from_scratch(model, chat)


def test_undo_then_same_message_gives_the_same_reply(model, store):
    chat = Chat(model, store, sampling_params=GREEDY)
    "".join(chat.send("Name a fruit."))
    first = "".join(chat.send("Why is it healthy?"))
    chat.undo()
    assert [m.role for m in chat.history] == ["user", "assistant"]
    again = "".join(chat.send("Why is it healthy?"))
    assert again == first
    assert chat.last_turn.reused_tokens > 0  # the rollback truncated the cache rather than recomputing


def test_regenerate_with_a_seed_keeps_both_answers(model, store):
    chat = Chat(model, store, sampling_params=SamplingParams(temperature=1.0, seed=3, max_tokens=30))
    first = "".join(chat.send("Tell me a short joke."))
    second = "".join(chat.regenerate())
    assert first != second
    alternatives = chat.alternatives()
    assert [m.content for m in alternatives] == [first, second]
    chat.choose_alternative(1)
    assert chat.history[-1].content == first


def test_edit_branches_and_continue_extends(model, store):
    chat = Chat(model, store, sampling_params=GREEDY.replace(max_tokens=8))
    "".join(chat.send("Count from one to ten in words."))
    short = chat.history[-1].content
    more = "".join(chat.continue_reply())
    assert more and chat.history[-1].content == short + more
    "".join(chat.edit("Count from one to five in words."))
    assert chat.history[0].content == "Count from one to five in words."
    assert len(store.alternatives(chat.history[0].id)) == 2


def test_overflowing_conversation_keeps_answering_with_its_system_prompt(store):
    small = ember.load("smollm2", context_length=200)
    system = "You are a pirate. Always answer like a pirate."
    chat = Chat(small, store, system_prompt=system, sampling_params=GREEDY.replace(max_tokens=30))
    dropped = []
    for turn in range(6):
        reply = "".join(chat.send(f"Question {turn}: tell me something about ships and the sea."))
        assert reply.strip()
        dropped.append(chat.last_turn.dropped_messages)
    assert max(dropped) > 0
    assert chat.session.system_prompt == system
    assert len(chat.history) == 12  # everything is kept in the store; only the prompt was trimmed
    prompt = small.decode(chat._fit_prompt(chat._entries_for(chat.history))[0])
    assert system in prompt


def test_a_single_message_longer_than_the_context_is_an_error_that_stores_nothing(store):
    small = ember.load("smollm2", context_length=200)
    chat = Chat(small, store, sampling_params=GREEDY)
    with pytest.raises(ContextOverflowError):
        chat.send("word " * 400)
    assert chat.history == []


def test_sessions_survive_a_new_process_view(model, tmp_path):
    path = tmp_path / "sessions.sqlite3"
    with SessionStore(path) as store:
        chat = Chat(model, store, sampling_params=GREEDY, title="kept")
        reply = "".join(chat.send("Say hello."))
        session_id = chat.session_id
    with SessionStore(path) as reopened:
        again = Chat(model, reopened, session_id=session_id[:6])
        assert again.session.title == "kept"
        assert [m.content for m in again.history] == ["Say hello.", reply]
        assert again.history[-1].status == "complete"
