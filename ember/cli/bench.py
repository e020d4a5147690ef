"""`ember bench`: ember's speed and memory, optionally beside llama.cpp and transformers in the same run."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ember.cli.options import add_model_options, load_model_from_args
from ember.errors import EmberError

PEERS_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "peers"
PEER_NAMES = ("llama.cpp", "transformers")


def add_parser(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "bench", help="measure speed and memory (--compare: beside llama.cpp, transformers)"
    )
    add_model_options(parser)
    parser.add_argument("--batches", default="1,4,8,16", help="decode batch sizes (default 1,4,8,16)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--compare", action="store_true", help="also run the peers' benchmark scripts")
    parser.add_argument(
        "--peers",
        default=",".join(PEER_NAMES),
        help="with --compare: which peers, comma-separated (default: llama.cpp,transformers)",
    )
    parser.add_argument(
        "--llama-cpp-bin",
        default=None,
        metavar="DIR",
        help="llama.cpp's bin folder (default: the first ~/.cache/ember-peers/*/bin that runs here)",
    )
    parser.add_argument("--peers-dir", default=str(PEERS_DIR), help="folder with bench-transformers.py")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repetitions (a smoke test)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.prompt_tokens, args.decode_tokens, args.repetitions = 64, 16, 1
    batches = [int(size) for size in args.batches.split(",") if size]
    peers = [name for name in args.peers.split(",") if name]
    unknown = sorted(set(peers) - set(PEER_NAMES))
    if unknown:
        raise EmberError(f"--peers: unknown peer {unknown[0]!r} (choose from {', '.join(PEER_NAMES)})")
    log = (lambda message: None) if args.json else (lambda message: print(message, file=sys.stderr))

    log("measuring cold start (a fresh process, load to first token)...")
    cold = cold_start(args)
    handle = load_model_from_args(args)
    from ember import benchmark

    log(f"measuring prefill of {args.prompt_tokens} tokens...")
    results: dict[str, Any] = {
        "model": str(handle.info.path),
        "format": handle.info.format,
        "quant": handle.info.quant,
        "dtype": str(handle.info.dtype).removeprefix("torch."),
        "architecture": handle.config.architecture,
        "threads": _threads(),
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "quick": args.quick,
        "load_s": round(handle.info.load_seconds, 3),
        "ttft_cold_s": cold["ttft_s"],
        "peak_rss_mib": cold["peak_rss_mib"],
    }
    results["prefill_tok_s"] = round(
        benchmark.prefill_tokens_per_second(handle, args.prompt_tokens, args.repetitions), 1
    )
    by_batch: dict[str, float] = {}
    for batch_size in batches:
        log(f"measuring decode at batch {batch_size}...")
        by_batch[str(batch_size)] = round(
            benchmark.decode_tokens_per_second(handle, batch_size, args.decode_tokens, args.repetitions), 1
        )
    results["decode_tok_s"] = by_batch.get("1")
    results["decode_tok_s_by_batch"] = by_batch
    log("measuring chat time to first token, turns 1 to 10...")
    ttft = benchmark.chat_time_to_first_token(handle)
    results["ttft_turn1_s"] = round(ttft[1], 3)
    results["ttft_turn10_s"] = round(ttft[max(ttft)], 3)

    if args.compare:
        del handle  # free memory before the peers run
        results["peers"] = run_peers(args, peers, batches, log)
        results["ratios"] = ratios(results)
        results["targets"] = target_verdicts(results)
    if args.json:
        print(json.dumps(results))
    else:
        print_table(results)
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def cold_start(args: argparse.Namespace) -> dict[str, float]:
    """A new `ember generate` process: seconds to its first token, and its peak memory at batch 1."""
    command = [
        sys.executable,
        "-m",
        "ember.cli.main",
        "generate",
        "--model",
        args.model,
        "--dtype",
        args.dtype,
    ]
    if args.quant:
        command += ["--quant", args.quant]
    if args.device:
        command += ["--device", args.device]
    if not args.cuda_graphs:
        command += ["--no-cuda-graphs"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    command += [
        "--verbose",
        "--ignore-eos",
        "-n",
        str(args.decode_tokens),
        "-t",
        "0",
        "--chat",
        "Tell me a story.",
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.read(1)
    ttft = time.perf_counter() - started
    _, stderr = process.communicate(timeout=600)
    if process.returncode != 0 or not first:
        raise EmberError(f"the cold-start run failed: {stderr.decode(errors='replace').strip()[-300:]}")
    peak = re.search(r"peak memory (\d+) MiB", stderr.decode(errors="replace"))
    return {"ttft_s": round(ttft, 3), "peak_rss_mib": float(peak.group(1)) if peak else None}


def run_peers(args: argparse.Namespace, names: list[str], batches: list[int], log) -> dict[str, Any]:
    """llama.cpp (a build that runs here) and transformers (when importable), on the same model file, now."""
    from ember.loader import resolve_model_path

    results: dict[str, Any] = {}
    model_path = resolve_model_path(args.model)
    threads = args.threads or _threads()
    if "llama.cpp" in names:
        results["llama.cpp"] = _run_llamacpp(args, model_path, threads, batches, log)
    if "transformers" in names:
        try:
            import transformers  # noqa: F401

            log("running transformers float32 (bench-transformers.py)...")
            script = Path(args.peers_dir) / "bench-transformers.py"
            command = [sys.executable, str(script), str(model_path.parent)]
            if model_path.suffix == ".gguf":
                command += ["--gguf", model_path.name]
            command += ["--threads", str(threads), "--batches", "1,8"]
            results["transformers"] = _json_line(command, {**os.environ, "THREADS": str(threads)})
        except ImportError:
            results["transformers"] = {"skipped": "transformers is not installed"}
    return results


def _run_llamacpp(
    args: argparse.Namespace, model_path: Path, threads: int, batches: list[int], log
) -> dict[str, Any]:
    """llama-bench at ember's prompt and decode sizes, llama-batched-bench at its batches, peak RSS."""
    from ember import peers as llamacpp

    if model_path.suffix != ".gguf":
        return {"skipped": f"llama.cpp needs a .gguf file; {model_path.name} is not one"}
    try:
        llama = llamacpp.find_llama_cpp(model_path, args.llama_cpp_bin, threads)
        for path, why in llama.rejected.items():
            log(f"skipping the llama.cpp in {path}: {why}")
        log(f"running llama.cpp from {llama.bin_dir} (llama-bench, llama-batched-bench)...")
        figures: dict[str, Any] = {"bin": str(llama.bin_dir)}
        figures.update(
            llamacpp.llama_bench(
                llama, model_path, threads, args.prompt_tokens, args.decode_tokens, args.repetitions
            )
        )
        context_prompt = min(128, args.prompt_tokens)
        figures["batched"] = llamacpp.llama_batched_bench(
            llama, model_path, threads, batches, context_prompt, args.decode_tokens
        )
        figures["peak_rss_mib"] = llamacpp.llama_cli_peak_rss(llama, model_path, threads, args.decode_tokens)
        return figures
    except llamacpp.PeerError as error:
        return {"error": str(error)}


def _json_line(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"error": (result.stderr.strip() or result.stdout.strip())[-300:]}
    return json.loads(lines[-1])


# The performance goals, as (ratio name, bound, "at least" or "at most", the execution they are set for):
# SmolLM2's default quantized execution against llama.cpp and transformers, float32 against transformers.
TARGETS = (
    ("decode_b1_vs_llamacpp_tg128", 1.25, "at least", "quantized"),
    ("prefill_vs_llamacpp_pp512", 2.5, "at least", "quantized"),
    ("prefill_vs_transformers", 1.1, "at least", "quantized"),
    ("decode_b8_vs_llamacpp_batched8", 2.0, "at least", "quantized"),
    ("peak_rss_vs_llamacpp", 2.5, "at most", "quantized"),
    ("decode_b1_vs_transformers", 3.0, "at least", "float32"),
)
# Issue 16's goals for Gemma 3 270M Q4_K_M, against llama-bench on the same file.
TARGETS_BY_ARCHITECTURE = {
    "gemma3": (
        ("decode_b1_vs_llamacpp_tg128", 1.25, "at least", "quantized"),
        ("prefill_vs_llamacpp_pp512", 2.0, "at least", "quantized"),
    ),
}


def target_verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For each target that applies to this run's execution: its bound and whether the ratio meets it."""
    execution = "float32" if results["quant"] == "none" and results["dtype"] == "float32" else "quantized"
    verdicts = {}
    targets = TARGETS_BY_ARCHITECTURE.get(results.get("architecture"), TARGETS)
    for name, bound, direction, applies_to in targets:
        value = results.get("ratios", {}).get(name)
        if applies_to != execution or value is None:
            continue
        met = value >= bound if direction == "at least" else value <= bound
        verdicts[name] = {"target": f"{direction} {bound}x", "met": met}
    return verdicts


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """ember / peer for each figure the targets name (higher is better, except memory)."""
    llama = results["peers"].get("llama.cpp", {})
    hf = results["peers"].get("transformers", {})

    def ratio(ours: float | None, theirs: float | None) -> float | None:
        return round(ours / theirs, 2) if ours and theirs else None

    by_batch = results["decode_tok_s_by_batch"]
    # llama-bench ran at ember's sizes (pp64/tg16 under --quick); the names keep the full run's sizes.
    prompt, decode = results.get("prompt_tokens", 512), results.get("decode_tokens", 128)
    return {
        "decode_b1_vs_llamacpp_tg128": ratio(results["decode_tok_s"], llama.get(f"tg{decode}")),
        "prefill_vs_llamacpp_pp512": ratio(results["prefill_tok_s"], llama.get(f"pp{prompt}")),
        "prefill_vs_transformers": ratio(results["prefill_tok_s"], hf.get("prefill512")),
        "decode_b8_vs_llamacpp_batched8": ratio(by_batch.get("8"), (llama.get("batched") or {}).get("8")),
        "peak_rss_vs_llamacpp": ratio(results["peak_rss_mib"], llama.get("peak_rss_mib")),
        "decode_b1_vs_transformers": ratio(results["decode_tok_s"], (hf.get("decode") or {}).get("1")),
    }


def print_table(results: dict[str, Any]) -> None:
    rows = [
        (
            "model",
            f"{Path(results['model']).name} ({results['format']}, {results['quant']}, {results['dtype']})",
        ),
        ("threads", results["threads"]),
        ("load", f"{results['load_s']:.2f} s"),
        ("time to first token, cold process", f"{results['ttft_cold_s']:.2f} s"),
        ("prefill", f"{results['prefill_tok_s']:.1f} tok/s"),
    ]
    rows += [
        (f"decode, {size} sequence(s)", f"{value:.1f} tok/s")
        for size, value in results["decode_tok_s_by_batch"].items()
    ]
    rows += [
        ("chat time to first token, turn 1", f"{results['ttft_turn1_s'] * 1000:.0f} ms"),
        ("chat time to first token, turn 10", f"{results['ttft_turn10_s'] * 1000:.0f} ms"),
        ("peak resident memory (batch 1)", f"{results['peak_rss_mib']} MiB"),
    ]
    for name, figures in results.get("peers", {}).items():
        rows.append((f"peer: {name}", json.dumps(figures)))
    verdicts = results.get("targets", {})
    for name, value in results.get("ratios", {}).items():
        shown = "n/a" if value is None else f"{value:.2f}x"
        if name in verdicts:
            verdict = verdicts[name]
            shown += f"  (target {verdict['target']}: {'met' if verdict['met'] else 'NOT met'})"
        rows.append((f"ratio {name}", shown))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
