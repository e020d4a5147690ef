"""Gemma 3 (text): a decoder whose layers differ from Llama's in six places.

- RMS norms scale by (1 + weight), and each block has a norm before and after it: input ->
  attention -> post-attention norm -> residual; pre-feedforward norm -> MLP -> post-feedforward
  norm -> residual. The (1 + weight) is folded into the weights at build.
- q and k are RMS-normed per head before rotary embedding (as in Qwen3, `QKNormedProjection`).
- Layers alternate between local attention (a sliding window, rotary base `rope_local_theta`) and
  global attention (full, base `rope_theta`, with the config's rope scaling); `layer_types`
  says which is which.
- Queries are scaled by 1/sqrt(query_pre_attn_scalar) instead of 1/sqrt(head_dim): folded into
  the q norm's weights, since the norm's output is what the rotation and attention see.
- The token embedding is multiplied by sqrt(hidden_size); the MLP gates with GELU (tanh form).
- Final logits are soft-capped, cap * tanh(logits / cap), where the config sets a cap.

Prefill runs on PyTorch operators. A decode step on the CPU in float32 runs the native fused
operators `LlamaModel` uses (residual add + RMS norm; rotary + cache store + attention, one per
kind of layer) around the same projections, with GELU gating in PyTorch; `LlamaModel`'s one-call
decode and CUDA graphs assume Llama's layer and are not used here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember import native_ops, ops
from ember.cache import KVCache
from ember.config import ModelConfig
from ember.errors import ModelLoadError
from ember.models.batch import ForwardBatch
from ember.models.llama import LinearFactory, Weight, _as_float, _take_rows
from ember.models.qwen3 import QKNormedProjection, check_qk_norms, qk_norm_weights
from ember.models.self_attention import ragged_key_lengths, self_attention
from ember.quant.embedding import TokenEmbedding

Projection = Callable[[torch.Tensor], torch.Tensor]
_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


@dataclass
class Gemma3Layer:
    input_norm: torch.Tensor  # (hidden,) 1 + weight, like every norm here
    qkv_proj: QKNormedProjection  # hidden -> (heads + 2 * kv_heads) * head_dim, q and k normed, q scaled
    o_proj: Projection  # heads * head_dim -> hidden
    post_attention_norm: torch.Tensor  # (hidden,)
    pre_feedforward_norm: torch.Tensor  # (hidden,)
    gate_up_proj: Projection  # hidden -> 2 * intermediate
    down_proj: Projection  # intermediate -> hidden
    post_feedforward_norm: torch.Tensor  # (hidden,)
    sliding_window: int | None  # the local layers' window; None on global layers
    rotary: str  # "local" or "global": which rotations the layer uses


def gelu_tanh_gating(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Gemma's MLP gating: gelu(gate, tanh approximation) * up."""
    return F.gelu(gate, approximate="tanh") * up


def _frequencies(head_dim: int, theta: float, scaling: dict | None, config: ModelConfig) -> torch.Tensor:
    return ops.rope_inverse_frequencies(head_dim, theta, scaling, config.max_position_embeddings)[0]


class Gemma3Model:
    """forward(batch, kv_cache) -> logits, like `LlamaModel`."""

    def __init__(
        self,
        config: ModelConfig,
        tensors: dict[str, Weight],
        linear_factory: LinearFactory,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        on_layer_built: Callable[[int, int], None] | None = None,
        decode_graphs: bool = True,  # accepted for the common signature; this model has no graph path
    ):
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.native_layers = self.decode_graphs = None  # see the module docstring
        native_possible = self.device.type == "cpu" and dtype == torch.float32
        self._native_ops = native_ops.load() if native_possible else None  # None: the PyTorch path
        check_qk_norms(config, tensors)
        if (config.rope_scaling or {}).get("rope_type") == "dynamic":
            raise ModelLoadError("dynamic rope scaling is not supported for Gemma 3")  # rotations are fixed

        def tensor(name: str, shape: tuple[int | None, ...]) -> Weight:
            if name not in tensors:
                raise ModelLoadError(f"the checkpoint lacks tensor {name}")
            actual = tuple(tensors[name].shape)
            if len(actual) != len(shape) or any(want not in (None, got) for want, got in zip(shape, actual)):
                raise ModelLoadError(f"tensor {name} has shape {actual}; the config implies {shape}")
            return tensors[name]

        def norm(name: str) -> torch.Tensor:
            return (_as_float(tensor(name, (config.hidden_size,))).float() + 1.0).to(self.device)

        hidden, width = config.hidden_size, config.intermediate_size
        query, key_value = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        q_order = ops.interleave_rope_rows(config.num_heads, config.head_dim)
        k_order = ops.interleave_rope_rows(config.num_kv_heads, config.head_dim)
        # 1/sqrt(query_pre_attn_scalar) where attention applies 1/sqrt(head_dim): exactly 1 when they agree.
        query_scale = math.sqrt(config.head_dim / (config.query_pre_attn_scalar or config.head_dim))
        self.layers: list[Gemma3Layer] = []
        for index in range(config.num_layers):
            prefix = f"model.layers.{index}."
            attention = prefix + "self_attn."
            qkv = [
                _take_rows(tensor(attention + f"{name}_proj.weight", (size, hidden)), order)
                for name, size, order in (
                    ("q", query, q_order),
                    ("k", key_value, k_order),
                    ("v", key_value, None),
                )
            ]
            query_norm, key_norm = qk_norm_weights(config, tensors, index, self.device, offset=1.0)
            if query_scale != 1.0:
                query_norm = query_norm * query_scale
            input_norm, post_attention, pre_feedforward, post_feedforward = (
                norm(prefix + name + ".weight") for name in _NORMS
            )
            sliding = config.is_sliding_layer(index)
            self.layers.append(
                Gemma3Layer(
                    input_norm=input_norm,
                    qkv_proj=QKNormedProjection(
                        linear_factory(qkv, None),
                        query_norm,
                        key_norm,
                        config.num_heads,
                        config.num_kv_heads,
                        config.rms_norm_eps,
                    ),
                    o_proj=linear_factory([tensor(attention + "o_proj.weight", (hidden, query))], None),
                    post_attention_norm=post_attention,
                    pre_feedforward_norm=pre_feedforward,
                    gate_up_proj=linear_factory(
                        [
                            tensor(prefix + f"mlp.{name}_proj.weight", (width, hidden))
                            for name in ("gate", "up")
                        ],
                        None,
                    ),
                    down_proj=linear_factory(
                        [tensor(prefix + "mlp.down_proj.weight", (hidden, width))], None
                    ),
                    post_feedforward_norm=post_feedforward,
                    sliding_window=config.sliding_window if sliding else None,
                    rotary="local" if sliding and config.layer_types is not None else "global",
                )
            )
            if on_layer_built is not None:
                on_layer_built(index + 1, config.num_layers)
        self.final_norm = norm("model.norm.weight")
        embedding = tensor("model.embed_tokens.weight", (None, hidden))
        output = embedding if config.tie_word_embeddings else tensor("lm_head.weight", (None, hidden))
        self.lm_head = linear_factory([output], None)
        self.embed_tokens = TokenEmbedding(  # a tied embedding reads its rows from the output layer's tiles
            embedding,
            dtype=dtype,
            device=self.device,
            tied_output=self.lm_head if config.tie_word_embeddings else None,
        )
        # transformers multiplies by the scale rounded to the embedding's dtype
        self.embed_scale = torch.tensor(hidden**0.5, dtype=dtype).item()
        local = config.rope_local_theta or 10_000.0
        self.inverse_frequencies = {  # (head_dim / 2,) per kind of layer
            "global": _frequencies(config.head_dim, config.rope_theta, config.rope_scaling, config),
            "local": _frequencies(config.head_dim, local, None, config),
        }
        self.inverse_frequencies = {
            kind: value.to(self.device) for kind, value in self.inverse_frequencies.items()
        }

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """Logits (batch, new_tokens or 1, vocab) in float32 for the batch's new tokens."""
        if (
            self._native_ops is not None
            and batch.num_new_tokens == 1
            and kv_cache.dtype == torch.float32
            and kv_cache.fits(batch.slots, batch.key_lengths)
        ):  # anything else takes the PyTorch path below, which reports what is wrong
            return self._decode(batch, kv_cache)
        config, eps = self.config, self.config.rms_norm_eps
        hidden = self.embed_tokens(batch.token_ids) * self.embed_scale  # (batch, new, hidden)
        rotations = {
            kind: ops.rope_rotations(frequencies, batch.positions)  # (batch, new, head_dim / 2)
            for kind, frequencies in self.inverse_frequencies.items()
        }
        key_lengths = ragged_key_lengths(batch, self.device)
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv_proj(ops.rms_norm(hidden, layer.input_norm, eps))
            attended = self_attention(
                config,
                index,
                qkv,
                rotations[layer.rotary],
                batch,
                kv_cache,
                key_lengths,
                layer.sliding_window,
            )  # (batch, new, heads * head_dim)
            hidden = hidden + ops.rms_norm(layer.o_proj(attended), layer.post_attention_norm, eps)
            gate, up = layer.gate_up_proj(ops.rms_norm(hidden, layer.pre_feedforward_norm, eps)).chunk(
                2, dim=-1
            )
            hidden = hidden + ops.rms_norm(
                layer.down_proj(gelu_tanh_gating(gate, up)), layer.post_feedforward_norm, eps
            )
        if not batch.all_logits:
            hidden = hidden[:, -1:]
        logits = self.lm_head(ops.rms_norm(hidden, self.final_norm, eps)).float()
        cap = config.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap

    def _decode(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """One new token per sequence through the native fused operators: the same math as `forward`."""
        config, library, eps = self.config, self._native_ops, self.config.rms_norm_eps
        add_rms_norm = native_ops.add_rms_norm
        batch_size = batch.batch_size
        # (batch, hidden), a fresh tensor: the residual stream is updated in place below
        hidden = (self.embed_tokens(batch.token_ids).reshape(batch_size, -1) * self.embed_scale).contiguous()
        block_table = kv_cache.block_table(batch.slots)  # (batch, blocks)
        positions = batch.positions.reshape(batch_size)  # (batch,) int64
        attend = {}  # (rotary kind, window) -> the step's attention for layers of that kind
        for layer in self.layers:
            kind = (layer.rotary, layer.sliding_window)
            if kind not in attend:
                rotations = ops.rope_rotations(self.inverse_frequencies[layer.rotary], batch.positions)
                attend[kind] = native_ops.DecodeAttention(
                    library,
                    torch.view_as_real(rotations),  # (batch, 1, head_dim / 2, 2): cos, sin
                    block_table,
                    positions,
                    config.num_heads,
                    kv_cache,
                    layer.sliding_window,
                )
        normed, delta = torch.empty_like(hidden), torch.empty_like(hidden)  # (batch, hidden) each
        pending = None  # the previous layer's normed MLP output, not yet added to the residual stream
        for layer, keys, values in zip(self.layers, kv_cache.key_pools, kv_cache.value_pools):
            add_rms_norm(library, hidden, pending, layer.input_norm, eps, normed)
            attended = attend[(layer.rotary, layer.sliding_window)](layer.qkv_proj(normed), keys, values)
            add_rms_norm(library, layer.o_proj(attended), None, layer.post_attention_norm, eps, delta)
            add_rms_norm(library, hidden, delta, layer.pre_feedforward_norm, eps, normed)
            gate, up = layer.gate_up_proj(normed).chunk(2, dim=-1)  # (batch, intermediate) each
            down = layer.down_proj(gelu_tanh_gating(gate, up)).contiguous()  # (batch, hidden)
            pending = add_rms_norm(library, down, None, layer.post_feedforward_norm, eps, delta)
        add_rms_norm(library, hidden, pending, self.final_norm, eps, normed)
        logits = self.lm_head(normed).float().view(batch_size, 1, -1)
        cap = config.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap

    def named_linears(self) -> list[tuple[str, Projection]]:
        """Every linear layer with a name saying where it sits, for `ember info`'s kernel table."""
        named: list[tuple[str, Projection]] = [("lm_head", self.lm_head)]
        for index, layer in enumerate(self.layers):
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                named.append((f"layers.{index}.{name}", getattr(layer, name)))
        return named

    def weight_bytes(self) -> int:
        """Resident bytes of the weights in their in-memory form."""
        total = self.lm_head.nbytes + self.final_norm.nbytes
        if not (self.config.tie_word_embeddings and self.embed_tokens.shares_storage_with(self.lm_head)):
            total += self.embed_tokens.nbytes
        for layer in self.layers:
            total += sum(
                projection.nbytes
                for projection in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
            )
            total += 4 * layer.input_norm.nbytes
        return total

    def new_cache(self, memory_budget_bytes: int = 1 << 30, max_length: int | None = None) -> KVCache:
        config = self.config
        return KVCache(
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            max_length=max_length or config.max_position_embeddings,
            dtype=self.dtype,
            device=self.device,
            memory_budget_bytes=memory_budget_bytes,
        )
