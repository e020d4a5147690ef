"""4-bit weights (groups of 32 with scale and minimum, as Q4_0/Q4_1), native kernel or PyTorch's."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ember.errors import ModelLoadError
from ember.native_decode import function_address
from ember.quant import native_int4
from ember.quant.float_linear import _finish, _matmul_transposed, _rows
from ember.quant.ggml_blocks import BlockQuantizedTensor

# Rows at or below which the low-bit kernels beat dequantize-then-matmul: measured crossovers
# 16-32 rows for PyTorch's int4 kernel, 40-64 for the native ones.
SMALL_BATCH_ROWS = 16
NATIVE_BATCH_ROWS = 32
_TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)


class Int4Linear:
    """Group-wise asymmetric 4-bit: weight[n, k] = scales[n, g] * codes[n, k] + minimums[n, g].

    g = k // group_size.

    Codes are 0..15. Stored in one of three forms, chosen at construction:
    - "native": the AVX-512 tile kernel (group 32): float16 scales and minimums,
      so GGUF Q4_0 / Q4_1 weights are kept exactly;
    - "tinygemm": PyTorch's int4 kernel; it rounds scales to bfloat16, so weights
      are within bfloat16 rounding of the scales; a nibble copy serves many rows;
    - "plain": nibbles and float32 scales, dequantized on every call (any device).
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        minimums: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 32,
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
    ):
        self.out_features, self.in_features = codes.shape
        if self.in_features % group_size != 0:
            raise ModelLoadError(
                f"in_features {self.in_features} is not a multiple of group size {group_size}"
            )
        self.group_size = group_size
        self.dtype = dtype  # of the dequantized weight used for many rows
        self.bias = None if bias is None else bias.float()
        self.backend = backend or self._choose_backend(codes.device)
        self._library = native_int4.load() if self.backend == "native" else None
        if self.backend == "native":
            self.tiles = native_int4.pack_tiles(codes, scales, minimums)  # (tiles, blocks, 320) uint8
        else:
            self._store_plain(codes, scales, minimums)
            if self.backend == "tinygemm":
                self._store_tinygemm(codes, scales, minimums)

    def _choose_backend(self, device: torch.device) -> str:
        if device.type != "cpu":
            return "plain"
        if self.group_size == 32 and native_int4.load() is not None:
            return "native"
        if self.group_size in _TINYGEMM_GROUP_SIZES and self.out_features % 16 == 0:
            return "tinygemm"
        return "plain"

    def _store_plain(self, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> None:
        codes = codes.to(torch.uint8)
        self.nibbles = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()  # (out, in / 2)
        self.scales = scales.float().contiguous()  # (out, groups)
        self.minimums = minimums.float().contiguous()  # (out, groups)

    def _store_tinygemm(self, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> None:
        # the kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale
        chunks = [
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes[start : start + 4096].to(torch.int32), 2)
            for start in range(0, self.out_features, 4096)  # 4096: a multiple of every kernel row block
        ]
        self.packed = torch.cat(chunks)
        zeros = minimums.float() + 8.0 * scales.float()
        scales_and_zeros = torch.stack((scales.float(), zeros), dim=-1)  # (out, groups, 2)
        self.scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 32,
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
    ) -> Int4Linear:
        """Round a float weight to 4 bits (`round_to_4_bits`)."""
        codes, scales, minimums = round_to_4_bits(weight, group_size)
        return cls(codes, scales, minimums, bias, group_size, dtype, backend)

    @property
    def nbytes(self) -> int:
        bias_bytes = 0 if self.bias is None else self.bias.numel() * 4
        if self.backend == "native":
            return self.tiles.numel() + bias_bytes
        plain = self.nibbles.numel() + (self.scales.numel() + self.minimums.numel()) * 4
        if self.backend == "tinygemm":
            plain += self.packed.numel() + self.scales_and_zeros.numel() * 2
        return plain + bias_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.backend == "native"
            and x.dim() == 2
            and x.shape[0] <= NATIVE_BATCH_ROWS
            and x.shape[1] == self.in_features
            and x.dtype == torch.float32
            and self.bias is None
            and x.is_contiguous()
        ):  # the decode step's common case, without reshapes or casts (~3 us of a ~10 us call)
            return native_int4.matmul(self._library, x, self.tiles, self.out_features)
        rows = _rows(x, self.in_features)  # (rows, in)
        if self.backend == "native":
            if rows.shape[0] <= NATIVE_BATCH_ROWS:
                y = native_int4.matmul(self._library, rows.float(), self.tiles, self.out_features)
            else:
                weight_t = native_int4.dequantize_transposed(
                    self._library, self.tiles, self.out_features, self.in_features, self.dtype
                )  # (in, out)
                y = _matmul_transposed(rows.to(self.dtype), weight_t)
        elif self.backend == "tinygemm" and rows.shape[0] <= SMALL_BATCH_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros
            )
        else:
            y = F.linear(rows.to(self.dtype), self._plain_weight(self.dtype))
        return _finish(y, x, self.bias)

    def native_kernel(self) -> tuple[int, torch.Tensor, int] | None:
        """(kernel address, tiles, most rows) for `ember.native_decode`, where this layer has one."""
        if self.backend != "native" or self.bias is not None:
            return None
        return function_address(self._library.ember_int4_matmul), self.tiles, NATIVE_BATCH_ROWS

    def _plain_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) from the nibble copy, in `dtype`."""
        codes = torch.stack((self.nibbles & 0x0F, self.nibbles >> 4), dim=-1).view(
            self.out_features, -1, self.group_size
        )
        scales, minimums = self.scales.to(dtype), self.minimums.to(dtype)
        weight = codes.to(dtype) * scales[..., None] + minimums[..., None]  # (out, groups, group)
        return weight.view(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        if self.backend == "native":
            weight_t = native_int4.dequantize_transposed(
                self._library, self.tiles, self.out_features, self.in_features, torch.float32
            )
            return weight_t.T.contiguous()
        if self.backend == "tinygemm":  # what the kernel computes: bfloat16 scale and zero
            scales_and_zeros = self.scales_and_zeros.float().transpose(0, 1)  # (out, groups, 2)
            codes = torch.stack((self.nibbles & 0x0F, self.nibbles >> 4), dim=-1).view(
                self.out_features, -1, self.group_size
            )
            weight = (codes.float() - 8.0) * scales_and_zeros[..., :1] + scales_and_zeros[..., 1:]
            return weight.reshape(self.out_features, self.in_features)
        return self._plain_weight(torch.float32)


def round_to_4_bits(
    weight: torch.Tensor, group_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float weight (out, in) as 4-bit groups: codes (out, in) uint8 0..15, scales and minimums (out,
    groups) float32 holding float16 values; per group, minimum -> code 0 and maximum -> code 15."""
    out_features, in_features = weight.shape
    if in_features % group_size != 0:
        raise ModelLoadError(f"in_features {in_features} is not a multiple of group size {group_size}")
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (out, groups)
    # float16 scales and minimums, as GGUF stores them, so every form holds them exactly
    scales = ((high - low) / 15.0).to(torch.float16).float()
    minimums = low.to(torch.float16).float()
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round((groups - minimums[..., None]) / safe[..., None]).clamp_(0, 15)
    return codes.to(torch.uint8).reshape(out_features, in_features), scales, minimums


def q4_1_blocks(weight: torch.Tensor, name: str = "") -> BlockQuantizedTensor:
    """A float weight rounded to 4-bit groups of 32 and laid out as GGUF's Q4_1 blocks (float16 scale and
    minimum, 16 bytes of nibbles), for the GGML block kernels where the AVX-512 tiles do not run."""
    codes, scales, minimums = round_to_4_bits(weight, 32)
    out_features, in_features = codes.shape
    groups = in_features // 32
    per_block = codes.reshape(out_features, groups, 32)
    # element j of a block: low nibble of byte j (j < 16), high nibble of byte j - 16 (j >= 16)
    nibbles = per_block[..., :16] | (per_block[..., 16:] << 4)
    halves = [
        field.to(torch.float16).reshape(out_features, groups, 1).view(torch.uint8)
        for field in (scales, minimums)
    ]
    blocks = torch.cat((*halves, nibbles), dim=-1)  # (out, groups, 20)
    data = blocks.reshape(out_features, groups * 20).numpy()
    return BlockQuantizedTensor(name, "Q4_1", (out_features, in_features), data)


def _block_fields(tensor: BlockQuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 blocks -> codes (out, in) uint8, scales and minimums (out, groups) float32, exactly."""
    out_features, in_features = tensor.shape
    block_bytes = 18 if tensor.quant_type == "Q4_0" else 20
    groups = in_features // 32
    blocks = torch.from_numpy(np.ascontiguousarray(tensor.data)).view(out_features, groups, block_bytes)
    scales = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()  # (out, groups)
    if tensor.quant_type == "Q4_0":  # value = d * (q - 8) = d * q + (-8 d)
        minimums = -8.0 * scales
        nibbles = blocks[..., 2:]
    else:  # value = d * q + m
        minimums = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
        nibbles = blocks[..., 4:]
    # element j of a block: low nibble of byte j (j < 16), high nibble of byte j - 16 (j >= 16)
    codes = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).reshape(out_features, in_features)
    return codes, scales, minimums
