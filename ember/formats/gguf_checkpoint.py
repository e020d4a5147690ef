"""A GGUF file as a `Checkpoint`: weights and config from `gguf.py`, tokenizer from its metadata."""

from __future__ import annotations

from pathlib import Path

from ember.chat_template import GEMMA_TEMPLATE
from ember.config import ROPE_FREQ_FACTORS
from ember.formats.checkpoint import Checkpoint
from ember.formats.gguf import read_gguf
from ember.formats.gguf_tokenizer import tokenizer_from_gguf_metadata

# The low-bit form that keeps a GGUF file's precision class: 4/5/6-bit blocks run as int4,
# 8-bit as int8, float files as float.
_QUANT_FOR_TYPE = {
    "Q4_0": "int4", "Q4_1": "int4", "Q5_0": "int4", "Q5_1": "int4",
    "Q4_K": "int4", "Q5_K": "int4", "Q6_K": "int8", "Q8_0": "int8",
    "F16": "none", "BF16": "none", "F32": "none",
}  # fmt: skip


def read_gguf_checkpoint(path: Path) -> Checkpoint:
    gguf_checkpoint = read_gguf(path)
    tokenizer = tokenizer_from_gguf_metadata(gguf_checkpoint.metadata)
    config = gguf_checkpoint.config
    if config.architecture == "gemma3" and not tokenizer.chat_template:
        tokenizer.chat_template = GEMMA_TEMPLATE  # llama.cpp's Gemma 3 conversions often leave it out
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    for eos in tokenizer.eos_token_ids:
        if eos not in config.eos_token_ids:
            config.eos_token_ids.append(eos)
    tensors = dict(gguf_checkpoint.tensors)
    if gguf_checkpoint.rope_freq_factors is not None:
        tensors[ROPE_FREQ_FACTORS] = gguf_checkpoint.rope_freq_factors
    summary = gguf_checkpoint.summary()
    # The type of the bulk of the weights decides the default execution form.
    dominant_type = max(
        (share for share in summary.tensor_types.items() if share[0] != "F32"),
        key=lambda item: item[1].num_bytes,
        default=("F32", None),
    )[0]
    return Checkpoint(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        path=Path(path),
        format="gguf",
        details={
            "name": summary.name,
            "gguf_version": summary.gguf_version,
            "file_size": f"{summary.file_size / 2**20:.1f} MiB",
            "quant_types": {name: share.byte_share for name, share in summary.tensor_types.items()},
            "default_quant": _QUANT_FOR_TYPE.get(dominant_type, "int8"),
        },
    )
