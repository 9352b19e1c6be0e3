"""The in-process implementation of `AdaptationHandle`: an `Adapter` on the server's event loop, its
forwards captured on a thread of this process (or, in sync mode, the routers' own update of the rows)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .bank import BatchRouter, TenantBank
from .bus import StatisticsBus
from .observer import ForwardSink, Observer, SyncObserver, SyncRouting
from .quality import QualityGate
from .store import SnapshotStore
from .worker import AdaptationConfig, AdaptationReport, Adapter


class LocalAdaptation:
    def __init__(
        self,
        model: str,
        trained: torch.Tensor,  # (L, E, D)
        bank: TenantBank,
        store: SnapshotStore,
        config: AdaptationConfig,
        bus: StatisticsBus | None = None,
        num_experts: int | None = None,
        gate: QualityGate | None = None,
    ) -> None:
        self.adapter = Adapter(model, trained, bank, store, config, bus, gate)
        self.bank = bank
        experts = num_experts or trained.shape[1]
        self._sink: ForwardSink
        self._routing: BatchRouter
        if config.mode == "sync":
            self._sink, self._routing = SyncObserver(self.adapter, experts), SyncRouting(bank, self.adapter)
        else:
            self._sink, self._routing = Observer(self.adapter, experts), bank

    @property
    def on_commit(self) -> Callable[[float], None] | None:
        return self.adapter.on_commit

    @on_commit.setter
    def on_commit(self, callback: Callable[[float], None] | None) -> None:
        self.adapter.on_commit = callback

    @property
    def sink(self) -> ForwardSink:
        return self._sink

    @property
    def routing(self) -> BatchRouter:
        return self._routing

    @property
    def store_ok(self) -> bool:
        return self.adapter.store_ok

    async def start(self) -> None:
        self.adapter.start()

    async def stop(self) -> None:
        await self.adapter.stop()

    async def ensure_loaded(self, tenant: str) -> None:
        # a tenant with a version of its own whose row the bank gave away for room gets it back
        await self.adapter.ensure_loaded(tenant, republish=self.bank.version(tenant) == 0)

    async def describe(self, tenant: str) -> dict[str, object]:
        return await self.adapter.describe(tenant)

    async def configure(self, tenant: str, frozen: bool | None, learning_rate: float | None) -> None:
        await self.adapter.configure(tenant, frozen, learning_rate)

    async def rollback(self, tenant: str, version: int | None) -> int:
        return await self.adapter.rollback(tenant, version)

    async def reset(self, tenant: str) -> int:
        return await self.adapter.reset(tenant)

    def report(self, top: int) -> AdaptationReport:
        return self.adapter.report(top)
