"""GHA math (star_serve/model/gha.py) against STAR.md's cumulative-sum definition of Sanger's rule."""

from __future__ import annotations

import math

import pytest
import torch

from star_serve.model import (
    GhaStatistics,
    explained_variance,
    gha_statistics,
    gha_step,
    gha_update,
    orthogonality_defect,
    orthogonality_defects,
    orthonormalize,
    projection_distance,
    projection_distances,
    retract,
)

D, E = 32, 4


def sanger_reference(basis: torch.Tensor, x: torch.Tensor, lr: float) -> torch.Tensor:
    """STAR.md literally, in float64: P[n,i] = sum_{j<=i} Y[n,j] V[j] materialised, then the mean."""
    v = basis.double()
    x = x.double()
    n_tokens, num = x.shape[0], v.shape[0]
    y = x @ v.T  # (N, E)
    dv = torch.zeros_like(v)
    for i in range(num):
        for n in range(n_tokens):
            p = torch.zeros(v.shape[1], dtype=torch.float64)
            for j in range(i + 1):
                p = p + y[n, j] * v[j]
            dv[i] += y[n, i] * (x[n] - p)
        dv[i] /= n_tokens
    v = v + lr * dv
    return v / v.norm(dim=1, keepdim=True)


def sanger_reference_cumsum(basis: torch.Tensor, x: torch.Tensor, lr: float) -> torch.Tensor:
    """The same definition vectorised with a cumulative sum over the component axis."""
    v, x = basis.double(), x.double()
    y = x @ v.T  # (N, E)
    p = torch.cumsum(y[:, :, None] * v[None], dim=1)  # (N, E, D), inclusive
    dv = (y[:, :, None] * (x[:, None, :] - p)).mean(0)
    v = v + lr * dv
    return v / v.norm(dim=1, keepdim=True)


def random_basis(gen: torch.Generator, num: int = E, dim: int = D) -> torch.Tensor:
    v = torch.randn(num, dim, generator=gen)
    return v / v.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("lr", [0.01, 0.3])
def test_gha_step_matches_cumulative_sum_definition(lr: float) -> None:
    gen = torch.Generator().manual_seed(0)
    basis = random_basis(gen)  # unit rows, not orthogonal: exercises the cross terms
    x = torch.randn(40, D, generator=gen) * 1.5
    loop = sanger_reference(basis, x, lr)
    vectorised = sanger_reference_cumsum(basis, x, lr)
    torch.testing.assert_close(loop, vectorised, rtol=0, atol=1e-12)

    before = basis.clone()
    got = gha_step(basis, *gha_statistics(basis, x), lr)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), loop, rtol=0, atol=1e-5)
    torch.testing.assert_close(gha_update(basis, x, lr).double(), loop, rtol=0, atol=1e-5)
    assert torch.equal(basis, before), "gha_step must not modify its input basis"
    # The step really moved the basis (so the comparison above can fail).
    assert (loop - basis.double()).abs().max() > 1e-3


def test_gha_statistics_accepts_batched_tokens_and_bf16() -> None:
    gen = torch.Generator().manual_seed(1)
    basis = random_basis(gen)
    x = torch.randn(3, 7, D, generator=gen)
    flat = gha_statistics(basis, x.reshape(-1, D))
    shaped = gha_statistics(basis, x)
    assert shaped.n == flat.n == 21
    torch.testing.assert_close(shaped.s1, flat.s1)
    torch.testing.assert_close(shaped.s2, flat.s2)
    # S1 = Y^T X and S2 = Y^T Y as sums (not means).
    y = x.reshape(-1, D).double() @ basis.double().T
    torch.testing.assert_close(flat.s1.double(), y.T @ x.reshape(-1, D).double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat.s2.double(), y.T @ y, rtol=1e-5, atol=1e-5)
    low = gha_statistics(basis.bfloat16(), x.bfloat16())
    assert low.s1.dtype == torch.float32 and low.s2.dtype == torch.float32


def test_statistics_of_halves_add_up_to_the_whole() -> None:
    gen = torch.Generator().manual_seed(2)
    basis = random_basis(gen)
    x = torch.randn(50, D, generator=gen)
    first, second = gha_statistics(basis, x[:17]), gha_statistics(basis, x[17:])
    total = first + second
    whole = gha_statistics(basis, x)
    assert isinstance(total, GhaStatistics)
    assert total.n == whole.n == 50
    torch.testing.assert_close(total.s1, whole.s1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total.s2, whole.s2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        gha_step(basis, *total, 0.2).double(), sanger_reference_cumsum(basis, x, 0.2), rtol=0, atol=1e-5
    )
    # A single half is not the whole.
    assert not torch.allclose(first.s1, whole.s1, atol=1e-3)


def test_gha_step_with_no_tokens_returns_the_basis_as_a_copy() -> None:
    gen = torch.Generator().manual_seed(3)
    basis = random_basis(gen)
    out = gha_step(basis, torch.zeros(E, D), torch.zeros(E, E), 0, 0.5)
    assert torch.equal(out, basis)
    out.add_(1.0)
    assert not torch.equal(out, basis), "the n == 0 result must be a copy, not the input itself"
    empty = gha_update(basis, torch.zeros(0, D), 0.5)
    assert torch.equal(empty, basis)


def test_repeated_steps_converge_to_the_dominant_subspace() -> None:
    gen = torch.Generator().manual_seed(4)
    q_full, _ = torch.linalg.qr(torch.randn(D, D, generator=gen))
    q_top = q_full[:, :E].T.contiguous()  # (E, D), orthonormal rows
    scales = torch.tensor([6.0, 5.0, 4.0, 3.0])

    def batch(n: int = 256) -> torch.Tensor:
        z = torch.randn(n, E, generator=gen)
        return z @ torch.diag(scales) @ q_top + 0.1 * torch.randn(n, D, generator=gen)

    basis = random_basis(gen)
    start = projection_distance(basis, q_top)
    assert start > 0.5
    for _ in range(300):
        basis = gha_update(basis, batch(), lr=0.01)
        torch.testing.assert_close(basis.norm(dim=1), torch.ones(E), rtol=0, atol=1e-5)
    assert projection_distance(basis, q_top) < 0.05
    # Sanger's rule orders the components: row i tracks the i-th eigenvector (up to sign).
    cosines = (basis @ q_top.T).abs().diagonal()
    assert bool((cosines > 0.98).all()), cosines
    assert orthogonality_defect(basis) < 0.25
    assert explained_variance(basis, batch()) > 0.99


def test_projection_distance_extremes() -> None:
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(D, 2 * E, generator=gen))
    u, w = q[:, :E].T, q[:, E:].T  # orthogonal subspaces
    assert projection_distance(u, u) == pytest.approx(0.0, abs=1e-3)
    mixing = torch.randn(E, E, generator=gen) + 3 * torch.eye(E)
    assert projection_distance(u, mixing @ u) == pytest.approx(0.0, abs=1e-3)  # same span, other basis
    assert projection_distance(u, w) == pytest.approx(1.0, abs=1e-5)
    # Sharing exactly half of the directions: ||Pu - Pv||_F^2 = 2E - 2 E/2, so sqrt(1/2).
    half = torch.cat([u[: E // 2], w[: E // 2]])
    assert projection_distance(u, half) == pytest.approx(math.sqrt(0.5), abs=1e-5)


def test_orthonormalize_and_orthogonality_defect() -> None:
    gen = torch.Generator().manual_seed(6)
    basis = torch.randn(E, D, generator=gen)
    q = orthonormalize(basis)
    assert q.shape == (E, D)
    torch.testing.assert_close(q @ q.T, torch.eye(E), rtol=0, atol=1e-5)
    assert orthogonality_defect(q) == pytest.approx(0.0, abs=1e-5)
    # Same row space: every row of basis is reproduced by projecting onto q.
    torch.testing.assert_close(basis @ q.T @ q, basis, rtol=0, atol=1e-4)
    # Two identical unit rows: V V^T - I has two off-diagonal ones, Frobenius norm sqrt(2).
    dup = torch.cat([q[:1], q[:1], q[2:]])
    assert orthogonality_defect(dup) == pytest.approx(math.sqrt(2.0), abs=1e-5)
    # Scaled rows: diagonal entries s^2 - 1.
    assert orthogonality_defect(2.0 * q) == pytest.approx(math.sqrt(E) * 3.0, abs=1e-4)


def test_retract_is_gram_schmidt_in_row_order_keeping_signs() -> None:
    gen = torch.Generator().manual_seed(8)
    basis = torch.randn(3, E, D, generator=gen)
    basis[0, 1] = -basis[0, 0] + 0.1 * basis[0, 1]  # nearly anti-parallel rows
    q = retract(basis)
    torch.testing.assert_close(q @ q.mT, torch.eye(E).expand(3, E, E), rtol=0, atol=1e-5)
    for i in range(E):  # row i lies in the span of rows 0..i, on the same side as row i
        span = orthonormalize(basis[:, : i + 1])
        torch.testing.assert_close((q[:, i : i + 1] @ span.mT @ span)[:, 0], q[:, i], rtol=0, atol=1e-4)
        assert bool(((q[:, i] * basis[:, i]).sum(-1) > 0).all())
    torch.testing.assert_close(retract(q), q, rtol=0, atol=1e-5)


def test_explained_variance_extremes() -> None:
    gen = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(D, 2 * E, generator=gen))
    u, w = q[:, :E].T, q[:, E:].T
    inside = torch.randn(30, E, generator=gen) @ u
    outside = torch.randn(30, E, generator=gen) @ w
    assert explained_variance(u, inside) == pytest.approx(1.0, abs=1e-5)
    assert explained_variance(u, outside) == pytest.approx(0.0, abs=1e-5)
    # A non-orthonormal basis spanning the data also explains all of it.
    assert explained_variance(torch.randn(E, E, generator=gen) @ u, inside) == pytest.approx(1.0, abs=1e-4)
    # Energy split 9 : 16 between the subspace and its complement.
    mixed = 3.0 * u[0] + 4.0 * w[0]
    assert explained_variance(u, mixed[None]) == pytest.approx(9.0 / 25.0, abs=1e-5)
    assert explained_variance(u, torch.zeros(5, D)) == 0.0


def test_stacked_bases_step_and_measure_each_as_alone() -> None:
    """Leading dimensions batch: one call for every layer gives what one call per layer gives."""
    gen = torch.Generator().manual_seed(5)
    bases = torch.nn.functional.normalize(torch.randn(3, E, D, generator=gen), dim=-1)
    others = torch.nn.functional.normalize(torch.randn(3, E, D, generator=gen), dim=-1)
    x = torch.randn(3, 50, D, generator=gen)
    stats = [gha_statistics(v, t) for v, t in zip(bases, x, strict=True)]
    stepped = gha_step(bases, torch.stack([s.s1 for s in stats]), torch.stack([s.s2 for s in stats]), 50, 0.1)
    distances, defects = projection_distances(bases, others), orthogonality_defects(bases)
    assert distances.shape == defects.shape == (3,)
    for layer, s in enumerate(stats):
        torch.testing.assert_close(stepped[layer], gha_step(bases[layer], s.s1, s.s2, s.n, 0.1))
        assert math.isclose(float(distances[layer]), projection_distance(bases[layer], others[layer]), abs_tol=1e-12)
        assert math.isclose(float(defects[layer]), orthogonality_defect(bases[layer]), abs_tol=1e-6)
