"""Speed measurements of a loaded model: prefill, decode by batch size, chat time to first token.

Each figure is the median of several repetitions after a warm-up run. The
measurements drive the engine directly, so they time exactly what the CLI
and the server run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from ember.engine.sequence import GenerationRequest
from ember.handle import ModelHandle
from ember.sampling import SamplingParams

BENCH_TEXT = (
    "The history of the city begins with a small fishing village on the banks of a wide river. "
    "Traders came by boat, stayed for the winter, and built the first stone houses near the ford. "
)
CHAT_MESSAGES = [
    "Hi! Can you tell me a fact about the ocean?",
    "Why is the sea salty?",
    "How deep is the deepest part?",
    "What lives down there?",
    "Do those animals ever come up?",
    "How do they handle the pressure?",
    "Could a submarine go there?",
    "Who was the first to reach the bottom?",
    "What did they see?",
    "Thanks! Can you sum up what we talked about?",
]


def median_seconds(run: Callable[[], float], repetitions: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    return statistics.median(run() for _ in range(repetitions))


def prompt_tokens(handle: ModelHandle, count: int) -> list[int]:
    """`count` tokens of ordinary prose (the same text the peers' scripts use)."""
    token_ids: list[int] = []
    text = BENCH_TEXT
    while len(token_ids) < count:
        token_ids = handle.encode(text)
        text += BENCH_TEXT
    return token_ids[:count]


def prefill_tokens_per_second(handle: ModelHandle, num_tokens: int = 512, repetitions: int = 3) -> float:
    """A fresh (uncached) prompt of `num_tokens`, up to its first sampled token."""
    prompt = prompt_tokens(handle, num_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    vocab_size = handle.engine.vocab_size
    runs = iter(range(1, 1 << 30))

    def run() -> float:
        # A first token of its own per run, so no run finds the last one's keys (or states) in the cache.
        fresh = [(prompt[0] + next(runs)) % vocab_size, *prompt[1:]]
        started = time.perf_counter()
        for _ in handle.engine.generate(GenerationRequest(fresh, params)):
            pass
        return time.perf_counter() - started

    return num_tokens / median_seconds(run, repetitions)


def decode_tokens_per_second(
    handle: ModelHandle, batch_size: int, num_tokens: int = 128, repetitions: int = 3
) -> float:
    """Aggregate tokens/s of `batch_size` sequences decoding together (prefill excluded)."""
    prompts = [prompt_tokens(handle, 24 + 3 * index) for index in range(batch_size)]  # different lengths
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    engine = handle.engine
    limit = engine.max_batch_size
    engine.max_batch_size = max(limit, batch_size)

    def run() -> float:
        for prompt in prompts:
            engine.add_request(GenerationRequest(prompt, params))
        while len(engine.running) < batch_size and engine.has_unfinished():
            engine.step()  # admits and prefills every sequence (a chunk budget per step)
        started, produced = time.perf_counter(), 0
        while engine.has_unfinished():
            produced += sum(1 for output in engine.step() if output.token_id is not None)
        return (time.perf_counter() - started) / max(produced, 1)

    try:
        return 1.0 / median_seconds(run, repetitions)
    finally:
        engine.max_batch_size = limit


def chat_time_to_first_token(handle: ModelHandle, reply_tokens: int = 48) -> dict[int, float]:
    """Seconds to the first reply text of each turn of a 10-turn chat (cache reused between turns)."""
    from ember.chat import Chat

    chat = Chat(handle, sampling_params=SamplingParams(temperature=0.0, max_tokens=reply_tokens))
    times: dict[int, float] = {}
    for turn, message in enumerate(CHAT_MESSAGES, start=1):
        started = time.perf_counter()
        reply = chat.send(message)
        for _piece in reply:
            times.setdefault(turn, time.perf_counter() - started)
        times.setdefault(turn, time.perf_counter() - started)
    return times
