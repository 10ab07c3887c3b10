"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per app."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters and histograms the request handlers update; gauges read from the engine when scraped."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "neoxja_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.cancelled = Counter(
            "neoxja_requests_cancelled", "Requests whose client went away before the end", registry=r
        )
        self.prompt_tokens = Counter("neoxja_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("neoxja_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "neoxja_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "neoxja_inter_token_latency_seconds",
            "Between consecutive tokens of one sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "neoxja_request_duration_seconds",
            "From arrival to the last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("neoxja_queue_depth", "Sequences waiting for a KV slot", registry=r)
        self.running = Gauge("neoxja_running_sequences", "Sequences in the running batch", registry=r)
        self.slots_used = Gauge("neoxja_kv_slots_used", "KV-cache slots held by sequences", registry=r)
        self.slots_total = Gauge("neoxja_kv_slots_total", "KV-cache slots allocated", registry=r)

    def watch(self, engine: Any) -> None:
        """Read the gauges from ``engine`` at every scrape."""
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.running.set_function(lambda: engine.decoding)
        self.slots_used.set_function(lambda: engine.pool.used)
        self.slots_total.set(engine.pool.num_slots)
