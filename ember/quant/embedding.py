"""Token embedding lookup from a float or block-quantized table.

A quantized table (SmolLM2 ships its 49152 x 576 embedding as Q8_0) stays
quantized in memory and only the looked-up rows are dequantized, so the
embedding costs its file size rather than a float32 copy.
"""

from __future__ import annotations

from typing import Any

import torch


class TokenEmbedding:
    def __init__(self, table: Any, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = device
        if isinstance(table, torch.Tensor):
            self.table: torch.Tensor | None = table.to(device, dtype)
            self.blocks = None
        else:
            self.table = None
            self.blocks = table  # BlockQuantizedTensor, rows = tokens
        self.num_embeddings, self.embedding_dim = (
            self.table.shape if self.table is not None else self.blocks.shape
        )

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(...) int64 -> (..., embedding_dim) in the model dtype."""
        if self.table is not None:
            return torch.nn.functional.embedding(token_ids, self.table)
        from ember.quant.ggml_dequant import dequantize

        flat_ids = token_ids.reshape(-1).cpu().numpy()
        rows = dequantize(
            self.blocks.quant_type, self.blocks.data[flat_ids], (len(flat_ids), self.embedding_dim)
        )  # (tokens, embedding_dim)
        return rows.to(self.device, self.dtype).view(*token_ids.shape, self.embedding_dim)

    def shares_storage_with(self, layer: object) -> bool:
        """Whether a (tied) output layer reads this very table, so its bytes count once."""
        weight = getattr(layer, "weight", None)
        return (
            self.table is not None
            and isinstance(weight, torch.Tensor)
            and weight.data_ptr() == self.table.data_ptr()
        )

    @property
    def nbytes(self) -> int:
        if self.table is not None:
            return self.table.numel() * self.table.element_size()
        return self.blocks.nbytes
