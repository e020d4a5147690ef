"""BlinkDL / ChatRWKV `.pth` checkpoints as a `Checkpoint` in ember's canonical RWKV layout.

A `.pth` is a plain state dict of the trained parameters. Its version, sizes
and head count follow from tensor names and shapes (`rwkv_layout.py`); this
reader applies the same one-time transforms rwkv.cpp's converter does (decays
into the factors the recurrence multiplies by, low-rank matrices into (out,
in) linear weights, v7's six mix vectors stacked), so the model sees one
layout whatever the file. The file is memory-mapped; matrices stay views.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ember.errors import ModelLoadError
from ember.formats.checkpoint import Checkpoint
from ember.formats.rwkv_layout import V7_MIXES, check_tensors, config_from_tensors

V7_LOW_RANK = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch raises many kinds for a foreign or truncated file
        raise ModelLoadError(
            f"{path} is not a readable PyTorch checkpoint: {str(error).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ModelLoadError(f"{path} does not hold a state dict of tensors")
    return state


def to_canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BlinkDL parameter names and values -> the canonical layout (rwkv.cpp's)."""
    names = state.keys()
    is_v7 = "blocks.0.att.r_k" in names
    is_v6 = "blocks.0.att.time_maa_x" in names
    is_v5 = "blocks.0.att.ln_x.weight" in names and not is_v6 and not is_v7
    heads = None
    if is_v6 or (is_v5 and "blocks.0.att.time_faaaa" in names):
        heads = state["blocks.0.att.time_faaaa"].shape[0]
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".time_" in name:
            tensor = tensor.squeeze()
        if is_v7 and ".att." in name and name.rsplit(".", 1)[-1] in V7_MIXES:
            continue  # stacked below
        if name.endswith("att.time_decay"):
            tensor = tensor.float()
            if not (is_v5 or is_v6):
                tensor = -torch.exp(tensor)  # v4: log of the per-step decay
            elif is_v5:
                tensor = torch.exp(-torch.exp(tensor))
                tensor = tensor.reshape(-1, 1, 1) if tensor.dim() == 1 else tensor.reshape(*tensor.shape, 1)
            else:
                tensor = tensor.reshape(heads, -1, 1)
        elif name.endswith("att.time_first") and is_v5:
            tensor = torch.exp(tensor.float()).reshape(-1, 1, 1)
        elif name.endswith("att.time_faaaa"):
            tensor = tensor.float().reshape(heads, -1, 1)
        elif name.endswith(("att.time_maa_w1", "att.time_decay_w1", "att.time_decay_w2")):
            tensor = tensor.t()
        elif name.endswith("att.time_maa_w2"):
            tensor = tensor.transpose(1, 2)  # (5, D, C) -> (5, C, D)
        elif is_v7 and name.rsplit(".", 1)[-1] in V7_LOW_RANK:
            tensor = tensor.t()
        tensors[name] = tensor
    if is_v7:
        for layer in sorted({int(name.split(".")[1]) for name in names if name.startswith("blocks.")}):
            prefix = f"blocks.{layer}.att."
            missing = [mix for mix in V7_MIXES if prefix + mix not in state]
            if missing:
                raise ModelLoadError(f"the RWKV v7 checkpoint lacks tensor {prefix}{missing[0]}")
            tensors[prefix + "x_rwkvag"] = torch.stack(
                [state[prefix + mix].reshape(1, -1) for mix in V7_MIXES]
            )
    return tensors


def read_rwkv_pth(path: Path, tokenizer: str | None = None) -> Checkpoint:
    """A BlinkDL `.pth` as a Checkpoint (v5 group norms at ChatRWKV's epsilon, 64e-5); `tokenizer`
    (a kind or a file, see `parse_tokenizer_spec`) overrides the one told from the vocabulary size."""
    from ember.rwkv_tokenizer import load_rwkv_tokenizer, parse_tokenizer_spec

    tokenizer_kind, tokenizer_path = parse_tokenizer_spec(tokenizer)

    path = Path(path)
    tensors: dict[str, Any] = to_canonical(load_state_dict(path))
    config = config_from_tensors(tensors, group_norm_eps_v5=64e-5)
    check_tensors(config, tensors)
    dtypes: dict[str, int] = {}
    for tensor in tensors.values():
        key = str(tensor.dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + tensor.numel()
    total = sum(dtypes.values())
    config.torch_dtype = max(dtypes, key=dtypes.get)
    loaded_tokenizer = load_rwkv_tokenizer(
        config.vocab_size, model_path=path, kind=tokenizer_kind, tokenizer_path=tokenizer_path
    )
    details = {
        "rwkv_version": config.version,
        "file_size": path.stat().st_size,
        "dtypes": {name: count / total for name, count in dtypes.items()},
        "tokenizer": loaded_tokenizer.kind,
    }
    return Checkpoint(config, tensors, loaded_tokenizer, path, "pth", details)
