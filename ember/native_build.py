"""Build C++ kernels from their source files on first use, and load them once per process.

The native kernels (`native_ops.cpp`, `native_decode.cpp`, `quant/*_kernel.cpp`,
`quant/ggml_kernels.cpp`, `models/rwkv_wkv.cpp`) ship as C++ source, not
binaries: the first use compiles it with the system's g++ (`-march=native`)
into `~/.cache/ember/kernels`, keyed by source, flags and CPU. Where that cannot
happen (no compiler, a CPU without the needed instructions, not Linux) `load()`
returns None with a reason, and callers fall back to PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch  # noqa: F401  (imported first so a library's libgomp resolves to torch's: one OpenMP pool)

COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def read_source(path: Path) -> str:
    """A kernel's C++ with the headers it includes from its own folder (`#include "name.h"`) written in
    place: one translation unit to compile, and one text whose hash says when to rebuild."""
    lines = []
    for line in path.read_text().splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith('#include "') and stripped.endswith('"'):
            header = path.with_name(stripped[len('#include "') : -1])
            lines.extend(
                header_line
                for header_line in read_source(header).splitlines(keepends=True)
                if header_line.strip() != "#pragma once"
            )
        else:
            lines.append(line)
    return "".join(lines)


class NativeLibrary:
    """One kernel library: its source, the CPU flags it needs, and the ctypes signatures it declares."""

    def __init__(
        self,
        name: str,
        source: str,
        required_flags: Sequence[str] = (),
        declare: Callable[[ctypes.CDLL], None] | None = None,
    ):
        self.name = name
        self.source = source
        self.required_flags = tuple(required_flags)
        self._declare = declare
        self._lock = threading.Lock()
        self._tried = False
        self._library: ctypes.CDLL | None = None
        self.failure_reason: str | None = None  # why load() returned None, for reports and tests

    def load(self) -> ctypes.CDLL | None:
        """The compiled library, or None where this machine cannot build or run it (tried once)."""
        if self._tried:
            return self._library
        with self._lock:
            if not self._tried:
                library, reason = open_library(self.source, self.name, self.required_flags)
                if library is None:
                    self.failure_reason = reason
                elif self._declare is not None:
                    self._declare(library)
                self._library = library
                self._tried = True
        return self._library


def open_library(source: str, name: str, required_flags: Sequence[str]) -> tuple[ctypes.CDLL | None, str]:
    """Build (or find in the cache) and open a kernel library: (library, "") or (None, why not)."""
    flags = _cpu_flags()
    missing = [flag for flag in required_flags if flag not in flags]
    if sys.platform != "linux" or missing:
        return None, f"CPU lacks {', '.join(missing)}" if missing else "not Linux"
    try:
        return ctypes.CDLL(str(_build(source, name, flags))), ""
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        return None, f"build failed: {error} {detail.decode(errors='replace')[:300]}".strip()


def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU has bfloat16 products in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN emulates
    them: on an AVX2 EPYC a bfloat16 matrix product ran about 90x slower than float32's, and it still
    rounds every output to bfloat16."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


@functools.cache  # read once per process: the CPU does not change under it
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ember" / "kernels"


def _build(source: str, name: str, flags: frozenset[str]) -> Path:
    """Compile `source` into the cache (once per source, flags and CPU), atomically."""
    key = hashlib.sha256(
        "\n".join([source, " ".join(COMPILE_FLAGS), " ".join(sorted(flags))]).encode()
    ).hexdigest()[:16]
    folder = _cache_folder()
    library_path = folder / f"{name}_{key}.so"
    if library_path.exists():
        return library_path
    folder.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "g++")
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        source_path = Path(scratch) / f"{name}.cpp"
        source_path.write_text(source)
        output_path = Path(scratch) / f"{name}.so"
        subprocess.run(
            [compiler, *COMPILE_FLAGS, str(source_path), "-o", str(output_path)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(output_path, library_path)
    return library_path
