"""Prefix caching: a prompt's cached blocks are reused only under the bases it routes with now, and what the
engine generates with the cache equals what the model generates alone, without one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch
from engine_support import StepGate, collect, greedy_reference, perturbed_bases, run

from star_serve.adaptation import TenantBank
from star_serve.engine.generation import GenerationEngine, SequenceRequest
from star_serve.engine.kv_cache import SlotKVCache
from star_serve.engine.prefix_cache import TRAINED_BASES, PrefixCache
from star_serve.engine.types import GenerationOutput, SamplingParams

BLOCK = 4
SHARED = "the green stone sat on a mat by the river and the small tree by the big red house on the hill"
CPU = torch.device("cpu")


def greedy(max_tokens: int, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def generate(engine: GenerationEngine, prompt: list[int], tenant: str = "t", **params: Any) -> GenerationOutput:
    """The final output of 6 greedy tokens; prompt log-probabilities, where asked, moved into it."""

    async def body() -> list[GenerationOutput]:
        [stream] = engine.submit([SequenceRequest(prompt, greedy(6, **params), tenant)])
        return await collect(stream)

    outputs = run(body())
    return replace(outputs[-1], prompt_logprobs=outputs[0].prompt_logprobs)


def prefill_tokens(gate: StepGate) -> int:
    """The tokens of the last prefill forward (one sequence: no padding)."""
    return [s for s in gate.steps if s.phase == "prefill"][-1].tokens


@pytest.fixture
def shared(tokenizer: Any) -> list[int]:
    ids = tokenizer.encode(SHARED)
    assert len(ids) >= 6 * BLOCK, "the shared prefix should span several blocks"
    return ids


def test_a_shared_prefix_is_computed_once_and_outputs_equal_the_uncached_reference(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine], shared: list[int]
) -> None:
    gate = StepGate(closed=False)
    engine = engines(lm, tokenizer, gate=gate, prefix_block_size=BLOCK)
    first = shared + tokenizer.encode(" dog")
    second = shared + tokenizer.encode(" blue river ran fast")

    out = generate(engine, first)
    assert out.token_ids == greedy_reference(lm, first, 6)
    assert prefill_tokens(gate) == len(first)
    generate(engine, tokenizer.encode("small tree " * 8))  # overwrites the slot the next prompt will get

    out = generate(engine, second)
    assert out.token_ids == greedy_reference(lm, second, 6)
    reused = len(shared) // BLOCK * BLOCK
    assert prefill_tokens(gate) == len(second) - reused
    stats = engine.stats()
    assert stats.prefix_cache_hits == reused
    assert stats.prefix_cache_queries == len(first) + len(tokenizer.encode("small tree " * 8)) + len(second)

    generate(engine, second)  # all of it cached, but its last token: that one's logits start the generation
    assert prefill_tokens(gate) == len(second) - (len(second) - 1) // BLOCK * BLOCK


def test_blocks_are_reused_only_under_the_bases_that_computed_them(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine], shared: list[int]
) -> None:
    bank = TenantBank(lm.trained_bases(), CPU, torch.float32, fold=lm.router_gates)
    gate = StepGate(closed=False)
    engine = engines(lm, tokenizer, bank=bank, gate=gate, prefix_block_size=BLOCK)
    prompt = shared + tokenizer.encode(" dog")
    own = {1: perturbed_bases(lm, 2.0, seed=1), 2: perturbed_bases(lm, 2.0, seed=2)}
    assert greedy_reference(lm, prompt, 6, own[1]) != greedy_reference(lm, prompt, 6), "bases must matter here"
    bank.publish("adapted", own[1], version=1)

    generate(engine, prompt, tenant="plain")  # cached under the trained bases
    assert generate(engine, prompt, tenant="other").token_ids == greedy_reference(lm, prompt, 6)
    assert prefill_tokens(gate) < len(prompt)  # tenants without bases of their own share the trained blocks

    out = generate(engine, prompt, tenant="adapted")
    assert prefill_tokens(gate) == len(prompt), "a tenant with its own bases reused the trained bases' blocks"
    assert out.token_ids == greedy_reference(lm, prompt, 6, own[1])
    generate(engine, prompt, tenant="adapted")
    assert prefill_tokens(gate) < len(prompt)  # its own blocks, under its own version

    bank.publish("adapted", own[2], version=2)  # a commit: its earlier blocks no longer apply
    out = generate(engine, prompt, tenant="adapted")
    assert prefill_tokens(gate) == len(prompt)
    assert out.token_ids == greedy_reference(lm, prompt, 6, own[2])


def test_evicted_blocks_are_computed_again(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine], shared: list[int]
) -> None:
    gate = StepGate(closed=False)
    blocks = len(shared) // BLOCK
    engine = engines(lm, tokenizer, gate=gate, prefix_block_size=BLOCK, prefix_blocks=blocks)
    prompt = shared + tokenizer.encode(" dog")
    other = tokenizer.encode("small tree " * 12)
    generate(engine, prompt)
    generate(engine, other)  # fills the cache with other blocks
    out = generate(engine, prompt)
    assert out.token_ids == greedy_reference(lm, prompt, 6)
    assert prefill_tokens(gate) > len(prompt) - blocks * BLOCK  # some of its blocks were evicted
    assert engine.stats().prefix_cache_usage == 1.0


def test_prompt_logprobs_and_routing_counts_see_the_whole_prompt(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine], shared: list[int]
) -> None:
    gate = StepGate(closed=False)
    engine = engines(lm, tokenizer, gate=gate, prefix_block_size=BLOCK)
    generate(engine, shared)
    out = generate(engine, shared, prompt_logprobs=0)
    assert prefill_tokens(gate) == len(shared)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(shared) - 1

    async def routed() -> list[GenerationOutput]:
        [stream] = engine.submit([SequenceRequest(shared, greedy(1), "t", return_routing=True)])
        return await collect(stream)

    assert run(routed())[-1].routing is not None
    assert prefill_tokens(gate) == len(shared)


def test_no_prefix_cache_when_disabled(lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]) -> None:
    engine = engines(lm, tokenizer, prefix_blocks=0)
    assert engine.prefixes is None
    assert engine.stats().prefix_cache_queries == 0


def test_digests_chain_whole_prefixes_under_their_bases(lm: Any) -> None:
    cache = PrefixCache(lm.config, blocks=4, block_size=2, device=CPU, dtype=torch.float32)
    a = cache.digests(TRAINED_BASES, [1, 2, 3, 4, 5])
    assert len(a) == 2  # full blocks only
    assert cache.digests(TRAINED_BASES, [1, 2, 3, 9])[0] == a[0]
    assert cache.digests(TRAINED_BASES, [1, 2, 3, 9])[1] != a[1]
    assert cache.digests(TRAINED_BASES, [9, 2, 3, 4])[1] != a[1]  # a block's digest covers all before it
    assert set(cache.digests(("tenant", 1), [1, 2, 3, 4])).isdisjoint(a)
    assert set(cache.digests(("tenant", 2), [1, 2, 3, 4])).isdisjoint(cache.digests(("tenant", 1), [1, 2, 3, 4]))


def test_eviction_takes_a_prompts_tail_before_its_head(lm: Any) -> None:
    cache = PrefixCache(lm.config, blocks=3, block_size=2, device=CPU, dtype=torch.float32)
    kv = SlotKVCache(lm.config, 1, 16, CPU, torch.float32)
    first = cache.digests(TRAINED_BASES, [1, 2, 3, 4, 5, 6])
    cache.store(first, kv, 0)
    second = cache.digests(TRAINED_BASES, [7, 8])
    cache.store(second, kv, 0)  # the cache is full: one of the first prompt's blocks goes, its last
    assert len(cache.match(first, 7)) == 2  # its head stays
    assert len(cache.match(second, 3)) == 1
