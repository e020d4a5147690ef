"""Benchmark: N sessions replying at once through the sessions API vs N `/v1/chat/completions` streams.

    python -m ember.server.sessions_benchmark                 # starts its own `ember serve` (smollm2)
    python -m ember.server.sessions_benchmark --url http://127.0.0.1:8000 --sessions 8 --max-tokens 128

Both phases send the same prompt with greedy sampling and `ignore_eos`, so
every stream generates exactly `--max-tokens` tokens; the aggregate rate is
all completion tokens over the phase's wall time. While a phase runs, /metrics
is sampled for `ember_running_sequences` (the engine's batch): a maximum above
1 shows the sessions decode in shared batches. Target (issue 12): the
sessions' aggregate rate within 20 % of the completions'. This is a
measurement, not a test: run it alone on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

PROMPT = "Write a long story about a lighthouse keeper and a storm."
TARGET_RATIO = 0.8  # sessions' aggregate rate / completions' aggregate rate


@contextmanager
def _server(model: str, api_key: str | None) -> Iterator[str]:
    """A private `ember serve` on a free loopback port (its own data directory), stopped afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="ember-sessions-bench-") as data_dir:
        command = [sys.executable, "-m", "ember.cli.main", "serve", "--model", model, "--port", str(port)]
        command += [
            "--host",
            "127.0.0.1",
            "--data-dir",
            data_dir,
            *(["--api-key", api_key] if api_key else []),
        ]
        environment = {key: value for key, value in os.environ.items() if key != "EMBER_API_KEY"}
        process = subprocess.Popen(
            command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                raise SystemExit(f"ember serve did not get ready (exit status {process.poll()})")
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _session_reply(client: httpx.Client, session_id: str) -> int:
    body = {"content": PROMPT, "stream": True}
    with client.stream("POST", f"/v1/sessions/{session_id}/messages", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "done":
                    return event["usage"]["completion_tokens"]
                if event["type"] == "error":
                    raise RuntimeError(event["error"]["message"])
    raise RuntimeError("the session stream ended without a done event")


def _completion_stream(client: httpx.Client, max_tokens: int) -> int:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                return chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                chunks += 1
    return chunks


def _running_sequences(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("ember_running_sequences "):
            return float(line.split()[1])
    return 0.0


def _phase(
    client_factory: Callable[[], httpx.Client], jobs: list[Callable[[httpx.Client], int]]
) -> dict[str, Any]:
    """Run the jobs at once (one thread and client each); tokens, seconds and the largest batch seen."""
    barrier = threading.Barrier(len(jobs) + 1)
    tokens: list[int] = []
    failures: list[str] = []
    done = threading.Event()
    largest = [0.0]

    def run(job: Callable[[httpx.Client], int]) -> None:
        with client_factory() as client:
            barrier.wait()
            try:
                tokens.append(job(client))
            except Exception as error:  # reported, the other streams go on
                failures.append(f"{type(error).__name__}: {error}")

    def sample() -> None:
        with client_factory() as client:
            while not done.is_set():
                try:
                    largest[0] = max(largest[0], _running_sequences(client))
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    sampler = threading.Thread(target=sample, daemon=True)
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    sampler.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join(timeout=5)
    total = sum(tokens)
    return {
        "streams": len(jobs),
        "completed": len(tokens),
        "failures": failures,
        "tokens": total,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(total / seconds, 1) if seconds else 0.0,
        "max_running_sequences": largest[0],
    }


def run(base_url: str, sessions: int, max_tokens: int, api_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def client_factory() -> httpx.Client:
        return httpx.Client(base_url=base_url, headers=headers, timeout=600)

    settings = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
    with client_factory() as client:
        ids = [
            client.post("/v1/sessions", json={"title": f"bench {n}", "settings": settings}).json()["id"]
            for n in range(sessions + 1)
        ]
        _session_reply(client, ids.pop())  # warm-up: kernels built, template compiled
        _completion_stream(client, 8)
    session_phase = _phase(client_factory, [lambda c, i=i: _session_reply(c, i) for i in ids])
    completion_phase = _phase(client_factory, [lambda c: _completion_stream(c, max_tokens)] * sessions)
    ratio = (
        session_phase["tokens_per_second"] / completion_phase["tokens_per_second"]
        if completion_phase["tokens_per_second"]
        else 0.0
    )
    return {
        "sessions": session_phase,
        "chat_completions": completion_phase,
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO and session_phase["max_running_sequences"] > 1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ember.server.sessions_benchmark", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--url", default=None, help="a running ember serve (default: start one)")
    parser.add_argument("--model", default="smollm2", help="the model of the server this starts")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--sessions", type=int, default=8, help="concurrent streams per phase")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens each stream generates")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.max_tokens < 1:
        parser.error("--sessions and --max-tokens must be at least 1")
    if args.url:
        result = run(args.url.rstrip("/"), args.sessions, args.max_tokens, args.api_key)
    else:
        with _server(args.model, args.api_key) as base_url:
            result = run(base_url, args.sessions, args.max_tokens, args.api_key)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("sessions", "chat_completions"):
            phase = result[name]
            print(
                f"{name:>17}: {phase['completed']}/{phase['streams']} streams, {phase['tokens']} tokens in "
                f"{phase['seconds']:.2f} s = {phase['tokens_per_second']:.1f} tokens/s, "
                f"largest batch seen {phase['max_running_sequences']:g}"
            )
            for failure in phase["failures"]:
                print(f"{'':>19}failed: {failure}")
        verdict = "meets" if result["meets_target"] else "misses"
        print(f"sessions / completions = {result['ratio']:.2f} ({verdict} the target >= {TARGET_RATIO})")
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
