"""HF model folders: config.json, tokenizer files and safetensors weights (single or sharded)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ember.config import ModelConfig
from ember.errors import ModelLoadError
from ember.formats.checkpoint import Checkpoint
from ember.tokenizer import Tokenizer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def read_hf_folder(folder: Path) -> Checkpoint:
    folder = Path(folder)
    config = ModelConfig.from_hf_file(folder / "config.json")
    tensors = read_safetensors_weights(folder)
    _check_vocabulary_rows(folder, config, tensors)
    tokenizer = Tokenizer.from_hf_folder(folder, config.bos_token_id, config.eos_token_ids)
    if tokenizer.bos_token_id is not None and config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    shard_files = sorted({str(p.name) for p in _weight_files(folder)})
    return Checkpoint(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        path=folder,
        format="safetensors",
        details={"files": shard_files, "dtypes": _dtype_shares(tensors)},
    )


VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _check_vocabulary_rows(folder: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    """config.json's vocab_size against the embedding's rows: a mismatch fails here, not at a prompt.

    HF builds both layers with `vocab_size` rows, so any difference means the config and the
    weights come from different models (or an edited config).
    """
    for name in VOCABULARY_TENSORS:
        tensor = tensors.get(name)
        if tensor is not None and tensor.dim() == 2 and tensor.shape[0] != config.vocab_size:
            raise ModelLoadError(
                f"{folder / 'config.json'} says vocab_size {config.vocab_size}, but tensor {name} has "
                f"{tensor.shape[0]} rows (the config and the weights disagree)"
            )


def read_safetensors_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors file(s), memory-mapped by safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        _check_safetensors_file(file)
        try:
            with safe_open(str(file), framework="pt") as reader:
                for name in reader.keys():
                    tensors[name] = reader.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as error:  # safetensors raises its own SafetensorError and others
            raise ModelLoadError(f"cannot read {file}: {error}") from None
    return tensors


def _weight_files(folder: Path) -> list[Path]:
    index_file = folder / INDEX_FILE
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ModelLoadError(f"{index_file} is not a valid safetensors index: {error}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.exists()]
        if missing:
            raise ModelLoadError(f"{folder} lacks shard(s) listed in {INDEX_FILE}: {', '.join(missing)}")
        return files
    if (folder / SINGLE_FILE).exists():
        return [folder / SINGLE_FILE]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    raise ModelLoadError(f"{folder} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")


def _check_safetensors_file(file: Path) -> None:
    """Catch truncation and corruption with a clear message before the library sees the file.

    A safetensors file is an 8-byte header length, a JSON header and the data;
    every tensor's byte range must lie inside the file.
    """
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ModelLoadError(f"{file} is truncated or not a safetensors file")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(size - 8, 100 << 20):
            raise ModelLoadError(f"{file} is truncated or not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{file} has a corrupt header (not valid JSON)") from None
    data_size = size - 8 - header_length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else 0
        if end > data_size:
            raise ModelLoadError(
                f"{file} is truncated: tensor {name} needs {end} bytes of data, the file has {data_size}"
            )


def _dtype_shares(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    total = sum(t.numel() for t in tensors.values()) or 1
    shares: dict[str, float] = {}
    for tensor in tensors.values():
        name = str(tensor.dtype).removeprefix("torch.")
        shares[name] = shares.get(name, 0.0) + tensor.numel() / total
    return shares
