"""Chat keeps the store and the cache consistent whatever the caller does between turns."""

from __future__ import annotations

import threading

import pytest

import ember
from ember.chat import Chat
from ember.chat_template import ChatTemplate
from ember.errors import ContextOverflowError, InvalidRequestError
from ember.sampling import SamplingParams
from ember.sessions import SessionStore

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
# Llama 3 / Gemma style: every message's content is trimmed when rendered.
TRIMMING_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def model():
    return ember.load("smollm2")


@pytest.fixture()
def store(tmp_path):
    with SessionStore(tmp_path / "sessions.sqlite3") as store:
        yield store


def test_a_send_dropped_unread_leaves_no_empty_reply(model, store):
    chat = Chat(model, store, sampling_params=GREEDY)
    chat.send("Hello there.")  # never read
    assert [m.role for m in chat.history] == ["user"]
    reply = "".join(chat.send("Say hello back."))
    assert reply and [m.role for m in chat.history] == ["user", "user", "assistant"]
    assert all(m.content for m in chat.history)


def test_a_second_reply_before_the_first_is_read_is_refused(model, store):
    chat = Chat(model, store, sampling_params=GREEDY)
    first = chat.send("Name a color.")
    with pytest.raises(InvalidRequestError, match="already being written"):
        chat.send("Name a fruit.")
    assert "".join(first)
    assert "".join(chat.send("Name a fruit."))  # once read, the next turn goes ahead


def test_stop_from_another_thread_keeps_the_partial_reply(model, store):
    chat = Chat(
        model, store, sampling_params=SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    )
    pieces = []
    for piece in chat.send("Write a long story about a lighthouse."):
        pieces.append(piece)
        if len(pieces) == 5:
            threading.Thread(target=chat.stop).start()
    stored = chat.history[-1]
    assert stored.status == "interrupted"
    assert stored.content == "".join(pieces) and 5 <= chat.last_turn.generated_tokens < 200


def test_an_edit_that_cannot_fit_changes_nothing(store):
    small = ember.load("smollm2", context_length=200)
    chat = Chat(small, store, sampling_params=GREEDY)
    "".join(chat.send("Hi."))
    before = [(m.id, m.content, m.status) for m in chat.history]
    with pytest.raises(ContextOverflowError):
        chat.edit("word " * 400)
    assert [(m.id, m.content, m.status) for m in chat.history] == before
    assert len(store.alternatives(chat.history[0].id)) == 1


def test_continue_under_a_trimming_template_writes_on_after_the_answer(model, store):
    chat = Chat(model, store, sampling_params=GREEDY.replace(max_tokens=6))
    store.append_message(chat.session_id, "user", "Count from one to ten in words.")
    store.append_message(chat.session_id, "assistant", " One, two, three,\n")  # the template trims it
    chat.template = ChatTemplate(TRIMMING_TEMPLATE)
    prompt = model.decode(chat._fit_prompt(chat._entries_for(chat.history), continuing=True)[0])
    assert prompt.endswith("<|start|>assistant\nOne, two, three,\n")  # cut right after the answer
    more = "".join(chat.continue_reply())
    assert more and chat.history[-1].content == " One, two, three,\n" + more


def test_after_an_overflow_several_turns_reuse_their_prefix(store):
    small = ember.load("smollm2", context_length=256)
    chat = Chat(small, store, sampling_params=GREEDY.replace(max_tokens=20))
    reuse_after_drop = []
    for turn in range(12):
        "".join(chat.send(f"Turn {turn}: tell me one fact about rivers."))
        if chat.last_turn.dropped_messages:
            reuse_after_drop.append(chat.last_turn.reused_tokens / chat.last_turn.prompt_tokens)
    assert len(reuse_after_drop) >= 3
    # Most overflowing turns keep the previous turn's start: most of their prompt comes from the cache.
    assert sum(share > 0.5 for share in reuse_after_drop) >= len(reuse_after_drop) // 2
