"""RWKV speed against the `rwkv` package (ChatRWKV's code, strategy 'cpu fp32', JIT on), in one run.

    python -m ember.rwkv_benchmark --model MODEL.pth [--compare] [--json]
    python -m ember.rwkv_benchmark --random 4|7 --folder DIR [--compare]   # 169M-shaped v4, 0.1B-shaped v7

Each side runs in its own subprocess (the package reads its switches at
import, and peak memory is then each side's own). Measured: decode at batch 1,
reading a 512-token prompt, 8 sequences decoding together (total tokens/s),
peak resident memory, and decode speed at token 4,000 of a conversation
against token 100. Targets (issue 14): decode >= 2x the package, prompt >= 2x,
8 together >= 4x the package's single-sequence rate, memory <= the package's,
decode at 4,000 within 10 % of decode at 100. Not a test: timings need an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DECODE_TOKENS = 64
PROMPT_TOKENS = 512
BATCH = 8
LONG_POSITION = 4000


def _peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so
    a worker would report its parent's peak (the parent writes the random model) where that is higher."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompt(count: int, vocab_size: int, seed: int = 0) -> list[int]:
    import torch

    return torch.randint(1, vocab_size, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def _ember_worker(path: str, threads: int, quant: str | None = None) -> dict:
    import torch

    import ember
    from ember.models.batch import ForwardBatch

    torch.set_num_threads(threads)
    handle = ember.load(path, device="cpu", quant=quant)
    model, vocab = handle.model, handle.config.vocab_size
    pool = model.new_cache(memory_budget_bytes=1 << 30)

    def feed(entry, tokens):
        batch = ForwardBatch(torch.tensor([tokens]), [len(entry.token_ids)], [entry.slot])
        logits = model.forward(batch, pool)
        entry.token_ids.extend(tokens)
        return logits

    def decode_rate(entry, steps):
        token = 1
        started = time.perf_counter()
        for _ in range(steps):
            token = int(feed(entry, [token])[0, -1].argmax())
        return steps / (time.perf_counter() - started)

    entry = pool.acquire()
    feed(entry, _prompt(16, vocab))  # warm up (kernels built, pages touched)
    prompt = _prompt(PROMPT_TOKENS, vocab, seed=1)
    entry = pool.acquire()
    started = time.perf_counter()
    feed(entry, prompt)
    prefill = PROMPT_TOKENS / (time.perf_counter() - started)
    decode = decode_rate(entry, DECODE_TOKENS)

    entries = [pool.acquire() for _ in range(BATCH)]
    for index, other in enumerate(entries):
        feed(other, _prompt(32, vocab, seed=10 + index))
    slots = [other.slot for other in entries]
    tokens = torch.ones(BATCH, 1, dtype=torch.long)
    started = time.perf_counter()
    for step in range(DECODE_TOKENS):
        batch = ForwardBatch(tokens, [32 + step] * BATCH, slots)
        tokens = model.forward(batch, pool)[:, -1].argmax(-1, keepdim=True)
    batched = BATCH * DECODE_TOKENS / (time.perf_counter() - started)

    short = pool.acquire()
    feed(short, _prompt(100, vocab, seed=2))
    at_100 = decode_rate(short, DECODE_TOKENS)
    long = pool.acquire()
    for start in range(0, LONG_POSITION, 512):
        feed(long, _prompt(min(512, LONG_POSITION - start), vocab, seed=3 + start))
    at_4000 = decode_rate(long, DECODE_TOKENS)
    return {
        "decode_tokens_per_s": decode,
        "prefill_tokens_per_s": prefill,
        "batch8_tokens_per_s": batched,
        "decode_at_100": at_100,
        "decode_at_4000": at_4000,
        "peak_rss_mib": _peak_rss_mib(),
    }


def _package_worker(path: str, threads: int, quant: str | None = None) -> dict:
    import torch

    torch.set_num_threads(threads)
    from rwkv.model import RWKV

    model = RWKV(model=path.removesuffix(".pth"), strategy="cpu fp32")
    vocab = model.w["emb.weight"].shape[0] if hasattr(model, "w") else model.z["emb.weight"].shape[0]
    with torch.no_grad():
        model.forward(_prompt(16, vocab), None)
        started = time.perf_counter()
        logits, state = model.forward(_prompt(PROMPT_TOKENS, vocab, seed=1), None)
        prefill = PROMPT_TOKENS / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            logits, state = model.forward([int(logits.argmax())], state)
        decode = DECODE_TOKENS / (time.perf_counter() - started)
    return {
        "decode_tokens_per_s": decode,
        "prefill_tokens_per_s": prefill,
        "peak_rss_mib": _peak_rss_mib(),
    }


def _run_worker(kind: str, path: Path, threads: int, v7: bool, quant: str | None = None) -> dict:
    environment = dict(os.environ, RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
    if v7:
        environment["RWKV_V7_ON"] = "1"
    command = [sys.executable, "-m", "ember.rwkv_benchmark", "--worker", kind, "--model", str(path)]
    command += ["--threads", str(threads)] + (["--quant", quant] if quant else [])
    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _verdicts(ours: dict, package: dict) -> list[tuple[str, float, str, bool]]:
    return [
        (
            "decode batch 1 vs package",
            ours["decode_tokens_per_s"] / package["decode_tokens_per_s"],
            ">= 2x",
            ours["decode_tokens_per_s"] >= 2 * package["decode_tokens_per_s"],
        ),
        (
            "prompt 512 vs package",
            ours["prefill_tokens_per_s"] / package["prefill_tokens_per_s"],
            ">= 2x",
            ours["prefill_tokens_per_s"] >= 2 * package["prefill_tokens_per_s"],
        ),
        (
            "8 together vs package single",
            ours["batch8_tokens_per_s"] / package["decode_tokens_per_s"],
            ">= 4x",
            ours["batch8_tokens_per_s"] >= 4 * package["decode_tokens_per_s"],
        ),
        (
            "peak memory vs package",
            ours["peak_rss_mib"] / package["peak_rss_mib"],
            "<= 1x",
            ours["peak_rss_mib"] <= package["peak_rss_mib"],
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an RWKV .pth (for --compare) or rwkv.cpp .bin")
    parser.add_argument("--random", choices=["4", "6", "7"], help="write a random real-shape model first")
    parser.add_argument("--folder", default=".", help="where --random writes its model")
    parser.add_argument("--compare", action="store_true", help="also run the rwkv package")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--quant", choices=["none", "int8", "int4"], help="ember's weight form (default: the file's)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=["ember", "package"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker = _ember_worker if args.worker == "ember" else _package_worker
        print(json.dumps(worker(args.model, args.threads, args.quant)))
        return 0
    path = Path(args.model) if args.model else None
    if args.random:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from rwkv_support import make_random_pth  # the tests' seeded writer (a checkout has it)

        folder = Path(args.folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = make_random_pth(args.random, folder / f"random-rwkv{args.random}.pth", seed=0)
        tokenizers = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "tokenizers"
        for name in ("20B_tokenizer.json", "rwkv_vocab_v20230424.txt"):
            if (tokenizers / name).exists() and not (path.parent / name).exists():
                (path.parent / name).write_bytes((tokenizers / name).read_bytes())
    if path is None:
        parser.error("give --model or --random")
    from ember.formats.rwkv_pth import load_state_dict

    v7 = path.suffix == ".pth" and "blocks.0.att.r_k" in load_state_dict(path)
    report = {"model": str(path), "ember": _run_worker("ember", path, args.threads, v7, args.quant)}
    if args.compare:
        report["package"] = _run_worker("package", path, args.threads, v7)
        report["verdicts"] = [
            {"target": name, "ratio": ratio, "goal": goal, "met": met}
            for name, ratio, goal, met in _verdicts(report["ember"], report["package"])
        ]
    ours = report["ember"]
    report["long_conversation_ratio"] = ours["decode_at_4000"] / ours["decode_at_100"]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for side in ("ember", "package"):
        if side in report:
            print(side + ": " + ", ".join(f"{key} {value:.1f}" for key, value in report[side].items()))
    for verdict in report.get("verdicts", []):
        mark = "met" if verdict["met"] else "NOT met"
        print(f"{verdict['target']}: {verdict['ratio']:.2f} ({verdict['goal']}) {mark}")
    ratio = report["long_conversation_ratio"]
    verdict = "met" if ratio >= 0.9 else "NOT met"
    print(f"decode at token 4000 / at token 100: {ratio:.2f} (within 10 %: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
