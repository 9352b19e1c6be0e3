"""Capture: a tenant's router inputs reduced, at once, to the GHA statistics of every MoE layer.

Tokens are sampled, screened (non-finite rows rejected) and norm-clipped before they count, so that a few
crafted inputs cannot steer the subspace. Only the statistics `(S1, S2, N)` leave this module: no raw
activations are queued, and no (N, E, D) tensor is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import Settings
from ..model.gha import GhaStatistics

CHUNK = 16  # tokens of one group per batched product in `capture_groups`


@dataclass(frozen=True)
class CaptureConfig:
    sample_rate: float = Settings.default("adaptation_sample_rate")  # fraction of a tenant's tokens that count
    max_token_norm: float = Settings.default("max_token_norm")  # rows above this L2 norm are scaled down to it
    # per tenant and capture pass: beyond it, tokens are dropped
    max_tokens_per_batch: int = Settings.default("adaptation_token_budget")

    @classmethod
    def from_settings(cls, settings: Settings) -> CaptureConfig:
        return cls(settings.adaptation_sample_rate, settings.max_token_norm, settings.adaptation_token_budget)


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


@dataclass
class ForwardStatistics:
    """The statistics of every group (tenant) of one forward, stacked, on the capture device."""

    s1: torch.Tensor  # (G, L, E, D)
    s2: torch.Tensor  # (G, L, E, E)
    counts: list[CaptureCounts]  # (G,) on the host
    versions: list[int]  # (G,) the basis version each group was served with
    explained: list[float | None]  # (G,) share of the tokens' energy in the subspace, ||X V^T||^2 / ||X||^2

    def group(self, g: int) -> LayerStatistics:
        """One group's statistics, on the host."""
        s1, s2, n = self.s1[g].cpu(), self.s2[g].cpu(), self.counts[g].sampled
        layers = [GhaStatistics(a, b, n) for a, b in zip(s1, s2, strict=True)]
        return LayerStatistics(self.versions[g], layers, self.counts[g])


def screen(x: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one screening rule of router inputs `x` (L, N, D), the same N tokens at L layers, applied in
    place: a token whose norm is not finite at some layer (a non-finite input, or one so large that its norm
    overflows) is rejected, as zeros, at every layer, so that N agrees across layers; the others are scaled
    down to `max_norm`. Returns the norms after screening (L, N), which tokens are kept (N,) and which of
    those were clipped (N,)."""
    norms = torch.linalg.vector_norm(x, dim=-1)  # (L, N)
    kept = norms.isfinite().all(dim=0)  # (N,)
    scale = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)  # (L, N): 1 unless clipped
    x.mul_(scale[..., None]).masked_fill_(~kept[:, None], 0.0)
    clipped = kept & (scale < 1.0).any(dim=0)
    return torch.where(kept, norms * scale, 0.0), kept, clipped


def capture_groups(
    bases: torch.Tensor,  # (R, L, E, D): the bank rows that served these tokens
    rows: torch.Tensor,  # (B,) each sequence's row of `bases`
    router_inputs: list[torch.Tensor],  # L x (B, S, D)
    tokens: torch.Tensor,  # (B, S) bool: the tokens that count (not padding, not of a tenant left out)
    groups: torch.Tensor,  # (B,) each sequence's group (tenant), in [0, len(versions))
    versions: list[int],  # (G,) the basis version each group was served with
    config: CaptureConfig,
    generator: torch.Generator | None = None,
) -> ForwardStatistics:
    """The statistics of every group's tokens of one forward, at once, however many groups there are.

    The tokens that count are gathered group by group into chunks of `CHUNK` tokens, each chunk of one
    group, so that a few batched products over the chunks, all layers together, give every group's sums:
    a decode step's many one-token sequences cost no more than one long sequence, and padding costs
    nothing. A token whose norm is not finite at some layer (a non-finite input, or one so large that its
    norm overflows) is rejected at every layer, so that N agrees across layers; the others are scaled
    down to `max_token_norm` (`screen`). One copy of the counts goes to the host."""
    b, s = tokens.shape
    device, g = router_inputs[0].device, len(versions)
    keep = tokens.to(device)
    groups = groups.to(device)
    if config.sample_rate < 1.0:
        keep = keep & (torch.rand(b, s, generator=generator).to(device) < config.sample_rate)
    # A group's budget is spent in token order: its earlier sequences first, then position by position.
    kept = keep.sum(dim=1)  # (B,)
    member = torch.nn.functional.one_hot(groups, g)  # (B, G)
    before = (member * kept[:, None]).cumsum(dim=0).gather(1, groups[:, None]).squeeze(1) - kept  # (B,)
    over_budget = keep & (before[:, None] + keep.cumsum(dim=1) > config.max_tokens_per_batch)
    keep = keep & ~over_budget
    # The tokens that count, group by group, each group's in token order.
    sequence, position = keep.nonzero(as_tuple=True)  # (N,)
    group = groups[sequence]
    order = group.argsort(stable=True)
    sequence, position, group = sequence[order], position[order], group[order]
    x = torch.stack([layer.detach()[sequence, position] for layer in router_inputs]).float()  # (L, N, D)
    layers, n, dim = x.shape
    norms, finite, clipped = screen(x, config.max_token_norm)  # (L, N), (N,), (N,)
    # Chunk c holds tokens [CHUNK * k, CHUNK * (k + 1)) of its group, zero-padded.
    sizes = torch.bincount(group, minlength=g)  # (G,)
    chunks = (sizes + CHUNK - 1) // CHUNK  # (G,)
    within = torch.arange(n, device=device) - (sizes.cumsum(0) - sizes)[group]
    chunk = (chunks.cumsum(0) - chunks)[group] + within // CHUNK
    num_chunks = int(chunks.sum())
    packed = x.new_zeros(layers, num_chunks, CHUNK, dim)
    packed[:, chunk, within % CHUNK] = x
    chunk_group = torch.repeat_interleave(torch.arange(g, device=device), chunks)  # (C,)
    group_row = torch.zeros(g, dtype=torch.long, device=device).scatter_(0, groups, rows.to(device))  # (G,)
    basis = bases[group_row[chunk_group].to(bases.device)].to(device, torch.float32).transpose(0, 1)  # (L, C, E, D)
    e = bases.shape[-2]
    packed, basis = packed.view(layers * num_chunks, CHUNK, dim), basis.reshape(layers * num_chunks, e, dim)
    y = torch.bmm(packed, basis.transpose(1, 2))  # (L*C, CHUNK, E)
    s1 = torch.bmm(y.transpose(1, 2), packed).view(layers, num_chunks, e, dim)  # (L, C, E, D)
    s2 = torch.bmm(y.transpose(1, 2), y).view(layers, num_chunks, e, e)  # (L, C, E, E)
    s1_groups = _by_group(s1.transpose(0, 1), chunk_group, g)  # (G, L, E, D)
    s2_groups = _by_group(s2.transpose(0, 1), chunk_group, g)  # (G, L, E, E)
    energy = _by_group(norms.square().T, group, g)  # (G, L): ||X||^2
    within_subspace = s2_groups.diagonal(dim1=-2, dim2=-1).sum(dim=-1)  # (G, L): ||X V^T||^2
    explained = (within_subspace / energy.clamp_min(1e-12)).mean(dim=1)  # (G,)
    per_token = torch.stack([finite, clipped, ~finite]).long().T  # (N, 3): sampled, clipped, rejected
    counts = torch.cat(
        [_by_group(per_token, group, g), _by_group(over_budget.sum(dim=1), groups, g)[:, None], explained[:, None]],
        dim=1,
    ).tolist()  # (G, 5), on the host
    return ForwardStatistics(
        s1_groups,
        s2_groups,
        [CaptureCounts(*map(int, c[:4])) for c in counts],
        list(versions),
        [c[4] if c[0] else None for c in counts],
    )


def capture_one(
    bases: torch.Tensor,  # (L, E, D): the basis version that served these tokens
    router_inputs: list[torch.Tensor],  # L x (N, D): the same N tokens at every layer
    version: int,
    config: CaptureConfig,
    generator: torch.Generator | None = None,
) -> ForwardStatistics:
    """The statistics of one tenant's tokens, against `bases`, as a single group."""
    n = router_inputs[0].shape[0]
    inputs = [x[None] for x in router_inputs]  # one sequence of N tokens
    one, every = torch.zeros(1, dtype=torch.long), torch.ones(1, n, dtype=torch.bool)
    return capture_groups(bases[None], one, inputs, every, one, [version], config, generator)


def capture(
    bases: torch.Tensor,
    router_inputs: list[torch.Tensor],
    version: int,
    config: CaptureConfig,
    generator: torch.Generator | None = None,
) -> LayerStatistics:
    """The statistics of one tenant's tokens, against `bases`, on the host."""
    return capture_one(bases, router_inputs, version, config, generator).group(0)


def expert_load(
    expert_indices: list[torch.Tensor],  # L x (B, S, k)
    tokens: torch.Tensor,  # (B, S) bool
    groups: torch.Tensor,  # (B,) each sequence's group
    num_groups: int,
    num_experts: int,
) -> torch.Tensor:
    """(G, L, E) on the tokens' device: how many of each group's tokens every layer sent to each expert."""
    indices = torch.stack(expert_indices)  # (L, B, S, k)
    layers, device = len(expert_indices), indices.device
    group = groups.to(device)[None, :, None, None]
    layer = torch.arange(layers, device=device)[:, None, None, None]
    key = (group * layers + layer) * num_experts + indices  # (L, B, S, k)
    counted = tokens.to(device)[None, :, :, None].expand_as(key)
    load = torch.bincount(key[counted], minlength=num_groups * layers * num_experts)
    return load.view(num_groups, layers, num_experts)


def _by_group(values: torch.Tensor, groups: torch.Tensor, g: int) -> torch.Tensor:
    """Sums the rows of `values` (B, ...) that share a group: (G, ...)."""
    return torch.zeros(g, *values.shape[1:], dtype=values.dtype, device=values.device).index_add_(0, groups, values)
