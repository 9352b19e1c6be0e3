"""Guardrails around a tenant's GHA step: what a commit must satisfy, checked before it happens.

Known failure modes of test-time adaptation (STAR.md): long-stream collapse, poisoning by a few crafted
inputs, non-finite values. Capture clips and screens tokens; here each layer's step is capped in size,
the new basis must stay within a projection distance of the trained one and no less orthonormal than it
by more than a tolerance, and a
tenant whose expert load collapses (low entropy) is flagged for rollback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..model.gha import GhaStatistics, gha_step, orthogonality_defect, projection_distance
from .capture import LayerStatistics


@dataclass(frozen=True)
class Guardrails:
    max_step: float = 0.05  # largest Frobenius norm of one layer's change, before renormalisation
    max_distance: float = 0.5  # largest projection distance from the trained basis, per layer
    # The most a commit may add to the trained basis's ||V V^T - I||_F (GHA with row renormalisation
    # alone leaves trained bases only roughly orthogonal, so the check is relative to where they started).
    orthogonality_tolerance: float = 0.25
    entropy_floor: float = 0.5  # expert-load entropy (nats) under which a tenant is rolled back


@dataclass
class StepReport:
    """What one guarded step did, per layer."""

    applied: list[bool] = field(default_factory=list)
    step_norms: list[float] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    defects: list[float] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def any_applied(self) -> bool:
        return any(self.applied)


@dataclass(frozen=True)
class LayerStep:
    basis: torch.Tensor  # (E, D) float32: the proposal if applied, else the current basis
    applied: bool
    step_norm: float
    distance: float
    defect: float
    reason: str  # why it was refused; empty when applied


def guarded_layer_step(
    trained: torch.Tensor,  # (E, D)
    current: torch.Tensor,  # (E, D): the basis the statistics were taken against
    stats: GhaStatistics,
    lr: float,
    guard: Guardrails,
) -> LayerStep:
    """One layer's GHA step, capped in size; refused (the basis kept) when it breaks a guardrail."""
    current = current.float()
    proposed = gha_step(current, stats.s1, stats.s2, stats.n, lr)
    change = proposed - current
    norm = float(change.norm())
    if norm > guard.max_step:  # cap the step: move towards the proposal by at most max_step
        proposed = current + change * (guard.max_step / norm)
        proposed = proposed / proposed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    distance = projection_distance(proposed, trained)
    defect = orthogonality_defect(proposed)
    allowed_defect = orthogonality_defect(trained) + guard.orthogonality_tolerance
    reason = ""
    if not torch.isfinite(proposed).all():
        reason = "non-finite basis"
    elif distance > guard.max_distance:
        reason = f"distance {distance:.3f} from the trained basis over {guard.max_distance}"
    elif defect > allowed_defect:
        reason = f"orthogonality defect {defect:.3f} over {allowed_defect:.3f}"
    applied = not reason and stats.n > 0
    return LayerStep(proposed if applied else current, applied, min(norm, guard.max_step), distance, defect, reason)


def guarded_step(
    trained: torch.Tensor,  # (L, E, D)
    current: torch.Tensor,  # (L, E, D): the version the statistics were taken against
    stats: LayerStatistics,
    lr: float,
    guard: Guardrails,
) -> tuple[torch.Tensor, StepReport]:
    """One GHA step per layer from `stats`; a layer whose step breaks a guardrail keeps its basis."""
    report = StepReport()
    layers = []
    for trained_l, current_l, s in zip(trained, current, stats.layers, strict=True):
        step = guarded_layer_step(trained_l, current_l, s, lr, guard)
        layers.append(step.basis)
        report.applied.append(step.applied)
        report.step_norms.append(step.step_norm)
        report.distances.append(step.distance)
        report.defects.append(step.defect)
        report.reasons.append(step.reason)
    return torch.stack(layers), report


def load_entropy(counts: torch.Tensor) -> float:
    """Entropy (nats) of an expert-load histogram (E,): log E when uniform, 0 when one expert takes all."""
    total = float(counts.sum())
    if total <= 0:
        return math.log(max(1, counts.numel()))
    p = counts.float() / total
    return float(-(p[p > 0] * p[p > 0].log()).sum())
