"""rwkv.cpp `.bin` files as a `Checkpoint`.

Layout (FORMATS.md): six little-endian int32 (magic 0x67676d66, file version
100 or 101, n_vocab, n_embed, n_layer, data type), then tensors to the end of
the file, each an int32 dim_count, key_length and data_type, the shape in
ggml order (PyTorch's reversed), the UTF-8 key and the data. The tensors are
already in ember's canonical RWKV layout (`rwkv_layout.py`); quantized ones
stay raw blocks (`BlockQuantizedTensor`, the same blocks as GGUF) until the
model's linear factory decides their form, float ones are views of the
memory-mapped file.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from ember.errors import ModelLoadError
from ember.formats.checkpoint import Checkpoint
from ember.formats.rwkv_layout import check_tensors, config_from_tensors
from ember.quant.ggml_blocks import BlockQuantizedTensor
from ember.quant.ggml_dequant import BLOCK_SIZES

RWKV_CPP_MAGIC = 0x67676D66
FILE_VERSIONS = (100, 101)
# rwkv.cpp's own data type numbering -> GGML type name
DATA_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q5_0", 8: "Q5_1", 9: "Q8_0"}
# rwkv.cpp leaves these v5 group norms at ggml's default epsilon (the reference logits use it)
RWKV_CPP_V5_GROUP_NORM_EPS = 1e-5


def has_rwkv_cpp_magic(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4)
    return len(head) == 4 and struct.unpack("<i", head)[0] == RWKV_CPP_MAGIC


def read_rwkv_cpp_tensors(path: Path) -> tuple[dict[str, object], dict[str, object]]:
    """(name -> tensor, header facts) of an rwkv.cpp file; bad or truncated files raise ModelLoadError."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise ModelLoadError(f"{path} is too short to be an rwkv.cpp model file")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    magic, file_version, n_vocab, n_embed, n_layer, data_type = struct.unpack("<6i", data[:24].tobytes())
    if magic != RWKV_CPP_MAGIC:
        raise ModelLoadError(f"{path} is not an rwkv.cpp model file (magic {magic:#x})")
    if file_version not in FILE_VERSIONS:
        raise ModelLoadError(f"{path}: unsupported rwkv.cpp file version {file_version}")
    tensors: dict[str, object] = {}
    type_counts: dict[str, int] = {}
    offset = 24
    while offset < size:
        if offset + 12 > size:
            raise ModelLoadError(f"{path} is truncated (a tensor header is cut off at byte {offset})")
        dim_count, key_length, tensor_type = struct.unpack("<3i", data[offset : offset + 12].tobytes())
        offset += 12
        if not 1 <= dim_count <= 4 or not 0 < key_length < 1024 or tensor_type not in DATA_TYPES:
            raise ModelLoadError(f"{path}: corrupt tensor header at byte {offset - 12}")
        if offset + 4 * dim_count + key_length > size:
            raise ModelLoadError(f"{path} is truncated (a tensor header is cut off at byte {offset})")
        ggml_shape = struct.unpack(f"<{dim_count}i", data[offset : offset + 4 * dim_count].tobytes())
        offset += 4 * dim_count
        try:
            name = data[offset : offset + key_length].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"{path}: a tensor name is not UTF-8 (byte {offset})") from None
        offset += key_length
        shape = tuple(int(n) for n in reversed(ggml_shape))
        if any(n <= 0 for n in shape):
            raise ModelLoadError(f"{path}: tensor {name} has an invalid shape {shape}")
        type_name = DATA_TYPES[tensor_type]
        block_values, block_bytes = BLOCK_SIZES[type_name]
        num_values = int(np.prod(shape))
        if num_values % block_values or shape[-1] % block_values:
            raise ModelLoadError(f"{path}: tensor {name} of type {type_name} has rows of {shape[-1]} values")
        num_bytes = num_values // block_values * block_bytes
        if offset + num_bytes > size:
            raise ModelLoadError(f"{path} is truncated (tensor {name} needs {num_bytes} bytes)")
        raw = data[offset : offset + num_bytes]
        offset += num_bytes
        tensors[name] = _tensor(name, type_name, shape, raw)
        type_counts[type_name] = type_counts.get(type_name, 0) + num_values
    header = {
        "file_version": file_version,
        "n_vocab": n_vocab,
        "n_embed": n_embed,
        "n_layer": n_layer,
        "data_type": DATA_TYPES.get(data_type, str(data_type)),
        "type_counts": type_counts,
    }
    return tensors, header


def _tensor(name: str, type_name: str, shape: tuple[int, ...], raw: np.ndarray) -> object:
    if type_name in ("F32", "F16"):
        dtype = np.float32 if type_name == "F32" else np.float16
        with warnings.catch_warnings():
            # a read-only mapping: nothing writes to these views
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(raw.view(dtype).reshape(shape))
    rows = int(np.prod(shape[:-1]))
    return BlockQuantizedTensor(name=name, quant_type=type_name, shape=shape, data=raw.reshape(rows, -1))


def read_rwkv_cpp(path: Path, tokenizer: str | None = None) -> Checkpoint:
    """An rwkv.cpp file as a Checkpoint (config told from its tensors, tokenizer from its vocabulary
    size unless `tokenizer` names a kind or a file, see `parse_tokenizer_spec`)."""
    from ember.rwkv_tokenizer import load_rwkv_tokenizer, parse_tokenizer_spec

    tokenizer_kind, tokenizer_path = parse_tokenizer_spec(tokenizer)

    path = Path(path)
    tensors, header = read_rwkv_cpp_tensors(path)
    config = config_from_tensors(tensors, group_norm_eps_v5=RWKV_CPP_V5_GROUP_NORM_EPS)
    if (config.vocab_size, config.hidden_size, config.num_layers) != (
        header["n_vocab"],
        header["n_embed"],
        header["n_layer"],
    ):
        raise ModelLoadError(f"{path}: the header's sizes disagree with its tensors")
    check_tensors(config, tensors)
    loaded_tokenizer = load_rwkv_tokenizer(
        config.vocab_size, model_path=path, kind=tokenizer_kind, tokenizer_path=tokenizer_path
    )
    counts = header["type_counts"]
    total = sum(counts.values())
    quantized = {name: count for name, count in counts.items() if name not in ("F32", "F16")}
    bulk = max(quantized, key=quantized.get) if quantized else None
    details = {
        "rwkv_version": config.version,
        "file_version": header["file_version"],
        "file_size": path.stat().st_size,
        "quant_types": {name: count / total for name, count in counts.items()},
        "tokenizer": loaded_tokenizer.kind,
        # every block type runs from its own bytes ("int8" keeps Q5 blocks as stored, on the GGML kernels)
        "default_quant": {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4", "Q5_0": "int8", "Q5_1": "int8"}.get(
            bulk, "none"
        ),
    }
    return Checkpoint(config, tensors, loaded_tokenizer, path, "rwkv.cpp", details)
