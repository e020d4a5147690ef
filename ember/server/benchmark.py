"""`python -m ember.server.benchmark`: ember serve beside llama.cpp's llama-server, same requests, one run.

Starts each server in turn on 127.0.0.1 (same GGUF, 2 threads; llama-server
with 16 parallel slots and a context of 4,096 tokens per slot), sends both the
same requests over HTTP and prints each figure with ember / llama-server
ratios and the issue's targets:

    single-stream decode >= 1.5x, prefill of 512 tokens >= 2.5x,
    aggregate decode at 8 and 16 streams >= 2.5x,
    p99 token gap of 4 streams while a 3,000-token prompt is read <= 5x their median gap (each server),
    time to first token of turn 10 of a chat <= 1.5x that of turn 1 (each server).

llama-server is the first `~/.cache/ember-peers/*/bin` build whose llama-bench
computes on this CPU (`--llama-cpp-bin DIR` to choose one; see ember/peers.py).
`--quick` is a smoke run of both sides at small sizes (well under a minute):
its figures are not measurements. Run the full benchmark with nothing else busy.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError
from ember.server import benchmark_measures as measures
from ember.server.benchmark_process import ServerProcess, free_port, stop_on_sigterm

TARGETS = {  # figure: the least ember / llama-server ratio
    "decode_1": 1.5,
    "prefill_512": 2.5,
    "decode_8": 2.5,
    "decode_16": 2.5,
}
OWN_BOUNDS = {  # figure: the most each server's own ratio may be
    "long_prefill_gap_ratio": 5.0,
    "chat_ttft_ratio": 1.5,
}
SLOTS = 16
SLOT_CONTEXT = 4096  # per llama-server slot: a 3,000-token prompt plus its streams' replies


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is; the full run's are the issue's."""

    decode_tokens: int = 128
    repeats: int = 3
    prefill_tokens: int = 512
    streams: tuple[int, ...] = (8, 16)
    gap_streams: int = 4
    long_prompt_tokens: int = 3000
    gap_stream_limit: int = 2048  # each stream's max_tokens; hung up on when the long prompt is read
    chat_turns: int = 10
    chat_reply_tokens: int = 48

    @classmethod
    def quick(cls) -> Sizes:
        return cls(16, 1, 128, (4,), 2, 256, 512, 3, 16)


def ember_command(model: str, port: int, threads: int, data_dir: str) -> list[str]:
    return [
        sys.executable, "-m", "ember.cli.main", "serve", "--model", model, "--port", str(port),
        "--threads", str(threads), "--max-batch", str(SLOTS), "--data-dir", data_dir,
    ]  # fmt: skip


def llama_command(binary: Path, gguf: Path, port: int, threads: int) -> list[str]:
    return [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
        "-tb", str(threads), "-np", str(SLOTS), "-c", str(SLOTS * SLOT_CONTEXT), "--no-webui",
    ]  # fmt: skip


def run_measurements(server: ServerProcess, sizes: Sizes, say: Callable[[str], None]) -> dict[str, float]:
    """Every figure, in order, against one running server (checked alive between measurements)."""
    base_url = server.base_url
    rng = random.Random(1234)  # the same prompts for both servers
    results: dict[str, float] = {}

    def step(label: str) -> None:
        server.check_alive()
        say(f"  {label}")

    step("warm-up")
    measures.stream_completion(base_url, measures.decode_body(measures.random_prompt(16, rng), 8))
    step("single-stream decode")
    results["decode_1"] = measures.single_stream_decode(base_url, sizes.decode_tokens, sizes.repeats, rng)
    step(f"prefill {sizes.prefill_tokens}")
    results["prefill_512"] = measures.prefill_rate(base_url, sizes.prefill_tokens, sizes.repeats, rng)
    for streams in sizes.streams:
        step(f"aggregate decode, {streams} streams")
        results[f"decode_{streams}"] = measures.aggregate_decode(base_url, streams, sizes.decode_tokens, rng)
    step(f"token gaps of {sizes.gap_streams} streams while a {sizes.long_prompt_tokens}-token prompt is read")
    gaps = measures.gaps_during_long_prefill(
        base_url, sizes.gap_streams, sizes.long_prompt_tokens, rng, sizes.gap_stream_limit
    )
    results["long_prefill_gap_ratio"] = gaps["ratio"]
    results["median_gap_ms"] = gaps["median_gap_s"] * 1000
    results["p99_gap_during_prefill_ms"] = gaps["p99_gap_during_prefill_s"] * 1000
    step(f"chat, {sizes.chat_turns} turns")
    firsts = measures.chat_turns(base_url, sizes.chat_turns, rng, sizes.chat_reply_tokens)
    results["chat_ttft_turn_1_ms"] = firsts[0] * 1000
    results["chat_ttft_turn_last_ms"] = firsts[-1] * 1000
    results["chat_ttft_ratio"] = firsts[-1] / max(firsts[0], 1e-9)
    server.check_alive()
    return results


def _bound_verdict(value: float | None, bound: float) -> str:
    if value is None or value != value:  # not measured, or NaN
        return "-"
    return ("meets" if value <= bound else "misses") + f" <= {bound:g}x"


def _cell(value: float | None, width: int) -> str:
    return f"{value:{width}.1f}" if value is not None else f"{'-':>{width}}"


def report(ember: dict[str, float] | None, llama: dict[str, float] | None) -> dict:
    """Rows of figure, ember, llama-server, ratio and verdict; printed as a table, returned for JSON."""
    names = list(ember or llama or {})
    rows = []
    for name in names:
        ours = ember.get(name) if ember else None
        peer = llama.get(name) if llama else None
        row = {"figure": name, "ember": ours, "llama_server": peer, "ratio": None, "target": ""}
        if name in TARGETS:
            target = TARGETS[name]
            if ours and peer:
                row["ratio"] = ours / peer
                row["target"] = ("meets" if row["ratio"] >= target else "misses") + f" >= {target:g}x"
            else:
                row["target"] = f"(>= {target:g}x: needs both servers)"
        elif name in OWN_BOUNDS:
            bound = OWN_BOUNDS[name]
            verdicts = []
            if ember is not None:
                verdicts.append(f"ember {_bound_verdict(ours, bound)}")
            if llama is not None:
                verdicts.append(f"llama-server {_bound_verdict(peer, bound)}")
            row["target"] = "; ".join(verdicts)
        rows.append(row)
    print(f"{'figure':28} {'ember':>12} {'llama-server':>13} {'ratio':>7}  target")
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        print(
            f"{row['figure']:28} {_cell(row['ember'], 12)} {_cell(row['llama_server'], 13)} {ratio:>7}"
            f"  {row['target']}"
        )
    return {"rows": rows}


def find_llama_server(args: argparse.Namespace, gguf: Path, say: Callable[[str], None]) -> Path:
    """--llama-server as given, else llama-server beside the first llama.cpp build that runs here."""
    from ember import peers

    if args.llama_server:
        binary = Path(args.llama_server).expanduser()
        if not binary.exists():
            raise peers.PeerError(f"no llama-server at {binary}")
        return binary
    llama = peers.find_llama_cpp(gguf, args.llama_cpp_bin, args.threads)
    for path, why in llama.rejected.items():
        say(f"skipping the llama.cpp in {path}: {why}")
    return llama.tool("llama-server")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ember.server.benchmark", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="smollm2", help="ember's --model (default smollm2)")
    parser.add_argument(
        "--gguf", default=None, help="the GGUF llama-server loads (default: the model's file)"
    )
    parser.add_argument(
        "--llama-cpp-bin",
        default=None,
        metavar="DIR",
        help="llama.cpp's bin folder (default: the first ~/.cache/ember-peers/*/bin that runs here)",
    )
    parser.add_argument("--llama-server", default=None, help="a llama-server binary (skips the search)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["ember", "llama", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a measurement")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser


def run(args: argparse.Namespace) -> dict:
    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    sizes = Sizes.quick() if args.quick else Sizes()
    llama_results = ember_results = None
    if args.only in ("llama", "both"):
        from ember.loader import resolve_model_path

        gguf = Path(args.gguf) if args.gguf else resolve_model_path(args.model)
        if gguf.suffix != ".gguf":
            raise EmberError(f"llama-server needs a .gguf file; {gguf} is not one (give --gguf)")
        binary = find_llama_server(args, gguf, say)
        say(f"llama-server {binary} ({gguf.name}, {args.threads} threads, {SLOTS} slots)")
        port = free_port()
        with ServerProcess("llama-server", llama_command(binary, gguf, port, args.threads), port) as server:
            llama_results = run_measurements(server, sizes, say)
        server.remove_log()
    if args.only in ("ember", "both"):
        say(f"ember serve ({args.model}, {args.threads} threads)")
        port = free_port()
        with tempfile.TemporaryDirectory(prefix="ember-bench-") as home:  # never the user's session store
            command = ember_command(args.model, port, args.threads, home)
            with ServerProcess("ember serve", command, port) as server:
                ember_results = run_measurements(server, sizes, say)
            server.remove_log()
    summary = report(ember_results, llama_results)
    summary.update({"model": args.model, "threads": args.threads, "quick": args.quick, "only": args.only})
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop_on_sigterm()
    try:
        summary = run(args)
    except EmberError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except measures.MeasureFailed as error:
        print(f"error: a measurement failed: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
