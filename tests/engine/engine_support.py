"""Helpers of the engine tests: tiny configurations sized to the test tokenizer, greedy and sampled
reference decoders that run one sequence alone (no KV cache, no batching), and a step gate that lets a test
hold the engine thread between forwards."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import torch

from star_serve.engine.generation import GenerationStream, SequenceRequest
from star_serve.engine.sampling import make_generator, sample
from star_serve.engine.types import GenerationOutput, SamplingParams, StepStats
from star_serve.model import Routing, StarMoeConfig
from star_serve.training import presets

WORDS = (
    *("the", "cat", "dog", "sat", "on", "a", "mat", "ran", "fast", "slow"),
    *("red", "blue", "green", "big", "small", "house", "tree", "river", "stone", "hill"),
)
DEADLINE = 20.0  # seconds any single wait in these tests may take before it counts as a hang


def tiny_config(tokenizer: Any, **overrides: Any) -> StarMoeConfig:
    """The `tiny` preset's model sized to `tokenizer`."""
    fields: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.eos_token_id,
        # Larger than the default 0.02, so that the experts (and so the routing, and so a tenant's bases) weigh
        # on the logits, and so that greedy choices are not near-ties.
        "initializer_range": 0.1,
    }
    return presets.tiny_config(**{**fields, **overrides})


def perturbed_bases(model: Any, scale: float, seed: int) -> torch.Tensor:
    """(L, E, D): the model's trained bases plus noise, rows renormalised to unit norm."""
    gen = torch.Generator().manual_seed(seed)
    trained = model.trained_bases()
    bases = trained + scale * torch.randn(trained.shape, generator=gen)
    return bases / bases.norm(dim=-1, keepdim=True)


def _bank_kwargs(bases: torch.Tensor | None) -> dict[str, Routing]:
    return {} if bases is None else {"routing": Routing.shared(bases)}


def greedy(max_tokens: int, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def request(tokenizer: Any, text: str, params: SamplingParams, tenant: str = "t", **kwargs: Any) -> SequenceRequest:
    return SequenceRequest(prompt_ids=tokenizer.encode(text), params=params, tenant=tenant, **kwargs)


def final(outputs: list[GenerationOutput]) -> GenerationOutput:
    assert outputs, "the stream ended without any output"
    assert all(o.finish_reason is None for o in outputs[:-1])
    assert outputs[-1].finish_reason is not None
    return outputs[-1]


@torch.no_grad()
def greedy_reference(model: Any, prompt: list[int], steps: int, bases: torch.Tensor | None = None) -> list[int]:
    """`steps` greedy tokens after `prompt`, recomputing the whole sequence alone at every step (no cache)."""
    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids]), use_cache=False, **_bank_kwargs(bases)).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@torch.no_grad()
def sampled_reference(model: Any, prompt: list[int], params: SamplingParams, choice: int = 0) -> list[int]:
    """`params.max_tokens` sampled tokens after `prompt`, alone, with the request's own seeded generator."""
    gen = make_generator(params, choice)
    ids = list(prompt)
    for _ in range(params.max_tokens):
        logits = model(torch.tensor([ids]), use_cache=False).logits[:, -1]
        ids.append(sample(logits, [params], [gen])[0])
    return ids[len(prompt) :]


@torch.no_grad()
def routing_reference(model: Any, ids: list[int], bases: torch.Tensor | None = None) -> list[list[int]]:
    """Per layer, how many of `ids` (run alone) each expert received."""
    out = model(torch.tensor([ids]), use_cache=False, output_routing=True, **_bank_kwargs(bases))
    num_experts = model.config.num_local_experts
    return [torch.bincount(layer.reshape(-1), minlength=num_experts).tolist() for layer in out.expert_indices]


class StepGate:
    """An `on_step` callback that records every forward and, while closed, lets the engine thread finish a
    forward only against a permit (`release`). A forward that waits longer than DEADLINE for one raises, so a
    forgotten release cannot hold the engine thread forever."""

    def __init__(self, closed: bool = True) -> None:
        self.steps: list[StepStats] = []
        self._permits = threading.Semaphore(0)
        self._open = not closed

    def __call__(self, stats: StepStats) -> None:
        self.steps.append(stats)
        if not self._open and not self._permits.acquire(timeout=DEADLINE):
            raise TimeoutError("the test never released this step")

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._permits.release()

    def open(self) -> None:
        self._open = True
        self.release(10_000)


async def collect(stream: GenerationStream, timeout: float = DEADLINE) -> list[GenerationOutput]:
    """Every output of a stream up to and including the final one, or TimeoutError if it never ends."""

    async def drain() -> list[GenerationOutput]:
        return [output async for output in stream]

    return await asyncio.wait_for(drain(), timeout)


async def wait_until(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Polls an observable condition until it holds; fails the test if it does not within `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.002)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)
