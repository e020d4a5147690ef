"""`ember info`: what a model file is, without loading it into a model (unless --load)."""

from __future__ import annotations

import argparse
import math
import resource

from ember.loader import read_checkpoint, resolve_model_path
from ember.quant.describe import kernel_table


def add_parser(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("info", help="describe a model file or folder")
    parser.add_argument("path", nargs="?", default="smollm2", help="HF folder, .gguf file or built-in name")
    parser.add_argument(
        "--load", action="store_true", help="also build the model: its memory and each tensor's kernel"
    )
    parser.add_argument("--quant", default=None, help="weight form for --load (none, int8, int4)")
    parser.set_defaults(run=run)


def describe(path: str) -> list[tuple[str, str]]:
    checkpoint = read_checkpoint(resolve_model_path(path))
    config = checkpoint.config
    num_parameters = sum(math.prod(tensor.shape) for tensor in checkpoint.tensors.values())
    rows = [
        ("path", str(checkpoint.path)),
        ("format", checkpoint.format),
        ("architecture", config.architecture),
        ("parameters", f"{num_parameters:,} ({num_parameters / 1e6:.1f} M)"),
        ("layers", str(config.num_layers)),
        ("hidden size", str(config.hidden_size)),
        ("heads / kv heads", f"{config.num_heads} / {config.num_kv_heads} (head_dim {config.head_dim})"),
        ("context length", str(config.context_length)),
        ("vocab size", str(config.vocab_size)),
        ("tied embeddings", "yes" if config.tie_word_embeddings else "no"),
        ("chat template", "yes" if checkpoint.tokenizer.chat_template else "no"),
    ]
    if config.sliding_window:
        rows.append(("sliding window", str(config.sliding_window)))
    if config.rope_scaling:
        rows.append(("rope scaling", str(config.rope_scaling)))
    details = checkpoint.details
    if "dtypes" in details:
        rows.append(("dtype", _shares(details["dtypes"])))
    if "quant_types" in details:
        rows.append(("tensor types", _shares(details["quant_types"])))
    for key in ("gguf_version", "file_size", "name", "default_quant"):
        if key in details:
            rows.append((key.replace("_", " "), str(details[key])))
    return rows


def _shares(shares: dict[str, float]) -> str:
    ordered = sorted(shares.items(), key=lambda item: -item[1])
    return ", ".join(f"{name} {share:.1%}" for name, share in ordered)


def run(args: argparse.Namespace) -> int:
    rows = describe(args.path)
    if args.load:
        import ember

        handle = ember.load(args.path, quant=args.quant)
        rows += [
            ("loaded as", f"{handle.info.quant} weights, {str(handle.info.dtype).removeprefix('torch.')}"),
            ("weight memory", f"{handle.info.weight_bytes / 2**20:.1f} MiB"),
            ("load time", f"{handle.info.load_seconds:.2f} s"),
            ("peak resident memory", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"),
        ]
        rows.append(("decode kernels", "(per tensor; * is every layer)"))
        rows += [(f"  {pattern}", kernel) for pattern, kernel in kernel_table(handle.model.named_linears())]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0
