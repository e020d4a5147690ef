"""`ember pull`, `ember list`, `ember rm`: get models from the Hugging Face Hub, see them, remove them.

Only `pull` imports `ember.hub` (and with it huggingface_hub); `list` and `rm` read the local store.
"""

from __future__ import annotations

import argparse
import json
import sys

from ember.errors import EmberError


def add_parser(subcommands: argparse._SubParsersAction) -> None:
    pull = subcommands.add_parser(
        "pull",
        help="download a model from the Hugging Face Hub",
        description="Download a GGUF file (owner/repo:QUANT, or --file PATTERN) or a safetensors folder "
        "(owner/repo) from the Hugging Face Hub into ember's model store; an interrupted download resumes. "
        "HF_TOKEN (or `hf auth login`) gives access to private and gated repositories; HF_ENDPOINT picks "
        "a mirror.",
    )
    pull.add_argument(
        "model", metavar="REPO[:QUANT]", help="e.g. bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M"
    )
    pull.add_argument(
        "--file", dest="file_pattern", default=None, metavar="PATTERN", help="glob of the file(s) to fetch"
    )
    pull.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    pull.set_defaults(run=run_pull)

    listing = subcommands.add_parser("list", help="show local models (pulled and built-in)")
    listing.add_argument("--json", action="store_true", help="one JSON object per model, one per line")
    listing.set_defaults(run=run_list)

    remove = subcommands.add_parser("rm", help="remove a pulled model")
    remove.add_argument("model", metavar="NAME", help="a name from `ember list`")
    remove.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    remove.set_defaults(run=run_remove)


def run_pull(args: argparse.Namespace) -> int:
    from ember.hub import pull

    try:
        model = pull(args.model, file_pattern=args.file_pattern, revision=args.revision)
    except KeyboardInterrupt:
        print("\ninterrupted: the bytes so far are kept; run the same pull to resume", file=sys.stderr)
        return 130
    summary = model.summary
    if summary is None:
        from ember.model_summary import summarize_model

        summary = summarize_model(model.path)
    print(
        f"pulled {model.name}: {summary.architecture}, {_parameters(summary.num_parameters)} parameters, "
        f"{summary.format} {summary.quantization}, {_size(summary.size_bytes)} in {model.directory}"
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    from ember.model_store import list_models

    models = list_models()
    if args.json:
        for model in models:
            print(json.dumps(model.to_dict()))
        return 0
    header = ("NAME", "ARCHITECTURE", "PARAMETERS", "FORMAT", "QUANTIZATION", "SIZE", "WHERE")
    rows = [header]
    for model in models:
        summary = model.summary
        where = str(model.path) + (" (built-in)" if model.builtin else "")
        if summary is None:
            rows.append((model.name, "?", "?", "?", "?", "?", f"{where}: {model.error}"))
            continue
        rows.append(
            (
                model.name,
                summary.architecture,
                _parameters(summary.num_parameters),
                summary.format,
                summary.quantization,
                _size(summary.size_bytes),
                where,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    if len(models) == 0:
        print("no local models; get one with: ember pull owner/repo[:QUANT]", file=sys.stderr)
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from ember.model_store import removable_model, remove_model, store_size

    model = removable_model(args.model)  # errors before asking anything
    if not args.yes:
        try:
            answer = input(f"remove {model.name} ({_size(store_size(model))}, {model.directory})? [y/N] ")
        except EOFError:
            raise EmberError(
                f"not removing {model.name} without confirmation: answer y, or pass --yes"
            ) from None
        if answer.strip().lower() not in ("y", "yes"):
            print("kept", file=sys.stderr)
            return 1
    removed = remove_model(args.model)
    print(f"removed {removed.name}")
    return 0


def _parameters(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.1f}B"
    if count >= 1e6:
        return f"{count / 1e6:.1f}M"
    return f"{count / 1e3:.0f}K"


def _size(num_bytes: int) -> str:
    if num_bytes >= 1 << 30:
        return f"{num_bytes / (1 << 30):.2f} GiB"
    if num_bytes >= 1 << 20:
        return f"{num_bytes / (1 << 20):.1f} MiB"
    return f"{num_bytes / 1024:.0f} KiB"
