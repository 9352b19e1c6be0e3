"""A linear-router STAR checkpoint written as Mixtral computes the same logits in transformers' Mixtral, where
the two conventions agree (every expert chosen: Mixtral's renormalised top-k is then STAR's softmax)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import MixtralForCausalLM

from star_serve.bench.serving import linear_router
from star_serve.convert.mixtral import write_mixtral
from star_serve.model import StarMoeForCausalLM
from star_serve.training.presets import tiny_config
from star_serve.training.tokenizer import train_tokenizer

TEXT = "the cat sat on a mat by the river and the dog ran fast over the hill"


def _star(tmp_path: Path, **overrides: object) -> Path:
    words = TEXT.split(" ")
    tokenizer = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))], vocab_size=300)
    config = tiny_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        initializer_range=0.1,
        **overrides,
    )
    torch.manual_seed(0)
    StarMoeForCausalLM(config).save_pretrained(tmp_path / "star")
    tokenizer.save_pretrained(tmp_path / "star")
    return tmp_path / "star"


def test_mixtral_computes_the_linear_router_models_logits(tmp_path: Path) -> None:
    star = _star(tmp_path, router_type="linear", num_local_experts=4, num_experts_per_tok=4)
    mixtral = write_mixtral(star, tmp_path / "mixtral")
    assert json.loads((mixtral / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = StarMoeForCausalLM.from_pretrained(star).eval()(ids).logits
        theirs = MixtralForCausalLM.from_pretrained(mixtral, dtype=torch.float32).eval()(ids).logits
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_top1_routing_is_the_same_choice_weighed_differently(tmp_path: Path) -> None:
    """At k = 1 Mixtral weighs the chosen expert 1 and STAR its probability: same work, other outputs."""
    star = _star(tmp_path, router_type="linear", num_local_experts=4, num_experts_per_tok=1)
    mixtral = write_mixtral(star, tmp_path / "mixtral")
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = StarMoeForCausalLM.from_pretrained(star).eval()(ids).logits
        theirs = MixtralForCausalLM.from_pretrained(mixtral, dtype=torch.float32).eval()(ids).logits
    with pytest.raises(AssertionError):
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_the_linear_router_copy_routes_as_the_star_gate_with_the_trained_bases(tmp_path: Path) -> None:
    star = _star(tmp_path, router_type="star")
    linear = linear_router(star, tmp_path / "linear")
    original = StarMoeForCausalLM.from_pretrained(star).eval()
    copy = StarMoeForCausalLM.from_pretrained(linear).eval()
    assert copy.config.router_type == "linear"
    theirs = dict(copy.state_dict())
    assert not [k for k in theirs if "star_gate" in k]
    for name, tensor in original.state_dict().items():
        if "star_gate" not in name and not name.endswith("router.weight"):
            assert torch.equal(theirs[name], tensor), name
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, folded = original(ids, output_router_logits=True), copy(ids, output_router_logits=True)
    # the linear half alone routes otherwise: the folded gate is what keeps the experts' work the same
    assert not torch.equal(
        theirs["model.layers.0.mlp.router.weight"], original.state_dict()["model.layers.0.mlp.router.weight"]
    )
    for star_logits, linear_logits in zip(ours.router_logits, folded.router_logits, strict=True):
        torch.testing.assert_close(linear_logits, star_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded.logits, ours.logits, atol=1e-5, rtol=1e-5)


def test_transformers_continuous_batching_generates_every_token_of_the_written_checkpoint(tmp_path: Path) -> None:
    from star_serve.bench.peers import PeersBenchConfig, transformers_batching

    mixtral = write_mixtral(linear_router(_star(tmp_path), tmp_path / "linear"), tmp_path / "mixtral")
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
    cfg = PeersBenchConfig(model=tmp_path, out_dir=tmp_path, max_tokens=5, clients=(1, 2), repeats=1)

    results = transformers_batching(mixtral, prompts, cfg, lambda _: None)

    assert set(results) == {"1", "2"}
    for row in results.values():  # greedy, the end token ignored: every request makes its 5 tokens
        assert row["tokens"] == len(prompts) * cfg.max_tokens and row["tokens_per_s"] > 0
