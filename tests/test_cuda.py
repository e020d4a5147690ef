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
    on_gpu = ember.load(folder, device="cuda", dtype="float32").logits(tokens).cpu()
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


def test_cuda_graph_decode_gives_the_op_by_op_tokens_and_records_once_per_bucket():
    from ember.engine.sequence import GenerationRequest
    from ember.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)

    def run(handle) -> list[list[int]]:
        engine = handle.engine
        ids = [
            engine.add_request(GenerationRequest(handle.encode(prompt), params)).request_id
            for prompt in ("Once upon a time", "The little dog", "Tom and Sue went to the park.")
        ]
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for output in engine.step():
                if output.token_id is not None:
                    tokens.setdefault(output.request_id, []).append(output.token_id)
        return [tokens[request_id] for request_id in ids]

    captured = ember.load(STORY_MODEL, device="cuda", dtype="float32")
    op_by_op = ember.load(STORY_MODEL, device="cuda", dtype="float32", cuda_graphs=False)
    assert op_by_op.model.decode_graphs is None
    assert run(captured) == run(op_by_op)
    graphs = captured.model.decode_graphs
    assert graphs.steps >= 31 and 1 <= graphs.captures <= 3  # buckets 4, then 2 or 1 as sequences end
