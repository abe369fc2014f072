"""Prometheus metrics of one frontend, in its own registry (no process-global state).

Per request the hot path touches a handful of counters and histograms (a few microseconds); nothing
is recorded per token. Live workers per model are read from the model registry at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)


class _LiveWorkers(Collector):
    def __init__(self, name: str, source: Callable[[], dict[str, int]]) -> None:
        self._name = name
        self._source = source

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self._name, "Live worker instances per model.", labels=["model"])
        for model, count in sorted(self._source().items()):
            family.add_metric([model], count)
        yield family


class FrontendMetrics:
    def __init__(
        self, prefix: str = "turbine", live_workers: Callable[[], dict[str, int]] | None = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        p = prefix
        self.requests = Counter(
            f"{p}_requests",
            "Requests by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.inflight = Gauge(f"{p}_inflight_requests", "Requests being served.", ["model"], registry=r)
        self.ttft = Histogram(
            f"{p}_time_to_first_token_seconds",
            "Time to first token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{p}_inter_token_latency_seconds",
            "Mean time between output tokens of a request.",
            ["model"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.duration = Histogram(
            f"{p}_request_duration_seconds",
            "Request duration.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.input_tokens = Histogram(
            f"{p}_input_sequence_tokens",
            "Prompt tokens per request.",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.output_tokens = Histogram(
            f"{p}_output_sequence_tokens",
            "Output tokens per request.",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens served.", ["model"], registry=r)
        self.cached_tokens = Counter(
            f"{p}_cached_tokens",
            "Prompt tokens the workers served from their prefix caches.",
            ["model"],
            registry=r,
        )
        self.routed = Counter(
            f"{p}_routing_decisions",
            "Requests routed, by chosen worker instance.",
            ["model", "worker"],
            registry=r,
        )
        self.overlap_blocks = Counter(
            f"{p}_routing_overlap_blocks",
            "Cached prefix blocks the router expected on its chosen workers.",
            ["model"],
            registry=r,
        )
        self.migrations = Counter(
            f"{p}_migrations",
            "Streams continued on another worker after theirs failed.",
            ["model"],
            registry=r,
        )
        self.rejections = Counter(
            f"{p}_rejections",
            "Requests refused with 503 (no worker free or reachable).",
            ["model"],
            registry=r,
        )
        if live_workers is not None:
            r.register(_LiveWorkers(f"{p}_live_workers", live_workers))

    def render(self) -> bytes:
        return generate_latest(self.registry)
