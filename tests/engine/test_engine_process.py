"""The generation engine in a process of its own: the same outputs as the engine in this process, admission
decided on this side, cancellation, draining and stopping across the pipe, and a dead engine process ending
what it left unfinished."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_support import DEADLINE, collect, final, greedy, greedy_reference, request, run, wait_until

from star_serve.engine.generation import EngineConfig
from star_serve.engine.process import EngineProcess, EngineSetup
from star_serve.engine.types import (
    EngineDraining,
    EngineOverloaded,
    GenerationOutput,
    RequestTooLong,
    StepStats,
)

PROMPTS = ["the cat sat on", "a big red", "the dog ran fast on the hill", "green"]
LONG = 1500  # tokens: far longer than a test takes to act on a running sequence


@pytest.fixture
def lm(make_lm: Callable[..., Any]) -> Any:
    return make_lm(max_position_embeddings=2048)


@pytest.fixture
def checkpoint(lm: Any, tokenizer: Any, tmp_path: Path) -> Path:
    lm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture
def processes(checkpoint: Path) -> Iterator[Callable[..., EngineProcess]]:
    """`processes(on_step=None, **config)`: a started engine process of the tiny LM, stopped when the test ends."""
    started: list[EngineProcess] = []

    def start(on_step: Callable[[StepStats], None] | None = None, **config: Any) -> EngineProcess:
        setup = EngineSetup("tiny", checkpoint, torch.device("cpu"), torch.float32, EngineConfig(**config), threads=1)
        engine = EngineProcess(setup, on_step)
        engine.start()
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.stop()


def test_outputs_equal_each_prompt_alone_with_the_steps_reported(lm: Any, tokenizer: Any, processes: Any) -> None:
    steps: list[StepStats] = []
    engine = processes(on_step=steps.append, max_running=8)
    tokens = 10

    async def body() -> list[list[GenerationOutput]]:
        streams = engine.submit([request(tokenizer, p, greedy(tokens)) for p in PROMPTS])
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    for prompt, outputs in zip(PROMPTS, run(body()), strict=True):
        ids = tokenizer.encode(prompt)
        expected = greedy_reference(lm, ids, tokens)
        last = final(outputs)
        assert last.token_ids == expected
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", len(ids), tokens)
        assert "".join(o.text for o in outputs) == tokenizer.decode(expected, skip_special_tokens=True)
    assert StepStats("decode", len(PROMPTS), len(PROMPTS)) in steps  # the engine process's steps, reported here
    assert sum(s.batch_size for s in steps if s.phase == "prefill") == len(PROMPTS)
    stats = engine.stats()
    assert (stats.running, stats.waiting) == (0, 0)
    assert stats.expert_load is not None
    total, _ = stats.expert_load
    layers, experts = lm.config.num_hidden_layers, lm.config.num_local_experts
    assert total.shape == (layers, experts)
    routed = sum(len(tokenizer.encode(p)) + tokens - 1 for p in PROMPTS) * lm.config.num_experts_per_tok
    assert total.sum(dim=1).tolist() == [routed] * layers  # every token's experts, in every layer


def test_admission_is_decided_here_all_together_or_not_at_all(tokenizer: Any, processes: Any) -> None:
    engine = processes(max_running=1, max_waiting=1)
    long = greedy(LONG)

    async def body() -> None:
        with pytest.raises(RequestTooLong):
            engine.submit([request(tokenizer, p, long) for p in PROMPTS[:3]])  # more than slots and queue
        with pytest.raises(RequestTooLong):
            engine.submit([request(tokenizer, PROMPTS[0], greedy(engine.max_context))])  # over the context
        streams = engine.submit([request(tokenizer, p, long) for p in PROMPTS[:2]])
        with pytest.raises(EngineOverloaded):
            engine.submit([request(tokenizer, PROMPTS[2], long)])
        for stream in streams:
            stream.cancel()
        assert [final(await collect(s)).finish_reason for s in streams] == ["cancelled", "cancelled"]
        (stream,) = engine.submit([request(tokenizer, PROMPTS[2], greedy(3))])  # room again
        assert final(await collect(stream)).finish_reason == "length"

    run(body())


def test_a_cancelled_stream_ends_early_and_its_slot_serves_the_next(tokenizer: Any, processes: Any) -> None:
    engine = processes(max_running=1)

    async def body() -> None:
        (running,) = engine.submit([request(tokenizer, PROMPTS[0], greedy(LONG))])
        first = await asyncio.wait_for(running.__aiter__().__anext__(), DEADLINE)  # it is running
        assert first.finish_reason is None
        running.cancel()
        last = final(await collect(running))
        assert last.finish_reason == "cancelled" and 0 < last.completion_tokens < LONG
        (next_one,) = engine.submit([request(tokenizer, PROMPTS[1], greedy(4))])
        assert final(await collect(next_one)).completion_tokens == 4

    run(body())


def test_draining_refuses_new_sequences_and_stopping_cancels_the_running(tokenizer: Any, processes: Any) -> None:
    engine = processes()

    async def body() -> None:
        (running,) = engine.submit([request(tokenizer, PROMPTS[0], greedy(LONG))])
        await asyncio.wait_for(running.__aiter__().__anext__(), DEADLINE)
        engine.draining = True
        with pytest.raises(EngineDraining):
            engine.submit([request(tokenizer, PROMPTS[1], greedy(3))])
        await asyncio.to_thread(engine.stop)
        assert final(await collect(running)).finish_reason == "cancelled"
        assert not engine.alive

    run(body())


def test_an_engine_process_that_dies_ends_its_sequences_with_error(tokenizer: Any, processes: Any) -> None:
    engine = processes()

    async def body() -> None:
        streams = engine.submit([request(tokenizer, p, greedy(LONG)) for p in PROMPTS[:2]])
        await asyncio.wait_for(streams[0].__aiter__().__anext__(), DEADLINE)
        os.kill(engine.pid, signal.SIGKILL)
        assert [final(await collect(s)).finish_reason for s in streams] == ["error", "error"]
        await wait_until(lambda: not engine.alive)
        with pytest.raises(EngineDraining):  # refused, not queued where nothing would run it
            engine.submit([request(tokenizer, PROMPTS[2], greedy(3))])

    run(body())


def test_a_model_that_does_not_load_fails_the_start_with_the_reason(tmp_path: Path) -> None:
    setup = EngineSetup("missing", tmp_path / "nowhere", torch.device("cpu"), torch.float32, EngineConfig(), 1)
    with pytest.raises(RuntimeError, match="failed to start"):
        EngineProcess(setup).start()
