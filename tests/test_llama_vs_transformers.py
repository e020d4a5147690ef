"""Our Llama-family model against HF transformers (test-only reference), in float32.

Logits over a prefill followed by 20 cached decode steps must equal a full
uncached transformers forward within 1e-4, and greedy generation must match
token for token.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import ember
from ember.engine.sequence import GenerationRequest
from ember.models.batch import ForwardBatch
from ember.sampling import SamplingParams
from tests.conftest import STORY_MODEL, make_tiny_hf_model

PREFILL, DECODE_STEPS = 12, 20


def _prefill_then_decode_logits(handle: ember.ModelHandle, token_ids: list[int]) -> torch.Tensor:
    """Logits for every position: one prefill call for the first tokens, then one call per token."""
    cache = handle.engine.kv_cache
    entry = cache.acquire()
    try:
        cache.reserve(entry, len(token_ids))
        rows = []
        prefill = ForwardBatch(
            token_ids=torch.tensor([token_ids[:PREFILL]]),
            start_positions=[0],
            slots=[entry.slot],
            all_logits=True,
        )
        rows.append(handle.model.forward(prefill, cache)[0])
        for position in range(PREFILL, len(token_ids)):
            step = ForwardBatch(
                token_ids=torch.tensor([[token_ids[position]]]),
                start_positions=[position],
                slots=[entry.slot],
            )
            rows.append(handle.model.forward(step, cache)[0])
        return torch.cat(rows)
    finally:
        cache.release(entry)


def _reference_logits(folder, token_ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


def _greedy_reference(folder, prompt_ids: list[int], num_tokens: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    generated = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=num_tokens,
        min_new_tokens=num_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return generated[0, len(prompt_ids) :].tolist()


def _greedy_ember(handle: ember.ModelHandle, prompt_ids: list[int], num_tokens: int) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    return [
        out.token_id
        for out in handle.engine.generate(GenerationRequest(prompt_ids, params))
        if out.token_id is not None
    ]


CASES = [
    (architecture, num_kv_heads)
    for architecture in ("llama", "mistral", "qwen2")
    for num_kv_heads in (8, 4, 2)  # GQA ratios 1, 2, 4 with 8 query heads
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-gqa{8 // k}" for a, k in CASES])
def tiny_model(request, tmp_path_factory):
    architecture, num_kv_heads = request.param
    overrides = {}
    if architecture == "mistral":
        overrides["sliding_window"] = 8  # shorter than the 32-token sequences below
    folder = make_tiny_hf_model(
        tmp_path_factory.mktemp(architecture), architecture, num_kv_heads, **overrides
    )
    return folder, ember.load(folder)


def test_tiny_model_logits_match_transformers(tiny_model):
    folder, handle = tiny_model
    token_ids = torch.randint(
        3, 2048, (PREFILL + DECODE_STEPS,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    ours = _prefill_then_decode_logits(handle, token_ids)
    reference = _reference_logits(folder, token_ids)
    assert ours.shape == reference.shape == (PREFILL + DECODE_STEPS, 2048)
    assert reference.std() > 0.1  # the comparison means something
    assert (ours - reference).abs().max().item() < 1e-4
    # The public API's logits agree with the incremental computation.
    assert (handle.logits(token_ids) - reference).abs().max().item() < 1e-4


def test_tiny_model_greedy_matches_transformers(tiny_model):
    folder, handle = tiny_model
    prompt = [1, 50, 300, 700, 12]
    assert _greedy_ember(handle, prompt, 64) == _greedy_reference(folder, prompt, 64)


def test_mistral_sliding_window_changes_the_result(tmp_path):
    """The window must really be applied: the same weights without it give other logits."""
    windowed = make_tiny_hf_model(tmp_path / "w", "mistral", 4, sliding_window=4)
    unwindowed = make_tiny_hf_model(tmp_path / "u", "mistral", 4, sliding_window=None)
    token_ids = list(range(10, 30))
    a, b = ember.load(windowed).logits(token_ids), ember.load(unwindowed).logits(token_ids)
    assert torch.allclose(a[:4], b[:4], atol=1e-5)  # inside the window nothing differs
    assert (a[-1] - b[-1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ],
    ids=lambda p: p["rope_type"],
)
def test_rope_scaling_models_match_transformers(tmp_path, rope_parameters):
    # A short trained context so that dynamic scaling kicks in within the test sequence.
    folder = make_tiny_hf_model(
        tmp_path,
        "llama",
        4,
        max_position_embeddings=24,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters},
    )
    handle = ember.load(folder)
    assert handle.config.rope_scaling["rope_type"] == rope_parameters["rope_type"]
    token_ids = list(range(100, 123))
    assert (handle.logits(token_ids) - _reference_logits(folder, token_ids)).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def story():
    return ember.load(STORY_MODEL)


def test_story_model_logits_match_transformers(story):
    token_ids = story.encode("Once upon a time, there was a little dog named Max. He liked to run and play.")
    assert len(token_ids) > PREFILL
    ours = _prefill_then_decode_logits(story, token_ids)
    assert (ours - _reference_logits(STORY_MODEL, token_ids)).abs().max().item() < 1e-4


def test_story_model_greedy_matches_transformers(story):
    prompt = story.encode("Once upon a time")
    assert _greedy_ember(story, prompt, 64) == _greedy_reference(STORY_MODEL, prompt, 64)


def test_story_model_writes_a_story(story):
    text = "".join(story.generate("Once upon a time", temperature=0.0, max_tokens=120))
    words = text.split()
    assert len(words) > 40
    # A coherent little story: real sentences built from the vocabulary of children's stories.
    assert text.count(".") >= 3
    assert any(name in text for name in ("Lily", "Tom", "Max", "Ben", "Sue", "Tim", "Sam", "Mia"))
    assert len(set(words)) > 25  # not one phrase repeated
