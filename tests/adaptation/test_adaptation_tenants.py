"""The adapter's tenant states are bounded: an LRU of `max_tenants`, forgetting the idle too, never a tenant
with statistics waiting to be published; a tenant forgotten and coming back continues from its latest
committed version, with its frozen flag and learning rate, all of which the store keeps; a tenant whose row
the bank gave away for room routes with its own version again from its next request."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import torch

from star_serve.adaptation import AdaptationConfig, Adapter, CaptureConfig, LocalDirStore, TenantBank
from star_serve.adaptation.local import LocalAdaptation
from star_serve.model import orthonormalize

L, E, D = 2, 4, 16
CONFIG = AdaptationConfig(mode="async", learning_rate=0.1, min_tokens=8, capture=CaptureConfig(max_token_norm=1e9))


def _adapter(tmp_path: Path, **config: object) -> Adapter:
    gen = torch.Generator().manual_seed(0)
    trained = torch.stack([orthonormalize(torch.randn(E, D, generator=gen)) for _ in range(L)])
    bank = TenantBank(trained, torch.device("cpu"), torch.float32)
    return Adapter("lm", trained, bank, LocalDirStore(tmp_path), replace(CONFIG, **config))  # type: ignore[arg-type]


def _observe(adapter: Adapter, tenant: str) -> None:
    state = adapter.tenants[tenant]
    bases = adapter.trained if state.bases is None else state.bases
    inputs = [torch.randn(16, D) for _ in range(L)]
    adapter.observe(tenant, state.version, bases, inputs, torch.full((L, E), 4))


def test_states_stay_within_max_tenants_least_recently_used_first(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path, max_tenants=3)

    async def scenario() -> None:
        for name in ("a", "b", "c"):
            await adapter.ensure_loaded(name)
        await adapter.ensure_loaded("a")  # used again: "b" is now the least recently used
        await adapter.ensure_loaded("d")
        assert list(adapter.tenants) == ["c", "a", "d"] and adapter.stats.evicted == 1
        for i in range(100):
            await adapter.ensure_loaded(f"t{i}")
        assert len(adapter.tenants) == 3 and adapter.stats.evicted == 101
        assert adapter.report(top=5).resident == 3

    asyncio.run(scenario())


def test_a_tenant_with_pending_statistics_is_kept_until_they_are_published(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path, max_tenants=2)

    async def scenario() -> None:
        await adapter.ensure_loaded("busy")
        _observe(adapter, "busy")  # pending, not yet published
        for name in ("x", "y", "z"):
            await adapter.ensure_loaded(name)
        assert "busy" in adapter.tenants and "busy" in adapter.pending  # over the limit, but not forgotten
        assert await adapter.step("busy")  # published and applied: nothing waits any more
        assert adapter.tenants["busy"].version == 1
        for name in ("v", "w"):  # two newer tenants: "busy", done, goes as any other would
            await adapter.ensure_loaded(name)
        assert list(adapter.tenants) == ["v", "w"]

    asyncio.run(scenario())


def test_an_idle_tenant_is_forgotten(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path, idle_seconds=0.05)

    async def scenario() -> None:
        await adapter.ensure_loaded("sleepy")
        adapter.tenants["sleepy"].used -= 1.0  # as if its last request were a second ago
        await adapter.ensure_loaded("awake")
        assert list(adapter.tenants) == ["awake"]

    asyncio.run(scenario())


def test_a_forgotten_tenant_returns_with_its_version_frozen_flag_and_learning_rate(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path, max_tenants=1)

    async def scenario() -> None:
        await adapter.ensure_loaded("acme")
        _observe(adapter, "acme")
        assert await adapter.step("acme")
        await adapter.configure("acme", frozen=True, learning_rate=0.01)
        bases = adapter.tenants["acme"].bases
        assert bases is not None
        await adapter.ensure_loaded("other")  # pushes "acme" out
        assert "acme" not in adapter.tenants

        state = await adapter.ensure_loaded("acme")
        assert state.version == 1 and state.frozen and state.learning_rate == 0.01
        assert state.bases is not None and torch.equal(state.bases, bases)
        _observe(adapter, "acme")  # frozen: its tokens make no statistics
        assert "acme" not in adapter.pending

    asyncio.run(scenario())


def test_a_tenant_whose_bank_row_was_given_away_routes_with_its_version_again(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    trained = torch.stack([orthonormalize(torch.randn(E, D, generator=gen)) for _ in range(L)])
    bank = TenantBank(trained, torch.device("cpu"), torch.float32, capacity=1)
    local = LocalAdaptation("lm", trained, bank, LocalDirStore(tmp_path), CONFIG)
    adapter = local.adapter

    async def scenario() -> None:
        await local.ensure_loaded("acme")
        _observe(adapter, "acme")
        assert await adapter.step("acme")
        bases = adapter.tenants["acme"].bases
        assert bases is not None and bank.lookup(["acme"]).versions == [1]
        bank.publish("other", trained.flip(1), version=3)
        assert bank.lookup(["other", "acme"]).versions == [3, 0]  # one row: acme's went to "other"

        await local.ensure_loaded("acme")  # its next request
        view = bank.lookup(["acme"])
        assert view.versions == [1] and view.routing.bank is not None
        assert torch.equal(view.routing.bank[0], bases)
        await local.ensure_loaded("acme")  # the bank holds it: nothing published again
        assert bank.lookup(["acme"]).versions == [1]

    asyncio.run(scenario())
