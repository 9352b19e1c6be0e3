"""The roofline's arithmetic: what a decode step of a STAR MoE computes and reads, and a share of 1 exactly at
the bound."""

from __future__ import annotations

import math

import pytest
import torch

from star_serve.bench.roofline import Roofline, decode_step, measure_roofline, roofline_share
from star_serve.model import StarMoeConfig, StarMoeForCausalLM
from star_serve.training.presets import get_preset


@pytest.fixture
def config() -> StarMoeConfig:
    return StarMoeConfig(vocab_size=51200, **get_preset("star-182m").model)


def test_flops_grow_with_the_batch_and_bytes_with_the_experts_it_touches(config: StarMoeConfig) -> None:
    one_flops, one_bytes = decode_step(config, 1, context=0, dtype_bytes=4)
    flops, moved = decode_step(config, 64, context=0, dtype_bytes=4)
    assert flops == pytest.approx(64 * one_flops)
    expert = 3 * config.hidden_size * config.intermediate_size * 4
    # one token touches one expert a layer; 64 touch nearly all 8
    assert moved - one_bytes == pytest.approx(config.num_hidden_layers * 7 * expert, rel=0.01)
    parameters = sum(p.numel() for p in _model(config).parameters())
    assert moved / 4 == pytest.approx(parameters, rel=0.1)  # a wide batch reads about every weight once


def test_keys_and_values_are_read_for_every_sequence(config: StarMoeConfig) -> None:
    without = decode_step(config, 8, context=0, dtype_bytes=2)[1]
    with_context = decode_step(config, 8, context=512, dtype_bytes=2)[1]
    kv = config.num_key_value_heads * config.head_dim
    assert with_context - without == 8 * config.num_hidden_layers * 2 * 512 * kv * 2


def test_a_run_at_the_bound_has_a_share_of_one(config: StarMoeConfig) -> None:
    roofline = Roofline(matmul_flops=1e11, bandwidth=1e10)
    flops, moved = decode_step(config, 32, 100, 4)
    step = max(flops / 1e11, moved / 1e10)
    assert roofline_share(roofline, config, 32, 100, 4, tokens_per_s=32 / step) == pytest.approx(1.0)
    assert roofline_share(roofline, config, 32, 100, 4, tokens_per_s=16 / step) == pytest.approx(0.5)


def test_the_machine_is_measured() -> None:
    roofline = measure_roofline(torch.device("cpu"), torch.float32, repeats=2)
    assert math.isfinite(roofline.matmul_flops) and roofline.matmul_flops > 1e8
    assert math.isfinite(roofline.bandwidth) and roofline.bandwidth > 1e8


def _model(config: StarMoeConfig) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only
        return StarMoeForCausalLM(config)
