"""Capture: statistics equal gha_statistics of the screened tokens; poison is clipped or rejected."""

from __future__ import annotations

import torch

from star_serve.adaptation.capture import CaptureConfig, capture
from star_serve.model import gha_statistics, orthonormalize

L, E, D, N = 2, 4, 16, 50


def _bases(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([orthonormalize(torch.randn(E, D, generator=gen)) for _ in range(L)])


def test_clean_tokens_give_exactly_the_gha_statistics() -> None:
    bases = _bases()
    inputs = [torch.randn(N, D) for _ in range(L)]
    stats = capture(bases, inputs, version=3, config=CaptureConfig(max_token_norm=1e9))
    assert stats.version == 3 and stats.tokens == N
    assert (stats.counts.sampled, stats.counts.clipped, stats.counts.rejected) == (N, 0, 0)
    for layer, basis, x in zip(stats.layers, bases, inputs, strict=True):
        expected = gha_statistics(basis, x)
        torch.testing.assert_close(layer.s1, expected.s1)
        torch.testing.assert_close(layer.s2, expected.s2)


def test_non_finite_tokens_are_rejected_at_every_layer() -> None:
    inputs = [torch.randn(N, D) for _ in range(L)]
    inputs[0][3, 0] = float("nan")
    inputs[1][7, 5] = float("inf")
    stats = capture(_bases(), inputs, version=0, config=CaptureConfig(max_token_norm=1e9))
    assert stats.counts.rejected == 2
    assert all(layer.n == N - 2 for layer in stats.layers)
    assert all(torch.isfinite(layer.s1).all() and torch.isfinite(layer.s2).all() for layer in stats.layers)


def test_huge_tokens_are_clipped_to_the_norm_cap() -> None:
    inputs = [torch.randn(N, D) for _ in range(L)]
    inputs[0][0] *= 1e6
    cap = 10.0
    stats = capture(_bases(), inputs, version=0, config=CaptureConfig(max_token_norm=cap))
    assert stats.counts.clipped >= 1
    clipped = inputs[0].clone()
    norms = clipped.norm(dim=-1, keepdim=True)
    clipped = torch.where(norms > cap, clipped * cap / norms, clipped)
    torch.testing.assert_close(stats.layers[0].s1, gha_statistics(_bases()[0], clipped).s1)


def test_sampling_and_budget_bound_the_tokens() -> None:
    inputs = [torch.randn(1000, D) for _ in range(L)]
    gen = torch.Generator().manual_seed(0)
    sampled = capture(_bases(), inputs, 0, CaptureConfig(sample_rate=0.1, max_token_norm=1e9), gen)
    assert 50 < sampled.tokens < 150
    budget = capture(_bases(), inputs, 0, CaptureConfig(max_tokens_per_batch=64, max_token_norm=1e9))
    assert budget.tokens == 64 and budget.counts.dropped == 1000 - 64


def test_statistics_of_one_version_add_up_and_of_two_versions_refuse() -> None:
    inputs = [torch.randn(N, D) for _ in range(L)]
    a = capture(_bases(), [x[:20] for x in inputs], 1, CaptureConfig(max_token_norm=1e9))
    b = capture(_bases(), [x[20:] for x in inputs], 1, CaptureConfig(max_token_norm=1e9))
    whole = capture(_bases(), inputs, 1, CaptureConfig(max_token_norm=1e9))
    total = a + b
    assert total.tokens == N and total.counts.sampled == N
    torch.testing.assert_close(total.layers[1].s1, whole.layers[1].s1)
    other = capture(_bases(), inputs, 2, CaptureConfig(max_token_norm=1e9))
    try:
        a + other
    except ValueError:
        pass
    else:
        raise AssertionError("statistics of different versions must not add up")
