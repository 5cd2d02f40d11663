"""Prometheus metrics of the server (``GET /metrics``), in a registry of its own per app.

Requests by endpoint and status, request latency, time to first token, prompt and generated
token counters, generation tokens/s over the last steps, decode step time and batch rows,
the prefix cache's hits, misses, reused tokens and size, and the queue depth and active rows as
they are when scraped.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self, engine=None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("scalelm_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("scalelm_request_latency_seconds", "request start to last byte sent",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("scalelm_time_to_first_token_seconds", "sequence queued to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("scalelm_prompt_tokens", "prompt tokens prefilled (not those the prefix "
                                     "cache supplied)", registry=r)
        self.prefix_hits = Counter("scalelm_prefix_cache_hits", "prompts that reused cached prefix blocks",
                                   registry=r)
        self.prefix_misses = Counter("scalelm_prefix_cache_misses", "prompts that found no cached prefix block",
                                     registry=r)
        self.prefix_tokens = Counter("scalelm_prefix_cache_hit_tokens", "prompt tokens taken from the prefix "
                                     "cache instead of prefilled", registry=r)
        self.prefix_bytes = Gauge("scalelm_prefix_cache_bytes", "keys/values held by the prefix cache", registry=r)
        self.generation_tokens = Counter("scalelm_generation_tokens", "tokens generated", registry=r)
        self.step_seconds = Histogram("scalelm_decode_step_seconds", "time of one batched decode step",
                                      buckets=STEP_BUCKETS, registry=r)
        self.batch_rows = Histogram("scalelm_decode_batch_rows", "rows in a decode step",
                                    buckets=ROW_BUCKETS, registry=r)
        self.tps = Gauge("scalelm_generation_tokens_per_second",
                         f"tokens generated per second over the last {RATE_WINDOW_S:.0f} s", registry=r)
        self.tps.set_function(self._rate)
        self.queue_depth = Gauge("scalelm_queue_depth", "sequences waiting for a row", registry=r)
        self.active_rows = Gauge("scalelm_active_rows", "rows decoding now", registry=r)
        self._recent: deque = deque()  # (time, tokens) of recent steps
        self._lock = threading.Lock()
        if engine is not None:
            self.bind(engine)

    def bind(self, engine) -> None:
        self.queue_depth.set_function(lambda: engine.queued)
        self.active_rows.set_function(lambda: engine.active)
        self.prefix_bytes.set_function(lambda: engine.prefix.bytes if getattr(engine, "prefix", None) else 0)

    # called by the engine thread
    def step(self, rows: int, seconds: float) -> None:
        self.step_seconds.observe(seconds)
        self.batch_rows.observe(rows)

    def prefill(self, tokens: int, seconds: float) -> None:
        self.prompt_tokens.inc(tokens)

    def prefix(self, hit: bool, tokens: int) -> None:
        (self.prefix_hits if hit else self.prefix_misses).inc()
        self.prefix_tokens.inc(tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, n: int) -> None:
        self.generation_tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    # called by the app
    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
