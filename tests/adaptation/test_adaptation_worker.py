"""The adapter without a server: statistics in, guarded step, compare-and-set commit, bank published (not
in shadow mode); stale statistics dropped; an expert-load collapse, judged against the tenant's own
frozen routing, rolls the tenant back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from star_serve.adaptation import AdaptationConfig, Adapter, CaptureConfig, Guardrails, LocalDirStore, TenantBank
from star_serve.adaptation.bus import LocalBus, StatisticsBatch
from star_serve.adaptation.capture import capture
from star_serve.metrics import ServingMetrics
from star_serve.model import orthonormalize, projection_distances

L, E, D = 2, 4, 16


def _adapter(
    tmp_path: Path, config: AdaptationConfig | None = None, bus: LocalBus | None = None
) -> tuple[Adapter, TenantBank]:
    gen = torch.Generator().manual_seed(0)
    trained = torch.stack([orthonormalize(torch.randn(E, D, generator=gen)) for _ in range(L)])
    bank = TenantBank(trained, torch.device("cpu"), torch.float32)
    config = config or AdaptationConfig(
        mode="async", learning_rate=0.1, min_tokens=8, capture=CaptureConfig(max_token_norm=1e9)
    )
    return Adapter("lm", trained, bank, LocalDirStore(tmp_path), config, bus), bank


def _observe(adapter: Adapter, version: int, load: torch.Tensor | None = None) -> None:
    bases = adapter.trained if version == 0 else adapter.tenants["acme"].bases
    assert bases is not None
    inputs = [torch.randn(16, D) for _ in range(L)]
    adapter.observe("acme", version, bases, inputs, torch.full((L, E), 4) if load is None else load)


def test_statistics_make_a_committed_published_version(tmp_path: Path) -> None:
    adapter, bank = _adapter(tmp_path)

    async def scenario() -> None:
        await adapter.ensure_loaded("acme")
        _observe(adapter, 0)
        assert await adapter.step("acme")
        assert adapter.tenants["acme"].version == 1 and adapter.tenants["acme"].tokens_seen == 16
        moved = adapter.tenants["acme"].bases
        assert moved is not None and (moved - adapter.trained).abs().max() > 1e-4  # the statistics moved them
        view = bank.lookup(["acme", "other"])
        assert view.versions == [1, 0]
        stored = await adapter.store.latest("lm", "acme")
        assert stored is not None and torch.equal(stored.bases, adapter.tenants["acme"].bases)

        _observe(adapter, 0)  # taken against version 0, which is no longer the tenant's
        assert adapter.stats.stale_captures == 1 and "acme" not in adapter.pending

    asyncio.run(scenario())


def test_the_counters_reach_the_metrics(tmp_path: Path) -> None:
    bus = LocalBus(capacity=1)
    adapter, _ = _adapter(tmp_path, bus=bus)

    async def scenario() -> None:
        await adapter.ensure_loaded("acme")
        _observe(adapter, 0)
        assert await adapter.step("acme")
        _observe(adapter, 0)  # stale
        stats = capture(adapter.trained, [torch.randn(8, D) for _ in range(L)], 1, CaptureConfig(max_token_norm=1e9))
        for _ in range(2):  # the second pushes the first out of the full bus
            await bus.publish(StatisticsBatch("acme", stats, torch.ones(L, E), first_seen=time.time()))

    asyncio.run(scenario())
    metrics = ServingMetrics(CollectorRegistry())
    metrics.watch_adapters(lambda: [("lm", adapter)], top_tenants=10)
    samples = {
        (s.name, s.labels.get("outcome")): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
        if s.labels.get("model") == "lm"
    }
    assert samples[("star_adaptation_batches_total", "dropped")] == 1
    assert samples[("star_adaptation_stale_captures_total", None)] == 1
    assert samples[("star_adaptation_steps_total", None)] == 1
    assert samples[("star_adaptation_refused_steps_total", None)] == adapter.stats.refused_steps == 0


def test_an_expert_load_collapse_rolls_back(tmp_path: Path) -> None:
    adapter, _ = _adapter(tmp_path)

    async def scenario() -> None:
        await adapter.ensure_loaded("acme")
        _observe(adapter, 0)
        assert await adapter.step("acme")
        collapsed = torch.zeros(L, E, dtype=torch.long)
        collapsed[:, 0] = 16  # every token on expert 0: entropy 0
        _observe(adapter, 1, load=collapsed)
        assert not await adapter.step("acme")
        state = adapter.tenants["acme"]
        assert state.version == 2 and adapter.stats.rollbacks == 1
        assert torch.equal(state.bases, adapter.trained)  # version 1's predecessor: the trained bases

    asyncio.run(scenario())


def _narrow() -> torch.Tensor:
    """An expert load (L, E) of 16 tokens nearly all on expert 0: entropy 0.46 nats of a possible 1.39."""
    return torch.tensor([[14, 1, 1, 0]] * L)


def test_a_tenant_whose_traffic_always_routed_narrowly_is_not_rolled_back(tmp_path: Path) -> None:
    adapter, _ = _adapter(tmp_path)

    async def scenario() -> None:
        await adapter.ensure_loaded("acme")
        _observe(adapter, 0, load=_narrow())  # served by the trained bases: the tenant's frozen routing
        assert await adapter.step("acme")
        _observe(adapter, 1, load=_narrow())  # as narrow under its own bases: no collapse of adaptation's making
        assert await adapter.step("acme")
        assert adapter.tenants["acme"].version == 2 and adapter.stats.rollbacks == 0

    asyncio.run(scenario())


def test_the_frozen_routing_entropy_survives_a_restart(tmp_path: Path) -> None:
    adapter, _ = _adapter(tmp_path)

    async def first() -> list[float] | None:
        await adapter.ensure_loaded("acme")
        _observe(adapter, 0)
        assert await adapter.step("acme")
        return adapter.tenants["acme"].frozen_entropy

    frozen = asyncio.run(first())
    assert frozen is not None and len(frozen) == L
    restarted, _ = _adapter(tmp_path)  # the same store: the snapshot carries the tenant's frozen entropy

    async def second() -> None:
        await restarted.ensure_loaded("acme")
        assert restarted.tenants["acme"].frozen_entropy == frozen
        collapsed = torch.zeros(L, E, dtype=torch.long)
        collapsed[:, 0] = 16
        state = restarted.tenants["acme"]
        assert state.bases is not None
        restarted.observe("acme", 1, state.bases, [torch.randn(16, D) for _ in range(L)], collapsed)
        assert not await restarted.step("acme")
        assert restarted.stats.rollbacks == 1

    asyncio.run(second())


def test_shadow_mode_commits_versions_but_serves_the_trained_bases(tmp_path: Path) -> None:
    config = AdaptationConfig(mode="shadow", learning_rate=0.1, min_tokens=8, capture=CaptureConfig(max_token_norm=1e9))
    adapter, bank = _adapter(tmp_path, config)

    async def scenario() -> None:
        await adapter.ensure_loaded("acme")
        for version in (1, 2, 3):
            _observe(adapter, 0)  # always served by the trained bases, always counted against the latest version
            assert await adapter.step("acme")
            assert adapter.tenants["acme"].version == version
        assert adapter.stats.stale_captures == 0 and adapter.stats.rollbacks == 0
        moved = adapter.tenants["acme"].bases
        assert moved is not None and (moved - adapter.trained).abs().max() > 1e-4
        view = bank.lookup(["acme"])
        assert view.versions == [0] and view.rows == [0] and bank.resident() == 0
        stored = await adapter.store.latest("lm", "acme")
        assert stored is not None and stored.version == 3
        await adapter.rollback("acme", 1)  # a rollback is a new version, still not served
        assert adapter.tenants["acme"].version == 4 and bank.lookup(["acme"]).versions == [0]

    asyncio.run(scenario())


class _TimedBus(LocalBus):
    """The in-process bus, noting when each batch was published."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    async def publish(self, batch: StatisticsBatch) -> None:
        self.times.append(time.monotonic())
        await super().publish(batch)


def _timed_adapter(tmp_path: Path, min_tokens: int, min_interval: float) -> tuple[Adapter, _TimedBus]:
    capture = CaptureConfig(max_token_norm=1e9)
    bus = _TimedBus()
    adapter, _ = _adapter(
        tmp_path, AdaptationConfig(mode="async", min_tokens=min_tokens, min_interval=min_interval, capture=capture), bus
    )
    return adapter, bus


def test_a_busy_tenant_publishes_no_more_often_than_its_minimum_interval(tmp_path: Path) -> None:
    adapter, bus = _timed_adapter(tmp_path, min_tokens=8, min_interval=0.5)

    async def scenario() -> None:
        adapter.start()
        await adapter.ensure_loaded("acme")
        _observe(adapter, 0)  # a batch's worth: published at once
        deadline = time.monotonic() + 10
        while adapter.tenants["acme"].version < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        _observe(adapter, 1)  # another at once: held back until the interval has passed
        while len(bus.times) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await adapter.stop()

    asyncio.run(scenario())
    assert len(bus.times) == 2 and bus.times[1] - bus.times[0] >= 0.5


def test_a_tenants_drift_is_each_committed_layers_distance_from_the_trained_basis(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    trained = torch.stack([orthonormalize(torch.randn(E, D, generator=gen)) for _ in range(L)])
    guard = Guardrails(max_distance=0.02)  # layer 1's large steps reach the cap at once; layer 0's small ones do not
    config = AdaptationConfig(
        mode="async", learning_rate=0.1, min_tokens=8, capture=CaptureConfig(max_token_norm=1e9), guard=guard
    )
    bank = TenantBank(trained, torch.device("cpu"), torch.float32)
    adapter = Adapter("lm", trained, bank, LocalDirStore(tmp_path), config)

    async def scenario() -> list[list[float]]:
        await adapter.ensure_loaded("acme")
        seen = []
        for _ in range(4):
            state = adapter.tenants["acme"]
            bases = trained if state.bases is None else state.bases
            inputs = [scale * torch.randn(16, D, generator=gen) for scale in (0.3, 50.0)]
            adapter.observe("acme", state.version, bases, inputs, torch.full((L, E), 4))
            assert await adapter.step("acme")
            assert state.bases is not None and state.drifts is not None
            want = projection_distances(state.bases, trained)
            torch.testing.assert_close(torch.tensor(state.drifts, dtype=torch.float64), want)
            assert state.drift == max(state.drifts)
            seen.append(state.drifts)
        return seen

    seen = asyncio.run(scenario())
    assert seen[0][0] < seen[-1][0]  # layer 0 kept stepping
    assert seen[0][1] == seen[-1][1]  # layer 1 was refused after its first step, and kept its distance


def test_a_first_seen_tenant_publishes_only_once_it_has_a_batch(tmp_path: Path) -> None:
    adapter, bus = _timed_adapter(tmp_path, min_tokens=32, min_interval=0.0)

    async def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert condition()

    async def scenario() -> None:
        adapter.start()
        _observe(adapter, 0)  # 16 tokens of a tenant not yet loaded: the worker loads it
        await until(lambda: adapter.tenants["acme"].loaded)  # loading and what follows it run without a pause
        assert bus.times == [] and adapter.pending.tokens("acme") == 16  # half a batch waits
        _observe(adapter, 0)
        await until(lambda: adapter.tenants["acme"].version == 1)
        assert len(bus.times) == 1 and adapter.tenants["acme"].tokens_seen == 32
        await adapter.stop()

    asyncio.run(scenario())
