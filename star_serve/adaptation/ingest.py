"""Ingest (`async` and `shadow` modes): each forward's statistics, taken on the engine's side, are added to
the tenant's pending statistics here; once they make a batch (`min_tokens`, at most one a `min_interval`)
the event loop publishes them to the bus, which brings them to the tenant's owner. A share of prompts is
held back for the quality gate instead, and travels with the tenant's next batch.

In `shadow` mode the tenant's committed versions are never served: its tokens are routed with the trained
bases, and count against its latest (shadow) version, whichever version served them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from .bus import StatisticsBatch, StatisticsBus
from .capture import ForwardStatistics, capture_one
from .quality import HoldBack
from .tenants import Tenants, TenantState

log = logging.getLogger(__name__)

EXPLAINED_HALF_LIFE = 4096  # tokens


class Ingest:
    def __init__(self, tenants: Tenants, bus: StatisticsBus, gated: bool) -> None:
        self.tenants, self.bus = tenants, bus
        self.config = tenants.config
        # Of the prompts captured here, those held back for the gate of whichever replica owns their tenant
        # (every replica that has a gate holds back; one without judges nothing and holds back nothing).
        quality = self.config.quality
        self.holdback = HoldBack(replace(quality, enabled=quality.enabled and gated))

    # -- engine thread -----------------------------------------------------------------------------

    def counted(self, tenant: str, served: int) -> int | None:
        """The version that tokens of `tenant` served with its basis version `served` count against, None
        when they do not count: the tenant is frozen, or (async) a newer version has replaced that basis
        (counted as stale). In shadow mode they count against the tenant's latest version."""
        tenants = self.tenants
        if self.config.mode not in ("async", "shadow"):
            return None
        with tenants.lock:
            state = tenants.state(tenant)
            if state.frozen:
                return None
            if self.config.mode == "shadow":
                return state.version
            if not tenants.counts(state, served):
                tenants.stats.stale_captures += 1
                if state.bases is not None and served == 0:  # evicted from the bank: bring it back
                    tenants.bank.publish(tenant, state.bases, state.version)
                return None
            return served

    def served_bases(self, tenant: str, version: int) -> torch.Tensor:
        """The bases (L, E, D) of the tenant's `version`, when that is its current version (the only one
        whose tokens count); the trained bases otherwise."""
        with self.tenants.lock:
            state = self.tenants.states.get(tenant)
            if state is None or state.version != version or state.bases is None:
                return self.tenants.trained
            return state.bases

    def hold_back(self, tenant: str, ids: torch.Tensor) -> bool:
        """Whether the prompt `ids` (S,) of `tenant` is held back for the quality gate, and so not captured."""
        if self.config.mode not in ("async", "shadow"):
            return False
        with self.tenants.lock:
            if self.tenants.state(tenant).frozen:
                return False
        return self.holdback.offer(tenant, ids)

    def take(self, names: list[str | None], stats: ForwardStatistics, load: torch.Tensor) -> None:
        """Takes the statistics of one forward: group g of `stats` holds the tokens of `names[g]` (None: a
        group not captured), accepted for their version; `load` (G, L, E) counts them per expert."""
        tenants, pending = self.tenants, self.tenants.pending
        now = time.time()
        wake = False
        with tenants.lock:
            taken: list[str] = []
            groups: list[int] = []
            for g, tenant in enumerate(names):
                if tenant is None:
                    continue
                state = tenants.state(tenant)
                tenants.stats.captured += stats.counts[g]
                if state.frozen or not tenants.counts(state, stats.versions[g]):  # a freeze or commit meanwhile
                    tenants.stats.stale_captures += not tenants.counts(state, stats.versions[g])
                    continue
                waiting = pending.version(tenant)
                if waiting is not None and not tenants.counts(state, waiting):  # of a replaced basis
                    tenants.stats.stale_captures += 1
                    pending.discard(tenant)
                taken.append(tenant)
                groups.append(g)
                _explained(state, stats.counts[g].sampled, stats.explained[g])
            before = [pending.tokens(t) for t in taken]
            pending.add(taken, groups, stats, load, now)
            for tenant, had in zip(taken, before, strict=True):
                # Only a tenant that now makes a batch (or is new here) wakes the loop: one held back by
                # `min_interval` falls due on the loop's own timer, not at every forward that adds to it.
                crossed = had < self.config.min_tokens <= pending.tokens(tenant)
                wake |= crossed or not tenants.states[tenant].loaded
        if wake:
            tenants.wake()

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

    # -- event loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Publishes each tenant's statistics once they make a batch; loads first-seen tenants."""
        await self.tenants.run_due(self._due, self.publish, self._until_due)

    def take_batch(self, tenant: str) -> StatisticsBatch | None:
        """The tenant's pending statistics as one batch, removed from pending."""
        tenants = self.tenants
        with tenants.lock:
            taken = tenants.pending.take(tenant)
            if taken is None:
                return None
            tenants.states[tenant].published = time.monotonic()
            stats, load, first_seen = taken
            if not stats.tokens:
                return None
            return StatisticsBatch(tenant, stats, load, first_seen, held=self.holdback.take(tenant))

    async def publish(self, tenant: str) -> None:
        """Publishes the tenant's pending statistics; they are put back when the bus fails."""
        batch = self.take_batch(tenant)
        if batch is None:
            return
        try:
            await self.bus.publish(batch)
            self.tenants.stats.batches["published"] += 1
        except Exception:
            self._put_back(batch)
            raise

    async def publish_all(self) -> None:
        """Publishes what every loaded tenant has pending (on shutdown: best effort)."""
        with self.tenants.lock:
            waiting = [t for t in self.tenants.pending.tenants() if self.tenants.states[t].loaded]
        for tenant in waiting:
            await self.publish(tenant)

    def _put_back(self, batch: StatisticsBatch) -> None:
        """Returns an unpublished batch to pending (statistics add up, so this stays bounded)."""
        tenants = self.tenants
        with tenants.lock:
            state = tenants.state(batch.tenant)  # forgotten while publishing: counted against its reload
            self.holdback.waiting.add(batch.tenant, batch.held)
            if not tenants.counts(state, batch.version) or not tenants.pending.put_back(
                batch.tenant, batch.stats, batch.load, batch.first_seen
            ):
                tenants.stats.stale_captures += 1

    def _until_due(self) -> float | None:
        """Seconds until the first batch held back only by `min_interval` falls due; None when none is."""
        tenants = self.tenants
        with tenants.lock:
            ready = [
                s.published + self.config.min_interval
                for t, s in tenants.states.items()
                if s.loaded and tenants.pending.tokens(t) >= self.config.min_tokens
            ]
        return max(0.0, min(ready) - time.monotonic()) if ready else None

    def _due(self, tenant: str, state: TenantState) -> bool:
        if self.tenants.pending.tokens(tenant) < self.config.min_tokens:
            return False
        return time.monotonic() - state.published >= self.config.min_interval


def _explained(state: TenantState, tokens: int, explained: float | None) -> None:
    """Folds a forward's explained variance into the tenant's moving average (by tokens)."""
    state.traffic += tokens
    if explained is None:
        return
    if state.explained is None:
        state.explained = explained
    else:
        state.explained += (1 - 0.5 ** (tokens / EXPLAINED_HALF_LIFE)) * (explained - state.explained)
