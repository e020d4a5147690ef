"""One request's failure never touches another; the engine is safe from many threads.

Each test is a scenario a server meets when strangers share one engine: a
degenerate setting, invalid logits, a forward pass that raises, an abort
from another thread, two requests on one cache entry, a duplicate id, cache
pressure, and several threads generating on one handle at once.
"""

from __future__ import annotations

import threading

import pytest
import torch

import ember
from ember.cache import CacheEntry
from ember.constraints import constraint_from_options
from ember.engine.sequence import FailureKind, GenerationRequest, SequenceStatus
from ember.engine.stop_strings import end_marker_stop_strings
from ember.errors import InvalidRequestError
from ember.sampling import SamplingParams
from tests.conftest import STORY_MODEL, make_tiny_hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
POISON = 1999  # a prompt holding this token id makes the wrapped forward misbehave


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), "llama", 2, max_position_embeddings=512)
    return ember.load(folder)


@pytest.fixture(scope="module")
def story():
    return ember.load(STORY_MODEL)


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 1900, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(handle, prompt, params=GREEDY):
    outputs = list(handle.engine.generate(GenerationRequest(list(prompt), params)))
    return [o.token_id for o in outputs if o.token_id is not None], outputs[-1]


def _drain(engine, requests) -> dict[str, list]:
    outputs: dict[str, list] = {r.request_id: [] for r in requests}
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    assert not engine.has_unfinished(), "the engine did not finish its requests"
    return outputs


def _tokens(outputs) -> list[int]:
    return [o.token_id for o in outputs if o.token_id is not None]


class _Poisoned:
    """Wraps a model's forward: batches touching a poisoned sequence raise or return NaN logits."""

    def __init__(self, handle, mode: str):
        self.engine = handle.engine
        self.model = handle.model
        self.mode = mode
        self.original = self.model.forward

    def __enter__(self):
        def forward(batch, kv_cache):
            poisoned_slots = {
                s.cache_entry.slot
                for s in [*self.engine.waiting, *self.engine.running]
                if POISON in s.prompt_token_ids and s.cache_entry is not None
            }
            rows = [i for i, slot in enumerate(batch.slots) if slot in poisoned_slots]
            if rows and self.mode == "raise":
                raise RuntimeError("injected failure")
            logits = self.original(batch, kv_cache)
            if rows and self.mode in ("nan", "huge"):  # out of place: the logits may be inference tensors
                scale = torch.ones(logits.shape[0], *[1] * (logits.dim() - 1))
                # huge: finite, ordered as before, but a row's sum overflows
                scale[rows] = float("nan") if self.mode == "nan" else 1e36
                logits = logits * scale
            return logits

        self.model.forward = forward
        return self

    def __exit__(self, *exc_info):
        self.model.forward = self.original


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_a_failing_sequence_ends_alone_and_the_others_are_unchanged(tiny, mode):
    healthy = [_prompt(1, 9), _prompt(2, 14)]
    alone = [_run(tiny, p)[0] for p in healthy]
    poisoned = [POISON, *_prompt(3, 6)]
    requests = [GenerationRequest(p, GREEDY) for p in (healthy[0], poisoned, healthy[1])]
    with _Poisoned(tiny, mode):
        for request in requests:
            tiny.engine.add_request(request)
        outputs = _drain(tiny.engine, requests)
    failed = outputs[requests[1].request_id][-1]
    assert failed.finish_reason == "error" and failed.error
    assert failed.error_kind is FailureKind.ENGINE  # ember's fault (the model's numbers), not the request's
    assert [_tokens(outputs[requests[i].request_id]) for i in (0, 2)] == alone
    assert all(not e.pinned for e in tiny.engine.kv_cache.entries_by_slot.values())


def test_huge_finite_logits_are_still_chosen_from_greedily(tiny):
    """The greedy batch's quick validity check (a finite sum per row) overflows on huge finite logits; such
    a row takes the general path and still gets its argmax, beside rows that took the quick one."""
    healthy = _prompt(9, 7)
    poisoned = [POISON, *_prompt(10, 6)]
    expected = [_run(tiny, p)[0] for p in (healthy, poisoned)]
    requests = [GenerationRequest(p, GREEDY) for p in (healthy, poisoned)]
    with _Poisoned(tiny, "huge"):
        for request in requests:
            tiny.engine.add_request(request)
        outputs = _drain(tiny.engine, requests)
    assert [outputs[r.request_id][-1].finish_reason for r in requests] == ["length", "length"]
    assert [_tokens(outputs[r.request_id]) for r in requests] == expected


def test_a_sequence_failing_in_the_decode_batch_ends_alone(tiny):
    """The poison appears only after admission: the batched forward raises, each is retried alone."""
    prompts = [_prompt(4, 8), _prompt(5, 11), _prompt(6, 5)]
    alone = [_run(tiny, p)[0] for p in prompts]
    requests = [GenerationRequest(p, GREEDY) for p in prompts]
    for request in requests:
        tiny.engine.add_request(request)
    collected: dict[str, list] = {r.request_id: [] for r in requests}
    for _ in range(3):
        for output in tiny.engine.step():
            collected[output.request_id].append(output)
    victim = next(s for s in tiny.engine.running if s.request_id == requests[1].request_id)
    victim.prompt_token_ids.append(POISON)  # the wrapper now sees it in every batch holding its slot
    with _Poisoned(tiny, "raise"):
        for request_id, outputs in _drain(tiny.engine, requests).items():
            collected[request_id].extend(outputs)
    assert collected[requests[1].request_id][-1].finish_reason == "error"
    assert collected[requests[1].request_id][-1].error_kind is FailureKind.ENGINE
    assert [_tokens(collected[requests[i].request_id]) for i in (0, 2)] == [alone[0], alone[2]]


def test_a_prefill_that_always_fails_does_not_block_the_queue(tiny):
    behind = _prompt(7, 10)
    alone = _run(tiny, behind)[0]
    with _Poisoned(tiny, "raise"):
        failing = tiny.engine.generate(GenerationRequest([POISON, *_prompt(8, 600 - 100)], GREEDY))
        finals = list(failing)
        assert finals[-1].finish_reason == "error" and "prompt" in finals[-1].error
        assert finals[-1].error_kind is FailureKind.ENGINE
        assert _run(tiny, behind)[0] == alone


def test_failures_say_whose_fault_they_are(story):
    """A front end answers by the kind: a constraint the vocabulary cannot follow mid-reply, or bans
    that leave the constraint nothing, are the request's own doing (a 4xx), never ember's 500."""
    dead_end = constraint_from_options(story.tokenizer, regex="a€")  # no token spells the euro sign
    request = GenerationRequest(story.encode("Once"), GREEDY, constraint=dead_end)
    outputs = list(story.engine.generate(request))
    assert outputs[0].text == "a"  # the failure comes mid-reply, after the first token
    assert outputs[-1].finish_reason == "error" and outputs[-1].error_kind is FailureKind.CONSTRAINT
    starts_with_a = [i for i in range(story.engine.vocab_size) if story.tokenizer.decode([i]).startswith("a")]
    params = SamplingParams(temperature=0.5, max_tokens=8, banned_token_ids=starts_with_a)
    request = GenerationRequest(
        story.encode("Once"), params, constraint=constraint_from_options(story.tokenizer, regex="a+")
    )
    final = list(story.engine.generate(request))[-1]
    assert final.finish_reason == "error" and final.error_kind is FailureKind.SAMPLING
    assert "leave no token" in final.error
    assert _run(story, story.encode("Once"))[1].finish_reason == "length"  # the engine goes on


def test_a_tiny_temperature_is_greedy_beside_a_normal_request(story):
    prompt = story.encode("Once upon a time")
    greedy = _run(story, prompt)[0]
    requests = [
        GenerationRequest(prompt, SamplingParams(temperature=1e-40, max_tokens=12, ignore_eos=True)),
        GenerationRequest(prompt, SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True)),
    ]
    for request in requests:
        story.engine.add_request(request)
    outputs = _drain(story.engine, requests)
    assert _tokens(outputs[requests[0].request_id]) == greedy
    assert outputs[requests[1].request_id][-1].finish_reason == "length"


def test_abort_from_another_thread_ends_the_iterator(story):
    request = GenerationRequest(
        story.encode("Once upon a time"), SamplingParams(max_tokens=400, ignore_eos=True)
    )
    stream = story.engine.generate(request)
    first = next(stream)
    threading.Thread(target=story.engine.abort, args=(request.request_id,)).start()
    rest = list(stream)  # must end by itself
    assert first.finish_reason is None and rest[-1].finish_reason == "abort"
    assert len(rest) < 400
    assert not story.engine.has_unfinished()


def test_abort_releases_text_held_back_by_the_stop_matcher(story):
    prompt = story.encode("Once upon a time")
    solo = list(story.engine.generate(GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=8))))
    text = "".join(o.text for o in solo)
    tail = text[-3:]  # held back as the start of a stop string that never completes
    params = SamplingParams(temperature=0, max_tokens=40, stop=[tail + "\x00never"])
    request = GenerationRequest(prompt, params)
    pieces = []
    for output in story.engine.generate(request):
        pieces.append(output)
        if output.num_generated_tokens == 8:
            story.engine.abort(request.request_id)
    assert pieces[-1].finish_reason == "abort"
    assert "".join(o.text for o in pieces) == text


def test_one_cache_entry_has_one_writer_and_request_ids_are_unique(tiny):
    entry = CacheEntry()
    first = GenerationRequest(_prompt(9, 8), GREEDY, cache_entry=entry)
    tiny.engine.add_request(first)
    with pytest.raises(InvalidRequestError, match="in use"):
        tiny.engine.add_request(GenerationRequest(_prompt(10, 8), GREEDY, cache_entry=entry))
    with pytest.raises(InvalidRequestError, match="already running"):
        tiny.engine.add_request(GenerationRequest(_prompt(11, 8), GREEDY, request_id=first.request_id))
    outputs = _drain(tiny.engine, [first])
    assert outputs[first.request_id][-1].finish_reason == "length"
    # Once finished, the entry and the id are free again.
    again = GenerationRequest(_prompt(9, 8), GREEDY, cache_entry=entry, request_id=first.request_id)
    assert list(tiny.engine.generate(again))[-1].finish_reason == "length"


def test_growth_past_the_budget_preempts_instead_of_failing(tmp_path):
    folder = make_tiny_hf_model(tmp_path, "llama", 2, max_position_embeddings=2048)
    handle = ember.load(folder, cache_memory_mib=1)  # exactly one full context: 32 blocks of 64 tokens
    long_params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    short_params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
    long_prompt, short_prompt = _prompt(12, 1800), _prompt(13, 10)  # 32 blocks and 3 at their ends
    alone = [_run(handle, long_prompt, long_params)[0], _run(handle, short_prompt, short_params)[0]]
    handle = ember.load(folder, cache_memory_mib=1)  # a fresh cache
    requests = [GenerationRequest(long_prompt, long_params), GenerationRequest(short_prompt, short_params)]
    handle.engine.add_request(requests[0])
    first = handle.engine.step()
    handle.engine.add_request(requests[1])  # admitted while the long one still fits beside it
    outputs = _drain(handle.engine, requests)
    outputs[requests[0].request_id][:0] = first
    assert [_tokens(outputs[r.request_id]) for r in requests] == alone
    assert all(outputs[r.request_id][-1].finish_reason == "length" for r in requests)
    assert handle.engine.num_preemptions > 0


def test_threads_generating_on_one_handle_each_get_their_own_text(story):
    prompts = ["Once upon a time", "The little dog"]
    params = dict(temperature=0, max_tokens=30)
    solo = ["".join(story.generate(p, **params)) for p in prompts]
    for _ in range(10):
        results: dict[int, str] = {}
        errors: list[BaseException] = []

        def work(index: int, results=results, errors=errors) -> None:
            try:
                results[index] = "".join(story.generate(prompts[index], **params))
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a generating thread hung"
        assert not errors
        assert [results[0], results[1]] == solo


def test_the_loop_thread_serves_generate_from_other_threads(tiny):
    prompt = _prompt(14, 12)
    alone = _run(tiny, prompt)[0]
    tiny.engine.start()
    try:
        assert tiny.engine.loop_running
        assert _run(tiny, prompt)[0] == alone
    finally:
        tiny.engine.stop()
    assert not tiny.engine.loop_running


def test_end_markers_stop_as_text_only_when_they_look_like_control_tokens(story):
    assert end_marker_stop_strings(story.tokenizer) == ["<|end_story|>"]

    class MarkupEnd:
        eos_token_ids = [2]

        def decode(self, token_ids):
            return "</s>"

    assert end_marker_stop_strings(MarkupEnd()) == []


def test_a_sequence_joins_running_only_with_its_first_token(tiny):
    request = GenerationRequest(_prompt(15, 400), GREEDY)
    engine = tiny.engine
    chunk, engine.prefill_chunk_size = engine.prefill_chunk_size, 128
    try:
        sequence = engine.add_request(request)
        engine.step()
        assert sequence.status is SequenceStatus.PREFILLING and sequence not in engine.running
        outputs = _drain(engine, [request])
        assert _tokens(outputs[request.request_id]) == _run(tiny, request.prompt_token_ids)[0]
    finally:
        engine.prefill_chunk_size = chunk
