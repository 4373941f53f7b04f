"""Prometheus metrics, all under the `yan:` prefix (the vLLM convention), one registry per app."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "yan:requests",
            "HTTP requests served, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "yan:request_latency_seconds",
            "End-to-end latency of model requests",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "yan:queue_time_seconds",
            "Time a job waited for its batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_time = Histogram(
            "yan:batch_compute_seconds",
            "Model time per batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "yan:batch_size", "Jobs per model batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("yan:queue_depth", "Jobs waiting for a batch", registry=r)
        self.running = Gauge("yan:jobs_running", "Jobs in the batch on the model", registry=r)
        self.in_flight = Gauge("yan:http_in_flight", "HTTP requests being handled", registry=r)
        self.prompt_tokens = Counter("yan:prompt_tokens", "Source tokens read", registry=r)
        self.generated_tokens = Counter(
            "yan:generated_tokens", "Output tokens returned (before EOS)", registry=r
        )
        self.rejected = Counter(
            "yan:rejected",
            "Requests refused or dropped, by reason (oom: each model job that did not fit)",
            ["reason"],
            registry=r,
        )
        self.oom_splits = Counter(
            "yan:oom_splits", "Batches split in two after running out of memory", registry=r
        )
        self.ready = Gauge("yan:ready", "1 once weights are loaded and warmed up", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
