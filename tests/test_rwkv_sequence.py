"""Sequence mode equals token-by-token feeding; a batch equals each alone; snapshots inside prompts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rwkv_support import make_random_pth  # noqa: E402

from ember.formats.rwkv_cpp import read_rwkv_cpp  # noqa: E402
from ember.formats.rwkv_pth import read_rwkv_pth  # noqa: E402
from ember.models.batch import ForwardBatch  # noqa: E402
from ember.models.rwkv import RWKVModel  # noqa: E402
from ember.quant.linear import make_linear  # noqa: E402

TINY_RWKV = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "tiny-rwkv"
PROMPT_LENGTH = 300


def float_factory(weights, biases):
    return make_linear(weights, biases, quant="none")


@pytest.fixture(
    scope="module", params=["5v1-730K", "5v2-730K", "6v0-1m", "7v0-834K", "pth-4", "pth-6", "pth-7"]
)
def model(request, tmp_path_factory) -> RWKVModel:
    if request.param.startswith("pth-"):
        version = request.param.removeprefix("pth-")
        path = make_random_pth(version, tmp_path_factory.mktemp("rwkv") / "small.pth", seed=3, small=True)
        checkpoint = read_rwkv_pth(path)
    else:
        checkpoint = read_rwkv_cpp(TINY_RWKV / f"tiny-rwkv-{request.param}-FP32.bin")
    return RWKVModel(checkpoint.config, checkpoint.tensors, float_factory)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within 1e-5, relative to the values' size once they exceed 1 (float32 rounding)."""
    return float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


def _tokens(count: int, seed: int) -> list[int]:
    return torch.randint(1, 256, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_sequence_mode_equals_token_by_token(model):
    tokens = _tokens(PROMPT_LENGTH, seed=1)
    pool = model.new_cache()
    whole, single = pool.acquire(), pool.acquire()
    # whole prompt in chunks of 128 (as the engine reads a long prompt)
    pieces = []
    for start in range(0, PROMPT_LENGTH, 128):
        chunk = tokens[start : start + 128]
        batch = ForwardBatch(torch.tensor([chunk]), [start], [whole.slot], all_logits=True)
        pieces.append(model.forward(batch, pool)[0])
    sequence_logits = torch.cat(pieces)
    step_logits = []
    for position, token in enumerate(tokens):
        batch = ForwardBatch(torch.tensor([[token]]), [position], [single.slot])
        step_logits.append(model.forward(batch, pool)[0, -1])
    # 1e-5 relative to the values' size: one row and 128 rows go through different matrix kernels
    # (summation order), so logits of size ~8 differ by a few float32 ulps (measured <= 1.4e-5)
    assert close(sequence_logits, torch.stack(step_logits))
    for name, tensor in pool.tensors.items():
        assert close(tensor[whole.slot], tensor[single.slot]), name


def test_batch_equals_each_alone(model):
    prompts = [_tokens(20, seed) for seed in (2, 3, 4)]
    pool = model.new_cache()
    entries = [pool.acquire() for _ in prompts]
    slots = [entry.slot for entry in entries]
    batched = model.forward(ForwardBatch(torch.tensor(prompts), [0, 0, 0], slots, all_logits=True), pool)
    # then one decode step of all three, with slots out of order
    order = [2, 0, 1]
    step = model.forward(
        ForwardBatch(torch.tensor([[7], [8], [9]]), [20] * 3, [slots[i] for i in order]), pool
    )
    for row, prompt in enumerate(prompts):
        alone_pool = model.new_cache()
        entry = alone_pool.acquire()
        alone = model.forward(
            ForwardBatch(torch.tensor([prompt]), [0], [entry.slot], all_logits=True), alone_pool
        )
        assert (alone[0] - batched[row]).abs().max() < 1e-5
        next_token = [7, 8, 9][order.index(row)]
        after = model.forward(ForwardBatch(torch.tensor([[next_token]]), [20], [entry.slot]), alone_pool)
        assert (after[0, -1] - step[order.index(row), -1]).abs().max() < 1e-5


def test_state_captured_inside_a_chunk_equals_feeding_that_prefix(model):
    tokens = _tokens(40, seed=5)
    pool = model.new_cache()
    entry = pool.acquire()
    assert pool.reusable_prefix(entry, tokens) == 0  # asks for the state after 39 tokens
    pool.truncate(entry, 0)
    model.forward(ForwardBatch(torch.tensor([tokens]), [0], [entry.slot]), pool)
    entry.token_ids.extend(tokens)
    assert tuple(tokens[:39]) in pool.snapshots
    reference = model.new_cache()
    other = reference.acquire()
    model.forward(ForwardBatch(torch.tensor([tokens[:39]]), [0], [other.slot]), reference)
    for name, tensor in reference.tensors.items():
        assert (pool.snapshots[tuple(tokens[:39])][name] - tensor[other.slot]).abs().max() < 1e-5, name


def test_native_recurrence_equals_the_pytorch_loop(model, monkeypatch):
    from ember.models import rwkv_native

    if rwkv_native.load() is None:
        pytest.skip("the native kernel does not build here")
    monkeypatch.setattr(rwkv_native, "ENABLED", True)
    tokens = _tokens(50, seed=9)

    def run():
        pool = model.new_cache()
        entry = pool.acquire()
        pool.reusable_prefix(entry, tokens)  # asks for a capture inside the chunk
        logits = model.forward(ForwardBatch(torch.tensor([tokens]), [0], [entry.slot], all_logits=True), pool)
        return logits, pool.tensors, pool.snapshots[tuple(tokens[:49])]

    native_logits, native_state, native_capture = run()
    monkeypatch.setattr(rwkv_native, "usable", lambda *tensors: False)
    loop_logits, loop_state, loop_capture = run()

    assert close(native_logits, loop_logits)
    for name in native_state:
        assert close(native_state[name], loop_state[name]), name
        assert close(native_capture[name], loop_capture[name]), name
