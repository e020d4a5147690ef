"""RWKV v4..v7 from rwkv.cpp files: the tiny models' reference logits, dtypes, and load errors."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.errors import ModelLoadError
from ember.formats.rwkv_cpp import read_rwkv_cpp
from ember.models import build_model
from ember.models.batch import ForwardBatch
from ember.models.rwkv import RWKVModel
from ember.quant import native_int4, native_int8
from ember.quant.linear import make_linear

TINY_RWKV = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "tiny-rwkv"
PROMPT = [34, 105, 110]  # '"in'
FILES = sorted(path.name for path in TINY_RWKV.glob("tiny-rwkv-*.bin"))
# rwkv.cpp's tolerances on sum(ours - expected) over the 256 logits (FORMATS.md). They are rwkv.cpp's
# own sums, which round activations to 8 bits inside quantized products. A Q5 file's default form
# ("int8": its Q5 blocks as stored on the GGML kernels, which multiply float32 activations, and the
# float32 head rounded to Q8) lands inside every one (v7: 0.060 and 0.058). Exact float math on the
# dequantized weights (`quant="none"`) does too except for v7's Q5 pair (0.075 and 0.073; simulating
# ggml's activation rounding gives 0.064), held to DEQUANTIZED_V7_Q5_TOLERANCE.
SUM_TOLERANCES = {
    ("4v0", "FP16"): 0.014,
    ("5v1", "FP16"): 0.29,
    ("5v2", "FP16"): 0.46,
    ("6v0", "FP16"): 0.42,
    ("7v0", "FP16"): 0.006,
    ("4v0", "Q5_0"): 0.17,
    ("4v0", "Q5_1"): 0.28,
    ("5v1", "Q5_0"): 163,
    ("5v1", "Q5_1"): 18,
    ("5v2", "Q5_0"): 25,
    ("5v2", "Q5_1"): 48,
    ("6v0", "Q5_0"): 27.3,
    ("6v0", "Q5_1"): 3.6,
    ("7v0", "Q5_0"): 0.064,
    ("7v0", "Q5_1"): 0.065,
}
DEQUANTIZED_V7_Q5_TOLERANCE = 0.08
# ggml rounds activations to float16 inside an FP16 product; exact float32 math on the same weights lands
# at the edge of rwkv.cpp's 5v1 sum (-0.2898 with oneDNN's order, -0.2900 with the native kernel's; the
# FP32 files' sums move by up to 2e-4 between the two orders). This slack covers summation order only.
FP16_ORDER_SLACK = 1e-3


def float_factory(weights, biases):
    return make_linear(weights, biases, quant="none")


def feed_one_by_one(model: RWKVModel, token_ids: list[int]) -> torch.Tensor:
    pool = model.new_cache()
    entry = pool.acquire()
    for position, token in enumerate(token_ids):
        logits = model.forward(ForwardBatch(torch.tensor([[token]]), [position], [entry.slot]), pool)
        entry.token_ids.append(token)
    return logits[0, -1]


def expected_logits(file_name: str) -> np.ndarray:
    _, _, version, size, _ = file_name.split("-")
    return np.fromfile(TINY_RWKV / f"expected-logits-{version}-{size}.bin", dtype="<f4")


@pytest.mark.parametrize("file_name", FILES)
def test_tiny_model_matches_reference_logits(file_name):
    """Each file in its default form: float for FP32/FP16, its own Q5 blocks on the GGML kernels."""
    checkpoint = read_rwkv_cpp(TINY_RWKV / file_name)
    quant = checkpoint.details["default_quant"]
    model = build_model(checkpoint, torch.float32, quant, torch.device("cpu"))  # as ember.load builds it
    difference = feed_one_by_one(model, PROMPT).numpy() - expected_logits(file_name)
    version, kind = file_name.split("-")[2], file_name.split("-")[4].removesuffix(".bin")
    if kind == "FP32":
        assert np.abs(difference).max() < 1e-4
    else:
        slack = FP16_ORDER_SLACK if kind == "FP16" else 0.0
        assert abs(difference.sum()) < SUM_TOLERANCES[(version, kind)] + slack
        assert np.abs(difference).max() < 2.0  # a wrong layout moves logits by far more
    if kind.startswith("Q5"):
        key = model.blocks[0].linears["att.key"]
        assert quant == "int8" and type(key).__name__ == "GGMLLinear"
        assert "8-bit activations" not in key.kernel_name  # RWKVModel.rounds_activations is False


@pytest.mark.parametrize("file_name", [name for name in FILES if "-Q5_" in name])
def test_dequantized_q5_files_stay_close(file_name):
    """The same files expanded to float32 (`--quant none`): exact math on the stored values."""
    checkpoint = read_rwkv_cpp(TINY_RWKV / file_name)
    model = RWKVModel(checkpoint.config, checkpoint.tensors, float_factory)
    difference = feed_one_by_one(model, PROMPT).numpy() - expected_logits(file_name)
    version, kind = file_name.split("-")[2], file_name.split("-")[4].removesuffix(".bin")
    tolerance = DEQUANTIZED_V7_Q5_TOLERANCE if version == "7v0" else SUM_TOLERANCES[(version, kind)]
    assert abs(difference.sum()) < tolerance


def test_versions_told_from_tensors():
    versions = {name: read_rwkv_cpp(TINY_RWKV / name).config.version for name in FILES if "FP32" in name}
    assert versions == {
        "tiny-rwkv-4v0-660K-FP32.bin": "4",
        "tiny-rwkv-5v1-730K-FP32.bin": "5",  # per-head decay without a gate (the package's 5.0)
        "tiny-rwkv-5v2-730K-FP32.bin": "5.2",
        "tiny-rwkv-6v0-1m-FP32.bin": "6",
        "tiny-rwkv-7v0-834K-FP32.bin": "7",
    }
    config = read_rwkv_cpp(TINY_RWKV / "tiny-rwkv-5v2-730K-FP32.bin").config
    assert (config.num_heads, config.head_size, config.group_norm_eps) == (8, 8, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("version", ["4v0-660K", "7v0-834K"])
def test_half_precision_weights_stay_close(version, dtype):
    checkpoint = read_rwkv_cpp(TINY_RWKV / f"tiny-rwkv-{version}-FP32.bin")

    def factory(weights, biases):
        return make_linear(weights, biases, quant="none", dtype=dtype)

    model = RWKVModel(checkpoint.config, checkpoint.tensors, factory, dtype=dtype)
    difference = feed_one_by_one(model, PROMPT).numpy() - expected_logits(f"x-x-{version}-x")
    assert np.abs(difference).max() < 0.1
    assert (
        model.weight_bytes() < RWKVModel(checkpoint.config, checkpoint.tensors, float_factory).weight_bytes()
    )


def test_low_bit_layers_for_quantized_weights():
    checkpoint = read_rwkv_cpp(TINY_RWKV / "tiny-rwkv-7v0-834K-Q5_1.bin")

    def factory(weights, biases):
        return make_linear(weights, biases, quant="int8")

    model = RWKVModel(checkpoint.config, checkpoint.tensors, factory)
    # Q5_1 runs on the GGML block kernel from its own bytes: no float copy, no re-rounding
    layer = model.blocks[0].linears["att.key"]
    assert type(layer).__name__ == "GGMLLinear"
    assert layer.nbytes < layer.in_features * layer.out_features  # under one byte per weight
    difference = feed_one_by_one(model, PROMPT).numpy() - expected_logits("x-x-7v0-834K-x")
    assert np.abs(difference).max() < 0.05


def _copy(source: Path, target: Path, cut: int | None = None, patch: tuple[int, bytes] | None = None) -> Path:
    data = bytearray(source.read_bytes())
    if cut is not None:
        data = data[:cut]
    if patch is not None:
        offset, value = patch
        data[offset : offset + len(value)] = value
    target.write_bytes(bytes(data))
    return target


def test_bad_files_are_one_line_errors(tmp_path):
    source = TINY_RWKV / "tiny-rwkv-7v0-834K-FP32.bin"
    size = source.stat().st_size
    with pytest.raises(ModelLoadError, match="truncated"):
        read_rwkv_cpp(_copy(source, tmp_path / "cut.bin", cut=size - 100))
    with pytest.raises(ModelLoadError, match="not an rwkv.cpp"):
        read_rwkv_cpp(_copy(source, tmp_path / "magic.bin", patch=(0, b"XXXX")))
    with pytest.raises(ModelLoadError, match="file version"):
        read_rwkv_cpp(_copy(source, tmp_path / "version.bin", patch=(4, struct.pack("<i", 7))))
    # rename the first layer's key matrix: a missing tensor, named
    data = source.read_bytes()
    offset = data.index(b"blocks.0.att.key.weight")
    with pytest.raises(ModelLoadError, match="lacks tensor blocks.0.att.key.weight"):
        read_rwkv_cpp(_copy(source, tmp_path / "missing.bin", patch=(offset, b"blocks.0.att.kez.weight")))
    (tmp_path / "short.bin").write_bytes(b"fmgg")
    with pytest.raises(ModelLoadError):
        read_rwkv_cpp(tmp_path / "short.bin")


def _requantize(source: Path, target: Path, quant_type: str) -> Path:
    """Rewrite an FP32 rwkv.cpp file with its 2-D matrices (not emb/head) in `quant_type` (rwkv.cpp ids)."""
    import gguf.quants
    from gguf import GGMLQuantizationType

    type_ids = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 9}
    data = source.read_bytes()
    header = bytearray(data[:24])
    header[20:24] = struct.pack("<i", type_ids[quant_type])
    out = [bytes(header)]
    offset = 24
    while offset < len(data):
        dim_count, key_length, tensor_type = struct.unpack("<3i", data[offset : offset + 12])
        shape = struct.unpack(f"<{dim_count}i", data[offset + 12 : offset + 12 + 4 * dim_count])
        key = data[offset + 12 + 4 * dim_count : offset + 12 + 4 * dim_count + key_length]
        offset += 12 + 4 * dim_count + key_length
        count = int(np.prod(shape))
        values = np.frombuffer(data[offset : offset + 4 * count], dtype="<f4").reshape(tuple(reversed(shape)))
        offset += 4 * count
        name = key.decode()
        if dim_count == 2 and name not in ("emb.weight", "head.weight") and shape[0] % 32 == 0:
            payload = gguf.quants.quantize(values, getattr(GGMLQuantizationType, quant_type)).tobytes()
            tensor_type = type_ids[quant_type]
        else:
            payload = values.tobytes()
        out.append(
            struct.pack(f"<3i{dim_count}i", dim_count, key_length, tensor_type, *shape) + key + payload
        )
    target.write_bytes(b"".join(out))
    return target


# the AVX-512 tile layers where those kernels build; elsewhere the blocks stay blocks on the GGML kernels
Q8_LAYER = "Q8Linear" if native_int8.load() is not None else "GGMLLinear"
Q4_LAYER = "Int4Linear" if native_int4.load() is not None else "GGMLLinear"


@pytest.mark.parametrize(
    ("quant_type", "quant", "layer", "tolerance"),
    [
        ("Q8_0", "int8", Q8_LAYER, 0.02),
        ("Q4_0", "int4", Q4_LAYER, 0.3),
        ("Q4_1", "int4", Q4_LAYER, 0.3),
    ],
)
def test_q8_and_q4_files_run_on_low_bit_layers(tmp_path, quant_type, quant, layer, tolerance):
    path = _requantize(
        TINY_RWKV / "tiny-rwkv-7v0-834K-FP32.bin", tmp_path / f"v7-{quant_type}.bin", quant_type
    )
    checkpoint = read_rwkv_cpp(path)
    assert checkpoint.details["default_quant"] == quant
    exact = RWKVModel(checkpoint.config, checkpoint.tensors, float_factory)

    def factory(weights, biases):
        return make_linear(weights, biases, quant=quant)

    low_bit = RWKVModel(checkpoint.config, checkpoint.tensors, factory)
    assert type(low_bit.blocks[0].linears["ffn.key"]).__name__ == layer
    # the blocks are kept as they are: only activation rounding separates the low-bit layers from exact math
    difference = feed_one_by_one(low_bit, PROMPT) - feed_one_by_one(exact, PROMPT)
    assert difference.abs().max() < tolerance
    reference = expected_logits("x-x-7v0-834K-x")
    assert np.abs(feed_one_by_one(exact, PROMPT).numpy() - reference).max() < 2 * tolerance + 0.1
