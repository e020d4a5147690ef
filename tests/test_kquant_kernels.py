"""The GGML block kernels (`ggml_kernels.cpp`) against `gguf.quants.dequantize` and a float64 product."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from ember.errors import ModelLoadError
from ember.quant import native_ggml
from ember.quant.ggml_blocks import BlockQuantizedTensor
from ember.quant.ggml_dequant import BLOCK_SIZES
from ember.quant.ggml_linear import NATIVE_GGML_ROWS, ConcatLinear, GGMLLinear

# byte offsets of each type's fp16 scale fields: random bytes elsewhere, finite scales here
HALF_FIELDS = {
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q5_0": (0,), "Q5_1": (0, 2),
    "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2),  # on these kernels where the AVX-512 tiles do not build
}  # fmt: skip


def random_blocks(quant_type: str, out_features: int, in_features: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values, block_bytes = BLOCK_SIZES[quant_type]
    blocks = in_features // values
    data = rng.integers(0, 256, size=(out_features, blocks, block_bytes), dtype=np.uint8)
    for offset in HALF_FIELDS[quant_type]:
        scales = rng.uniform(-0.05, 0.05, size=(out_features, blocks)).astype(np.float16)
        data[..., offset : offset + 2] = scales.view(np.uint8).reshape(out_features, blocks, 2)
    return data.reshape(out_features, -1)


@pytest.mark.parametrize("quant_type", list(HALF_FIELDS))
@pytest.mark.parametrize("rows", [1, 3, 16, 70])
def test_product_matches_gguf_dequantize_in_float64(quant_type, rows):
    values = BLOCK_SIZES[quant_type][0]
    out_features, in_features = 37, 3 * values if values == 256 else 9 * values
    data = random_blocks(quant_type, out_features, in_features, seed=rows)
    weight = gguf_dequantize(data, getattr(gguf.GGMLQuantizationType, quant_type)).astype(np.float64)
    weight = weight.reshape(out_features, in_features)
    tensor = BlockQuantizedTensor("w", quant_type, (out_features, in_features), data)
    layer = GGMLLinear(tensor, rounded_activations=False)  # float32 activations: every kernel's exact form
    assert np.array_equal(layer.dequantized_weight().numpy(), weight.astype(np.float32))
    x = torch.randn(rows, in_features)
    expected = x.double().numpy() @ weight.T
    # float32 rounding of a length-K sum: K * 2^-24 * sum |x| |w| bounds it
    bound = in_features * 2.0**-24 * (np.abs(x.double().numpy()) @ np.abs(weight).T)
    assert (np.abs(layer(x).double().numpy() - expected) <= bound).all()


LANE_TYPES = ["Q4_0", "Q4_1", "Q4_K"]


@pytest.mark.parametrize("quant_type", LANE_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 32, 70])
def test_lane_layout_holds_the_same_values_and_products(quant_type, rows):
    """The 4-bit lane layout rearranges codes, never values: its expansion equals gguf's dequantize
    element by element, and its products (decode rows and expanded prefill chunks) meet the same float64
    bound as the blocks' own kernel."""
    if native_ggml.load() is None:
        pytest.skip("the GGML block kernels did not build here")
    values = BLOCK_SIZES[quant_type][0]
    out_features, in_features = 37, 3 * values if values == 256 else 10 * values
    data = random_blocks(quant_type, out_features, in_features, seed=100 + rows)
    weight = gguf_dequantize(data, getattr(gguf.GGMLQuantizationType, quant_type)).astype(np.float64)
    weight = weight.reshape(out_features, in_features)
    tensor = BlockQuantizedTensor("w", quant_type, (out_features, in_features), data)
    lanes = GGMLLinear(tensor, lanes=True, rounded_activations=False)
    blocks = GGMLLinear(tensor, lanes=False)
    assert lanes.kernel == native_ggml.LANES4 and "4-bit lanes" in lanes.kernel_name
    assert np.array_equal(lanes.dequantized_weight().numpy(), weight.astype(np.float32))
    ids = torch.tensor([[5, 0], [36, 5]])
    assert torch.equal(lanes.rows(ids), blocks.rows(ids))
    x = torch.randn(rows, in_features)
    expected = x.double().numpy() @ weight.T
    bound = in_features * 2.0**-24 * (np.abs(x.double().numpy()) @ np.abs(weight).T)
    assert (np.abs(lanes(x).double().numpy() - expected) <= bound).all()
    if rows <= NATIVE_GGML_ROWS:  # decode rows: a row's product does not depend on the others in the call
        assert torch.equal(lanes(x)[-1:], lanes(x[-1:]))


def lane_offsets(layer: GGMLLinear) -> np.ndarray:
    """(out, groups) float64: each 32-value group's offset (value = scale * code - offset) in the lane
    layout's record fields; zeros for blocks whose value is d * code."""
    groups = layer.in_features // 32
    if layer.kernel not in (native_ggml.LANES4_Q8, native_ggml.LANES4_HALF_Q8):
        return np.zeros((layer.out_features, groups))
    records = layer.blocks.numpy().reshape(layer.out_features, groups // 2, -1)
    if layer.kernel == native_ggml.LANES4_Q8:
        fields = records[..., :16].copy().view("<f4")
    else:  # compact records: float16 fields
        fields = records[..., :8].copy().view("<f2")
    return fields[..., 1::2].reshape(layer.out_features, groups).astype(np.float64)


def rounded_reference(layer: GGMLLinear, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """What an 8-bit-activation kernel computes, in float64, and a bound on its float32 rounding.

    Each 32 activations round to q = rint(x * (127 / max |x|)) with dx = max |x| / 127 (float32 steps, as
    the kernel takes them). A group's dot is d * dx * sum(code * q) for blocks whose value is d * code,
    and scale * dx * sum(code * q) - offset * sum(x) in the lane layout; with value = scale * code -
    offset, both are dx * sum(value * q) + offset * (dx * sum(q) - sum(x))."""
    groups = layer.in_features // 32
    rows = x.numpy().astype(np.float32).reshape(len(x), groups, 32)
    largest = np.abs(rows).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inverse = np.where(largest > 0, np.float32(127) / largest, np.float32(0)).astype(np.float32)
    q = np.rint(rows * inverse).astype(np.float64)
    dx = (largest / np.float32(127)).astype(np.float64)
    offsets = lane_offsets(layer)  # (out, groups)
    values = layer.dequantized_weight().double().numpy().reshape(layer.out_features, groups, 32)
    scaled = np.einsum("ogi,rgi->rog", values, dx * q)  # (rows, out, groups)
    correction = (dx[..., 0] * q.sum(-1))[:, None, :] - rows.sum(-1, dtype=np.float64)[:, None, :]
    expected = (scaled + offsets[None] * correction).sum(-1)
    magnitude = np.einsum("ogi,rgi->ro", np.abs(values + offsets[..., None]), dx * np.abs(q))
    magnitude += (np.abs(offsets) @ np.abs(rows).sum(-1).astype(np.float64).T).T  # the offsets' sums of x
    return expected, layer.in_features * 2.0**-24 * magnitude


@pytest.mark.parametrize(
    "quant_type, lanes",
    [("Q4_0", True), ("Q4_1", True), ("Q4_K", True), ("Q8_0", False), ("Q5_0", False), ("Q6_K", False)],
)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 32])
def test_rounded_activations_products_are_the_integer_dots_they_claim(quant_type, lanes, rows):
    """The decode kernels with 8-bit activations (the lane layout, Q8_0 and Q5_0 blocks): their products
    equal the integer dots of the rounded activations with the file's codes (within float32 rounding of
    the group sums), differ from the exact product by no more than the activations' rounding can move
    them, and a row's product is the same alone and in a batch."""
    if native_ggml.load() is None:
        pytest.skip("the GGML block kernels did not build here")
    values = BLOCK_SIZES[quant_type][0]
    out_features, in_features = 37, 3 * values if values == 256 else 10 * values
    data = random_blocks(quant_type, out_features, in_features, seed=200 + rows)
    tensor = BlockQuantizedTensor("w", quant_type, (out_features, in_features), data)
    layer = GGMLLinear(tensor, lanes=lanes, rounded_activations=True)
    assert "8-bit activations" in layer.kernel_name
    if quant_type in ("Q4_0", "Q4_1"):  # d, 8d and -m are float16 values: the compact records hold them
        assert (
            layer.kernel == native_ggml.LANES4_HALF_Q8 and layer.nbytes == out_features * in_features * 5 // 8
        )
    reference = gguf_dequantize(data, getattr(gguf.GGMLQuantizationType, quant_type))
    assert np.array_equal(layer.dequantized_weight().numpy(), reference.reshape(out_features, in_features))
    ids = torch.tensor([3, 36, 0])
    assert np.array_equal(layer.rows(ids).numpy(), reference.reshape(out_features, in_features)[[3, 36, 0]])
    x = torch.randn(rows, in_features)
    x[0, :32] = 0.0  # a group of zeros rounds to zero codes with a zero scale
    got = layer(x).double().numpy()
    expected, bound = rounded_reference(layer, x)
    assert (np.abs(got - expected) <= bound).all()
    weight = layer.dequantized_weight().double().numpy()
    exact = x.double().numpy() @ weight.T
    # the codes' values (value + offset) meet dx * q in place of x: |x - dx * q| <= dx / 2 = max |x| / 254
    scaled_codes = np.abs(weight.reshape(out_features, -1, 32) + lane_offsets(layer)[..., None]).sum(-1)
    largest = x.reshape(rows, -1, 32).abs().amax(-1).double().numpy()  # (rows, groups)
    rounding = (scaled_codes @ (largest / 254).T).T
    assert (np.abs(got - exact) <= rounding + bound).all()
    assert not np.array_equal(got, exact)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(rows)])
    assert torch.equal(layer(x), alone)


def test_rounded_activations_are_the_avx2_default_and_can_be_turned_off(monkeypatch):
    data = random_blocks("Q4_1", 8, 128, 5)
    tensor = BlockQuantizedTensor("w", "Q4_1", (8, 128), data)
    q8 = BlockQuantizedTensor("w", "Q8_0", (8, 128), random_blocks("Q8_0", 8, 128, 6))
    if native_ggml.instruction_set() == "avx2":
        assert GGMLLinear(tensor).kernel == native_ggml.LANES4_HALF_Q8
        assert GGMLLinear(q8).kernel == native_ggml.ROUNDED_BLOCK_KERNELS["Q8_0"]
        monkeypatch.setenv("EMBER_EXACT_ACTIVATIONS", "1")
        assert GGMLLinear(tensor).kernel == native_ggml.LANES4
        assert GGMLLinear(q8).kernel == "Q8_0"
    with pytest.raises(ValueError, match="no kernel with rounded activations"):
        GGMLLinear(tensor, lanes=False, rounded_activations=True)


@pytest.mark.parametrize(
    "quant_type, rounded", [("Q8_0", False), ("Q5_0", False), ("Q4_0", False), ("Q8_0", True)]
)
def test_avx2_decode_rows_equal_each_row_alone(quant_type, rounded):
    """Where the products are AVX2 (no AVX-512), a batch's decode rows take the one-row kernel's order of
    sums, so a sequence's logits do not depend on how many others share its step."""
    if native_ggml.instruction_set() != "avx2":
        pytest.skip("the fused one-row kernels are built for AVX2 without AVX-512")
    data = random_blocks(quant_type, 21, 320, 11)
    tensor = BlockQuantizedTensor("w", quant_type, (21, 320), data)
    layer = GGMLLinear(tensor, lanes=False, rounded_activations=rounded)
    x = torch.randn(NATIVE_GGML_ROWS, 320)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
    for rows in (2, 3, 4, 7, NATIVE_GGML_ROWS):
        assert torch.equal(layer(x[:rows]), alone[:rows]), rows


def test_lane_layout_only_where_rows_hold_whole_records():
    data = random_blocks("Q4_1", 4, 96, 7)  # 96 values: one record and a half
    tensor = BlockQuantizedTensor("w", "Q4_1", (4, 96), data)
    assert GGMLLinear(tensor).kernel == "Q4_1"
    with pytest.raises(ValueError, match="no lane layout"):
        GGMLLinear(tensor, lanes=True)
    q5 = BlockQuantizedTensor("w", "Q5_0", (4, 64), random_blocks("Q5_0", 4, 64, 8))
    assert GGMLLinear(q5).kernel in ("Q5_0", native_ggml.ROUNDED_BLOCK_KERNELS["Q5_0"])  # no lanes


def test_mixed_types_fuse_side_by_side():
    parts = [
        GGMLLinear(BlockQuantizedTensor("a", "Q5_0", (8, 64), random_blocks("Q5_0", 8, 64, 1))),
        GGMLLinear(BlockQuantizedTensor("b", "Q5_1", (4, 64), random_blocks("Q5_1", 4, 64, 2))),
    ]
    fused = ConcatLinear(parts)
    x = torch.randn(2, 64)
    assert torch.equal(fused(x), torch.cat([part(x) for part in parts], dim=-1))
    assert fused.native_kernel() is not None


def test_odd_shapes_are_rejected():
    data = random_blocks("Q4_K", 4, 256, 3)
    with pytest.raises(ModelLoadError, match="not whole 256-value blocks"):
        GGMLLinear(BlockQuantizedTensor("w", "Q4_K", (4, 300), data))
    with pytest.raises(ModelLoadError, match="needs"):
        GGMLLinear(BlockQuantizedTensor("w", "Q4_K", (5, 256), data))


def test_q5_0_widened_to_q8_0_blocks_keeps_every_value():
    """With 8-bit activations Q5_0 runs as Q8_0 blocks of the same d and codes (widened_blocks.py): the
    values, looked-up rows and exact-form products match the file's own blocks."""
    from ember.quant.widened_blocks import q5_0_as_q8_0

    data = random_blocks("Q5_0", 19, 160, 12)
    widened = q5_0_as_q8_0(data)
    assert widened.shape == (19, 5 * 34)
    own = gguf_dequantize(data, gguf.GGMLQuantizationType.Q5_0)
    assert np.array_equal(gguf_dequantize(widened, gguf.GGMLQuantizationType.Q8_0), own)
    if native_ggml.load() is None:
        pytest.skip("the GGML block kernels did not build here")
    tensor = BlockQuantizedTensor("w", "Q5_0", (19, 160), data)
    layer = GGMLLinear(tensor, rounded_activations=True)
    assert "as 8-bit codes" in layer.kernel_name and layer.nbytes == widened.nbytes
    assert np.array_equal(layer.dequantized_weight().numpy(), own.reshape(19, 160))
    ids = torch.tensor([18, 0, 7])
    assert torch.equal(layer.rows(ids), GGMLLinear(tensor, rounded_activations=False).rows(ids))
