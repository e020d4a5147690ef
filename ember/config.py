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
# Each with its own model file: Llama plus q/k norms, Phi-3's fused weights, Qwen3's experts, Gemma 3.
SUPPORTED_ARCHITECTURES = (*LLAMA_FAMILY, "qwen3", "phi3", "qwen3_moe", "gemma3")
# HF model_type values that name one of ours differently (Gemma 3's text-only checkpoints).
HF_MODEL_TYPES = {"gemma3_text": "gemma3"}
SUPPORTED_ROPE_SCALING = ("default", "linear", "dynamic", "llama3", "longrope")
# Scalings only some architectures implement (longrope: Phi-3's short/long factors).
ARCHITECTURE_ROPE_SCALING = {"longrope": ("phi3",)}
# Optional tensor of per-frequency RoPE divisors: how GGUF files store llama3 scaling.
ROPE_FREQ_FACTORS = "model.rotary_emb.freq_factors"


@dataclass
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
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
    # Mixture of experts (Qwen3-MoE): each MoE layer routes a token to its top `num_experts_per_token` of
    # `num_experts` gated MLPs of width `moe_intermediate_size`; layers listed in `dense_layers` (and those
    # off the `sparse_step` grid) keep one dense MLP of `intermediate_size`.
    num_experts: int = 0
    num_experts_per_token: int = 0
    moe_intermediate_size: int | None = None
    normalize_top_k: bool = True  # expert weights renormalized over the chosen top k
    sparse_step: int = 1
    dense_layers: list[int] = field(default_factory=list)
    # Gemma 3: per-layer attention kind ("sliding_attention" or "full_attention"; None: all full, with
    # `sliding_window` applied to every layer as in Mistral), the local layers' rotary base, the query
    # scale 1/sqrt(query_pre_attn_scalar), and tanh soft-capping of the final logits.
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None

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
            allowed = ARCHITECTURE_ROPE_SCALING.get(rope_type)
            if allowed is not None and self.architecture not in allowed:
                raise ModelLoadError(
                    f"rope_scaling type {rope_type!r} is not supported for {self.architecture}"
                )
        if isinstance(self.eos_token_ids, int):
            self.eos_token_ids = [self.eos_token_ids]
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ModelLoadError(
                    f"layer_types lists {len(self.layer_types)} layers for {self.num_layers} layers"
                )
            unknown = set(self.layer_types) - {"sliding_attention", "full_attention"}
            if unknown:
                raise ModelLoadError(f"unknown layer type(s) {', '.join(sorted(unknown))}")
        if self.num_experts:
            if not 0 < self.num_experts_per_token <= self.num_experts:
                raise ModelLoadError(
                    f"num_experts_per_tok {self.num_experts_per_token} must lie in 1..{self.num_experts}"
                )
            if not self.moe_intermediate_size or self.moe_intermediate_size <= 0:
                raise ModelLoadError("a mixture-of-experts config needs a positive moe_intermediate_size")
            if self.sparse_step <= 0:
                raise ModelLoadError(f"decoder_sparse_step must be positive, got {self.sparse_step}")

    def is_sliding_layer(self, index: int) -> bool:
        """Whether layer `index` attends within `sliding_window` (every layer when no layer types are set)."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[index] == "sliding_attention"

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` routes to experts (Qwen3-MoE's `mlp_only_layers` and sparse step)."""
        return self.num_experts > 0 and index not in self.dense_layers and (index + 1) % self.sparse_step == 0

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
        if model_type == "gemma3" and "text_config" in raw:
            raise UnsupportedArchitectureError(
                "this is a multimodal Gemma 3 checkpoint; ember runs text-only ones (model_type gemma3_text)"
            )
        model_type = HF_MODEL_TYPES.get(model_type, model_type)
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
        if model_type in ("qwen2", "qwen3", "qwen3_moe") and not raw.get("use_sliding_window", False):
            # Qwen configs carry a sliding_window value but disable it by default.
            sliding_window = None
        extra: dict[str, Any] = {}
        if model_type == "phi3":
            rope_scaling = _phi3_rope_scaling(raw, rope_scaling)
        elif model_type == "qwen3_moe":
            extra = _moe_fields(raw)
        elif model_type == "gemma3":
            extra, rope_theta, rope_scaling = _gemma3_fields(raw)
        if (
            float(
                raw.get("partial_rotary_factor", (rope_parameters or {}).get("partial_rotary_factor", 1.0))
                or 1.0
            )
            != 1.0
        ):
            raise ModelLoadError(
                "partial rotary embeddings (partial_rotary_factor below 1) are not supported"
            )

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
            tie_word_embeddings=raw.get("tie_word_embeddings", model_type == "gemma3"),
            # Qwen2 always has q/k/v biases; Llama makes them optional.
            attention_bias=model_type == "qwen2" or raw.get("attention_bias", False),
            sliding_window=sliding_window,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            **values,
            **extra,
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


def _phi3_rope_scaling(raw: dict[str, Any], rope_scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Phi-3's LongRoPE ("su" and "yarn" in older configs) with the pretrained length it switches at."""
    if rope_scaling is None:
        return None
    rope_scaling = dict(rope_scaling)
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type in ("su", "yarn", "longrope"):
        rope_scaling["rope_type"] = "longrope"
        rope_scaling.pop("type", None)
        rope_scaling.setdefault(
            "original_max_position_embeddings",
            raw.get("original_max_position_embeddings", raw.get("max_position_embeddings", 4096)),
        )
        for name in ("short_factor", "long_factor"):
            if not isinstance(rope_scaling.get(name), list):
                raise ModelLoadError(f"Phi-3 longrope scaling needs a {name} list")
    return rope_scaling


def _moe_fields(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_experts": raw.get("num_experts")
        or raw.get("num_local_experts")
        or 0,  # transformers 5 writes the latter
        "num_experts_per_token": raw.get("num_experts_per_tok", 0),
        "moe_intermediate_size": raw.get("moe_intermediate_size"),
        "normalize_top_k": bool(raw.get("norm_topk_prob", False)),
        "sparse_step": raw.get("decoder_sparse_step", 1),
        "dense_layers": list(raw.get("mlp_only_layers") or []),
    }


def _gemma3_fields(raw: dict[str, Any]) -> tuple[dict[str, Any], float, dict[str, Any] | None]:
    """Gemma 3's per-layer attention kinds and rotary settings: (fields, global theta, global scaling).

    transformers 5 writes `rope_parameters` per layer type; older configs have `rope_theta`,
    `rope_local_base_freq` and a `rope_scaling` of the global layers.
    """
    if raw.get("attn_logit_softcapping") is not None:
        raise ModelLoadError("Gemma attention logit soft-capping (Gemma 2) is not supported")
    if raw.get("use_bidirectional_attention"):
        raise ModelLoadError("Gemma 3 with bidirectional attention (an embedding model) is not supported")
    activation = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelLoadError(
            f"Gemma 3 with activation {activation!r} is not supported (gelu_pytorch_tanh is)"
        )
    num_layers = raw["num_hidden_layers"]
    layer_types = raw.get("layer_types")
    if layer_types is None:
        pattern = raw.get("sliding_window_pattern", 6)
        layer_types = [
            "sliding_attention" if (index + 1) % pattern else "full_attention" for index in range(num_layers)
        ]
    parameters = raw.get("rope_parameters")
    if isinstance(parameters, dict) and "full_attention" in parameters:
        full = dict(parameters.get("full_attention") or {})
        local = dict(parameters.get("sliding_attention") or {})
    else:
        full = dict(raw.get("rope_scaling") or {})
        full.setdefault("rope_theta", raw.get("rope_theta", 1_000_000.0))
        local = {"rope_theta": raw.get("rope_local_base_freq", 10_000.0)}
    if local.get("rope_type", "default") != "default":
        raise ModelLoadError("rope scaling on Gemma 3's sliding-window layers is not supported")
    global_theta = float(full.pop("rope_theta", 1_000_000.0))
    scaling = None if full.get("rope_type", full.get("type", "default")) == "default" else full
    fields = {
        "layer_types": list(layer_types),
        "rope_local_theta": float(local.get("rope_theta", 10_000.0)),
        "query_pre_attn_scalar": float(raw.get("query_pre_attn_scalar", 256)),
        "final_logit_softcapping": raw.get("final_logit_softcapping"),
    }
    return fields, global_theta, scaling
