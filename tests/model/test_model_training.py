"""A tiny model learns a repetitive token pattern with AdamW; gradients reach the learned gate parameters
and never the GHA basis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch


def pattern_batch() -> torch.Tensor:
    """Four phases of the cycle 1..8, 24 tokens each."""
    cycle = torch.arange(1, 9)
    rows = [torch.roll(cycle, -phase).repeat(3) for phase in (0, 2, 4, 6)]
    return torch.stack(rows)


@pytest.mark.parametrize("router_type", ["star", "linear"])
def test_adamw_lowers_the_loss_on_a_repetitive_pattern(router_type: str, make_model: Callable[..., Any]) -> None:
    model = make_model(router_type=router_type, gha_learning_rate=1e-2).train()
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("gha.basis") for n in names), "the basis must not be a trainable parameter"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = pattern_batch()
    basis_start = model.trained_bases().clone() if router_type == "star" else None
    losses = []
    for step in range(30):
        out = model(ids, labels=ids)
        optimizer.zero_grad()
        out.loss.backward()
        if step == 0:
            for layer in model.model.layers:
                router = layer.mlp.router
                assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
                if router_type == "star":
                    assert router.star_gate.mixing_coef.grad.abs().sum() > 0
                    assert router.star_gate.alpha.grad.abs().sum() > 0
                    assert router.star_gate.gha.basis.grad is None
        optimizer.step()
        assert torch.isfinite(out.loss)
        losses.append(out.loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    assert min(losses[-5:]) < losses[0] - 2.0
    if basis_start is not None:
        basis_end = model.trained_bases()
        assert (basis_end - basis_start).abs().max() > 1e-3, "GHA should have updated the bases in training"
        torch.testing.assert_close(basis_end.norm(dim=-1), torch.ones(2, 4), rtol=0, atol=1e-5)
    # The trained model predicts the cycle.
    model.eval()
    with torch.no_grad():
        predicted = model(ids).logits[:, 8:-1].argmax(-1)
    accuracy = (predicted == ids[:, 9:]).float().mean().item()
    assert accuracy > 0.9
