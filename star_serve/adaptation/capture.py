"""Capture: a tenant's router inputs reduced, at once, to the GHA statistics of every MoE layer.

Tokens are sampled, screened (non-finite rows rejected) and norm-clipped before they count, so that a few
crafted inputs cannot steer the subspace. Only the statistics `(S1, S2, N)` leave this module: no raw
activations are queued, and no (N, E, D) tensor is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.gha import GhaStatistics


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


def capture_groups(
    bases: torch.Tensor,  # (R, L, E, D): the bank rows that served these tokens
    rows: torch.Tensor,  # (B,) each sequence's row of `bases`
    router_inputs: list[torch.Tensor],  # L x (B, S, D)
    tokens: torch.Tensor,  # (B, S) bool: the tokens that count (not padding, not of a tenant left out)
    groups: torch.Tensor,  # (B,) each sequence's group (tenant), in [0, len(versions))
    versions: list[int],  # (G,) the basis version each group was served with
    config: CaptureConfig,
    generator: torch.Generator | None = None,
) -> list[LayerStatistics]:
    """The statistics of every group's tokens of one forward, at once: the work is a few batched products per
    layer over the forward's own (B, S) layout, and one copy to the host, however many groups there are."""
    device = router_inputs[0].device
    b, s = tokens.shape
    g = len(versions)
    keep = tokens.to(device)
    groups = groups.to(device)
    if config.sample_rate < 1.0:
        keep = keep & (torch.rand(b, s, generator=generator).to(device) < config.sample_rate)
    # A group's budget is spent in token order: its earlier sequences first, then position by position.
    kept = keep.sum(dim=1)  # (B,)
    member = torch.nn.functional.one_hot(groups, g)  # (B, G)
    before = (member * kept[:, None]).cumsum(dim=0).gather(1, groups[:, None]).squeeze(1) - kept  # (B,)
    within = before[:, None] + keep.cumsum(dim=1)  # (B, S): the token's rank in its group
    over_budget = keep & (within > config.max_tokens_per_batch)
    keep = keep & ~over_budget
    # A token rejected (non-finite) at any layer is dropped at every layer, so that N agrees across layers.
    finite = torch.stack([x.isfinite().all(dim=-1) for x in router_inputs]).all(dim=0)  # (B, S)
    rejected = keep & ~finite
    keep = keep & finite
    clipped = torch.zeros_like(keep)
    s1, s2 = [], []
    for layer, x in enumerate(router_inputs):
        x = torch.where(keep[..., None], x.detach().float(), 0.0)  # (B, S, D)
        norms = x.norm(dim=-1, keepdim=True)
        over = norms > config.max_token_norm
        clipped |= over.squeeze(-1)
        x = torch.where(over, x * (config.max_token_norm / norms.clamp_min(1e-12)), x)
        basis = bases[rows.to(bases.device), layer].to(device, torch.float32)  # (B, E, D)
        y = torch.bmm(x, basis.transpose(1, 2))  # (B, S, E)
        s1.append(_by_group(torch.bmm(y.transpose(1, 2), x), groups, g))  # (G, E, D)
        s2.append(_by_group(torch.bmm(y.transpose(1, 2), y), groups, g))  # (G, E, E)
    per_sequence = torch.stack([keep, clipped, rejected, over_budget]).sum(dim=2)  # (4, B)
    counts = _by_group(per_sequence.T, groups, g).T.tolist()  # (4, G), on the host
    s1_host, s2_host = torch.stack(s1, dim=1).cpu(), torch.stack(s2, dim=1).cpu()  # (G, L, E, D), (G, L, E, E)
    return [
        LayerStatistics(
            version,
            [GhaStatistics(a, b, int(counts[0][i])) for a, b in zip(s1_host[i], s2_host[i], strict=True)],
            CaptureCounts(*(int(c[i]) for c in counts)),
        )
        for i, version in enumerate(versions)
    ]


def capture(
    bases: torch.Tensor,  # (L, E, D): the basis version that served these tokens
    router_inputs: list[torch.Tensor],  # L x (N, D): the same N tokens at every layer
    version: int,
    config: CaptureConfig,
    generator: torch.Generator | None = None,
) -> LayerStatistics:
    """The statistics of one tenant's tokens, against `bases`."""
    n = router_inputs[0].shape[0]
    inputs = [x[None] for x in router_inputs]  # one sequence of N tokens
    one = torch.zeros(1, dtype=torch.long)
    every = torch.ones(1, n, dtype=torch.bool)
    return capture_groups(bases[None], one, inputs, every, one, [version], config, generator)[0]


def expert_load(
    expert_indices: list[torch.Tensor],  # L x (B, S, k)
    tokens: torch.Tensor,  # (B, S) bool
    groups: torch.Tensor,  # (B,) each sequence's group
    num_groups: int,
    num_experts: int,
) -> torch.Tensor:
    """(G, L, E) on the host: how many of each group's tokens every layer sent to each expert."""
    indices = torch.stack(expert_indices)  # (L, B, S, k)
    layers, device = len(expert_indices), indices.device
    group = groups.to(device)[None, :, None, None]
    layer = torch.arange(layers, device=device)[:, None, None, None]
    key = (group * layers + layer) * num_experts + indices  # (L, B, S, k)
    counted = tokens.to(device)[None, :, :, None].expand_as(key)
    load = torch.bincount(key[counted], minlength=num_groups * layers * num_experts)
    return load.view(num_groups, layers, num_experts).cpu()


def _by_group(values: torch.Tensor, groups: torch.Tensor, g: int) -> torch.Tensor:
    """Sums the rows of `values` (B, ...) that share a group: (G, ...)."""
    return torch.zeros(g, *values.shape[1:], dtype=values.dtype, device=values.device).index_add_(0, groups, values)
