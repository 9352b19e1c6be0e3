"""STAR routers: a linear gate interpolated with a gate through the GHA principal subspace (STAR.md).

Parameter names follow the authors' reference checkpoints, under `...mlp.router.`: `weight` (W),
`star_gate.mixing_coef` (R), `star_gate.alpha` (a) and `star_gate.gha.basis` (V, a persistent buffer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import StarMoeConfig
from .gha import gha_update


class GhaSubspace(nn.Module):
    """Holds the basis V (E, D): unit-norm rows, updated by the Hebbian rule only, never by backprop."""

    def __init__(self, num_components: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("basis", torch.empty(num_components, dim), persistent=True)

    basis: torch.Tensor


class StarGate(nn.Module):
    """The subspace half of the STAR gate: mixing matrix R (E, E), interpolation logits a (E,), basis V."""

    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__()
        self.mixing_coef = nn.Parameter(torch.empty(num_experts, num_experts))
        self.alpha = nn.Parameter(torch.empty(num_experts))
        self.gha = GhaSubspace(num_experts, dim)


class StarMoeRouter(nn.Module):
    """Computes router logits (B, S, E) for one MoE layer.

    `bases` (B, E, D), when given, replaces the trained basis per sequence: this is how a batch that mixes
    tenants routes each sequence through its own tenant's subspace in one pass. A 2-D `bases` (E, D) is one
    basis for the whole batch. At inference, `gate` (see `gate()`) is the whole gate folded beforehand.

    A tenant's basis V' is GHA's estimate of where its inputs' principal directions went; the linear half of
    the gate, W, is frozen at test time and would read the moved inputs as they are. With `align_linear` (on
    by default; off is STAR.md's gate as written) W reads each input with its coordinates in the tenant's
    subspace put back on the trained basis, x + (x V'^T)(V - V'): an input that turned with the subspace is
    routed as before the turn (exactly, for a turn that maps span V onto itself). The trained basis changes
    nothing, and the aligned gate is still one matrix per basis, W + W (V - V')^T V'.
    """

    def __init__(self, config: StarMoeConfig) -> None:
        super().__init__()
        self.router_type = config.router_type
        self.num_experts = config.num_local_experts
        self.gha_learning_rate = config.gha_learning_rate
        self.mpi_row_norm = config.mpi_row_norm
        if self.router_type != "star_gha_only":
            self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        if self.router_type in ("star", "star_gha_only"):
            self.star_gate = StarGate(self.num_experts, config.hidden_size)
        self.align_linear = True

    @property
    def uses_subspace(self) -> bool:
        return self.router_type in ("star", "star_gha_only")

    @property
    def basis(self) -> torch.Tensor:
        """The trained GHA basis V (E, D)."""
        return self.star_gate.gha.basis

    def gate(self, bases: torch.Tensor | None = None) -> torch.Tensor:
        """The whole gate as one matrix G (..., E, D), logits = x G^T: s W + (1 - s) R V for `star`, R V for
        `star_gha_only`, with V the trained basis or `bases` (..., E, D). Folded once per basis, it routes a
        token with one product where the two gates take four operations more."""
        if not self.uses_subspace:
            return self.weight
        mixing = self.star_gate.mixing_coef
        rotated = mixing @ (self.basis if bases is None else bases).to(mixing.dtype)  # (..., E, D)
        if self.router_type == "star_gha_only":
            return rotated
        s = torch.sigmoid(self.star_gate.alpha)[:, None]
        return s * self.linear_weight(bases) + (1 - s) * rotated

    def linear_weight(self, bases: torch.Tensor | None = None) -> torch.Tensor:
        """The linear half's weight (..., E, D) for a tenant's `bases` (..., E, D): W, aligned with
        `align_linear` to the tenant's subspace as W + W (V - V')^T V'."""
        if bases is None or not self.align_linear:
            return self.weight
        tenant = bases.to(self.weight.dtype)
        return self.weight + (self.weight @ (self.basis.to(tenant.dtype) - tenant).transpose(-1, -2)) @ tenant

    def forward(
        self,
        x: torch.Tensor,  # (B, S, D)
        bases: torch.Tensor | None = None,  # (B, E, D) or (E, D)
        token_mask: torch.Tensor | None = None,  # (B, S) bool, True for real tokens
        gate: torch.Tensor | None = None,  # (B, E, D) or (E, D), from `gate()`: replaces `bases` at inference
    ) -> torch.Tensor:
        if gate is not None:
            gate = gate.to(x.dtype)
            return F.linear(x, gate) if gate.dim() == 2 else torch.bmm(x, gate.transpose(1, 2))
        if not self.uses_subspace:
            return F.linear(x, self.weight)

        if self.training and bases is None:
            # As in the reference: one Hebbian iteration inside the forward, on the detached input,
            # before the logits, in training mode only.
            tokens = x.detach() if token_mask is None else x.detach()[token_mask]
            with torch.no_grad():
                self.basis.copy_(gha_update(self.basis, tokens, self.gha_learning_rate))

        mixing = self.star_gate.mixing_coef
        if bases is None or bases.dim() == 2:  # one basis for the whole batch
            basis = self.basis if bases is None else bases
            rotated = (mixing @ basis.to(mixing.dtype)).to(x.dtype)  # (E, D)
            gha_logits = F.linear(x, rotated)
            if self.router_type == "star_gha_only":
                return gha_logits
            linear_logits = F.linear(x, self.linear_weight(bases).to(x.dtype))
        else:  # x (R V_b)^T as (x V_b^T) R^T: two batched products, no (B, E, D) rotation per forward
            tenant = bases.to(x.dtype)
            projected = torch.bmm(x, tenant.transpose(1, 2))  # (B, S, E)
            gha_logits = projected @ mixing.to(x.dtype).T
            if self.router_type == "star_gha_only":
                return gha_logits
            weight = self.weight.to(x.dtype)
            linear_logits = F.linear(x, weight)
            if self.align_linear:  # + (x V_b^T)(V - V_b) W^T, with the (B, E, E) product of the bases
                linear_logits = linear_logits + torch.bmm(projected, (self.basis.to(x.dtype) - tenant) @ weight.T)
        s = torch.sigmoid(self.star_gate.alpha).to(x.dtype)
        return s * linear_logits + (1 - s) * gha_logits

    @torch.no_grad()
    def power_retract(self, expert_inputs: torch.Tensor) -> None:
        """MPI: one power-iteration step of each router row through its expert's input matrix, then a
        retraction to the fixed row norm. `expert_inputs` is (E, F, D)."""
        w = expert_inputs.detach().to(self.weight.dtype)
        projected = torch.einsum("efd,ed->ef", w, self.weight)  # W_e r_e
        powered = torch.einsum("efd,ef->ed", w, projected)  # W_e^T W_e r_e
        self.weight.copy_(self.mpi_row_norm * F.normalize(powered, dim=-1))


def switch_load_balancing_loss(
    router_logits: torch.Tensor,  # (N, E)
    expert_indices: torch.Tensor,  # (N, k)
    token_mask: torch.Tensor | None = None,  # (N,) bool
) -> torch.Tensor:
    """The Switch Transformer auxiliary loss `E * sum_i f_i P_i` of one layer, over real tokens only.

    f_i is the fraction of routed (token, slot) pairs sent to expert i, P_i the mean router probability of
    expert i. It is 1 for perfectly uniform routing and E for total collapse.
    """
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    one_hot = F.one_hot(expert_indices, num_experts).float().sum(dim=1)  # (N, E)
    if token_mask is not None:
        probs, one_hot = probs[token_mask], one_hot[token_mask]
    fraction = one_hot.sum(dim=0) / one_hot.sum().clamp_min(1)
    mean_prob = probs.mean(dim=0)
    return num_experts * (fraction * mean_prob).sum()
