"""Routing outputs of the model (router logits, router inputs, chosen experts) and the causal-LM loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from star_serve.model.packing import PackedLinear, uses_packed

B, S, E, L = 2, 6, 4, 2


def gate(router: Any, x: torch.Tensor) -> torch.Tensor:
    """STAR.md's gate from the router's parameters, for any router type."""
    if router.router_type in ("linear", "mpi"):
        return x @ router.weight.T
    l_gha = x @ (router.star_gate.mixing_coef @ router.star_gate.gha.basis).T
    if router.router_type == "star_gha_only":
        return l_gha
    s = torch.sigmoid(router.star_gate.alpha)
    return s * (x @ router.weight.T) + (1 - s) * l_gha


@pytest.mark.parametrize("router_type", ["star", "star_gha_only", "linear", "mpi"])
def test_router_logits_and_routing_outputs(router_type: str, make_model: Callable[..., Any]) -> None:
    model = make_model(router_type=router_type, num_experts_per_tok=2)
    ids = torch.randint(1, 101, (B, S))
    with torch.no_grad():
        plain = model(ids)
        assert plain.router_logits is None
        assert plain.router_inputs is None and plain.expert_indices is None

        pre_norm: list[torch.Tensor] = []
        handles = [
            layer.post_attention_layernorm.register_forward_hook(lambda _m, args, _o: pre_norm.append(args[0]))
            for layer in model.model.layers
        ]
        out = model(ids, output_router_logits=True, output_routing=True)
        for h in handles:
            h.remove()
    assert isinstance(out.router_logits, tuple) and len(out.router_logits) == L
    assert len(out.router_inputs) == L and len(out.expert_indices) == L
    for layer in range(L):
        logits, inputs, experts = (
            out.router_logits[layer],
            out.router_inputs[layer],
            out.expert_indices[layer],
        )
        assert logits.shape == (B * S, E)
        assert inputs.shape == (B, S, 32)
        assert experts.shape == (B, S, 2) and experts.dtype == torch.long
        # The experts are the top-k of the logits (equivalently of the softmax), best first.
        by_prob = torch.softmax(logits, -1).topk(2, dim=-1).indices.reshape(B, S, 2)
        assert torch.equal(experts, by_prob)
        assert bool((experts[..., 0] != experts[..., 1]).all())
        # The logits are the gate applied to the reported router inputs.
        router = model.model.layers[layer].mlp.router
        with torch.no_grad():
            torch.testing.assert_close(logits, gate(router, inputs).reshape(B * S, E), rtol=0, atol=1e-5)
        # Router inputs are the RMS-normalised residual stream after attention (norm weight initialised to 1).
        h = pre_norm[layer].double()
        want = h / (h.square().mean(-1, keepdim=True) + model.config.rms_norm_eps).sqrt()
        torch.testing.assert_close(inputs.double(), want, rtol=0, atol=1e-5)
    # Layer 1 sees other inputs than layer 0.
    assert not torch.allclose(out.router_inputs[0], out.router_inputs[1], atol=1e-3)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)


def test_backbone_always_returns_router_logits(make_model: Callable[..., Any]) -> None:
    model = make_model(router_type="star")
    with torch.no_grad():
        out = model.model(torch.randint(1, 101, (B, S)))
    assert len(out.router_logits) == L
    assert all(t.shape == (B * S, E) for t in out.router_logits)
    assert out.last_hidden_state.shape == (B, S, 32)


def manual_aux(router_logits: tuple[torch.Tensor, ...], k: int, keep: torch.Tensor | None) -> torch.Tensor:
    """Sum over layers of E * sum_i f_i P_i over kept tokens, with explicit counting."""
    total = torch.zeros((), dtype=torch.float64)
    for logits in router_logits:
        rows = logits.double() if keep is None else logits.double()[keep]
        probs = torch.softmax(rows, -1)
        chosen = rows.topk(k, dim=-1).indices
        counts = torch.zeros(E, dtype=torch.float64)
        for row in chosen.tolist():
            for i in row:
                counts[i] += 1
        total = total + E * ((counts / counts.sum()) * probs.mean(0)).sum()
    return total


@pytest.mark.parametrize("top_k", [1, 2])
def test_causal_lm_loss_is_cross_entropy_plus_weighted_aux(top_k: int, make_model: Callable[..., Any]) -> None:
    coef = 0.25
    model = make_model(router_type="star", num_experts_per_tok=top_k, router_aux_loss_coef=coef)
    ids = torch.randint(1, 101, (B, S))
    labels = ids.clone()
    labels[0, 4:] = -100
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    shifted = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, 101).double(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    aux = manual_aux(out.router_logits, top_k, mask.reshape(-1).bool())
    assert out.aux_loss.item() == pytest.approx(aux.item(), abs=1e-5)
    assert out.loss.item() == pytest.approx((shifted + coef * aux).item(), abs=1e-5)
    # The padding mask matters to the aux loss.
    assert abs(aux.item() - manual_aux(out.router_logits, top_k, None).item()) > 1e-6
    assert L * 1.0 - 1e-6 <= out.aux_loss.item() <= L * E + 1e-6


def test_weights_packed_for_the_cpu_compute_what_the_weights_compute(make_model: Callable[..., Any]) -> None:
    wide = {"hidden_size": 512, "intermediate_size": 256, "vocab_size": 1024}  # 1 MiB an expert, head, q and o
    model = make_model(num_local_experts=4, num_experts_per_tok=2, **wide)
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    names = set(model.state_dict())
    with torch.no_grad():
        plain, plain_one = model(input_ids=ids).logits, model(input_ids=ids[:1, :1]).logits
        assert model.pack_for_cpu()
        packed, packed_one = model(input_ids=ids).logits, model(input_ids=ids[:1, :1]).logits
    assert torch.allclose(packed_one, plain_one, atol=1e-5)  # one row: through the weights themselves
    attention = model.base_model.decoder_layers()[0].self_attn
    assert isinstance(model.lm_head, PackedLinear) and isinstance(attention.q_proj, PackedLinear)
    assert set(model.state_dict()) == names  # checkpoints read and write the same names
    assert torch.allclose(packed, plain, atol=1e-5), (packed - plain).abs().max()
    with torch.enable_grad():  # training never goes through the packed copies: gradients reach the weights
        model(input_ids=ids).logits.sum().backward()
    experts = model.base_model.decoder_layers()[0].mlp.experts
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_the_packed_copy_multiplies_more_than_one_row_and_only_without_gradients() -> None:
    with torch.no_grad():
        assert uses_packed(torch.zeros(2, 8)) and uses_packed(torch.zeros(1, 2, 8))
        assert not uses_packed(torch.zeros(1, 1, 8))  # one row: MKL's matrix-vector product reads the weight faster
        assert uses_packed(torch.zeros(1, 8, dtype=torch.bfloat16))  # but not in bfloat16
    assert not uses_packed(torch.zeros(4, 8))  # training multiplies by the weights, whose gradients it needs


def test_weights_are_packed_only_on_the_cpu_in_float32_and_where_it_pays(make_model: Callable[..., Any]) -> None:
    wide = {"hidden_size": 256, "intermediate_size": 512, "vocab_size": 1024}  # 1 MiB an expert and LM head
    # bfloat16 only where the CPU multiplies it natively
    assert make_model(**wide).to(torch.bfloat16).pack_for_cpu() == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    tiny = make_model()
    assert not tiny.pack_for_cpu()  # the tiny model's weights: oneDNN's cost per call outweighs it
    assert isinstance(tiny.lm_head, nn.Linear)
    narrow_head = make_model(hidden_size=256, intermediate_size=512)  # experts of 1 MiB, a smaller LM head
    assert narrow_head.pack_for_cpu() and isinstance(narrow_head.lm_head, nn.Linear)


def test_experts_too_small_to_pack_are_multiplied_transposed_to_the_same_outputs(
    make_model: Callable[..., Any],
) -> None:
    model = make_model(num_local_experts=4, num_experts_per_tok=2)
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        assert not model.pack_for_cpu()
        transposed = model(input_ids=ids).logits
        experts = model.base_model.decoder_layers()[0].mlp.experts
        assert experts._transposed is not None
        experts._transposed = ([torch.zeros_like(w) for w in experts._transposed[0]], experts._transposed[1])
        assert not torch.allclose(model(input_ids=ids).logits, plain, atol=1e-3)  # the copy is what multiplies
    torch.testing.assert_close(transposed, plain, rtol=0, atol=1e-5)
    with torch.enable_grad():  # training multiplies by the weights themselves
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=1e-5)
    bf16 = make_model().to(torch.bfloat16)
    bf16.pack_for_cpu()
    assert bf16.base_model.decoder_layers()[0].mlp.experts._transposed is None  # float32 only


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bfloat16")
def test_weights_packed_in_bfloat16_compute_what_the_weights_compute(make_model: Callable[..., Any]) -> None:
    wide = {"hidden_size": 512, "intermediate_size": 256, "vocab_size": 1024}
    model = make_model(num_local_experts=4, **wide).to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    with torch.no_grad():
        plain = model(input_ids=ids).logits.float()
        assert model.pack_for_cpu()
        packed = model(input_ids=ids).logits.float()
    assert isinstance(model.lm_head, PackedLinear)
    # bfloat16 rounds both; the packed products may round in another order, and a token may change experts
    assert (packed - plain).abs().mean() < 0.02 * plain.abs().mean()
