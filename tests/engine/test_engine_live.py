"""The live loss of sampled prompts, measured by the engine during prefill: it equals a direct teacher-forced
computation with the bases that served the prompt (and, for the shadow share, with the trained bases), and a
version that scores worse than the trained bases on the same tokens is handed on once its window is full."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from engine_support import collect, perturbed_bases, run

from star_serve.adaptation import TenantBank
from star_serve.adaptation.live import LiveConfig, LiveQuality
from star_serve.engine import SamplingParams
from star_serve.engine.generation import EngineConfig, GenerationEngine, SequenceRequest
from star_serve.model import Routing

PROMPTS = ["the cat sat on a mat", "a big red house", "the dog ran fast on the hill near the river", "blue tree"]


@pytest.fixture
def live_engine(lm: Any, tokenizer: Any) -> Iterator[tuple[GenerationEngine, TenantBank, LiveQuality]]:
    bank = TenantBank(lm.trained_bases(), torch.device("cpu"), torch.float32, fold=lm.router_gates)
    live = LiveQuality(LiveConfig(sample_rate=1.0, shadow_rate=1.0, window=16, margin=0.01))
    engine = GenerationEngine(lm, tokenizer, bank, EngineConfig(max_running=8), live=live)
    engine.start()
    yield engine, bank, live
    engine.stop()


def _serve(engine: GenerationEngine, tokenizer: Any, tenant: str, prompts: list[str]) -> None:
    async def go() -> None:
        params = SamplingParams(max_tokens=2, temperature=0.0)
        streams = engine.submit([SequenceRequest(tokenizer.encode(p), params, tenant) for p in prompts])
        await asyncio.gather(*(collect(s) for s in streams))

    run(go())


@torch.no_grad()
def _direct(lm: Any, tokenizer: Any, prompts: list[str], bases: torch.Tensor) -> tuple[float, int]:
    """Summed next-token loss of each prompt alone, teacher-forced, routed with `bases` (L, E, D)."""
    total, tokens = 0.0, 0
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])
        logits = lm(ids, routing=Routing.shared(bases)).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        tokens += ids.shape[1] - 1
    return total, tokens


def test_the_served_loss_equals_a_direct_computation_with_the_same_bases(
    lm: Any, tokenizer: Any, live_engine: tuple[GenerationEngine, TenantBank, LiveQuality]
) -> None:
    engine, bank, live = live_engine
    own = perturbed_bases(lm, 2.0, seed=3)
    bank.publish("acme", own, version=4)
    _serve(engine, tokenizer, "acme", PROMPTS)
    _serve(engine, tokenizer, "plain", PROMPTS[:2])  # served by the trained bases: no second forward needed

    record = live.describe("acme")
    assert record is not None and record["since_version"] == 4
    served, tokens = _direct(lm, tokenizer, PROMPTS, own)
    trained, _ = _direct(lm, tokenizer, PROMPTS, lm.trained_bases())
    assert record["tokens"] == record["paired_tokens"] == tokens
    assert record["served"] == pytest.approx(served / tokens, abs=1e-4)
    assert record["trained_paired"] == pytest.approx(trained / tokens, abs=1e-4)
    assert abs(served - trained) / tokens > 1e-3  # the tenant's bases do change its loss

    plain = live.describe("plain")
    expected, count = _direct(lm, tokenizer, PROMPTS[:2], lm.trained_bases())
    assert plain is not None and plain["since_version"] == 0 and plain["tokens"] == count
    assert plain["served"] == plain["served_paired"] == plain["trained_paired"]
    assert plain["served"] == pytest.approx(expected / count, abs=1e-4)


def test_a_new_version_starts_the_record_again(
    lm: Any, tokenizer: Any, live_engine: tuple[GenerationEngine, TenantBank, LiveQuality]
) -> None:
    engine, bank, live = live_engine
    _serve(engine, tokenizer, "acme", PROMPTS)
    bank.publish("acme", perturbed_bases(lm, 0.5, seed=1), version=1)
    _serve(engine, tokenizer, "acme", PROMPTS[:1])
    record = live.describe("acme")
    _, tokens = _direct(lm, tokenizer, PROMPTS[:1], lm.trained_bases())
    assert record is not None and record["since_version"] == 1 and record["tokens"] == tokens


def test_a_version_worse_than_the_trained_bases_is_handed_on_once(
    lm: Any, tokenizer: Any, live_engine: tuple[GenerationEngine, TenantBank, LiveQuality]
) -> None:
    engine, bank, live = live_engine
    degraded: list[tuple[str, int]] = []
    live.on_degraded = lambda tenant, version: degraded.append((tenant, version))
    # An untrained model: of a few perturbed bases, the one that scores worst on these prompts.
    candidates = [perturbed_bases(lm, 4.0, seed=seed) for seed in range(8)]
    worse = max(candidates, key=lambda bases: _direct(lm, tokenizer, PROMPTS, bases)[0])
    served, tokens = _direct(lm, tokenizer, PROMPTS, worse)
    trained, _ = _direct(lm, tokenizer, PROMPTS, lm.trained_bases())
    assert (served - trained) / tokens > 0.01, "the crafted bases should score worse than the trained ones"
    no_worse = lm.trained_bases().clone()  # a version of its own that routes as the trained bases do

    bank.publish("bad", worse, version=2)
    bank.publish("fine", no_worse, version=3)
    for _ in range(2):  # past the window (16 tokens) twice over: handed on once
        _serve(engine, tokenizer, "bad", PROMPTS)
        _serve(engine, tokenizer, "fine", PROMPTS)
    assert degraded == [("bad", 2)]
    bad, fine = live.describe("bad"), live.describe("fine")
    assert bad is not None and bad["degraded"] and fine is not None and not fine["degraded"]
    assert fine["served_paired"] == pytest.approx(fine["trained_paired"], abs=1e-5)
