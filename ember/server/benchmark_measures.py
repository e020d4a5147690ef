"""The measurements of `python -m ember.server.benchmark`, made over HTTP against any OpenAI-style server.

Each function takes a base URL and returns plain numbers; the same requests
go to ember and to llama.cpp's llama-server, so only ratios taken in one run
are compared. Prompts are token-id lists of random ids where a prompt cache
must not help (prefill), and real conversations where it should (chat turns).
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import httpx

TIMEOUT = httpx.Timeout(600.0, connect=10.0)


@dataclass
class StreamRecord:
    """When each streamed chunk with text arrived, and how many tokens the server said it produced."""

    started: float
    arrivals: list[float] = field(default_factory=list)
    completion_tokens: int | None = None
    first_token_at: float | None = None

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.arrivals)

    def decode_rate(self) -> float:
        """Chunks (one per token on both servers) per second after the first one.

        Counted from arrivals, not from `usage`, so both servers are measured the same way
        whether or not they report usage in streams.
        """
        if len(self.arrivals) < 2:
            return 0.0
        return (len(self.arrivals) - 1) / max(self.arrivals[-1] - self.arrivals[0], 1e-9)


def stream_completion(base_url: str, body: dict, path: str = "/v1/completions") -> StreamRecord:
    """POST a streamed request and record its chunk arrival times."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    record = StreamRecord(started=time.perf_counter())
    with httpx.stream("POST", base_url + path, json=body, timeout=TIMEOUT) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            usage = chunk.get("usage")
            if usage:
                record.completion_tokens = usage.get("completion_tokens")
            for choice in chunk.get("choices") or []:
                text = choice.get("text")
                if text is None:
                    text = (choice.get("delta") or {}).get("content")
                if text:
                    now = time.perf_counter()
                    record.arrivals.append(now)
                    if record.first_token_at is None:
                        record.first_token_at = now
    return record


def random_prompt(
    length: int, rng: random.Random, vocab_low: int = 1000, vocab_high: int = 40000
) -> list[int]:
    return [rng.randrange(vocab_low, vocab_high) for _ in range(length)]


def decode_body(prompt: list[int] | str, max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def single_stream_decode(base_url: str, tokens: int, repeats: int, rng: random.Random) -> float:
    """Best decode tokens/s of one stream (after its first token)."""
    rates = []
    for _ in range(repeats):
        record = stream_completion(base_url, decode_body(random_prompt(16, rng), tokens))
        rates.append(record.decode_rate())
    return max(rates)


def prefill_rate(base_url: str, prompt_tokens: int, repeats: int, rng: random.Random) -> float:
    """Best prompt tokens/s, from submission to first token, of a fresh (uncacheable) prompt."""
    rates = []
    for _ in range(repeats):
        record = stream_completion(base_url, decode_body(random_prompt(prompt_tokens, rng), 1))
        first = record.first_token_at or time.perf_counter()
        rates.append(prompt_tokens / max(first - record.started, 1e-9))
    return max(rates)


def concurrent_records(
    base_url: str, bodies: list[dict], path: str = "/v1/completions"
) -> list[StreamRecord]:
    records: list[StreamRecord | None] = [None] * len(bodies)

    def run(index: int) -> None:
        records[index] = stream_completion(base_url, bodies[index], path)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in records if r is not None]


def aggregate_decode(base_url: str, streams: int, tokens: int, rng: random.Random) -> float:
    """Total generated tokens/s of `streams` concurrent streams, over the span all of them decode."""
    records = concurrent_records(
        base_url, [decode_body(random_prompt(16, rng), tokens) for _ in range(streams)]
    )
    start = max(r.arrivals[0] for r in records if r.arrivals)  # everyone has started decoding
    end = min(r.arrivals[-1] for r in records if r.arrivals)  # nobody has finished yet
    counted = sum(sum(1 for t in r.arrivals if start <= t <= end) for r in records)
    return counted / max(end - start, 1e-9)


def gaps_during_long_prefill(
    base_url: str, streams: int, long_prompt_tokens: int, rng: random.Random, stream_tokens: int = 300
) -> dict[str, float]:
    """Token gaps of running streams while a long prompt is read: median before, p99 during."""
    records: list[StreamRecord | None] = [None] * streams

    def run(index: int) -> None:
        records[index] = stream_completion(base_url, decode_body(random_prompt(16, rng), stream_tokens))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # the streams are decoding
    long_started = time.perf_counter()
    long_record = stream_completion(base_url, decode_body(random_prompt(long_prompt_tokens, rng), 1))
    long_done = long_record.first_token_at or time.perf_counter()
    for thread in threads:
        thread.join()
    before, during = [], []
    for record in records:
        if record is None:
            continue
        for previous, current in zip(record.arrivals, record.arrivals[1:]):
            gap = current - previous
            if current < long_started:
                before.append(gap)
            elif previous <= long_done and current >= long_started:
                during.append(gap)
    median = statistics.median(before) if before else float("nan")
    p99 = _percentile(during, 0.99) if during else float("nan")
    return {"median_gap_s": median, "p99_gap_during_prefill_s": p99, "ratio": p99 / median if median else 0.0}


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def chat_turns(base_url: str, turns: int, rng: random.Random, reply_tokens: int = 48) -> list[float]:
    """Time to first token of each turn of one conversation resent in full, OpenAI style."""
    topics = ["rivers", "mountains", "bread", "stars", "music", "trains", "forests", "bees", "glass", "maps"]
    messages = [{"role": "system", "content": "You are a helpful assistant who answers in a few sentences."}]
    firsts = []
    for turn in range(turns):
        topic = topics[turn % len(topics)]
        messages.append(
            {
                "role": "user",
                "content": f"Tell me something interesting about {topic}, and why it matters to people.",
            }
        )
        body = {
            "messages": messages,
            "max_tokens": reply_tokens,
            "temperature": 0,
            "seed": rng.randrange(1000),
        }
        started = time.perf_counter()
        reply_parts: list[str] = []
        with httpx.stream(
            "POST", base_url + "/v1/chat/completions", json={**body, "stream": True}, timeout=TIMEOUT
        ) as response:
            response.raise_for_status()
            first = None
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[len("data: ") :]).get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        first = first or time.perf_counter()
                        reply_parts.append(content)
        firsts.append((first or time.perf_counter()) - started)
        messages.append({"role": "assistant", "content": "".join(reply_parts)})
    return firsts
