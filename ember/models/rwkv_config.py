"""The shape of an RWKV model (v4 to v7), told from its tensors.

RWKV checkpoints carry no config file: the version, sizes and head count
follow from which tensors exist and their shapes. Both readers (`.pth` and
rwkv.cpp `.bin`) hand the model tensors in one canonical layout (rwkv.cpp's,
see `ember/formats/rwkv_layout.py`), so this one function serves both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ember.errors import ModelLoadError

RWKV_VERSIONS = ("4", "5", "5.1", "5.2", "6", "7")
# An RNN has no positional limit; this only bounds what one request may ask for.
RWKV_CONTEXT_LENGTH = 1 << 20


@dataclass
class RWKVConfig:
    version: str  # "4", "5" (5.0: per-head decay, no gate), "5.1" (gate), "5.2", "6", "7"
    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int  # channel-mixing width
    num_heads: int = 1  # v4 has no heads: one "head" per channel, reported as 1
    head_size: int = 0
    # v5 group norm epsilon on ln_x: 64e-5 for BlinkDL checkpoints, 1e-5 for rwkv.cpp's v5 files.
    group_norm_eps: float = 64e-5
    max_position_embeddings: int = RWKV_CONTEXT_LENGTH
    architecture: str = "rwkv"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=lambda: [0])
    torch_dtype: str | None = None
    # what ember info and the generic code read about transformer models
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.version not in RWKV_VERSIONS:
            raise ModelLoadError(
                f"unknown RWKV version {self.version!r}; ember reads {', '.join(RWKV_VERSIONS)}"
            )
        for name in ("hidden_size", "num_layers", "vocab_size", "intermediate_size", "num_heads"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"RWKV {name} must be positive, got {getattr(self, name)}")
        if self.head_size == 0:
            self.head_size = self.hidden_size // self.num_heads
        if self.num_heads * self.head_size != self.hidden_size:
            raise ModelLoadError(
                f"RWKV width {self.hidden_size} is not {self.num_heads} heads of size {self.head_size}"
            )

    @property
    def major(self) -> int:
        return int(float(self.version))

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.head_size

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
