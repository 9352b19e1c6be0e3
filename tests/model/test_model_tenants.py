"""One forward over a batch that mixes tenants routes every sequence through its own tenant's bases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from star_serve.model import Routing


def tenant_bank(model: Any, scales: tuple[float, ...], seed: int = 0) -> torch.Tensor:
    """(T, L, E, D): the trained bases perturbed differently per tenant, rows renormalised."""
    gen = torch.Generator().manual_seed(seed)
    trained = model.trained_bases()
    rows = []
    for scale in scales:
        bank = trained + scale * torch.randn(trained.shape, generator=gen)
        rows.append(bank / bank.norm(dim=-1, keepdim=True))
    return torch.stack(rows)


@pytest.mark.parametrize(("router_type", "top_k"), [("star", 1), ("star", 2), ("star_gha_only", 1)])
def test_mixed_tenant_batch_equals_each_sequence_alone(
    router_type: str, top_k: int, make_model: Callable[..., Any]
) -> None:
    model = make_model(router_type=router_type, num_experts_per_tok=top_k)
    bank = tenant_bank(model, (0.3, 1.0, 3.0))
    assert bank.shape == (3, 2, 4, 32)
    ids = torch.randint(1, 101, (6, 8))
    tenants = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        mixed = model(ids, routing=Routing(bank, tenants), output_routing=True)
        folded = model(ids, routing=Routing(gates=model.router_gates(bank[tenants])), output_routing=True)
        torch.testing.assert_close(folded.logits, mixed.logits, rtol=0, atol=1e-5)
        for layer in range(2):
            assert torch.equal(folded.expert_indices[layer], mixed.expert_indices[layer])
        for i, t in enumerate(tenants.tolist()):
            alone = model(ids[i : i + 1], routing=Routing(bank[t : t + 1], torch.tensor([0])), output_routing=True)
            torch.testing.assert_close(mixed.logits[i : i + 1], alone.logits, rtol=0, atol=1e-5)
            for layer in range(2):
                assert torch.equal(mixed.expert_indices[layer][i : i + 1], alone.expert_indices[layer])

        # The tenants genuinely differ: sequence 0 under another tenant's bases routes and predicts otherwise.
        differences = []
        for other in (1, 2):
            swapped = model(ids[:1], routing=Routing(bank[other : other + 1]), output_routing=True)
            routing_changed = any(
                not torch.equal(swapped.expert_indices[layer], mixed.expert_indices[layer][:1]) for layer in range(2)
            )
            differences.append(routing_changed)
            assert (swapped.logits - mixed.logits[:1]).abs().max() > 1e-3
        assert any(differences), "another tenant's bases should change some routing decision"


def test_omitting_the_bank_equals_the_trained_bases(make_model: Callable[..., Any]) -> None:
    model = make_model(router_type="star", num_experts_per_tok=2)
    ids = torch.randint(1, 101, (3, 7))
    own = model.trained_bases()
    assert own.shape == (2, 4, 32) and own.dtype == torch.float32
    for layer, router in enumerate(r.mlp.router for r in model.model.layers):
        assert torch.equal(own[layer], router.star_gate.gha.basis)
    with torch.no_grad():
        plain = model(ids, output_routing=True)
        banked = model(ids, routing=Routing(own[None], torch.zeros(3, dtype=torch.long)), output_routing=True)
        defaulted = model(ids, routing=Routing.shared(own))  # the index defaults to row 0
        folded = model(ids, routing=Routing(gates=model.router_gates(own[None])))  # (1, L, E, D): one gate per layer
        other = model(ids, routing=Routing(tenant_bank(model, (2.0,))))
    torch.testing.assert_close(banked.logits, plain.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(defaulted.logits, plain.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(folded.logits, plain.logits, rtol=0, atol=1e-5)
    for layer in range(2):
        assert torch.equal(banked.expert_indices[layer], plain.expert_indices[layer])
    assert (other.logits - plain.logits).abs().max() > 1e-3


def test_bank_with_wrong_layer_count_is_rejected(make_model: Callable[..., Any]) -> None:
    model = make_model(router_type="star")
    bank = model.trained_bases()[None, :1]  # one layer instead of two
    with pytest.raises(ValueError, match="layers"):
        model(torch.randint(1, 101, (1, 4)), routing=Routing(bank))


def test_trained_bases_rejects_routers_without_subspace(make_model: Callable[..., Any]) -> None:
    model = make_model(router_type="linear")
    with pytest.raises(ValueError, match="no GHA subspace"):
        model.trained_bases()


def test_generate_with_mixed_tenants_equals_each_row_alone(make_model: Callable[..., Any]) -> None:
    model = make_model(router_type="star", seed=5)
    with torch.no_grad():  # strong experts, so that routing decides greedy tokens in an untrained model
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.mul_(8.0)
            layer.mlp.experts.down_proj.mul_(8.0)
    bank = tenant_bank(model, (0.5, 2.0, 4.0), seed=1)
    prompts = torch.randint(1, 101, (3, 5))
    tenants = torch.tensor([2, 0, 1])
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    mask = torch.ones_like(prompts)
    mixed = model.generate(prompts, attention_mask=mask, routing=Routing(bank, tenants), **kwargs)
    outputs_by_tenant = []
    for i, t in enumerate(tenants.tolist()):
        alone = model.generate(
            prompts[i : i + 1],
            attention_mask=mask[:1],
            routing=Routing(bank[t : t + 1], torch.tensor([0])),
            **kwargs,
        )
        assert mixed[i].tolist() == alone[0].tolist(), f"row {i}"
        with torch.no_grad():
            full = model(alone, routing=Routing(bank[t : t + 1])).logits[0]
        assert alone[0, 5:].tolist() == full[4:-1].argmax(-1).tolist()
        outputs_by_tenant.append(
            [
                model.generate(prompts[i : i + 1], attention_mask=mask[:1], routing=Routing(bank[o : o + 1]), **kwargs)
                for o in range(3)
            ]
        )
    # Some prompt continues differently under different tenants' bases.
    assert any(len({tuple(g[0].tolist()) for g in gens}) > 1 for gens in outputs_by_tenant)
