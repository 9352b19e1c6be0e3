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

from ..model.gha import gha_step, orthogonality_defect, projection_distance
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
        proposed = gha_step(current_l, s.s1, s.s2, s.n, lr)
        change = proposed - current_l.float()
        norm = float(change.norm())
        if norm > guard.max_step:  # cap the step: move towards the proposal by at most max_step
            proposed = current_l.float() + change * (guard.max_step / norm)
            proposed = proposed / proposed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        distance = projection_distance(proposed, trained_l)
        defect = orthogonality_defect(proposed)
        allowed_defect = orthogonality_defect(trained_l) + guard.orthogonality_tolerance
        reason = ""
        if not torch.isfinite(proposed).all():
            reason = "non-finite basis"
        elif distance > guard.max_distance:
            reason = f"distance {distance:.3f} from the trained basis over {guard.max_distance}"
        elif defect > allowed_defect:
            reason = f"orthogonality defect {defect:.3f} over {allowed_defect:.3f}"
        ok = not reason and s.n > 0
        layers.append(proposed if ok else current_l.float())
        report.applied.append(ok)
        report.step_norms.append(min(norm, guard.max_step))
        report.distances.append(distance)
        report.defects.append(defect)
        report.reasons.append(reason)
    return torch.stack(layers), report


def load_entropy(counts: torch.Tensor) -> float:
    """Entropy (nats) of an expert-load histogram (E,): log E when uniform, 0 when one expert takes all."""
    total = float(counts.sum())
    if total <= 0:
        return math.log(max(1, counts.numel()))
    p = counts.float() / total
    return float(-(p[p > 0] * p[p > 0].log()).sum())
