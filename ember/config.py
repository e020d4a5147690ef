"""One description of a model's shape, whatever file it came from.

HF `config.json`, GGUF metadata and RWKV checkpoints all end up as a
`ModelConfig`; models read nothing else. Derived sizes (head_dim, kv heads)
are filled in once, in `__post_init__`, and bad values raise errors a user
can act on.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import ModelLoadError, UnsupportedArchitectureError

# model_type values whose math `models/llama.py` implements.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED_ARCHITECTURES = LLAMA_FAMILY
SUPPORTED_ROPE_SCALING = ("default", "linear", "dynamic", "llama3")
# Optional tensor of per-frequency RoPE divisors: how GGUF files store llama3 scaling.
ROPE_FREQ_FACTORS = "model.rotary_emb.freq_factors"


@dataclass
class ModelConfig:
    architecture: str  # "llama", "mistral", "qwen2"
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    num_kv_heads: int | None = None  # None: same as num_heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF-style dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    sliding_window: int | None = None  # Mistral: attend to at most this many past positions
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, for `ember info`

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {self.architecture!r}; "
                f"ember supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ModelLoadError(
                    f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_SCALING:
                raise ModelLoadError(
                    f"unsupported rope_scaling type {rope_type!r}; "
                    f"supported: {', '.join(SUPPORTED_ROPE_SCALING)}"
                )
        if isinstance(self.eos_token_ids, int):
            self.eos_token_ids = [self.eos_token_ids]

    @property
    def num_query_groups(self) -> int:
        """How many query heads share one key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF `config.json`; unknown keys are ignored."""
        model_type = raw.get("model_type")
        if model_type is None:
            raise ModelLoadError("config.json has no model_type field")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {model_type!r}; "
                f"ember supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # Nested text configs (multimodal wrappers) are not ours to handle.
        required = {
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
            "vocab_size": "vocab_size",
        }
        missing = [hf_name for hf_name in required.values() if hf_name not in raw]
        if missing:
            raise ModelLoadError(f"config.json is missing required field(s): {', '.join(missing)}")
        values: dict[str, Any] = {ours: raw[hf_name] for ours, hf_name in required.items()}

        rope_scaling = raw.get("rope_scaling")
        rope_theta = raw.get("rope_theta", 10000.0)
        # transformers 5 moved rope settings into `rope_parameters`.
        rope_parameters = raw.get("rope_parameters")
        if isinstance(rope_parameters, dict):
            rope_theta = rope_parameters.get("rope_theta", rope_theta)
            if rope_parameters.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None

        sliding_window = raw.get("sliding_window")
        if model_type == "qwen2" and not raw.get("use_sliding_window", False):
            # Qwen2 configs carry a sliding_window value but disable it by default.
            sliding_window = None

        eos = raw.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            architecture=model_type,
            num_kv_heads=raw.get("num_key_value_heads"),
            head_dim=raw.get("head_dim"),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v biases; Llama makes them optional.
            attention_bias=model_type == "qwen2" or raw.get("attention_bias", False),
            sliding_window=sliding_window,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            **values,
        )

    @classmethod
    def from_hf_file(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"{path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ModelLoadError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path} does not hold a JSON object")
        return cls.from_hf_dict(raw)
