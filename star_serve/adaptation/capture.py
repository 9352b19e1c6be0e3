"""Capture: a tenant's router inputs reduced, at once, to the GHA statistics of every MoE layer.

Tokens are sampled, screened (non-finite rows rejected) and norm-clipped before they count, so that a few
crafted inputs cannot steer the subspace. Only the statistics `(S1, S2, N)` leave this module: no raw
activations are queued, and no (N, E, D) tensor is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.gha import GhaStatistics, gha_statistics


@dataclass(frozen=True)
class CaptureConfig:
    sample_rate: float = 1.0  # fraction of a tenant's tokens that count
    max_token_norm: float = 64.0  # rows above this L2 norm are scaled down to it
    max_tokens_per_batch: int = 4096  # per tenant and forward: beyond it, tokens are dropped


@dataclass
class CaptureCounts:
    """What happened to the tokens of one capture."""

    sampled: int = 0
    clipped: int = 0
    rejected: int = 0  # non-finite
    dropped: int = 0  # over the per-batch budget

    def __iadd__(self, other: CaptureCounts) -> CaptureCounts:
        self.sampled += other.sampled
        self.clipped += other.clipped
        self.rejected += other.rejected
        self.dropped += other.dropped
        return self


@dataclass
class LayerStatistics:
    """One tenant's statistics for every layer, all taken against the same basis version."""

    version: int
    layers: list[GhaStatistics]
    counts: CaptureCounts = field(default_factory=CaptureCounts)

    @property
    def tokens(self) -> int:
        return self.layers[0].n if self.layers else 0

    def __add__(self, other: LayerStatistics) -> LayerStatistics:
        if other.version != self.version:
            raise ValueError(f"statistics of versions {self.version} and {other.version} do not add up")
        counts = CaptureCounts()
        counts += self.counts
        counts += other.counts
        return LayerStatistics(self.version, [a + b for a, b in zip(self.layers, other.layers, strict=True)], counts)


def capture(
    bases: torch.Tensor,  # (L, E, D): the basis version that served these tokens
    router_inputs: list[torch.Tensor],  # L x (N, D): the same N tokens at every layer
    version: int,
    config: CaptureConfig,
    generator: torch.Generator | None = None,
) -> LayerStatistics:
    """The statistics of one tenant's tokens from one forward, against `bases`."""
    n = router_inputs[0].shape[0]
    rows = [x.detach().float().cpu() for x in router_inputs]  # L x (n, D)
    counts = CaptureCounts()
    if config.sample_rate < 1.0 or n > config.max_tokens_per_batch:
        keep = torch.ones(n, dtype=torch.bool)
        if config.sample_rate < 1.0:
            keep = torch.rand(n, generator=generator) < config.sample_rate
        chosen = keep.nonzero().squeeze(1)
        counts.dropped = max(0, len(chosen) - config.max_tokens_per_batch)
        chosen = chosen[: config.max_tokens_per_batch]
        rows = [r[chosen] for r in rows]
    # A token rejected (non-finite) at any layer is dropped at every layer, so that N agrees across layers.
    finite = torch.stack([r.isfinite().all(dim=-1) for r in rows]).all(dim=0)
    counts.rejected = int((~finite).sum())
    if counts.rejected:
        rows = [r[finite] for r in rows]
    counts.sampled = rows[0].shape[0]
    clipped = torch.zeros(counts.sampled, dtype=torch.bool)
    layers = []
    for basis, r in zip(bases, rows, strict=True):
        norms = r.norm(dim=-1, keepdim=True)
        over = norms > config.max_token_norm
        clipped |= over.squeeze(1)
        r = torch.where(over, r * (config.max_token_norm / norms.clamp_min(1e-12)), r)
        layers.append(gha_statistics(basis.cpu(), r))
    counts.clipped = int(clipped.sum())
    return LayerStatistics(version, layers, counts)
