"""The owner's decision, as a pure function: given a tenant's committed state and the statistics batches
delivered for it, what to do (`plan_step`). The worker (`worker.py`) carries the decision out: commits the
version by compare-and-set, or rolls the tenant back, and counts each batch's outcome. Tests call
`plan_step` directly; the quality gate of a candidate plugs in here.

Staleness is decided in one place, `staleness`: statistics are exact for the version they were taken
against; a batch a few versions behind (a replica that had not yet heard of the latest commit) folds into
the current basis as an asynchronous-SGD step would, one more than `max_staleness` behind is dropped, and
one ahead (another owner was ahead of this one) waits until this owner has caught up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .bus import StatisticsBatch
from .capture import LayerStatistics
from .guardrails import Guardrails, StepReport, collapsed, guarded_step, load_entropies

Staleness = Literal["current", "behind", "too_old", "ahead"]


def staleness(taken: int, current: int, max_staleness: int) -> Staleness:
    """How statistics taken against version `taken` stand against the tenant's `current` version."""
    if taken == current:
        return "current"
    if taken > current:
        return "ahead"
    return "behind" if current - taken <= max_staleness else "too_old"


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
