"""Qwen3-MoE: Qwen3's attention (q/k norms) with a mixture-of-experts MLP in each sparse layer.

A router (a float (experts, hidden) matrix) scores every token; the token goes
to its top k experts, each a SwiGLU MLP of `moe_intermediate_size`, and their
outputs are summed with the router's softmax probabilities (renormalized over
the k when `norm_topk_prob`). Experts run batched per step: each expert chosen
by any token of the call runs once over all the rows that chose it, so a
decode step of N sequences costs at most min(N * k, experts) small products
per projection, not N * k.

The layer loop is its own (the Llama one has a dense MLP built in) and runs on
PyTorch operators only: the native decode paths and CUDA graphs of
`LlamaModel` assume a dense MLP and are not used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ember import ops
from ember.cache import KVCache
from ember.config import ModelConfig
from ember.errors import ModelLoadError
from ember.models.batch import ForwardBatch
from ember.models.llama import LinearFactory, Weight, _as_float, _take_rows, sanitize
from ember.models.qwen3 import QKNormedProjection, check_qk_norms, qk_norm_weights
from ember.models.self_attention import ragged_key_lengths, self_attention
from ember.quant.embedding import TokenEmbedding

Projection = Callable[[torch.Tensor], torch.Tensor]


class DenseMLP:
    """silu(gate) * up -> down, as in Llama."""

    def __init__(self, gate_up_proj: Projection, down_proj: Projection):
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(ops.swiglu(gate, up))

    @property
    def nbytes(self) -> int:
        return self.gate_up_proj.nbytes + self.down_proj.nbytes


class SparseMoE:
    """Top-k routing over expert MLPs, each expert run once per call over the rows routed to it."""

    def __init__(self, router: torch.Tensor, experts: list[DenseMLP], top_k: int, normalize_top_k: bool):
        self.router = router  # (experts, hidden) in the model dtype
        self.experts = experts
        self.top_k, self.normalize_top_k = top_k, normalize_top_k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., hidden)."""
        rows = x.reshape(-1, x.shape[-1])  # (tokens, hidden)
        probabilities = torch.softmax(rows @ self.router.T, dim=-1, dtype=torch.float32)  # (tokens, experts)
        weights, chosen = torch.topk(probabilities, self.top_k, dim=-1)  # (tokens, k)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        output = torch.zeros_like(rows)
        for expert in chosen.unique().tolist():  # ascending, as transformers adds them
            token_index, rank = torch.nonzero(chosen == expert, as_tuple=True)
            expert_output = self.experts[expert](rows[token_index])  # (routed tokens, hidden)
            output.index_add_(0, token_index, expert_output * weights[token_index, rank, None])
        return output.view_as(x)

    @property
    def nbytes(self) -> int:
        return self.router.nbytes + sum(expert.nbytes for expert in self.experts)


@dataclass
class MoeLayer:
    input_norm: torch.Tensor  # (hidden,)
    qkv_proj: QKNormedProjection  # hidden -> (heads + 2 * kv_heads) * head_dim, q and k normed
    o_proj: Projection  # heads * head_dim -> hidden
    post_attention_norm: torch.Tensor  # (hidden,)
    mlp: DenseMLP | SparseMoE


def expert_weights(config: ModelConfig, tensors: dict[str, Weight], prefix: str) -> list[tuple[Weight, ...]]:
    """(gate, up, down) of each expert of the layer at `prefix` ("model.layers.3.mlp."), from per-expert
    tensors (`experts.{e}.gate_proj.weight`, ...) or transformers 5's stacked 3-D ones
    (`experts.gate_up_proj` (experts, 2 * width, hidden), `experts.down_proj` (experts, hidden, width))."""
    width, hidden = config.moe_intermediate_size, config.hidden_size
    if prefix + "experts.gate_up_proj" in tensors:
        gate_up, down = tensors[prefix + "experts.gate_up_proj"], tensors.get(prefix + "experts.down_proj")
        if tuple(gate_up.shape) != (config.num_experts, 2 * width, hidden) or down is None:
            raise ModelLoadError(f"tensor {prefix}experts.gate_up_proj has shape {tuple(gate_up.shape)}")
        return [(*gate_up[e].split(width), down[e]) for e in range(config.num_experts)]
    experts = []
    for expert in range(config.num_experts):
        names = [f"{prefix}experts.{expert}.{part}_proj.weight" for part in ("gate", "up", "down")]
        shapes = [(width, hidden), (width, hidden), (hidden, width)]
        for name, shape in zip(names, shapes):
            if name not in tensors:
                raise ModelLoadError(f"the checkpoint lacks tensor {name}")
            if tuple(tensors[name].shape) != shape:
                raise ModelLoadError(
                    f"tensor {name} has shape {tuple(tensors[name].shape)}; expected {shape}"
                )
        experts.append(tuple(tensors[name] for name in names))
    return experts


class Qwen3MoeModel:
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
        tensors = sanitize(config, tensors)
        check_qk_norms(config, tensors)
        self.native_layers = self.decode_graphs = None  # see the module docstring

        def tensor(name: str, shape: tuple[int | None, ...]) -> Weight:
            if name not in tensors:
                raise ModelLoadError(f"the checkpoint lacks tensor {name}")
            actual = tuple(tensors[name].shape)
            if len(actual) != len(shape) or any(want not in (None, got) for want, got in zip(shape, actual)):
                raise ModelLoadError(f"tensor {name} has shape {actual}; the config implies {shape}")
            return tensors[name]

        def norm(name: str) -> torch.Tensor:
            return _as_float(tensor(name, (config.hidden_size,))).to(self.device, torch.float32)

        hidden, query = config.hidden_size, config.num_heads * config.head_dim
        key_value = config.num_kv_heads * config.head_dim
        q_order = ops.interleave_rope_rows(config.num_heads, config.head_dim)
        k_order = ops.interleave_rope_rows(config.num_kv_heads, config.head_dim)
        self.layers: list[MoeLayer] = []
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
            query_norm, key_norm = qk_norm_weights(config, tensors, index, self.device)
            if config.is_moe_layer(index):
                router = tensor(prefix + "mlp.gate.weight", (config.num_experts, hidden))
                experts = [
                    DenseMLP(linear_factory([gate, up], None), linear_factory([down], None))
                    for gate, up, down in expert_weights(config, tensors, prefix + "mlp.")
                ]
                mlp = SparseMoE(
                    _as_float(router).to(self.device, dtype),
                    experts,
                    config.num_experts_per_token,
                    config.normalize_top_k,
                )
            else:
                width = config.intermediate_size
                gate_up = [
                    tensor(prefix + f"mlp.{name}_proj.weight", (width, hidden)) for name in ("gate", "up")
                ]
                mlp = DenseMLP(
                    linear_factory(gate_up, None),
                    linear_factory([tensor(prefix + "mlp.down_proj.weight", (hidden, width))], None),
                )
            self.layers.append(
                MoeLayer(
                    input_norm=norm(prefix + "input_layernorm.weight"),
                    qkv_proj=QKNormedProjection(
                        linear_factory(qkv, None),
                        query_norm,
                        key_norm,
                        config.num_heads,
                        config.num_kv_heads,
                        config.rms_norm_eps,
                    ),
                    o_proj=linear_factory([tensor(attention + "o_proj.weight", (hidden, query))], None),
                    post_attention_norm=norm(prefix + "post_attention_layernorm.weight"),
                    mlp=mlp,
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
        self.inverse_frequencies = ops.rope_inverse_frequencies(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings
        )[0].to(self.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """Logits (batch, new_tokens or 1, vocab) in float32 for the batch's new tokens."""
        config, eps = self.config, self.config.rms_norm_eps
        hidden = self.embed_tokens(batch.token_ids)  # (batch, new, hidden)
        rotations = ops.rope_rotations(self.inverse_frequencies, batch.positions)  # (batch, new, dim/2)
        key_lengths = ragged_key_lengths(batch, self.device)
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv_proj(ops.rms_norm(hidden, layer.input_norm, eps))
            attended = self_attention(
                config, index, qkv, rotations, batch, kv_cache, key_lengths, config.sliding_window
            )  # (batch, new, heads * head_dim)
            hidden = hidden + layer.o_proj(attended)
            hidden = hidden + layer.mlp(ops.rms_norm(hidden, layer.post_attention_norm, eps))
        if not batch.all_logits:
            hidden = hidden[:, -1:]
        return self.lm_head(ops.rms_norm(hidden, self.final_norm, eps)).float()

    def named_linears(self) -> list[tuple[str, Projection]]:
        """Every linear layer with a name saying where it sits, for `ember info`'s kernel table."""
        named: list[tuple[str, Projection]] = [("lm_head", self.lm_head)]
        for index, layer in enumerate(self.layers):
            prefix = f"layers.{index}."
            named += [(prefix + "qkv_proj", layer.qkv_proj), (prefix + "o_proj", layer.o_proj)]
            experts = layer.mlp.experts if isinstance(layer.mlp, SparseMoE) else [layer.mlp]
            for number, expert in enumerate(experts):
                mlp = prefix + (f"experts.{number}." if isinstance(layer.mlp, SparseMoE) else "mlp.")
                named += [(mlp + "gate_up_proj", expert.gate_up_proj), (mlp + "down_proj", expert.down_proj)]
        return named

    def weight_bytes(self) -> int:
        """Resident bytes of the weights in their in-memory form."""
        total = self.lm_head.nbytes + self.final_norm.nbytes
        if not (self.config.tie_word_embeddings and self.embed_tokens.shares_storage_with(self.lm_head)):
            total += self.embed_tokens.nbytes
        for layer in self.layers:
            total += layer.qkv_proj.nbytes + layer.o_proj.nbytes + layer.mlp.nbytes
            total += layer.input_norm.nbytes + layer.post_attention_norm.nbytes
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
