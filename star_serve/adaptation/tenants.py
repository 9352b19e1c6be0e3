"""What an adapter knows of each tenant, shared by its jobs (ingest, owner, follower, sync, admin): the
tenant's committed version and settings as loaded from the store, its counters, and the few operations on
them that every job needs (load a tenant, adopt a version, roll back). One lock guards the states between
the engine thread and the event loop.

The states are an LRU: beyond `max_tenants`, or idle for `idle_seconds`, a tenant is forgotten here (`trim`),
its committed versions and settings being in the store, where `ensure_loaded` finds them on its next request;
a tenant with statistics waiting to be published, or a step in progress, is kept until they are done.

Staleness is decided in one place, `staleness`: statistics are exact for the version they were taken
against; a batch a few versions behind (a replica that had not yet heard of the latest commit) folds into
the current basis as an asynchronous-SGD step would, one more than `max_staleness` behind is dropped, and
one ahead (another owner was ahead of this one) waits until this owner has caught up. The capture side
(`Tenants.counts`) is the same rule with no staleness allowed: only the current version's tokens count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config import Settings
from ..model.gha import projection_distances
from .bank import BasesSink
from .capture import CaptureConfig, CaptureCounts
from .errors import CommitConflict, VersionNotKept
from .guardrails import Guardrails
from .pending import PendingStatistics
from .quality import QualityConfig, Verdict
from .store import Snapshot, SnapshotStore

log = logging.getLogger(__name__)

Staleness = Literal["current", "behind", "too_old", "ahead"]
FROZEN_ENTROPY = "frozen_entropy"  # the snapshots' record of the tenant's frozen routing entropy, per layer


def staleness(taken: int, current: int, max_staleness: int) -> Staleness:
    """How statistics taken against version `taken` stand against the tenant's `current` version."""
    if taken == current:
        return "current"
    if taken > current:
        return "ahead"
    return "behind" if current - taken <= max_staleness else "too_old"


@dataclass(frozen=True)
class AdaptationConfig:
    """How one model adapts; the fields that mirror a setting default to it (`Settings` documents them)."""

    mode: Literal["async", "sync", "shadow", "off"] = Settings.default("adaptation")
    learning_rate: float = Settings.default("adaptation_learning_rate")  # a new tenant's
    min_tokens: int = Settings.default("adaptation_min_tokens")  # statistics that make a batch (and a step)
    min_interval: float = Settings.default("adaptation_min_interval")  # seconds between a tenant's batches
    max_staleness: int = 4  # versions: batches taken against an older basis are dropped, not applied
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    guard: Guardrails = field(default_factory=Guardrails)
    quality: QualityConfig = field(default_factory=QualityConfig)
    poll_interval: float = 2.0  # seconds between confirmations of the latest versions in the store
    pending_tenants: int = 256  # tenants whose statistics can wait for publication at once
    max_tenants: int = Settings.default("adaptation_max_tenants")  # tenants whose state is kept here
    idle_seconds: float = Settings.default("adaptation_tenant_idle")  # after which a tenant's state is forgotten
    niceness: int = Settings.default("adaptation_process_niceness")  # of an adaptation process of its own

    @classmethod
    def from_settings(cls, settings: Settings) -> AdaptationConfig:
        return cls(
            mode=settings.adaptation,
            learning_rate=settings.adaptation_learning_rate,
            min_tokens=settings.adaptation_min_tokens,
            min_interval=settings.adaptation_min_interval,
            max_tenants=settings.adaptation_max_tenants,
            idle_seconds=settings.adaptation_tenant_idle,
            niceness=settings.adaptation_process_niceness,
            capture=CaptureConfig.from_settings(settings),
            quality=QualityConfig.from_settings(settings),
        )


@dataclass
class TenantState:
    learning_rate: float
    version: int = 0
    bases: torch.Tensor | None = None  # (L, E, D); None: the trained bases
    frozen: bool = False
    tokens_seen: int = 0
    updated: float | None = None
    traffic: int = 0  # tokens captured here, for ranking tenants in the metrics
    published: float = -math.inf  # monotonic time of the tenant's last batch from here
    drifts: list[float] | None = None  # each layer's projection distance from the trained basis; None: 0
    explained: float | None = None  # recent share of the tenant's router-input energy in its subspace
    loaded: bool = False  # the store has been asked for this tenant's latest version and settings
    frozen_entropy: list[float] | None = None  # per layer: the expert-load entropy of its trained routing
    verdict: Verdict | None = None  # the quality gate's last judgement of a candidate
    used: float = field(default_factory=time.monotonic)  # when a request or a capture last touched it

    @property
    def drift(self) -> float:
        """The largest projection distance of a layer's basis from the trained one."""
        return max(self.drifts) if self.drifts else 0.0


@dataclass
class AdaptationStats:
    steps: int = 0
    refused_steps: int = 0  # steps the guardrails refused (async: one per batch; sync: per layer and forward)
    stale_captures: int = 0  # captures taken against a version replaced in the meantime, not counted
    commits_lost: int = 0  # compare-and-set lost to another writer
    store_errors: int = 0
    rollbacks: int = 0
    quality_rollbacks: int = 0  # of the rollbacks, those the quality gate made (the served version scored worse)
    evicted: int = 0  # tenants forgotten here (least recently used, or idle), to be loaded again when they return
    evicted_uncommitted: int = 0  # of those, tenants whose uncommitted statistics went with them (sync mode)
    captured: CaptureCounts = field(default_factory=CaptureCounts)
    # Statistics batches: "published" here; as their owner, "applied", "duplicate" (applied before),
    # "stale" (too old a basis), "frozen", "refused" (a step the guardrails refused, or a rollback),
    # "refused_quality" (a step the quality gate refused).
    batches: Counter[str] = field(default_factory=Counter)
    lags: deque[float] = field(default_factory=lambda: deque(maxlen=4096))  # oldest token -> commit, seconds


class Tenants:
    """The tenants of one served model as this replica knows them."""

    def __init__(
        self, model: str, trained: torch.Tensor, bank: BasesSink, store: SnapshotStore, config: AdaptationConfig
    ) -> None:
        self.model, self.bank, self.store, self.config = model, bank, store, config
        self.trained = trained.detach().float().cpu()  # (L, E, D)
        self.states: OrderedDict[str, TenantState] = OrderedDict()  # least recently used first
        self.pending = PendingStatistics(config.pending_tenants)  # async mode: captured, not yet published
        self.stats = AdaptationStats()
        self.lock = threading.Lock()  # guards `states`, `pending` and `stats` between the engine thread and the loop
        self.steps: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # one writer per tenant here
        self.wakeup = asyncio.Event()  # a tenant's statistics fell due (set from the engine thread by `wake`)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.store_ok = True  # the last store operation succeeded
        self.on_commit: Callable[[float], None] | None = None  # called with each applied batch's lag
        self.on_drop: list[Callable[[str], None]] = []  # forget a tenant's uncommitted statistics elsewhere
        self.on_evict: list[Callable[[str], bool]] = []  # forget a tenant elsewhere; True: uncommitted went too

    @property
    def serving(self) -> bool:
        """Whether committed versions route the tenant's requests (not in `shadow` mode)."""
        return self.config.mode in ("async", "sync")

    def state(self, tenant: str) -> TenantState:
        """The tenant's state, created on first sight, and marked used. Under `lock`."""
        state = self.states.get(tenant)
        if state is None:
            state = self.states[tenant] = TenantState(learning_rate=self.config.learning_rate)
        else:
            self.states.move_to_end(tenant)
            state.used = time.monotonic()
        return state

    def trim(self) -> int:
        """Forgets the least recently used tenants beyond `max_tenants` and those idle for `idle_seconds`,
        but not one with statistics waiting to be published or a step in progress; how many it forgot.
        Walks only the tenants it forgets and the busy ones it skips, not every tenant."""
        now, limit, idle = time.monotonic(), self.config.max_tenants, self.config.idle_seconds
        with self.lock:
            victims: list[str] = []
            for tenant, state in self.states.items():
                if len(self.states) - len(victims) <= limit and now - state.used < idle:
                    break
                if not self._busy(tenant):
                    victims.append(tenant)
            for tenant in victims:
                del self.states[tenant]
                self.steps.pop(tenant, None)
                uncommitted = [forget(tenant) for forget in self.on_evict]
                self.stats.evicted += 1
                self.stats.evicted_uncommitted += any(uncommitted)
        return len(victims)

    def _busy(self, tenant: str) -> bool:
        step = self.steps.get(tenant)
        return self.pending.version(tenant) is not None or (step is not None and step.locked())

    @staticmethod
    def counts(state: TenantState, version: int) -> bool:
        """Whether statistics taken against `version` count for the tenant now: only its current version's."""
        return staleness(version, state.version, max_staleness=0) == "current"

    def wake(self) -> None:
        """Wakes the loop that publishes (or, in sync mode, commits) due statistics. Safe from any thread."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.wakeup.set)

    def committed(self, lags: list[float]) -> None:
        """Counts a commit that folded in statistics whose oldest tokens are `lags` seconds old."""
        with self.lock:
            self.stats.steps += 1
            self.stats.lags.extend(lags)
        if self.on_commit is not None:
            for lag in lags:
                self.on_commit(lag)

    async def run_due(
        self,
        due: Callable[[str, TenantState], bool],
        act: Callable[[str], Awaitable[object]],
        until_due: Callable[[], float | None] = lambda: None,
    ) -> None:
        """The loop that hands on each tenant's statistics once they are `due` (`act`), woken by `wake` or
        after `until_due()` seconds; it loads first-seen tenants as it goes."""
        while True:
            with contextlib.suppress(TimeoutError):  # a batch held back by `min_interval` falls due
                await asyncio.wait_for(self.wakeup.wait(), until_due())
            self.wakeup.clear()
            self.trim()
            with self.lock:
                waiting = [t for t, s in self.states.items() if not s.loaded or due(t, s)]
            for tenant in waiting:
                try:
                    state = await self.ensure_loaded(tenant)
                    if due(tenant, state):
                        await act(tenant)
                    self.store_ok = True
                except Exception:
                    self.store_failed(f"handing on statistics of {tenant}")
            if not self.store_ok:  # retry once the store is back, without spinning
                await asyncio.sleep(self.config.poll_interval)
                self.wakeup.set()

    def store_failed(self, doing: str) -> None:
        if self.store_ok:
            log.warning("snapshot store unavailable while %s; serving cached bases", doing, exc_info=True)
        self.store_ok = False
        self.stats.store_errors += 1

    async def ensure_loaded(self, tenant: str, republish: bool = False) -> TenantState:
        """The tenant's state, with its latest committed version and its settings loaded on first use.
        `republish`: the bank has lost the tenant's row (evicted for room), so its current version is
        published to it again."""
        with self.lock:
            state = self.state(tenant)
            if state.loaded:
                if republish and state.version and self.serving:
                    self.bank.publish(tenant, state.bases, state.version)
                return state
        try:
            snapshot = await self.store.latest(self.model, tenant)
            settings = await self.store.settings(self.model, tenant)
            self.store_ok = True
        except Exception:  # keep serving what is cached; the next request or the worker tries again
            self.store_failed(f"loading {tenant}")
            return state
        self.configured(tenant, state, settings)
        with self.lock:
            if not state.loaded and snapshot is not None and snapshot.version > state.version:
                self.adopt(tenant, state, snapshot)
            state.loaded = True
        self.trim()  # a newcomer may push the least recently used out
        return state

    def configured(self, tenant: str, state: TenantState, settings: dict[str, str]) -> None:
        """Applies the tenant's stored settings here."""
        with self.lock:
            if "frozen" in settings:
                state.frozen = settings["frozen"] == "true"
                if state.frozen:
                    self.drop_uncommitted(tenant)
            if "learning_rate" in settings:
                state.learning_rate = float(settings["learning_rate"])

    async def refresh(self, tenant: str, version: int) -> None:
        """Adopts `version` of the tenant, committed elsewhere, if it is newer than what is known here."""
        with self.lock:
            state = self.states.get(tenant)
            if state is None or version <= state.version:
                return
        snapshot = await self.store.load(self.model, tenant, version)
        if snapshot is None:
            return
        with self.lock:
            if snapshot.version > state.version:
                self.adopt(tenant, state, snapshot)

    def adopt(
        self,
        tenant: str,
        state: TenantState,
        snapshot: Snapshot,
        tokens: int = 0,
        publish: bool = True,
        drifts: list[float] | None = None,  # each layer's distance from the trained basis, when known
    ) -> None:
        """Makes `snapshot` the tenant's current version (and, unless shadowed, its routing). Under `lock`."""
        state.version, state.bases, state.updated = snapshot.version, snapshot.bases, snapshot.created
        state.drifts = drifts or projection_distances(snapshot.bases, self.trained).tolist()
        state.tokens_seen += tokens
        if state.frozen_entropy is None and FROZEN_ENTROPY in snapshot.meta:
            state.frozen_entropy = json.loads(snapshot.meta[FROZEN_ENTROPY])
        pending = self.pending.version(tenant)
        if pending is not None and not self.counts(state, pending):
            self.pending.discard(tenant)
        if publish and self.serving:
            self.bank.publish(tenant, snapshot.bases, snapshot.version)

    @staticmethod
    def meta(state: TenantState, **meta: str) -> dict[str, str]:
        """A snapshot's metadata: `meta` and the tenant's frozen routing entropy, once known."""
        if state.frozen_entropy is not None:
            meta[FROZEN_ENTROPY] = json.dumps(state.frozen_entropy)
        return meta

    async def roll_back(self, tenant: str, state: TenantState, version: int | None) -> int:
        """Commits, as a new version, the bases of `version` (None: the previous one; 0: the trained bases);
        the new version number. The caller holds the tenant's step lock."""
        if version is None:
            version = max(0, state.version - 1)
        if version == 0:
            bases = self.trained
        else:
            snapshot = await self.store.load(self.model, tenant, version)
            if snapshot is None:
                raise VersionNotKept(tenant, version)
            bases = snapshot.bases
        current = state.version
        restored = Snapshot(self.model, tenant, current + 1, bases, meta=self.meta(state, restored_from=str(version)))
        if not await self.store.commit(restored, expected=current):
            self.stats.commits_lost += 1
            self.lost(state)
            raise CommitConflict(f"{self.model}/{tenant}: another writer committed version {current + 1} first")
        with self.lock:
            self.drop_uncommitted(tenant)
            self.adopt(tenant, state, restored)
        self.stats.rollbacks += 1
        return restored.version

    def drop_uncommitted(self, tenant: str) -> None:
        """Forgets the tenant's statistics not yet committed (pending here, or counted in sync mode). Under
        `lock`."""
        self.pending.discard(tenant)
        for drop in self.on_drop:
            drop(tenant)

    def lost(self, state: TenantState) -> None:
        """Another writer moved ahead of this one: the tenant is loaded again before its next step."""
        with self.lock:
            state.loaded = False
