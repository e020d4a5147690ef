"""The sampler on hand-made distributions, and sampling settings end to end."""

from __future__ import annotations

import math

import pytest
import torch

import ember
from ember.errors import InvalidRequestError
from ember.sampling import Sampler, SamplingParams, is_penalty_exempt_text, penalty_exempt_mask
from tests.conftest import STORY_MODEL


def _logits(probabilities: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) if p > 0 else -1e9 for p in probabilities])


def _draws(params: SamplingParams, logits: torch.Tensor, count: int = 300) -> set[int]:
    sampler = Sampler(params, len(logits), [])
    return {sampler.sample(logits) for _ in range(count)}


def test_greedy_picks_argmax():
    assert _draws(SamplingParams(temperature=0.0), _logits([0.1, 0.6, 0.3]), 5) == {1}


def test_top_k_limits_candidates():
    logits = _logits([0.3, 0.25, 0.2, 0.15, 0.1])
    assert _draws(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=1), logits) == {0, 1}
    assert len(_draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1), logits)) == 5


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = _logits([0.5, 0.3, 0.2])
    assert _draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.6, min_p=0.0, seed=2), logits) == {0, 1}
    assert _draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0, seed=2), logits) == {0}


def test_min_p_drops_unlikely_tokens():
    logits = _logits([0.5, 0.3, 0.2])
    assert _draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=3), logits) == {0, 1}


def test_temperature_sharpens():
    logits = _logits([0.4, 0.35, 0.25])
    cold = Sampler(SamplingParams(temperature=0.01, top_k=0, top_p=1.0, min_p=0.0, seed=4), 3, [])
    assert {cold.sample(logits) for _ in range(200)} == {0}


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([2.0, 1.9, -1.0])
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    assert Sampler(params, 3, prompt_token_ids=[0]).sample(logits) == 1
    assert Sampler(params.replace(repetition_penalty=1.0), 3, [0]).sample(logits) == 0


def test_frequency_and_presence_penalties_with_decay():
    logits = torch.tensor([1.0, 0.8, 0.0])
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.15), 3, [])
    sampler.observe(0)
    assert sampler.sample(logits) == 0  # one occurrence: 1.0 - 0.15 > 0.8
    sampler.observe(0)
    assert sampler.sample(logits) == 1  # two: 1.0 - 0.3 < 0.8
    decaying = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.15, penalty_decay=0.5), 3, [])
    decaying.observe(0)
    decaying.observe(0)  # counts: 1 * 0.5 + 1 = 1.5 -> 1.0 - 0.225 < 0.8
    assert decaying.sample(logits) == 1
    for _ in range(5):
        decaying.observe(2)  # token 0's count decays to 1.5 / 32
    assert decaying.sample(logits) == 0
    presence = Sampler(SamplingParams(temperature=0.0, presence_penalty=0.3), 3, [])
    presence.observe(0)
    assert presence.sample(logits) == 1


def test_banned_tokens_are_never_drawn():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.5])
    assert Sampler(SamplingParams(temperature=0.0, banned_token_ids=[0]), 4, []).sample(logits) == 1
    params = SamplingParams(
        temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5, banned_token_ids=(2, 0, 0)
    )
    assert params.banned_token_ids == [0, 2]  # distinct and sorted
    sampler = Sampler(params, 4, [])
    assert {sampler.sample(logits) for _ in range(200)} == {1, 3}
    with pytest.raises(InvalidRequestError, match="below the vocabulary size 4, got 4"):
        Sampler(SamplingParams(banned_token_ids=[4]), 4, [])
    with pytest.raises(InvalidRequestError, match="ban every token"):
        Sampler(SamplingParams(banned_token_ids=[0, 1, 2, 3]), 4, [])
    only_banned_left = torch.tensor([float("-inf"), 1.0, float("-inf"), float("-inf")])  # a constraint's mask
    with pytest.raises(ValueError, match="leave no token"):
        Sampler(SamplingParams(temperature=0.0, banned_token_ids=[1]), 4, []).sample(only_banned_left)


def test_exempt_tokens_escape_every_penalty():
    logits = torch.tensor([1.0, 0.9, 0.0])
    exempt = torch.tensor([True, False, False])
    for penalty in ({"presence_penalty": 0.5}, {"frequency_penalty": 0.5}, {"repetition_penalty": 2.0}):
        params = SamplingParams(temperature=0.0, penalty_exempt_punctuation=True, **penalty)
        plain = Sampler(params.replace(penalty_exempt_punctuation=False), 3, [0])
        spared = Sampler(params, 3, [0])
        spared.exempt_from_penalties(exempt)
        for sampler in (plain, spared):
            sampler.observe(0)
        assert plain.sample(logits) == 1, penalty  # token 0 is penalized below token 1
        assert spared.sample(logits) == 0, penalty
        spared.observe(1)
        spared.observe(1)
        assert spared.sample(torch.tensor([0.0, 1.0, 0.9])) == 2  # the others are still penalized


def test_exempt_texts_are_whitespace_punctuation_symbols_and_digits():
    for text in (" ", ",", "\n\n", "2024", "。", "!?", " (", "$", "+=", "_"):
        assert is_penalty_exempt_text(text), repr(text)
    for text in ("", " the", "a,", "中", "\ufffd", "😀", "x2"):
        assert not is_penalty_exempt_text(text), repr(text)


def test_seed_reproduces_draws():
    logits = torch.randn(500)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=123)
    first = [Sampler(params, 500, []).sample(logits) for _ in range(3)]
    sampler_a, sampler_b = Sampler(params, 500, []), Sampler(params, 500, [])
    assert [sampler_a.sample(logits) for _ in range(20)] == [sampler_b.sample(logits) for _ in range(20)]
    assert len(set(first)) == 1


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", 1.0),
        ("top_k", -3),
        ("max_tokens", 0),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("penalty_decay", 0.0),
        ("stop", [""]),
    ],
)
def test_invalid_settings_are_clear_errors(field, value):
    with pytest.raises(InvalidRequestError, match=field.split("_")[0]):
        SamplingParams(**{field: value})


def test_unknown_setting_is_an_error():
    with pytest.raises(InvalidRequestError, match="unknown"):
        SamplingParams().replace(temprature=0.5)


@pytest.fixture(scope="module")
def story():
    return ember.load(STORY_MODEL)


def test_exempt_mask_from_the_tokenizer(story):
    tokenizer = story.tokenizer
    mask = penalty_exempt_mask(tokenizer, story.engine.vocab_size)
    assert mask.shape == (story.engine.vocab_size,)
    for text in (",", ".", "!"):
        assert all(mask[token_id] for token_id in tokenizer.encode(text, add_special_tokens=False)), text
    for text in ("Once", "time"):  # (after a lone "▁", which is whitespace)
        assert not mask[tokenizer.encode(text, add_special_tokens=False)[-1]], text
    assert mask[tokenizer.encode(" ", add_special_tokens=False)[-1]]
    assert penalty_exempt_mask(tokenizer, story.engine.vocab_size) is not None  # cached, same answer


def test_bans_and_exemptions_through_the_engine(story):
    prompt = "Once upon a time"
    free = [o.token_id for o in story.stream(prompt, temperature=0.0, max_tokens=12, ignore_eos=True)]
    banned = sorted(set(free[:3]))
    outputs = list(
        story.stream(prompt, temperature=0.0, max_tokens=12, ignore_eos=True, banned_token_ids=banned)
    )
    tokens = [o.token_id for o in outputs if o.token_id is not None]
    assert len(tokens) == 12 and not set(tokens) & set(banned)
    with pytest.raises(InvalidRequestError, match="below the vocabulary size"):
        list(story.stream(prompt, max_tokens=2, banned_token_ids=[10**6]))
    # Greedy with a strong frequency penalty that spares punctuation, against the same rule by hand.
    penalized = {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True, "frequency_penalty": 2.0}
    plain = [o.token_id for o in story.stream(prompt, **penalized) if o.token_id is not None]
    spared = [
        o.token_id
        for o in story.stream(prompt, **penalized, penalty_exempt_punctuation=True)
        if o.token_id is not None
    ]
    mask = penalty_exempt_mask(story.tokenizer, story.engine.vocab_size)
    ids, counts, expected = story.encode(prompt), torch.zeros(story.engine.vocab_size), []
    for _ in range(24):
        logits = story.logits(ids)[-1, : story.engine.vocab_size]
        token_id = int(torch.argmax(torch.where(mask, logits, logits - 2.0 * counts)))
        counts[token_id] += 1
        ids.append(token_id)
        expected.append(token_id)
    assert spared == expected
    assert plain != spared  # the exemption changed the text (punctuation repeats in these stories)


def test_same_seed_same_text_different_seed_different_text(story):
    def text(seed: int) -> str:
        return "".join(story.generate("Once upon a time", temperature=1.0, seed=seed, max_tokens=40))

    assert text(7) == text(7)
    assert text(7) != text(8)


def test_max_tokens_and_finish_reason(story):
    outputs = list(story.stream("Once upon a time", temperature=0.0, max_tokens=9, ignore_eos=True))
    assert outputs[-1].finish_reason == "length"
    assert outputs[-1].num_generated_tokens == 9
    assert sum(1 for o in outputs if o.token_id is not None) == 9


def test_end_marker_stops_generation(story):
    # TinyStories spells its end marker out as ordinary tokens: the marker's text stops it too.
    outputs = list(story.stream("Once upon a time", temperature=0.0, max_tokens=400))
    assert outputs[-1].finish_reason == "stop"
    assert outputs[-1].num_generated_tokens < 400
    text = "".join(o.text for o in outputs)
    assert "<|" not in text and text.rstrip().endswith(".")


def test_eos_token_stops_generation(story):
    free = [
        o.token_id for o in story.stream("Once upon a time", temperature=0.0, max_tokens=30, ignore_eos=True)
    ]
    stop_token = free[12]
    engine = story.engine
    saved = engine.stop_token_ids
    engine.stop_token_ids = frozenset({stop_token})
    try:
        outputs = list(story.stream("Once upon a time", temperature=0.0, max_tokens=30))
    finally:
        engine.stop_token_ids = saved
    assert outputs[-1].finish_reason == "stop"
    assert outputs[-1].num_generated_tokens == free.index(stop_token) + 1


def test_stop_strings_spanning_tokens_are_cut_and_never_printed(story):
    full = "".join(story.generate("Once upon a time", temperature=0.0, max_tokens=60, ignore_eos=True))
    stop = full[40:52]  # a piece of the text that crosses token boundaries
    assert len(stop.strip()) > 5
    outputs = list(story.stream("Once upon a time", temperature=0.0, max_tokens=60, stop=["zzzz", stop]))
    text = "".join(o.text for o in outputs)
    assert outputs[-1].finish_reason == "stop"
    assert text == full[: full.index(stop)]


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("top_k", 2.5, "top_k must be a whole number, got float 2.5"),
        ("temperature", "0.5", "temperature must be a number, got str '0.5'"),
        ("seed", "abc", "seed must be a whole number or None, got str 'abc'"),
        ("seed", 99999999999999999999999, "seed must be in"),
        ("temperature", math.inf, "temperature must be a finite number"),
        ("top_p", math.nan, "top_p must be a finite number"),
        ("presence_penalty", -math.inf, "presence_penalty must be a finite number"),
        ("max_tokens", True, "max_tokens must be a whole number, got bool"),
        ("ignore_eos", "no", "ignore_eos must be true or false"),
        ("stop", 5, "stop must be a string or a list of strings"),
        ("logprobs", 1.5, "logprobs must be a whole number or None"),
        ("penalty_exempt_punctuation", 1, "penalty_exempt_punctuation must be true or false, got int"),
        ("banned_token_ids", 5, "banned_token_ids must be a list of token ids, got int 5"),
        ("banned_token_ids", [1, "2"], "banned_token_ids must be a list of whole-number token ids"),
        ("banned_token_ids", [True], "banned_token_ids must be a list of whole-number token ids"),
        ("banned_token_ids", [3, -1], "banned_token_ids must be token ids >= 0, got -1"),
    ],
)
def test_wrong_types_and_non_finite_values_name_the_field(field, value, fragment):
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(**{field: value})
    assert fragment in str(caught.value)
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams().replace(**{field: value})


def test_whole_numbers_are_accepted_for_float_settings():
    params = SamplingParams(temperature=1, top_k=torch.tensor(3).item(), seed=2**63)
    assert params.temperature == 1.0 and isinstance(params.temperature, float)
    assert params.top_k == 3 and params.seed == 2**63
    Sampler(params, 4, []).sample(torch.zeros(4))  # a seed at the range's end still seeds
