"""The canonical RWKV tensor layout both RWKV readers produce, and the config it implies.

The canonical layout is rwkv.cpp's (see FORMATS.md): BlinkDL names, PyTorch
shapes, `*.time_*` tensors squeezed, decays already in the form the recurrence
multiplies by (v4: -exp(w); v5: exp(-exp(w)) as (H, 1, 1) or (H, S, 1)), the
v5.2/v6 bonus and v6 decay as (H, S, 1), v6/v7 low-rank matrices as
(out, in) linear weights, and v7's six token-shift mixes stacked in
`att.x_rwkvag` (6, 1, C). The `.pth` reader converts into it; the `.bin`
reader finds it in the file. The model reads nothing else.
"""

from __future__ import annotations

from typing import Any

from ember.errors import ModelLoadError
from ember.models.rwkv_config import RWKVConfig

V7_MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")


def detect_version(tensors: dict[str, Any]) -> str:
    """The RWKV version from canonical tensor names and shapes (as the rwkv package tells it)."""
    names = tensors.keys()
    if "blocks.0.att.r_k" in names or "blocks.0.att.x_rwkvag" in names:
        return "7"
    if "blocks.0.att.time_maa_x" in names:
        return "6"
    if "blocks.0.att.ln_x.weight" in names:
        decay = tensors.get("blocks.0.att.time_decay")
        if decay is not None and len(decay.shape) >= 2 and decay.shape[1] > 1:
            return "5.2"
        return "5.1" if "blocks.0.att.gate.weight" in names else "5"
    if "blocks.0.att.time_decay" in names and "blocks.0.att.time_first" in names:
        return "4"
    raise ModelLoadError("the tensors are not an RWKV model of a known version (4 to 7)")


def config_from_tensors(tensors: dict[str, Any], group_norm_eps_v5: float = 64e-5) -> RWKVConfig:
    """Version, sizes and head count, from the canonical tensors; a missing tensor is a one-line error."""
    for name in ("emb.weight", "head.weight", "blocks.0.ffn.key.weight", "ln_out.weight"):
        if name not in tensors:
            raise ModelLoadError(f"the RWKV checkpoint lacks tensor {name}")
    version = detect_version(tensors)
    vocab_size, hidden_size = (int(size) for size in tensors["emb.weight"].shape)
    layers = {int(name.split(".")[1]) for name in tensors if name.startswith("blocks.")}
    num_layers = max(layers) + 1
    if layers != set(range(num_layers)):
        raise ModelLoadError(f"the RWKV checkpoint's blocks are not numbered 0..{num_layers - 1}")
    if version == "4":
        num_heads = 1
    elif version == "7":
        num_heads = int(tensors["blocks.0.att.r_k"].shape[0])
    else:
        key = "blocks.0.att.time_faaaa" if version in ("5.2", "6") else "blocks.0.att.time_decay"
        num_heads = int(tensors[key].shape[0])
    return RWKVConfig(
        version=version,
        hidden_size=hidden_size,
        num_layers=num_layers,
        vocab_size=vocab_size,
        intermediate_size=int(tensors["blocks.0.ffn.key.weight"].shape[0]),
        num_heads=num_heads,
        group_norm_eps=group_norm_eps_v5 if version.startswith("5") else 64e-5,
    )


def expected_tensors(config: RWKVConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor the model needs, with its shape (low-rank widths as -1: any)."""
    C, H, S, F, V = (
        config.hidden_size,
        config.num_heads,
        config.head_size,
        config.intermediate_size,
        config.vocab_size,
    )
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "head.weight": (V, C),
    }
    version = config.version
    for index in range(config.num_layers):
        block = f"blocks.{index}."
        att, ffn = block + "att.", block + "ffn."
        layer = {
            block + "ln1.weight": (C,),
            block + "ln1.bias": (C,),
            block + "ln2.weight": (C,),
            block + "ln2.bias": (C,),
            att + "receptance.weight": (C, C),
            att + "key.weight": (C, C),
            att + "value.weight": (C, C),
            att + "output.weight": (C, C),
            ffn + "key.weight": (F, C),
            ffn + "value.weight": (C, F),
        }
        if version != "7":
            layer[ffn + "receptance.weight"] = (C, C)
        if version in ("4", "5", "5.1", "5.2"):
            mixes = ("k", "v", "r", "g") if version in ("5.1", "5.2") else ("k", "v", "r")
            layer.update({att + f"time_mix_{m}": (C,) for m in mixes})
            layer.update({ffn + "time_mix_k": (C,), ffn + "time_mix_r": (C,)})
        if version == "4":
            layer.update({att + "time_decay": (C,), att + "time_first": (C,)})
        if version in ("5", "5.1"):
            layer.update({att + "time_decay": (H, 1, 1), att + "time_first": (H, 1, 1)})
        if version in ("5.2", "6"):
            layer.update({att + "time_decay": (H, S, 1), att + "time_faaaa": (H, S, 1)})
        if version != "4":
            layer.update({att + "ln_x.weight": (C,), att + "ln_x.bias": (C,)})
        if version in ("5.1", "5.2", "6"):
            layer[att + "gate.weight"] = (C, C)
        if version == "6":
            layer.update({att + f"time_maa_{m}": (C,) for m in ("x", "w", "k", "v", "r", "g")})
            layer.update(
                {
                    att + "time_maa_w1": (-1, C),
                    att + "time_maa_w2": (5, C, -1),
                    att + "time_decay_w1": (-1, C),
                    att + "time_decay_w2": (C, -1),
                    ffn + "time_maa_k": (C,),
                    ffn + "time_maa_r": (C,),
                }
            )
        if version == "7":
            layer.update(
                {
                    att + "x_rwkvag": (6, 1, C),
                    att + "w0": (1, 1, C),
                    att + "a0": (1, 1, C),
                    att + "k_k": (1, 1, C),
                    att + "k_a": (1, 1, C),
                    att + "r_k": (H, S),
                    ffn + "x_k": (1, 1, C),
                }
            )
            low_rank = ["w", "a", "g"] + (["v"] if index > 0 else [])
            for name in low_rank:
                layer.update({att + f"{name}1": (-1, C), att + f"{name}2": (C, -1)})
            if index > 0:
                layer[att + "v0"] = (1, 1, C)
        shapes.update(layer)
    return shapes


def check_tensors(config: RWKVConfig, tensors: dict[str, Any]) -> None:
    """Fail at load, naming the tensor, when one is missing or has the wrong shape."""
    for name, shape in expected_tensors(config).items():
        if name not in tensors:
            raise ModelLoadError(f"the RWKV v{config.version} checkpoint lacks tensor {name}")
        actual = tuple(int(size) for size in tensors[name].shape)
        if len(actual) != len(shape) or any(w not in (-1, a) for w, a in zip(shape, actual)):
            raise ModelLoadError(f"tensor {name} has shape {actual}, expected {shape} (-1: any)")
