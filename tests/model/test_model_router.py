"""The STAR gate, the MoE combine and the Switch loss against their formulas, computed by hand."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from star_serve.model import StarMoeConfig, switch_load_balancing_loss
from star_serve.model.moe import StarMoeSparseBlock
from star_serve.model.router import StarMoeRouter

B, S, D, E = 2, 5, 32, 4


def randomise_router(router: StarMoeRouter, gen: torch.Generator) -> None:
    """Fills every router tensor with generic values: R not orthogonal, a not zero, V not orthogonal."""
    with torch.no_grad():
        if hasattr(router, "weight"):
            router.weight.copy_(torch.randn(E, D, generator=gen) * 0.5)
        if router.uses_subspace:
            router.star_gate.mixing_coef.copy_(torch.randn(E, E, generator=gen))
            router.star_gate.alpha.copy_(torch.randn(E, generator=gen) * 2)
            v = torch.randn(E, D, generator=gen)
            router.star_gate.gha.basis.copy_(v / v.norm(dim=1, keepdim=True))


def eval_router(config: StarMoeConfig, seed: int) -> tuple[StarMoeRouter, torch.Tensor, torch.Generator]:
    """A randomised router in eval mode, inputs (B, S, D) for it, and the generator for more."""
    gen = torch.Generator().manual_seed(seed)
    router = StarMoeRouter(config)
    randomise_router(router, gen)
    return router.eval(), torch.randn(B, S, D, generator=gen), gen


def expected_logits(router: StarMoeRouter, x: torch.Tensor, bases: torch.Tensor | None = None) -> torch.Tensor:
    """STAR.md's gate in float64, token by token; `bases` (B, E, D) replaces V per sequence, and with
    `align_linear` the linear half reads x + V^T (V' x) - V'^T (V' x), V the trained basis."""
    x = x.double()
    out = torch.zeros(x.shape[0], x.shape[1], E, dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            xt = x[b, t]
            if router.router_type in ("linear", "mpi"):
                out[b, t] = router.weight.double() @ xt
                continue
            r = router.star_gate.mixing_coef.double()
            v = (router.star_gate.gha.basis if bases is None else bases[b]).double()
            l_gha = (r @ v) @ xt  # x (R V)^T
            if router.router_type == "star_gha_only":
                out[b, t] = l_gha
                continue
            trained = router.star_gate.gha.basis.double()
            aligned = xt + (trained - v).T @ (v @ xt) if router.align_linear else xt
            l_lin = router.weight.double() @ aligned
            s = torch.sigmoid(router.star_gate.alpha.double())
            out[b, t] = s * l_lin + (1 - s) * l_gha
    return out


@pytest.mark.parametrize("router_type", ["star", "star_gha_only", "linear", "mpi"])
def test_gate_matches_formula_in_eval_mode(router_type: str, make_config: Callable[..., StarMoeConfig]) -> None:
    router, x, _ = eval_router(make_config(router_type=router_type), seed=10)
    state = {k: v.clone() for k, v in router.state_dict().items()}
    got = router(x)
    assert got.shape == (B, S, E)
    torch.testing.assert_close(got.double(), expected_logits(router, x), rtol=0, atol=1e-5)
    for k, v in router.state_dict().items():
        assert torch.equal(v, state[k]), f"an eval-mode forward changed {k}"
    if router_type == "star_gha_only":
        assert not hasattr(router, "weight")
    if router_type in ("linear", "mpi"):
        assert not hasattr(router, "star_gate")


@pytest.mark.parametrize("align_linear", [True, False])
@pytest.mark.parametrize("router_type", ["star", "star_gha_only"])
def test_gate_with_per_sequence_bases(
    router_type: str, align_linear: bool, make_config: Callable[..., StarMoeConfig]
) -> None:
    router, x, gen = eval_router(make_config(router_type=router_type), seed=11)
    router.align_linear = align_linear
    bases = torch.randn(B, E, D, generator=gen)
    bases = bases / bases.norm(dim=-1, keepdim=True)
    got = router(x, bases=bases)
    torch.testing.assert_close(got.double(), expected_logits(router, x, bases), rtol=0, atol=1e-5)
    # The per-sequence bases really were used instead of the trained one.
    assert not torch.allclose(got, router(x), atol=1e-3)
    # Each sequence depends only on its own basis.
    alone = router(x[1:], bases=bases[1:])
    torch.testing.assert_close(got[1:], alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("align_linear", [True, False])
@pytest.mark.parametrize("router_type", ["star", "star_gha_only", "linear", "mpi"])
def test_the_folded_gate_routes_as_the_formula(
    router_type: str, align_linear: bool, make_config: Callable[..., StarMoeConfig]
) -> None:
    router, x, gen = eval_router(make_config(router_type=router_type), seed=12)
    router.align_linear = align_linear
    with torch.no_grad():
        shared = router(x, gate=router.gate())  # (E, D): one gate for the batch
    torch.testing.assert_close(shared.double(), expected_logits(router, x), rtol=0, atol=1e-5)
    if not router.uses_subspace:
        return
    bases = torch.randn(B, E, D, generator=gen)
    bases = bases / bases.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        gates = router.gate(bases)
        assert gates.shape == (B, E, D)
        per_sequence = router(x, gate=gates)
    torch.testing.assert_close(per_sequence.double(), expected_logits(router, x, bases), rtol=0, atol=1e-5)


@pytest.mark.parametrize("align_linear", [True, False])
def test_inputs_turned_with_the_tenants_basis_route_as_before_the_turn(
    align_linear: bool, make_config: Callable[..., StarMoeConfig]
) -> None:
    """Inputs turned by Q within the trained subspace, and the tenant's basis V' = V Q^T turned with them: the
    subspace half routes as before the turn with either gate, the linear half only when aligned."""
    router, x, gen = eval_router(make_config(router_type="star"), seed=13)
    router.align_linear = align_linear
    with torch.no_grad():  # orthonormal rows, so that span V is what Q turns
        router.star_gate.gha.basis.copy_(torch.linalg.qr(torch.randn(D, E, generator=gen))[0].T)
    v = router.basis
    m = torch.linalg.qr(torch.randn(E, E, generator=gen))[0]  # a turn of span V within itself
    q = torch.eye(D) + v.T @ (m - torch.eye(E)) @ v  # identity on the rest of the space
    turned, tenant = x @ q.T, (v @ q.T).expand(B, E, D)
    with torch.no_grad():
        before = router(x)
        after = router(turned, bases=tenant)
        folded = router(turned, gate=router.gate(tenant))
    torch.testing.assert_close(folded, after, rtol=0, atol=1e-5)
    assert torch.allclose(after, before, atol=1e-4) == align_linear
    assert not torch.allclose(router(turned), before, atol=1e-4)  # the trained basis alone does not follow


def swiglu_expert(block: StarMoeSparseBlock, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on one token (D,), float64: down(silu(gate x) * up x), gate and up stacked in gate_up_proj."""
    w = block.experts.gate_up_proj[e].double()  # (2F, D)
    f = w.shape[0] // 2
    gate, up = w[:f] @ x.double(), w[f:] @ x.double()
    return block.experts.down_proj[e].double() @ (F.silu(gate) * up)


@pytest.mark.parametrize("router_type", ["star", "linear"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_combine_matches_per_token_reference(
    top_k: int, router_type: str, make_config: Callable[..., StarMoeConfig]
) -> None:
    gen = torch.Generator().manual_seed(12 + top_k)
    block = StarMoeSparseBlock(make_config(num_experts_per_tok=top_k, router_type=router_type))
    randomise_router(block.router, gen)
    with torch.no_grad():
        block.router.weight.mul_(0.3)  # moderate logits: probabilities far from one-hot
        block.experts.gate_up_proj.copy_(torch.randn(block.experts.gate_up_proj.shape, generator=gen) * 0.3)
        block.experts.down_proj.copy_(torch.randn(block.experts.down_proj.shape, generator=gen) * 0.3)
    block.eval()
    x = torch.randn(B, 8, D, generator=gen)
    out = block(x)
    assert out.hidden_states.shape == (B, 8, D)
    assert out.router_logits.shape == (B * 8, E)
    assert out.expert_indices.shape == (B, 8, top_k)
    torch.testing.assert_close(
        out.router_logits.double(), expected_logits(block.router, x).reshape(-1, E), rtol=0, atol=1e-5
    )

    reference = torch.zeros(B, 8, D, dtype=torch.float64)
    renormalised = torch.zeros_like(reference)
    used = set()
    for b in range(B):
        for t in range(8):
            probs = torch.softmax(expected_logits(block.router, x[b : b + 1, t : t + 1])[0, 0], dim=-1)
            top_p, top_e = probs.topk(top_k)
            assert out.expert_indices[b, t].tolist() == top_e.tolist()
            for p, e in zip(top_p, top_e.tolist(), strict=True):
                y = swiglu_expert(block, e, x[b, t])
                reference[b, t] += p * y
                renormalised[b, t] += p / top_p.sum() * y
                used.add(e)
    assert len(used) >= 3, "the test data should spread tokens over several experts"
    torch.testing.assert_close(out.hidden_states.double(), reference, rtol=0, atol=1e-5)
    # The combine weights are the raw softmax probabilities: renormalising would be visibly different.
    assert (renormalised - reference).abs().max() > 1e-3


def manual_switch_loss(logits: torch.Tensor, indices: torch.Tensor) -> float:
    """E * sum_i f_i P_i with explicit counting, f over (token, slot) pairs."""
    n, e = logits.shape
    k = indices.shape[1]
    counts = [0] * e
    for row in indices.tolist():
        for i in row:
            counts[i] += 1
    probs = torch.softmax(logits.double(), dim=-1)
    return e * sum(counts[i] / (n * k) * probs[:, i].mean().item() for i in range(e))


@pytest.mark.parametrize("top_k", [1, 2])
def test_switch_loss_matches_hand_computation(top_k: int) -> None:
    gen = torch.Generator().manual_seed(20)
    logits = torch.randn(24, E, generator=gen) * 2
    indices = logits.topk(top_k, dim=-1).indices
    got = switch_load_balancing_loss(logits, indices)
    assert got.item() == pytest.approx(manual_switch_loss(logits, indices), abs=1e-5)


def test_switch_loss_ignores_masked_tokens() -> None:
    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(20, E, generator=gen) * 2
    logits[12:, 0] += 10.0  # the masked tokens all go to expert 0: they would change the loss
    indices = logits.topk(1, dim=-1).indices
    mask = torch.zeros(20, dtype=torch.bool)
    mask[:12] = True
    got = switch_load_balancing_loss(logits, indices, mask)
    assert got.item() == pytest.approx(manual_switch_loss(logits[:12], indices[:12]), abs=1e-5)
    assert abs(got.item() - switch_load_balancing_loss(logits, indices).item()) > 1e-2
    # Garbage in the masked rows does not matter.
    noisy = logits.clone()
    noisy[12:] = torch.randn(8, E, generator=gen) * 50
    noisy_idx = indices.clone()
    noisy_idx[12:] = 3
    assert switch_load_balancing_loss(noisy, noisy_idx, mask).item() == pytest.approx(got.item(), abs=1e-6)


def test_switch_loss_uniform_is_one_and_collapse_is_e() -> None:
    uniform = torch.zeros(8, E)
    spread = (torch.arange(8) % E)[:, None]
    assert switch_load_balancing_loss(uniform, spread).item() == pytest.approx(1.0, abs=1e-6)
    spread2 = torch.stack([torch.arange(8) % E, (torch.arange(8) + 1) % E], dim=1)
    assert switch_load_balancing_loss(uniform, spread2).item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.full((8, E), -30.0)
    collapsed[:, 2] = 30.0
    assert switch_load_balancing_loss(collapsed, torch.full((8, 1), 2)).item() == pytest.approx(E, abs=1e-4)
