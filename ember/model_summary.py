"""What a model file is (architecture, parameters, format, quantization, size), read from headers only.

`ember list` describes every local model each time it runs, so this never builds tensors or a tokenizer:
a GGUF file's metadata and tensor table (through the fast mapped reader), or a safetensors folder's
`config.json` and the JSON headers of its weight files.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError

_SAFETENSORS_DTYPE_NAMES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
    "I8": "int8", "U8": "uint8", "F8_E4M3": "float8_e4m3", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


@dataclass
class ModelSummary:
    architecture: str  # "llama", "qwen2", ... ("?" when the file does not say)
    num_parameters: int
    format: str  # "gguf" or "safetensors"
    quantization: str  # "Q4_K_M", "Q8_0", "float32", "bfloat16", ...
    size_bytes: int  # on disk, all the model's files


def summarize_model(path: Path) -> ModelSummary:
    """Describe a GGUF file, a folder holding one, or an HF safetensors folder; `EmberError` if unreadable."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").exists():
            return _summarize_safetensors_folder(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _summarize_gguf(ggufs[0])
        raise EmberError(f"{path} holds neither config.json nor a single .gguf file")
    if path.is_file():
        return _summarize_gguf(path)
    raise EmberError(f"{path} does not exist")


def folder_size(path: Path) -> int:
    """Bytes of the regular files under `path` (or of the file itself)."""
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def _summarize_gguf(path: Path) -> ModelSummary:
    import gguf

    from ember.formats.gguf_reader import open_gguf

    reader = open_gguf(path)  # ModelLoadError (an EmberError) for a damaged file
    fields = reader.fields

    def scalar(key: str) -> object:
        field = fields.get(key)
        return None if field is None else field.contents()

    architecture = str(scalar("general.architecture") or "?")
    num_parameters = sum(int(tensor.n_elements) for tensor in reader.tensors)
    quantization = None
    file_type = scalar("general.file_type")
    if file_type is not None:
        try:
            quantization = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            quantization = None
    if quantization in (None, "GUESSED", "ALL_F32"):
        # No (or a vague) file type: name the GGML type that holds most of the bytes.
        byte_counts: Counter[str] = Counter()
        for tensor in reader.tensors:
            byte_counts[tensor.tensor_type.name] += int(tensor.n_bytes)
        quantization = byte_counts.most_common(1)[0][0] if byte_counts else "?"
    return ModelSummary(
        architecture=architecture,
        num_parameters=num_parameters,
        format="gguf",
        quantization=quantization,
        size_bytes=path.stat().st_size,
    )


def _summarize_safetensors_folder(folder: Path) -> ModelSummary:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EmberError(f"{folder / 'config.json'} is unreadable: {error}") from None
    weight_files = sorted(folder.glob("*.safetensors"))
    if not weight_files:
        raise EmberError(f"{folder} has no .safetensors weights")
    num_parameters = 0
    dtype_counts: Counter[str] = Counter()
    for file in weight_files:
        for dtype, count in _safetensors_header_counts(file).items():
            num_parameters += count
            dtype_counts[dtype] += count
    dtype = dtype_counts.most_common(1)[0][0] if dtype_counts else "?"
    architecture = config.get("model_type") or (config.get("architectures") or ["?"])[0]
    return ModelSummary(
        architecture=str(architecture),
        num_parameters=num_parameters,
        format="safetensors",
        quantization=_SAFETENSORS_DTYPE_NAMES.get(dtype, dtype.lower()),
        size_bytes=folder_size(folder),
    )


def _safetensors_header_counts(file: Path) -> dict[str, int]:
    """Parameters per dtype, from the file's JSON header (8-byte length, then the header)."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise EmberError(f"{file} is truncated or not a safetensors file")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > 100 << 20:
            raise EmberError(f"{file} is not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EmberError(f"{file} has a corrupt header") from None
    counts: Counter[str] = Counter()
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        count = 1
        for size in info.get("shape", []):
            count *= int(size)
        counts[str(info.get("dtype", "?"))] += count
    return counts
