"""Operators against plain references written differently (loops, float64)."""

import math

import pytest
import torch

from ember import ops

torch.manual_seed(0)


def test_rms_norm_matches_float64_loop():
    x = torch.randn(3, 5, 64)
    weight = torch.randn(64)
    eps = 1e-5
    expected = torch.empty(3, 5, 64, dtype=torch.float64)
    for i in range(3):
        for j in range(5):
            row = x[i, j].double()
            scale = 1.0 / math.sqrt(float((row * row).sum()) / 64 + eps)
            expected[i, j] = row * scale * weight.double()
    assert torch.allclose(ops.rms_norm(x, weight, eps).double(), expected, atol=1e-5)


def test_rms_norm_keeps_dtype():
    x = torch.randn(2, 8).bfloat16()
    assert ops.rms_norm(x, torch.ones(8), 1e-6).dtype == torch.bfloat16


def test_silu_and_swiglu():
    gate, up = torch.randn(100).double(), torch.randn(100).double()
    expected_silu = torch.tensor([g / (1 + math.exp(-g)) for g in gate.tolist()], dtype=torch.float64)
    assert torch.allclose(ops.silu(gate), expected_silu, atol=1e-12)
    assert torch.allclose(ops.swiglu(gate, up), expected_silu * up, atol=1e-12)


def test_softmax_matches_float64_and_is_stable():
    x = torch.randn(4, 50) * 30 + 1000  # large values overflow a naive exp
    result = ops.softmax(x)
    shifted = x.double() - x.double().max(dim=-1, keepdim=True).values
    expected = shifted.exp() / shifted.exp().sum(dim=-1, keepdim=True)
    assert torch.isfinite(result).all()
    assert torch.allclose(result.double(), expected, atol=1e-6)


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (0.5, 0.0), (2.0, 1.0), (-1.5, 0.25)])
def test_gemm_bt_blas_form(alpha, beta):
    a = torch.randn(2, 3, 7).double()
    b = torch.randn(5, 7).double()
    c = torch.randn(2, 3, 5).double()
    expected = torch.zeros(2, 3, 5, dtype=torch.float64)
    for batch in range(2):
        for i in range(3):
            for j in range(5):
                dot = sum(a[batch, i, k] * b[j, k] for k in range(7))
                expected[batch, i, j] = alpha * dot + beta * c[batch, i, j]
    result = ops.gemm_bt(a, b, c.clone(), alpha=alpha, beta=beta)
    assert torch.allclose(result, expected, atol=1e-10)


def test_gemm_bt_updates_c_in_place():
    a, b = torch.randn(4, 3), torch.randn(2, 3)
    c = torch.ones(4, 2)
    result = ops.gemm_bt(a, b, c, alpha=1.0, beta=2.0)
    assert result.data_ptr() == c.data_ptr()
    assert torch.allclose(c, a @ b.T + 2.0, atol=1e-6)


def _rotate_pairs_reference(x: torch.Tensor, positions: list[int], inverse: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (2i, 2i+1) by position * inverse[i], one element at a time, in float64."""
    out = torch.empty_like(x, dtype=torch.float64)
    for t, position in enumerate(positions):
        for i in range(x.shape[-1] // 2):
            angle = position * float(inverse[i])
            c, s = math.cos(angle), math.sin(angle)
            first, second = x[:, t, :, 2 * i].double(), x[:, t, :, 2 * i + 1].double()
            out[:, t, :, 2 * i] = first * c - second * s
            out[:, t, :, 2 * i + 1] = second * c + first * s
    return out


def test_rope_default_matches_pairwise_rotation():
    head_dim, positions = 16, [0, 1, 5, 37]
    inverse, scaling = ops.rope_inverse_frequencies(head_dim, 10000.0)
    assert scaling == 1.0
    expected_inverse = [10000.0 ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    assert torch.allclose(inverse.double(), torch.tensor(expected_inverse, dtype=torch.float64), rtol=1e-6)
    x = torch.randn(1, len(positions), 3, head_dim)  # (batch, seq, heads, head_dim)
    rotations = ops.rope_rotations(inverse, torch.tensor([positions]))
    result = ops.apply_rope_pairs(x, rotations)
    assert torch.allclose(result.double(), _rotate_pairs_reference(x, positions, inverse), atol=1e-5)


def test_interleaved_rows_turn_rotate_half_into_pairs():
    """HF's rotate-half rope on x equals the pairwise rope on x's rows in interleaved order."""
    heads, head_dim, positions = 2, 8, [3, 9]
    inverse, _ = ops.rope_inverse_frequencies(head_dim, 10000.0)
    x = torch.randn(1, len(positions), heads, head_dim)
    half = head_dim // 2
    angles = torch.tensor(positions, dtype=torch.float64)[:, None] * inverse.double()  # (seq, half)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    first, second = x[..., :half].double(), x[..., half:].double()
    rotate_half = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    order = ops.interleave_rope_rows(heads, head_dim)
    interleaved = x.reshape(1, len(positions), heads * head_dim)[..., order].view_as(x)
    pairs = ops.apply_rope_pairs(interleaved, ops.rope_rotations(inverse, torch.tensor([positions])))
    expected = rotate_half.reshape(1, len(positions), heads * head_dim)[..., order].view_as(x)
    assert torch.allclose(pairs.double(), expected, atol=1e-5)


def _hf_rope(rope_parameters: dict, head_dim: int = 32, max_positions: int = 256, seq_len=None):
    """transformers' own inverse frequencies for a rope type (the test-only reference)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters},
    )
    kwargs = {} if seq_len is None else {"seq_len": seq_len}
    inverse, attention_factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, "cpu", **kwargs)
    return inverse, attention_factor


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_scaling_matches_transformers(scaling):
    ours, _ = ops.rope_inverse_frequencies(32, 10000.0, scaling, max_position_embeddings=256)
    reference, _ = _hf_rope(scaling)
    assert torch.allclose(ours, reference.float(), rtol=1e-6)
    if scaling["rope_type"] == "linear":  # positions / factor
        plain, _ = ops.rope_inverse_frequencies(32, 10000.0)
        assert torch.allclose(ours * 4.0, plain, rtol=1e-6)


@pytest.mark.parametrize("seq_len", [100, 256, 700])
def test_rope_dynamic_matches_transformers(seq_len):
    scaling = {"rope_type": "dynamic", "factor": 2.0}
    ours = ops.dynamic_rope_inverse_frequencies(32, 10000.0, scaling, 256, seq_len)
    reference, _ = _hf_rope(scaling, seq_len=seq_len)
    assert torch.allclose(ours, reference.float(), rtol=1e-6)
    plain, _ = ops.rope_inverse_frequencies(32, 10000.0)
    assert torch.allclose(ours, plain) == (seq_len <= 256)


def _attention_reference(query, keys, values, query_positions, key_lengths, window):
    """Loop over batch, heads and queries; GQA by explicit head mapping; float64."""
    batch, num_heads, num_queries, head_dim = query.shape
    group = num_heads // keys.shape[1]
    out = torch.zeros(batch, num_heads, num_queries, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(num_heads):
            kv = h // group
            for t in range(num_queries):
                position = int(query_positions[b, t])
                visible = [
                    j
                    for j in range(keys.shape[2])
                    if j <= position
                    and (window is None or j > position - window)
                    and (key_lengths is None or j < int(key_lengths[b]))
                ]
                scores = torch.stack(
                    [
                        (query[b, h, t].double() * keys[b, kv, j].double()).sum() / math.sqrt(head_dim)
                        for j in visible
                    ]
                )
                weights = torch.softmax(scores, dim=0)
                out[b, h, t] = sum(w * values[b, kv, j].double() for w, j in zip(weights, visible))
    return out


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_gqa_causal_over_cached_keys(num_heads, num_kv_heads, window):
    head_dim, num_keys = 8, 9
    keys = torch.randn(2, num_kv_heads, num_keys, head_dim)
    values = torch.randn(2, num_kv_heads, num_keys, head_dim)
    # Three new queries at the end of the cache (positions 6, 7, 8): a prefill chunk after a cached prefix.
    query = torch.randn(2, num_heads, 3, head_dim)
    positions = torch.tensor([[6, 7, 8], [6, 7, 8]])
    result = ops.attention(query, keys, values, positions, sliding_window=window)
    expected = _attention_reference(query, keys, values, positions, None, window)
    assert torch.allclose(result.double(), expected, atol=1e-5)


def test_attention_ragged_batch_masks_padding_keys():
    keys, values = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    query = torch.randn(2, 4, 1, 8)
    positions = torch.tensor([[6], [3]])  # second sequence has only 4 keys
    key_lengths = torch.tensor([7, 4])
    result = ops.attention(query, keys, values, positions, key_lengths)
    expected = _attention_reference(query, keys, values, positions, key_lengths, None)
    assert torch.allclose(result.double(), expected, atol=1e-5)
    # Garbage past a sequence's end must not leak into its output.
    keys[1, :, 4:] = 1e4
    again = ops.attention(query, keys, values, positions, key_lengths)
    assert torch.allclose(again, result, atol=1e-6)


def test_attention_rejects_bad_head_counts():
    with pytest.raises(ValueError):
        ops.attention(
            torch.randn(1, 3, 1, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), torch.tensor([[1]])
        )
