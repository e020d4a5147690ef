"""Config parsing and weight loading: sharded files, dtypes, quantizing at load, clear errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import ember
from ember.config import ModelConfig
from ember.errors import ModelLoadError, UnsupportedArchitectureError
from tests.conftest import STORY_MODEL, make_tiny_hf_model


def test_story_config():
    config = ModelConfig.from_hf_file(STORY_MODEL / "config.json")
    assert (config.architecture, config.hidden_size, config.num_layers) == ("llama", 128, 2)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (8, 4, 16)
    assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (384, 2048, 512)
    assert config.tie_word_embeddings and config.rms_norm_eps == 1e-6 and config.rope_theta == 10000.0
    assert (config.bos_token_id, config.eos_token_ids) == (1, [2])


def test_mistral_and_qwen2_fields():
    mistral = ModelConfig.from_hf_dict(
        {
            "model_type": "mistral",
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 100,
            "sliding_window": 32,
            "head_dim": 32,
            "eos_token_id": [2, 7],
        }  # fmt: skip
    )
    assert mistral.sliding_window == 32 and mistral.head_dim == 32 and mistral.eos_token_ids == [2, 7]
    assert not mistral.attention_bias
    qwen = ModelConfig.from_hf_dict(
        {
            "model_type": "qwen2",
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "vocab_size": 100,
            "sliding_window": 32,
            "use_sliding_window": False,
            "tie_word_embeddings": True,
        }  # fmt: skip
    )
    assert qwen.attention_bias and qwen.sliding_window is None and qwen.num_kv_heads == 4


@pytest.mark.parametrize(
    "change, error, fragment",
    [
        ({"model_type": "gpt_neox"}, UnsupportedArchitectureError, "llama, mistral, qwen2"),
        ({"num_hidden_layers": None}, ModelLoadError, "num_hidden_layers"),
        ({"num_key_value_heads": 3}, ModelLoadError, "multiple"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ModelLoadError, "yarn"),
    ],
)
def test_config_errors_name_the_problem(change, error, fragment):
    raw = json.loads((STORY_MODEL / "config.json").read_text())
    for key, value in change.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    with pytest.raises(error, match=fragment):
        ModelConfig.from_hf_dict(raw)


def test_sharded_safetensors_equal_single_file(tmp_path):
    single = make_tiny_hf_model(tmp_path / "single", "llama", 4)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(single)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((single / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    tokens = list(range(5, 25))
    assert torch.equal(ember.load(single).logits(tokens), ember.load(sharded).logits(tokens))


def test_missing_shard_is_a_clear_error(tmp_path):
    folder = make_tiny_hf_model(tmp_path / "m", "llama", 4)
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, max_shard_size="200KB")
    (folder / "model.safetensors").unlink(missing_ok=True)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="lacks shard"):
        ember.load(folder)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_stays_close(dtype):
    tokens = ember.load(STORY_MODEL).encode("Once upon a time, there was a little girl")
    exact = ember.load(STORY_MODEL).logits(tokens)
    half = ember.load(STORY_MODEL, dtype=dtype)
    assert half.model.dtype == getattr(torch, dtype)
    logits = half.logits(tokens)
    assert logits.dtype == torch.float32
    assert (logits.argmax(-1) == exact.argmax(-1)).float().mean() > 0.8
    assert (logits - exact).abs().max() < 0.5


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_safetensors_quantized_at_load(quant):
    exact = ember.load(STORY_MODEL)
    quantized = ember.load(STORY_MODEL, quant=quant)
    assert quantized.info.quant == quant
    assert quantized.info.weight_bytes < exact.info.weight_bytes
    tokens = exact.encode("Once upon a time, there was a little girl named Lily. She loved to play outside.")
    agreement = (quantized.logits(tokens).argmax(-1) == exact.logits(tokens).argmax(-1)).float().mean()
    assert agreement > 0.7


def test_unknown_dtype_and_quant_are_errors():
    with pytest.raises(ember.EmberError, match="dtype"):
        ember.load(STORY_MODEL, dtype="float8")
    with pytest.raises(ember.EmberError, match="quant"):
        ember.load(STORY_MODEL, quant="int3")


@pytest.mark.parametrize(
    ("name", "rows"),
    [("model.layers.1.self_attn.k_proj.weight", 24), ("model.layers.0.mlp.down_proj.weight", 100)],
)
def test_a_weight_of_the_wrong_shape_is_a_load_error_naming_it(tmp_path, name, rows):
    """Weights that disagree with config.json fail at load, not mid-generation (nor in a native kernel)."""
    from safetensors.torch import load_file, save_file

    folder = make_tiny_hf_model(tmp_path, "llama", 2)
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = tensors[name][:rows].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=re.escape(f"{name} has shape ({rows}, ")):
        ember.load(folder)


def test_a_config_vocab_size_that_disagrees_with_the_embedding_fails_at_load(tmp_path):
    folder = tmp_path / "story"
    shutil.copytree(STORY_MODEL, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    with pytest.raises(ModelLoadError) as caught:
        ember.load(folder)
    message = str(caught.value)
    assert "vocab_size 1000" in message and "2048 rows" in message and "\n" not in message


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        ({"device": "tpu"}, "device must be one of cpu, cuda (or cuda:N), got 'tpu'"),
        ({"device": 3}, "device must be a str or a torch.device, got int"),
        ({"dtype": 32}, "dtype must be a str or a torch.dtype, got int"),
        ({"quant": 8}, "quant must be None or one of none, int8, int4, got 8"),
        ({"cache_memory_mib": 0}, "cache_memory_mib must be a positive number"),
        ({"cache_memory_mib": -1}, "cache_memory_mib must be a positive number"),
        ({"cache_memory_mib": "1024"}, "cache_memory_mib must be a number of MiB"),
        ({"context_length": 256.5}, "context_length must be a whole number or None"),
        ({"cuda_graphs": "no"}, "cuda_graphs must be True or False"),
        ({"path": 5}, "path must be a str or a Path, got int"),
    ],
)
def test_load_arguments_of_the_wrong_type_are_errors_naming_them(arguments, fragment):
    arguments = {"path": STORY_MODEL, **arguments}
    with pytest.raises(ember.EmberError) as caught:
        ember.load(**arguments)
    assert fragment in str(caught.value)


def test_a_folder_with_two_gguf_files_names_them_and_asks_which(tmp_path):
    for name in ("model-Q4_1.gguf", "model-Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError) as caught:
        ember.load(tmp_path)
    message = str(caught.value)
    assert "model-Q4_1.gguf, model-Q8_0.gguf" in message and "which one?" in message
    assert "neither" not in message
