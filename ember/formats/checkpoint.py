"""What every format reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.config import ModelConfig
from ember.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    """What every format reader returns: config, named tensors (HF names), tokenizer."""

    config: ModelConfig
    tensors: dict[str, Any]  # torch.Tensor or BlockQuantizedTensor
    tokenizer: Tokenizer
    path: Path
    format: str  # "safetensors" or "gguf"
    details: dict[str, Any] = field(default_factory=dict)  # format facts for `ember info`
