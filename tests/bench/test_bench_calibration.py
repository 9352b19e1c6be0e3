"""`bench calibration` on a tiny model: a tenant whose steps barely move keeps the trained routing and loss;
one that moves shows it in drift and consistency; the report names what it measured."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from star_serve.bench.calibration import CalibrationBenchConfig, _table, unshifted_tenant
from star_serve.model import StarMoeForCausalLM
from star_serve.training.presets import tiny_config

SEQ = 32


def _model() -> StarMoeForCausalLM:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=64, max_position_embeddings=SEQ)
    return StarMoeForCausalLM(config).eval()


def test_a_still_tenant_keeps_the_trained_routing_and_a_moving_one_does_not(tmp_path: Path) -> None:
    model = _model()
    generator = torch.Generator().manual_seed(1)
    traffic = torch.randint(0, 64, (64, SEQ), generator=generator)  # 2,048 tokens, 16 steps of 128
    evaluation = torch.randint(0, 64, (16, SEQ), generator=generator)
    cfg = CalibrationBenchConfig(
        models=(), out_dir=tmp_path, traffic_tokens=traffic.numel(), checkpoints=(1024,), seq_len=SEQ, step_tokens=128
    )

    own = traffic[:8]
    still = asyncio.run(unshifted_tenant(model, traffic, evaluation, own, 1e-9, False, cfg, tmp_path / "still"))
    moving = asyncio.run(unshifted_tenant(model, traffic, evaluation, own, 0.5, False, cfg, tmp_path / "moving"))

    assert [row["traffic_tokens"] for row in still["checkpoints"]] == [1024, 2048]
    last = still["checkpoints"][-1]
    assert last["version"] == 16 and last["drift"] < 1e-4  # it stepped, but by nothing
    assert last["consistency"] == 1.0 and abs(last["loss_change"]) < 1e-5
    moved = moving["checkpoints"][-1]
    assert moved["drift"] > 0.01 and moved["consistency"] < 1.0

    runs = [{"model": "tiny", "traffic": "fresh", "learning_rate": lr, **r} for lr, r in ((1e-9, still), (0.5, moving))]
    runs[1]["gated"] = True
    table = _table({"config": {"align_linear_gate": False}, "runs": runs})
    assert table.count("| tiny | fresh |") == 4 and "| 1e-09 | off |" in table and "| 0.5 | on |" in table
    assert "The linear half of the gate not aligned to the tenant's subspace." in table


def test_with_the_gate_the_held_back_prompts_feed_no_step_and_every_step_is_judged(tmp_path: Path) -> None:
    model = _model()
    generator = torch.Generator().manual_seed(1)
    traffic = torch.randint(0, 64, (128, SEQ), generator=generator)  # 4,096 tokens
    evaluation = torch.randint(0, 64, (16, SEQ), generator=generator)
    cfg = CalibrationBenchConfig(
        models=(), out_dir=tmp_path, traffic_tokens=traffic.numel(), checkpoints=(2048,), seq_len=SEQ, step_tokens=128
    )

    gated = asyncio.run(unshifted_tenant(model, traffic, evaluation, traffic[:8], 0.5, True, cfg, tmp_path / "gated"))

    # The first 2,048 prompt tokens of a tenant all go to its held-back sample (the product's default), so
    # nothing of them was stepped on; after that most windows count, and each step is committed or refused.
    first, last = gated["checkpoints"]
    assert first["version"] == 0 and first["drift"] < 1e-6 and first["consistency"] == 1.0
    batches = gated["batches"]
    assert 0 < batches["published"] <= 16  # at most a step per forward of the last 2,048 tokens
    assert batches["applied"] + batches["refused_quality"] == batches["published"]
    assert last["version"] == batches["applied"]
