"""The same engine on a CUDA device; skipped cleanly on machines without one."""

from __future__ import annotations

import pytest
import torch

import ember
from tests.conftest import STORY_MODEL, make_tiny_hf_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_float32_logits_equal_cpu(tmp_path):
    folder = make_tiny_hf_model(tmp_path, "llama", 2)
    tokens = list(range(10, 40))
    on_cpu = ember.load(folder, device="cpu").logits(tokens)
    on_gpu = ember.load(folder, device="cuda").logits(tokens).cpu()
    assert (on_cpu - on_gpu).abs().max().item() < 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_half_precision_generates_the_same_story_start(dtype):
    reference = "".join(ember.load(STORY_MODEL).generate("Once upon a time", temperature=0.0, max_tokens=8))
    handle = ember.load(STORY_MODEL, device="cuda", dtype=dtype)
    assert handle.model.device.type == "cuda"
    text = "".join(handle.generate("Once upon a time", temperature=0.0, max_tokens=8))
    assert text.split()[:3] == reference.split()[:3]


def test_cuda_default_model_answers():
    handle = ember.load("smollm2", device="cuda", dtype="bfloat16")
    answer = "".join(handle.generate("The capital of France is", temperature=0.0, max_tokens=8))
    assert "Paris" in answer
