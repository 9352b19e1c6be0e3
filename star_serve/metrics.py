"""Every Prometheus metric of star-serve, prefix `star_`, explicit buckets, bounded label sets.

The engine reports plain stats objects; this module is the one place that turns them into metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .adaptation import AdaptationHandle, TenantBank, load_entropy
from .adaptation.live import LiveQuality
from .engine.types import EngineStats, StepStats

LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
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
        self.adaptation_lag = Histogram(
            "star_adaptation_lag_seconds",
            "From a token being served to the commit of the version that folds in its statistics.",
            ["model"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.live_rollbacks = Counter(
            "star_adaptation_live_rollbacks",
            "Tenants rolled back to the trained bases because their served version scored worse than the trained "
            "bases on the same tokens of their own traffic (the live measurement, past its window).",
            ["model"],
            registry=r,
        )
        self.router_alignment = Gauge(
            "star_router_alignment",
            "Mean |cosine| of each linear-gate row with its expert's principal input direction, per layer.",
            ["model", "layer"],
            registry=r,
        )

    def observe_alignment(self, model: str, alignment: list[float | None]) -> None:
        for layer, value in enumerate(alignment):
            if value is not None:
                self.router_alignment.labels(model, str(layer)).set(value)

    def observe_step(self, model: str, stats: StepStats) -> None:
        self.batch_size.labels(model, stats.phase).observe(stats.batch_size)

    def watch_live(self, lives: Callable[[], Iterable[tuple[str, LiveQuality]]], top_tenants: int) -> None:
        """Reads the live loss of the `top_tenants` most measured tenants of each model at scrape time."""
        self.registry.register(_LiveCollector(lives, top_tenants))

    def watch_engines(self, engines: Callable[[], Iterable[tuple[str, EngineStats]]]) -> None:
        """Reads running and waiting counts from the engines at scrape time."""
        self.registry.register(_EngineCollector(engines))

    def watch_banks(self, banks: Callable[[], Iterable[tuple[str, TenantBank]]], limit: int) -> None:
        """Lists, at scrape time, the tenants whose bases each model holds on its device (`limit` at most)."""
        self.registry.register(_AffinityCollector(banks, limit))

    def watch_adapters(self, adapters: Callable[[], Iterable[tuple[str, AdaptationHandle]]], top_tenants: int) -> None:
        """Reads the adaptation counters from the adapters at scrape time, and the health of their
        `top_tenants` busiest tenants (the rest as one "other")."""
        self.registry.register(_AdaptationCollector(adapters, top_tenants))


class _AdaptationCollector(Collector):
    def __init__(self, adapters: Callable[[], Iterable[tuple[str, AdaptationHandle]]], top_tenants: int) -> None:
        self._adapters, self._top = adapters, top_tenants

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        steps = CounterMetricFamily("star_adaptation_steps", "GHA steps committed.", labels=["model"])
        batches = CounterMetricFamily(
            "star_adaptation_batches",
            "Statistics batches: published by this replica, dropped for want of room on the bus; "
            "as owner applied, duplicate, stale, frozen, refused (guardrails) or refused_quality (the quality gate).",
            labels=["model", "outcome"],
        )
        tokens = CounterMetricFamily(
            "star_adaptation_tokens",
            "Captured tokens: sampled, clipped (norm), rejected (non-finite), dropped (over budget).",
            labels=["model", "outcome"],
        )
        writes = CounterMetricFamily(
            "star_snapshot_writes",
            "Snapshot commits: ok, conflict (lost the compare-and-set).",
            labels=["model", "outcome"],
        )
        refused_steps = CounterMetricFamily(
            "star_adaptation_refused_steps", "GHA steps the guardrails refused.", labels=["model"]
        )
        stale_captures = CounterMetricFamily(
            "star_adaptation_stale_captures",
            "Captures taken against a version that a commit replaced meanwhile, not counted.",
            labels=["model"],
        )
        rollbacks = CounterMetricFamily("star_adaptation_rollbacks", "Rollbacks and resets.", labels=["model"])
        quality_rollbacks = CounterMetricFamily(
            "star_adaptation_quality_rollbacks",
            "Rollbacks to the trained bases by the quality gate: the served version scored worse than them.",
            labels=["model"],
        )
        resident = GaugeMetricFamily(
            "star_adaptation_tenants_resident",
            "Tenants whose adaptation state is in this replica's memory (at most STAR_ADAPTATION_MAX_TENANTS).",
            labels=["model"],
        )
        evicted = CounterMetricFamily(
            "star_adaptation_tenants_evicted",
            "Tenants forgotten here (least recently used or idle), to load again from the store when they return; "
            "uncommitted: their uncommitted sync-mode statistics went with them.",
            labels=["model", "kind"],
        )
        owned = GaugeMetricFamily(
            "star_adaptation_partition_owned",
            "1 for each statistics partition whose tenants' updates this replica owns (tenant -> partition: "
            "CRC-32 of the name mod the partitions; GET /v1/subspace names a tenant's owner).",
            labels=["model", "replica", "partition"],
        )
        store_errors = CounterMetricFamily("star_store_errors", "Failed snapshot-store operations.", labels=["model"])
        store_up = GaugeMetricFamily("star_store_up", "1 while the snapshot store answers.", labels=["model"])
        drift = GaugeMetricFamily(
            "star_tenant_drift",
            "Largest projection distance of a layer's basis from the trained one (busiest tenants, and other).",
            labels=["model", "tenant"],
        )
        explained = GaugeMetricFamily(
            "star_tenant_explained_variance",
            "Recent share of the tenant's router-input energy in its subspace, ||X V^T||^2 / ||X||^2.",
            labels=["model", "tenant"],
        )
        loss = GaugeMetricFamily(
            "star_tenant_loss",
            "The quality gate's last scores on the tenant's held-back prompts (nats/token; for a classifier, "
            "predictive entropy), with the bases it is served and with the trained ones (busiest tenants).",
            labels=["model", "tenant", "bases"],
        )
        for name, adapter in self._adapters():
            report = adapter.report(self._top)
            stats = report.stats
            steps.add_metric([name], stats.steps)
            for outcome in ("published", "applied", "duplicate", "stale", "frozen", "refused", "refused_quality"):
                batches.add_metric([name, outcome], stats.batches[outcome])
            batches.add_metric([name, "dropped"], report.bus_dropped)
            refused_steps.add_metric([name], stats.refused_steps)
            stale_captures.add_metric([name], stats.stale_captures)
            for outcome in ("sampled", "clipped", "rejected"):
                tokens.add_metric([name, outcome], getattr(stats.captured, outcome))
            tokens.add_metric([name, "dropped"], stats.captured.dropped + report.dropped_tokens)
            writes.add_metric([name, "ok"], stats.steps + stats.rollbacks)
            writes.add_metric([name, "conflict"], stats.commits_lost)
            rollbacks.add_metric([name], stats.rollbacks)
            quality_rollbacks.add_metric([name], stats.quality_rollbacks)
            store_errors.add_metric([name], stats.store_errors)
            resident.add_metric([name], report.resident)
            for partition in report.owned:
                owned.add_metric([name, report.replica, str(partition)], 1.0)
            evicted.add_metric([name, "clean"], stats.evicted - stats.evicted_uncommitted)
            evicted.add_metric([name, "uncommitted"], stats.evicted_uncommitted)
            store_up.add_metric([name], float(report.store_ok))
            for health in report.health:
                drift.add_metric([name, health.tenant], health.drift)
                if health.explained is not None:
                    explained.add_metric([name, health.tenant], health.explained)
                if health.loss is not None:
                    loss.add_metric([name, health.tenant, "served"], health.loss[0])
                    loss.add_metric([name, health.tenant, "trained"], health.loss[1])
        yield from (
            steps,
            batches,
            refused_steps,
            stale_captures,
            tokens,
            writes,
            rollbacks,
            quality_rollbacks,
            resident,
            evicted,
            owned,
            store_errors,
            store_up,
            drift,
            explained,
            loss,
        )


class _LiveCollector(Collector):
    def __init__(self, lives: Callable[[], Iterable[tuple[str, LiveQuality]]], top_tenants: int) -> None:
        self._lives, self._top = lives, top_tenants

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        loss = GaugeMetricFamily(
            "star_tenant_live_loss",
            "Next-token loss (nats/token) of the sampled prompts of a tenant's traffic since its current version: "
            "served, under that version; served_paired and trained_paired, on the prompts also routed with the "
            "trained bases (most measured tenants).",
            labels=["model", "tenant", "bases"],
        )
        tokens = GaugeMetricFamily(
            "star_tenant_live_tokens",
            "Tokens behind star_tenant_live_loss: all measured, and those paired with the trained bases.",
            labels=["model", "tenant", "kind"],
        )
        for name, live in self._lives():
            for tenant, record in live.top(self._top):
                if record.tokens:
                    loss.add_metric([name, tenant, "served"], record.served / record.tokens)
                if record.paired_tokens:
                    loss.add_metric([name, tenant, "served_paired"], record.paired_served / record.paired_tokens)
                    loss.add_metric([name, tenant, "trained_paired"], record.paired_trained / record.paired_tokens)
                tokens.add_metric([name, tenant, "measured"], record.tokens)
                tokens.add_metric([name, tenant, "paired"], record.paired_tokens)
        yield from (loss, tokens)


class _EngineCollector(Collector):
    def __init__(self, engines: Callable[[], Iterable[tuple[str, EngineStats]]]) -> None:
        self._engines = engines

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        running = GaugeMetricFamily("star_requests_running", "Sequences in the running batch.", labels=["model"])
        waiting = GaugeMetricFamily("star_requests_waiting", "Requests waiting for admission.", labels=["model"])
        kv_usage = GaugeMetricFamily(
            "star_kv_cache_usage_ratio",
            "Tokens held in the KV cache over its capacity (slots x context), 0 to 1.",
            labels=["model"],
        )
        routed = CounterMetricFamily(
            "star_expert_tokens", "Tokens each layer routed to each expert.", labels=["model", "layer", "expert"]
        )
        fraction = GaugeMetricFamily(
            "star_expert_load_fraction",
            "Recent share of a layer's tokens routed to each expert (over about the last 4096 tokens).",
            labels=["model", "layer", "expert"],
        )
        entropy = GaugeMetricFamily(
            "star_expert_load_entropy", "Entropy (nats) of a layer's recent expert load.", labels=["model", "layer"]
        )
        max_mean = GaugeMetricFamily(
            "star_expert_load_max_mean_ratio",
            "A layer's busiest expert's recent load over the mean load (1 when balanced).",
            labels=["model", "layer"],
        )
        prefix_queries = CounterMetricFamily(
            "star_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels=["model"]
        )
        prefix_hits = CounterMetricFamily(
            "star_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (cached under the bases they route with): prefill skipped.",
            labels=["model"],
        )
        prefix_usage = GaugeMetricFamily(
            "star_prefix_cache_usage_ratio", "Prefix-cache blocks in use over its blocks, 0 to 1.", labels=["model"]
        )
        for name, stats in self._engines():
            running.add_metric([name], stats.running)
            waiting.add_metric([name], stats.waiting)
            kv_usage.add_metric([name], stats.kv_cache_usage)
            prefix_queries.add_metric([name], stats.prefix_cache_queries)
            prefix_hits.add_metric([name], stats.prefix_cache_hits)
            prefix_usage.add_metric([name], stats.prefix_cache_usage)
            if stats.expert_load is None:
                continue
            total, recent = stats.expert_load  # (L, E) each
            for layer, (counts, load) in enumerate(zip(total.tolist(), recent, strict=True)):
                share = load / load.sum() if load.sum() > 0 else torch.full_like(load, 1 / len(load))
                for expert, (count, part) in enumerate(zip(counts, share.tolist(), strict=True)):
                    routed.add_metric([name, str(layer), str(expert)], count)
                    fraction.add_metric([name, str(layer), str(expert)], part)
                entropy.add_metric([name, str(layer)], load_entropy(load))
                max_mean.add_metric([name, str(layer)], float(share.max() * len(share)))
        yield from (
            running,
            waiting,
            kv_usage,
            prefix_queries,
            prefix_hits,
            prefix_usage,
            routed,
            fraction,
            entropy,
            max_mean,
        )


class _AffinityCollector(Collector):
    """`star_tenant_bases_info`, in the shape of vLLM's `vllm:lora_requests_info` (its label names, the scrape
    time as value), so that a gateway's endpoint picker that prefers the replica holding a request's adapter
    (the Gateway API Inference Extension's, with its LoRA-info metric name set to this one) prefers the replica
    holding a tenant's bases. A tenant's bases load on any replica on demand: this is an optimisation."""

    def __init__(self, banks: Callable[[], Iterable[tuple[str, TenantBank]]], limit: int) -> None:
        self._banks, self._limit = banks, limit

    def collect(self) -> Iterable[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "star_tenant_bases_info",
            "Tenants whose bases this replica holds on its device (running_lora_adapters, as MODEL:TENANT, the "
            "name a request may give as its model; the most recently routed first, bounded), and how many it can "
            "hold (max_lora); the value is the scrape time.",
            labels=["model", "running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        for name, bank in self._banks():
            tenants = ",".join(f"{name}:{tenant}" for tenant in bank.resident_tenants(self._limit))
            info.add_metric([name, tenants, "", str(bank.capacity)], time.time())
        yield info
