"""Command-line options shared by several subcommands: model loading and sampling."""

from __future__ import annotations

import argparse
from typing import Any

from ember.loader import DEFAULT_MODEL, DTYPES, QUANT_MODES
from ember.sampling import SamplingParams


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        help=f"HF folder, .gguf file or built-in name (default: {DEFAULT_MODEL})",
    )
    group.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="activation/weight dtype (auto: float32 on CPU, bfloat16 on CUDA)",
    )
    group.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="where to run (default: cuda when present)"
    )
    group.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="on CUDA, run decode steps op by op instead of replaying captured graphs",
    )
    group.add_argument(
        "--quant",
        choices=list(QUANT_MODES),
        default=None,
        help="weight form: none (exact float), int8, int4; default: float for safetensors, low-bit for GGUF",
    )
    group.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    group.add_argument("--context-length", type=int, default=None, help="cap the context (and cache) size")
    group.add_argument(
        "--cache-memory",
        type=int,
        default=1024,
        metavar="MIB",
        help="memory budget of the KV cache, idle chat sessions included (default 1024 MiB)",
    )


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    defaults = SamplingParams()
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", "-n", type=int, default=defaults.max_tokens)
    group.add_argument("--temperature", "-t", type=float, default=defaults.temperature, help="0 = greedy")
    group.add_argument("--top-k", type=int, default=defaults.top_k, help="0 disables")
    group.add_argument("--top-p", type=float, default=defaults.top_p)
    group.add_argument("--min-p", type=float, default=defaults.min_p)
    group.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    group.add_argument("--presence-penalty", type=float, default=defaults.presence_penalty)
    group.add_argument("--frequency-penalty", type=float, default=defaults.frequency_penalty)
    group.add_argument("--penalty-decay", type=float, default=defaults.penalty_decay)
    group.add_argument("--seed", type=int, default=None, help="same seed, same text")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        penalty_decay=args.penalty_decay,
        max_tokens=args.max_tokens,
        stop=list(args.stop),
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )


def load_model_from_args(args: argparse.Namespace) -> Any:
    """Load the model the flags name, with a progress bar when loading takes more than a moment."""
    import torch

    import ember
    from ember.cli.progress import load_progress

    if args.threads is not None:
        if args.threads < 1:
            from ember.errors import EmberError

            raise EmberError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    update, close = load_progress()
    try:
        return ember.load(
            args.model,
            dtype=args.dtype,
            device=args.device,
            cuda_graphs=args.cuda_graphs,
            quant=args.quant,
            context_length=args.context_length,
            cache_memory_mib=args.cache_memory,
            on_layer_built=update,
        )
    finally:
        close()
