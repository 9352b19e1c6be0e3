"""What a forward does to the routers: one GHA step per training forward (star), none in eval, and MPI's
power-then-retract on the linear gate."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from star_serve.model import Routing, gha_update

LR = 0.05  # large enough that one step visibly moves the basis


def capture_router_inputs(model: Any) -> tuple[list[torch.Tensor], list[Any]]:
    """Forward pre-hooks recording the tensor each layer's router receives."""
    seen: list[torch.Tensor] = []
    handles = []
    for layer in model.model.layers:

        def hook(_module: Any, args: tuple[Any, ...], _seen: list[torch.Tensor] = seen) -> None:
            _seen.append(args[0].detach().clone())

        handles.append(layer.mlp.router.register_forward_pre_hook(hook))
    return seen, handles


def bases_of(model: Any) -> list[torch.Tensor]:
    return [layer.mlp.router.star_gate.gha.basis.detach().clone() for layer in model.model.layers]


def gate_logits(router: Any, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(router.star_gate.alpha)
    return s * (x @ router.weight.T) + (1 - s) * (x @ (router.star_gate.mixing_coef @ basis).T)


@pytest.mark.parametrize("padded", [False, True])
def test_training_forward_takes_exactly_one_gha_step_per_layer(padded: bool, make_model: Callable[..., Any]) -> None:
    model = make_model(router_type="star", gha_learning_rate=LR)
    eval_twin = copy.deepcopy(model).eval()
    ids = torch.randint(1, 101, (3, 9))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4] = 0  # left padding
        mask[2, 6:] = 0  # right padding
    before = bases_of(model)

    seen, handles = capture_router_inputs(model)
    model.train()
    out = model(ids, attention_mask=mask, output_router_logits=True, output_routing=True)
    for h in handles:
        h.remove()
    after = bases_of(model)
    assert len(seen) == len(before) == 2

    # Layer 0's router input does not depend on any basis: an eval twin sees the same tokens.
    twin = eval_twin(ids, attention_mask=mask, output_routing=True)
    torch.testing.assert_close(twin.router_inputs[0], seen[0], rtol=0, atol=1e-6)

    for layer, (x, old, new) in enumerate(zip(seen, before, after, strict=True)):
        torch.testing.assert_close(out.router_inputs[layer], x, rtol=0, atol=0)
        tokens = x[mask.bool()]  # real tokens only
        expected = gha_update(old, tokens, LR)
        torch.testing.assert_close(new, expected, rtol=0, atol=1e-6)
        assert (new - old).abs().max() > 1e-4, "the basis should have moved"
        torch.testing.assert_close(new.norm(dim=1), torch.ones(4), rtol=0, atol=1e-5)
        if padded:
            # Padding positions were left out of the statistics.
            assert (gha_update(old, x.reshape(-1, x.shape[-1]), LR) - new).abs().max() > 1e-6
        # The update happens before the logits: this forward's logits already use the new basis.
        router = model.model.layers[layer].mlp.router
        with torch.no_grad():
            torch.testing.assert_close(
                out.router_logits[layer], gate_logits(router, x, new).reshape(-1, 4), rtol=0, atol=1e-5
            )
            assert not torch.allclose(out.router_logits[layer], gate_logits(router, x, old).reshape(-1, 4), atol=1e-5)


def test_two_training_forwards_take_two_steps(make_model: Callable[..., Any]) -> None:
    model = make_model(router_type="star_gha_only", gha_learning_rate=LR).train()
    ids = torch.randint(1, 101, (2, 6))
    expected = bases_of(model)
    for _ in range(2):
        seen, handles = capture_router_inputs(model)
        model(ids)
        for h in handles:
            h.remove()
        expected = [gha_update(v, x, LR) for v, x in zip(expected, seen, strict=True)]
    for got, want in zip(bases_of(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("router_type", ["star", "star_gha_only"])
def test_eval_forward_never_changes_a_basis(router_type: str, make_model: Callable[..., Any]) -> None:
    model = make_model(router_type=router_type, gha_learning_rate=LR)
    ids = torch.randint(1, 101, (2, 7))
    before = [v.numpy().tobytes() for v in bases_of(model)]
    bank = model.trained_bases()[None] + 0.1
    with torch.no_grad():
        model(ids)
        model(ids, attention_mask=torch.ones_like(ids), use_cache=True)
        model(ids, routing=Routing(bank, torch.zeros(2, dtype=torch.long)))
    model(ids, labels=ids).loss.backward()  # gradients flow, yet no basis moves in eval mode
    assert [v.numpy().tobytes() for v in bases_of(model)] == before
    for layer in model.model.layers:
        assert layer.mlp.router.star_gate.gha.basis.grad is None
        assert not layer.mlp.router.star_gate.gha.basis.requires_grad
    # ...whereas one training forward does.
    model.train()
    model(ids)
    assert [v.numpy().tobytes() for v in bases_of(model)] != before


def principal_right_direction(matrix: torch.Tensor) -> torch.Tensor:
    _, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return vh[0]


def test_mpi_power_then_retract(make_model: Callable[..., Any]) -> None:
    norm = 2.5
    model = make_model(router_type="mpi", mpi_row_norm=norm)
    ids = torch.randint(1, 101, (2, 6))
    routers = [layer.mlp.router for layer in model.model.layers]
    experts = [layer.mlp.experts.gate_up_proj.detach().clone() for layer in model.model.layers]
    directions = [torch.stack([principal_right_direction(w[e]) for e in range(4)]) for w in experts]

    def cosines() -> torch.Tensor:  # (L, E): |cos(router row e, top right singular vector of expert e)|
        return torch.stack(
            [
                (torch.nn.functional.normalize(r.weight.detach().double(), dim=-1) * d).sum(-1).abs()
                for r, d in zip(routers, directions, strict=True)
            ]
        )

    # Eval forwards leave the gate alone.
    start = [r.weight.detach().clone() for r in routers]
    with torch.no_grad():
        model(ids)
    assert all(torch.equal(r.weight, w) for r, w in zip(routers, start, strict=True))

    model.train()
    history = [cosines()]
    with torch.no_grad():
        for step in range(12):
            rows_before = [r.weight.detach().double().clone() for r in routers]
            model(ids)
            for r, w, old in zip(routers, experts, rows_before, strict=True):
                torch.testing.assert_close(r.weight.norm(dim=-1), torch.full((4,), norm), rtol=0, atol=1e-5)
                if step == 0:
                    # One power step through W_e^T W_e, then retraction to the fixed norm.
                    powered = torch.einsum("efd,efg,eg->ed", w.double(), w.double(), old)
                    want = norm * powered / powered.norm(dim=-1, keepdim=True)
                    torch.testing.assert_close(r.weight.double(), want, rtol=0, atol=1e-5)
            history.append(cosines())
    # Power iteration on a PSD matrix never decreases the alignment, and here it clearly increases.
    for prev, nxt in itertools.pairwise(history):
        assert bool((nxt >= prev - 1e-6).all())
    assert bool((history[-1] > history[0] + 0.05).all()), (history[0], history[-1])
    assert bool((history[-1] > history[1]).all())
    # Experts were not changed by the forwards.
    for layer, w in zip(model.model.layers, experts, strict=True):
        assert torch.equal(layer.mlp.experts.gate_up_proj, w)
