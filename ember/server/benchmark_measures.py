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

TIMEOUT = httpx.Timeout(120.0, connect=10.0)  # no chunk for two minutes: the server is stuck
START_TIMEOUT_S = 120  # streams that have not started decoding by then


class MeasureFailed(Exception):
    """A request of a measurement failed (an HTTP error, a timeout, a broken stream)."""


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


def stream_completion(
    base_url: str,
    body: dict,
    path: str = "/v1/completions",
    record: StreamRecord | None = None,
    stop: threading.Event | None = None,
) -> StreamRecord:
    """POST a streamed request and record its chunk arrival times.

    With `stop`, the client hangs up once it is set (the server cancels the rest), so a
    stream can be made to last exactly as long as another measurement needs it.
    """
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    record = record or StreamRecord(started=time.perf_counter())
    record.started = time.perf_counter()
    try:
        with httpx.stream("POST", base_url + path, json=body, timeout=TIMEOUT) as response:
            if response.status_code != 200:
                response.read()
                raise MeasureFailed(f"{path} answered {response.status_code}: {response.text[:200]}")
            for line in response.iter_lines():
                if stop is not None and stop.is_set():
                    break
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
    except httpx.HTTPError as error:
        raise MeasureFailed(f"{path}: {type(error).__name__}: {error}") from error
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


class _Streams:
    """Streams running in threads; the first failure is raised in the caller's thread on join."""

    def __init__(self, base_url: str, bodies: list[dict], path: str = "/v1/completions"):
        self.records = [StreamRecord(started=time.perf_counter()) for _ in bodies]
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

        def run(index: int) -> None:
            try:
                stream_completion(base_url, bodies[index], path, self.records[index], self.stop)
            except BaseException as error:  # noqa: BLE001 - carried to the caller
                self.errors.append(error)
                self.stop.set()

        self.threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(bodies))]
        for thread in self.threads:
            thread.start()

    def wait_until_decoding(self, tokens: int) -> None:
        """Until every stream has `tokens` arrivals (or one failed, or START_TIMEOUT_S passed)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while any(len(r.arrivals) < tokens for r in self.records):
            if self.errors or all(not t.is_alive() for t in self.threads):
                break
            if time.monotonic() > deadline:
                self.stop.set()
                raise MeasureFailed(f"streams did not start decoding within {START_TIMEOUT_S} s")
            time.sleep(0.01)

    def join(self) -> list[StreamRecord]:
        for thread in self.threads:
            thread.join()
        if self.errors:
            error = self.errors[0]
            raise error if isinstance(error, MeasureFailed) else MeasureFailed(repr(error))
        return self.records


def concurrent_records(
    base_url: str, bodies: list[dict], path: str = "/v1/completions"
) -> list[StreamRecord]:
    return _Streams(base_url, bodies, path).join()


def aggregate_decode(base_url: str, streams: int, tokens: int, rng: random.Random) -> float:
    """Total generated tokens/s of `streams` concurrent streams, over the span all of them decode."""
    records = concurrent_records(
        base_url, [decode_body(random_prompt(16, rng), tokens) for _ in range(streams)]
    )
    if not all(len(r.arrivals) >= 2 for r in records):
        raise MeasureFailed("a stream of the aggregate decode produced fewer than 2 tokens")
    start = max(r.arrivals[0] for r in records)  # everyone has started decoding
    end = min(r.arrivals[-1] for r in records)  # nobody has finished yet
    counted = sum(sum(1 for t in r.arrivals if start <= t <= end) for r in records)
    return counted / max(end - start, 1e-9)


def gaps_during_long_prefill(
    base_url: str,
    streams: int,
    long_prompt_tokens: int,
    rng: random.Random,
    stream_limit: int = 2048,
    before_tokens: int = 24,
) -> dict[str, float]:
    """Token gaps of running streams while a long prompt is read: median before, p99 during.

    The streams ask for up to `stream_limit` tokens (more than either server decodes
    meanwhile, and within a llama-server slot's context) and are hung up on once the long
    prompt's first token has come, so they run through the whole read however slow it is.
    """
    bodies = [decode_body(random_prompt(16, rng), stream_limit) for _ in range(streams)]
    running = _Streams(base_url, bodies)
    try:
        running.wait_until_decoding(before_tokens)
        long_started = time.perf_counter()
        long_record = stream_completion(base_url, decode_body(random_prompt(long_prompt_tokens, rng), 1))
        long_done = long_record.first_token_at or time.perf_counter()
        time.sleep(0.3)  # the gap that straddles the end of the read has arrived
    finally:
        running.stop.set()
    records = running.join()
    before, during = [], []
    for record in records:
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
        first = None
        try:
            with httpx.stream(
                "POST", base_url + "/v1/chat/completions", json={**body, "stream": True}, timeout=TIMEOUT
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise MeasureFailed(
                        f"/v1/chat/completions answered {response.status_code}: {response.text[:200]}"
                    )
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for choice in json.loads(line[len("data: ") :]).get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            first = first or time.perf_counter()
                            reply_parts.append(content)
        except httpx.HTTPError as error:
            raise MeasureFailed(f"/v1/chat/completions: {type(error).__name__}: {error}") from error
        firsts.append((first or time.perf_counter()) - started)
        messages.append({"role": "assistant", "content": "".join(reply_parts)})
    return firsts
