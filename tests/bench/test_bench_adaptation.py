"""`bench adaptation` on tiny models built here: the corruptions, the rotations and routing consistency,
then parts (a) and (b) end to end through a real `Adapter` and `ClassificationEngine` on small slices.
Part (c) starts servers and is not run here."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from transformers import PreTrainedTokenizerFast

from star_serve.adaptation import AdaptationConfig, Adapter, LocalDirStore, TenantBank
from star_serve.bench.adaptation import (
    CORRUPTIONS,
    AdaptationBenchConfig,
    _adapt_rotated,
    _table,
    corrupt,
    corruption_shift,
    rotation,
    rotation_shift,
    route,
    router_inputs,
    routing_consistency,
)
from star_serve.bench.cost import ADAPTING, COST_SERVERS, lag_quantiles, paired_ratio
from star_serve.bench.report import write_report
from star_serve.metrics import ServingMetrics
from star_serve.model import StarMoeConfig, StarMoeForCausalLM, StarMoeForSequenceClassification
from star_serve.training.corpus import FAMILIES, lm_corpus
from star_serve.training.presets import tiny_config
from star_serve.training.tokenizer import train_tokenizer

TEXT = "Send the request to the server and wait for the HTTP response, then close the connection."


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(lm_corpus()[0][:200], vocab_size=300)


def _config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> StarMoeConfig:
    fields: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": 0.1,  # routers' logits spread enough that top-1 choices are not near-ties
    }
    return tiny_config(**{**fields, **overrides})


def _tiny_lm(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> StarMoeForCausalLM:
    torch.manual_seed(0)
    return StarMoeForCausalLM(_config(tokenizer, **overrides)).eval()


# -- corruptions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_zero_is_the_identity_and_every_corruption_is_seeded(name: str) -> None:
    assert corrupt(TEXT, name, 0, seed=7) == TEXT
    assert corrupt(TEXT, name, 5, seed=3) == corrupt(TEXT, name, 5, seed=3)
    assert corrupt(TEXT, name, 5, seed=3) != TEXT
    drawn = {corrupt(TEXT, name, 5, seed=s) for s in range(5)}
    assert len(drawn) > 1, "the seed does not change the draw"


def test_corruptions_do_what_they_say() -> None:
    words = TEXT.split(" ")
    assert sorted(corrupt(TEXT, "word_shuffle", 5).split(" ")) == sorted(words)
    assert corrupt(TEXT, "case_flip", 5).lower() == TEXT.lower()
    assert sorted(corrupt(TEXT, "char_swap", 5)) == sorted(TEXT)
    deleted = corrupt(TEXT, "char_delete", 5)
    assert len(deleted) < len(TEXT) and deleted.count(" ") == TEXT.count(" ")
    noisy = iter(corrupt(TEXT, "noise_inject", 5).split(" "))
    assert all(word in noisy for word in words), "the original words, in order, with junk between them"


def test_severity_grows_the_damage() -> None:
    changed = [sum(a != b for a, b in zip(TEXT, corrupt(TEXT, "case_flip", s), strict=True)) for s in range(6)]
    assert changed[0] == 0 and changed[5] > changed[1]


# -- rotations and routing ----------------------------------------------------------------------------


def test_rotation_is_orthogonal_with_the_largest_angle_theta() -> None:
    assert torch.equal(rotation(16, 0), torch.eye(16))
    for degrees in (15.0, 90.0, 150.0):
        q = rotation(16, degrees).double()
        assert torch.allclose(q @ q.T, torch.eye(16, dtype=torch.float64), atol=1e-5)
        turns = torch.linalg.eigvals(q).angle().abs()  # each invariant plane's angle, radians
        assert math.degrees(float(turns.max())) == pytest.approx(degrees, abs=1e-3)
        assert torch.equal(rotation(16, degrees), rotation(16, degrees))


def test_routing_consistency_compares_sets_of_experts() -> None:
    a = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3]])
    b = torch.tensor([[1, 0], [2, 3], [1, 3], [3, 0]])
    assert routing_consistency(a, a) == 1.0
    assert routing_consistency(a, b) == 0.75


def test_route_matches_the_models_own_choices_and_the_ceiling_undoes_a_rotation(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    model = _tiny_lm(tokenizer, router_type="star_gha_only", num_experts_per_tok=2)
    texts = lm_corpus()[1][:6]
    inputs = router_inputs(model, tokenizer, texts, seq_len=48)  # L x (N, D)
    ids = [tokenizer(t)["input_ids"][:48] for t in texts]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids[0]]), output_routing=True)
    routers = [layer.mlp.router for layer in model.model.decoder_layers()]
    trained = model.trained_bases()
    for layer, (r, x, v) in enumerate(zip(routers, inputs, trained, strict=True)):
        reference = route(r, x, v, 2)
        own = out.expert_indices[layer][0]  # (S, k): the first text's tokens come first in `inputs`
        assert routing_consistency(own, reference[: own.shape[0]]) == 1.0
        q = rotation(x.shape[1], 90)
        # A GHA-only gate sees x only through V x, and (V Qᵀ)(Q x) = V x: the ceiling restores every choice.
        assert routing_consistency(reference, route(r, x @ q.T, v @ q.T, 2)) > 0.99
        assert routing_consistency(reference, route(r, x @ q.T, v, 2)) < 0.9
        # For this router the whole gate is its subspace half.
        assert torch.equal(route(r, x, v, 2, subspace=True), reference)


def test_each_round_commits_one_version_through_the_adapter(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    model = _tiny_lm(tokenizer)
    inputs = router_inputs(model, tokenizer, lm_corpus()[1][:8], seq_len=48)
    routers = [layer.mlp.router for layer in model.model.decoder_layers()]
    trained = model.trained_bases()

    async def scenario() -> tuple[torch.Tensor, dict[str, Any]]:
        bank = TenantBank(trained, torch.device("cpu"), torch.float32)
        adapter = Adapter(
            "lm", trained, bank, LocalDirStore(tmp_path), AdaptationConfig(mode="async", min_tokens=1 << 30)
        )
        adapter.start()
        try:
            bases = await _adapt_rotated(adapter, bank, "acme", routers, inputs, rounds=3, chunk=64, k=1)
            return bases, await adapter.describe("acme")
        finally:
            await adapter.stop()

    bases, state = asyncio.run(scenario())
    assert state["version"] == 3
    assert not torch.equal(bases, trained) and max(state["drift"]) > 0  # type: ignore[call-overload]


# -- parts (a) and (b) on small slices ----------------------------------------------------------------


def _small(tmp_path: Path, **overrides: Any) -> AdaptationBenchConfig:
    fields: dict[str, Any] = {
        "angles": (0, 90),
        "eval_tokens": 128,
        "adapt_tokens": 256,
        "rounds": 2,
        "warmup_rounds": 2,
        "corruptions": ("char_swap", "case_flip"),
        "severities": (5,),
        "passes": 1,
        "warmup_passes": 1,
    }
    return AdaptationBenchConfig(tmp_path / "lm", tmp_path / "clf", tmp_path / "out", **{**fields, **overrides})


@pytest.mark.slow
def test_parts_a_and_b_end_to_end_on_tiny_models(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    cfg = _small(tmp_path)
    lm = _tiny_lm(tokenizer)
    rotation_results = asyncio.run(rotation_shift(lm, tokenizer, cfg, tmp_path / "rotation", lambda _: None))
    assert rotation_results["eval_tokens"] == 128 and rotation_results["adapt_tokens"] == 256
    assert set(rotation_results["angles"]) == {"0", "90"}
    at0, at90 = rotation_results["angles"]["0"], rotation_results["angles"]["90"]
    for kind in ("frozen", "ceiling", "warm_frozen", "warm_ceiling", "warm_half_frozen"):
        assert at0[kind] == 1.0 and at0["per_layer"][kind] == [1.0, 1.0]
    assert at90["frozen"] < 1.0 and at90["warm_half_frozen"] < 1.0 and at90["mean_token_turn_degrees"] > 0
    assert all(0.0 <= at90[kind] <= 1.0 for kind in ("adapted", "warm_adapted", "warm_half_adapted"))

    labels = list(FAMILIES)
    torch.manual_seed(0)
    classifier = StarMoeForSequenceClassification(
        _config(tokenizer, num_labels=len(labels), id2label=dict(enumerate(labels)))
    ).eval()
    corruption = asyncio.run(corruption_shift(classifier, tokenizer, cfg, tmp_path / "corruption", lambda _: None))
    kinds = {"frozen", "adapted", "warm_frozen", "warm_adapted"}
    assert set(corruption["cells"]) == {"clean", "char_swap", "case_flip"}
    assert set(corruption["cells"]["char_swap"]) == {"5"} and set(corruption["cells"]["clean"]) == {"0"}
    assert set(corruption["mean"]) == kinds
    assert all(0.0 <= corruption["cells"]["case_flip"]["5"][kind] <= 1.0 for kind in kinds)

    # The engine's "frozen" accuracy on clean inputs is the model's own, computed here one text at a time.
    from star_serve.training.corpus import classifier_dataset

    heldout = classifier_dataset()[1]
    evaluation = heldout[: len(heldout) // 2]
    hits = 0
    with torch.no_grad():
        for text, label in evaluation:
            ids = tokenizer(text)["input_ids"][:64] or [tokenizer.eos_token_id]
            hits += int(classifier(input_ids=torch.tensor([ids])).logits[0].argmax()) == label
    assert corruption["eval_inputs"] == len(evaluation)
    assert corruption["cells"]["clean"]["0"]["frozen"] == pytest.approx(hits / len(evaluation), abs=2 / len(evaluation))

    results = {"rotation": rotation_results, "corruption": corruption, "cost": _cost_shape(cfg)}
    table = _table(results, cfg)
    assert "| 90° |" in table and "char_swap" in table and "0.80 s / 4.50 s" in table
    assert "2 of 2 tenants committed" in table and "1 of 3 tenants committed" in table
    written = write_report(cfg.out_dir, "adaptation", results, table, None)
    assert [p.name for p in written] == ["adaptation.json", "adaptation.md"]


def _cost_shape(cfg: AdaptationBenchConfig) -> dict[str, Any]:
    """Part (c)'s result layout with made-up rates (it starts servers, so it is not run here)."""
    load = {
        **{mode: {"median_tokens_per_s": 1.0, "runs": [1.0]} for mode in COST_SERVERS},
        "ratios_to_off": {mode: 1.0 for mode in ADAPTING},
    }
    lag = {"median": 0.8, "p99": 4.5, "commits": 12}
    return {
        "sample_rates": [1.0, 0.25],
        "loads": {str(cfg.tenants): load, "1": load},
        "token_to_commit_lag_s": {mode: lag for mode in ADAPTING},
        "tenant_versions_after": {mode: [2, 1, None] if mode == "async" else [1, 0, 0] for mode in ADAPTING},
    }


def test_paired_ratio_cancels_a_drift_between_repeats() -> None:
    # The machine halves its speed after the second repeat; each repeat's pair is 0.9 all the same.
    off = [1000.0, 1000.0, 500.0, 500.0, 500.0]
    on = [900.0, 900.0, 450.0, 450.0, 450.0]
    assert paired_ratio(on, off) == pytest.approx(0.9)
    on[2] = 600.0  # one repeat where adaptation ran faster: the median of the pairs does not move
    assert paired_ratio(on, off) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        paired_ratio(on, off[:-1])


def test_lag_quantiles_interpolate_the_servers_histogram_as_prometheus_does() -> None:
    metrics = ServingMetrics(CollectorRegistry())
    for lag in (0.2,) * 50 + (0.4,) * 49 + (40.0,):  # 50 in (0.1, 0.25], 49 in (0.25, 0.5], 1 in (30, 60]
        metrics.adaptation_lag.labels("bench").observe(lag)
    metrics.adaptation_lag.labels("other").observe(100.0)
    quantiles = lag_quantiles(generate_latest(metrics.registry).decode(), "bench")
    assert quantiles["commits"] == 100
    assert quantiles["median"] == pytest.approx(0.25)  # the 50th of 100 lies at the top of (0.1, 0.25]
    assert quantiles["p99"] == pytest.approx(0.5)  # the 99th, at the top of (0.25, 0.5]
    empty = generate_latest(ServingMetrics(CollectorRegistry()).registry).decode()
    assert lag_quantiles(empty, "bench") == {"median": None, "p99": None, "commits": 0}
