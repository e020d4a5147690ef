"""GGUF files (llama.cpp's format) as a config plus HF-named tensors.

The file is memory-mapped: float tensors are torch views of the map and
quantized ones stay raw blocks (`BlockQuantizedTensor`), so reading costs no
dequantization and almost no memory. Two things are undone here so models see
the HF layout: llama.cpp's tensor names, and the row order its converter gives
the Q and K projections of llama-architecture files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ember.config import ModelConfig
from ember.errors import ModelLoadError, UnsupportedArchitectureError
from ember.formats.gguf_architectures import (
    GGUF_ARCHITECTURES,
    PHI3_ROPE_FACTORS,
    architecture_fields,
    layer_names,
    transform_tensors,
)
from ember.formats.gguf_metadata import read_metadata
from ember.formats.gguf_reader import open_gguf
from ember.quant.ggml_blocks import BlockQuantizedTensor
from ember.quant.ggml_dequant import BLOCK_SIZES

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama3-style RoPE: per-frequency divisors, which llama.cpp stores instead of rope_scaling.
_ROPE_FREQS = "rope_freqs.weight"


@dataclass
class TensorTypeShare:
    """How much of a checkpoint's weights one GGML type holds."""

    num_tensors: int
    num_parameters: int
    num_bytes: int
    parameter_share: float  # fraction of all parameters
    byte_share: float  # fraction of all tensor bytes


@dataclass
class GGUFSummary:
    """What `ember info` shows about a GGUF file."""

    path: Path
    architecture: str
    name: str | None
    gguf_version: int
    file_size: int
    context_length: int
    has_chat_template: bool
    num_parameters: int
    tensor_types: dict[str, TensorTypeShare]  # GGML type name -> share, largest first


@dataclass
class GGUFCheckpoint:
    config: ModelConfig
    # HF transformers names -> float tensors (memmap views) or raw quantized blocks
    tensors: dict[str, torch.Tensor | BlockQuantizedTensor]
    metadata: dict[str, Any]
    path: Path
    gguf_version: int
    file_size: int
    tensor_types: dict[str, str]  # HF name -> GGML type name ("Q4_1", "F32", ...)
    # llama3-style RoPE frequency divisors ((head_dim // 2,) float32) when the file has them
    rope_freq_factors: torch.Tensor | None = None

    def summary(self) -> GGUFSummary:
        counts: dict[str, list[int]] = {}
        for name, tensor in self.tensors.items():
            numel = _numel(tensor)
            block_values, block_bytes = BLOCK_SIZES[self.tensor_types[name]]
            entry = counts.setdefault(self.tensor_types[name], [0, 0, 0])
            entry[0] += 1
            entry[1] += numel
            entry[2] += numel // block_values * block_bytes
        total_parameters = sum(entry[1] for entry in counts.values())
        total_bytes = sum(entry[2] for entry in counts.values())
        shares = {
            quant_type: TensorTypeShare(
                num_tensors=entry[0],
                num_parameters=entry[1],
                num_bytes=entry[2],
                parameter_share=entry[1] / total_parameters,
                byte_share=entry[2] / total_bytes,
            )
            for quant_type, entry in sorted(counts.items(), key=lambda item: -item[1][2])
        }
        return GGUFSummary(
            path=self.path,
            architecture=self.metadata["general.architecture"],
            name=self.metadata.get("general.name"),
            gguf_version=self.gguf_version,
            file_size=self.file_size,
            context_length=self.config.context_length,
            has_chat_template=bool(self.metadata.get("tokenizer.chat_template")),
            num_parameters=total_parameters,
            tensor_types=shares,
        )


def _type_name(tensor: torch.Tensor | BlockQuantizedTensor) -> str:
    """The GGML type a loaded tensor came as ("Q4_K", "F16", ...)."""
    if isinstance(tensor, BlockQuantizedTensor):
        return tensor.quant_type
    return {dtype: name for name, dtype in FLOAT_TYPES.items()}[tensor.dtype]


def _numel(tensor: torch.Tensor | BlockQuantizedTensor) -> int:
    if isinstance(tensor, BlockQuantizedTensor):
        return int(np.prod(tensor.shape))
    return tensor.numel()


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Config, HF-named tensors and metadata of a GGUF file of one of `GGUF_ARCHITECTURES`."""
    path = Path(path)
    reader = open_gguf(path)
    metadata = read_metadata(reader)
    architecture = metadata.get("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported GGUF architecture {architecture!r} in {path.name}; "
            f"ember reads: {', '.join(GGUF_ARCHITECTURES)}"
        )
    if metadata.get(f"{architecture}.expert_count", 0) > 0 and architecture != "qwen3moe":
        raise UnsupportedArchitectureError(
            f"{path.name} is a mixture-of-experts model, which ember does not run"
        )

    raw_tensors: dict[str, gguf.ReaderTensor] = {}
    rope_freq_factors = None
    settings: dict[str, torch.Tensor] = {}  # tensors that are config values (Phi-3's rope factors)
    names = layer_names(architecture)
    for tensor in reader.tensors:
        quant_type = tensor.tensor_type.name
        if quant_type not in BLOCK_SIZES:
            raise ModelLoadError(
                f"tensor {tensor.name!r} in {path.name} has GGML type {quant_type}, which ember cannot read; "
                f"supported: {', '.join(BLOCK_SIZES)}"
            )
        if tensor.name == _ROPE_FREQS:
            rope_freq_factors = _float_tensor(tensor).float().reshape(-1)
            continue
        if architecture == "phi3" and tensor.name in PHI3_ROPE_FACTORS:
            settings[PHI3_ROPE_FACTORS[tensor.name]] = _float_tensor(tensor)
            continue
        raw_tensors[_hf_name(tensor.name, path, names)] = tensor

    config = _config_from_metadata(metadata, architecture, raw_tensors, settings)
    if architecture in ("llama", "qwen2"):
        _check_shapes(config, raw_tensors, path)
    # other architectures' models check each tensor's presence and shape as they build
    tensors: dict[str, torch.Tensor | BlockQuantizedTensor] = {}
    for name, tensor in raw_tensors.items():
        tensors[name] = _load_tensor(name, tensor)
        if architecture == "llama":
            if ".self_attn.q_proj." in name:
                tensors[name] = _unpermute_rows(tensors[name], config.num_heads)
            elif ".self_attn.k_proj." in name:
                tensors[name] = _unpermute_rows(tensors[name], config.num_kv_heads)
    tensors = transform_tensors(architecture, tensors, config.num_experts)
    return GGUFCheckpoint(
        config=config,
        tensors=tensors,
        metadata=metadata,
        path=path,
        gguf_version=int(reader.fields["GGUF.version"].parts[0][0]),
        file_size=path.stat().st_size,
        tensor_types={  # split tensors (Qwen3-MoE experts) take their type from the loaded views
            name: raw_tensors[name].tensor_type.name if name in raw_tensors else _type_name(tensor)
            for name, tensor in tensors.items()
        },
        rope_freq_factors=rope_freq_factors,
    )


def _hf_name(gguf_name: str, path: Path, names: dict[str, str]) -> str:
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match is None or match.group(2) not in names:
        raise ModelLoadError(f"{path.name} has a tensor ember does not know: {gguf_name!r}")
    layer, role, kind = match.groups()
    return f"model.layers.{layer}.{names[role]}.{kind}"


def _metadata_float(value: Any) -> float:
    """GGUF stores floats as float32; give back the short decimal (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _config_from_metadata(
    metadata: dict[str, Any],
    architecture: str,
    raw_tensors: dict[str, gguf.ReaderTensor],
    settings: dict[str, torch.Tensor] | None = None,
) -> ModelConfig:
    def required(key: str) -> Any:
        full_key = f"{architecture}.{key}"
        if full_key not in metadata:
            raise ModelLoadError(f"GGUF metadata lacks {full_key}")
        return metadata[full_key]

    def optional(key: str, default: Any = None) -> Any:
        return metadata.get(f"{architecture}.{key}", default)

    if "model.embed_tokens.weight" not in raw_tensors:
        raise ModelLoadError("GGUF file has no token embedding (token_embd.weight)")
    vocab_size = optional("vocab_size")
    if vocab_size is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocab_size = len(tokens) if tokens else int(raw_tensors["model.embed_tokens.weight"].shape[1])

    num_heads = required("attention.head_count")
    head_dim = optional("attention.key_length")
    if head_dim is not None and optional("attention.value_length", head_dim) != head_dim:
        raise ModelLoadError("GGUF files with different key and value head sizes are not supported")
    rotary_dims = optional("rope.dimension_count")
    if rotary_dims is not None and rotary_dims != (head_dim or required("embedding_length") // num_heads):
        raise ModelLoadError(f"partial rotary embeddings ({rotary_dims} dimensions) are not supported")

    scaling_type = optional("rope.scaling.type", "none")
    scaling_factor = optional("rope.scaling.factor", optional("rope.scale_linear"))
    rope_scaling = None
    if scaling_type != "none" or scaling_factor not in (None, 1.0):
        rope_scaling = {"rope_type": "linear" if scaling_type == "none" else scaling_type}
        if scaling_factor is not None:
            rope_scaling["factor"] = _metadata_float(scaling_factor)
        if optional("rope.scaling.original_context_length") is not None:
            rope_scaling["original_max_position_embeddings"] = optional(
                "rope.scaling.original_context_length"
            )

    eos_ids = [
        metadata[key]
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if metadata.get(key) is not None
    ]
    file_type = metadata.get("general.file_type")
    has_bias = any(name.endswith("_proj.bias") for name in raw_tensors)
    extra = {"rope_scaling": rope_scaling, **architecture_fields(architecture, optional, settings or {})}
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[architecture],
        hidden_size=required("embedding_length"),
        num_layers=required("block_count"),
        num_heads=num_heads,
        intermediate_size=required("feed_forward_length"),
        vocab_size=vocab_size,
        num_kv_heads=optional("attention.head_count_kv"),
        head_dim=head_dim,
        rms_norm_eps=_metadata_float(required("attention.layer_norm_rms_epsilon")),
        rope_theta=_metadata_float(optional("rope.freq_base", 10000.0)),
        max_position_embeddings=optional("context_length", 2048),
        tie_word_embeddings="lm_head.weight" not in raw_tensors,
        attention_bias=architecture == "qwen2" or has_bias,
        # llama.cpp runs Qwen with full attention whatever the file says; so does HF by default.
        sliding_window=None if architecture.startswith("qwen") else optional("attention.sliding_window"),
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        torch_dtype=_file_type_name(file_type),
        **extra,
    )


def _file_type_name(file_type: int | None) -> str | None:
    """llama.cpp's file type ("Q4_K_M", "F16", ...) for `ember info`."""
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return None


def _check_shapes(config: ModelConfig, raw_tensors: dict[str, gguf.ReaderTensor], path: Path) -> None:
    """Every tensor the model needs, with the shape the config implies (PyTorch order)."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    query, key_value = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    expected = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        expected["lm_head.weight"] = (config.vocab_size, hidden)
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        expected |= {
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (query, hidden),
            prefix + "self_attn.k_proj.weight": (key_value, hidden),
            prefix + "self_attn.v_proj.weight": (key_value, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, query),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "mlp.gate_proj.weight": (ffn, hidden),
            prefix + "mlp.up_proj.weight": (ffn, hidden),
            prefix + "mlp.down_proj.weight": (hidden, ffn),
        }
        if config.attention_bias:
            expected |= {
                prefix + "self_attn.q_proj.bias": (query,),
                prefix + "self_attn.k_proj.bias": (key_value,),
                prefix + "self_attn.v_proj.bias": (key_value,),
            }
            if (
                config.architecture == "llama"
            ):  # HF Llama's attention_bias covers o_proj too; Qwen2's does not
                expected[prefix + "self_attn.o_proj.bias"] = (hidden,)
    for name, shape in expected.items():
        if name not in raw_tensors:
            raise ModelLoadError(f"{path.name} lacks tensor {name} (a {config.architecture} model needs it)")
        actual = tuple(reversed([int(size) for size in raw_tensors[name].shape]))
        if actual != shape:
            raise ModelLoadError(f"tensor {name} in {path.name} has shape {actual}, expected {shape}")
    extra = sorted(set(raw_tensors) - set(expected))
    if extra:
        raise ModelLoadError(
            f"{path.name} has tensors a {config.architecture} model does not use, e.g. {extra[0]}"
        )


def _float_tensor(tensor: gguf.ReaderTensor) -> torch.Tensor:
    """A zero-copy torch view of an F32/F16/BF16 tensor, in PyTorch order."""
    shape = tuple(reversed([int(size) for size in tensor.shape]))
    raw = torch.from_numpy(tensor.data.reshape(-1).view(np.uint8))
    return raw.view(FLOAT_TYPES[tensor.tensor_type.name]).view(shape)


def _load_tensor(name: str, tensor: gguf.ReaderTensor) -> torch.Tensor | BlockQuantizedTensor:
    quant_type = tensor.tensor_type.name
    if quant_type in FLOAT_TYPES:
        values = _float_tensor(tensor)
        return values.float() if values.dim() == 1 else values
    shape = tuple(reversed([int(size) for size in tensor.shape]))
    bytes_per_row = shape[-1] // BLOCK_SIZES[quant_type][0] * BLOCK_SIZES[quant_type][1]
    return BlockQuantizedTensor(
        name=name, quant_type=quant_type, shape=shape, data=tensor.data.reshape(-1, bytes_per_row)
    )


def _unpermute_rows(
    tensor: torch.Tensor | BlockQuantizedTensor, num_heads: int
) -> torch.Tensor | BlockQuantizedTensor:
    """Undo convert_hf_to_gguf's `LlamaModel.permute` on a Q or K projection (weight or bias).

    The converter reorders each head's rows from (pair half, index) to (index, pair half) to
    suit ggml's interleaved RoPE; HF's rotate_half wants the original order. Quantized blocks
    run along the input dimension, so moving whole rows of blocks is exact. This copies only
    these rows.
    """
    num_rows = tensor.shape[0]
    half = num_rows // num_heads // 2
    order = torch.arange(num_rows).view(num_heads, half, 2).transpose(1, 2).reshape(-1)
    if isinstance(tensor, BlockQuantizedTensor):
        return BlockQuantizedTensor(
            name=tensor.name,
            quant_type=tensor.quant_type,
            shape=tensor.shape,
            data=tensor.data[order.numpy()],
        )
    return tensor[order]
