"""Qwen3: the Llama decoder with an RMS norm on each query and key head before rotary embedding.

Everything else (no q/k/v bias, grouped-query attention, SwiGLU MLP, tied or
untied output) is Llama's, so `Qwen3Model` is a `LlamaModel` whose fused q/k/v
projection is wrapped in `QKNormedProjection`: the wrapper returns q and k
already normed, and every path of the Llama forward (PyTorch prefill, the
per-layer native decode loop, CUDA graphs) calls `layer.qkv_proj` and so runs
the norms. The one-call native decode (`NativeDecodeLayers`) calls the
projection's kernel directly from C, so it reads the wrapper's `head_norms()`
and norms the heads itself (native_decode.cpp).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ember import native_ops, ops
from ember.config import ModelConfig
from ember.errors import ModelLoadError
from ember.models.llama import LinearFactory, LlamaModel, Weight, _as_float
from ember.native_decode import NativeDecodeLayers


class QKNormedProjection:
    """A fused q/k/v projection followed by per-head RMS norms of q and k: `layer(x)` like any linear.

    The q/k norm weights arrive already in the pairwise rotary order of the q/k rows
    (`rotary_order`), since the norm of a head is unchanged by reordering its elements.
    """

    def __init__(
        self,
        projection: Callable[[torch.Tensor], torch.Tensor],
        query_norm: torch.Tensor,  # (head_dim,) in the projection's row order
        key_norm: torch.Tensor,  # (head_dim,)
        num_heads: int,
        num_kv_heads: int,
        eps: float,
    ):
        self.projection = projection
        self.query_norm, self.key_norm = query_norm, key_norm
        self.head_dim = query_norm.numel()
        self.sizes = [num_heads * self.head_dim, num_kv_heads * self.head_dim, num_kv_heads * self.head_dim]
        self.eps = eps
        self.in_features = projection.in_features
        self.out_features = projection.out_features

    @property
    def nbytes(self) -> int:
        return self.projection.nbytes + self.query_norm.nbytes + self.key_norm.nbytes

    @property
    def kernel_name(self) -> str:
        """The projection's kernel, for `ember info`; the norms run in PyTorch after it."""
        from ember.quant.describe import describe_layer

        return describe_layer(self.projection) + ", q/k norm"

    def dequantized_weight(self) -> torch.Tensor:
        return self.projection.dequantized_weight()

    def head_norms(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor, float]:
        """(inner projection, q norm, k norm, eps), for the one-call native decode to run the norms."""
        return self.projection, self.query_norm, self.key_norm, self.eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., (heads + 2 * kv_heads) * head_dim) with q and k normed per head."""
        projected = self.projection(x)
        if projected.dtype == torch.float32 and projected.device.type == "cpu" and projected.is_contiguous():
            rows = projected.numel() // self.out_features
            library = native_ops.load() if rows <= _NATIVE_NORM_ROWS else None
            if library is not None:  # few rows (decode): normed in place, as the one-call native decode does
                return self._norm_heads_in_place(library, projected, rows)
        query, key, value = projected.split(self.sizes, dim=-1)
        query = ops.rms_norm(query.unflatten(-1, (-1, self.head_dim)), self.query_norm, self.eps)
        key = ops.rms_norm(key.unflatten(-1, (-1, self.head_dim)), self.key_norm, self.eps)
        return torch.cat([query.flatten(-2), key.flatten(-2), value], dim=-1)

    def _norm_heads_in_place(self, library, projected: torch.Tensor, rows: int) -> torch.Tensor:
        """Each row's query heads and key heads RMS-normed in place by the native operator (Gemma 3's
        decode step calls its projections from Python: PyTorch's split, norms and concatenation were
        about 100 us of a layer's ~600)."""
        heads, kv_heads = self.sizes[0] // self.head_dim, self.sizes[1] // self.head_dim
        base, row_bytes, float_bytes = projected.data_ptr(), self.out_features * 4, 4
        for row in range(rows):
            query = base + row * row_bytes
            key = query + self.sizes[0] * float_bytes
            for start, count, weight in ((query, heads, self.query_norm), (key, kv_heads, self.key_norm)):
                norm = weight.data_ptr()
                library.ember_add_rms_norm(start, None, norm, count, self.head_dim, self.eps, start)
        return projected


_NATIVE_NORM_ROWS = 32  # rows up to which QKNormedProjection norms in place with the native operator


def rotary_order(head_dim: int) -> torch.Tensor:
    """The element order `ops.interleave_rope_rows` gives each head: 0, half, 1, half + 1, ..."""
    return ops.interleave_rope_rows(1, head_dim)


def check_qk_norms(config: ModelConfig, tensors: dict[str, Weight], prefix: str = "model.layers") -> None:
    """Every layer's q_norm and k_norm, present and of size head_dim (a load error naming the tensor)."""
    for index in range(config.num_layers):
        for name in ("q_norm", "k_norm"):
            full_name = f"{prefix}.{index}.self_attn.{name}.weight"
            if full_name not in tensors:
                raise ModelLoadError(f"the checkpoint lacks tensor {full_name}")
            shape = tuple(tensors[full_name].shape)
            if shape != (config.head_dim,):
                raise ModelLoadError(
                    f"tensor {full_name} has shape {shape}; the config implies ({config.head_dim},)"
                )


def qk_norm_weights(
    config: ModelConfig, tensors: dict[str, Weight], index: int, device: torch.device, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `index`'s q and k norm weights (+ offset: Gemma's 1 + w) in the rotary row order, float32."""
    order = rotary_order(config.head_dim)
    prefix = f"model.layers.{index}.self_attn."
    return tuple(
        (_as_float(tensors[prefix + f"{name}.weight"]).float()[order] + offset).to(device)
        for name in ("q_norm", "k_norm")
    )


class Qwen3Model(LlamaModel):
    """`LlamaModel` with Qwen3's q/k norms inside each layer's q/k/v projection."""

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
        check_qk_norms(config, tensors)
        super().__init__(config, tensors, linear_factory, dtype, device, on_layer_built, decode_graphs)
        for index, layer in enumerate(self.layers):
            query_norm, key_norm = qk_norm_weights(config, tensors, index, self.device)
            layer.qkv_proj = QKNormedProjection(
                layer.qkv_proj,
                query_norm,
                key_norm,
                config.num_heads,
                config.num_kv_heads,
                config.rms_norm_eps,
            )
        if self.native_layers is not None:  # built before the wrappers: again, with the head norms
            self.native_layers = NativeDecodeLayers.build(
                self._native_ops, self.layers, self.final_norm, config.rms_norm_eps
            )
