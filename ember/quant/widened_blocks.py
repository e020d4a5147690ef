"""Q5_0 blocks rewritten as Q8_0 blocks of the same values, for the 8-bit-activation decode kernel.

A Q5_0 block (fp16 d, 32 fifth bits, 16 bytes of nibbles; value = d * (q - 16))
costs the integer kernel more to unpack than it costs memory to read: taking
the fifth bits out of their 32-bit word into 32 bytes is a shuffle, a compare
and three masks per block, and Gemma 3's Q5_0 products ran at about 11 GB/s
of weights where Q8_0's run near 25. Written as Q8_0 (the same fp16 d and the
codes q - 16 as signed bytes) every value is unchanged, bit for bit: the
expansion of both is d times the code, one rounding. The price is the bytes:
34 per 32 values instead of 22.
"""

from __future__ import annotations

import numpy as np

Q5_0_BYTES, Q8_0_BYTES = 22, 34


def q5_0_as_q8_0(rows: np.ndarray) -> np.ndarray:
    """rows (out, blocks * 22) uint8 of Q5_0 blocks -> (out, blocks * 34) uint8 Q8_0 blocks, same values."""
    out_features = rows.shape[0]
    blocks = rows.reshape(out_features, -1, Q5_0_BYTES)
    fifth_bits = blocks[..., 2:6].copy().view("<u4")  # (out, blocks, 1): bit j belongs to value j
    bits = ((fifth_bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)  # (out, blocks, 32)
    nibbles = blocks[..., 6:]
    low = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.int16)  # value l < 16: low nibble
    codes = (low | (bits << 4)) - 16  # -16..15
    widened = np.empty((out_features, blocks.shape[1], Q8_0_BYTES), dtype=np.uint8)
    widened[..., :2] = blocks[..., :2]
    widened[..., 2:] = codes.astype(np.int8).view(np.uint8)
    return widened.reshape(out_features, -1)
