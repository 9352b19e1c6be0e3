"""The sequence-classification head: pooling over real tokens only, and its loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from star_serve.model import StarMoeForSequenceClassification

LABELS = {0: "a", 1: "b", 2: "c"}


def classifier(make_model: Callable[..., Any], pooling: str, **overrides: Any) -> Any:
    return make_model(
        StarMoeForSequenceClassification,
        num_labels=3,
        id2label=LABELS,
        classifier_pooling=pooling,
        **overrides,
    )


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padding_does_not_change_logits(pooling: str, side: str, make_model: Callable[..., Any]) -> None:
    model = classifier(make_model, pooling)
    ids = torch.randint(1, 101, (2, 6))
    junk = torch.randint(1, 101, (2, 3))  # real-looking tokens under mask 0: only the mask hides them
    if side == "right":
        padded = torch.cat([ids, junk], dim=1)
        mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 3)], dim=1).long()
    else:
        padded = torch.cat([junk, ids], dim=1)
        mask = torch.cat([torch.zeros(2, 3), torch.ones(2, 6)], dim=1).long()
    with torch.no_grad():
        base = model(ids).logits
        with_ones = model(ids, attention_mask=torch.ones_like(ids)).logits
        got = model(padded, attention_mask=mask).logits
        unmasked = model(padded).logits
    assert base.shape == (2, 3)
    torch.testing.assert_close(with_ones, base, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, base, rtol=0, atol=1e-5)
    assert (unmasked - base).abs().max() > 1e-4, "without the mask the junk tokens should count"


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooling_matches_hidden_states(pooling: str, make_model: Callable[..., Any]) -> None:
    model = classifier(make_model, pooling)
    ids = torch.randint(1, 101, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, :3] = 0
    with torch.no_grad():
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
        logits = model(ids, attention_mask=mask).logits
    for b in range(3):
        real = mask[b].bool()
        pooled = hidden[b, real].mean(0) if pooling == "mean" else hidden[b, real.nonzero().max()]
        torch.testing.assert_close(logits[b], model.score.weight @ pooled, rtol=0, atol=1e-5)


def test_classification_loss_is_cross_entropy_plus_weighted_aux(make_model: Callable[..., Any]) -> None:
    coef = 0.3
    model = classifier(make_model, "mean", router_aux_loss_coef=coef, num_experts_per_tok=2)
    ids = torch.randint(1, 101, (4, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[3, :2] = 0
    labels = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    keep = mask.reshape(-1).bool()
    aux = torch.zeros((), dtype=torch.float64)
    for logits in out.router_logits:
        rows = logits.double()[keep]
        probs = torch.softmax(rows, -1)
        counts = torch.bincount(rows.topk(2, dim=-1).indices.reshape(-1), minlength=4).double()
        aux = aux + 4 * (counts / counts.sum() * probs.mean(0)).sum()
    ce = F.cross_entropy(out.logits.double(), labels)
    assert out.aux_loss.item() == pytest.approx(aux.item(), abs=1e-5)
    assert out.loss.item() == pytest.approx((ce + coef * aux).item(), abs=1e-5)
    assert out.loss.item() > ce.item() + 0.1  # the aux term is really included (aux >= number of layers)

    no_labels = model(ids, attention_mask=mask)
    assert no_labels.loss is None and no_labels.aux_loss is None
