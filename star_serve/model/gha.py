"""The Generalized Hebbian Algorithm (Sanger's rule) as pure functions on tensors.

One GHA iteration on a batch X (N, D) with basis V (E, D) is

    Y  = X V^T                      (N, E)
    dV = mean_n Y[n,i] (X[n] - sum_{j<=i} Y[n,j] V[j])
    V  = rownorm(V + lr dV)

and depends on the batch only through S1 = Y^T X and S2 = Y^T Y, since dV = (S1 - tril(S2) V) / N.
`gha_statistics` computes those sums, which add up across batches (and across replicas), and `gha_step`
applies one step from them. The training-time router update and the server's adaptation worker both
call these two functions, so the model and the server agree on the math exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class GhaStatistics(NamedTuple):
    """Sufficient statistics of one GHA step: sums over `n` tokens, taken against one basis."""

    s1: torch.Tensor  # (E, D): sum_n Y[n]^T X[n]
    s2: torch.Tensor  # (E, E): sum_n Y[n]^T Y[n]
    n: int

    def __add__(self, other: object) -> GhaStatistics:
        if not isinstance(other, GhaStatistics):
            return NotImplemented
        return GhaStatistics(self.s1 + other.s1, self.s2 + other.s2, self.n + other.n)


def gha_statistics(basis: torch.Tensor, x: torch.Tensor) -> GhaStatistics:
    """Sums `(Y^T X, Y^T Y, N)` of tokens `x` (N, D) against `basis` (E, D), in float32."""
    basis = basis.detach().float()
    x = x.detach().float().reshape(-1, basis.shape[1])
    y = x @ basis.T  # (N, E)
    return GhaStatistics(y.T @ x, y.T @ y, x.shape[0])


def gha_step(basis: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, n: int, lr: float) -> torch.Tensor:
    """One Sanger step from summed statistics; rows renormalised to unit length (no Gram-Schmidt).

    Leading dimensions batch: bases (..., E, D) with their statistics (..., E, D) and (..., E, E), all of
    `n` tokens, take one step each. Returns a new float32 tensor; the input basis is left untouched. With
    `n == 0` the basis is returned unchanged (as a copy).
    """
    v = basis.detach().float()
    if n == 0:
        return v.clone()
    dv = (s1.float() - torch.tril(s2.float()) @ v) / n  # (..., E, D)
    v = v + lr * dv
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def gha_update(basis: torch.Tensor, x: torch.Tensor, lr: float) -> torch.Tensor:
    """One GHA iteration of `basis` on the tokens `x`: the training-time router update."""
    return gha_step(basis, *gha_statistics(basis, x), lr)


def orthonormalize(basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (..., E, D) of the row space of each `basis` (..., E, D), via QR."""
    q, _ = torch.linalg.qr(basis.detach().mT.to(torch.promote_types(basis.dtype, torch.float32)))  # (..., D, E)
    return q.mT


def retract(basis: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt of each `basis` (..., E, D) in row order, each row's sign kept: the orthonormal basis
    nearest to it in Sanger's order (row i moves only within the span of rows 0..i)."""
    q, r = torch.linalg.qr(basis.detach().mT.to(torch.promote_types(basis.dtype, torch.float32)))  # (..., D, E)
    signs = torch.diagonal(r, dim1=-2, dim2=-1).sign()
    return (q * torch.where(signs == 0, 1.0, signs)[..., None, :]).mT


def projection_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`||U^T U - V^T V||_F / sqrt(2E)` after orthonormalising, for each pair of bases (..., E, D): 0 for
    equal subspaces, 1 for orthogonal. A float64 tensor of the leading shape."""
    qu, qv = orthonormalize(u.double()), orthonormalize(v.double())  # float64: sqrt amplifies rounding near 0
    # ||Pu - Pv||_F^2 = 2E - 2 ||Qu Qv^T||_F^2, without forming the (D, D) projectors.
    e = qu.shape[-2]
    overlap = (qu @ qv.mT).square().sum(dim=(-2, -1))
    return ((2 * e - 2 * overlap).clamp_min(0.0) / (2 * e)).sqrt()


def projection_distance(u: torch.Tensor, v: torch.Tensor) -> float:
    """The projection distance of two bases (E, D); see `projection_distances`."""
    return float(projection_distances(u, v))


def orthogonality_defects(basis: torch.Tensor) -> torch.Tensor:
    """`||V V^T - I||_F` of each basis (..., E, D): how far its rows are from orthonormal."""
    v = basis.detach().float()
    return torch.linalg.matrix_norm(v @ v.mT - torch.eye(v.shape[-2], device=v.device))


def orthogonality_defect(basis: torch.Tensor) -> float:
    """`||V V^T - I||_F` of one basis (E, D)."""
    return float(orthogonality_defects(basis))


def explained_variance(basis: torch.Tensor, x: torch.Tensor) -> float:
    """`||X Q^T||^2 / ||X||^2`, Q the orthonormalised basis: the share of the inputs' energy it captures."""
    q = orthonormalize(basis)
    x = x.detach().float().reshape(-1, q.shape[1])
    total = x.square().sum().item()
    return (x @ q.T).square().sum().item() / total if total > 0 else 0.0
