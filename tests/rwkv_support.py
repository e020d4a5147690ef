"""Seeded random-weight RWKV checkpoints in BlinkDL's `.pth` layout, and the `rwkv` package run on them.

The shapes are those of real models (RWKV-4 169M, RWKV-6 and RWKV-7 0.1B),
the values drawn so that activations stay in the ranges trained models have
(decays in (0, 1), mix vectors in [0, 1], matrices scaled by 1/sqrt(fan-in)),
so a wrong transpose, decay or norm moves the logits far beyond the tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

SHAPES = {
    # version: (layers, width, vocab, ffn width, heads)
    "4": (12, 768, 50277, 3072, 0),
    "6": (12, 768, 65536, 2688, 12),
    "7": (12, 768, 65536, 3072, 12),
}
RUNNER = Path(__file__).resolve().parent / "rwkv_package_runner.py"


# a small model of each version for fast tests: 2 layers, 128 wide, 2 heads, the byte vocabulary
SMALL_SHAPE = (2, 128, 256, 256, 2)


def make_random_pth(version: str, path: Path, seed: int = 0, small: bool = False) -> Path:
    """Write a random RWKV checkpoint of `version` ("4", "5", "5.1", "5.2" small only; "6", "7") to `path`."""
    layers, C, V, F, H = SMALL_SHAPE if small else SHAPES[version]
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=generator) * std + mean

    def uniform(*shape, low=0.0, high=1.0):
        return torch.rand(*shape, generator=generator) * (high - low) + low

    def matrix(out_features, in_features):
        return normal(out_features, in_features, std=in_features**-0.5)

    def mix():
        return uniform(1, 1, C)

    state: dict[str, torch.Tensor] = {"emb.weight": normal(V, C, std=0.5)}
    state["blocks.0.ln0.weight"] = normal(C, std=0.1, mean=1.0)
    state["blocks.0.ln0.bias"] = normal(C, std=0.1)
    for index in range(layers):
        block, att, ffn = f"blocks.{index}.", f"blocks.{index}.att.", f"blocks.{index}.ffn."
        for norm in ("ln1", "ln2"):
            state[block + norm + ".weight"] = normal(C, std=0.1, mean=1.0)
            state[block + norm + ".bias"] = normal(C, std=0.1)
        for name in ("receptance", "key", "value", "output"):
            state[att + name + ".weight"] = matrix(C, C)
        state[ffn + "key.weight"] = matrix(F, C)
        state[ffn + "value.weight"] = matrix(C, F) * 0.5
        if version == "4":
            state[att + "time_decay"] = uniform(C, low=-3.0, high=1.0)
            state[att + "time_first"] = uniform(C, low=-1.0, high=1.0)
            for name in ("k", "v", "r"):
                state[att + f"time_mix_{name}"] = mix()
            for name in ("k", "r"):
                state[ffn + f"time_mix_{name}"] = mix()
            state[ffn + "receptance.weight"] = matrix(C, C)
        elif version in ("5", "5.1", "5.2"):
            N = C // H
            for name in ("k", "v", "r") + (("g",) if version != "5" else ()):
                state[att + f"time_mix_{name}"] = mix()
            if version == "5.2":
                state[att + "time_decay"] = uniform(H, N, low=-6.0, high=0.5)
                state[att + "time_faaaa"] = uniform(H, N, low=-0.5, high=0.5)
            else:
                state[att + "time_decay"] = uniform(H, low=-6.0, high=0.5)
                state[att + "time_first"] = uniform(H, low=-1.0, high=0.5)
            if version != "5":
                state[att + "gate.weight"] = matrix(C, C)
            state[att + "ln_x.weight"] = normal(C, std=0.1, mean=1.0)
            state[att + "ln_x.bias"] = normal(C, std=0.1)
            for name in ("k", "r"):
                state[ffn + f"time_mix_{name}"] = mix()
            state[ffn + "receptance.weight"] = matrix(C, C)
        elif version == "6":
            N = C // H
            for name in ("x", "w", "k", "v", "r", "g"):
                state[att + f"time_maa_{name}"] = mix()
            state[att + "time_maa_w1"] = normal(C, 5 * 32, std=0.1)
            state[att + "time_maa_w2"] = normal(5, 32, C, std=0.1)
            state[att + "time_decay"] = uniform(1, 1, C, low=-6.0, high=0.5)
            state[att + "time_decay_w1"] = normal(C, 64, std=0.1)
            state[att + "time_decay_w2"] = normal(64, C, std=0.1)
            state[att + "time_faaaa"] = uniform(H, N, low=-0.5, high=0.5)
            state[att + "gate.weight"] = matrix(C, C)
            state[att + "ln_x.weight"] = normal(C, std=0.1, mean=1.0)
            state[att + "ln_x.bias"] = normal(C, std=0.1)
            for name in ("k", "r"):
                state[ffn + f"time_maa_{name}"] = mix()
            state[ffn + "receptance.weight"] = matrix(C, C)
        else:
            N = C // H
            for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
                state[att + name] = mix()
            state[att + "w0"] = uniform(1, 1, C, low=-3.0, high=1.0)
            state[att + "w1"] = normal(C, 64, std=0.1)
            state[att + "w2"] = normal(64, C, std=0.1)
            state[att + "a0"] = normal(1, 1, C, std=0.5)
            state[att + "a1"] = normal(C, 64, std=0.1)
            state[att + "a2"] = normal(64, C, std=0.1)
            if index > 0:
                state[att + "v0"] = normal(1, 1, C, std=0.5, mean=0.5)
                state[att + "v1"] = normal(C, 32, std=0.1)
                state[att + "v2"] = normal(32, C, std=0.1)
            state[att + "g1"] = normal(C, 128, std=0.1)
            state[att + "g2"] = normal(128, C, std=0.1)
            state[att + "k_k"] = uniform(1, 1, C, low=0.5, high=1.5)
            state[att + "k_a"] = uniform(1, 1, C, low=0.5, high=1.5)
            state[att + "r_k"] = normal(H, N, std=0.2)
            state[att + "ln_x.weight"] = normal(C, std=0.1, mean=1.0)
            state[att + "ln_x.bias"] = normal(C, std=0.1)
            state[ffn + "x_k"] = mix()
    state["ln_out.weight"] = normal(C, std=0.1, mean=1.0)
    state["ln_out.bias"] = normal(C, std=0.1)
    state["head.weight"] = matrix(V, C)
    path = Path(path)
    torch.save(state, path)
    return path


def run_rwkv_package(path: Path, version: str, prompt: list[int], decode_steps: int, out: Path) -> dict:
    """Prompt logits (T, V) and greedy decode (tokens, logits) from the `rwkv` package, in a subprocess."""
    environment = dict(os.environ, RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
    if version == "7":
        environment["RWKV_V7_ON"] = "1"  # read at import; then only v7 loads in that process
    arguments = [sys.executable, str(RUNNER), str(path), json.dumps(prompt), str(decode_steps), str(out)]
    subprocess.run(arguments, env=environment, check=True, timeout=900, capture_output=True)
    data = np.load(out)
    return {name: data[name] for name in data.files}
