"""RWKV through ember.load and the engine: every tiny file loads, batched decoding, the state pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ember
from ember.cache import CacheEntry, CacheEntryBusyError
from ember.engine.sequence import GenerationRequest
from ember.errors import EmberError, InvalidRequestError
from ember.sampling import SamplingParams
from ember.state_cache import RNNStatePool

TINY_RWKV = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "tiny-rwkv"
TINY_V7 = TINY_RWKV / "tiny-rwkv-7v0-834K-FP32.bin"
FILES = sorted(path.name for path in TINY_RWKV.glob("tiny-rwkv-*.bin"))


@pytest.fixture(scope="module")
def v7():
    return ember.load(TINY_V7, device="cpu")


@pytest.mark.parametrize("file_name", FILES)
def test_every_tiny_file_loads(file_name):
    handle = ember.load(TINY_RWKV / file_name, device="cpu")
    assert handle.config.architecture == "rwkv"
    assert handle.tokenizer.encode('"in') == [34, 105, 110]
    logits = handle.logits([34, 105, 110])  # (positions, vocab), read in sequence mode
    assert logits.shape == (3, 256) and torch.isfinite(logits).all()
    if "FP32" in file_name:
        _, _, version, size, _ = file_name.split("-")
        expected = np.fromfile(TINY_RWKV / f"expected-logits-{version}-{size}.bin", dtype="<f4")
        assert np.abs(logits[-1].numpy() - expected).max() < 1e-4


def test_greedy_generation_equals_a_manual_loop(v7):
    prompt = v7.encode("Once upon a time")
    outputs = list(v7.stream(prompt, temperature=0, max_tokens=12, ignore_eos=True))
    tokens = [output.token_id for output in outputs if output.token_id is not None]
    expected, sequence = [], list(prompt)
    for _ in range(12):
        token = int(torch.argmax(v7.logits(sequence)[-1]))
        expected.append(token)
        sequence.append(token)
    assert tokens == expected


def test_sequences_decode_together_and_equal_each_alone(v7):
    prompts = [v7.encode(text) for text in ("The cat", "A long time ago, in", "Hello")]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = [
        [o.token_id for o in v7.engine.generate(GenerationRequest(p, params)) if o.token_id is not None]
        for p in prompts
    ]
    batch_sizes = []
    forward = v7.model.forward

    def counting_forward(batch, cache):
        batch_sizes.append(batch.batch_size)
        return forward(batch, cache)

    v7.model.forward = counting_forward
    try:
        iterators = [v7.engine.generate(GenerationRequest(p, params)) for p in prompts]
        together = [[] for _ in prompts]
        active = set(range(len(prompts)))
        while active:
            for index in sorted(active):
                output = next(iterators[index], None)
                if output is None:
                    active.discard(index)
                elif output.token_id is not None:
                    together[index].append(output.token_id)
    finally:
        v7.model.forward = forward
    assert together == alone
    assert max(batch_sizes) == 3  # one batched step for all three


def test_pool_rollback_restores_snapshots(v7):
    model = v7.model
    pool = model.new_cache(memory_budget_bytes=1 << 20)
    from ember.models.batch import ForwardBatch

    def feed(entry, tokens):
        start = len(entry.token_ids)
        logits = model.forward(ForwardBatch(torch.tensor([tokens]), [start], [entry.slot]), pool)
        entry.token_ids.extend(tokens)
        return logits[0, -1]

    entry = pool.acquire()
    first = list(range(40, 60))
    feed(entry, first)
    pool.release(entry, keep=True)  # a turn boundary: snapshot of `first`
    assert tuple(first) in pool.snapshots
    entry = pool.acquire(entry)
    with pytest.raises(CacheEntryBusyError):
        pool.acquire(entry)
    second = first + list(range(70, 80))
    reused = pool.reusable_prefix(entry, second)
    assert reused == len(first)
    pool.truncate(entry, reused)
    feed(entry, second[reused:])
    pool.release(entry, keep=True)
    # undo: a prompt that shares only `first` restores its snapshot
    entry = pool.acquire(entry)
    third = first + [90, 91, 92]
    assert pool.reusable_prefix(entry, third) == len(first)
    pool.truncate(entry, len(first))
    assert entry.token_ids == first
    after_restore = feed(entry, [90, 91, 92])
    fresh = model.new_cache()
    other = fresh.acquire()
    expected = model.forward(ForwardBatch(torch.tensor([third]), [0], [other.slot]), fresh)[0, -1]
    assert (after_restore - expected).abs().max() < 1e-5
    pool.release(entry, keep=False)
    # a one-off request whose prompt starts with a snapshot reuses it too
    stranger = pool.acquire(prompt_token_ids=third + [5, 6])
    assert pool.reusable_prefix(stranger, third + [5, 6]) == len(third)
    with pytest.raises(EmberError):
        pool.truncate(CacheEntry(token_ids=[1, 2, 3], slot=stranger.slot), 2)


def test_pool_evicts_least_recently_used_under_the_budget(v7):
    model = v7.model
    state_bytes = model.new_cache().bytes_per_state
    pool = model.new_cache(memory_budget_bytes=4 * state_bytes)
    from ember.models.batch import ForwardBatch

    for round_index in range(6):
        entry = pool.acquire()
        tokens = [round_index + 1] * 5
        model.forward(ForwardBatch(torch.tensor([tokens]), [0], [entry.slot]), pool)
        entry.token_ids.extend(tokens)
        pool.release(entry, keep=False)
        assert pool.memory_bytes <= pool.memory_budget_bytes
    assert pool.num_evictions > 0
    assert (6,) * 5 in pool.snapshots and (1,) * 5 not in pool.snapshots
    assert pool.memory_bytes <= pool.memory_budget_bytes


def test_state_export_and_import(v7):
    model = v7.model
    pool = model.new_cache()
    from ember.models.batch import ForwardBatch

    entry = pool.acquire()
    tokens = v7.encode("User: hi\n\nAssistant: hello")
    model.forward(ForwardBatch(torch.tensor([tokens]), [0], [entry.slot]), pool)
    entry.token_ids.extend(tokens)
    pool.release(entry, keep=True)
    data = pool.export_state(tokens)
    assert data is not None and len(data) < 4 * pool.bytes_per_state
    restarted = model.new_cache()
    assert restarted.import_state(data) == len(tokens)
    new_entry = restarted.acquire()
    assert restarted.reusable_prefix(new_entry, tokens + [10]) == len(tokens)
    with pytest.raises(InvalidRequestError):
        restarted.import_state(b"garbage")
    assert pool.export_state([1, 2, 3]) is None


def test_state_pool_refuses_when_every_slot_runs(v7):
    pool: RNNStatePool = v7.model.new_cache(memory_budget_bytes=1)
    first = pool.acquire()
    second = pool.acquire()  # the budget always admits two states
    from ember.cache import CacheFullError

    with pytest.raises(CacheFullError):
        pool.acquire()
    pool.release(first, keep=True)
    assert pool.acquire().slot is not None  # the idle one is evicted
    pool.release(second)
