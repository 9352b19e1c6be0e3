"""Guardrails around a tenant's GHA step: what a commit must satisfy, checked before it happens.

Known failure modes of test-time adaptation (STAR.md): long-stream collapse, poisoning by a few crafted
inputs, non-finite values. Capture clips and screens tokens; here each layer's step is capped in size,
the new basis must stay within a projection distance of the trained one and no less orthonormal than it
by more than a tolerance, and a tenant whose expert load collapses is rolled back. Collapse is judged
against the tenant's own routing under the trained bases: a tenant whose traffic always went to few
experts (code, upper-cased text) has a low entropy that no adaptation caused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..model.gha import GhaStatistics, gha_step, orthogonality_defects, projection_distances, retract
from .capture import LayerStatistics


@dataclass(frozen=True)
class Guardrails:
    max_step: float = 0.05  # largest Frobenius norm of one layer's change, before renormalisation
    max_distance: float = 0.5  # largest projection distance from the trained basis, per layer
    # The most a step may add to the trained basis's ||V V^T - I||_F (GHA with row renormalisation alone
    # leaves trained bases only roughly orthogonal, so the check is relative to where they started). A step
    # past it is retracted onto an orthonormal basis, not refused: GHA passes through such bases on its way
    # to a subspace that moved, and refusing them would hold the tenant there for good.
    orthogonality_tolerance: float = 0.25
    # A layer's expert-load entropy under this share of the tenant's frozen entropy (its tokens routed
    # with the trained bases) is a collapse, and the tenant is rolled back.
    min_entropy_ratio: float = 0.5


@dataclass
class StepReport:
    """What one guarded step did, per layer."""

    applied: list[bool] = field(default_factory=list)
    step_norms: list[float] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    defects: list[float] = field(default_factory=list)
    retracted: list[bool] = field(default_factory=list)  # Gram-Schmidt after the step (see Guardrails)
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
    bases, report = _guarded(trained[None], current[None], stats.s1[None], stats.s2[None], stats.n, lr, guard)
    return LayerStep(
        bases[0], report.applied[0], report.step_norms[0], report.distances[0], report.defects[0], report.reasons[0]
    )


def guarded_step(
    trained: torch.Tensor,  # (L, E, D)
    current: torch.Tensor,  # (L, E, D): the version the statistics were taken against
    stats: LayerStatistics,
    lr: float,
    guard: Guardrails,
) -> tuple[torch.Tensor, StepReport]:
    """One GHA step per layer from `stats`; a layer whose step breaks a guardrail keeps its basis."""
    counts = {s.n for s in stats.layers}
    if len(counts) != 1:
        raise ValueError(f"statistics of one capture count the same tokens at every layer, not {sorted(counts)}")
    s1 = torch.stack([s.s1 for s in stats.layers])
    s2 = torch.stack([s.s2 for s in stats.layers])
    return _guarded(trained, current, s1, s2, counts.pop(), lr, guard)


def _guarded(
    trained: torch.Tensor,  # (L, E, D)
    current: torch.Tensor,  # (L, E, D)
    s1: torch.Tensor,  # (L, E, D)
    s2: torch.Tensor,  # (L, E, E)
    n: int,
    lr: float,
    guard: Guardrails,
) -> tuple[torch.Tensor, StepReport]:
    """The guarded step of every layer at once: a few batched operations and one copy to the host,
    whatever the number of layers (the worker runs this on the event loop, beside the engine)."""
    trained, current = trained.float(), current.float()
    proposed = gha_step(current, s1, s2, n, lr)
    change = proposed - current
    norms = torch.linalg.vector_norm(change, dim=(-2, -1))  # (L,)
    # Cap the step: move towards the proposal by at most max_step, then back to unit rows.
    capped = current + change * (guard.max_step / norms.clamp_min(1e-30))[:, None, None]
    capped = capped / capped.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proposed = torch.where((norms > guard.max_step)[:, None, None], capped, proposed)
    # Rows less orthonormal than allowed are retracted, in Sanger's order: the same leading rows, the same
    # subspace, each row's sign kept.
    retracting = orthogonality_defects(proposed) > orthogonality_defects(trained) + guard.orthogonality_tolerance
    proposed = torch.where(retracting[:, None, None], retract(proposed), proposed)
    checks = torch.stack(
        [
            norms.double(),
            projection_distances(proposed, trained),
            orthogonality_defects(proposed).double(),
            retracting.double(),
            torch.isfinite(proposed).flatten(1).all(dim=1).double(),
        ]
    ).T.tolist()  # (L, 5) on the host
    report = StepReport()
    for norm, distance, defect, retracted, finite in checks:
        reason = ""
        if not finite:
            reason = "non-finite basis"
        elif distance > guard.max_distance:
            reason = f"distance {distance:.3f} from the trained basis over {guard.max_distance}"
        report.applied.append(not reason and n > 0)
        report.step_norms.append(min(norm, guard.max_step))
        report.distances.append(distance)
        report.defects.append(defect)
        report.retracted.append(bool(retracted))
        report.reasons.append(reason)
    applied = torch.tensor(report.applied, device=current.device)[:, None, None]
    return torch.where(applied, proposed, current), report


def load_entropies(counts: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each expert-load histogram (..., E): log E when uniform, 0 when one expert takes all."""
    counts = counts.double()
    total = counts.sum(dim=-1, keepdim=True)
    p = counts / total.clamp_min(1e-300)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    return torch.where(total[..., 0] > 0, entropy, math.log(max(1, counts.shape[-1])))


def collapsed(load: torch.Tensor, frozen: list[float] | None, guard: Guardrails) -> bool:
    """Whether some layer's expert load (L, E) has an entropy under `min_entropy_ratio` of the tenant's
    frozen entropy at that layer (L,); never when the frozen entropy is not known yet."""
    if frozen is None or not float(load.sum()):
        return False
    floor = guard.min_entropy_ratio * torch.tensor(frozen, dtype=torch.float64)
    return bool((load_entropies(load) < floor).any())


def load_entropy(counts: torch.Tensor) -> float:
    """Entropy (nats) of one expert-load histogram (E,)."""
    return float(load_entropies(counts))
