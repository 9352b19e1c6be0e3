"""save_pretrained / from_pretrained round trips through transformers' Auto classes, bit for bit."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from star_serve.model import (
    StarMoeConfig,
    StarMoeForCausalLM,
    StarMoeForSequenceClassification,
    StarMoeModel,
)
from star_serve.model.loading import share_checkpoint

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
# Weights are compared bit for bit. Outputs get one-ulp-scale slack: tensors loaded from safetensors sit at
# other memory alignments, and CPU matmul kernels may then sum in another order (seen: 2e-10 differences).
OUT_ATOL = 1e-6


def make_distinctive(model: Any) -> None:
    """Moves every tensor away from its initial value, so that a re-initialisation on load would show:
    GHA steps for the bases, random values for the gate parameters."""
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    if model.config.router_type in ("star", "star_gha_only", "mpi"):
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=torch.randint(1, 101, (2, 6), generator=gen))
        model.eval()


def assert_state_dicts_identical(a: Any, b: Any) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), f"{key} differs after the round trip"


@pytest.mark.parametrize("router_type", ["star", "star_gha_only", "linear", "mpi"])
def test_causal_lm_round_trip(router_type: str, tmp_path: Path, make_model: Callable[..., Any]) -> None:
    model = make_model(router_type=router_type, gha_learning_rate=0.05, num_experts_per_tok=2)
    make_distinctive(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["model_type"] == "star_moe"
    assert config_json["router_type"] == router_type

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is StarMoeConfig
    assert config.router_type == router_type and config.num_experts_per_tok == 2
    assert config.hidden_size == 32 and config.num_local_experts == 4 and config.num_key_value_heads == 2

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is StarMoeForCausalLM
    loaded.eval()
    assert_state_dicts_identical(model, loaded)

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        prefix = "model.layers.0.mlp.router."
        if router_type != "star_gha_only":
            assert prefix + "weight" in keys
        if router_type in ("star", "star_gha_only"):
            for name in ("star_gate.mixing_coef", "star_gate.alpha", "star_gate.gha.basis"):
                assert prefix + name in keys
            for layer in range(2):
                key = f"model.layers.{layer}.mlp.router.star_gate.gha.basis"
                stored = f.get_tensor(key)
                assert torch.equal(stored, model.model.layers[layer].mlp.router.star_gate.gha.basis)
        else:
            assert not any("star_gate" in k for k in keys)

    ids = torch.randint(1, 101, (2, 7))
    with torch.no_grad():
        a = model(ids, output_router_logits=True)
        b = loaded(ids, output_router_logits=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=OUT_ATOL)
    for la, lb in zip(a.router_logits, b.router_logits, strict=True):
        torch.testing.assert_close(lb, la, rtol=0, atol=OUT_ATOL)

    backbone = AutoModel.from_pretrained(tmp_path)
    assert type(backbone) is StarMoeModel


def test_sequence_classification_round_trip(tmp_path: Path, make_model: Callable[..., Any]) -> None:
    model = make_model(
        StarMoeForSequenceClassification,
        num_labels=3,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        gha_learning_rate=0.05,
    )
    make_distinctive(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "star_moe"
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(loaded) is StarMoeForSequenceClassification
    assert loaded.config.num_labels == 3
    assert loaded.config.id2label == LABELS
    assert loaded.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    loaded.eval()
    assert_state_dicts_identical(model, loaded)
    ids = torch.randint(1, 101, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, attention_mask=mask).logits,
            model(ids, attention_mask=mask).logits,
            rtol=0,
            atol=OUT_ATOL,
        )


def test_causal_checkpoint_loads_as_classifier(tmp_path: Path, make_model: Callable[..., Any]) -> None:
    lm = make_model(router_type="star", gha_learning_rate=0.05)
    make_distinctive(lm)
    lm.save_pretrained(tmp_path)
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3, id2label=LABELS)
    assert type(clf) is StarMoeForSequenceClassification
    assert clf.config.num_labels == 3 and clf.config.id2label == LABELS
    assert clf.score.weight.shape == (3, 32)
    lm_state, clf_state = lm.state_dict(), clf.state_dict()
    backbone = [k for k in lm_state if k.startswith("model.")]
    assert any(k.endswith("star_gate.gha.basis") for k in backbone)
    for key in backbone:
        assert torch.equal(lm_state[key], clf_state[key]), key
    clf.eval()
    with torch.no_grad():
        ids = torch.randint(1, 101, (2, 5))
        assert clf(ids).logits.shape == (2, 3)
        torch.testing.assert_close(
            clf.model(ids).last_hidden_state, lm.model(ids).last_hidden_state, rtol=0, atol=OUT_ATOL
        )


def test_share_checkpoint_makes_saved_files_readable_by_other_users(
    tmp_path: Path, make_model: Callable[..., Any]
) -> None:
    """safetensors writes its file owner-only; a server running as another user (the image's) must read it."""
    make_model().save_pretrained(tmp_path)
    previous = os.umask(0o022)
    try:
        share_checkpoint(tmp_path)
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {0o644}, modes
