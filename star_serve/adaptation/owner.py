"""The owner of some tenants' updates: it receives their statistics batches from the bus, decides what to
do with them as a pure function (`plan_step`: given a tenant's committed state and the batches delivered
for it), has the quality gate judge a candidate, and carries the decision out (`Owner`): commits the
version by compare-and-set together with the batches' ids, or rolls the tenant back, and counts each
batch's outcome. Tests call `plan_step` directly.

Staleness is decided in one place, `tenants.staleness`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from .bus import Delivery, StatisticsBatch, StatisticsBus
from .capture import LayerStatistics
from .errors import CommitConflict
from .guardrails import Guardrails, StepReport, collapsed, guarded_step, load_entropies
from .quality import QualityGate
from .store import Snapshot
from .tenants import Tenants, TenantState, staleness

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Committed:
    """What the owner knows of a tenant when it decides: its committed version and settings."""

    version: int
    bases: torch.Tensor  # (L, E, D) float32: the committed version's (the trained ones at version 0)
    learning_rate: float
    frozen: bool
    drifts: list[float]  # each layer's projection distance from the trained basis
    frozen_entropy: list[float] | None  # each layer's expert-load entropy under the trained bases, once known


@dataclass(frozen=True)
class Decision:
    """`action`: "commit" a new version (`bases`, `drifts`) folding in `batches`; "rollback" the tenant to
    its previous version (its expert load collapsed), refusing `batches`; "refuse" `batches` (frozen, or every
    layer's step broke a guardrail); or "none". `dropped` are too old to fold in; batches ahead of the
    committed version are in neither and wait. `frozen_entropy`, when not None, is the tenant's frozen routing
    entropy that these batches measured first."""

    action: Literal["commit", "rollback", "refuse", "none"]
    batches: list[StatisticsBatch] = field(default_factory=list)
    dropped: list[StatisticsBatch] = field(default_factory=list)
    reason: str = ""
    bases: torch.Tensor | None = None
    drifts: list[float] | None = None
    report: StepReport | None = None
    tokens: int = 0
    frozen_entropy: list[float] | None = None

    @property
    def handled(self) -> set[str]:
        """The ids of the batches done with, whatever the outcome (the rest are to be tried again)."""
        return {b.id for b in [*self.batches, *self.dropped]}


def plan_step(
    state: Committed,
    batches: list[StatisticsBatch],  # delivered, not yet applied
    trained: torch.Tensor,  # (L, E, D) float32
    guard: Guardrails,
    max_staleness: int,
    serving: bool = True,  # whether committed versions route the tenant (not in shadow mode)
) -> Decision:
    """What the owner does with `batches` for a tenant in `state`."""
    kinds = {b.id: staleness(b.version, state.version, max_staleness) for b in batches}
    fresh = [b for b in batches if kinds[b.id] in ("current", "behind")]
    dropped = [b for b in batches if kinds[b.id] == "too_old"]
    if not fresh:
        return Decision("none", dropped=dropped)
    if state.frozen:
        return Decision("refuse", fresh, dropped, reason="frozen")
    measured = None
    if serving:
        frozen_loads = [b.load for b in fresh if b.version == 0]  # served by the trained bases
        if state.frozen_entropy is None and frozen_loads:
            measured = load_entropies(torch.stack(frozen_loads).sum(0)).tolist()
        adapted = [b.load for b in fresh if b.version > 0]
        baseline = state.frozen_entropy or measured
        if adapted and collapsed(torch.stack(adapted).sum(0), baseline, guard):
            return Decision("rollback", fresh, dropped, reason="expert load collapsed", frozen_entropy=measured)
    stats = combined(state.version, fresh)
    new, report = guarded_step(trained, state.bases, stats, state.learning_rate, guard)
    if not report.any_applied:
        reasons = "; ".join(f"layer {i}: {r}" for i, r in enumerate(report.reasons) if r) or "no tokens"
        return Decision("refuse", fresh, dropped, reason=reasons, report=report, frozen_entropy=measured)
    # The step measured each layer's distance; a refused layer kept its basis, and its distance.
    drifts = [d if ok else kept for d, ok, kept in zip(report.distances, report.applied, state.drifts, strict=True)]
    return Decision("commit", fresh, dropped, "", new, drifts, report, stats.tokens, measured)


def combined(version: int, batches: list[StatisticsBatch]) -> LayerStatistics:
    """The batches' statistics summed layer by layer, counted as taken against `version`."""
    per_batch = [b.stats.layers for b in batches]
    return LayerStatistics(version, [sum(layer[1:], layer[0]) for layer in zip(*per_batch, strict=True)])


class Owner:
    """Applies the batches that the bus delivers for the tenants this replica owns. What could not be
    applied (the store down, a lost race) is kept and tried again."""

    def __init__(self, tenants: Tenants, bus: StatisticsBus, gate: QualityGate | None) -> None:
        self.tenants, self.bus, self.gate = tenants, bus, gate  # gate None: every step is committed
        self.stopping = False  # set on shutdown: `run` returns after the read it is in

    async def run(self) -> None:
        """Receives batches, applies them by tenant, acknowledges what was handled."""
        tenants, poll = self.tenants, self.tenants.config.poll_interval
        retry: dict[str, Delivery] = {}
        renewed = -math.inf
        while not self.stopping:
            try:
                if time.monotonic() - renewed >= poll:
                    retry.update((d.batch.id, d) for d in await self.bus.maintain())
                    renewed = time.monotonic()
                retry.update((d.batch.id, d) for d in await self.bus.receive(0.0 if retry else poll))
            except asyncio.CancelledError:
                raise
            except Exception:
                tenants.store_failed("receiving statistics")
                await asyncio.sleep(poll)
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
                    tenants.store_failed(f"applying statistics of {tenant}")
                    done = []
                retry.update((d.batch.id, d) for d in deliveries if d not in done)
            if retry:
                await asyncio.sleep(poll if not tenants.store_ok else 0.05)

    async def apply(self, tenant: str, batches: list[StatisticsBatch]) -> tuple[set[str], bool]:
        """Carries out `plan_step` on `batches`: one guarded step committed together with their ids, or a
        rollback, or nothing. Returns the ids handled (applied, or dropped for a reason that will not
        change) and whether a version was committed; a batch not handled is to be tried again."""
        tenants, model, store, config = self.tenants, self.tenants.model, self.tenants.store, self.tenants.config
        async with tenants.steps[tenant]:
            state = await tenants.ensure_loaded(tenant)
            if not state.loaded:
                return set(), False
            if any(b.version > state.version for b in batches):  # another owner was ahead of this one
                versions = await store.versions(model, tenant)
                if versions:
                    await tenants.refresh(tenant, versions[-1])
            handled = await store.applied(model, tenant, [b.id for b in batches])
            tenants.stats.batches["duplicate"] += len(handled)
            todo = [b for b in batches if b.id not in handled]
            if self.gate is not None:
                for b in todo:
                    self.gate.receive(tenant, b.held)
            tenants.configured(tenant, state, await store.settings(model, tenant))
            with tenants.lock:
                committed = Committed(
                    state.version,
                    tenants.trained if state.bases is None else state.bases,
                    state.learning_rate,
                    state.frozen,
                    state.drifts or [0.0] * len(tenants.trained),
                    state.frozen_entropy,
                )
            decision = plan_step(committed, todo, tenants.trained, config.guard, config.max_staleness, tenants.serving)
            tenants.stats.batches["stale"] += len(decision.dropped)
            if decision.frozen_entropy is not None:
                state.frozen_entropy = decision.frozen_entropy
            done = handled | decision.handled
            if decision.action == "none":
                return done, False
            if decision.action == "refuse":
                log.info("%s/%s: %d batches refused: %s", model, tenant, len(decision.batches), decision.reason)
                tenants.stats.refused_steps += decision.report is not None
                tenants.stats.batches["frozen" if decision.reason == "frozen" else "refused"] += len(decision.batches)
                return done, False
            if decision.action == "rollback":
                log.warning("%s/%s: %s; rolling back", model, tenant, decision.reason)
                if not await self._roll_back(tenant, state, None):
                    return handled, False
                tenants.stats.batches["refused"] += len(decision.batches)
                return done, False
            if self.gate is not None and not await self._passes(tenant, state, committed.bases, decision):
                return done, False
            return handled | await self._commit(tenant, state, decision), True

    async def _passes(self, tenant: str, state: TenantState, current: torch.Tensor, decision: Decision) -> bool:
        """Whether the quality gate lets `decision`'s candidate be committed; counts a refusal, and rolls the
        tenant back to the trained bases when its committed version scores worse than them."""
        assert self.gate is not None and decision.bases is not None
        tenants = self.tenants
        verdict = await asyncio.to_thread(self.gate.judge, tenant, decision.bases, current, tenants.trained)
        state.verdict = verdict
        if verdict.accepted:
            return True
        log.info("%s/%s: %d batches refused: %s", tenants.model, tenant, len(decision.batches), verdict.reason)
        tenants.stats.batches["refused_quality"] += len(decision.batches)
        if state.version > 0 and verdict.degraded(self.gate.config.rollback_loss_increase):
            log.warning(
                "%s/%s: version %d scores %.4f on held-back prompts, the trained bases %.4f; rolling back to them",
                *(tenants.model, tenant, state.version, verdict.current, verdict.trained),
            )
            if await self._roll_back(tenant, state, 0):
                tenants.stats.quality_rollbacks += 1
                state.verdict = replace(verdict, rolled_back=True)
        return False

    async def _roll_back(self, tenant: str, state: TenantState, version: int | None) -> bool:
        """Rolls the tenant back; False when another writer moved ahead (the tenant is reloaded first)."""
        try:
            await self.tenants.roll_back(tenant, state, version)
        except CommitConflict:
            self.tenants.lost(state)
            return False
        return True

    async def _commit(self, tenant: str, state: TenantState, decision: Decision) -> set[str]:
        """Commits a decision's new version by compare-and-set; the ids handled (none when it lost)."""
        assert decision.bases is not None
        tenants, version = self.tenants, state.version
        meta = tenants.meta(state, learning_rate=repr(state.learning_rate))
        snapshot = Snapshot(tenants.model, tenant, version + 1, decision.bases, meta=meta)
        applied = [b.id for b in decision.batches]
        if not await tenants.store.commit(snapshot, expected=version, applied=applied):
            tenants.stats.commits_lost += 1
            tenants.lost(state)
            return set()
        now = time.time()
        with tenants.lock:
            tenants.adopt(tenant, state, snapshot, tokens=decision.tokens, drifts=decision.drifts)
            tenants.stats.batches["applied"] += len(decision.batches)
        tenants.committed([now - b.first_seen for b in decision.batches])
        return decision.handled
