"""Every decoder layer of a decode step in one native call, where every projection has a native kernel.

After the fused operators (`native_ops`) and the native matrix kernels, what was
left of a batch-1 decode step's overhead was Python: per layer four linear
wrappers and three operator wrappers, each a few microseconds of attribute
lookups, checks, `torch.empty` and ctypes argument conversion, ~0.6 ms of a
~4 ms SmolLM2 step. Here the model hands the layers' weights and kernels to C
once, as a table of addresses, and each step is one ctypes call that runs
norm -> q/k/v -> attention -> o -> norm -> gate/up -> silu -> down for every
layer, calling the same kernels in the same order.

A projection takes part through its `native_kernel()`: the address of a C
function with the tile kernels' signature `(x, rows, columns, weight,
out_features, y, threads)`, the weight's address, and the most rows the kernel
serves. A model whose projections do not all have one (a bias, a weight form
without a native kernel) keeps the per-layer loop. A q/k/v projection that
norms each query and key head after it (Qwen3's `QKNormedProjection`) takes
part through `head_norms()`: its inner projection, the two norm weights and
their epsilon, which must be the layers' own.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import torch

# C++ compiled into the operator library after `native_ops.cpp`, so it calls the fused operators directly.
LAYERS_SOURCE_FILE = Path(__file__).with_name("native_decode.cpp")


def declare(library: ctypes.CDLL) -> None:
    pointer = ctypes.c_void_p
    library.ember_decode_layers.argtypes = [
        pointer, ctypes.c_int64, pointer, pointer, pointer, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
        pointer, ctypes.c_int,
    ]  # fmt: skip
    library.ember_decode_layers.restype = None


def function_address(function: Any) -> int:
    """The address of a ctypes function, for a table the C side calls through."""
    return ctypes.cast(function, ctypes.c_void_p).value


class NativeDecodeLayers:
    """The layers' norms, kernels and weights as one table; `__call__` runs them for one decode step."""

    def __init__(
        self,
        library: ctypes.CDLL,
        table: torch.Tensor,
        sizes: tuple[int, int, int, int],
        final_norm: torch.Tensor,
        eps: float,
        max_rows: int,
        keep_alive: list[Any],
    ):
        self._function = library.ember_decode_layers
        self._table = table  # (layers, 20) int64: the C struct DecodeLayer per layer
        # hidden, (heads + 2 * kv_heads) * head_dim, heads * head_dim, intermediate: every layer's, checked
        self.hidden_size, self._qkv_size, self._q_size, self._intermediate_size = sizes
        self._final_norm, self._eps = final_norm, eps
        self.max_rows = max_rows  # the most sequences every kernel serves
        self._keep_alive = keep_alive  # the tensors whose addresses the table holds
        self._layout_version: int | None = None  # of the cache `_cache_addresses` was read from
        self._cache_addresses: torch.Tensor | None = None  # (layers, 2) int64

    @classmethod
    def build(
        cls, library: ctypes.CDLL, layers: list[Any], final_norm: torch.Tensor, eps: float
    ) -> NativeDecodeLayers | None:
        """The table for `layers` (LlamaLayer), or None when a projection has no native kernel or the
        sizes do not chain (the C loop sizes its buffers from the first layer)."""
        if not layers:
            return None
        first = layers[0]
        hidden, qkv_size = first.qkv_proj.in_features, first.qkv_proj.out_features
        q_size, intermediate = first.o_proj.in_features, first.down_proj.in_features
        chained = [(hidden, qkv_size), (q_size, hidden), (hidden, 2 * intermediate), (intermediate, hidden)]
        if final_norm.numel() != hidden:
            return None
        rows, max_rows, keep_alive = [], None, [final_norm]
        for layer in layers:
            projections = (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
            shapes = [(projection.in_features, projection.out_features) for projection in projections]
            norms = (layer.input_norm.numel(), layer.post_attention_norm.numel())
            if shapes != chained or norms != (hidden, hidden):
                return None
            row = [layer.input_norm.data_ptr(), layer.post_attention_norm.data_ptr()]
            keep_alive += [layer.input_norm, layer.post_attention_norm]
            head_norms = [0, 0]  # q and k norm addresses, 0: none
            if hasattr(layer.qkv_proj, "head_norms"):
                inner, query_norm, key_norm, norm_eps = layer.qkv_proj.head_norms()
                if norm_eps != eps:
                    return None
                projections = (inner, *projections[1:])
                head_norms = [query_norm.data_ptr(), key_norm.data_ptr()]
                keep_alive += [query_norm, key_norm]
            for projection in projections:
                native = getattr(projection, "native_kernel", lambda: None)()
                if native is None:
                    return None
                kernel, weight, kernel_rows = native
                row += [kernel, weight.data_ptr(), projection.in_features, projection.out_features]
                keep_alive.append(weight)
                max_rows = kernel_rows if max_rows is None else min(max_rows, kernel_rows)
            rows.append(row + head_norms)
        sizes = (hidden, qkv_size, q_size, intermediate)
        table = torch.tensor(rows, dtype=torch.int64)
        return cls(library, table, sizes, final_norm, eps, max_rows, keep_alive)

    def __call__(self, hidden: torch.Tensor, attention: Any, kv_cache: Any) -> torch.Tensor:
        """hidden (batch, hidden_size) float32, updated in place -> the final RMS norm of the result.

        `attention` is the step's `native_ops.DecodeAttention` (rotations, slots, positions, output),
        made for the same model: its output is (batch, heads * head_dim).
        """
        batch_size, hidden_size = hidden.shape
        if hidden_size != self.hidden_size or attention.out.shape != (batch_size, self._q_size):
            raise ValueError(  # a caller's bug, never user input: the C loop must not overrun a buffer
                f"a decode step of shape {tuple(hidden.shape)} (attention {tuple(attention.out.shape)}) "
                f"for layers of width {self.hidden_size} (attention {self._q_size})"
            )
        if batch_size > self.max_rows:
            raise ValueError(f"{batch_size} sequences exceed the kernels' {self.max_rows} rows")
        normed = torch.empty_like(hidden)
        buffers = [
            hidden,
            normed,
            torch.empty(batch_size, self._qkv_size),
            torch.empty(batch_size, hidden_size),
            torch.empty(batch_size, 2 * self._intermediate_size),
            torch.empty(batch_size, self._intermediate_size),
            torch.empty(batch_size, hidden_size),
        ]
        addresses = torch.tensor([buffer.data_ptr() for buffer in buffers], dtype=torch.int64)
        self._function(
            self._table.data_ptr(),
            self._table.shape[0],
            self._caches(kv_cache).data_ptr(),
            attention.address,
            addresses.data_ptr(),
            hidden_size,
            self._intermediate_size,
            self._eps,
            self._final_norm.data_ptr(),
            torch.get_num_threads(),
        )
        return normed

    def _caches(self, kv_cache: Any) -> torch.Tensor:
        """(layers, 2) int64 addresses of the key and value pools, remade for another cache."""
        if kv_cache.layout_version != self._layout_version:
            pools = list(zip(kv_cache.key_pools, kv_cache.value_pools))
            if len(pools) != self._table.shape[0]:
                raise ValueError(f"a cache of {len(pools)} layers for {self._table.shape[0]} layers")
            addresses = [[keys.data_ptr(), values.data_ptr()] for keys, values in pools]
            self._cache_addresses = torch.tensor(addresses, dtype=torch.int64)
            self._layout_version = kv_cache.layout_version
        return self._cache_addresses
