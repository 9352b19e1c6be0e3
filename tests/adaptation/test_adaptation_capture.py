"""Capture: statistics equal gha_statistics of the screened tokens; poison is clipped or rejected."""

from __future__ import annotations

import pytest
import torch

from star_serve.adaptation.capture import CHUNK, CaptureConfig, capture, capture_groups, expert_load
from star_serve.model import explained_variance, gha_statistics, orthonormalize

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


def test_tokens_whose_norm_overflows_are_rejected_not_clipped() -> None:
    inputs = [torch.randn(N, D) for _ in range(L)]
    inputs[1][4] = 1e30  # finite entries, but the squared norm overflows float32
    stats = capture(_bases(), inputs, version=0, config=CaptureConfig(max_token_norm=10.0))
    assert stats.counts.rejected == 1 and stats.tokens == N - 1
    assert all(torch.isfinite(layer.s1).all() for layer in stats.layers)


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


def test_one_pass_over_a_batch_equals_each_tenant_captured_alone() -> None:
    """Three sequences of two tenants in a padded (B, S) batch, each tenant served its own bank row."""
    bank = torch.stack([_bases(0), _bases(1), _bases(2)])  # (R, L, E, D)
    rows, groups, lengths = torch.tensor([2, 1, 2]), torch.tensor([0, 1, 0]), [5, 7, 3]
    inputs = [torch.randn(3, 7, D) for _ in range(L)]
    real = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    inputs[0][1, 2, 0] = float("nan")  # tenant 1's third token is rejected at every layer
    inputs[1][0, 6, :] = float("nan")  # padding: never looked at
    config = CaptureConfig(max_token_norm=1e9)
    forward = capture_groups(bank, rows, inputs, real, groups, [4, 9], config)
    together = [forward.group(0), forward.group(1)]

    alone_a = capture(bank[2], [torch.cat([x[0, :5], x[2, :3]]) for x in inputs], 4, config)
    alone_b = capture(bank[1], [x[1, :7] for x in inputs], 9, config)
    for got, want in ((together[0], alone_a), (together[1], alone_b)):
        assert got.version == want.version and got.counts == want.counts
        for g, w in zip(got.layers, want.layers, strict=True):
            assert g.n == w.n
            torch.testing.assert_close(g.s1, w.s1)
            torch.testing.assert_close(g.s2, w.s2)
    assert (together[0].tokens, together[1].tokens, together[1].counts.rejected) == (8, 6, 1)


def test_a_tenants_budget_spans_its_sequences_in_order() -> None:
    inputs = [torch.randn(3, 40, D) for _ in range(L)]
    real = torch.ones(3, 40, dtype=torch.bool)
    groups = torch.tensor([0, 1, 0])
    config = CaptureConfig(max_tokens_per_batch=50, max_token_norm=1e9)
    forward = capture_groups(_bases()[None], torch.zeros(3, dtype=torch.long), inputs, real, groups, [0, 0], config)
    a, b = forward.group(0), forward.group(1)
    assert (a.tokens, a.counts.dropped, b.tokens, b.counts.dropped) == (50, 30, 40, 0)
    first_fifty = capture(_bases(), [torch.cat([x[0], x[2, :10]]) for x in inputs], 0, config)
    torch.testing.assert_close(a.layers[1].s1, first_fifty.layers[1].s1)


def test_expert_load_counts_each_tenants_real_tokens() -> None:
    indices = [torch.tensor([[[0, 1], [2, 3]], [[1, 1], [0, 0]]]) for _ in range(L)]  # L x (B=2, S=2, k=2)
    real = torch.tensor([[True, True], [True, False]])
    load = expert_load(indices, real, torch.tensor([1, 0]), num_groups=2, num_experts=E)
    assert load.shape == (2, L, E)
    assert load[1, 0].tolist() == [1, 1, 1, 1] and load[0, 1].tolist() == [0, 2, 0, 0]


def test_explained_variance_of_each_group_is_the_models_measure() -> None:
    bank = torch.stack([_bases(0), _bases(1)])
    inputs = [torch.randn(2, 6, D) for _ in range(L)]
    real = torch.ones(2, 6, dtype=torch.bool)
    forward = capture_groups(
        bank, torch.tensor([0, 1]), inputs, real, torch.tensor([0, 1]), [0, 0], CaptureConfig(max_token_norm=1e9)
    )
    for g in range(2):
        want = sum(explained_variance(bank[g, layer], inputs[layer][g]) for layer in range(L)) / L
        assert forward.explained[g] == pytest.approx(want, rel=1e-5)
    nobody = capture_groups(
        bank, torch.tensor([0, 1]), inputs, real & False, torch.tensor([0, 1]), [0, 0], CaptureConfig()
    )
    assert nobody.explained == [None, None]


def test_many_one_token_sequences_and_long_groups_equal_each_tenant_captured_alone() -> None:
    """A decode-like batch (one token per sequence) of three tenants whose token counts cross the chunks
    that `capture_groups` packs them into, and a tenant with no tokens at all."""
    bank = torch.stack([_bases(0), _bases(1), _bases(2), _bases(3)])
    sizes = [CHUNK * 2 + 5, CHUNK, 1, 0]  # tokens of groups 0..3
    groups = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])[torch.randperm(sum(sizes))]
    inputs = [torch.randn(len(groups), 1, D) for _ in range(L)]
    real = torch.ones(len(groups), 1, dtype=torch.bool)
    config = CaptureConfig(max_token_norm=1e9)
    forward = capture_groups(bank, groups, inputs, real, groups, [0, 1, 2, 3], config)
    for g, n in enumerate(sizes):
        got = forward.group(g)
        assert got.tokens == n
        if n == 0:
            assert all(not layer.s1.any() for layer in got.layers) and forward.explained[g] is None
            continue
        want = capture(bank[g], [x[groups == g, 0] for x in inputs], g, config)
        for a, b in zip(got.layers, want.layers, strict=True):
            torch.testing.assert_close(a.s1, b.s1)
            torch.testing.assert_close(a.s2, b.s2)
