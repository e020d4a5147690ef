"""Shared fixtures: the real model files, and tiny random-weight HF models per architecture."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
STORY_MODEL = SHARED / "models" / "story"
TINY_RWKV = SHARED / "models" / "tiny-rwkv"


def smollm2_gguf_path() -> Path:
    from ember.loader import resolve_model_path

    return resolve_model_path("smollm2")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()


def make_tiny_hf_model(
    folder: Path, architecture: str, num_kv_heads: int, seed: int = 0, **overrides
) -> Path:
    """Save a random-weight transformers model of `architecture` with the story tokenizer (vocab 2048)."""
    import transformers

    config_classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }
    settings = dict(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    config = config_classes[architecture](**settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Larger than the default init, so logits differ visibly between right and wrong math.
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.2)
            else:
                parameter.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORY_MODEL / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def smollm2_metadata(smollm2_gguf) -> dict:
    """The GGUF metadata as plain values (through ember's fast reader)."""
    from ember.formats.gguf import read_gguf

    return read_gguf(smollm2_gguf).metadata


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' float32 model from the same GGUF (dequantized): the test-only reference. Loaded once."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def break_native_build(monkeypatch, tmp_path: Path, library) -> None:
    """Make a `NativeLibrary` fail to build, as on a machine without a compiler (undone after the test)."""
    monkeypatch.setattr(library, "_tried", False)
    monkeypatch.setattr(library, "_library", None)
    monkeypatch.setattr(library, "failure_reason", None)
    monkeypatch.setattr(library, "source", library.source + "\n// a source not yet in the cache\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
