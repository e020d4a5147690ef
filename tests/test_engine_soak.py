"""A seeded soak of one engine: 200 strangers' requests with aborts and failures, under a tiny budget.

Afterwards every request has finished with a reason, every one that neither
failed nor was aborted equals its output when run alone (same seed), and the
cache holds no pinned entry, no leaked slot and stays inside its budget.
"""

from __future__ import annotations

import random

import pytest

import ember
from ember.engine.sequence import GenerationRequest
from ember.sampling import SamplingParams
from tests.conftest import STORY_MODEL
from tests.test_engine_isolation import POISON, _Poisoned

pytestmark = pytest.mark.slow
NUM_REQUESTS = 200


def _random_request(
    rng: random.Random, shared_prefix: list[int], index: int
) -> tuple[GenerationRequest, str]:
    long = rng.random() < 0.15  # grows past the cache's capacity while others run: preemption
    prompt = [
        rng.randrange(3, 1900) for _ in range(rng.randrange(180, 250) if long else rng.randrange(1, 60))
    ]
    if rng.random() < 0.3:
        prompt = shared_prefix + prompt  # many users, one system prompt: the prefix cache's case
    kind = rng.choices(["normal", "abort", "fail"], weights=[85, 10, 5])[0]
    if kind == "fail":
        prompt.insert(rng.randrange(len(prompt) + 1), POISON)
    params = SamplingParams(
        temperature=rng.choice([0.0, 0.0, 0.7, 1.0, 1e-30]),
        top_k=rng.choice([0, 5, 40]),
        top_p=rng.choice([1.0, 0.9, 0.5]),
        min_p=rng.choice([0.0, 0.05]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3]),
        presence_penalty=rng.choice([0.0, 0.5]),
        max_tokens=rng.randrange(60, 120) if long else rng.randrange(1, 40),
        stop=rng.choice([[], [], ["."], ["the", "\n"]]),
        seed=index,
        ignore_eos=rng.random() < 0.5,
    )
    return GenerationRequest(prompt, params, request_id=f"soak-{index}"), kind


def test_two_hundred_requests_through_one_engine_under_a_tiny_budget():
    handle = ember.load(STORY_MODEL, cache_memory_mib=1)  # 1,024 tokens of cache for everyone
    engine = handle.engine
    rng = random.Random(20261202)
    shared_prefix = [rng.randrange(3, 1900) for _ in range(24)]
    plans = [_random_request(rng, shared_prefix, index) for index in range(NUM_REQUESTS)]
    abort_after = {r.request_id: rng.randrange(0, 6) for r, kind in plans if kind == "abort"}
    outputs: dict[str, list] = {r.request_id: [] for r, _ in plans}
    pending = list(plans)
    submitted_at: dict[str, int] = {}
    steps = queued_behind_running = 0
    with _Poisoned(handle, "raise"):
        while pending or engine.has_unfinished():
            for _ in range(min(len(pending), rng.randrange(0, 6))):
                request = pending.pop(0)[0]
                engine.add_request(request)
                submitted_at[request.request_id] = steps
            for output in engine.step():
                outputs[output.request_id].append(output)
            queued_behind_running += bool(engine.running and engine.waiting)
            for request_id, after in abort_after.items():
                if submitted_at.get(request_id, -1) + after == steps:
                    engine.abort(request_id)
            steps += 1
            assert steps < 20_000, "the soak did not finish"

    for request, kind in plans:
        final = outputs[request.request_id][-1]
        assert final.finished, request.request_id
        if kind == "fail":
            assert final.finish_reason == "error" and final.error
        elif kind == "normal":
            assert final.finish_reason in ("stop", "length"), (request.request_id, final)
    assert queued_behind_running > 0  # the budget was tight enough to make requests wait
    assert any(o[-1].num_cached_tokens >= len(shared_prefix) for o in outputs.values())  # prefixes shared
    assert all(not entry.pinned for entry in engine.kv_cache.entries_by_slot.values())
    assert all(entry.slot == slot for slot, entry in engine.kv_cache.entries_by_slot.items())
    assert engine.kv_cache.memory_bytes <= engine.kv_cache.memory_budget_bytes
    assert not engine._active_ids and not engine._sinks and not engine._active_entries

    for request, kind in plans:
        if kind != "normal":
            continue
        alone = list(engine.generate(GenerationRequest(request.prompt_token_ids, request.sampling_params)))
        together = outputs[request.request_id]
        assert [o.token_id for o in together] == [o.token_id for o in alone], request.request_id
        assert "".join(o.text for o in together) == "".join(o.text for o in alone), request.request_id
