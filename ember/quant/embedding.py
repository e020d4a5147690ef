"""Token embedding lookup from a float table, a block-quantized table, or a tied output layer.

A quantized table (SmolLM2 ships its 49152 x 576 embedding as Q8_0) stays
quantized in memory and only the looked-up rows are dequantized. When the
embedding is tied to the output layer and that layer can hand out rows
(`Q8Linear.rows`), the lookup reads the output layer's own weights, so the
matrix is held once.
"""

from __future__ import annotations

from typing import Any

import torch


class TokenEmbedding:
    def __init__(self, table: Any, dtype: torch.dtype, device: torch.device, tied_output: Any = None):
        self.dtype = dtype
        self.device = device
        self.table: torch.Tensor | None = None
        self.blocks = None
        self.tied_output = None
        if (
            tied_output is not None
            and getattr(tied_output, "backend", None) == "native"
            and hasattr(tied_output, "rows")
        ):
            self.tied_output = tied_output
        elif isinstance(table, torch.Tensor):
            self.table = table.to(device, dtype)
        else:
            self.blocks = table  # BlockQuantizedTensor, rows = tokens
        self.num_embeddings, self.embedding_dim = tuple(table.shape)

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(...) int64 -> (..., embedding_dim) in the model dtype."""
        if self.table is not None:
            return torch.nn.functional.embedding(token_ids, self.table)
        if self.tied_output is not None:
            return self.tied_output.rows(token_ids.cpu()).to(self.device, self.dtype)
        from ember.quant.ggml_dequant import dequantize

        flat_ids = token_ids.reshape(-1).cpu().numpy()
        rows = dequantize(
            self.blocks.quant_type, self.blocks.data[flat_ids], (len(flat_ids), self.embedding_dim)
        )  # (tokens, embedding_dim)
        return rows.to(self.device, self.dtype).view(*token_ids.shape, self.embedding_dim)

    def shares_storage_with(self, layer: object) -> bool:
        """Whether a (tied) output layer holds this very matrix, so its bytes count once."""
        if self.tied_output is not None:
            return layer is self.tied_output
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
        if self.tied_output is not None:
            return 0
        return self.blocks.nbytes
