"""GGML block-quantized tensors, kept as raw bytes until a layer decides their form.

A GGUF (or rwkv.cpp) tensor stays a view into the memory-mapped file; the
layer that uses it either repacks the blocks for a low-bit kernel or
dequantizes them, so a model never pays for a float copy it does not need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class BlockQuantizedTensor:
    name: str
    quant_type: str  # GGML type name: "Q4_1", "Q8_0", "Q6_K", ...
    shape: tuple[int, ...]  # PyTorch order, e.g. (out_features, in_features)
    data: np.ndarray  # uint8, (rows, bytes_per_row): raw blocks, usually a memmap view

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from ember.quant.ggml_dequant import dequantize

        return dequantize(self.quant_type, self.data, self.shape).to(dtype)
