"""Fixtures of the engine tests: a tiny byte-level tokenizer, tiny STAR MoE models sized to it, and engines
that are always stopped when a test ends."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from engine_support import WORDS, StepGate, tiny_config
from transformers import PreTrainedTokenizerFast

from star_serve.adaptation import TenantBank
from star_serve.engine.generation import EngineConfig, GenerationEngine
from star_serve.model import StarMoeForCausalLM
from star_serve.training.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(300)]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture
def make_lm(tokenizer: PreTrainedTokenizerFast) -> Callable[..., StarMoeForCausalLM]:
    """`make_lm(seed=0, **config_overrides)`: a tiny causal LM in eval mode whose vocabulary is the tokenizer's."""

    def build(seed: int = 0, **overrides: Any) -> StarMoeForCausalLM:
        torch.manual_seed(seed)
        return StarMoeForCausalLM(tiny_config(tokenizer, **overrides)).eval()

    return build


@pytest.fixture
def lm(make_lm: Callable[..., StarMoeForCausalLM]) -> StarMoeForCausalLM:
    return make_lm()


@pytest.fixture
def engines() -> Iterator[Callable[..., GenerationEngine]]:
    """`engines(model, tokenizer, bank=None, start=True, gate=None, **config)`: builds (and starts) an engine
    that is stopped, its gate opened, when the test ends."""
    built: list[tuple[GenerationEngine, StepGate | None]] = []

    def build(
        model: Any,
        tokenizer: Any,
        bank: TenantBank | None = None,
        start: bool = True,
        gate: StepGate | None = None,
        **config: Any,
    ) -> GenerationEngine:
        if bank is None:
            bank = TenantBank(model.trained_bases(), torch.device("cpu"), torch.float32, fold=model.router_gates)
        engine = GenerationEngine(model, tokenizer, bank, EngineConfig(**config), on_step=gate)
        built.append((engine, gate))
        if start:
            engine.start()
        return engine

    yield build
    for engine, gate in built:
        if gate is not None:
            gate.open()
        if engine.alive:
            engine.stop()
            assert not engine.alive, "the engine thread did not stop"
