"""Every Prometheus metric of star-serve, prefix `star_`, explicit buckets, bounded label sets.

The engine reports plain stats objects; this module is the one place that turns them into metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .engine.types import EngineStats, StepStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "star_time_to_first_token_seconds",
            "From arrival to the first generated token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "star_inter_token_latency_seconds",
            "Between consecutive streamed tokens of a sequence.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "star_request_duration_seconds",
            "From arrival to the last byte of the response.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "star_queue_time_seconds",
            "From arrival to the start of the request's first forward.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("star_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generated_tokens = Counter("star_generated_tokens", "Tokens generated.", ["model"], registry=r)
        self.batch_size = Histogram(
            "star_batch_size", "Sequences per forward.", ["model", "phase"], buckets=BATCH_BUCKETS, registry=r
        )
        self.requests = Counter(
            "star_requests", "Finished requests by outcome.", ["model", "endpoint", "outcome"], registry=r
        )
        self.errors = Counter("star_errors", "Error responses by type.", ["type"], registry=r)
        self.engine_up = Gauge("star_engine_up", "1 while the model's engine loop is alive.", ["model"], registry=r)

    def observe_step(self, model: str, stats: StepStats) -> None:
        self.batch_size.labels(model, stats.phase).observe(stats.batch_size)

    def watch_engines(self, engines: Callable[[], Iterable[tuple[str, EngineStats]]]) -> None:
        """Reads running and waiting counts from the engines at scrape time."""
        self.registry.register(_EngineCollector(engines))


class _EngineCollector(Collector):
    def __init__(self, engines: Callable[[], Iterable[tuple[str, EngineStats]]]) -> None:
        self._engines = engines

    def collect(self) -> Iterable[GaugeMetricFamily]:
        running = GaugeMetricFamily("star_requests_running", "Sequences in the running batch.", labels=["model"])
        waiting = GaugeMetricFamily("star_requests_waiting", "Requests waiting for admission.", labels=["model"])
        for name, stats in self._engines():
            running.add_metric([name], stats.running)
            waiting.add_metric([name], stats.waiting)
        yield running
        yield waiting
