"""8-bit weights in GGUF's Q8_0 layout (groups of 32 int8 with a float16 scale), on the native VNNI kernel."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ember.errors import ModelLoadError
from ember.native_decode import function_address
from ember.quant import native_int8
from ember.quant.float_linear import FloatLinear, _finish, _matmul_transposed, _rows
from ember.quant.ggml_blocks import BlockQuantizedTensor

# The native int8 kernel reads its tiles once for all rows: it beat dequantize-then-oneDNN (bfloat16) up to
# 128 rows on one thread and 256 on two for SmolLM2's shapes.
NATIVE_INT8_BATCH_ROWS = 128
Q8_BLOCK = 32  # values per Q8_0 group (one float16 scale each)


class Q8Linear:
    """Group-wise symmetric int8 as GGUF's Q8_0: weight[n, k] = scales[n, k // 32] * codes[n, k].

    Codes are int8, scales float16, so GGUF Q8_0 tensors are held exactly (and a
    float weight quantizes to the very bytes `gguf.quants.quantize` would write).
    Stored in one of two forms, chosen at construction:
    - "native": tiles for the AVX-512 VNNI kernel (`native_int8`), as many bytes
      as the Q8_0 blocks; the kernel rounds activations to int16 per group of 32,
      about 100x finer than bfloat16;
    - "float": where that kernel cannot run, the weight dequantized once to
      `dtype` for oneDNN: exact in float32, one bfloat16 rounding otherwise.
      Chosen over PyTorch's per-channel int8 kernel, which would round the weight
      a second time (to one scale per row: 3x bfloat16's logit error on SmolLM2's
      output layer) for a similar speed (1.6-2.1 ms against 1.8-2.1 ms at one
      row, slower at 8), at the cost of memory: 2 or 4 bytes per weight.

    `rows(ids)` returns rows of the weight, so a tied token embedding can share
    this layer's storage instead of holding a second copy.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
    ):
        # codes (out, in), or (out, groups, 32) as `_q8_0_fields` gives them
        self.out_features, self.in_features = codes.shape[0], codes[0].numel()
        if self.in_features % Q8_BLOCK != 0:
            raise ModelLoadError(f"in_features {self.in_features} is not a multiple of the group size 32")
        self.dtype = dtype  # of the dequantized weight used for many rows (and by the float form)
        self.bias = None if bias is None else bias.float()
        self.backend = backend or ("native" if self._native_usable(codes.device) else "float")
        self._library = native_int8.load() if self.backend == "native" else None
        if self.backend == "native" and self._library is None:
            raise ModelLoadError(
                f"the native int8 kernel is unavailable: {native_int8.LIBRARY.failure_reason}"
            )
        self._table: torch.Tensor | None = None  # the float form's plain weight for rows(), made on demand
        if self.backend == "native":
            self.tiles = native_int8.pack_tiles(codes, scales)  # (tiles, blocks, 544) uint8
        else:
            groups = codes.reshape(self.out_features, -1, Q8_BLOCK).float()  # (out, groups, 32)
            weight = groups * scales.to(torch.float16).float()[..., None]  # exact in float32
            self._float = FloatLinear(weight.view(self.out_features, self.in_features).to(dtype))

    @staticmethod
    def _native_usable(device: torch.device) -> bool:
        return device.type == "cpu" and native_int8.load() is not None

    @classmethod
    def from_blocks(
        cls,
        tensor: BlockQuantizedTensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
    ) -> Q8Linear:
        """A GGUF Q8_0 tensor, kept exactly (its bytes are copied, never rounded)."""
        codes, scales = _q8_0_fields(tensor)
        return cls(codes, scales, bias, dtype, backend)

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
    ) -> Q8Linear:
        """Round a float weight to Q8_0 as ggml does (`round_to_q8_0`)."""
        codes, steps = round_to_q8_0(weight)
        return cls(codes, steps, bias, dtype, backend)

    @property
    def nbytes(self) -> int:
        bias_bytes = 0 if self.bias is None else self.bias.numel() * 4
        if self.backend == "native":
            return self.tiles.numel() + bias_bytes
        copied = self._table is not None and self._table is not self._float.weight
        table_bytes = self._table.numel() * self._table.element_size() if copied else 0
        return self._float.nbytes + table_bytes + bias_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.backend == "native"
            and x.dim() == 2
            and x.shape[0] <= NATIVE_INT8_BATCH_ROWS
            and x.shape[1] == self.in_features
            and x.dtype == torch.float32
            and self.bias is None
            and x.is_contiguous()
        ):  # the decode step's common case, without reshapes or casts
            return native_int8.matmul(self._library, x, self.tiles, self.out_features)
        rows = _rows(x, self.in_features)  # (rows, in)
        if self.backend != "native":
            y = self._float(rows)
        elif rows.shape[0] <= NATIVE_INT8_BATCH_ROWS:
            y = native_int8.matmul(self._library, rows.float(), self.tiles, self.out_features)
        else:
            weight_t = native_int8.dequantize_transposed(
                self._library, self.tiles, self.out_features, self.in_features, self.dtype
            )  # (in, out)
            y = _matmul_transposed(rows.to(self.dtype), weight_t)
        return _finish(y, x, self.bias)

    def native_kernel(self) -> tuple[int, torch.Tensor, int] | None:
        """(kernel address, tiles, most rows) for `ember.native_decode`, where this layer has one."""
        if self.backend != "native" or self.bias is not None:
            return None
        return function_address(self._library.ember_int8_matmul), self.tiles, NATIVE_INT8_BATCH_ROWS

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows `token_ids` (any shape, integers) of the weight -> (*token_ids.shape, in_features) float32.

        The native form returns exactly d * q (what `gguf.quants.dequantize` gives
        for Q8_0); the float form returns its `dtype` weight's rows (exact in
        float32). Raises ValueError for an id outside 0..out_features-1.
        """
        flat_ids = token_ids.reshape(-1)
        if self.backend == "native":
            found = native_int8.gather_rows(
                self._library, self.tiles, self.out_features, self.in_features, flat_ids.cpu()
            )
        else:
            inside = flat_ids.numel() == 0 or (0 <= flat_ids.min() and flat_ids.max() < self.out_features)
            if not inside:
                raise ValueError(f"row ids must lie in 0..{self.out_features - 1}")
            if self._table is None:  # oneDNN's packed weight cannot be indexed: a plain copy, once
                plain = self._float.weight
                self._table = plain if plain is not None else self._float.dequantized_weight().to(self.dtype)
            found = F.embedding(flat_ids.to(self._table.device), self._table).float()
        return found.view(*token_ids.shape, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        if self.backend == "native":
            weight_t = native_int8.dequantize_transposed(
                self._library, self.tiles, self.out_features, self.in_features, torch.float32
            )
            return weight_t.T.contiguous()
        return self._float.dequantized_weight()


def round_to_q8_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight (out, in) as Q8_0: codes (out, in) int8 and float16 steps (out, in / 32), as ggml
    rounds: max |w| of a group -> code 127, halves away from 0."""
    out_features, in_features = weight.shape
    if in_features % Q8_BLOCK != 0:
        raise ModelLoadError(f"in_features {in_features} is not a multiple of the group size 32")
    groups = weight.float().reshape(out_features, in_features // Q8_BLOCK, Q8_BLOCK)
    # float32 step by step as ggml's quantize_row_q8_0_ref (and gguf.quants): the same codes, bit for bit
    steps = groups.abs().amax(dim=-1, keepdim=True) / 127  # (out, groups, 1)
    inverse = torch.where(steps == 0, torch.zeros_like(steps), 1 / steps)
    scaled = groups * inverse
    magnitude = scaled.abs()
    floored = magnitude.floor()
    rounded = torch.sign(scaled) * (floored + (2 * (magnitude - floored)).floor())
    codes = rounded.to(torch.int8).reshape(out_features, in_features)
    return codes, steps[..., 0].to(torch.float16)


def q8_0_blocks(weight: torch.Tensor, name: str = "") -> BlockQuantizedTensor:
    """A float weight rounded to Q8_0 and laid out as a GGUF file's blocks (a float16 step, 32 codes), for
    the GGML block kernels where the VNNI tiles do not run."""
    codes, steps = round_to_q8_0(weight)
    out_features, in_features = codes.shape
    groups = in_features // Q8_BLOCK
    blocks = torch.cat(
        (
            steps.reshape(out_features, groups, 1).view(torch.uint8),
            codes.view(torch.uint8).reshape(out_features, groups, Q8_BLOCK),
        ),
        dim=-1,
    )  # (out, groups, 34)
    data = blocks.reshape(out_features, groups * (2 + Q8_BLOCK)).numpy()
    return BlockQuantizedTensor(name, "Q8_0", (out_features, in_features), data)


def _q8_0_fields(tensor: BlockQuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks (fp16 d, 32 int8 q) -> codes (out, groups, 32) int8 and scales (out, groups) float16,
    exactly. The codes are a view of the blocks, not a copy: SmolLM2's 28 MB output layer is packed
    into tiles straight from the file's pages, a copy less at the moment a load peaks in memory."""
    out_features, in_features = tensor.shape
    groups = in_features // Q8_BLOCK
    blocks = torch.from_numpy(np.ascontiguousarray(tensor.data)).view(out_features, groups, 2 + Q8_BLOCK)
    scales = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]  # (out, groups)
    codes = blocks[..., 2:].view(torch.int8)  # (out, groups, 32), strided over the blocks
    return codes, scales
