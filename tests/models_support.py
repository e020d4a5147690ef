"""Shared checks for the architectures beyond Llama: tiny random transformers models as references.

Each architecture's test builds a tiny config with transformers' own config class,
saves a random-weight model as safetensors, loads it with ember and compares
logits over a prefill plus cached decode steps (one sequence, and two sequences
of different lengths in one batch) and greedy output with transformers float32.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

import ember
from ember.engine.sequence import GenerationRequest
from ember.models.batch import ForwardBatch
from ember.sampling import SamplingParams
from tests.conftest import STORY_MODEL

VOCAB = 2048  # the story tokenizer's
TOLERANCE = 1e-4


def make_tiny_model(folder: Path, config_class: str, seed: int = 0, **settings) -> Path:
    """A random-weight transformers model of `config_class` (e.g. "Qwen3Config") saved as safetensors,
    with the story tokenizer; weights larger than the default init so wrong math shows."""
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    base.update(settings)
    config = getattr(transformers, config_class)(**base)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.2)
            else:
                parameter.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORY_MODEL / name, folder / name)
    return folder


def reference_model(folder: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def reference_logits(reference: transformers.PreTrainedModel, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([token_ids])).logits[0]  # (positions, vocab)


def random_tokens(count: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefill_then_decode_logits(handle: ember.ModelHandle, token_ids: list[int], prefill: int) -> torch.Tensor:
    """Logits at every position: one prefill call for the first `prefill` tokens, then one call per token."""
    cache = handle.engine.kv_cache
    entry = cache.acquire()
    try:
        cache.reserve(entry, len(token_ids))
        batch = ForwardBatch(torch.tensor([token_ids[:prefill]]), [0], [entry.slot], all_logits=True)
        rows = [handle.model.forward(batch, cache)[0]]
        for position in range(prefill, len(token_ids)):
            step = ForwardBatch(torch.tensor([[token_ids[position]]]), [position], [entry.slot])
            rows.append(handle.model.forward(step, cache)[0])
        return torch.cat(rows)
    finally:
        cache.release(entry)


def batched_logits(handle: ember.ModelHandle, first: list[int], second: list[int], prefill: int) -> list:
    """Two sequences in one cache: a (2, prefill) prefill, `first` one token ahead alone, then (2, 1)
    decode steps at different positions (ragged). Logits per sequence for positions prefill - 1 onwards."""
    cache = handle.engine.kv_cache
    entries = [cache.acquire(), cache.acquire()]
    slots = [entry.slot for entry in entries]
    try:
        for entry, tokens in zip(entries, (first, second)):
            cache.reserve(entry, len(tokens) + 1)
        batch = ForwardBatch(torch.tensor([first[:prefill], second[:prefill]]), [0, 0], slots)
        logits = handle.model.forward(batch, cache)[:, -1]  # (2, vocab)
        rows = [[logits[0]], [logits[1]]]
        ahead = ForwardBatch(torch.tensor([[first[prefill]]]), [prefill], slots[:1])
        rows[0].append(handle.model.forward(ahead, cache)[0, -1])
        steps = min(len(first) - prefill - 1, len(second) - prefill)
        for step in range(steps):
            positions = [prefill + 1 + step, prefill + step]
            tokens = torch.tensor([[first[positions[0]]], [second[positions[1]]]])
            logits = handle.model.forward(ForwardBatch(tokens, positions, slots), cache)[:, -1]
            rows[0].append(logits[0])
            rows[1].append(logits[1])
        return [torch.stack(row) for row in rows]
    finally:
        for entry in entries:
            cache.release(entry)


def greedy_ember(handle: ember.ModelHandle, prompt_ids: list[int], count: int) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=count, ignore_eos=True)
    outputs = handle.engine.generate(GenerationRequest(prompt_ids, params))
    return [output.token_id for output in outputs if output.token_id is not None]


def greedy_reference(reference: transformers.PreTrainedModel, prompt_ids: list[int], count: int) -> list[int]:
    generated = reference.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=count,
        min_new_tokens=count,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return generated[0, len(prompt_ids) :].tolist()


def check_against_transformers(folder: Path, handle: ember.ModelHandle, length: int = 40) -> None:
    """The whole comparison: cached logits alone and batched within TOLERANCE, and 24 greedy tokens."""
    reference = reference_model(folder)
    tokens = random_tokens(length, seed=1)
    expected = reference_logits(reference, tokens)
    assert expected.std() > 0.1  # the comparison means something
    ours = prefill_then_decode_logits(handle, tokens, prefill=length // 3)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < TOLERANCE

    other = random_tokens(length - 5, seed=2)
    expected_other = reference_logits(reference, other)
    prefill = length // 4
    first, second = batched_logits(handle, tokens, other, prefill)
    assert (first - expected[prefill - 1 : prefill - 1 + len(first)]).abs().max().item() < TOLERANCE
    assert (second - expected_other[prefill - 1 : prefill - 1 + len(second)]).abs().max().item() < TOLERANCE

    prompt = [1, 50, 300, 700, 12]
    assert greedy_ember(handle, prompt, 24) == greedy_reference(reference, prompt, 24)
