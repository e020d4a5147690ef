"""The fused native decode operators against the PyTorch operators they replace, and the model's fallback."""

from __future__ import annotations

import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

import ember
from ember import native_ops, ops
from ember.models.batch import ForwardBatch
from ember.quant import native_float
from tests.conftest import break_native_build, make_tiny_hf_model

LIBRARY = native_ops.load()
needs_library = pytest.mark.skipif(
    LIBRARY is None, reason=f"native operators unavailable: {native_ops.LIBRARY.failure_reason}"
)


@pytest.mark.skipif(shutil.which("g++") is None or sys.platform != "linux", reason="no g++ on Linux here")
def test_the_operator_library_builds_where_a_compiler_exists():
    """A compile error must fail a test, not quietly move every model to the slow PyTorch path."""
    assert LIBRARY is not None, native_ops.LIBRARY.failure_reason


@pytest.mark.skipif(shutil.which("g++") is None or sys.platform != "linux", reason="no g++ on Linux here")
def test_every_kernel_source_file_builds():
    """The int4, int8 and float kernels read their C++ from files (with the tile kernels' shared header
    written in): each must compile, or its layers would quietly fall back to PyTorch."""
    from ember.quant import native_float, native_int4, native_int8

    for module in (native_int4, native_int8, native_float):
        assert '#include "' not in module.LIBRARY.source  # the local header is inlined, not left to -I
        assert module.load() is not None or "CPU lacks" in (module.LIBRARY.failure_reason or ""), (
            module.LIBRARY.failure_reason
        )


def test_read_source_writes_local_headers_in_place(tmp_path):
    from ember.native_build import read_source

    (tmp_path / "shared.h").write_text("#pragma once\nint shared() { return 1; }\n")
    (tmp_path / "kernel.cpp").write_text(
        '#include <cstdint>\n#include "shared.h"\nint kernel() { return 2; }\n'
    )
    assert read_source(tmp_path / "kernel.cpp") == (
        "#include <cstdint>\nint shared() { return 1; }\nint kernel() { return 2; }\n"
    )


@needs_library
@pytest.mark.parametrize("dim", [576, 70])  # 70: a tail past the last full vector
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_residual_add_then_rms_norm(dim, with_delta):
    generator = torch.Generator().manual_seed(dim)
    hidden = torch.randn(3, dim, generator=generator) * 4
    delta = torch.randn(3, dim, generator=generator)
    weight = torch.randn(dim, generator=generator)
    expected_hidden = hidden + delta if with_delta else hidden.clone()
    expected = ops.rms_norm(expected_hidden, weight, 1e-5)
    out = torch.empty(3, dim)
    result = native_ops.add_rms_norm(LIBRARY, hidden, delta if with_delta else None, weight, 1e-5, out)
    assert result is out
    assert torch.equal(hidden, expected_hidden)  # the residual add happened in place, exactly
    assert (out - expected).abs().max().item() < 1e-5


@needs_library
@pytest.mark.parametrize("inner", [1536, 100])
def test_silu_mul_matches_swiglu(inner):
    gate_up = torch.randn(3, 2 * inner, generator=torch.Generator().manual_seed(inner)) * 6
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -20.0])  # saturated and zero gates
    gate, up = gate_up.chunk(2, dim=-1)
    out = native_ops.silu_mul(LIBRARY, gate_up, torch.empty(3, inner))
    assert (out - ops.swiglu(gate, up)).abs().max().item() < 1e-5


def _reference_decode_attention(qkv, rotations, key_cache, value_cache, slots, positions, num_heads, window):
    """What the model's PyTorch path does: rotate, cache write, masked grouped-query attention."""
    batch_size = qkv.shape[0]
    _, num_kv_heads, _, head_dim = key_cache.shape
    rows = qkv.view(batch_size, 1, num_heads + 2 * num_kv_heads, head_dim)
    rotated = ops.apply_rope_pairs(rows[:, :, : num_heads + num_kv_heads], rotations)
    query = rotated[:, :, :num_heads].transpose(1, 2)  # (batch, heads, 1, head_dim)
    key = rotated[:, :, num_heads:].transpose(1, 2)  # (batch, kv_heads, 1, head_dim)
    value = rows[:, :, num_heads + num_kv_heads :].transpose(1, 2)
    for row, (slot, position) in enumerate(zip(slots, positions)):
        key_cache[slot, :, position : position + 1] = key[row]
        value_cache[slot, :, position : position + 1] = value[row]
    num_keys = max(positions) + 1
    keys, values = key_cache[slots, :, :num_keys], value_cache[slots, :, :num_keys]
    key_lengths = torch.tensor([position + 1 for position in positions])
    attended = ops.attention(query, keys, values, torch.tensor(positions).view(-1, 1), key_lengths, window)
    return attended.transpose(1, 2).reshape(batch_size, num_heads * head_dim)


@needs_library
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 2)])  # GQA ratios 1, 3, 4
@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("head_dim", [64, 32, 128, 256, 24])  # 256: Gemma 3; 24: the portable loop
@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize(
    "slots,positions",
    [
        ([2, 0, 3], [5, 40, 17]),  # a ragged decode batch; in the reference, scattered slots
        ([1, 1, 1, 1, 1, 1, 0, 3], [26, 27, 28, 29, 30, 31, 40, 9]),  # a 6-token chunk riding in a step
        ([3, 3, 0, 0, 0, 0, 0], [7, 8, 46, 47, 48, 49, 50]),  # two chunks, one across a block boundary
    ],
)
def test_decode_attention_matches_rotate_store_and_attend(
    monkeypatch, num_heads, num_kv_heads, window, head_dim, threaded, slots, positions
):
    """Rows of one sequence at consecutive positions attend together (four rows per task): the same
    results as each row alone, each seeing its own keys and those of the rows before it."""
    # threaded: every batch takes the OpenMP path; else the single-thread loop
    monkeypatch.setattr(native_ops, "PARALLEL_MIN_KEYS", 0 if threaded else 1 << 40)
    generator = torch.Generator().manual_seed(num_heads * 100 + head_dim)
    rows = len(slots)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(rows, width, generator=generator)
    key_cache = torch.randn(4, num_kv_heads, 64, head_dim, generator=generator)  # stale past contents
    value_cache = torch.randn(4, num_kv_heads, 64, head_dim, generator=generator)
    inverse_frequencies, _ = ops.rope_inverse_frequencies(head_dim, 10000.0)
    rotations = ops.rope_rotations(inverse_frequencies, torch.tensor(positions).view(-1, 1))  # (rows, 1, d/2)
    # The same pasts in a paged pool of 16-position blocks, each sequence's blocks out of order
    block_size, num_blocks = 16, 20
    slot_tables = torch.randperm(num_blocks - 1, generator=generator)[:16].view(4, 4) + 1  # (4 slots, 4)
    tables = slot_tables[slots]  # (rows, 4): rows of one sequence share its blocks
    key_pool = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator)
    value_pool = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator)
    for slot in sorted(set(slots)):
        for index, block in enumerate(slot_tables[slot].tolist()):
            span = slice(index * block_size, (index + 1) * block_size)
            key_pool[block] = key_cache[slot, :, span].transpose(0, 1)
            value_pool[block] = value_cache[slot, :, span].transpose(0, 1)
    expected_keys, expected_values = key_cache.clone(), value_cache.clone()
    expected = _reference_decode_attention(
        qkv, rotations, expected_keys, expected_values, slots, positions, num_heads, window
    )
    expected_key_pool, expected_value_pool = key_pool.clone(), value_pool.clone()
    for row, (slot, position) in enumerate(zip(slots, positions)):
        block, offset = tables[row, position // block_size], position % block_size
        expected_key_pool[block, offset] = expected_keys[slot, :, position]
        expected_value_pool[block, offset] = expected_values[slot, :, position]
    layout = SimpleNamespace(num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size)
    attend = native_ops.DecodeAttention(
        LIBRARY, torch.view_as_real(rotations), tables, torch.tensor(positions), num_heads, layout, window
    )
    out = attend(qkv, key_pool, value_pool)
    assert out.shape == (rows, num_heads * head_dim)
    assert (key_pool - expected_key_pool).abs().max().item() < 1e-5  # rotated keys in their block and row
    assert torch.equal(value_pool, expected_value_pool)  # values copied, everything else untouched
    assert expected.std() > 0.1
    assert (out - expected).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("llama"), "llama", 2)


def _decode_logits(handle: ember.ModelHandle, token_ids: list[int]) -> torch.Tensor:
    """Prefill all but the last 6 tokens of two sequences, then decode those 6 as (2, 1) batches."""
    model, cache = handle.model, handle.engine.kv_cache
    entries = [cache.acquire(), cache.acquire()]
    prompts = [token_ids, token_ids[3:]]  # different lengths: a ragged decode batch
    try:
        for entry in entries:
            cache.reserve(entry, len(token_ids))
        for entry, prompt in zip(entries, prompts):
            prefill = ForwardBatch(torch.tensor([prompt[:-6]]), [0], [entry.slot])
            model.forward(prefill, cache)
        rows = []
        for step in range(6, 0, -1):
            batch = ForwardBatch(
                token_ids=torch.tensor([[prompt[-step]] for prompt in prompts]),
                start_positions=[len(prompt) - step for prompt in prompts],
                slots=[entry.slot for entry in entries],
            )
            rows.append(model.forward(batch, cache))  # (2, 1, vocab)
        return torch.cat(rows, dim=1)
    finally:
        for entry in entries:
            cache.release(entry)


def test_without_the_native_operators_decode_falls_back_to_pytorch(monkeypatch, tmp_path, tiny_folder):
    token_ids = list(range(40, 70))
    native = ember.load(tiny_folder)
    break_native_build(monkeypatch, tmp_path, native_ops.LIBRARY)
    assert native_ops.load() is None
    assert native_ops.LIBRARY.failure_reason
    fallback = ember.load(tiny_folder)
    assert fallback.model._native_ops is None
    reference = _decode_logits(fallback, token_ids)
    assert reference.shape == (2, 6, 2048)
    assert reference.std() > 0.1
    if LIBRARY is None:
        pytest.skip(f"native operators unavailable: {native_ops.LIBRARY.failure_reason}")
    assert native.model._native_ops is not None
    assert (_decode_logits(native, token_ids) - reference).abs().max().item() < 1e-4


@needs_library
def test_all_layers_in_one_native_call_equal_the_per_layer_loop(tiny_folder):
    """`native_decode`: the same kernels in the same order as the Python loop over layers, so the same
    logits, bit for bit; and within float32 rounding of the PyTorch path."""
    token_ids = list(range(40, 70))
    if native_float.load() is None:
        pytest.skip(f"no native float32 product for the table: {native_float.LIBRARY.failure_reason}")
    handle = ember.load(tiny_folder)
    table = handle.model.native_layers
    assert table is not None  # float32 projections all have the native kernel
    one_call = _decode_logits(handle, token_ids)
    handle.model.native_layers = None
    per_layer = _decode_logits(handle, token_ids)
    assert torch.equal(one_call, per_layer)
    handle.model._native_ops = None  # the PyTorch operators
    assert (_decode_logits(handle, token_ids) - one_call).abs().max().item() < 1e-4


@needs_library
def test_smollm2_low_bit_layers_run_in_one_native_call():
    handle = ember.load("smollm2")
    table = handle.model.native_layers
    assert table is not None and table.max_rows >= 8  # int4 layers; the Q8 output layer is called apart
    token_ids = handle.encode("The capital of France is Paris. The capital of Italy is Rome.")
    one_call = _decode_logits(handle, token_ids)
    handle.model.native_layers = None
    assert torch.equal(one_call, _decode_logits(handle, token_ids))


def test_a_projection_without_a_native_kernel_keeps_the_per_layer_loop(tmp_path):
    qwen2 = ember.load(make_tiny_hf_model(tmp_path, "qwen2", 2))  # q/k/v biases
    assert qwen2.model.native_layers is None
