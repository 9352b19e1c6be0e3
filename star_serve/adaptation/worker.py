"""The adapter of one served model: from a tenant's tokens to a new committed version of its bases.

    engine thread                      event loop (worker task)
    observe(tenant, version, inputs) ─► pending statistics ─► guarded GHA step ─► store.commit (CAS)
                                                                                 └► bank.publish

Statistics are taken against the version that served the tokens; statistics of an older version than
the tenant's current one are stale and dropped (counted), so a step is always exact for its basis.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..model.gha import orthogonality_defect, projection_distance
from .bank import TenantBank
from .capture import CaptureConfig, CaptureCounts, LayerStatistics, capture
from .guardrails import Guardrails, guarded_step, load_entropy
from .store import Snapshot, SnapshotStore

log = logging.getLogger(__name__)


class CommitConflict(Exception):
    """A compare-and-set commit lost to another writer; the caller may retry."""


@dataclass(frozen=True)
class AdaptationConfig:
    mode: Literal["async", "off"] = "async"
    learning_rate: float = 0.05  # default test-time learning rate of a tenant
    min_tokens: int = 64  # statistics of at least this many tokens make a step
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    guard: Guardrails = field(default_factory=Guardrails)
    poll_interval: float = 2.0  # seconds between confirmations of the latest versions in the store


@dataclass
class TenantState:
    version: int = 0
    bases: torch.Tensor | None = None  # (L, E, D); None: the trained bases
    learning_rate: float = 0.05
    frozen: bool = False
    tokens_seen: int = 0
    updated: float | None = None
    pending: LayerStatistics | None = None
    load: torch.Tensor | None = None  # (L, E) tokens per expert since the last commit
    loaded: bool = False  # the store has been asked for this tenant's latest version


@dataclass
class AdaptationStats:
    steps: int = 0
    rejected_steps: int = 0
    stale: int = 0
    commits_lost: int = 0  # compare-and-set lost to another writer
    store_errors: int = 0
    rollbacks: int = 0
    captured: CaptureCounts = field(default_factory=CaptureCounts)


class Adapter:
    def __init__(
        self,
        model: str,
        trained: torch.Tensor,  # (L, E, D)
        bank: TenantBank,
        store: SnapshotStore,
        config: AdaptationConfig,
    ) -> None:
        self.model, self.bank, self.store, self.config = model, bank, store, config
        self.trained = trained.detach().float().cpu()
        self.tenants: dict[str, TenantState] = {}
        self.stats = AdaptationStats()
        self._lock = threading.Lock()
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Future[None]] = []
        self.store_ok = True  # the last store operation succeeded

    # -- engine thread -----------------------------------------------------------------------------

    def observe(
        self, tenant: str, version: int, bases: torch.Tensor, inputs: list[torch.Tensor], load: torch.Tensor
    ) -> None:
        """Takes one forward's tokens of `tenant`: `inputs` L x (n, D) routed with `bases` (L, E, D) of
        `version`; `load` (L, E) counts their tokens per expert."""
        if self.config.mode == "off":
            return
        with self._lock:
            state = self.tenants.setdefault(tenant, TenantState(learning_rate=self.config.learning_rate))
            state.load = load.cpu() if state.load is None else state.load + load.cpu()
            if version != state.version:
                self.stats.stale += 1
                if state.bases is not None and version == 0:  # evicted from the bank: bring it back
                    self.bank.publish(tenant, state.bases, state.version)
                return
            if state.frozen:
                return
        stats = capture(bases, inputs, version, self.config.capture)  # only for tokens that will count
        with self._lock:
            self.stats.captured += stats.counts
            if version != state.version:  # a commit landed while capturing
                self.stats.stale += 1
                return
            if state.pending is not None and state.pending.version != version:  # taken against a replaced basis
                self.stats.stale += 1
                state.pending = None
            state.pending = stats if state.pending is None else state.pending + stats
            ready = state.pending.tokens >= self.config.min_tokens or not state.loaded
        if ready and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    # -- event loop --------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.ensure_future(self._run()), asyncio.ensure_future(self._poll())]
        if hasattr(self.store, "announcements"):
            self._tasks.append(asyncio.ensure_future(self._follow()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self) -> None:
        """Adopts versions that other replicas commit, as their announcements arrive."""
        while True:
            try:
                async for tenant, version in self.store.announcements(self.model):  # type: ignore[attr-defined]
                    self.store_ok = True
                    await self._refresh(tenant, version)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._store_failed("following announcements")
                await asyncio.sleep(self.config.poll_interval)

    async def _poll(self) -> None:
        """Confirms by polling what announcements may have missed (a dropped connection, a restart)."""
        while True:
            await asyncio.sleep(self.config.poll_interval)
            if not await self.store.ping():
                self._store_failed("pinging")
                continue
            self.store_ok = True
            with self._lock:
                tenants = [t for t, s in self.tenants.items() if s.loaded]
            for tenant in tenants:
                try:
                    versions = await self.store.versions(self.model, tenant)
                    self.store_ok = True
                except Exception:
                    self._store_failed("polling versions")
                    break
                if versions:
                    await self._refresh(tenant, versions[-1])

    async def _refresh(self, tenant: str, version: int) -> None:
        with self._lock:
            state = self.tenants.get(tenant)
            if state is None or version <= state.version:
                return
        snapshot = await self.store.load(self.model, tenant, version)
        if snapshot is None:
            return
        with self._lock:
            if snapshot.version > state.version:
                self._adopt(tenant, state, snapshot)

    def _store_failed(self, doing: str) -> None:
        if self.store_ok:
            log.warning("snapshot store unavailable while %s; serving cached bases", doing, exc_info=True)
        self.store_ok = False
        self.stats.store_errors += 1

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            with self._lock:
                due = [t for t, s in self.tenants.items() if self._due(s)]
            for tenant in due:
                try:
                    await self.step(tenant)
                except Exception:
                    log.exception("adaptation step of %s/%s failed", self.model, tenant)
            if not self.store_ok:  # retry pending commits once the store is back, without spinning
                await asyncio.sleep(self.config.poll_interval)
                self._wakeup.set()

    def _due(self, state: TenantState) -> bool:
        return not state.loaded or (state.pending is not None and state.pending.tokens >= self.config.min_tokens)

    async def ensure_loaded(self, tenant: str) -> TenantState:
        """The tenant's state, with its latest committed version loaded from the store on first use."""
        with self._lock:
            state = self.tenants.setdefault(tenant, TenantState(learning_rate=self.config.learning_rate))
            if state.loaded:
                return state
        try:
            snapshot = await self.store.latest(self.model, tenant)
            self.store_ok = True
        except Exception:  # keep serving what is cached; the next request or the worker tries again
            self._store_failed(f"loading {tenant}")
            return state
        with self._lock:
            if not state.loaded and snapshot is not None and snapshot.version > state.version:
                self._adopt(tenant, state, snapshot)
            state.loaded = True
        return state

    async def step(self, tenant: str) -> bool:
        """Folds the tenant's pending statistics into a new version; True when one was committed."""
        state = await self.ensure_loaded(tenant)
        with self._lock:
            stats, state.pending = state.pending, None
            load, state.load = state.load, None
            current = self.trained if state.bases is None else state.bases
            version, lr = state.version, state.learning_rate
        if stats is None or stats.version != version or stats.tokens == 0:
            return False
        if load is not None and min(load_entropy(row) for row in load) < self.config.guard.entropy_floor:
            await self.rollback(tenant, None)
            return False
        new, report = guarded_step(self.trained, current, stats, lr, self.config.guard)
        if not report.any_applied:
            self.stats.rejected_steps += 1
            return False
        snapshot = Snapshot(self.model, tenant, version + 1, new, meta={"learning_rate": repr(lr)})
        try:
            committed = await self.store.commit(snapshot, expected=version)
            self.store_ok = True
        except Exception:
            self._store_failed(f"committing {tenant} v{version + 1}")
            with self._lock:  # keep the statistics (bounded: they add up) for when the store is back
                if state.pending is None or state.pending.version != version:
                    state.pending = stats
                else:
                    state.pending = stats + state.pending
            return False
        if not committed:
            self.stats.commits_lost += 1
            with self._lock:
                state.loaded = False  # another writer moved ahead: reload before the next step
            return False
        with self._lock:
            self._adopt(tenant, state, snapshot, tokens=stats.tokens)
        self.stats.steps += 1
        return True

    def _adopt(self, tenant: str, state: TenantState, snapshot: Snapshot, tokens: int = 0) -> None:
        state.version, state.bases, state.updated = snapshot.version, snapshot.bases, snapshot.created
        state.tokens_seen += tokens
        if state.pending is not None and state.pending.version != snapshot.version:
            state.pending = None
        self.bank.publish(tenant, snapshot.bases, snapshot.version)

    # -- API ---------------------------------------------------------------------------------------

    async def describe(self, tenant: str) -> dict[str, object]:
        state = await self.ensure_loaded(tenant)
        bases = self.trained if state.bases is None else state.bases
        return {
            "model": self.model,
            "tenant": tenant,
            "version": state.version,
            "tokens_seen": state.tokens_seen,
            "frozen": state.frozen,
            "learning_rate": state.learning_rate,
            "last_update": state.updated,
            "drift": [projection_distance(v, t) for v, t in zip(bases, self.trained, strict=True)],
            "orthogonality_defect": [orthogonality_defect(v) for v in bases],
        }

    async def configure(self, tenant: str, frozen: bool | None, learning_rate: float | None) -> None:
        state = await self.ensure_loaded(tenant)
        with self._lock:
            if frozen is not None:
                state.frozen = frozen
                state.pending = None
            if learning_rate is not None:
                state.learning_rate = learning_rate

    async def rollback(self, tenant: str, version: int | None) -> int:
        """Commits, as a new version, the bases of `version` (None: the previous one; 0: the trained
        bases). Returns the new version number."""
        state = await self.ensure_loaded(tenant)
        if version is None:
            version = max(0, state.version - 1)
        if version == 0:
            bases = self.trained
        else:
            snapshot = await self.store.load(self.model, tenant, version)
            if snapshot is None:
                raise KeyError(version)
            bases = snapshot.bases
        current = state.version
        restored = Snapshot(self.model, tenant, current + 1, bases, meta={"restored_from": str(version)})
        if not await self.store.commit(restored, expected=current):
            self.stats.commits_lost += 1
            raise CommitConflict(f"{self.model}/{tenant}: another writer committed version {current + 1} first")
        with self._lock:
            state.pending, state.load = None, None
            self._adopt(tenant, state, restored)
        self.stats.rollbacks += 1
        return restored.version

    async def reset(self, tenant: str) -> int:
        return await self.rollback(tenant, 0)
