"""Pure tensor operators the models are built from.

Every function here is a function of its inputs only: no caches, no files, no
global state. Tests compare each with a plain reference written differently
(loops or float64 math).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 whatever x's dtype."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one fused kernel on the decode path
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype) if x.dtype != torch.float32 else normed * weight


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Llama MLP's gating: silu(gate) * up."""
    return F.silu(gate) * up


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Numerically stable softmax, accumulated in float32."""
    return torch.softmax(x.float(), dim=dim).to(x.dtype)


def gemm_bt(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 0.0,
) -> torch.Tensor:
    """BLAS-style C = alpha * A @ B^T + beta * C, with B stored (n, k) like a linear weight.

    A is (..., m, k), B is (n, k), C broadcastable to (..., m, n). With `c`
    given it is updated in place (as BLAS does) and returned.
    """
    product = torch.matmul(a, b.transpose(-1, -2))
    if c is None:
        return product if alpha == 1.0 else product.mul_(alpha)
    if beta == 0.0:
        return c.copy_(product.mul_(alpha))
    return c.mul_(beta).add_(product, alpha=alpha)


# ---------------------------------------------------------------- rotary embeddings


def rope_inverse_frequencies(
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    max_position_embeddings: int = 2048,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the attention scaling factor for a RoPE variant.

    Mirrors HF's `rope_type`s: default, linear (positions divided by factor),
    llama3 (low frequencies divided by factor, a smooth band between). The
    `dynamic` type depends on the sequence length, see `rope_cos_sin`.
    """
    # float32 throughout, as HF computes it, so positions rotate identically.
    inverse = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = _rope_type(scaling)
    if rope_type == "linear":
        inverse = inverse / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen = original / low_freq_factor
        high_freq_wavelen = original / high_freq_factor
        wavelen = 2 * math.pi / inverse
        scaled = torch.where(wavelen > low_freq_wavelen, inverse / factor, inverse)
        smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inverse = torch.where(is_medium, smoothed, scaled)
    return inverse, 1.0


def dynamic_rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any], max_position_embeddings: int, seq_len: int
) -> torch.Tensor:
    """NTK-aware dynamic scaling: the base grows once a sequence passes the trained length.

    As in HF, `seq_len` is the largest position in the forward call plus one.
    """
    factor = float(scaling["factor"])
    seq_len = max(seq_len, max_position_embeddings)
    base = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (
        head_dim / (head_dim - 2)
    )
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def interleave_rope_rows(num_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that turns a q/k projection from the rotate-half layout into the pairwise one.

    HF checkpoints rotate dimension i with i + head_dim/2; putting each such
    pair side by side lets `apply_rope_pairs` rotate with one complex product.
    Attention is unchanged because q and k get the same order.
    """
    half = head_dim // 2
    within_head = torch.arange(head_dim).view(2, half).t().reshape(-1)  # 0, half, 1, half+1, ...
    return (torch.arange(num_heads).unsqueeze(1) * head_dim + within_head).reshape(-1)


def rope_rotations(inverse_frequencies: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Unit complex numbers (*positions.shape, head_dim/2): the rotation of each pair at each position."""
    angles = positions.float().unsqueeze(-1) * inverse_frequencies  # (..., head_dim/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope_pairs(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of x by unit complex numbers.

    x is (batch, seq, heads, head_dim); rotations are (batch, seq, head_dim/2).
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (batch, seq, heads, head_dim/2)
    return torch.view_as_real(pairs * rotations.unsqueeze(2)).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------- attention


def attention_mask(
    query_positions: torch.Tensor,
    num_keys: int,
    key_lengths: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean mask (batch, 1, queries, keys): True where a query may attend to a key.

    A query at position p sees keys 0..p (causal), only the last
    `sliding_window` of them when set, and never keys at or past its
    sequence's `key_lengths` (padding of shorter sequences in a batch).
    """
    key_positions = torch.arange(num_keys, device=query_positions.device)  # (keys,)
    query = query_positions.unsqueeze(-1)  # (batch, queries, 1)
    allowed = key_positions <= query  # (batch, queries, keys)
    if sliding_window is not None:
        allowed &= key_positions > query - sliding_window
    if key_lengths is not None:
        allowed &= key_positions < key_lengths.view(-1, 1, 1)
    return allowed.unsqueeze(1)


def attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_positions: torch.Tensor,
    key_lengths: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal grouped-query attention of new queries over cached keys and values.

    query: (batch, num_heads, queries, head_dim), at absolute positions
    `query_positions` (batch, queries). keys/values: (batch, num_kv_heads,
    keys, head_dim) holding positions 0..keys-1 of each sequence. num_heads
    must be a multiple of num_kv_heads; query head h reads kv head
    h // (num_heads / num_kv_heads). Returns (batch, num_heads, queries, head_dim).
    """
    num_heads, num_kv_heads = query.shape[1], keys.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    num_queries, num_keys = query.shape[2], keys.shape[2]
    needs_mask = num_queries > 1 or key_lengths is not None or sliding_window is not None
    mask = attention_mask(query_positions, num_keys, key_lengths, sliding_window) if needs_mask else None
    return F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, enable_gqa=num_heads != num_kv_heads
    )
