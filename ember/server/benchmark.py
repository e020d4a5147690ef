"""`python -m ember.server.benchmark`: ember serve beside llama.cpp's llama-server, same requests, one run.

Starts each server in turn on 127.0.0.1 (same GGUF, 2 threads; llama-server
with 16 parallel slots), sends both the same requests over HTTP and prints
each figure with ember / llama-server ratios and the issue's targets:

    single-stream decode >= 1.5x, prefill of 512 tokens >= 2.5x,
    aggregate decode at 8 and 16 streams >= 2.5x,
    p99 token gap of 4 streams while a 3,000-token prompt is read <= 5x their median gap,
    time to first token of turn 10 of a chat <= 1.5x that of turn 1.

llama-server comes from ../shared/peers/build-llamacpp.sh (~/.cache/ember-peers/llama.cpp/bin).
`--only ember --quick` is a smoke run of the ember side alone. Run it with nothing else busy.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from ember.server import benchmark_measures as measures

DEFAULT_LLAMA_SERVER = Path.home() / ".cache" / "ember-peers" / "llama.cpp" / "bin" / "llama-server"
TARGETS = {  # figure: the least ember / llama-server ratio (the gap and chat ratios are ember's own)
    "decode_1": 1.5,
    "prefill_512": 2.5,
    "decode_8": 2.5,
    "decode_16": 2.5,
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    def __init__(self, name: str, command: list[str], port: int, ready_path: str = "/health"):
        self.name = name
        self.command = command
        self.port = port
        self.ready_path = ready_path
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(
                    f"{self.name} exited with {self.process.returncode}: {' '.join(self.command)}"
                )
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise SystemExit(f"{self.name} was not ready within 180 s")

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def ember_command(model: str, port: int, threads: int) -> list[str]:
    return [
        sys.executable, "-m", "ember.cli.main", "serve", "--model", model, "--port", str(port),
        "--threads", str(threads), "--max-batch", "16",
    ]  # fmt: skip


def llama_command(binary: Path, gguf: Path, port: int, threads: int) -> list[str]:
    return [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
        "-np", "16", "-c", "65536", "--no-webui",
    ]  # fmt: skip


def run_measurements(base_url: str, quick: bool, say: Callable[[str], None]) -> dict[str, float]:
    rng = random.Random(1234)
    tokens = 32 if quick else 128
    results: dict[str, float] = {}
    say("  warm-up")
    measures.stream_completion(base_url, measures.decode_body(measures.random_prompt(16, rng), 8))
    say("  single-stream decode")
    results["decode_1"] = measures.single_stream_decode(base_url, tokens, 1 if quick else 3, rng)
    say("  prefill 512")
    results["prefill_512"] = measures.prefill_rate(base_url, 128 if quick else 512, 1 if quick else 3, rng)
    for streams in (8, 16):
        say(f"  aggregate decode, {streams} streams")
        results[f"decode_{streams}"] = measures.aggregate_decode(
            base_url, 4 if quick else streams, tokens, rng
        )
    if not quick:
        say("  token gaps while a 3,000-token prompt is read")
        gaps = measures.gaps_during_long_prefill(base_url, 4, 3000, rng)
        results["long_prefill_gap_ratio"] = gaps["ratio"]
        results["median_gap_ms"] = gaps["median_gap_s"] * 1000
        results["p99_gap_during_prefill_ms"] = gaps["p99_gap_during_prefill_s"] * 1000
    say("  chat turns")
    firsts = measures.chat_turns(base_url, 3 if quick else 10, rng)
    results["chat_ttft_turn_1_ms"] = firsts[0] * 1000
    results["chat_ttft_turn_last_ms"] = firsts[-1] * 1000
    results["chat_ttft_ratio"] = firsts[-1] / max(firsts[0], 1e-9)
    return results


def report(ember: dict[str, float], llama: dict[str, float] | None) -> dict:
    rows = []
    for name, value in ember.items():
        peer = llama.get(name) if llama else None
        ratio = value / peer if peer else None
        target = TARGETS.get(name)
        verdict = ""
        if target is not None and ratio is not None:
            verdict = "meets" if ratio >= target else "misses"
            verdict += f" >= {target}x"
        elif name == "long_prefill_gap_ratio":
            verdict = ("meets" if value <= 5 else "misses") + " <= 5x"
        elif name == "chat_ttft_ratio":
            verdict = ("meets" if value <= 1.5 else "misses") + " <= 1.5x"
        rows.append({"figure": name, "ember": value, "llama_server": peer, "ratio": ratio, "target": verdict})
    print(f"{'figure':28} {'ember':>12} {'llama-server':>13} {'ratio':>7}  target")
    for row in rows:
        peer = f"{row['llama_server']:.1f}" if row["llama_server"] is not None else "-"
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        print(f"{row['figure']:28} {row['ember']:12.1f} {peer:>13} {ratio:>7}  {row['target']}")
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ember.server.benchmark", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="smollm2", help="ember's --model (default smollm2)")
    parser.add_argument(
        "--gguf", default=None, help="the GGUF llama-server loads (default: the model's file)"
    )
    parser.add_argument("--llama-server", default=str(DEFAULT_LLAMA_SERVER), help="llama-server binary")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["ember", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a measurement")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    llama_results = None
    if args.only == "both":
        binary = Path(args.llama_server)
        if not binary.exists() and not shutil.which(str(binary)):
            raise SystemExit(f"no llama-server at {binary}: build it with ../shared/peers/build-llamacpp.sh")
        from ember.loader import resolve_model_path

        gguf = Path(args.gguf) if args.gguf else resolve_model_path(args.model)
        if gguf.suffix != ".gguf":
            raise SystemExit(f"llama-server needs a .gguf file; {gguf} is not one (give --gguf)")
        say(f"llama-server ({gguf.name}, {args.threads} threads, 16 slots)")
        port = _free_port()
        with ServerProcess("llama-server", llama_command(binary, gguf, port, args.threads), port):
            llama_results = run_measurements(f"http://127.0.0.1:{port}", args.quick, say)
    say(f"ember serve ({args.model}, {args.threads} threads)")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="ember-bench-") as home:  # never the user's session store
        command = ember_command(args.model, port, args.threads) + ["--data-dir", home]
        with ServerProcess("ember serve", command, port):
            ember_results = run_measurements(f"http://127.0.0.1:{port}", args.quick, say)
    summary = report(ember_results, llama_results)
    summary.update({"model": args.model, "threads": args.threads, "quick": args.quick})
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
