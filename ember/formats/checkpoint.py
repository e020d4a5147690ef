"""What every format reader returns."""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ember.config import ModelConfig
from ember.tokenizer import Tokenizer

if TYPE_CHECKING:  # a runtime import would cycle through ember.models
    from ember.models.rwkv_config import RWKVConfig


@dataclass
class Checkpoint:
    """What every format reader returns: config, named tensors (HF names), tokenizer."""

    config: ModelConfig | RWKVConfig
    tensors: dict[str, Any]  # torch.Tensor or BlockQuantizedTensor
    tokenizer: Tokenizer
    path: Path
    format: str  # "safetensors" or "gguf"
    details: dict[str, Any] = field(default_factory=dict)  # format facts for `ember info`

    def release_file_pages(self) -> None:
        """Drop the memory-mapped file pages read so far from this process's resident memory.

        Block-quantized weights are views into the model file; once a layer has
        repacked them, their pages only inflate resident memory. The kernel
        reads them in again if something still needs them (nothing is lost).
        """
        released: set[int] = set()
        for tensor in self.tensors.values():
            mapping = _file_mapping(getattr(tensor, "data", None))
            if mapping is not None and id(mapping) not in released:
                released.add(id(mapping))
                mapping.madvise(mmap.MADV_DONTNEED)


def _file_mapping(array: object) -> mmap.mmap | None:
    """The mmap object behind a numpy view of a memory-mapped file, if any."""
    while isinstance(array, np.ndarray):
        if isinstance(array, np.memmap) and isinstance(getattr(array, "_mmap", None), mmap.mmap):
            return array._mmap
        array = array.base
    return array if isinstance(array, mmap.mmap) else None
