"""The paged KV cache: each sequence's memory follows its own length, prefixes are shared, nothing moves.

These are the points of issue 9's last item: one long conversation and fifteen short ones fit where
sixteen medium ones do not; a sequence's growth never copies the pool (no transient doubling: the
pools are allocated once and their pages come and go with the blocks in use); sequences sharing a
prompt share its blocks, copying one only when they write into it.
"""

from __future__ import annotations

import torch

import ember
from ember.cache import KVCache
from ember.engine.sequence import GenerationRequest
from ember.sampling import SamplingParams
from tests.conftest import make_tiny_hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 2000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def _check_block_accounting(cache: KVCache) -> None:
    """Every block is free or held, each held block's count is its holders, and memory says so."""
    holders: dict[int, int] = {}
    for entry in cache.entries_by_slot.values():
        for block in entry.blocks:
            holders[block] = holders.get(block, 0) + 1
    assert all(cache._block_references[block] == count for block, count in holders.items())
    assert set(cache._free_blocks).isdisjoint(holders) and 0 not in holders  # block 0 is padding
    assert len(cache._free_blocks) + len(holders) == cache.num_blocks - 1
    assert cache.memory_bytes == len(holders) * cache.bytes_per_block


def test_one_long_and_fifteen_short_sequences_fit_where_sixteen_medium_ones_would_not(tmp_path):
    folder = make_tiny_hf_model(tmp_path, "llama", 2, max_position_embeddings=8192)
    handle = ember.load(folder, cache_memory_mib=8)  # 16,384 tokens of 512 bytes
    engine, cache = handle.engine, handle.engine.kv_cache
    assert 16 * 3000 * cache.bytes_per_token > cache.memory_budget_bytes  # sixteen of 3,000 exceed it
    assert engine.max_batch_size >= 16
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)  # long enough to overlap
    requests = [GenerationRequest(_prompt(0, 6000), params)]
    requests += [GenerationRequest(_prompt(seed, 200), params) for seed in range(1, 16)]
    for request in requests:
        engine.add_request(request)
    outputs: dict[str, list[int]] = {request.request_id: [] for request in requests}
    most_running = 0
    while engine.has_unfinished():
        for output in engine.step():
            if output.token_id is not None:
                outputs[output.request_id].append(output.token_id)
        most_running = max(most_running, len(engine.running))
        assert cache.memory_bytes <= cache.memory_budget_bytes
    assert most_running == 16  # all decoded together...
    assert engine.num_preemptions == 0 and cache.num_evictions == 0  # ... with room to spare
    for request in (requests[0], requests[7]):
        alone = [o.token_id for o in engine.generate(GenerationRequest(request.prompt_token_ids, params))]
        assert outputs[request.request_id] == [token for token in alone if token is not None]
    _check_block_accounting(cache)


def test_sequences_sharing_a_system_prompt_share_its_blocks_and_copy_only_what_they_write(tmp_path):
    folder = make_tiny_hf_model(tmp_path, "llama", 2, max_position_embeddings=1024)
    handle = ember.load(folder)
    engine, cache = handle.engine, handle.engine.kv_cache
    system = _prompt(1, 200)  # three whole blocks and part of a fourth
    prompts = [system + _prompt(10 + index, 5 + index) for index in range(4)]
    alone = [[o.token_id for o in engine.generate(GenerationRequest(p, GREEDY))] for p in prompts]
    for entry in list(cache.entries_by_slot.values()):
        cache.release(entry)
    assert cache.memory_bytes == 0  # the idle size: nothing held

    first = GenerationRequest(prompts[0], GREEDY)
    engine.add_request(first)
    finals, tokens = {}, {first.request_id: []}
    while not engine.running:  # the first reads its prompt and starts decoding
        for output in engine.step():
            tokens[output.request_id].append(output.token_id)
    others = [GenerationRequest(prompt, GREEDY) for prompt in prompts[1:]]
    for request in others:
        engine.add_request(request)
        tokens[request.request_id] = []
    peak = 0
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id].append(output.token_id)
            if output.finished:
                finals[output.request_id] = output
        peak = max(peak, cache.memory_bytes)
        _check_block_accounting(cache)
    assert [tokens[r.request_id] for r in [first, *others]] == alone  # sharing changed no output
    assert all(finals[r.request_id].num_cached_tokens >= 200 for r in others)
    separately = sum(-(-(len(p) + GREEDY.max_tokens) // cache.block_size) for p in prompts)
    assert peak < separately * cache.bytes_per_block  # the three whole system blocks were held once
    assert cache.num_block_copies >= 1  # the shared, partly filled fourth block was copied on write


def test_a_sharer_keeps_its_keys_when_the_owner_rewrites_the_shared_block():
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=4, max_length=256, block_size=8)
    owner = cache.acquire()
    cache.reserve(owner, 12)
    keys = torch.arange(12 * 4, dtype=torch.float32).view(1, 1, 12, 4)  # (batch, kv_heads, tokens, dim)
    cache.write(0, [owner.slot], [0], keys, keys)
    owner.token_ids = list(range(100, 112))
    sharer = cache.acquire(prompt_token_ids=list(range(100, 112)) + [7])
    assert sharer is not owner and sharer.blocks == owner.blocks  # shared, not copied
    cache.truncate(owner, 9)  # the owner rolls back inside the shared second block and writes anew
    cache.reserve(owner, 12)
    cache.write(0, [owner.slot], [9], -torch.ones(1, 1, 3, 4), -torch.ones(1, 1, 3, 4))
    assert owner.blocks[0] == sharer.blocks[0] and owner.blocks[1] != sharer.blocks[1]
    shared_keys, _ = cache.read(0, [sharer.slot], 12)
    assert torch.equal(shared_keys, keys)  # the sharer still reads what it was given
    owner_keys, _ = cache.read(0, [owner.slot], 12)
    assert torch.equal(owner_keys[:, :, :9], keys[:, :, :9]) and bool((owner_keys[:, :, 9:] == -1).all())
    _check_block_accounting(cache)


def test_resident_memory_follows_the_blocks_in_use_and_the_pools_never_move():
    cache = KVCache(num_layers=4, num_kv_heads=4, head_dim=64, max_length=16384)  # 8 KiB a token
    addresses = [pool.data_ptr() for pool in cache.key_pools + cache.value_pools]
    before = _resident_bytes()
    entries = [cache.acquire() for _ in range(2)]
    for entry in entries:
        cache.reserve(entry, 8192)  # 64 MiB each
        for pool in cache.key_pools + cache.value_pools:
            pool[entry.blocks] = 1.0  # written: its pages are resident now
    grown = _resident_bytes()
    assert grown - before > 100 << 20
    for entry in entries:
        cache.release(entry)
    assert grown - _resident_bytes() > 100 << 20  # handed back to the system
    assert cache.memory_bytes == 0
    assert [pool.data_ptr() for pool in cache.key_pools + cache.value_pools] == addresses
    again = cache.acquire()
    cache.reserve(again, 8192)
    assert all(bool((pool[again.blocks] == 0).all()) for pool in cache.key_pools)  # freed blocks read 0
