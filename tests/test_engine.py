"""The engine's invariants on a tiny random model: cached equals uncached, batch equals single."""

from __future__ import annotations

import pytest
import torch

import ember
from ember.cache import CacheEntry
from ember.engine.sequence import GenerationRequest
from ember.errors import ContextOverflowError, InvalidRequestError
from ember.sampling import SamplingParams
from tests.conftest import make_tiny_hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), "llama", 2, max_position_embeddings=512)
    return ember.load(folder)


def _tokens(handle, prompt, params=GREEDY, entry=None):
    request = GenerationRequest(list(prompt), params, cache_entry=entry)
    outputs = list(handle.engine.generate(request))
    return [o.token_id for o in outputs if o.token_id is not None], outputs[-1]


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 2048, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_next_turn_prefills_only_new_tokens_and_matches_recompute(tiny):
    entry = CacheEntry()
    turn1 = _prompt(1, 30)
    reply1, final1 = _tokens(tiny, turn1, entry=entry)
    assert final1.num_cached_tokens == 0
    turn2 = turn1 + reply1 + _prompt(2, 10)
    reply2, final2 = _tokens(tiny, turn2, entry=entry)
    # Everything but the last reply token (never fed back) is reused.
    assert final2.num_cached_tokens == len(turn1) + len(reply1) - 1
    assert reply2 == _tokens(tiny, turn2)[0]


def test_rollback_truncates_and_matches_recompute(tiny):
    entry = CacheEntry()
    long_prompt = _prompt(3, 40)
    _tokens(tiny, long_prompt, entry=entry)
    shorter = long_prompt[:25] + _prompt(4, 5)  # an edit of an earlier turn
    reply, final = _tokens(tiny, shorter, entry=entry)
    assert final.num_cached_tokens == 25
    assert reply == _tokens(tiny, shorter)[0]


def test_batched_decode_equals_single_runs_with_joins_and_leaves(tiny):
    engine = tiny.engine
    prompts = [_prompt(10 + i, length) for i, length in enumerate([5, 17, 9, 30])]
    lengths = [6, 12, 3, 9]  # sequences finish at different steps and leave the batch
    singles = [
        _tokens(tiny, p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
        for p, n in zip(prompts, lengths)
    ]
    requests = [
        GenerationRequest(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        for p, n in zip(prompts, lengths)
    ]
    collected: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for request in requests[:3]:
        engine.add_request(request)
    steps, max_batch = 0, 0
    while engine.has_unfinished():
        for output in engine.step():
            if output.token_id is not None:
                collected[output.request_id].append(output.token_id)
        max_batch = max(max_batch, len(engine.running))
        steps += 1
        if steps == 2:
            engine.add_request(requests[3])  # joins between steps
    assert [collected[r.request_id] for r in requests] == singles
    assert max_batch >= 3


def test_a_prompt_read_beside_running_streams_rides_in_their_decode_steps(tiny, monkeypatch):
    """Where the model takes prompt rows in a decode step, a waiting prompt's chunks ride in the running
    streams' forward calls (one pass over the weights) instead of forward calls of their own; every
    sequence's tokens are those it gives alone (the ridden prompt's first one from its chunk's last row)."""
    if tiny.model.prompt_rows_per_step == 0:
        pytest.skip("the native operators are unavailable: prompts are read apart")
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    streams, waiting = [_prompt(70, 9), _prompt(71, 14)], _prompt(72, 90)
    alone = [_tokens(tiny, prompt, params)[0] for prompt in [*streams, waiting]]
    fresh = ember.load(tiny.info.path)  # an empty cache: nothing of these prompts kept from the runs alone
    engine, model = fresh.engine, fresh.model
    monkeypatch.setattr(engine, "interleaved_gap_ratio", 1000.0)  # as many rows as a step may hold
    shapes: list[tuple[int, int, int]] = []  # (rows, new tokens per row, distinct slots) of each forward
    forward = model.forward

    def recording_forward(batch, cache):
        shapes.append((batch.batch_size, batch.num_new_tokens, len(set(batch.slots))))
        return forward(batch, cache)

    monkeypatch.setattr(model, "forward", recording_forward)
    requests = [GenerationRequest(prompt, params) for prompt in [*streams, waiting]]
    collected: dict[str, list[int]] = {r.request_id: [] for r in requests}

    def step() -> None:
        for output in engine.step():
            if output.token_id is not None:
                collected[output.request_id].append(output.token_id)

    for request in requests[:2]:
        engine.add_request(request)
    while len(engine.running) < 2:
        step()
    step()  # a decode step alone: what a chunk's share is measured against
    shapes.clear()
    engine.add_request(requests[2])
    while engine.has_unfinished():
        step()
    assert [collected[r.request_id] for r in requests] == alone
    ridden = [rows - slots + 1 for rows, _, slots in shapes if rows > slots]  # chunk rows of each step
    assert ridden == [30, 30, 30]  # the 32 rows a step holds, less the two streams
    assert all(new == 1 for _, new, _ in shapes)  # no forward call of the prompt's own
    assert max(rows for rows, _, _ in shapes) <= model.prompt_rows_per_step


def test_a_failing_decode_step_with_riders_decodes_alone_and_reads_the_prompt_apart(tiny, monkeypatch):
    """A forward call with prompt rows riding that raises changes nothing: the same step decodes alone and
    reads the prompt in a forward call of its own, and every sequence still gives its tokens alone."""
    if tiny.model.prompt_rows_per_step == 0:
        pytest.skip("the native operators are unavailable: prompts are read apart")
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = [_prompt(90, 12), _prompt(91, 40)]
    alone = [_tokens(tiny, prompt, params)[0] for prompt in prompts]
    fresh = ember.load(tiny.info.path)
    engine, model = fresh.engine, fresh.model
    forward, refused = model.forward, []

    def refusing_forward(batch, cache):
        if batch.batch_size > len(set(batch.slots)):  # a prompt chunk rides
            refused.append(batch.batch_size)
            raise RuntimeError("no riders today")
        return forward(batch, cache)

    monkeypatch.setattr(model, "forward", refusing_forward)
    requests = [GenerationRequest(prompt, params) for prompt in prompts]
    collected: dict[str, list[int]] = {r.request_id: [] for r in requests}

    def step() -> None:
        for output in engine.step():
            if output.token_id is not None:
                collected[output.request_id].append(output.token_id)

    engine.add_request(requests[0])
    while not engine.running:
        step()
    step()
    engine.add_request(requests[1])
    while engine.has_unfinished():
        step()
    assert refused  # riding was tried
    assert [collected[r.request_id] for r in requests] == alone


def test_several_short_prompts_ride_in_one_decode_step(tiny, monkeypatch):
    """Short prompts arriving together all ride in the next decode step, within its budget of prompt
    tokens, and each then gives the tokens it gives alone."""
    if tiny.model.prompt_rows_per_step == 0:
        pytest.skip("the native operators are unavailable: prompts are read apart")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [_prompt(80, 11), _prompt(81, 5), _prompt(82, 7), _prompt(83, 6)]
    alone = [_tokens(tiny, prompt, params)[0] for prompt in prompts]
    fresh = ember.load(tiny.info.path)
    engine = fresh.engine
    monkeypatch.setattr(engine, "interleaved_gap_ratio", 1000.0)
    requests = [GenerationRequest(prompt, params) for prompt in prompts]
    collected: dict[str, list[int]] = {r.request_id: [] for r in requests}

    def step() -> list[str]:
        outputs = engine.step()
        for output in outputs:
            if output.token_id is not None:
                collected[output.request_id].append(output.token_id)
        return [output.request_id for output in outputs]

    engine.add_request(requests[0])
    while not engine.running:
        step()
    step()  # a decode step alone
    for request in requests[1:]:
        engine.add_request(request)
    started = step()
    assert {r.request_id for r in requests[1:]} <= set(started)  # 5 + 7 + 6 rows beside one stream
    assert len(engine.running) == 4
    while engine.has_unfinished():
        step()
    assert [collected[r.request_id] for r in requests] == alone


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tiny):
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=10, ignore_eos=True) for seed in (1, 2)]
    prompts = [_prompt(20, 8), _prompt(21, 13)]
    alone = [_tokens(tiny, p, s)[0] for p, s in zip(prompts, params)]
    requests = [GenerationRequest(p, s) for p, s in zip(prompts, params)]
    for request in requests:
        tiny.engine.add_request(request)
    together: dict[str, list[int]] = {r.request_id: [] for r in requests}
    while tiny.engine.has_unfinished():
        for output in tiny.engine.step():
            if output.token_id is not None:
                together[output.request_id].append(output.token_id)
    assert [together[r.request_id] for r in requests] == alone


def test_lru_eviction_under_budget_and_transparent_rebuild(tmp_path):
    folder = make_tiny_hf_model(tmp_path, "llama", 2, max_position_embeddings=256)
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # k+v, layers, kv heads, head_dim, float32
    handle = ember.load(folder, cache_memory_mib=1)  # 1 MiB: 32 blocks of 64 tokens
    cache = handle.engine.kv_cache
    assert cache.bytes_per_token == bytes_per_token
    entries = [CacheEntry() for _ in range(12)]
    prompts = [_prompt(30 + i, 150) for i in range(12)]  # three blocks each: 36 blocks wanted
    for entry, prompt in zip(entries, prompts):
        _tokens(handle, prompt, entry=entry)
    assert cache.memory_bytes <= 1 << 20
    assert cache.num_evictions > 0
    assert not entries[0].resident and entries[-1].resident  # least recently used went first
    # An evicted session's next turn recomputes from scratch and gives the same answer.
    reply, final = _tokens(handle, prompts[0], entry=entries[0])
    assert final.num_cached_tokens == 0
    assert reply == _tokens(handle, prompts[0])[0]


def test_a_long_prompt_takes_blocks_for_its_length_and_gives_them_back(tiny):
    prompt = _prompt(40, 300)  # five blocks of 64
    cached = tiny.engine.kv_cache
    reply, _ = _tokens(tiny, prompt)
    entry = next(e for e in cached.entries_by_slot.values() if e.token_ids[:300] == prompt)  # kept, idle
    assert not entry.pinned and len(entry.blocks) == -(-len(entry.token_ids) // 64)
    held = {block for e in cached.entries_by_slot.values() for block in e.blocks}
    assert cached.memory_bytes == len(held) * cached.bytes_per_block
    own = len(entry.blocks)
    cached.release(entry)
    assert cached.memory_bytes == (len(held) - own) * cached.bytes_per_block
    assert torch.equal(tiny.logits(prompt)[-1].argmax(), torch.tensor(reply[0]))


def test_prompt_longer_than_context_is_an_error_that_changes_nothing(tiny):
    waiting_before = len(tiny.engine.waiting)
    with pytest.raises(ContextOverflowError, match="512"):
        tiny.engine.add_request(GenerationRequest(_prompt(50, 600), GREEDY))
    assert len(tiny.engine.waiting) == waiting_before
    with pytest.raises(InvalidRequestError):
        tiny.engine.add_request(GenerationRequest([], GREEDY))
    with pytest.raises(InvalidRequestError):
        tiny.engine.add_request(GenerationRequest([5, 99999], GREEDY))


def test_generation_stops_at_the_context_end(tiny):
    prompt = _prompt(60, 505)
    tokens, final = _tokens(tiny, prompt, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    assert len(tokens) == 512 - 505
    assert final.finish_reason == "length"


def test_abandoned_stream_frees_its_slot(tiny):
    cache = tiny.engine.kv_cache
    stream = tiny.engine.generate(GenerationRequest(_prompt(70, 10), SamplingParams(max_tokens=50)))
    next(stream)
    stream.close()
    assert not tiny.engine.has_unfinished()
    assert all(not entry.pinned for entry in cache.entries_by_slot.values())


def test_running_out_of_cache_preempts_and_resumes_with_the_same_text(tmp_path):
    folder = make_tiny_hf_model(tmp_path, "llama", 2, max_position_embeddings=1024)
    handle = ember.load(folder, cache_memory_mib=1)  # 2048 tokens: four sequences cannot all reach 600
    params = SamplingParams(temperature=0.0, max_tokens=580, ignore_eos=True)
    prompts = [_prompt(80 + i, 20) for i in range(4)]
    requests = [GenerationRequest(prompt, params) for prompt in prompts]
    for request in requests:
        handle.engine.add_request(request)
    together: dict[str, list[int]] = {r.request_id: [] for r in requests}
    while handle.engine.has_unfinished():
        for output in handle.engine.step():
            if output.token_id is not None:
                together[output.request_id].append(output.token_id)
    assert handle.engine.num_preemptions > 0
    assert handle.engine.kv_cache.memory_bytes <= 1 << 20
    alone = [_tokens(handle, prompt, params)[0] for prompt in prompts]
    assert [together[r.request_id] for r in requests] == alone


def test_interleaved_generate_iterators_batch_together_and_match_single_runs(tiny):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = [_prompt(90, 7), _prompt(91, 15)]
    alone = [_tokens(tiny, prompt, params)[0] for prompt in prompts]
    streams = [tiny.engine.generate(GenerationRequest(prompt, params)) for prompt in prompts]
    collected: list[list[int]] = [[], []]
    largest_batch = 0
    finished = [False, False]
    while not all(finished):
        for index, stream in enumerate(streams):
            if finished[index]:
                continue
            output = next(stream)
            largest_batch = max(largest_batch, len(tiny.engine.running))
            if output.token_id is not None:
                collected[index].append(output.token_id)
            finished[index] = output.finished
    assert collected == alone
    assert largest_batch == 2  # the two requests decoded in the same steps
    assert not tiny.engine.has_unfinished() and not tiny.engine._sinks


def test_the_prompt_budget_beside_running_streams_follows_the_measured_costs(tiny):
    """While streams decode, a step reads about `interleaved_gap_ratio` decode steps' worth of prompt."""
    engine = tiny.engine
    engine._decode_seconds = engine._prefill_token_seconds = None
    assert engine._interleaved_budget() == engine.interleaved_prefill_chunk  # nothing measured yet
    engine._decode_seconds, engine._prefill_token_seconds = 0.010, 0.001  # a step, and a prompt token
    assert engine._interleaved_budget() == 15  # 1.5 x 10 ms of prompt at 1 ms a token
    engine._prefill_token_seconds = 0.1
    assert engine._interleaved_budget() == 8  # never below a chunk worth a forward call of its own
    engine._prefill_token_seconds = 1e-6
    assert engine._interleaved_budget() == engine.prefill_chunk_size  # nor above the plain chunk
    # Measured for real: a prompt read beside a running stream updates both averages.
    engine._decode_seconds = engine._prefill_token_seconds = None
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    running = GenerationRequest(_prompt(60, 10), params)
    engine.add_request(running)
    while not engine.running:
        engine.step()
    engine.add_request(GenerationRequest(_prompt(61, 100), GREEDY))
    while engine.has_unfinished():
        engine.step()
    assert engine._decode_seconds > 0 and engine._prefill_token_seconds > 0
