"""The default model, SmolLM2-135M-Instruct (GGUF Q4_1), against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

import ember
from ember.chat_template import ChatTemplate
from ember.engine.sequence import GenerationRequest
from ember.sampling import SamplingParams

QUESTION = "What is the capital of France? Answer in one sentence."
LONG_TEXT = (
    "The history of the city begins with a small fishing village on the banks of a wide river. "
    "Traders came by boat, stayed for the winter, and built the first stone houses near the ford. "
    "Over three centuries the village grew into a market town with a cathedral, two bridges and a "
    "university, and its merchants sent wool, salt and timber to ports along the whole coast. "
) * 3


@pytest.fixture(scope="module")
def exact():
    return ember.load("smollm2", quant="none")


@pytest.fixture(scope="module")
def reference(hf_smollm2):
    return hf_smollm2


def _chat_prompt(handle: ember.ModelHandle, question: str = QUESTION) -> list[int]:
    text = ChatTemplate.for_tokenizer(handle.tokenizer).render([{"role": "user", "content": question}])
    return handle.encode(text)


def _greedy(handle: ember.ModelHandle, prompt: list[int], count: int, ignore_eos: bool = True) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=count, ignore_eos=ignore_eos)
    outputs = handle.engine.generate(GenerationRequest(prompt, params))
    return [o.token_id for o in outputs if o.token_id is not None]


def test_dequantized_logits_match_transformers(exact, reference):
    prompt = _chat_prompt(exact)
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    ours = exact.logits(prompt)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-3


def test_greedy_output_matches_transformers(exact, reference):
    prompt = _chat_prompt(exact)
    generated = reference.generate(
        torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None
    )
    assert _greedy(exact, prompt, 32) == generated[0, len(prompt) :].tolist()


@pytest.mark.parametrize("quant, min_agreement", [("int8", 0.9), ("int4", 0.9)])
def test_low_bit_execution_stays_close(exact, quant, min_agreement):
    handle = ember.load("smollm2", quant=quant)
    assert handle.info.quant == quant
    assert handle.info.weight_bytes < exact.info.weight_bytes / 2
    answer = handle.decode(_greedy(handle, _chat_prompt(handle), 24, ignore_eos=False))
    assert "Paris" in answer
    # Top-1 agreement with exact float32 weights over every position of a long prompt.
    tokens = exact.encode(LONG_TEXT)
    assert len(tokens) > 150
    agreement = (handle.logits(tokens).argmax(-1) == exact.logits(tokens).argmax(-1)).float().mean().item()
    print(f"{quant}: top-1 agreement with float32 over {len(tokens)} positions: {agreement:.3f}")
    assert agreement >= min_agreement


def test_default_model_is_smollm2_in_its_low_bit_form():
    handle = ember.load()
    assert handle.info.format == "gguf"
    assert handle.info.quant == "int4"  # Q4_1 blocks run as int4 without rounding
    assert handle.config.num_layers == 30 and handle.config.vocab_size == 49152
    assert handle.tokenizer.chat_template and "<|im_start|>" in handle.tokenizer.chat_template
