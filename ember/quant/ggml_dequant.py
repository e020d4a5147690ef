"""GGML block formats turned back into float32 tensors.

Each quantized format stores a run of values (a block) as a few scales plus
packed small integers. The arithmetic here follows `gguf.quants` operation by
operation in float32 (one multiply, then one add or subtract, never a fused
multiply-add), so the results are bit-for-bit those of the reference; the
tests hold us to that. Work is done with torch in chunks of blocks small enough
that the temporaries stay in cache and each op runs on the calling thread: on a
busy machine, torch's per-op thread hand-offs made whole-tensor ops up to 20x slower.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch

from ember.errors import ModelLoadError

# GGML type name -> (values per block, bytes per block), as in ggml's type traits.
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}

# Values per chunk: below torch's parallel grain size (32768), so no op waits on other threads.
_CHUNK_VALUES = 1 << 14


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of every block, as float32 of shape (blocks, 1)."""
    return blocks[:, offset : offset + 2].view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Split (blocks, groups, n) bytes into (blocks, groups, 2, n): low nibbles, then high."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-2)


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Bit i of each byte (i < count) as uint8: (..., n) -> (..., count, n)."""
    shifts = torch.arange(count, dtype=torch.uint8).view(count, 1)  # (count, 1)
    return (packed.unsqueeze(-2) >> shifts) & 1


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: fp16 d, 32 int8 q; value = q * d
    scale = _half(blocks, 0)  # (blocks, 1)
    quants = blocks[:, 2:].view(torch.int8)  # (blocks, 32)
    torch.mul(quants, scale, out=out)


def _q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: fp16 d, 16 bytes of nibbles; value = d * (q - 8)
    scale = _half(blocks, 0)
    quants = _nibbles(blocks[:, 2:].unsqueeze(1)).view(-1, 32).view(torch.int8) - 8  # (blocks, 32)
    torch.mul(scale, quants, out=out)


def _q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: fp16 d, fp16 m, 16 bytes of nibbles; value = d * q + m
    scale, minimum = _half(blocks, 0), _half(blocks, 2)
    quants = _nibbles(blocks[:, 4:].unsqueeze(1)).view(-1, 32)  # (blocks, 32)
    torch.mul(scale, quants, out=out)
    out.add_(minimum)


def _five_bit(high_bits: torch.Tensor, low_nibbles: torch.Tensor) -> torch.Tensor:
    """32 five-bit values per block: bit j of the 32-bit high word on top of nibble j."""
    high = _bits(high_bits, 8).transpose(1, 2).reshape(-1, 32)  # bit j of the little-endian word
    low = _nibbles(low_nibbles.unsqueeze(1)).view(-1, 32)
    return low | (high << 4)  # (blocks, 32) uint8 in 0..31


def _q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: fp16 d, 4 bytes of high bits, 16 bytes of nibbles; value = d * (q - 16)
    scale = _half(blocks, 0)
    quants = _five_bit(blocks[:, 2:6], blocks[:, 6:]).view(torch.int8) - 16
    torch.mul(scale, quants, out=out)


def _q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block: fp16 d, fp16 m, 4 bytes of high bits, 16 bytes of nibbles; value = d * q + m
    scale, minimum = _half(blocks, 0), _half(blocks, 2)
    quants = _five_bit(blocks[:, 4:8], blocks[:, 8:])
    torch.mul(scale, quants, out=out)
    out.add_(minimum)


def _k_scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12 bytes of eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K block."""
    packed = packed.reshape(-1, 3, 4)
    low_scales, low_mins, rest = packed[:, 0], packed[:, 1], packed[:, 2]
    scales = torch.cat((low_scales & 0x3F, (rest & 0x0F) | ((low_scales >> 2) & 0x30)), dim=-1)
    mins = torch.cat((low_mins & 0x3F, (rest >> 4) | ((low_mins >> 2) & 0x30)), dim=-1)
    return scales, mins  # (blocks, 8) each


def _k_affine(blocks: torch.Tensor, quants: torch.Tensor, out: torch.Tensor) -> None:
    """value = (d * scale) * q - (dmin * min), per 32-value sub-block."""
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    sub_scale = (_half(blocks, 0) * scales).unsqueeze(-1)  # (blocks, 8, 1)
    sub_min = (_half(blocks, 2) * mins).unsqueeze(-1)  # (blocks, 8, 1)
    out3 = out.view(-1, 8, 32)
    torch.mul(sub_scale, quants, out=out3)
    out3.sub_(sub_min)


def _q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # 256 values: fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles.
    # Each 32-byte group holds sub-block 2c in its low nibbles and 2c + 1 in its high ones.
    quants = _nibbles(blocks[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    _k_affine(blocks, quants, out)


def _q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # 256 values: fp16 d, fp16 dmin, 12 bytes of scales/mins, 32 bytes of high bits, 128 of nibbles.
    # Sub-block i takes its fifth bit from bit i of the 32 high-bit bytes.
    low = _nibbles(blocks[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high = _bits(blocks[:, 16:48], 8)  # (blocks, 8, 32)
    _k_affine(blocks, low | (high << 4), out)


def _q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # 256 values: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, fp16 d.
    # value = (d * scale) * (q - 32), one scale per 16 values.
    low = _nibbles(blocks[:, :128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    high = ((blocks[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 8, 32)
    quants = ((low | (high << 4)).view(torch.int8) - 32).view(-1, 16, 16)
    sub_scale = (_half(blocks, 208) * blocks[:, 192:208].view(torch.int8)).unsqueeze(-1)  # (blocks, 16, 1)
    torch.mul(sub_scale, quants, out=out.view(-1, 16, 16))


_BLOCK_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def _as_byte_tensor(data: np.ndarray) -> torch.Tensor:
    """A flat uint8 torch view of `data` (copied only if not contiguous)."""
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        # Read-only memory maps are fine: nothing here writes to the input.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(flat)


def dequantize(
    quant_type: str, data: np.ndarray, shape: tuple[int, ...], name: str | None = None
) -> torch.Tensor:
    """Float32 values of GGML-typed raw `data`, shaped `shape` (PyTorch order).

    `data` holds the tensor's bytes (any shape, usually (rows, bytes_per_row));
    blocks run along the last dimension of `shape`. `name` only improves error messages.
    """
    label = f"tensor {name!r}" if name else "tensor"
    if quant_type not in BLOCK_SIZES:
        raise ModelLoadError(
            f"{label} has GGML type {quant_type}, which ember cannot read; "
            f"supported: {', '.join(BLOCK_SIZES)}"
        )
    block_values, block_bytes = BLOCK_SIZES[quant_type]
    shape = tuple(int(size) for size in shape)
    num_values = math.prod(shape)
    if shape and shape[-1] % block_values:
        raise ModelLoadError(
            f"{label} of type {quant_type} has rows of {shape[-1]} values, "
            f"not a multiple of the block size {block_values}"
        )
    num_blocks = num_values // block_values
    if data.nbytes != num_blocks * block_bytes:
        raise ModelLoadError(
            f"{label} of type {quant_type} and shape {shape} needs {num_blocks * block_bytes} bytes, "
            f"got {data.nbytes}"
        )
    raw = _as_byte_tensor(data)
    if quant_type == "F32":
        return raw.view(torch.float32).clone().view(shape)
    if quant_type == "F16":
        return raw.view(torch.float16).float().view(shape)
    if quant_type == "BF16":
        return raw.view(torch.bfloat16).float().view(shape)

    kernel = _BLOCK_KERNELS[quant_type]
    blocks = raw.view(num_blocks, block_bytes)
    out = torch.empty(num_blocks, block_values, dtype=torch.float32)
    chunk = max(1, _CHUNK_VALUES // block_values)
    for start in range(0, num_blocks, chunk):
        kernel(blocks[start : start + chunk], out[start : start + chunk])
    return out.view(shape)
