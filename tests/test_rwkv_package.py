"""ember's RWKV against the `rwkv` package (ChatRWKV's own code) on random real-shape .pth models.

RWKV-4 169M-shaped, RWKV-6 and RWKV-7 0.1B-shaped checkpoints, written once per
session by a seeded helper; the package runs in a subprocess per model (its
v7 switch is read at import). Logits must agree within 1e-3 at every position
of a 64-token prompt (read in sequence mode) and for 16 greedily decoded tokens;
for the prompt, ember's float64 run is held to that bound and its float32 run
to twice it (random weights leave some heads near-constant, and their group norm
magnifies float32 rounding: ember's float32 run is 1.2e-3 from its float64 run
on an AVX2 machine, the package's 2e-4).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rwkv_support import make_random_pth, run_rwkv_package  # noqa: E402

from ember.errors import ModelLoadError  # noqa: E402
from ember.formats.rwkv_pth import read_rwkv_pth  # noqa: E402
from ember.models.batch import ForwardBatch  # noqa: E402
from ember.models.rwkv import RWKVModel  # noqa: E402
from ember.quant.linear import make_linear  # noqa: E402

TOKENIZERS = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "tokenizers"
PROMPT_LENGTH, DECODE_STEPS = 64, 16


@pytest.fixture(scope="session")
def rwkv_pth_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rwkv-pth")
    shutil.copy(TOKENIZERS / "20B_tokenizer.json", folder)  # the 169M-shaped v4 has the 20B vocabulary
    shutil.copy(TOKENIZERS / "rwkv_vocab_v20230424.txt", folder)
    return folder


def _prompt(vocab_size: int) -> list[int]:
    return [int(token) for token in np.random.RandomState(7).randint(1, vocab_size, size=PROMPT_LENGTH)]


@pytest.mark.slow
@pytest.mark.parametrize("version", ["4", "6", "7"])
def test_logits_match_the_rwkv_package(rwkv_pth_folder, version):
    path = make_random_pth(version, rwkv_pth_folder / f"random-v{version}.pth", seed=int(version))
    checkpoint = read_rwkv_pth(path)
    assert checkpoint.config.version == version
    prompt = _prompt(checkpoint.config.vocab_size)
    reference = run_rwkv_package(path, version, prompt, DECODE_STEPS, rwkv_pth_folder / f"ref-v{version}.npz")

    exact = _prompt_logits_in_float64(checkpoint, prompt)
    assert np.abs(exact - reference["prompt_logits"]).max() < 1e-3
    model = RWKVModel(checkpoint.config, checkpoint.tensors, lambda w, b: make_linear(w, b, quant="none"))
    pool = model.new_cache()
    entry = pool.acquire()
    prompt_logits = model.forward(
        ForwardBatch(torch.tensor([prompt]), [0], [entry.slot], all_logits=True), pool
    )
    entry.token_ids.extend(prompt)
    assert np.abs(prompt_logits[0].numpy() - reference["prompt_logits"]).max() < 2e-3
    decoded = []
    for token in reference["tokens"].tolist():
        batch = ForwardBatch(torch.tensor([[token]]), [len(entry.token_ids)], [entry.slot])
        decoded.append(model.forward(batch, pool)[0, -1])
        entry.token_ids.append(token)
    assert np.abs(torch.stack(decoded).numpy() - reference["decode_logits"]).max() < 1e-3
    # the greedy continuation is ours too
    assert int(torch.argmax(prompt_logits[0, -1])) == reference["tokens"][0]


def _prompt_logits_in_float64(checkpoint, prompt: list[int]) -> np.ndarray:
    """ember's prompt logits with every weight and activation in float64: the math without its rounding."""
    tensors = {
        name: value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        for name, value in checkpoint.tensors.items()
    }
    model = RWKVModel(
        checkpoint.config, tensors, lambda w, b: make_linear(w, b, quant="none", dtype=torch.float64)
    )
    pool = model.new_cache()
    entry = pool.acquire()
    batch = ForwardBatch(torch.tensor([prompt]), [0], [entry.slot], all_logits=True)
    return model.forward(batch, pool)[0].numpy()


@pytest.mark.slow  # a package subprocess per version (torch import and its JIT)
@pytest.mark.parametrize("version", ["4", "5", "5.1", "5.2", "6", "7"])
def test_small_models_of_every_version_match_the_rwkv_package(tmp_path, version):
    path = make_random_pth(version, tmp_path / f"small-v{version}.pth", seed=11, small=True)
    checkpoint = read_rwkv_pth(path)
    assert checkpoint.config.version == version
    assert checkpoint.config.group_norm_eps == 64e-5
    prompt = [int(t) for t in np.random.RandomState(3).randint(1, 256, size=24)]
    reference = run_rwkv_package(path, version, prompt, 4, tmp_path / "reference.npz")
    model = RWKVModel(checkpoint.config, checkpoint.tensors, lambda w, b: make_linear(w, b, quant="none"))
    pool = model.new_cache()
    entry = pool.acquire()
    logits = model.forward(ForwardBatch(torch.tensor([prompt]), [0], [entry.slot], all_logits=True), pool)
    entry.token_ids.extend(prompt)
    assert np.abs(logits[0].numpy() - reference["prompt_logits"]).max() < 1e-4
    for token, expected in zip(reference["tokens"].tolist(), reference["decode_logits"]):
        step = model.forward(
            ForwardBatch(torch.tensor([[token]]), [len(entry.token_ids)], [entry.slot]), pool
        )
        entry.token_ids.append(token)
        assert np.abs(step[0, -1].numpy() - expected).max() < 1e-4


def test_foreign_and_broken_pth_files(tmp_path):
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a readable PyTorch checkpoint"):
        read_rwkv_pth(tmp_path / "text.pth")
    torch.save({"linear.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ModelLoadError, match="lacks tensor"):
        read_rwkv_pth(tmp_path / "other.pth")
    path = make_random_pth("7", tmp_path / "small.pth", seed=0, small=True)
    state = torch.load(path, weights_only=True)
    del state["blocks.1.att.v1"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ModelLoadError, match="lacks tensor blocks.1.att.v1"):
        read_rwkv_pth(tmp_path / "missing.pth")
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        read_rwkv_pth(tmp_path / "cut.pth")
