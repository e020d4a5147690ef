"""A 20-turn chat with the tiny RWKV-7: every turn feeds only its new tokens; undo and regenerate restore
snapshots; after a restart (the last state saved beside the session) the next turn feeds only its own."""

from __future__ import annotations

from pathlib import Path

import pytest

import ember
from ember.chat import Chat
from ember.sampling import SamplingParams
from ember.sessions import SessionStore

TINY_V7 = (
    Path(__file__).resolve().parent.parent.parent
    / "shared"
    / "models"
    / "tiny-rwkv"
    / "tiny-rwkv-7v0-834K-FP32.bin"
)
PARAMS = SamplingParams(temperature=0, max_tokens=6, stop=["\n\n"])


class ForwardCounter:
    """Counts the tokens the model is asked to read (prefill and decode alike)."""

    def __init__(self, handle):
        self.tokens = 0
        forward = handle.model.forward

        def counting(batch, cache):
            self.tokens += batch.token_ids.numel()
            return forward(batch, cache)

        handle.model.forward = counting

    def take(self) -> int:
        tokens, self.tokens = self.tokens, 0
        return tokens


def _reply(stream) -> str:
    return "".join(stream)


def _new_tokens(chat: Chat, before: list[int]) -> int:
    """Tokens of the chat's current prompt that the state after `before` does not cover."""
    prompt = chat._fit_prompt(chat._entries_for(chat.history))[0]
    assert prompt[: len(before)] == before
    return len(prompt) - len(before)


@pytest.fixture()
def handle():
    return ember.load(TINY_V7, device="cpu")


@pytest.mark.slow
def test_twenty_turns_feed_only_new_tokens(handle, tmp_path):
    store = SessionStore(tmp_path / "sessions.db")
    chat = Chat(handle, store, system_prompt="You tell stories.", sampling_params=PARAMS)
    counter = ForwardCounter(handle)
    for turn in range(20):
        state_tokens = list(chat.cache_entry.token_ids)
        text = _reply(chat.send(f"Tell me part {turn} of the story"))
        stats = chat.last_turn
        fed = counter.take()
        generated = stats.generated_tokens
        # forward tokens = the prompt's unread tail + one per generated token but the last
        assert fed == stats.prefilled_tokens + generated - 1, turn
        if turn:
            assert stats.reused_tokens >= len(state_tokens), turn  # the whole previous state is reused
            message = f"\n\nUser: Tell me part {turn} of the story\n\nAssistant:"
            # the new message, plus at most the previous reply's last token (sampled, never fed)
            assert stats.prefilled_tokens <= len(handle.encode(message)) + 1, turn
        assert "\n\n" not in text

    # regenerate: the prompt is the same, its state one token before the end is a snapshot
    answer = chat.history[-1].content
    again = _reply(chat.regenerate())
    assert again == answer  # greedy
    assert chat.last_turn.prefilled_tokens == 1
    assert counter.take() == chat.last_turn.generated_tokens

    # undo: back to the end of turn 19, whose state was snapshotted when that turn ended
    chat.undo()
    _reply(chat.send("A different question"))
    message = "\n\nUser: A different question\n\nAssistant:"
    assert chat.last_turn.prefilled_tokens <= len(handle.encode(message)) + 1
    counter.take()

    # a restart: a new process (model, pool, chat) over the same store file, which holds the last state
    session_id = chat.session_id
    state_tokens = list(chat.cache_entry.token_ids)
    store.close()
    restarted = ember.load(TINY_V7, device="cpu")
    assert not restarted.engine.kv_cache.snapshots
    resumed = Chat(restarted, SessionStore(tmp_path / "sessions.db"), session_id)
    restarted_counter = ForwardCounter(restarted)
    _reply(resumed.send("And after the restart?"))
    assert resumed.last_turn.reused_tokens >= len(state_tokens)
    assert (
        resumed.last_turn.prefilled_tokens
        <= len(restarted.encode("\n\nUser: And after the restart?\n\nAssistant:")) + 1
    )
    assert (
        restarted_counter.take()
        == resumed.last_turn.prefilled_tokens + resumed.last_turn.generated_tokens - 1
    )


def test_a_foreign_or_stale_saved_state_is_ignored(handle, tmp_path):
    """Another model file's state is never imported; a state whose tokens no longer start the prompt
    (the conversation was undone elsewhere) is not used: the turn recomputes, with the right text."""
    path = tmp_path / "sessions.db"
    chat = Chat(handle, SessionStore(path), sampling_params=PARAMS)
    _reply(chat.send("Hello there"))
    _reply(chat.send("Tell me more"))
    session_id = chat.session_id

    other = ember.load(TINY_V7.with_name("tiny-rwkv-7v0-834K-FP16.bin"), device="cpu")
    foreign = Chat(other, SessionStore(path), session_id)
    _reply(foreign.send("Same shapes, other file"))
    assert foreign.last_turn.reused_tokens == 0  # the FP32 file's state was not imported

    # the FP16 turn replaced the FP32 state row; undo it, so the stored FP16 state is stale for FP32
    # (its tokens end with the undone turn) and foreign to it anyway: FP32 recomputes from text.
    SessionStore(path).undo(session_id)
    fresh = ember.load(TINY_V7, device="cpu")
    counter = ForwardCounter(fresh)
    again = Chat(fresh, SessionStore(path), session_id)
    text = _reply(again.send("Tell me more"))
    assert again.last_turn.reused_tokens == 0
    assert counter.take() == again.last_turn.prompt_tokens + again.last_turn.generated_tokens - 1
    expected = Chat(ember.load(TINY_V7, device="cpu"), SessionStore(":memory:"), sampling_params=PARAMS)
    _reply(expected.send("Hello there"))
    _reply(expected.send("Tell me more"))
    assert text == expected.history[-1].content  # greedy: the same answer as without any saved state
