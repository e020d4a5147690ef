"""The RWKV recurrences as one native call per chunk (`rwkv_wkv.cpp`), where the kernel builds.

The PyTorch loops in `rwkv_ops` run several small tensor operations per token
and layer; for a 512-token prompt that is thousands of dispatches, and each
decode step pays them too. The kernel steps through the chunk in C++,
parallel over sequences and heads. Float32 CPU tensors only; `usable()` is
False elsewhere (another device, no compiler, the source missing) and the
callers keep the PyTorch loops. Results agree with them to float32 rounding.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ember.native_build import NativeLibrary

_SOURCE_FILE = Path(__file__).with_name("rwkv_wkv.cpp")
# On for prompts and decode steps alike, so that a prompt read in sequence mode and the same tokens
# fed one at a time step through the same arithmetic: with the kernel for chunks only, its rounding
# drifted up to 1.6e-5 from the PyTorch loop's over a 300-token prompt on the tiny v5 model (the
# bound is 1e-5). False: the PyTorch loops everywhere (tests compare the two).
ENABLED = True
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _declare(library: ctypes.CDLL) -> None:
    library.rwkv_wkv4.argtypes = [_i64, _i64, _i64] + [_ptr] * 8
    library.rwkv_wkv5.argtypes = [_i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr]
    library.rwkv_wkv7.argtypes = [_i64, _i64, _i64, _i64] + [_ptr] * 8
    for function in (library.rwkv_wkv4, library.rwkv_wkv5, library.rwkv_wkv7):
        function.restype = None


_LIBRARY = (
    NativeLibrary("rwkv_wkv", _SOURCE_FILE.read_text(), declare=_declare) if _SOURCE_FILE.exists() else None
)


def load() -> ctypes.CDLL | None:
    return _LIBRARY.load() if _LIBRARY is not None else None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel serves these tensors: float32 on the CPU, and the kernel built."""
    if not ENABLED:
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and load() is not None


def _address(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


def wkv4(decay, bonus, k, v, aa, bb, pp):
    """As `rwkv_ops.wkv4` without captures; the state tensors are fresh copies, updated and returned."""
    B, T, C = k.shape
    k, v = k.contiguous(), v.contiguous()
    decay, bonus = decay.contiguous(), bonus.contiguous()
    aa, bb, pp = aa.contiguous().clone(), bb.contiguous().clone(), pp.contiguous().clone()
    out = torch.empty_like(k)
    load().rwkv_wkv4(B, T, C, *map(_address, (decay, bonus, k, v, aa, bb, pp, out)))
    return out, (aa, bb, pp)


def wkv5(r, k, v, decay, bonus, state):
    B, T, H, N = r.shape
    r, k, v = r.contiguous(), k.contiguous(), v.contiguous()
    decay, bonus = decay.contiguous(), bonus.contiguous()
    state = state.contiguous().clone()
    out = torch.empty_like(v)
    per_token = 1 if decay.dim() == 4 else 0
    load().rwkv_wkv5(
        B, T, H, N, _address(r), _address(k), _address(v), _address(decay), per_token,
        _address(bonus), _address(state), _address(out),
    )  # fmt: skip
    return out, state


def wkv7(r, decay, k, v, removal, replacement, state):
    B, T, H, N = r.shape
    tensors = [t.contiguous() for t in (r, decay, k, v, removal, replacement)]
    state = state.contiguous().clone()
    out = torch.empty_like(tensors[3])
    load().rwkv_wkv7(B, T, H, N, *map(_address, tensors), _address(state), _address(out))
    return out, state
