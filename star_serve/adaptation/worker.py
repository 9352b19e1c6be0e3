"""The adapter of one served model: from a tenant's tokens to a new committed version of its bases.

    engine thread                         event loop
    observe/take ─► pending (ingest.py) ─► bus.publish ┄┄► owner.py: bus.receive ─► plan_step ─► quality gate
                                                            ─► store.commit (CAS + batch ids)
                                                            ─► bus.ack, bank.publish, announce ┄┄► follower.py

`Adapter` wires its jobs around one record of the tenants (`tenants.py`): ingest (the engine's side and
publishing), the owner of some tenants' updates, the follower of the versions other replicas commit, the
admin calls, and in `sync` mode (STAR.md's paper-faithful variant, `sync.py`) the routers' own in-place
update and its commits instead of ingest. Every replica captures its own traffic; the bus (in-process, or
Redis Streams across replicas) brings each tenant's statistics batches to the single replica that owns
the tenant's updates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import torch

from .admin import AdaptationReport, Admin, TenantHealth
from .bank import BasesSink, RoutingPlan
from .bus import LocalBus, StatisticsBus
from .capture import ForwardStatistics
from .follower import Follower
from .ingest import Ingest
from .owner import Owner
from .pending import PendingStatistics
from .quality import HoldBack, QualityGate
from .store import SnapshotStore
from .sync import SyncAdapter, SyncUpdate
from .tenants import AdaptationConfig, AdaptationStats, Tenants, TenantState

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0  # seconds a shutdown waits for the adapter's tasks, then for its hand-over of statistics

__all__ = ["AdaptationConfig", "AdaptationReport", "AdaptationStats", "Adapter", "TenantHealth", "TenantState"]


class Adapter:
    def __init__(
        self,
        model: str,
        trained: torch.Tensor,  # (L, E, D)
        bank: BasesSink,
        store: SnapshotStore,
        config: AdaptationConfig,
        bus: StatisticsBus | None = None,
        gate: QualityGate | None = None,  # judges candidates as the owner; None: every step is committed
    ) -> None:
        self.model, self.bank, self.store, self.config = model, bank, store, config
        self.bus: StatisticsBus = bus or LocalBus()
        self.record = Tenants(model, trained, bank, store, config)
        self.ingest = Ingest(self.record, self.bus, gated=gate is not None)
        self.owner = Owner(self.record, self.bus, gate)
        self.follower = Follower(self.record)
        self.admin = Admin(self.record, self.bus)
        self.sync = SyncAdapter(self.record) if config.mode == "sync" else None
        self._tasks: list[asyncio.Future[None]] = []
        self._owner: asyncio.Future[None] | None = None

    # -- what the tests, benches and metrics read ----------------------------------------------------

    @property
    def trained(self) -> torch.Tensor:
        return self.record.trained

    @property
    def tenants(self) -> dict[str, TenantState]:
        return self.record.states

    @property
    def stats(self) -> AdaptationStats:
        return self.record.stats

    @property
    def pending(self) -> PendingStatistics:
        return self.record.pending

    @property
    def holdback(self) -> HoldBack:
        return self.ingest.holdback

    @property
    def store_ok(self) -> bool:
        return self.record.store_ok

    @property
    def on_commit(self) -> Callable[[float], None] | None:
        return self.record.on_commit

    @on_commit.setter
    def on_commit(self, callback: Callable[[float], None] | None) -> None:
        self.record.on_commit = callback

    @property
    def serving(self) -> bool:
        return self.record.serving

    # -- engine thread ---------------------------------------------------------------------------------

    def counted(self, tenant: str, served: int) -> int | None:
        return self.ingest.counted(tenant, served)

    def served_bases(self, tenant: str, version: int) -> torch.Tensor:
        return self.ingest.served_bases(tenant, version)

    def hold_back(self, tenant: str, ids: torch.Tensor) -> bool:
        return self.ingest.hold_back(tenant, ids)

    def take(self, tenants: list[str | None], stats: ForwardStatistics, load: torch.Tensor) -> None:
        self.ingest.take(tenants, stats, load)

    def observe(
        self, tenant: str, version: int, bases: torch.Tensor, inputs: list[torch.Tensor], load: torch.Tensor
    ) -> None:
        self.ingest.observe(tenant, version, bases, inputs, load)

    def adapting(self, tenants: list[str]) -> list[str]:
        return self.sync.adapting(tenants) if self.sync is not None else []

    def sync_update(self, plan: RoutingPlan, tenants: list[str], lengths: list[int]) -> SyncUpdate | None:
        return self.sync.update(plan, tenants, lengths) if self.sync is not None else None

    def synced(self, update: SyncUpdate | None, tenant: str, version: int, tokens: int, load: torch.Tensor) -> None:
        if self.sync is not None:
            self.sync.synced(update, tenant, version, tokens, load)

    # -- event loop ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.record.loop = asyncio.get_running_loop()
        jobs = [self.sync.run() if self.sync is not None else self.ingest.run(), self.follower.poll()]
        if self.follower.announced:
            jobs.append(self.follower.follow())
        self._owner = asyncio.ensure_future(self.owner.run())
        self._tasks = [self._owner, *(asyncio.ensure_future(job) for job in jobs)]

    async def stop(self) -> None:
        """Publishes what is pending (best effort), stops the tasks and gives up ownership, each within
        `STOP_TIMEOUT`: a shutdown never waits for good on a task stuck in a client library."""
        # The owner is let finish the read it is in (a poll interval at most): cancelled in the middle of a blocking
        # XREADGROUP, the Redis client was seen never to hand its connection back, and the task never to end.
        self.owner.stopping = True
        for task in self._tasks:
            if task is not self._owner:
                task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT)
            for task in stuck:
                task.cancel()
            if stuck:
                log.warning(
                    "%d adaptation tasks of %s did not stop in %.0f s: %s", len(stuck), self.model, STOP_TIMEOUT, stuck
                )
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.ingest.publish_all()
                await self.bus.close()
        except Exception:  # TimeoutError included
            log.warning("could not hand over pending statistics of %s on shutdown", self.model, exc_info=True)

    async def ensure_loaded(self, tenant: str, republish: bool = False) -> TenantState:
        """The tenant's state, with its latest committed version and its settings loaded on first use
        (`republish`: and published to the bank again, which lost it)."""
        return await self.record.ensure_loaded(tenant, republish)

    async def step(self, tenant: str) -> bool:
        """Folds the tenant's pending statistics into a new version here and now, bypassing the bus;
        True when one was committed."""
        await self.ensure_loaded(tenant)
        batch = self.ingest.take_batch(tenant)
        if batch is None:
            return False
        self.stats.batches["published"] += 1
        _, committed = await self.owner.apply(tenant, [batch])
        return committed

    async def flush(self) -> None:
        """Folds every tenant's statistics observed so far into committed versions (or refused steps)."""
        if self.sync is not None:
            with self.record.lock:
                due = [t for t in self.tenants if self.sync.due(t)]
            for tenant in due:
                await self.sync.commit(tenant)
            return
        with self.record.lock:
            due = [t for t in self.tenants if t in self.pending]
        for tenant in due:
            await self.step(tenant)

    # -- API -------------------------------------------------------------------------------------------

    async def describe(self, tenant: str) -> dict[str, object]:
        return await self.admin.describe(tenant)

    async def configure(self, tenant: str, frozen: bool | None, learning_rate: float | None) -> None:
        await self.admin.configure(tenant, frozen, learning_rate)

    async def rollback(self, tenant: str, version: int | None) -> int:
        return await self.admin.rollback(tenant, version)

    async def reset(self, tenant: str) -> int:
        return await self.admin.reset(tenant)

    def health(self, top: int) -> list[TenantHealth]:
        return self.admin.health(top)

    def report(self, top: int) -> AdaptationReport:
        return self.admin.report(top)
