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


def _prefill(handle, lengths: list[int]) -> list[int]:
    """Random prompts of `lengths` through the ordinary forward, each in a new entry: their slots. The
    first entry's blocks are taken after the others', so block ids are out of order across sequences."""
    model, kv_cache = handle.model, handle.engine.kv_cache
    entries = [kv_cache.acquire() for _ in lengths]
    generator = torch.Generator().manual_seed(sum(lengths))
    for entry, length in list(zip(entries, lengths))[::-1]:
        kv_cache.reserve(entry, length + 4)
        tokens = torch.randint(3, 2048, (1, length), generator=generator)
        model.forward(ForwardBatch(tokens, [0], [entry.slot]), kv_cache)
    return [entry.slot for entry in entries]


def _pools(kv_cache) -> list[torch.Tensor]:
    return list(kv_cache.key_pools) + list(kv_cache.value_pools)


def test_static_decode_matches_forward_on_a_padded_ragged_batch(tiny):
    """Three sequences of different lengths in scattered slots: bucket 4, one padding row."""
    model, kv_cache = tiny.model, tiny.engine.kv_cache
    lengths = [11, 3, 70]  # the last spans two blocks
    slots = _prefill(tiny, lengths)
    graphs = DecodeGraphs(model, capture=False)
    next_tokens = torch.tensor([[7], [99], [1500]])
    for step in range(3):  # each step writes its keys, which the next step reads
        starts = [length + step for length in lengths]
        batch = ForwardBatch(next_tokens, starts, slots)
        saved = [pool.clone() for pool in _pools(kv_cache)]
        static = graphs(batch, kv_cache)
        assert static is not None and static.shape == (3, 1, model.config.vocab_size)
        static_cache = [pool.clone() for pool in _pools(kv_cache)]
        for pool, saved_pool in zip(_pools(kv_cache), saved):
            pool.copy_(saved_pool)
        reference = model.forward(batch, kv_cache)  # bypasses `graphs`: CPU models hold none
        torch.testing.assert_close(static, reference, rtol=1e-4, atol=1e-4)
        for pool, static_pool in zip(_pools(kv_cache), static_cache):
            torch.testing.assert_close(static_pool, pool, rtol=1e-5, atol=1e-5)  # the same keys stored
        next_tokens = reference[:, -1].argmax(-1, keepdim=True)


def test_batches_the_path_cannot_take_are_left_to_forward(tiny):
    model, kv_cache = tiny.model, tiny.engine.kv_cache
    graphs = DecodeGraphs(model, capture=False)
    (slot,) = _prefill(tiny, [5])
    held = len(kv_cache.entries_by_slot[slot].blocks) * kv_cache.block_size
    beyond = ForwardBatch(torch.tensor([[5]]), [held], [slot])  # its key would lie past its blocks
    assert graphs(beyond, kv_cache) is None
    duplicate = ForwardBatch(torch.tensor([[5], [6]]), [2, 2], [slot, slot])  # one position twice
    assert graphs(duplicate, kv_cache) is None
    prefill = ForwardBatch(torch.tensor([[5, 6]]), [0], [slot])
    assert graphs(prefill, kv_cache) is None
    too_many = BUCKETS[-1] + 1
    assert (
        graphs(
            ForwardBatch(torch.zeros(too_many, 1, dtype=torch.long), [0] * too_many, list(range(too_many))),
            kv_cache,
        )
        is None
    )


def test_engine_through_the_graph_step_gives_the_same_greedy_text_across_a_table_widening():
    """The story model's engine with the eager graph step: identical greedy tokens for sequences decoding
    together, while they outgrow four blocks each (the step moves to buffers of a wider block table)."""
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
    assert through_graphs.engine.kv_cache.block_size == 64
    expected = run(plain)
    assert run(through_graphs) == expected
    assert through_graphs.model.decode_graphs.steps >= 39  # every decode step went through it
    widths = {width for _, width in through_graphs.model.decode_graphs._buffers}
    assert widths == {4, 8}  # 230 tokens fill four blocks; 270 need a fifth
    assert len(expected) == 3 and all(len(tokens) == 40 for tokens in expected)


def test_layout_versions_name_one_set_of_tensors_across_caches(tiny):
    """Consumers holding cache addresses compare only this number, so it never repeats, even between
    caches: a new cache (perhaps at a freed cache's id) always gets a new version; one cache's pools never
    move, so its version stays while sequences come, grow and go."""
    first, second = tiny.model.new_cache(), tiny.model.new_cache()
    assert first.layout_version != second.layout_version
    before = first.layout_version
    entries = [first.acquire(), first.acquire()]
    for entry in entries:
        first.reserve(entry, 200)
    first.release(entries[0])
    assert first.layout_version == before and second.layout_version != before
