"""The Python API as a user calls it: what a prompt may be, batches of logits, bounded session caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ember
from ember import handle as handle_module
from tests.conftest import STORY_MODEL


@pytest.fixture(scope="module")
def story():
    return ember.load(STORY_MODEL)


def test_a_prompt_is_text_or_token_ids(story):
    ids = story.encode("Once upon a time")
    by_text = "".join(story.generate("Once upon a time", temperature=0, max_tokens=8))
    assert "".join(story.generate(ids, temperature=0, max_tokens=8)) == by_text
    assert "".join(story.generate(tuple(ids), temperature=0, max_tokens=8)) == by_text
    assert "".join(story.generate(torch.tensor(ids), temperature=0, max_tokens=8)) == by_text
    assert "".join(story.generate(np.array(ids), temperature=0, max_tokens=8)) == by_text


@pytest.mark.parametrize(
    "prompt, fragment",
    [
        (b"\x01\x50", "got bytes"),
        (bytearray(b"\x01"), "got bytearray"),
        ([1, 2.5], "holding float"),
        (["Once", "upon"], "holding str"),
        ([[1, 2], [3, 4]], "holding list"),
        (torch.tensor([[1, 2]]), "2-D Tensor"),
        (42, "got int"),
        ({"prompt": "x"}, "got dict"),
    ],
)
def test_other_prompts_are_a_type_error_saying_what_is_accepted(story, prompt, fragment):
    with pytest.raises(TypeError) as caught:
        story.generate(prompt, max_tokens=2)  # raised at the call, before the first next()
    assert "a str, or a sequence of int token ids" in str(caught.value) and fragment in str(caught.value)
    with pytest.raises(TypeError):
        next(story.stream(prompt))


def test_logits_of_a_batch_are_per_row(story):
    first, second = story.encode("Once upon a time"), story.encode("The big dog ran")
    second = (second + second)[: len(first)]
    batch = story.logits(torch.tensor([first, second]))
    assert batch.shape == (2, len(first), story.config.vocab_size)
    assert torch.equal(batch[0], story.logits(first)) and torch.equal(batch[1], story.logits(second))
    assert torch.equal(story.logits([first, second]), batch)
    with pytest.raises(ember.errors.InvalidRequestError, match="rows of one length"):
        story.logits([first, first[:-1]])
    with pytest.raises(TypeError, match="holding float"):
        story.logits(torch.tensor([1.0, 2.0]))


def test_session_caches_are_bounded_and_a_dropped_one_frees_its_memory(story, monkeypatch):
    monkeypatch.setattr(handle_module, "MAX_SESSION_CACHES", 3)
    story._session_caches.clear()
    oldest = story.session_cache("a")
    list(story.engine.generate(ember.engine.sequence.GenerationRequest(
        story.encode("Once upon a time"),
        ember.sampling.SamplingParams(temperature=0, max_tokens=2),
        cache_entry=oldest,
    )))  # fmt: skip
    assert oldest.resident  # a session's entry is kept for its next turn
    for key in "bcd":
        story.session_cache(key)
    assert list(story._session_caches) == ["b", "c", "d"]
    assert not oldest.resident  # forgotten and freed, not left holding a slot
    story.session_cache("b")  # use refreshes: "c" is now the least recent
    story.session_cache("e")
    assert list(story._session_caches) == ["d", "b", "e"]


def test_encode_takes_text_only(story):
    with pytest.raises(TypeError, match="encode takes a str, got bytes"):
        story.encode(b"Once upon a time")
