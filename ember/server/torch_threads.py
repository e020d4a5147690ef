"""Torch's parallel threads belong to the engine: every other server thread computes on one thread.

Why: PyTorch's CPU build runs its parallel ops on GNU OpenMP, and every OS thread that
runs one gets a team of worker threads of its own, kept while that thread lives. Once all
teams together outnumber the CPUs, libgomp stops spinning between parallel regions, so
each op of the engine's forward waits for its workers to wake up. One `torch.zeros` of a
vocabulary-sized tensor in another live thread (a request's sampler, created in the
executor thread that admits it) was enough: one SmolLM2 stream decoded at ~65 tokens/s
instead of ~156 on 2 cores, over HTTP or not.

`use_one_torch_thread()` gives the calling thread a team of one (no workers) without
touching torch's default for other threads, so the engine's loop thread still uses
`--threads`. The server calls it on the event loop thread and in every executor thread.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("ember.server")

# (library file pattern in torch/lib, symbol): OpenMP's own pool, and MKL's per-thread count
# (MKL's C entry point: the lower-case `mkl_set_num_threads_local` there is the Fortran one, by pointer).
_SETTERS = (("libgomp*.so*", "omp_set_num_threads"), ("libtorch_cpu.so", "MKL_Set_Num_Threads_Local"))
_found: list[Callable[[int], object]] | None = None


def _thread_count_setters() -> list[Callable[[int], object]]:
    global _found
    if _found is None:
        import torch

        library_dir = Path(torch.__file__).resolve().parent / "lib"
        setters: list[Callable[[int], object]] = []
        for pattern, symbol in _SETTERS:
            for path in sorted(library_dir.glob(pattern)):
                try:
                    function = getattr(ctypes.CDLL(str(path)), symbol)
                except (OSError, AttributeError):
                    continue
                function.argtypes = [ctypes.c_int]
                function.restype = ctypes.c_int
                setters.append(function)
                break
        _found = setters
    return _found


def use_one_torch_thread() -> None:
    """Run this thread's torch ops on itself alone (no OpenMP team); other threads keep theirs."""
    try:
        import torch

        torch.get_num_threads()  # torch's per-thread setup first, or it would reset the count later
        for setter in _thread_count_setters():
            setter(1)
    except Exception as error:  # a build without OpenMP, or without these symbols: nothing to do
        log.debug("cannot limit this thread's torch threads: %s", error)
