"""Guardrails: a guarded step is the plain GHA step when it is small, and never breaks its caps."""

from __future__ import annotations

import math

import torch

from star_serve.adaptation.capture import CaptureConfig, capture
from star_serve.adaptation.guardrails import Guardrails, guarded_layer_step, guarded_step, load_entropies, load_entropy
from star_serve.model import gha_step, orthogonality_defect, orthonormalize, projection_distance

L, E, D = 2, 4, 16


def _trained() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.stack([orthonormalize(torch.randn(E, D, generator=gen)) for _ in range(L)])


def test_a_small_step_is_exactly_the_gha_step() -> None:
    trained = _trained()
    stats = capture(trained, [torch.randn(64, D) for _ in range(L)], 0, CaptureConfig(max_token_norm=1e9))
    loose = Guardrails(max_step=1e9, max_distance=1.0, orthogonality_tolerance=1e9)
    new, report = guarded_step(trained, trained, stats, lr=1e-3, guard=loose)
    assert report.applied == [True, True]
    for layer in range(L):
        s = stats.layers[layer]
        torch.testing.assert_close(new[layer], gha_step(trained[layer], s.s1, s.s2, s.n, 1e-3))


def test_step_size_is_capped() -> None:
    trained = _trained()
    stats = capture(trained, [10 * torch.randn(64, D) for _ in range(L)], 0, CaptureConfig(max_token_norm=1e9))
    guard = Guardrails(max_step=0.01, max_distance=1.0, orthogonality_tolerance=1e9)
    new, report = guarded_step(trained, trained, stats, lr=0.5, guard=guard)
    assert all(report.applied)
    for layer in range(L):
        # the pre-renormalisation change is capped; renormalising unit rows can only shrink it further
        assert float((new[layer] - trained[layer]).norm()) <= 0.01 + 1e-5


def test_poisoned_stream_keeps_distance_and_orthogonality_under_their_caps() -> None:
    trained = _trained()
    guard = Guardrails(max_step=0.05, max_distance=0.3, orthogonality_tolerance=0.5)
    gen = torch.Generator().manual_seed(1)
    current = trained.clone()
    for step in range(300):
        x = torch.randn(100, D, generator=gen)
        x[:5] = 1e4 * torch.ones(D)  # 5% crafted constant, huge-norm tokens
        stats = capture(current, [x] * L, step, CaptureConfig(max_token_norm=8.0))
        current, _ = guarded_step(trained, current, stats, lr=0.05, guard=guard)
    for layer in range(L):
        assert projection_distance(current[layer], trained[layer]) <= 0.3 + 1e-6
        assert orthogonality_defect(current[layer]) <= 0.5 + 1e-6


def test_a_step_past_the_orthogonality_tolerance_is_retracted_not_refused() -> None:
    trained = _trained()
    # Tokens along one direction shared by rows 0-2: each of them swings towards it, and they lose orthogonality.
    shared = (trained[:, 0] + trained[:, 1] + trained[:, 2]) / math.sqrt(3)
    x = 3 * shared[:, None, :].expand(L, 64, D) + 0.01 * torch.randn(L, 64, D)
    stats = capture(trained, list(x), 0, CaptureConfig(max_token_norm=1e9))
    loose = Guardrails(max_step=1e9, max_distance=1.0, orthogonality_tolerance=1e9)
    plain, plain_report = guarded_step(trained, trained, stats, lr=0.1, guard=loose)
    assert not any(plain_report.retracted)
    assert min(orthogonality_defect(b) for b in plain) > 0.3
    guard = Guardrails(max_step=1e9, max_distance=1.0, orthogonality_tolerance=0.1)
    new, report = guarded_step(trained, trained, stats, lr=0.1, guard=guard)
    assert report.applied == [True, True] and report.retracted == [True, True]
    for layer in range(L):
        assert orthogonality_defect(new[layer]) < 1e-4
        assert projection_distance(new[layer], plain[layer]) < 1e-4  # the same subspace as the plain step
        torch.testing.assert_close(new[layer, 0], plain[layer, 0], rtol=0, atol=1e-5)  # row 0 only renormalised


def test_load_entropy() -> None:
    assert math.isclose(load_entropy(torch.tensor([5, 5, 5, 5])), math.log(4), rel_tol=1e-6)
    assert load_entropy(torch.tensor([20, 0, 0, 0])) == 0.0
    assert math.isclose(load_entropy(torch.tensor([0, 0, 0, 0])), math.log(4), rel_tol=1e-6)  # no tokens: no collapse


def test_load_entropies_of_every_layer_at_once() -> None:
    load = torch.tensor([[5, 5, 5, 5], [20, 0, 0, 0], [0, 0, 0, 0], [3, 1, 0, 0]])
    torch.testing.assert_close(
        load_entropies(load), torch.tensor([load_entropy(row) for row in load], dtype=torch.float64)
    )


def test_a_layer_that_breaks_a_guardrail_keeps_its_basis_and_the_others_step() -> None:
    trained = _trained()
    gen = torch.Generator().manual_seed(2)
    current = trained.clone()
    current[1] = orthonormalize(trained[1] + 0.8 * torch.randn(E, D, generator=gen))  # layer 1: already far off
    stats = capture(
        current, [torch.randn(64, D, generator=gen) for _ in range(L)], 0, CaptureConfig(max_token_norm=1e9)
    )
    guard = Guardrails(max_step=1.0, max_distance=projection_distance(current[1], trained[1]) - 0.01)
    new, report = guarded_step(trained, current, stats, lr=1e-3, guard=guard)
    assert report.applied == [True, False] and "distance" in report.reasons[1]
    assert torch.equal(new[1], current[1])
    alone = guarded_layer_step(trained[0], current[0], stats.layers[0], 1e-3, guard)
    torch.testing.assert_close(new[0], alone.basis)
    assert alone.applied and math.isclose(alone.distance, report.distances[0], abs_tol=1e-12)
