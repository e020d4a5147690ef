"""The decode step CUDA captures as graphs (`DecodeGraphs`), run eagerly on CPU against `forward`.

Capture itself needs a GPU (tests/test_cuda.py); everything it records is checked
here: the fixed-shape math (`static_decode`: whole-capacity masked attention,
device-side cache writes), the padding of a batch to its bucket, and the
rebuild when the cache reallocates.
"""

from __future__ import annotations

import pytest
import torch

import ember
from ember.engine.sequence import GenerationRequest
from ember.models.batch import ForwardBatch
from ember.models.decode_graphs import BUCKETS, DecodeGraphs
from ember.sampling import SamplingParams
from tests.conftest import STORY_MODEL, make_tiny_hf_model

MODELS = {
    "llama": dict(num_kv_heads=2),
    "mistral": dict(num_kv_heads=4, sliding_window=8),  # shorter than the sequences below
    "qwen2": dict(num_kv_heads=1),  # q/k/v biases, one kv head for eight query heads
}


@pytest.fixture(scope="module", params=list(MODELS))
def tiny(request, tmp_path_factory):
    settings = dict(MODELS[request.param])
    folder = make_tiny_hf_model(tmp_path_factory.mktemp(request.param), request.param, **settings)
    return ember.load(folder)


def _prefill(handle, lengths: list[int], slots: list[int]) -> None:
    """Random prompts of `lengths` into `slots` through the ordinary forward."""
    model, kv_cache = handle.model, handle.engine.kv_cache
    kv_cache.ensure_capacity(max(lengths) + 4)
    while kv_cache.num_slots <= max(slots):
        kv_cache._allocate(kv_cache.num_slots * 2, kv_cache.capacity, shrink_ok=False)
    generator = torch.Generator().manual_seed(sum(lengths))
    for length, slot in zip(lengths, slots):
        tokens = torch.randint(3, 2048, (1, length), generator=generator)
        model.forward(ForwardBatch(tokens, [0], [slot]), kv_cache)


def test_static_decode_matches_forward_on_a_padded_ragged_batch(tiny):
    """Three sequences of different lengths in scattered slots: bucket 4, one padding row."""
    model, kv_cache = tiny.model, tiny.engine.kv_cache
    lengths, slots = [11, 3, 20], [5, 0, 2]
    _prefill(tiny, lengths, slots)
    graphs = DecodeGraphs(model, capture=False)
    next_tokens = torch.tensor([[7], [99], [1500]])
    for step in range(3):  # each step writes its keys, which the next step reads
        starts = [length + step for length in lengths]
        batch = ForwardBatch(next_tokens, starts, slots)
        saved = [(keys.clone(), values.clone()) for keys, values in zip(kv_cache.keys, kv_cache.values)]
        static = graphs(batch, kv_cache)
        assert static is not None and static.shape == (3, 1, model.config.vocab_size)
        static_cache = [
            (keys.clone(), values.clone()) for keys, values in zip(kv_cache.keys, kv_cache.values)
        ]
        for (keys, values), (saved_keys, saved_values) in zip(zip(kv_cache.keys, kv_cache.values), saved):
            keys.copy_(saved_keys)
            values.copy_(saved_values)
        reference = model.forward(batch, kv_cache)  # bypasses `graphs`: CPU models hold none
        torch.testing.assert_close(static, reference, rtol=1e-4, atol=1e-4)
        for (keys, values), (static_keys, static_values) in zip(
            zip(kv_cache.keys, kv_cache.values), static_cache
        ):
            torch.testing.assert_close(static_keys, keys, rtol=1e-5, atol=1e-5)  # the same keys stored
            torch.testing.assert_close(static_values, values, rtol=1e-5, atol=1e-5)
        next_tokens = reference[:, -1].argmax(-1, keepdim=True)


def test_batches_the_path_cannot_take_are_left_to_forward(tiny):
    model, kv_cache = tiny.model, tiny.engine.kv_cache
    graphs = DecodeGraphs(model, capture=False)
    capacity = kv_cache.capacity
    beyond = ForwardBatch(torch.tensor([[5]]), [capacity], [0])  # its key would lie past the capacity
    assert graphs(beyond, kv_cache) is None
    duplicate = ForwardBatch(torch.tensor([[5], [6]]), [1, 2], [0, 0])
    assert graphs(duplicate, kv_cache) is None
    prefill = ForwardBatch(torch.tensor([[5, 6]]), [0], [0])
    assert graphs(prefill, kv_cache) is None
    too_many = BUCKETS[-1] + 1
    assert (
        graphs(
            ForwardBatch(torch.zeros(too_many, 1, dtype=torch.long), [0] * too_many, list(range(too_many))),
            kv_cache,
        )
        is None
    )


def test_engine_through_the_graph_step_gives_the_same_greedy_text_across_a_cache_growth():
    """The story model's engine with the eager graph step: identical greedy tokens for sequences decoding
    together, while the cache's capacity doubles under them (the step's buffers are rebuilt)."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = ["Once upon a time", "The little dog", "Tom and Sue went to the park. They"]

    def run(handle) -> list[list[int]]:
        engine = handle.engine
        outputs = {}
        ids = []
        for prompt, length in zip(prompts, (230, 200, 225)):  # they pass 256 tokens while decoding
            tokens = (handle.encode(prompt) * 100)[:length]
            ids.append(engine.add_request(GenerationRequest(tokens, params)).request_id)
        while engine.has_unfinished():
            for output in engine.step():
                if output.token_id is not None:
                    outputs.setdefault(output.request_id, []).append(output.token_id)
        return [outputs[request_id] for request_id in ids]

    plain = ember.load(STORY_MODEL)
    through_graphs = ember.load(STORY_MODEL)
    through_graphs.model.decode_graphs = DecodeGraphs(through_graphs.model, capture=False)
    assert through_graphs.engine.kv_cache.capacity <= 256
    expected = run(plain)
    assert run(through_graphs) == expected
    assert through_graphs.model.decode_graphs.steps >= 39  # every decode step went through it
    assert through_graphs.engine.kv_cache.capacity >= 512  # it grew during the run
    assert through_graphs.model.decode_graphs.rebuilds >= 1  # and the step's buffers were made anew
    assert len(expected) == 3 and all(len(tokens) == 40 for tokens in expected)


def test_layout_versions_name_one_set_of_tensors_across_caches(tiny):
    """Consumers holding cache addresses compare only this number, so it never repeats, even between
    caches: a new cache (perhaps at a freed cache's id) or a regrown one always gets a new version."""
    first, second = tiny.model.new_cache(), tiny.model.new_cache()
    assert first.layout_version != second.layout_version
    before = first.layout_version
    first.acquire(), first.acquire()  # a second sequence needs a second slot: the tensors are remade
    assert first.num_slots >= 2 and first.layout_version not in (before, second.layout_version)
