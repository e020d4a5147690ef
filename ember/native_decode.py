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
without a native kernel) keeps the per-layer loop.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

# C++ compiled into the operator library (appended to `native_ops.SOURCE`), so it calls the fused operators
# directly.
LAYERS_SOURCE = r"""
namespace {

typedef void (*MatmulKernel)(const float* x, int64_t rows, int64_t columns, const void* weight,
                             int64_t out_features, float* y, int nthreads);

struct NativeLinear {
    int64_t kernel, weight, in_features, out_features;
};

struct DecodeLayer {  // addresses as int64, filled once per model from Python
    int64_t input_norm, post_attention_norm;
    NativeLinear qkv, o, gate_up, down;
};
static_assert(sizeof(DecodeLayer) == 18 * sizeof(int64_t), "DecodeLayer is 18 int64 values");

struct DecodeBuffers {  // per step, each (batch, its width) float32
    float *hidden, *normed, *qkv, *projected, *gate_up, *activation, *delta;
};
static_assert(sizeof(DecodeBuffers) == 7 * sizeof(int64_t), "DecodeBuffers is 7 addresses");

inline void project(const NativeLinear& linear, const float* x, int64_t rows, float* y, int nthreads) {
    const MatmulKernel kernel = (MatmulKernel)linear.kernel;
    kernel(x, rows, linear.in_features, (const void*)linear.weight, linear.out_features, y, nthreads);
}

}  // namespace

// All layers of one decode step: buffers->hidden (batch, hidden) is the residual stream, updated in place;
// buffers->normed ends as the final RMS norm of it, ready for the output layer. caches: (layers, 2)
// addresses of each layer's key and value cache; attention: the step's DecodeArguments (its out is the
// attention output buffer).
extern "C" void ember_decode_layers(const DecodeLayer* layers, int64_t num_layers, const int64_t* caches,
                                    const DecodeArguments* attention, const DecodeBuffers* buffers,
                                    int64_t hidden_size, int64_t intermediate_size, float eps,
                                    const float* final_norm, int nthreads) {
    const int64_t rows = attention->batch;
    const float* delta = nullptr;  // the previous layer's MLP output, added to the residual stream
    for (int64_t index = 0; index < num_layers; index++) {
        const DecodeLayer& layer = layers[index];
        ember_add_rms_norm(buffers->hidden, delta, (const float*)layer.input_norm, rows, hidden_size, eps,
                           buffers->normed);
        project(layer.qkv, buffers->normed, rows, buffers->qkv, nthreads);
        ember_decode_attention(attention, buffers->qkv, (float*)caches[2 * index],
                               (float*)caches[2 * index + 1]);
        project(layer.o, attention->out, rows, buffers->projected, nthreads);
        ember_add_rms_norm(buffers->hidden, buffers->projected, (const float*)layer.post_attention_norm, rows,
                           hidden_size, eps, buffers->normed);
        project(layer.gate_up, buffers->normed, rows, buffers->gate_up, nthreads);
        ember_silu_mul(buffers->gate_up, rows, intermediate_size, buffers->activation);
        project(layer.down, buffers->activation, rows, buffers->delta, nthreads);
        delta = buffers->delta;
    }
    ember_add_rms_norm(buffers->hidden, delta, final_norm, rows, hidden_size, eps, buffers->normed);
}
"""


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
        self._table = table  # (layers, 18) int64: the C struct DecodeLayer per layer
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
            for projection in projections:
                native = getattr(projection, "native_kernel", lambda: None)()
                if native is None:
                    return None
                kernel, weight, kernel_rows = native
                row += [kernel, weight.data_ptr(), projection.in_features, projection.out_features]
                keep_alive.append(weight)
                max_rows = kernel_rows if max_rows is None else min(max_rows, kernel_rows)
            rows.append(row)
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
        """(layers, 2) int64 addresses of the key and value caches, remade when the cache reallocates."""
        if kv_cache.layout_version != self._layout_version:
            if len(kv_cache.keys) != self._table.shape[0]:
                raise ValueError(f"a cache of {len(kv_cache.keys)} layers for {self._table.shape[0]} layers")
            addresses = [
                [keys.data_ptr(), values.data_ptr()] for keys, values in zip(kv_cache.keys, kv_cache.values)
            ]
            self._cache_addresses = torch.tensor(addresses, dtype=torch.int64)
            self._layout_version = kv_cache.layout_version
        return self._cache_addresses
