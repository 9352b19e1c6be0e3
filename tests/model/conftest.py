"""Fixtures of the model-library tests: tiny STAR MoE configurations and models built in the tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from star_serve.model import StarMoeConfig, StarMoeForCausalLM

TINY = {
    "vocab_size": 101,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 1,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}


def tiny_config(**overrides: Any) -> StarMoeConfig:
    return StarMoeConfig(**{**TINY, **overrides})


@pytest.fixture
def make_config() -> Callable[..., StarMoeConfig]:
    """`make_config(**overrides)`: hidden 32, 2 layers, 4 heads, 2 KV heads, 4 experts, vocab 101."""
    return tiny_config


@pytest.fixture
def make_model() -> Callable[..., Any]:
    """`make_model(cls=StarMoeForCausalLM, seed=0, **config_overrides)`: a tiny model in eval mode."""

    def build(cls: type = StarMoeForCausalLM, seed: int = 0, **overrides: Any) -> Any:
        torch.manual_seed(seed)
        return cls(tiny_config(**overrides)).eval()

    return build


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(1234)
