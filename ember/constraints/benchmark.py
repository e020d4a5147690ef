"""How much constrained decoding costs: `python -m ember.constraints.benchmark [--model smollm2]`.

Measures, on one loaded model:
- decode speed with a JSON-schema constraint against the same run without one, at batch 1 and 8
  (tokens per second between each sequence's first and last token, so prefill is left out);
- a schema's first use: compile + check + first mask, after the once-per-model warm-up that
  `ember serve` does at load (also timed and reported);
- the mask's own time per token (the part that runs on the critical path), and its share of an
  unconstrained step at each batch size (a batch's masks are computed in one llguidance call).

Each batch size runs free and constrained back to back, `--repetitions` times, and reports the
median of the ratios: on a shared machine one pair of runs can differ by 20% from the next.

Targets from issue 15: constrained decode at least 90% of unconstrained at batch 1 and 8; a schema's
first use adds at most 50 ms. `--smoke` runs a few tokens on the story model (a check that it works,
not a measurement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from ember.constraints.compiler import clear_compile_cache, constraint_from_options
from ember.constraints.tokenizer_bridge import llguidance_tokenizer
from ember.constraints.warmup import warm_up
from ember.engine.sequence import GenerationRequest, StepOutput
from ember.sampling import SamplingParams

PROMPT = "Write a list of many short words, one after another:"


def long_schema(items: int) -> dict[str, Any]:
    """A schema like the issue's strict one (objects in an array, a bounded string, an integer range,
    an enum, a number range, required fields), with exactly `items` records: with `items` at least
    the token count, no reply can end early, so every sequence of a batch decodes to max_tokens."""
    record = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"type": "string", "enum": ["student", "teacher", "engineer", "artist"]},
            "score": {"type": "number", "minimum": 0, "maximum": 5},
        },
        "required": ["name", "age", "role", "score"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"people": {"type": "array", "items": record, "minItems": items, "maxItems": items}},
        "required": ["people"],
        "additionalProperties": False,
    }


def sample_reply(items: int) -> str:
    """A valid reply of `long_schema(items)`, to replay for the mask timing."""
    people = [
        {"name": f"Person {index}", "age": 20 + index % 50, "role": "teacher", "score": 3.5}
        for index in range(items)
    ]
    return json.dumps({"people": people}, separators=(", ", ": "))


def decode_rate(handle: Any, batch: int, max_tokens: int, schema: dict[str, Any] | None) -> float:
    """Aggregate decode tokens/s of `batch` sequences (constrained by `schema` when given)."""
    engine = handle.engine
    prompt = handle.encode(PROMPT)
    stamps: dict[str, list[float]] = {}
    requests = []
    for index in range(batch):
        constraint = constraint_from_options(handle.tokenizer, json_schema=schema) if schema else None
        params = SamplingParams(temperature=0.8, seed=index, max_tokens=max_tokens, ignore_eos=schema is None)
        request_id = f"bench-{index}-{time.monotonic_ns()}"
        request = GenerationRequest(list(prompt), params, request_id=request_id, constraint=constraint)
        requests.append(request)
        stamps[request.request_id] = []
    finished: set[str] = set()

    def record(output: StepOutput) -> None:
        if output.token_id is not None:
            stamps[output.request_id].append(time.perf_counter())
        if output.finished:
            finished.add(output.request_id)

    for request in requests:
        engine.add_request(request, on_output=record)
    while len(finished) < batch:
        engine.step()
    first = min(times[0] for times in stamps.values() if times)
    last = max(times[-1] for times in stamps.values() if times)
    tokens = sum(max(len(times) - 1, 0) for times in stamps.values())
    return tokens / max(last - first, 1e-9)


def first_use_ms(handle: Any) -> dict[str, float]:
    """Milliseconds: the once-per-model warm-up (`ember serve` does it at load), then a new schema's
    first use (compile, check, first mask), which is what a request adds."""
    started = time.perf_counter()
    warm_up(handle.tokenizer)
    tokenizer_ms = (time.perf_counter() - started) * 1e3
    clear_compile_cache()
    schema = long_schema(7) | {"title": f"fresh-{time.monotonic_ns()}"}  # never compiled before
    started = time.perf_counter()
    constraint = constraint_from_options(handle.tokenizer, json_schema=schema)
    constraint.allowed_token_mask(handle.engine.vocab_size)
    return {"tokenizer_ms": tokenizer_ms, "first_use_ms": (time.perf_counter() - started) * 1e3}


def mask_microseconds(handle: Any, tokens: int) -> tuple[float, float]:
    """(median, mean) microseconds of one mask + accept, replaying a valid reply of the long schema.

    The mean is what a step pays on average (masks inside a bounded string cost several times
    the median), so the share of a step is computed from it."""
    items = max(tokens // 8, 1)
    text = sample_reply(items)
    constraint = constraint_from_options(handle.tokenizer, json_schema=long_schema(items))
    times = []
    for token_id in handle.encode(text, add_special_tokens=False):
        started = time.perf_counter()
        constraint.allowed_token_mask(handle.engine.vocab_size)
        constraint.accept_token(token_id)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6, statistics.mean(times) * 1e6


def run(model: str, tokens: int, batches: list[int], repetitions: int = 3) -> dict[str, Any]:
    import ember

    handle = ember.load(model)
    results: dict[str, Any] = first_use_ms(handle)
    results["mask_us_median"], results["mask_us_mean"] = mask_microseconds(handle, tokens)
    schema = long_schema(tokens)  # never complete within `tokens`: all sequences decode to the end
    decode_rate(handle, 1, 4, None)  # warm the kernels
    for batch in batches:
        pairs = [
            (decode_rate(handle, batch, tokens, None), decode_rate(handle, batch, tokens, schema))
            for _ in range(repetitions)
        ]
        free = statistics.median(pair[0] for pair in pairs)
        results[f"batch_{batch}"] = {
            "unconstrained_tokens_per_s": free,
            "constrained_tokens_per_s": statistics.median(pair[1] for pair in pairs),
            "ratio": statistics.median(constrained / unconstrained for unconstrained, constrained in pairs),
            "ratios": [constrained / unconstrained for unconstrained, constrained in pairs],
            # the masks' share of an unconstrained step: batch masks in series / (batch / tokens per s)
            "mask_share_of_step": results["mask_us_mean"] * 1e-6 * free,
        }
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repetitions", type=int, default=3, help="free/constrained pairs per batch size")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--smoke", action="store_true", help="a few tokens on the story model")
    args = parser.parse_args(argv)
    if args.smoke:
        from pathlib import Path

        args.model = str(Path(__file__).resolve().parents[2].parent / "shared" / "models" / "story")
        args.tokens, args.batch = 8, [1, 2]
        results = run_smoke(args.model, args.tokens, args.batch)
    else:
        results = run(args.model, args.tokens, args.batch, args.repetitions)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"warm-up at model load (once per model): {results['tokenizer_ms']:.1f} ms")
    verdict = "ok" if results["first_use_ms"] <= 50 else "over the 50 ms target"
    print(f"schema first use: {results['first_use_ms']:.1f} ms ({verdict})")
    if results["mask_us_median"] is not None:
        median, mean = results["mask_us_median"], results["mask_us_mean"]
        print(f"mask + accept per token: {median:.0f} us median, {mean:.0f} us mean")
    for batch in args.batch:
        row = results[f"batch_{batch}"]
        verdict = "ok" if row["ratio"] >= 0.9 else "below the 90% target"
        print(
            f"batch {batch}: {row['unconstrained_tokens_per_s']:.1f} tok/s free, "
            f"{row['constrained_tokens_per_s']:.1f} tok/s constrained = {row['ratio']:.0%} ({verdict})"
            + (f" [pairs: {', '.join(f'{ratio:.0%}' for ratio in row['ratios'])}]" if "ratios" in row else "")
            + (f"; masks {row['mask_share_of_step']:.0%} of a step" if "mask_share_of_step" in row else "")
        )


def run_smoke(model: str, tokens: int, batches: list[int]) -> dict[str, Any]:
    """The story model cannot write `{`: its smoke run constrains with a string schema instead."""
    import ember

    handle = ember.load(model)
    results: dict[str, Any] = first_use_ms_string(handle)
    results["mask_us_median"] = results["mask_us_mean"] = None  # the story vocabulary has no "{"
    schema = {"type": "string", "minLength": 40, "maxLength": 60}
    for batch in batches:
        free = decode_rate(handle, batch, tokens, None)
        constrained = decode_rate(handle, batch, tokens, schema)
        results[f"batch_{batch}"] = {
            "unconstrained_tokens_per_s": free,
            "constrained_tokens_per_s": constrained,
            "ratio": constrained / free,
        }
    return results


def first_use_ms_string(handle: Any) -> dict[str, float]:
    started = time.perf_counter()
    llguidance_tokenizer(handle.tokenizer)
    tokenizer_ms = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    constraint = constraint_from_options(handle.tokenizer, json_schema={"type": "string", "maxLength": 9})
    constraint.allowed_token_mask(handle.engine.vocab_size)
    return {"tokenizer_ms": tokenizer_ms, "first_use_ms": (time.perf_counter() - started) * 1e3}


if __name__ == "__main__":
    main()
