"""Prometheus metrics for the server (`GET /metrics`).

Request-level figures (time to first token, time per output token, latency, token counts, requests
by status) are recorded by the handlers with labels `model` (the model that served the request) and
`experiment` (the A/B split it came through, or "none"), so each variant of a split can be compared.
Engine figures (queue length, running batch, KV-cache usage, prefix-cache hit rate) and a windowed
tokens/s are read from the engines when Prometheus scrapes, so they are never stale.

Each app owns its registry: several servers (or tests) in one process do not share counters.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LABELS = ("model", "experiment")
# Seconds; first-token times on a 2-core CPU reach seconds under load, per-token times tens of ms.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATE_WINDOW_S = 10.0

EngineStats = Callable[[], Mapping[str, float]]  # keys: queue_length, running, kv_usage, prefix_hit_rate


class _TokenRate:
    """Generated tokens per second over the last RATE_WINDOW_S seconds.

    Events older than the window are dropped as new ones arrive, not only when /metrics is read: a
    server nobody scrapes kept every token's event (~8 MB of a 10-minute soak's RSS growth)."""

    def __init__(self) -> None:
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._drop_before(now - RATE_WINDOW_S)
            self._events.append((now, n))

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._drop_before(now - RATE_WINDOW_S)
            return sum(n for _, n in self._events) / RATE_WINDOW_S

    def _drop_before(self, start: float) -> None:
        while self._events and self._events[0][0] < start:
            self._events.popleft()


class _EngineCollector(Collector):
    def __init__(self, engines: Mapping[str, EngineStats], rates: Mapping[str, _TokenRate]):
        self.engines, self.rates = engines, rates

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            "queue_length": GaugeMetricFamily(
                "lmstack_queue_length", "Requests waiting to be scheduled", labels=["model"]
            ),
            "running": GaugeMetricFamily(
                "lmstack_running_batch_size", "Sequences in the running batch", labels=["model"]
            ),
            "kv_usage": GaugeMetricFamily(
                "lmstack_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", labels=["model"]
            ),
            "prefix_hit_rate": GaugeMetricFamily(
                "lmstack_prefix_cache_hit_rate",
                "Fraction of prompt tokens served from the prefix cache",
                labels=["model"],
            ),
        }
        rate = GaugeMetricFamily(
            "lmstack_generation_tokens_per_second",
            f"Generated tokens/s over the last {RATE_WINDOW_S:g} s",
            labels=["model"],
        )
        for name, stats in self.engines.items():
            values = stats()
            for key, family in families.items():
                family.add_metric([name], float(values.get(key, 0.0)))
            rate.add_metric([name], self.rates[name].rate())
        yield from families.values()
        yield rate


class ServerMetrics:
    def __init__(self, engines: Mapping[str, EngineStats]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lmstack_requests", "Requests by endpoint and HTTP status", [*LABELS, "endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "lmstack_time_to_first_token_seconds", "Time to first token", LABELS, buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "lmstack_time_per_output_token_seconds",
            "Time per output token after the first",
            LABELS,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "lmstack_request_latency_seconds", "End-to-end request time", LABELS, buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("lmstack_prompt_tokens", "Prompt tokens processed", LABELS, registry=r)
        self.generation_tokens = Counter("lmstack_generation_tokens", "Tokens generated", LABELS, registry=r)
        self._rates = {name: _TokenRate() for name in engines}
        r.register(_EngineCollector(engines, self._rates))

    def request(self, model: str, experiment: str | None, endpoint: str, status: int) -> None:
        self.requests.labels(model, experiment or "none", endpoint, str(status)).inc()

    def progress(self, model: str, tokens: int) -> None:
        """Tokens just generated (feeds the windowed tokens/s as they stream, not when requests end)."""
        if tokens:
            self._rates[model].add(tokens)

    def finished(
        self,
        model: str,
        experiment: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        ttft: float | None,
        elapsed: float,
    ) -> None:
        """Record one completed generation (all its choices)."""
        labels = (model, experiment or "none")
        self.prompt_tokens.labels(*labels).inc(prompt_tokens)
        self.generation_tokens.labels(*labels).inc(completion_tokens)
        self.latency.labels(*labels).observe(elapsed)
        if ttft is not None:
            self.ttft.labels(*labels).observe(ttft)
            if completion_tokens > 1:
                self.tpot.labels(*labels).observe((elapsed - ttft) / (completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
