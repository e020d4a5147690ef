"""Command-line options shared by several subcommands: model loading and sampling."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ember.errors import EmberError, InvalidRequestError
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
    group.add_argument(
        "--tokenizer",
        default=None,
        help="RWKV files: world, 20b, bytes or a tokenizer file (default: told from the vocabulary size)",
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
    """Sampling flags default to None ("not given"), so a flag typed with the default's value still
    counts: `ember chat --session ID --temperature 0.8` sets a session back to 0.8."""
    defaults = SamplingParams()
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", "-n", type=int, help=f"default {defaults.max_tokens}")
    group.add_argument("--temperature", "-t", type=float, help=f"0 = greedy (default {defaults.temperature})")
    group.add_argument("--top-k", type=int, help=f"0 disables (default {defaults.top_k})")
    group.add_argument("--top-p", type=float, help=f"1 disables (default {defaults.top_p})")
    group.add_argument("--min-p", type=float, help=f"0 disables (default {defaults.min_p})")
    group.add_argument("--repetition-penalty", type=float, help=f"default {defaults.repetition_penalty}")
    group.add_argument("--presence-penalty", type=float, help=f"default {defaults.presence_penalty}")
    group.add_argument("--frequency-penalty", type=float, help=f"default {defaults.frequency_penalty}")
    group.add_argument("--penalty-decay", type=float, help=f"default {defaults.penalty_decay}")
    group.add_argument(
        "--penalty-exempt-punctuation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="leave whitespace, punctuation and digit tokens out of the penalties (ChatRWKV's habit)",
    )
    group.add_argument(
        "--ban-token",
        type=int,
        action="append",
        metavar="ID",
        help="a token id never to generate (repeatable; --ban-token -1 clears a session's)",
    )
    group.add_argument("--seed", type=int, help="same seed, same text (default: random)")
    group.add_argument(
        "--stop", action="append", help="stop string (repeatable; --stop '' clears a session's)"
    )
    group.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep generating past end-of-sequence (--no-ignore-eos turns it off)",
    )


SAMPLING_FLAGS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "penalty_decay",
    "penalty_exempt_punctuation",
    "max_tokens",
    "seed",
    "ignore_eos",
)


def explicit_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings given on the command line (whatever their value), by field name."""
    changes = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    if args.stop is not None:
        changes["stop"] = [text for text in args.stop if text]  # '' clears
    if getattr(args, "ban_token", None) is not None:
        changes["banned_token_ids"] = [token_id for token_id in args.ban_token if token_id != -1]  # -1 clears
    return changes


def sampling_params_from_args(args: argparse.Namespace, base: SamplingParams | None = None) -> SamplingParams:
    """`base` (the defaults when None) with the flags that were given; a bad value names its flag."""
    changes = explicit_sampling(args)
    try:
        return (base or SamplingParams()).replace(**changes)
    except InvalidRequestError as error:
        raise InvalidRequestError(f"{_as_flags(str(error))}") from None


def _as_flags(message: str) -> str:
    """'top_k must be ...' -> '--top-k must be ...': errors about flags name the flag the user typed."""
    name = message.split(" ", 1)[0]
    if name == "banned_token_ids":
        return "--ban-token" + message[len(name) :]
    if name in SAMPLING_FLAGS or name == "stop":
        return "--" + name.replace("_", "-") + message[len(name) :]
    return message


def describe_changes(before: SamplingParams, after: SamplingParams) -> str:
    """'temperature 0.5 -> 0.8, ignore_eos True -> False' for the settings that differ."""
    old, new = before.to_dict(), after.to_dict()
    return ", ".join(f"{name} {old[name]} -> {new[name]}" for name in new if new[name] != old[name])


def load_model_from_args(args: argparse.Namespace) -> Any:
    """Load the model the flags name, with a progress bar (on a terminal) when loading takes a moment."""
    import torch

    import ember
    from ember.cli.progress import load_progress

    if args.threads is not None and args.threads < 1:
        raise EmberError(f"--threads must be at least 1, got {args.threads}")
    if args.cache_memory is not None and args.cache_memory <= 0:
        raise EmberError(f"--cache-memory must be at least 1 MiB, got {args.cache_memory}")
    if args.context_length is not None and args.context_length < 2:
        raise EmberError(f"--context-length must be at least 2 tokens, got {args.context_length}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    update, close = load_progress()
    try:
        handle = ember.load(
            args.model,
            dtype=args.dtype,
            device=args.device,
            cuda_graphs=args.cuda_graphs,
            quant=args.quant,
            context_length=args.context_length,
            cache_memory_mib=args.cache_memory,
            on_layer_built=update,
            tokenizer=args.tokenizer,
        )
    finally:
        close()
    model_limit = handle.checkpoint.config.context_length
    if args.context_length is not None and args.context_length > model_limit:
        notice(
            f"note: --context-length {args.context_length} is more than {handle.info.path.name} "
            f"supports; using its {model_limit}"
        )
    return handle


def notice(text: str) -> None:
    """A one-line remark about the run, on stderr (stdout carries only the generated text)."""
    print(text, file=sys.stderr, flush=True)
