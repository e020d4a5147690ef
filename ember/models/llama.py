"""Llama-family decoder: Llama, Mistral (sliding-window attention), Qwen2 (q/k/v bias), SmolLM.

The whole transformer in one file. Weights arrive as named tensors in HF
naming (`model.layers.{i}.self_attn.q_proj.weight`, ...), float or GGML
block-quantized; the model fuses q/k/v and gate/up into single projections
so each layer runs four matrix products, and hands weights to a linear
factory that decides their in-memory form (float, int8, int4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ember import native_ops, ops
from ember.cache import KVCache
from ember.config import ROPE_FREQ_FACTORS, ModelConfig
from ember.errors import ModelLoadError
from ember.models.batch import ForwardBatch
from ember.models.decode_graphs import DecodeGraphs
from ember.native_decode import NativeDecodeLayers
from ember.quant.embedding import TokenEmbedding

Weight = Any  # torch.Tensor or ember.quant.ggml_blocks.BlockQuantizedTensor
LinearFactory = Callable[[list[Weight], list[torch.Tensor] | None], Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class LlamaLayer:
    input_norm: torch.Tensor  # (hidden,)
    qkv_proj: Callable[[torch.Tensor], torch.Tensor]  # hidden -> (heads + 2 * kv_heads) * head_dim
    o_proj: Callable[[torch.Tensor], torch.Tensor]  # heads * head_dim -> hidden
    post_attention_norm: torch.Tensor  # (hidden,)
    gate_up_proj: Callable[[torch.Tensor], torch.Tensor]  # hidden -> 2 * intermediate
    down_proj: Callable[[torch.Tensor], torch.Tensor]  # intermediate -> hidden


class LlamaModel:
    """forward(batch, kv_cache) -> logits; the only entry point the engine calls."""

    def __init__(
        self,
        config: ModelConfig,
        tensors: dict[str, Weight],
        linear_factory: LinearFactory,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        on_layer_built: Callable[[int, int], None] | None = None,
        decode_graphs: bool = True,
    ):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        tensors = sanitize(config, tensors)
        missing = [name for name in expected_tensor_names(config) if name not in tensors]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ModelLoadError(f"the checkpoint lacks tensor(s) {shown}")
        check_tensor_shapes(config, tensors)

        def norm_weight(name: str) -> torch.Tensor:
            return _as_float(tensors[name]).to(self.device, torch.float32)

        def bias(name: str) -> torch.Tensor | None:
            return _as_float(tensors[name]).to(self.device, dtype) if name in tensors else None

        q_order = ops.interleave_rope_rows(config.num_heads, config.head_dim)
        k_order = ops.interleave_rope_rows(config.num_kv_heads, config.head_dim)
        self.layers: list[LlamaLayer] = []
        for index in range(config.num_layers):
            prefix = f"model.layers.{index}."
            attention = prefix + "self_attn."
            qkv_names = [attention + f"{name}_proj" for name in ("q", "k", "v")]
            # q and k rows go to the pairwise rotary layout (see ops.interleave_rope_rows).
            qkv_weights = [
                _take_rows(tensors[name + ".weight"], order)
                for name, order in zip(qkv_names, (q_order, k_order, None))
            ]
            qkv_biases = [bias(name + ".bias") for name in qkv_names]
            if all(b is not None for b in qkv_biases):
                qkv_biases = [_take_rows(b, order) for b, order in zip(qkv_biases, (q_order, k_order, None))]
            self.layers.append(
                LlamaLayer(
                    input_norm=norm_weight(prefix + "input_layernorm.weight"),
                    qkv_proj=linear_factory(
                        qkv_weights,
                        qkv_biases if all(b is not None for b in qkv_biases) else None,
                    ),
                    o_proj=linear_factory([tensors[attention + "o_proj.weight"]], None),
                    post_attention_norm=norm_weight(prefix + "post_attention_layernorm.weight"),
                    gate_up_proj=linear_factory(
                        [tensors[prefix + "mlp.gate_proj.weight"], tensors[prefix + "mlp.up_proj.weight"]],
                        None,
                    ),
                    down_proj=linear_factory([tensors[prefix + "mlp.down_proj.weight"]], None),
                )
            )
            if on_layer_built is not None:
                on_layer_built(index + 1, config.num_layers)
        self.final_norm = norm_weight("model.norm.weight")
        embedding_weight = tensors["model.embed_tokens.weight"]
        output_weight = embedding_weight if config.tie_word_embeddings else tensors["lm_head.weight"]
        self.lm_head = linear_factory([output_weight], None)
        self.embed_tokens = TokenEmbedding(
            embedding_weight,
            dtype=dtype,
            device=self.device,
            tied_output=self.lm_head if config.tie_word_embeddings else None,
        )

        self.inverse_frequencies, _ = ops.rope_inverse_frequencies(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings
        )
        freq_factors = tensors.get(ROPE_FREQ_FACTORS)  # llama3 RoPE as stored by GGUF files
        if freq_factors is not None:
            self.inverse_frequencies = self.inverse_frequencies / _as_float(freq_factors).float().reshape(-1)
        self.inverse_frequencies = self.inverse_frequencies.to(self.device)
        self._dynamic_rope = (config.rope_scaling or {}).get(
            "rope_type", (config.rope_scaling or {}).get("type")
        ) == "dynamic"
        self._q_size = config.num_heads * config.head_dim
        self._kv_size = config.num_kv_heads * config.head_dim
        # The fused decode step (`_decode`) runs on CPU float32 where the native operators build.
        native_possible = self.device.type == "cpu" and dtype == torch.float32
        self._native_ops = native_ops.load() if native_possible else None
        # Rows a decode step's forward call may hold with prompt tokens riding in it (the engine's fused
        # step): the native step takes them, sharing one pass over the weights. 0: prompts read apart.
        self.prompt_rows_per_step = native_ops.CHUNK_ROWS if self._native_ops is not None else 0
        # ... and, where every projection has a native kernel, runs all layers in one native call
        self.native_layers = None
        if self._native_ops is not None:
            self.native_layers = NativeDecodeLayers.build(
                self._native_ops, self.layers, self.final_norm, config.rms_norm_eps
            )
        # On CUDA, single-token steps replay captured graphs (their positions live on the device, so
        # dynamic RoPE, whose frequencies depend on the length, stays on the ordinary path).
        self.decode_graphs = None
        if decode_graphs and self.device.type == "cuda" and not self._dynamic_rope:
            self.decode_graphs = DecodeGraphs(self)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """Logits (batch, new_tokens or 1, vocab) in float32 for the batch's new tokens."""
        if self.decode_graphs is not None and batch.num_new_tokens == 1:
            logits = self.decode_graphs(batch, kv_cache)
            if logits is not None:
                return logits
        if (
            self._native_ops is not None
            and batch.num_new_tokens == 1
            and kv_cache.dtype == torch.float32
            and kv_cache.fits(batch.slots, batch.key_lengths)
        ):  # anything else takes the PyTorch path below, which reports what is wrong
            return self._decode(batch, kv_cache)
        rows = batch.as_rows() if batch.num_new_tokens <= native_ops.CHUNK_ROWS else None
        if (
            rows is not None
            and self._native_ops is not None
            and kv_cache.dtype == torch.float32
            and kv_cache.fits(rows.slots, rows.key_lengths)
        ):  # a short prompt chunk of one sequence: its tokens as rows of a decode step
            logits = self._decode(rows, kv_cache)
            return logits.view(1, -1, logits.shape[-1])
        config = self.config
        batch_size, num_new = batch.token_ids.shape
        hidden = self.embed_tokens(batch.token_ids)  # (batch, new, hidden)
        rotations = self._rope_rotations(batch)  # (batch, new, head_dim/2) complex
        num_keys = batch.num_keys
        key_lengths = (
            torch.tensor(batch.key_lengths, device=self.device) if batch.ragged and batch_size > 1 else None
        )
        num_rotated = config.num_heads + config.num_kv_heads
        for layer_index, layer in enumerate(self.layers):
            normed = ops.rms_norm(hidden, layer.input_norm, config.rms_norm_eps)
            qkv = layer.qkv_proj(normed).view(batch_size, num_new, num_rotated + config.num_kv_heads, -1)
            rotated = ops.apply_rope_pairs(
                qkv[:, :, :num_rotated], rotations
            )  # (batch, new, heads + kv, dim)
            query = rotated[:, :, : config.num_heads].transpose(1, 2)  # (batch, heads, new, head_dim)
            key = rotated[:, :, config.num_heads :].transpose(1, 2)  # (batch, kv_heads, new, head_dim)
            value = qkv[:, :, num_rotated:].transpose(1, 2)  # (batch, kv_heads, new, head_dim)
            kv_cache.write(layer_index, batch.slots, batch.start_positions, key, value)
            keys, values = kv_cache.read(
                layer_index, batch.slots, num_keys
            )  # (batch, kv_heads, keys, head_dim)
            attended = ops.attention(
                query, keys, values, batch.positions, key_lengths, config.sliding_window
            )  # (batch, heads, new, head_dim)
            attended = attended.transpose(1, 2).reshape(batch_size, num_new, self._q_size)
            hidden = hidden + layer.o_proj(attended)
            normed = ops.rms_norm(hidden, layer.post_attention_norm, config.rms_norm_eps)
            gate, up = layer.gate_up_proj(normed).chunk(2, dim=-1)
            hidden = hidden + layer.down_proj(ops.swiglu(gate, up))
        if not batch.all_logits:
            hidden = hidden[:, -1:]
        hidden = ops.rms_norm(hidden, self.final_norm, config.rms_norm_eps)
        return self.lm_head(hidden).float()

    def _decode(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """One new token per row through the fused native operators: the same math as `forward`. Rows may
        be prompt tokens (see `prompt_rows_per_step`); logits (logit rows, 1, vocab) of `batch.logit_rows`.

        Per layer four matrix products and three native calls (residual add with
        RMS norm, rotary + cache store + attention, silu gating) instead of ~25
        small PyTorch operators, whose dispatch dominates a small model's decode.
        """
        config, library = self.config, self._native_ops
        add_rms_norm, eps = native_ops.add_rms_norm, config.rms_norm_eps
        batch_size = batch.batch_size
        # (batch, hidden), a fresh copy: the residual stream is updated in place below
        hidden = self.embed_tokens(batch.token_ids).reshape(batch_size, config.hidden_size).clone()
        rotations = torch.view_as_real(self._rope_rotations(batch))  # (batch, 1, head_dim/2, 2): cos, sin
        positions = batch.positions.reshape(batch_size)  # (batch,) int64
        attend = native_ops.DecodeAttention(
            library,
            rotations,
            kv_cache.block_table(batch.slots),  # (batch, blocks)
            positions,
            config.num_heads,
            kv_cache,
            config.sliding_window,
        )
        if self.native_layers is not None and batch_size <= self.native_layers.max_rows:
            normed = self.native_layers(hidden, attend, kv_cache)  # (batch, hidden): the final norm
            return self._logits(normed, batch.logit_rows)
        # Buffers reused by every layer: each is consumed before the next layer overwrites it.
        normed = torch.empty_like(hidden)  # (batch, hidden)
        activation = torch.empty(batch_size, config.intermediate_size)  # (batch, intermediate)
        delta = None  # (batch, hidden): the previous layer's MLP output, added to the residual stream
        for layer, keys, values in zip(self.layers, kv_cache.key_pools, kv_cache.value_pools):
            add_rms_norm(library, hidden, delta, layer.input_norm, eps, normed)
            qkv = layer.qkv_proj(normed)  # (batch, (heads + 2 * kv_heads) * head_dim)
            attended = attend(qkv, keys, values)  # (batch, heads * head_dim); k and v stored in the cache
            add_rms_norm(library, hidden, layer.o_proj(attended), layer.post_attention_norm, eps, normed)
            gate_up = layer.gate_up_proj(normed)  # (batch, 2 * intermediate)
            delta = layer.down_proj(native_ops.silu_mul(library, gate_up, activation))
        add_rms_norm(library, hidden, delta, self.final_norm, eps, normed)
        return self._logits(normed, batch.logit_rows)

    def _logits(self, normed: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
        """(rows, 1, vocab) logits of the chosen rows of the final-normed hidden state (all when None)."""
        if rows is not None and rows != list(range(normed.shape[0])):
            normed = normed[rows] if len(rows) != 1 else normed[rows[0] : rows[0] + 1]
        return self.lm_head(normed).view(-1, 1, self.config.vocab_size)

    def static_decode(
        self, hidden: torch.Tensor, positions: torch.Tensor, block_table: torch.Tensor, kv_cache: KVCache
    ) -> torch.Tensor:
        """One new token per sequence with every shape fixed by the batch size and the table width: logits
        (batch, vocab) in float32. The same math as `forward`, written so that CUDA can capture it as a graph.

        hidden (batch, hidden_size) holds the embedded new tokens, positions (batch,) and block_table
        (batch, width) are device tensors, so nothing here reads a value back to the host. Attention runs
        over every position the table's blocks cover, under a mask, instead of the first `num_keys` keys.
        Rows may repeat (the padding of a graph's batch): they then write the same keys to the same place.
        """
        config = self.config
        batch_size, width = block_table.shape
        block_size = kv_cache.block_size
        rotations = ops.rope_rotations(self.inverse_frequencies, positions.view(batch_size, 1))
        key_positions = torch.arange(width * block_size, device=hidden.device)  # (keys,)
        visible = key_positions <= positions.view(batch_size, 1)  # (batch, keys)
        if config.sliding_window is not None:
            visible &= key_positions > positions.view(batch_size, 1) - config.sliding_window
        mask = visible.view(batch_size, 1, 1, -1)  # (batch, 1, 1, keys)
        # Pool rows: of the new tokens (batch,) and of every covered position (batch * keys,)
        new_rows = block_table.gather(1, (positions // block_size).view(-1, 1)).view(-1) * block_size
        new_rows = new_rows + positions % block_size
        offsets = torch.arange(block_size, device=hidden.device)  # (block_size,)
        all_rows = (block_table.unsqueeze(-1) * block_size + offsets).view(-1)  # (batch * keys,)
        pool_shape = (-1, config.num_kv_heads, config.head_dim)
        num_rotated = config.num_heads + config.num_kv_heads
        hidden = hidden.view(batch_size, 1, config.hidden_size)
        for layer, key_pool, value_pool in zip(self.layers, kv_cache.key_pools, kv_cache.value_pools):
            keys, values = key_pool.view(pool_shape), value_pool.view(pool_shape)  # (rows, kv_heads, dim)
            normed = ops.rms_norm(hidden, layer.input_norm, config.rms_norm_eps)
            qkv = layer.qkv_proj(normed).view(batch_size, 1, num_rotated + config.num_kv_heads, -1)
            rotated = ops.apply_rope_pairs(qkv[:, :, :num_rotated], rotations)  # (batch, 1, heads + kv, dim)
            query = rotated[:, :, : config.num_heads].transpose(1, 2)  # (batch, heads, 1, head_dim)
            keys[new_rows] = rotated[:, 0, config.num_heads :].to(keys.dtype)  # (batch, kv, dim)
            values[new_rows] = qkv[:, 0, num_rotated:].to(values.dtype)
            attended = torch.nn.functional.scaled_dot_product_attention(
                query.to(keys.dtype),
                keys[all_rows].view(batch_size, -1, config.num_kv_heads, config.head_dim).transpose(1, 2),
                values[all_rows].view(batch_size, -1, config.num_kv_heads, config.head_dim).transpose(1, 2),
                attn_mask=mask,
                enable_gqa=config.num_heads != config.num_kv_heads,
            )  # (batch, heads, 1, head_dim)
            hidden = hidden + layer.o_proj(attended.transpose(1, 2).reshape(batch_size, 1, self._q_size))
            normed = ops.rms_norm(hidden, layer.post_attention_norm, config.rms_norm_eps)
            gate, up = layer.gate_up_proj(normed).chunk(2, dim=-1)
            hidden = hidden + layer.down_proj(ops.swiglu(gate, up))
        hidden = ops.rms_norm(hidden, self.final_norm, config.rms_norm_eps)
        return self.lm_head(hidden).float().view(batch_size, -1)

    def _rope_rotations(self, batch: ForwardBatch) -> torch.Tensor:
        inverse_frequencies = self.inverse_frequencies
        if self._dynamic_rope:
            inverse_frequencies = ops.dynamic_rope_inverse_frequencies(
                self.config.head_dim,
                self.config.rope_theta,
                self.config.rope_scaling,
                self.config.max_position_embeddings,
                seq_len=batch.num_keys,
            ).to(self.device)
        return ops.rope_rotations(inverse_frequencies, batch.positions)

    def named_linears(self) -> list[tuple[str, Any]]:
        """Every linear layer with a name saying where it sits, for `ember info`'s kernel table."""
        named = [("lm_head", self.lm_head)]
        for index, layer in enumerate(self.layers):
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                named.append((f"layers.{index}.{name}", getattr(layer, name)))
        return named

    def weight_bytes(self) -> int:
        """Resident bytes of the weights in their in-memory form."""
        linears = [layer for _, layer in self.named_linears()]
        norms = sum(layer.input_norm.nbytes + layer.post_attention_norm.nbytes for layer in self.layers)
        tied_output = self.config.tie_word_embeddings and self.embed_tokens.shares_storage_with(self.lm_head)
        embedding = 0 if tied_output else self.embed_tokens.nbytes
        return sum(linear.nbytes for linear in linears) + norms + embedding

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


def sanitize(config: ModelConfig, tensors: dict[str, Weight]) -> dict[str, Weight]:
    """Checkpoint quirks: tied models may store the shared matrix under either name."""
    if (
        config.tie_word_embeddings
        and "model.embed_tokens.weight" not in tensors
        and "lm_head.weight" in tensors
    ):
        tensors = {**tensors, "model.embed_tokens.weight": tensors["lm_head.weight"]}
    return tensors


def expected_tensor_names(config: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for index in range(config.num_layers):
        prefix = f"model.layers.{index}."
        names += [prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"]
        names += [prefix + f"self_attn.{name}_proj.weight" for name in "qkvo"]
        names += [prefix + f"mlp.{name}_proj.weight" for name in ("gate", "up", "down")]
    return names


def check_tensor_shapes(config: ModelConfig, tensors: dict[str, Weight]) -> None:
    """Every weight's shape against the config: a wrong one is a load error naming the tensor, never a
    shape error mid-generation (or, in the native decode step, a read past a buffer)."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    expected: dict[str, tuple[int | None, ...]] = {
        "model.embed_tokens.weight": (None, hidden),  # rows: the vocabulary, which files pad differently
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        expected["lm_head.weight"] = (None, hidden)
    for index in range(config.num_layers):
        prefix = f"model.layers.{index}."
        expected |= {
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (q_size, hidden),
            prefix + "self_attn.k_proj.weight": (kv_size, hidden),
            prefix + "self_attn.v_proj.weight": (kv_size, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, q_size),
            prefix + "mlp.gate_proj.weight": (intermediate, hidden),
            prefix + "mlp.up_proj.weight": (intermediate, hidden),
            prefix + "mlp.down_proj.weight": (hidden, intermediate),
        }
        for name, size in (("q", q_size), ("k", kv_size), ("v", kv_size)):
            expected[prefix + f"self_attn.{name}_proj.bias"] = (size,)
    for name, shape in expected.items():
        if name not in tensors:
            continue  # biases are optional; required tensors were checked already
        actual = tuple(tensors[name].shape)
        if len(actual) != len(shape) or any(want not in (None, got) for want, got in zip(shape, actual)):
            wanted = "(" + ", ".join("any" if size is None else str(size) for size in shape) + ")"
            raise ModelLoadError(f"tensor {name} has shape {actual}; the config implies {wanted}")


def _take_rows(weight: Weight, order: torch.Tensor | None) -> Weight:
    """Rows of a float or block-quantized weight (or bias) in a new order; blocks lie along rows."""
    if order is None:
        return weight
    if isinstance(weight, torch.Tensor):
        return weight[order]
    return dataclasses.replace(weight, data=weight.data[order.numpy()])


def _as_float(weight: Weight) -> torch.Tensor:
    return weight if isinstance(weight, torch.Tensor) else weight.dequantize(torch.float32)
