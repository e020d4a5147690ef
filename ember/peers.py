"""llama.cpp, the peer ember is measured against: finding a build that runs here, and its benchmarks.

A llama.cpp built with `GGML_NATIVE=ON` can crash on a CPU other than the one
it was tuned for (on this project's Intel Xeon under KVM, ggml's AMX kernels
segfault at their first `ldtilecfg`), so a directory is only chosen after a
tiny `llama-bench` run on the model file has computed something. Directories
searched, in order: the one given (`--llama-cpp-bin`), else every
`~/.cache/ember-peers/*/bin` holding `llama-bench`, `llama.cpp` (what
`../shared/peers/build-llamacpp.sh` writes) first.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ember.errors import EmberError

PEERS_CACHE = Path.home() / ".cache" / "ember-peers"
DEFAULT_BUILD = "llama.cpp"  # the folder build-llamacpp.sh fills
PROBE_TIMEOUT_S = 120


class PeerError(EmberError):
    """llama.cpp is missing, crashes on this machine, or its benchmark gave no figures."""


@dataclass
class LlamaCpp:
    """A llama.cpp bin directory known to compute on this machine."""

    bin_dir: Path
    rejected: dict[str, str] = field(default_factory=dict)  # other candidates and why they were skipped

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.exists():
            raise PeerError(f"{path} is missing (the llama.cpp build in {self.bin_dir} lacks {name})")
        return path


def candidate_dirs(explicit: str | Path | None = None) -> list[Path]:
    """Bin directories to try: the explicit one alone, else the cached builds."""
    if explicit is not None:
        return [Path(explicit).expanduser()]
    found = sorted(path.parent for path in PEERS_CACHE.glob("*/bin/llama-bench"))
    return sorted(found, key=lambda path: path.parent.name != DEFAULT_BUILD)


def probe(bin_dir: Path, gguf: Path, threads: int = 2) -> str | None:
    """None when `llama-bench` computes a tiny prompt on `gguf` here; else why not, in a few words."""
    bench = bin_dir / "llama-bench"
    if not bench.exists():
        return f"no llama-bench in {bin_dir}"
    command = [str(bench), "-m", str(gguf), "-t", str(threads), "-p", "8", "-n", "0", "-r", "1",
               "--no-warmup", "-o", "json"]  # fmt: skip
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return f"llama-bench did not finish a tiny run within {PROBE_TIMEOUT_S} s"
    return None if result.returncode == 0 else exit_reason(result.returncode, result.stderr)


def exit_reason(returncode: int, stderr: str = "") -> str:
    """'killed by SIGSEGV' or 'exit status 1: <last line of stderr>'."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"exit status {returncode}" + (f": {lines[-1][-200:]}" if lines else "")


def find_llama_cpp(gguf: Path, explicit: str | Path | None = None, threads: int = 2) -> LlamaCpp:
    """The first candidate build that runs `gguf` on this CPU; PeerError naming each failure otherwise."""
    rejected: dict[str, str] = {}
    for bin_dir in candidate_dirs(explicit):
        reason = probe(bin_dir, gguf, threads)
        if reason is None:
            return LlamaCpp(bin_dir, rejected)
        rejected[str(bin_dir)] = reason
    if not rejected:
        raise PeerError(
            f"no llama.cpp build in {PEERS_CACHE}/*/bin: run ../shared/peers/build-llamacpp.sh "
            "(or give --llama-cpp-bin DIR)"
        )
    tried = "; ".join(f"{path}: {why}" for path, why in rejected.items())
    raise PeerError(
        f"no llama.cpp build runs here ({tried}); tools/build-llamacpp-noamx.sh builds one without AMX"
    )


def llama_bench(
    llama: LlamaCpp, gguf: Path, threads: int, prompt_tokens: int, decode_tokens: int, repetitions: int
) -> dict[str, float]:
    """llama-bench's prompt (pp) and generation (tg) tokens/s, as bench-llamacpp.sh runs it."""
    command = [str(llama.tool("llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens),
               "-n", str(decode_tokens), "-r", str(repetitions), "-o", "json"]  # fmt: skip
    rows = json.loads(_run(command, "llama-bench"))
    figures: dict[str, float] = {}
    for row in rows:
        if row["n_prompt"] == prompt_tokens and row["n_gen"] == 0:
            figures[f"pp{prompt_tokens}"] = round(row["avg_ts"], 1)
        if row["n_prompt"] == 0 and row["n_gen"] == decode_tokens:
            figures[f"tg{decode_tokens}"] = round(row["avg_ts"], 1)
    return figures


def llama_batched_bench(
    llama: LlamaCpp, gguf: Path, threads: int, batches: list[int], prompt_tokens: int, decode_tokens: int
) -> dict[str, float]:
    """Total generation tokens/s of llama-batched-bench at each number of parallel sequences."""
    context = max(4096, max(batches) * (prompt_tokens + decode_tokens))  # every sequence's whole length
    parallel = ",".join(str(size) for size in batches)
    command = [str(llama.tool("llama-batched-bench")), "-m", str(gguf), "-t", str(threads),
               "-tb", str(threads), "-c", str(context), "-b", "2048", "-ub", "512",
               "-npp", str(prompt_tokens), "-ntg", str(decode_tokens), "-npl", parallel]  # fmt: skip
    figures: dict[str, float] = {}
    # A markdown table: |PP|TG|B|N_KV|T_PP s|S_PP t/s|T_TG s|S_TG t/s|T s|S t/s|
    for line in _run(command, "llama-batched-bench").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit():
            figures[cells[2]] = float(cells[7])
    return figures


def llama_cli_peak_rss(llama: LlamaCpp, gguf: Path, threads: int, tokens: int = 128) -> float | None:
    """Peak RSS in MiB of llama-cli generating `tokens` at batch 1 (GNU time's maximum resident set)."""
    cli = llama.bin_dir / "llama-cli"
    if not cli.exists() or not Path("/usr/bin/time").exists():
        return None
    command = ["/usr/bin/time", "-v", str(cli), "-m", str(gguf), "-t", str(threads), "-n", str(tokens),
               "-p", "Tell me a story.", "-st", "--temp", "0"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    return round(int(match.group(1)) / 1024) if match else None


def _run(command: list[str], name: str, timeout: float = 1800) -> str:
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as error:
        raise PeerError(f"{name} did not finish within {timeout:.0f} s") from error
    if result.returncode != 0:
        raise PeerError(f"{name} failed ({exit_reason(result.returncode, result.stderr)})")
    return result.stdout
