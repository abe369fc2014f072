"""Prometheus metrics of one frontend, in its own registry (no process-global state).

Per request the hot path touches a handful of counters and histograms (a few microseconds); nothing
is recorded per token. Live workers per model are read from the model registry at scrape time.
Both edges (HTTP and KServe gRPC) record a served request through `RequestMetrics`, so the two count
alike; their `requests` samples differ only in the endpoint label and the status (HTTP status, or the
gRPC status code's name).

With `--num-processes N` every process records into prometheus_client's multiprocess files (the
supervisor sets PROMETHEUS_MULTIPROC_DIR for its children) and `aggregate_processes` makes /metrics
of any process sum all of them; the gauges read at scrape time (live workers, router load and
queues) come from the answering process, whose routers count every process's load (local replica
sync).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from turbine.router.health import HealthCounts
from turbine.router.queue import WAIT_BUCKETS, WaitStats

if TYPE_CHECKING:
    from turbine.frontend.pipeline import Generation

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


# (model, worker instance id) -> (active requests, active prefill tokens), as a router counts them.
RouterLoads = dict[tuple[str, int], tuple[int, int]]


class _RouterLoad(Collector):
    """Each load-aware router's view of its workers' active load (with --router-replica-sync it
    includes the requests other frontends routed there)."""

    def __init__(self, prefix: str, source: Callable[[], RouterLoads]) -> None:
        self._prefix = prefix
        self._source = source

    def collect(self) -> Iterable[Metric]:
        labels = ["model", "worker"]
        requests = GaugeMetricFamily(
            f"{self._prefix}_router_active_requests",
            "Active requests per worker, as the router counts them.",
            labels=labels,
        )
        prefill = GaugeMetricFamily(
            f"{self._prefix}_router_active_prefill_tokens",
            "Prompt tokens routed to a worker and not yet prefilled, as the router counts them.",
            labels=labels,
        )
        for (model, worker), (active, tokens) in sorted(self._source().items()):
            requests.add_metric([model, f"{worker:x}"], active)
            prefill.add_metric([model, f"{worker:x}"], tokens)
        yield requests
        yield prefill


class RoutingStats(NamedTuple):
    """One model's routing state beyond load: its router queue (None without one) and sessions."""

    queued: int
    waits: WaitStats | None
    session_bindings: int | None


# model -> its routing stats.
RouterQueues = dict[str, RoutingStats]


class _RouterQueue(Collector):
    """Each model's router queue (`--router-queue-threshold`): its length and how long requests
    waited in it (0 for those routed at once); and its live session bindings (with session
    affinity)."""

    def __init__(self, prefix: str, source: Callable[[], RouterQueues]) -> None:
        self._prefix = prefix
        self._source = source

    def collect(self) -> Iterable[Metric]:
        length = GaugeMetricFamily(
            f"{self._prefix}_router_queue_length", "Requests waiting in the router queue.", labels=["model"]
        )
        waits = HistogramMetricFamily(
            f"{self._prefix}_router_queue_wait_seconds",
            "Time requests spent in the router queue before being routed.",
            labels=["model"],
        )
        sessions = GaugeMetricFamily(
            f"{self._prefix}_router_session_bindings",
            "Sessions bound to a worker (session affinity), including those bound by peer replicas.",
            labels=["model"],
        )
        for model, (queued, stats, bindings) in sorted(self._source().items()):
            if bindings is not None:
                sessions.add_metric([model], bindings)
            if stats is None:
                continue
            length.add_metric([model], queued)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*map(str, WAIT_BUCKETS), "+Inf"), stats.bucket_counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            waits.add_metric([model], buckets, stats.total_s)
        yield length
        yield waits
        yield sessions


class _Health(Collector):
    """Per model: streams failed by a silent worker, workers taken out of routing after a stall or
    a failed canary, workers out of routing now, failed canaries (read at scrape time)."""

    def __init__(self, prefix: str, source: Callable[[], dict[str, HealthCounts]]) -> None:
        self._prefix = prefix
        self._source = source

    def collect(self) -> Iterable[Metric]:
        p = self._prefix
        stalls = CounterMetricFamily(
            f"{p}_request_stalls", "Streams failed because their worker went silent.", labels=["model"]
        )
        quarantines = CounterMetricFamily(
            f"{p}_worker_quarantines",
            "Times a stalled worker or one failing canaries was taken out of routing.",
            labels=["model"],
        )
        quarantined = GaugeMetricFamily(
            f"{p}_quarantined_workers", "Workers routing skips right now.", labels=["model"]
        )
        canaries = CounterMetricFamily(
            f"{p}_health_check_failures",
            "Canary requests (--health-check-interval-s) that failed or timed out.",
            labels=["model"],
        )
        for model, counts in sorted(self._source().items()):
            stalls.add_metric([model], counts.stalls)
            quarantines.add_metric([model], counts.quarantines)
            quarantined.add_metric([model], counts.quarantined)
            canaries.add_metric([model], counts.canary_failures)
        yield stalls
        yield quarantines
        yield quarantined
        yield canaries


class FrontendMetrics:
    def __init__(
        self,
        prefix: str = "turbine",
        live_workers: Callable[[], dict[str, int]] | None = None,
        router_loads: Callable[[], RouterLoads] | None = None,
        router_queues: Callable[[], RouterQueues] | None = None,
        health: Callable[[], dict[str, HealthCounts]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._scraped = self.registry  # what render() serializes (see aggregate_processes)
        self._series: dict[str, ModelSeries] = {}
        r = self.registry
        p = prefix
        self.requests = Counter(
            f"{p}_requests",
            "Requests by model, endpoint and status (HTTP status, or gRPC status code name).",
            ["model", "endpoint", "status"],
            registry=r,
        )
        # livesum: across processes, the sum over the live ones (a dead one serves nothing).
        self.inflight = Gauge(
            f"{p}_inflight_requests",
            "Requests being served.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
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
        self._live: list[Collector] = []
        if live_workers is not None:
            self._live.append(_LiveWorkers(f"{p}_live_workers", live_workers))
        if router_loads is not None:
            self._live.append(_RouterLoad(p, router_loads))
        if router_queues is not None:
            self._live.append(_RouterQueue(p, router_queues))
        if health is not None:
            self._live.append(_Health(p, health))
        for collector in self._live:
            r.register(collector)

    def aggregate_processes(self, directory: str) -> None:
        """Serve the sum of every process's recorded metrics from prometheus_client's multiprocess
        `directory` (this process runs in multiprocess mode: PROMETHEUS_MULTIPROC_DIR is set to it),
        plus this process's scrape-time gauges."""
        scraped = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(scraped, path=directory)  # type: ignore[no-untyped-call]
        for collector in self._live:
            scraped.register(collector)
        self._scraped = scraped

    def render(self) -> bytes:
        return generate_latest(self._scraped)

    def count(self, model: str, endpoint: str, status: str, *, rejected: bool = False) -> None:
        """One finished request at an edge; `rejected`: refused for want of a worker (HTTP 503,
        gRPC UNAVAILABLE), counted per model too."""
        self.requests.labels(model, endpoint, status).inc()
        if rejected and model:
            self.rejections.labels(model).inc()

    def serving(self, model: str) -> RequestMetrics:
        """Start recording one request that has been preprocessed and is about to be routed."""
        return RequestMetrics(self, model)

    def series(self, model: str) -> ModelSeries:
        found = self._series.get(model)
        if found is None:
            found = self._series[model] = ModelSeries(self, model)
        return found


class ModelSeries:
    """One model's series of the per-request metrics, looked up once: `labels()` builds a key and
    takes a lock on every call, and a request recorded about a dozen of them (a tenth of the
    frontend's own time per request in front of a fast upstream)."""

    __slots__ = (
        "cached_tokens",
        "duration",
        "inflight",
        "input_tokens",
        "itl",
        "migrations",
        "output_tokens",
        "overlap_blocks",
        "prompt_tokens",
        "ttft",
    )

    def __init__(self, m: FrontendMetrics, model: str) -> None:
        self.inflight = m.inflight.labels(model)
        self.ttft = m.ttft.labels(model)
        self.itl = m.itl.labels(model)
        self.duration = m.duration.labels(model)
        self.input_tokens = m.input_tokens.labels(model)
        self.output_tokens = m.output_tokens.labels(model)
        self.prompt_tokens = m.prompt_tokens.labels(model)
        self.cached_tokens = m.cached_tokens.labels(model)
        self.overlap_blocks = m.overlap_blocks.labels(model)
        self.migrations = m.migrations.labels(model)


class RequestMetrics:
    """One request's serving metrics, from routing to its end: in flight from construction until
    `finish` (which must be called exactly once, in a `finally`), time to first token, routing, and
    at the end duration, prompt/output/cached token counts, inter-token latency and migrations."""

    __slots__ = ("_first_seen", "_metrics", "_model", "_series", "_started")

    def __init__(self, metrics: FrontendMetrics, model: str) -> None:
        self._metrics = metrics
        self._model = model
        self._series = metrics.series(model)
        self._started = time.perf_counter()
        self._first_seen = False
        self._series.inflight.inc()

    def first_token(self, gens: Sequence[Generation]) -> None:
        """The first output arrived (for n > 1: every choice's): TTFT, and where the choices went."""
        if self._first_seen:
            return
        self._first_seen = True
        series = self._series
        series.ttft.observe(time.perf_counter() - self._started)
        for gen in gens:
            if gen.decision is not None:
                self._metrics.routed.labels(self._model, f"{gen.decision.instance_id:x}").inc()
                series.overlap_blocks.inc(gen.decision.overlap_blocks)

    def finish(self, gens: Sequence[Generation]) -> None:
        """The request ended (served, failed or cancelled); `gens` are its choices."""
        series = self._series
        series.inflight.dec()
        series.duration.observe(time.perf_counter() - self._started)
        if not gens:
            return
        # One prompt, n completions: the prompt counts once (as the usage object does).
        prompt = gens[0].prompt_tokens
        series.input_tokens.observe(prompt)
        series.output_tokens.observe(sum(g.completion_tokens for g in gens))
        series.prompt_tokens.inc(prompt)
        series.cached_tokens.inc(gens[0].cached_tokens)
        for gen in gens:
            itl = gen.post.inter_token_latency_s
            if itl is not None:
                series.itl.observe(itl)
        migrations = sum(g.migrations for g in gens)
        if migrations:
            series.migrations.inc(migrations)
