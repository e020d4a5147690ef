"""The attention step shared by the decoders that run their own layer loop (Qwen3-MoE, Gemma 3).

Given a layer's fused q/k/v output (q and k rows in the pairwise rotary layout,
see `ops.interleave_rope_rows`), rotate q and k, store k and v in the cache,
and attend over the cached keys: the same math as `LlamaModel.forward`'s
attention, with the rotations and the sliding window chosen per layer.
"""

from __future__ import annotations

import torch

from ember import ops
from ember.cache import KVCache
from ember.config import ModelConfig
from ember.models.batch import ForwardBatch


def self_attention(
    config: ModelConfig,
    layer_index: int,
    qkv: torch.Tensor,  # (batch, new, (heads + 2 * kv_heads) * head_dim)
    rotations: torch.Tensor,  # (batch, new, head_dim / 2) complex
    batch: ForwardBatch,
    kv_cache: KVCache,
    key_lengths: torch.Tensor | None,  # (batch,) where sequences end at different lengths, else None
    sliding_window: int | None,
) -> torch.Tensor:
    """Attention output (batch, new, heads * head_dim); this layer's new keys and values are cached."""
    batch_size, num_new = qkv.shape[:2]
    num_rotated = config.num_heads + config.num_kv_heads
    qkv = qkv.view(batch_size, num_new, num_rotated + config.num_kv_heads, config.head_dim)
    rotated = ops.apply_rope_pairs(qkv[:, :, :num_rotated], rotations)  # (batch, new, heads + kv, dim)
    query = rotated[:, :, : config.num_heads].transpose(1, 2)  # (batch, heads, new, head_dim)
    key = rotated[:, :, config.num_heads :].transpose(1, 2)  # (batch, kv_heads, new, head_dim)
    value = qkv[:, :, num_rotated:].transpose(1, 2)  # (batch, kv_heads, new, head_dim)
    kv_cache.write(layer_index, batch.slots, batch.start_positions, key, value)
    keys, values = kv_cache.read(layer_index, batch.slots, batch.num_keys)  # (batch, kv_heads, keys, dim)
    attended = ops.attention(query, keys, values, batch.positions, key_lengths, sliding_window)
    return attended.transpose(1, 2).reshape(batch_size, num_new, config.num_heads * config.head_dim)


def ragged_key_lengths(batch: ForwardBatch, device: torch.device) -> torch.Tensor | None:
    """Each sequence's key count when a batch's sequences end at different lengths (for the mask)."""
    if batch.ragged and batch.batch_size > 1:
        return torch.tensor(batch.key_lengths, device=device)
    return None
