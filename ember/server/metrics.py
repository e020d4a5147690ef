"""Prometheus metrics for `GET /metrics`, in the server's own registry.

Counters and histograms are updated as requests and tokens pass; the
engine's state (queue, running sequences, cache use, preemptions) is read at
scrape time by a collector, so nothing polls the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _EngineCollector(Collector):
    """Reads the engine's queue, batch and cache figures when Prometheus scrapes."""

    def __init__(self, engine_getter: Callable[[], Any], active_requests: Callable[[], int]):
        self.engine_getter = engine_getter
        self.active_requests = active_requests

    def collect(self) -> Iterator[Any]:
        engine = self.engine_getter()
        yield GaugeMetricFamily("ember_model_loaded", "1 once the model is loaded", value=engine is not None)
        yield GaugeMetricFamily(
            "ember_active_requests",
            "HTTP requests waiting for or receiving tokens",
            value=self.active_requests(),
        )
        if engine is None:
            return
        cache = engine.kv_cache
        used = int(getattr(cache, "memory_bytes", 0))
        budget = int(getattr(cache, "memory_budget_bytes", 0))
        yield GaugeMetricFamily(
            "ember_queue_length", "requests waiting for admission", value=len(engine.waiting)
        )
        yield GaugeMetricFamily(
            "ember_running_sequences", "sequences being decoded", value=len(engine.running)
        )
        yield GaugeMetricFamily("ember_kv_cache_used_bytes", "KV cache memory allocated", value=used)
        yield GaugeMetricFamily("ember_kv_cache_budget_bytes", "KV cache memory budget", value=budget)
        yield GaugeMetricFamily(
            "ember_kv_cache_usage_ratio",
            "KV cache memory used / budget",
            value=used / budget if budget else 0.0,
        )
        yield GaugeMetricFamily(
            "ember_max_batch_size", "most sequences per step", value=engine.max_batch_size
        )
        yield GaugeMetricFamily("ember_context_length", "tokens per sequence", value=engine.context_length)
        yield CounterMetricFamily(
            "ember_preemptions",
            "running sequences paused because the cache budget ran out",
            value=getattr(engine, "num_preemptions", 0),
        )


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ember_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter("ember_prompt_tokens", "prompt tokens received", registry=self.registry)
        self.cached_prompt_tokens = Counter(
            "ember_cached_prompt_tokens", "prompt tokens reused from the cache", registry=self.registry
        )
        self.generated_tokens = Counter("ember_generation_tokens", "tokens generated", registry=self.registry)
        self.finished = Counter(
            "ember_finished_requests", "engine requests by finish reason", ["reason"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "ember_time_to_first_token_seconds",
            "from submission to the first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "ember_inter_token_latency_seconds",
            "between consecutive tokens of one request",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decode_batch_size = Histogram(
            "ember_decode_batch_size",
            "sequences running when each token was produced",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_timeouts = Counter(
            "ember_queue_timeouts",
            "requests refused after waiting past --queue-timeout",
            registry=self.registry,
        )
        self.loading = Gauge("ember_loading", "1 while the model loads", registry=self.registry)

    def watch_engine(self, engine_getter: Callable[[], Any], active_requests: Callable[[], int]) -> None:
        self.registry.register(_EngineCollector(engine_getter, active_requests))

    def render(self) -> bytes:
        return generate_latest(self.registry)
