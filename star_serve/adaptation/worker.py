"""The adapter of one served model: from a tenant's tokens to a new committed version of its bases.

    engine thread                         event loop
    observe(tenant, version, inputs) ─► pending ─► bus.publish ┄┄► owner: bus.receive ─► guarded GHA step
                                                                   ─► store.commit (CAS + batch ids)
                                                                   ─► bus.ack, bank.publish, announce

Every replica captures its own traffic; the bus (in-process, or Redis Streams across replicas) brings each
tenant's statistics batches to the single replica that owns the tenant's updates. Statistics are taken
against the version that served the tokens. The owner folds batches of the current version exactly; a
batch a few versions behind (a replica that had not yet heard of the latest commit) is folded into the
current basis as an asynchronous-SGD step would be, and one more than `max_staleness` versions behind is
dropped and counted.

In `sync` mode (STAR.md's paper-faithful variant) the routers update the tenant's bank row with each
batch's own tokens before routing it (`sync_update`), and the worker only commits the row periodically.

In `shadow` mode everything runs as in `async` (capture, guarded steps, versions, snapshots) except that
the committed bases are never published to the bank: every tenant is served the trained bases, and its
tokens count against its latest (shadow) version, whichever version served them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from ..config import Settings
from ..model.gha import orthogonality_defects, projection_distances
from .bank import BasesSink, RoutingPlan
from .bus import Delivery, LocalBus, StatisticsBatch, StatisticsBus
from .capture import CaptureConfig, CaptureCounts, ForwardStatistics, capture_one
from .errors import CommitConflict, VersionNotKept
from .guardrails import Guardrails, collapsed, load_entropies
from .owner import Committed, Decision, plan_step
from .pending import PendingStatistics
from .quality import HoldBack, QualityConfig, QualityGate, Verdict
from .store import Snapshot, SnapshotStore
from .sync import SyncTenant, SyncUpdate

log = logging.getLogger(__name__)


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

    @classmethod
    def from_settings(cls, settings: Settings) -> AdaptationConfig:
        return cls(
            mode=settings.adaptation,
            learning_rate=settings.adaptation_learning_rate,
            min_tokens=settings.adaptation_min_tokens,
            min_interval=settings.adaptation_min_interval,
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
    load: torch.Tensor | None = None  # sync mode: (L, E) tokens per expert since the last commit
    first_seen: float | None = None  # sync mode: wall-clock time of the oldest token not yet committed
    loaded: bool = False  # the store has been asked for this tenant's latest version and settings
    synced_tokens: int = 0  # sync mode: tokens that moved the tenant's bank row since the last commit
    sync_bases: torch.Tensor | None = None  # sync mode: a copy of the row, to commit
    frozen_entropy: list[float] | None = None  # per layer: the expert-load entropy of its trained routing
    verdict: Verdict | None = None  # the quality gate's last judgement of a candidate

    @property
    def drift(self) -> float:
        """The largest projection distance of a layer's basis from the trained one."""
        return max(self.drifts) if self.drifts else 0.0


EXPLAINED_HALF_LIFE = 4096  # tokens
FROZEN_ENTROPY = "frozen_entropy"  # the snapshots' record of the tenant's frozen routing entropy, per layer
OTHER_TENANTS = "other"  # the metrics' label for the tenants beyond the top ones


@dataclass(frozen=True)
class TenantHealth:
    tenant: str
    drift: float
    explained: float | None
    loss: tuple[float, float] | None = None  # the quality gate's last scores: (served bases, trained bases)


def _losses(verdict: Verdict | None) -> tuple[float, float] | None:
    """(served, trained) scores of a tenant's last verdict, when it has both."""
    if verdict is None or verdict.served is None or verdict.trained is None:
        return None
    return (verdict.trained if verdict.rolled_back else verdict.served), verdict.trained


@dataclass
class AdaptationStats:
    steps: int = 0
    refused_steps: int = 0  # steps the guardrails refused (async: one per batch; sync: per layer and forward)
    stale_captures: int = 0  # captures taken against a version replaced in the meantime, not counted
    commits_lost: int = 0  # compare-and-set lost to another writer
    store_errors: int = 0
    rollbacks: int = 0
    quality_rollbacks: int = 0  # of the rollbacks, those the quality gate made (the served version scored worse)
    captured: CaptureCounts = field(default_factory=CaptureCounts)
    # Statistics batches: "published" here; as their owner, "applied", "duplicate" (applied before),
    # "stale" (too old a basis), "frozen", "refused" (a step the guardrails refused, or a rollback),
    # "refused_quality" (a step the quality gate refused).
    batches: Counter[str] = field(default_factory=Counter)
    lags: deque[float] = field(default_factory=lambda: deque(maxlen=4096))  # oldest token -> commit, seconds


@dataclass(frozen=True)
class AdaptationReport:
    """What the metrics read of an adapter at a scrape: its counters, the tokens its pending statistics
    had no room for, whether its store answers, and the health of its busiest tenants."""

    stats: AdaptationStats
    dropped_tokens: int
    bus_dropped: int  # batches the statistics bus had no room for
    store_ok: bool
    health: list[TenantHealth]


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
        self.gate = gate
        # Of the prompts captured here, those held back for the gate of whichever replica owns their tenant
        # (every replica that has a gate holds back; one without judges nothing and holds back nothing).
        self.holdback = HoldBack(replace(config.quality, enabled=config.quality.enabled and gate is not None))
        self.trained = trained.detach().float().cpu()
        self.tenants: dict[str, TenantState] = {}
        self.pending = PendingStatistics(config.pending_tenants)  # async mode: captured, not yet published
        self.stats = AdaptationStats()
        self._lock = threading.Lock()  # guards `tenants` and `stats` between the engine thread and the loop
        self._steps: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # one writer per tenant here
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Future[None]] = []
        self.store_ok = True  # the last store operation succeeded
        self.on_commit: Callable[[float], None] | None = None  # called with each applied batch's lag

    def _state(self, tenant: str) -> TenantState:
        return self.tenants.setdefault(tenant, TenantState(learning_rate=self.config.learning_rate))

    @property
    def serving(self) -> bool:
        """Whether committed versions route the tenant's requests (not in `shadow` mode)."""
        return self.config.mode in ("async", "sync")

    # -- engine thread -----------------------------------------------------------------------------

    def counted(self, tenant: str, served: int) -> int | None:
        """The version that tokens of `tenant` served with its basis version `served` count against, None
        when they do not count: the tenant is frozen, or (async) a newer version has replaced that basis
        (counted as stale). In shadow mode they count against the tenant's latest version."""
        if self.config.mode not in ("async", "shadow"):
            return None
        with self._lock:
            state = self._state(tenant)
            if state.frozen:
                return None
            if self.config.mode == "shadow":
                return state.version
            if served != state.version:
                self.stats.stale_captures += 1
                if state.bases is not None and served == 0:  # evicted from the bank: bring it back
                    self.bank.publish(tenant, state.bases, state.version)
                return None
            return served

    def accepts(self, tenant: str, version: int) -> bool:
        """Whether tokens of `tenant` served with its basis `version` count (see `counted`)."""
        return self.counted(tenant, version) is not None

    def served_bases(self, tenant: str, version: int) -> torch.Tensor:
        """The bases (L, E, D) of the tenant's `version`, when that is its current version (the only one
        whose tokens count); the trained bases otherwise."""
        with self._lock:
            state = self.tenants.get(tenant)
            if state is None or state.version != version or state.bases is None:
                return self.trained
            return state.bases

    def hold_back(self, tenant: str, ids: torch.Tensor) -> bool:
        """Whether the prompt `ids` (S,) of `tenant` is held back for the quality gate, and so not captured."""
        if self.config.mode not in ("async", "shadow"):
            return False
        with self._lock:
            if self._state(tenant).frozen:
                return False
        return self.holdback.offer(tenant, ids)

    def take(self, tenants: list[str | None], stats: ForwardStatistics, load: torch.Tensor) -> None:
        """Takes the statistics of one forward: group g of `stats` holds the tokens of `tenants[g]` (None:
        a group not captured), accepted for their version; `load` (G, L, E) counts them per expert."""
        now = time.time()
        wake = False
        with self._lock:
            names: list[str] = []
            taken: list[int] = []  # their groups
            for g, tenant in enumerate(tenants):
                if tenant is None:
                    continue
                state = self._state(tenant)
                self.stats.captured += stats.counts[g]
                if stats.versions[g] != state.version or state.frozen:  # a commit or a freeze landed meanwhile
                    self.stats.stale_captures += stats.versions[g] != state.version
                    continue
                if self.pending.version(tenant) not in (None, stats.versions[g]):  # of a replaced basis
                    self.stats.stale_captures += 1
                    self.pending.discard(tenant)
                names.append(tenant)
                taken.append(g)
                n, explained = stats.counts[g].sampled, stats.explained[g]
                state.traffic += n
                if explained is not None and state.explained is None:
                    state.explained = explained
                elif explained is not None and state.explained is not None:  # a moving average by tokens
                    state.explained += (1 - 0.5 ** (n / EXPLAINED_HALF_LIFE)) * (explained - state.explained)
            before = [self.pending.tokens(t) for t in names]
            self.pending.add(names, taken, stats, load, now)
            for tenant, had in zip(names, before, strict=True):
                # Only a tenant that now makes a batch (or is new here) wakes the loop: one held back by
                # `min_interval` falls due on the loop's own timer, not at every forward that adds to it.
                crossed = had < self.config.min_tokens <= self.pending.tokens(tenant)
                wake |= crossed or not self.tenants[tenant].loaded
        if wake and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def observe(
        self, tenant: str, version: int, bases: torch.Tensor, inputs: list[torch.Tensor], load: torch.Tensor
    ) -> None:
        """Takes one tenant's tokens: `inputs` L x (n, D) routed with `bases` (L, E, D) of `version`; `load`
        (L, E) counts them per expert. The engine captures a whole forward's tenants at once instead."""
        counted = self.counted(tenant, version)
        if counted is None:
            return
        bases = self.served_bases(tenant, counted) if counted != version else bases
        self.take([tenant], capture_one(bases, inputs, counted, self.config.capture), load[None])

    # -- engine thread, sync mode ------------------------------------------------------------------

    @property
    def syncing(self) -> bool:
        return self.config.mode == "sync"

    def adapting(self, tenants: list[str]) -> list[str]:
        """Those of `tenants` whose bases the coming forward will update (sync mode): each needs a bank row."""
        with self._lock:
            return [t for t in dict.fromkeys(tenants) if not self._state(t).frozen]

    def sync_update(self, view: RoutingPlan, tenants: list[str], lengths: list[int]) -> SyncUpdate | None:
        """The routers' in-place update of one forward, for the batch's tenants that have a row of their own."""
        if view.routing.bank is None or view.routing.index is None or self.bank.trained is None:
            return None
        adapting: dict[str, SyncTenant] = {}
        candidates = self.adapting(tenants)
        with self._lock:
            for tenant in candidates:
                first = tenants.index(tenant)
                if view.rows[first] == 0:  # never write the trained row
                    continue
                sequences = torch.tensor([t == tenant for t in tenants])
                position = int(view.routing.index[first])
                adapting[tenant] = SyncTenant(position, sequences, self.tenants[tenant].learning_rate)
        if not adapting:
            return None
        return SyncUpdate(view, adapting, lengths, self.bank.trained, self.config.capture, self.config.guard)

    def synced(self, update: SyncUpdate | None, tenant: str, version: int, tokens: int, load: torch.Tensor) -> None:
        """After a sync-mode forward: `tokens` of the tenant's tokens moved its row, routed with `load` (L, E).
        Once enough have, a copy of the row is handed to the worker to commit."""
        with self._lock:
            state = self._state(tenant)
            if update is not None and tenant == next(iter(update.tenants), None):  # once per forward
                self.stats.captured += update.counts
                self.stats.refused_steps += sum(update.refused.values())
            if version != state.version and version == 0 and state.bases is not None:
                self.bank.publish(tenant, state.bases, state.version)  # evicted from the bank: bring it back
                return
            if state.frozen or update is None or tenant not in update.tenants:
                return
            state.synced_tokens += tokens
            state.load = load.cpu() if state.load is None else state.load + load.cpu()
            state.first_seen = state.first_seen or time.time()
            if state.synced_tokens < self.config.min_tokens and state.loaded:
                return
            row = self.bank.row(tenant)
            if row is None:
                return
            state.sync_bases = row.detach().float().cpu().clone()  # between forwards: no half-written row
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    # -- event loop --------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.ensure_future(t) for t in (self._publish_due(), self._own(), self._poll())]
        if hasattr(self.store, "announcements"):
            self._tasks.append(asyncio.ensure_future(self._follow()))

    async def stop(self) -> None:
        """Publishes what is pending (best effort), stops the tasks and gives up ownership."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with self._lock:
            tenants = [t for t in self.pending.tenants() if self.tenants[t].loaded]
        try:
            for tenant in tenants:
                await self._publish(tenant)
            await self.bus.close()
        except Exception:
            log.warning("could not hand over pending statistics of %s on shutdown", self.model, exc_info=True)

    def _take(self, tenant: str) -> StatisticsBatch | None:
        """The tenant's pending statistics as one batch, removed from pending. Under `_lock`."""
        taken = self.pending.take(tenant)
        if taken is None:
            return None
        self.tenants[tenant].published = time.monotonic()
        stats, load, first_seen = taken
        if not stats.tokens:
            return None
        return StatisticsBatch(tenant, stats, load, first_seen, held=self.holdback.take(tenant))

    def _put_back(self, batch: StatisticsBatch) -> None:
        """Returns an unpublished batch to pending (statistics add up, so this stays bounded). Under `_lock`."""
        state = self.tenants[batch.tenant]
        self.holdback.waiting.add(batch.tenant, batch.held)
        if batch.version != state.version or not self.pending.put_back(
            batch.tenant, batch.stats, batch.load, batch.first_seen
        ):
            self.stats.stale_captures += 1

    async def _publish(self, tenant: str) -> None:
        with self._lock:
            batch = self._take(tenant)
        if batch is None:
            return
        try:
            await self.bus.publish(batch)
            self.stats.batches["published"] += 1
        except Exception:
            with self._lock:
                self._put_back(batch)
            raise

    async def _publish_due(self) -> None:
        """Sends each tenant's statistics to the bus once they make a batch; loads first-seen tenants."""
        while True:
            with contextlib.suppress(TimeoutError):  # a batch held back by `min_interval` falls due
                await asyncio.wait_for(self._wakeup.wait(), self._until_due())
            self._wakeup.clear()
            with self._lock:
                due = [t for t, s in self.tenants.items() if self._due(t, s)]
            for tenant in due:
                try:
                    state = await self.ensure_loaded(tenant)
                    if self.syncing:
                        await self._commit_synced(tenant)
                    elif self._due(tenant, state):  # a first-seen tenant was due to load, not yet to publish
                        await self._publish(tenant)
                    self.store_ok = True
                except Exception:
                    self._store_failed(f"publishing statistics of {tenant}")
            if not self.store_ok:  # retry once the store is back, without spinning
                await asyncio.sleep(self.config.poll_interval)
                self._wakeup.set()

    def _until_due(self) -> float | None:
        """Seconds until the first batch held back only by `min_interval` falls due; None when none is."""
        if self.syncing:
            return None
        with self._lock:
            ready = [
                s.published + self.config.min_interval
                for t, s in self.tenants.items()
                if s.loaded and self.pending.tokens(t) >= self.config.min_tokens
            ]
        return max(0.0, min(ready) - time.monotonic()) if ready else None

    def _due(self, tenant: str, state: TenantState) -> bool:
        if not state.loaded:
            return True
        if self.syncing:
            return state.sync_bases is not None
        if self.pending.tokens(tenant) < self.config.min_tokens:
            return False
        return time.monotonic() - state.published >= self.config.min_interval

    async def _commit_synced(self, tenant: str) -> bool:
        """Sync mode: commits the copy of the tenant's row that the engine handed over; True when committed."""
        async with self._steps[tenant]:
            state = await self.ensure_loaded(tenant)
            with self._lock:
                bases, state.sync_bases = state.sync_bases, None
                load, state.load = state.load, None
                first_seen, state.first_seen = state.first_seen, None
                tokens, state.synced_tokens = state.synced_tokens, 0
                version = state.version
            if bases is None or tokens == 0:
                return False
            if load is not None and state.frozen_entropy is None:  # its first tokens, its row barely moved
                state.frozen_entropy = load_entropies(load).tolist()
            elif load is not None and collapsed(load, state.frozen_entropy, self.config.guard):
                with contextlib.suppress(CommitConflict):
                    await self._rollback(tenant, state, None)
                return False
            snapshot = Snapshot(self.model, tenant, version + 1, bases, meta=self._meta(state, mode="sync"))
            try:
                committed = await self.store.commit(snapshot, expected=version)
            except Exception:
                with self._lock:  # the row keeps its updates; the next forward hands over a fresh copy
                    state.synced_tokens += tokens
                raise
            if not committed:
                self.stats.commits_lost += 1
                with self._lock:
                    state.loaded = False
                return False
            lag = time.time() - (first_seen or time.time())
            with self._lock:
                self._adopt(tenant, state, snapshot, tokens=tokens, publish=False)
                self.bank.relabel(tenant, snapshot.version)  # the row already holds these bases, and more
                self.stats.steps += 1
                self.stats.lags.append(lag)
            if self.on_commit is not None:
                self.on_commit(lag)
            return True

    async def _own(self) -> None:
        """As the owner of some tenants' updates: receives their batches, applies them, acknowledges them.
        What could not be applied (the store down, a lost race) is kept and tried again."""
        retry: dict[str, Delivery] = {}
        renewed = -math.inf
        while True:
            try:
                if time.monotonic() - renewed >= self.config.poll_interval:
                    retry.update((d.batch.id, d) for d in await self.bus.maintain())
                    renewed = time.monotonic()
                timeout = 0.0 if retry else self.config.poll_interval
                retry.update((d.batch.id, d) for d in await self.bus.receive(timeout))
            except asyncio.CancelledError:
                raise
            except Exception:
                self._store_failed("receiving statistics")
                await asyncio.sleep(self.config.poll_interval)
                continue
            by_tenant: dict[str, list[Delivery]] = {}
            for d in retry.values():
                by_tenant.setdefault(d.batch.tenant, []).append(d)
            retry = {}
            for tenant, deliveries in by_tenant.items():
                try:
                    handled, _ = await self.apply(tenant, [d.batch for d in deliveries])
                    done = [d for d in deliveries if d.batch.id in handled]
                    await self.bus.ack(done)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self._store_failed(f"applying statistics of {tenant}")
                    done = []
                retry.update((d.batch.id, d) for d in deliveries if d not in done)
            if retry:
                await asyncio.sleep(self.config.poll_interval if not self.store_ok else 0.05)

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
        """Confirms by polling what announcements may have missed (a dropped connection, a restart), and
        picks up settings changed through other replicas."""
        while True:
            await asyncio.sleep(self.config.poll_interval)
            if not await self.store.ping():
                self._store_failed("pinging")
                continue
            self.store_ok = True
            with self._lock:
                tenants = [t for t, s in self.tenants.items() if s.loaded]
            try:
                heads = await self.store.heads(self.model, tenants)  # one call, however many tenants
            except Exception:
                self._store_failed("polling versions")
                continue
            for tenant, (version, settings) in heads.items():
                self._configured(tenant, self.tenants[tenant], settings)
                try:
                    await self._refresh(tenant, version)
                except Exception:
                    self._store_failed(f"loading version {version} of {tenant}")
                    break

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

    def _configured(self, tenant: str, state: TenantState, settings: dict[str, str]) -> None:
        with self._lock:
            if "frozen" in settings:
                state.frozen = settings["frozen"] == "true"
                if state.frozen:
                    self._drop_uncommitted(tenant, state)
            if "learning_rate" in settings:
                state.learning_rate = float(settings["learning_rate"])

    async def ensure_loaded(self, tenant: str) -> TenantState:
        """The tenant's state, with its latest committed version and its settings loaded on first use."""
        with self._lock:
            state = self._state(tenant)
            if state.loaded:
                return state
        try:
            snapshot = await self.store.latest(self.model, tenant)
            settings = await self.store.settings(self.model, tenant)
            self.store_ok = True
        except Exception:  # keep serving what is cached; the next request or the worker tries again
            self._store_failed(f"loading {tenant}")
            return state
        self._configured(tenant, state, settings)
        with self._lock:
            if not state.loaded and snapshot is not None and snapshot.version > state.version:
                self._adopt(tenant, state, snapshot)
            state.loaded = True
        return state

    async def step(self, tenant: str) -> bool:
        """Folds the tenant's pending statistics into a new version here and now, bypassing the bus;
        True when one was committed."""
        await self.ensure_loaded(tenant)
        with self._lock:
            batch = self._take(tenant)
        if batch is None:
            return False
        self.stats.batches["published"] += 1
        _, committed = await self.apply(tenant, [batch])
        return committed

    async def flush(self) -> None:
        """Folds every tenant's statistics observed so far into committed versions (or refused steps)."""
        with self._lock:
            tenants = [t for t, s in self.tenants.items() if t in self.pending or s.sync_bases is not None]
        for tenant in tenants:
            await (self._commit_synced(tenant) if self.syncing else self.step(tenant))

    async def apply(self, tenant: str, batches: list[StatisticsBatch]) -> tuple[set[str], bool]:
        """As the tenant's owner, carries out `plan_step` on `batches`: one guarded step committed together
        with their ids, or a rollback, or nothing. Returns the ids handled (applied, or dropped for a reason
        that will not change) and whether a version was committed; a batch not handled is to be tried again."""
        async with self._steps[tenant]:
            state = await self.ensure_loaded(tenant)
            if not state.loaded:
                return set(), False
            if any(b.version > state.version for b in batches):  # another owner was ahead of this one
                versions = await self.store.versions(self.model, tenant)
                if versions:
                    await self._refresh(tenant, versions[-1])
            handled = await self.store.applied(self.model, tenant, [b.id for b in batches])
            self.stats.batches["duplicate"] += len(handled)
            todo = [b for b in batches if b.id not in handled]
            if self.gate is not None:
                for b in todo:
                    self.gate.receive(tenant, b.held)
            self._configured(tenant, state, await self.store.settings(self.model, tenant))
            with self._lock:
                committed = Committed(
                    state.version,
                    self.trained if state.bases is None else state.bases,
                    state.learning_rate,
                    state.frozen,
                    state.drifts or [0.0] * len(self.trained),
                    state.frozen_entropy,
                )
            decision = plan_step(
                committed, todo, self.trained, self.config.guard, self.config.max_staleness, self.serving
            )
            self.stats.batches["stale"] += len(decision.dropped)
            if decision.frozen_entropy is not None:
                state.frozen_entropy = decision.frozen_entropy
            if decision.action == "none":
                return handled | decision.handled, False
            if decision.action == "refuse":
                log.info("%s/%s: %d batches refused: %s", self.model, tenant, len(decision.batches), decision.reason)
                self.stats.refused_steps += decision.report is not None
                self.stats.batches["frozen" if decision.reason == "frozen" else "refused"] += len(decision.batches)
                return handled | decision.handled, False
            if decision.action == "rollback":
                log.warning("%s/%s: %s; rolling back", self.model, tenant, decision.reason)
                try:
                    await self._rollback(tenant, state, None)
                except CommitConflict:
                    with self._lock:
                        state.loaded = False
                    return handled, False
                self.stats.batches["refused"] += len(decision.batches)
                return handled | decision.handled, False
            if self.gate is not None and not await self._passes(tenant, state, committed.bases, decision):
                return handled | decision.handled, False
            return handled | await self._commit(tenant, state, decision), True

    async def _passes(self, tenant: str, state: TenantState, current: torch.Tensor, decision: Decision) -> bool:
        """Whether the quality gate lets `decision`'s candidate be committed; counts a refusal."""
        assert self.gate is not None and decision.bases is not None
        verdict = await asyncio.to_thread(self.gate.judge, tenant, decision.bases, current, self.trained)
        state.verdict = verdict
        if verdict.accepted:
            return True
        log.info("%s/%s: %d batches refused: %s", self.model, tenant, len(decision.batches), verdict.reason)
        self.stats.batches["refused_quality"] += len(decision.batches)
        if state.version > 0 and verdict.degraded(self.gate.config.rollback_loss_increase):
            log.warning(
                "%s/%s: version %d scores %.4f on held-back prompts, the trained bases %.4f; rolling back to them",
                *(self.model, tenant, state.version, verdict.current, verdict.trained),
            )
            try:
                await self._rollback(tenant, state, 0)
            except CommitConflict:
                with self._lock:
                    state.loaded = False
                return False
            self.stats.quality_rollbacks += 1
            state.verdict = replace(verdict, rolled_back=True)
        return False

    async def _commit(self, tenant: str, state: TenantState, decision: Decision) -> set[str]:
        """Commits a decision's new version by compare-and-set; the ids handled (none when it lost)."""
        assert decision.bases is not None
        version = state.version
        meta = self._meta(state, learning_rate=repr(state.learning_rate))
        snapshot = Snapshot(self.model, tenant, version + 1, decision.bases, meta=meta)
        if not await self.store.commit(snapshot, expected=version, applied=[b.id for b in decision.batches]):
            self.stats.commits_lost += 1
            with self._lock:
                state.loaded = False  # another writer moved ahead: reload before trying again
            return set()
        now = time.time()
        with self._lock:
            self._adopt(tenant, state, snapshot, tokens=decision.tokens, drifts=decision.drifts)
            self.stats.steps += 1
            self.stats.batches["applied"] += len(decision.batches)
            self.stats.lags.extend(now - b.first_seen for b in decision.batches)
        if self.on_commit is not None:
            for b in decision.batches:
                self.on_commit(now - b.first_seen)
        return decision.handled

    def _adopt(
        self,
        tenant: str,
        state: TenantState,
        snapshot: Snapshot,
        tokens: int = 0,
        publish: bool = True,
        drifts: list[float] | None = None,  # each layer's distance from the trained basis, when known
    ) -> None:
        state.version, state.bases, state.updated = snapshot.version, snapshot.bases, snapshot.created
        state.drifts = drifts or projection_distances(snapshot.bases, self.trained).tolist()
        state.tokens_seen += tokens
        if state.frozen_entropy is None and FROZEN_ENTROPY in snapshot.meta:
            state.frozen_entropy = json.loads(snapshot.meta[FROZEN_ENTROPY])
        if self.pending.version(tenant) not in (None, snapshot.version):
            self.pending.discard(tenant)
        if publish and self.serving:
            self.bank.publish(tenant, snapshot.bases, snapshot.version)

    @staticmethod
    def _meta(state: TenantState, **meta: str) -> dict[str, str]:
        """A snapshot's metadata: `meta` and the tenant's frozen routing entropy, once known."""
        if state.frozen_entropy is not None:
            meta[FROZEN_ENTROPY] = json.dumps(state.frozen_entropy)
        return meta

    def _drop_uncommitted(self, tenant: str, state: TenantState) -> None:
        """Forgets the tenant's statistics not yet committed (pending here, or counted in sync mode). Under
        `_lock`."""
        state.load, state.first_seen = None, None
        self.pending.discard(tenant)

    def health(self, top: int) -> list[TenantHealth]:
        """Drift and explained variance of the `top` tenants by traffic, and of the rest as one "other"
        (largest drift, traffic-weighted explained variance): a bounded set for the metrics."""
        with self._lock:
            ranked = sorted(self.tenants.items(), key=lambda item: -item[1].traffic)
            rows = [TenantHealth(t, s.drift, s.explained, _losses(s.verdict)) for t, s in ranked[:top]]
            rest = [s for _, s in ranked[top:]]
        if rest:
            seen = [s for s in rest if s.explained is not None and s.traffic]
            total = sum(s.traffic for s in seen)
            explained = sum(s.traffic * (s.explained or 0.0) for s in seen) / total if total else None
            rows.append(TenantHealth(OTHER_TENANTS, max(s.drift for s in rest), explained))
        return rows

    def report(self, top: int) -> AdaptationReport:
        """The counters and health that the metrics export (`top` tenants by traffic, then "other")."""
        return AdaptationReport(
            self.stats, self.pending.dropped_tokens, self.bus.dropped, self.store_ok, self.health(top)
        )

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
            "drift": projection_distances(bases, self.trained).tolist(),
            "orthogonality_defect": orthogonality_defects(bases).tolist(),
            "quality": None if state.verdict is None else state.verdict.as_dict(),
        }

    async def configure(self, tenant: str, frozen: bool | None, learning_rate: float | None) -> None:
        """Stores the tenant's settings (every replica and every restart sees them) and applies them here."""
        state = await self.ensure_loaded(tenant)
        settings = {}
        if frozen is not None:
            settings["frozen"] = "true" if frozen else "false"
        if learning_rate is not None:
            settings["learning_rate"] = repr(learning_rate)
        if settings:
            await self.store.configure(self.model, tenant, settings)
            self._configured(tenant, state, settings)

    async def rollback(self, tenant: str, version: int | None) -> int:
        """Commits, as a new version, the bases of `version` (None: the previous one; 0: the trained
        bases). Returns the new version number."""
        async with self._steps[tenant]:
            state = await self.ensure_loaded(tenant)
            return await self._rollback(tenant, state, version)

    async def _rollback(self, tenant: str, state: TenantState, version: int | None) -> int:
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
        restored = Snapshot(self.model, tenant, current + 1, bases, meta=self._meta(state, restored_from=str(version)))
        if not await self.store.commit(restored, expected=current):
            self.stats.commits_lost += 1
            raise CommitConflict(f"{self.model}/{tenant}: another writer committed version {current + 1} first")
        with self._lock:
            self._drop_uncommitted(tenant, state)
            self._adopt(tenant, state, restored)
        self.stats.rollbacks += 1
        return restored.version

    async def reset(self, tenant: str) -> int:
        return await self.rollback(tenant, 0)
