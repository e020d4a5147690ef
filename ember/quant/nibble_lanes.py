"""The 4-bit lane layout: Q4_0, Q4_1 and Q4_K codes rearranged at load so that AVX2 reads them cheaply.

In a GGUF block, the 4-bit codes of 32 values sit two to a byte; turning them
into eight float32 lanes takes byte shuffles and widenings per eight values,
and on a CPU without AVX-512 those, not memory, set the speed of a decode
product (about 6 GB/s for Q4_1 on a 2-core EPYC, where Q8_0 reads 17). The
lane layout stores the same codes so that one 32-bit shift and one mask put
eight of them into eight lanes (`lanes4` in `ggml_kernels.cpp`); a
Q4_1 decode product then runs about twice as fast.

Nothing is re-rounded. Each 32-value group keeps its value = scale * code -
offset, with the scale and the offset as float32 products that are exact (Q4_0:
d and 8d; Q4_1: d and -m; Q4_K: d times the group's 6-bit scale and dmin times
its 6-bit minimum), which is the one rounding the block expansions make, so
the values equal `gguf.quants.dequantize`'s. A record holds 64 values in 48
bytes: the four float32 fields (scale and offset of its two groups), then
eight little-endian words where nibble j of word l is the code of value 8j + l.
A row must hold a whole number of records (in_features % 64 == 0).

Compact records (`half_fields=True`, 40 bytes: 0.625 bytes a value, as Q4_0 /
Q4_1 themselves) hold the four fields as float16 where each is exactly a
float16 (Q4_0's d and 8d, Q4_1's d and -m always are; Q4_K's products of d and a
6-bit scale mostly are not). Decode with 8-bit activations reads the weights
at memory speed, so the 8 bytes a record saves are 1/6 of its time there.
"""

from __future__ import annotations

import numpy as np

LANE_TYPES = ("Q4_0", "Q4_1", "Q4_K")
RECORD_VALUES, RECORD_BYTES, HALF_RECORD_BYTES = 64, 48, 40


def fits(quant_type: str, in_features: int) -> bool:
    """Whether rows of `in_features` values of `quant_type` can take the lane layout."""
    return quant_type in LANE_TYPES and in_features % RECORD_VALUES == 0


def lane_rows(
    quant_type: str, blocks: np.ndarray, in_features: int, half_fields: bool = False
) -> np.ndarray | None:
    """blocks (out_features, bytes per row) uint8 of `quant_type` -> (out_features, in_features // 64 *
    48) uint8 in the lane layout, or 40 bytes a record with `half_fields` (None where a field is not
    exactly a float16). ValueError where the type or the row length does not fit."""
    if not fits(quant_type, in_features):
        raise ValueError(f"no lane layout for {quant_type} rows of {in_features} values")
    rows = blocks.shape[0]
    codes, scales, offsets = _groups(quant_type, blocks.reshape(rows, -1), in_features)
    records = in_features // RECORD_VALUES
    # value 8j + l of a record -> nibble j of word l
    by_slot = codes.reshape(rows, records, 8, 8).astype(np.uint32)  # (rows, records, j, l)
    shifts = (4 * np.arange(8, dtype=np.uint32)).reshape(1, 1, 8, 1)
    words = np.bitwise_or.reduce(by_slot << shifts, axis=2).astype("<u4")  # (rows, records, 8)
    # (rows, records, 4): scale and offset of each record's two groups
    fields = np.stack([scales[:, 0::2], offsets[:, 0::2], scales[:, 1::2], offsets[:, 1::2]], axis=-1)
    fields = fields.astype("<f4")
    record_bytes = RECORD_BYTES
    if half_fields:
        with np.errstate(over="ignore"):
            halves = fields.astype("<f2")
        if not np.array_equal(halves.astype("<f4"), fields):
            return None
        fields, record_bytes = halves, HALF_RECORD_BYTES
    field_bytes = record_bytes - 32  # then the 8 code words
    out = np.empty((rows, records, record_bytes), dtype=np.uint8)
    out[..., :field_bytes] = fields.view(np.uint8).reshape(rows, records, field_bytes)
    out[..., field_bytes:] = words.view(np.uint8).reshape(rows, records, 32)
    return out.reshape(rows, records * record_bytes)


def _halves(raw: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 little-endian float16 fields -> (...) float32 (exact)."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32)


def _groups(quant_type: str, data: np.ndarray, in_features: int):
    """Per 32-value group: codes (rows, in_features) uint8 in value order, scales and offsets (rows,
    groups) float32 with value = scale * code - offset."""
    rows = data.shape[0]
    if quant_type in ("Q4_0", "Q4_1"):
        block_bytes = 18 if quant_type == "Q4_0" else 20
        blocks = data.reshape(rows, in_features // 32, block_bytes)
        d = _halves(blocks[..., 0:2])
        nibbles = blocks[..., block_bytes - 16 :]
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # low nibbles: values 0..15
        offsets = np.float32(8) * d if quant_type == "Q4_0" else -_halves(blocks[..., 2:4])
        return codes.reshape(rows, in_features), d, offsets
    # Q4_K: 144-byte blocks of 256 values (fp16 d, fp16 dmin, 12 scale bytes, 128 nibble bytes)
    blocks = data.reshape(rows, in_features // 256, 144)
    d, dmin = _halves(blocks[..., 0:2]), _halves(blocks[..., 2:4])
    packed = blocks[..., 4:16].astype(np.uint8)
    low, high = packed[..., 0:4], packed[..., 4:8]
    tail = packed[..., 8:12]
    # ggml's get_scale_min_k4 for groups 0..3 and 4..7
    group_scales = np.concatenate([low & 63, (tail & 0x0F) | ((low >> 6) << 4)], axis=-1)
    group_minimums = np.concatenate([high & 63, (tail >> 4) | ((high >> 6) << 4)], axis=-1)
    nibbles = blocks[..., 16:].reshape(rows, -1, 4, 32)  # 32 bytes hold groups 2i (low) and 2i+1 (high)
    codes = np.stack([nibbles & 0x0F, nibbles >> 4], axis=3)  # (rows, blocks, 4, 2, 32)
    scales = d[..., None] * group_scales.astype(np.float32)  # (rows, blocks, 8): exact products
    offsets = dmin[..., None] * group_minimums.astype(np.float32)
    return codes.reshape(rows, in_features), scales.reshape(rows, -1), offsets.reshape(rows, -1)
