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

    still = asyncio.run(unshifted_tenant(model, traffic, evaluation, traffic[:8], 1e-9, cfg, tmp_path / "still"))
    moving = asyncio.run(unshifted_tenant(model, traffic, evaluation, traffic[:8], 0.5, cfg, tmp_path / "moving"))

    assert [row["traffic_tokens"] for row in still["checkpoints"]] == [1024, 2048]
    last = still["checkpoints"][-1]
    assert last["version"] == 16 and last["drift"] < 1e-4  # it stepped, but by nothing
    assert last["consistency"] == 1.0 and abs(last["loss_change"]) < 1e-5
    moved = moving["checkpoints"][-1]
    assert moved["drift"] > 0.01 and moved["consistency"] < 1.0

    runs = [{"model": "tiny", "traffic": "fresh", "learning_rate": lr, **r} for lr, r in ((1e-9, still), (0.5, moving))]
    table = _table({"runs": runs})
    assert table.count("| tiny | fresh |") == 4 and "| 1e-09 |" in table and "| 0.5 |" in table
