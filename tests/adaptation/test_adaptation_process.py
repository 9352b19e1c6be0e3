"""Adaptation in a process of its own (a real child process, a real snapshot directory): the versions it
commits are the guarded steps of the forwards submitted, they reach the serving process's bank, calls and
their errors cross over, a full ring drops and counts instead of blocking, and a dead adaptation process
is replaced while serving goes on."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from star_serve.adaptation import (
    AdaptationConfig,
    AdaptationProcess,
    AdaptationUnavailable,
    CaptureConfig,
    LocalDirStore,
    TenantBank,
    VersionNotKept,
    capture,
    guarded_step,
)
from star_serve.adaptation.backends import Backends
from star_serve.adaptation.ring import RING_TOKENS, ProcessObserver, SharedRing
from star_serve.model import orthonormalize

L, E, D, K = 2, 4, 16, 1
TOKENS = 48  # a tenant's tokens per step


def _trained() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.stack([orthonormalize(torch.randn(E, D, generator=gen)) for _ in range(L)])


def _process(tmp_path: Path, capacity: int = 256) -> tuple[AdaptationProcess, TenantBank]:
    trained = _trained()
    bank = TenantBank(trained, torch.device("cpu"), torch.float32, capacity=capacity)
    config = AdaptationConfig(
        mode="async", min_tokens=TOKENS, min_interval=0.0, capture=CaptureConfig(max_token_norm=1e9)
    )
    return AdaptationProcess("lm", trained, bank, config, Backends(tmp_path), E, K, top_tenants=4), bank


def _run(
    tmp_path: Path, scenario: Callable[[AdaptationProcess, TenantBank], Awaitable[None]], capacity: int = 256
) -> None:
    """Runs `scenario` against a started adaptation process (its bank of `capacity` rows), and stops it."""

    async def run() -> None:
        process, bank = _process(tmp_path, capacity)
        await process.start()
        try:
            await scenario(process, bank)
        finally:
            await process.stop()

    asyncio.run(run())


def _out(batch: int, seq_len: int, seed: int) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    experts = torch.arange(batch * seq_len * K).remainder(E).view(batch, seq_len, K)  # every expert used
    return SimpleNamespace(
        router_inputs=[torch.randn(batch, seq_len, D, generator=gen) for _ in range(L)],
        expert_indices=[experts.clone() for _ in range(L)],
    )


async def _until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_committed_version_is_the_guarded_step_of_the_submitted_tokens(tmp_path: Path) -> None:
    _run(tmp_path, _committed_version_is_the_guarded_step)


async def _committed_version_is_the_guarded_step(process: AdaptationProcess, bank: TenantBank) -> None:
    await process.ensure_loaded("a")
    forwards = [(["a", "b"], [40, 3], _out(2, 40, 0)), (["b", "a"], [1, 1], _out(2, 1, 1)), (["a"], [7], _out(1, 7, 2))]
    for tenants, lengths, out in forwards:  # "a": 48 tokens, one step; "b": 4, none
        process.observer.submit(tenants, lengths, bank.lookup(tenants), out)

    await _until(lambda: bank.version("a") == 1, "tenant a's first version in the bank")
    pieces = [
        [x[i, :n] for x in out.router_inputs]
        for tenants, lengths, out in forwards
        for i, (t, n) in enumerate(zip(tenants, lengths, strict=True))
        if t == "a"
    ]
    config = process.config
    stats = capture(_trained(), [torch.cat(layer) for layer in zip(*pieces, strict=True)], 0, config.capture)
    want, _ = guarded_step(_trained(), _trained(), stats, config.learning_rate, config.guard)
    stored = await LocalDirStore(process.backends.directory).latest("lm", "a")
    assert stored is not None and stored.version == 1
    torch.testing.assert_close(stored.bases, want)
    view = bank.lookup(["a"])
    assert view.routing.bank is not None
    torch.testing.assert_close(view.routing.bank[0], want)  # the serving process routes with it
    assert bank.version("b") == 0

    report = process.report(4)
    assert report.stats.steps == 1 and report.stats.captured.sampled == TOKENS + 4
    assert report.stats.batches["applied"] == 1 and report.dropped_tokens == 0


def test_a_tenant_whose_bank_row_was_given_away_gets_its_version_published_again(tmp_path: Path) -> None:
    _run(tmp_path, _row_given_away, capacity=1)


async def _row_given_away(process: AdaptationProcess, bank: TenantBank) -> None:
    await process.ensure_loaded("a")
    process.observer.submit(["a"], [TOKENS], bank.lookup(["a"]), _out(1, TOKENS, 0))
    await _until(lambda: bank.version("a") == 1, "tenant a's first version in the bank")
    bases = bank.lookup(["a"]).routing.bank
    assert bases is not None
    mine = bases[0].clone()
    bank.publish("x", _trained().flip(1), version=5)
    assert bank.lookup(["x", "a"]).versions == [5, 0]  # one row: a's went to x

    await process.ensure_loaded("a")  # its next request
    await _until(lambda: bank.version("a") == 1, "tenant a's version published again")
    view = bank.lookup(["a"])
    assert view.routing.bank is not None and torch.equal(view.routing.bank[0], mine)


def test_calls_and_their_errors_cross_over(tmp_path: Path) -> None:
    _run(tmp_path, _calls_and_their_errors_cross_over)


async def _calls_and_their_errors_cross_over(process: AdaptationProcess, bank: TenantBank) -> None:
    await process.configure("a", True, 0.2)
    described = await process.describe("a")
    assert described["frozen"] is True and described["learning_rate"] == 0.2 and described["version"] == 0
    with pytest.raises(VersionNotKept):
        await process.rollback("a", 5)
    assert await process.reset("a") == 1
    await _until(lambda: bank.version("a") == 1, "the reset's version in the bank")


def test_the_adaptation_process_runs_at_a_lower_cpu_priority(tmp_path: Path) -> None:
    _run(tmp_path, _runs_at_a_lower_priority)


async def _runs_at_a_lower_priority(process: AdaptationProcess, bank: TenantBank) -> None:
    await process.describe("a")  # answered: the process is past its start
    assert process._process is not None and process._process.pid is not None
    ours, its = os.getpriority(os.PRIO_PROCESS, 0), os.getpriority(os.PRIO_PROCESS, process._process.pid)
    assert its == min(19, ours + process.config.niceness) and process.config.niceness > 0


def test_a_full_ring_drops_and_counts_without_blocking() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)  # nothing reads what is sent
    observer = ProcessObserver(1.0)
    observer.attach(SharedRing.create(L, D, K), writer)
    bank = TenantBank(_trained(), torch.device("cpu"), torch.float32)
    out = _out(32, 1, 0)
    tenants = [f"t{i}" for i in range(32)]
    forwards = RING_TOKENS // 32 + 10
    for _ in range(forwards):
        observer.submit(tenants, [1] * 32, bank.lookup(tenants), out)
    written = 32 * forwards - observer.dropped_tokens
    assert 0 < written <= RING_TOKENS and observer.dropped_tokens >= 10 * 32
    reader.close()


@pytest.mark.slow
def test_a_dead_adaptation_process_is_replaced_and_serving_goes_on(tmp_path: Path) -> None:
    _run(tmp_path, _a_dead_adaptation_process_is_replaced)


async def _a_dead_adaptation_process_is_replaced(process: AdaptationProcess, bank: TenantBank) -> None:
    first = process._process
    assert first is not None
    first.kill()  # a crash
    await asyncio.to_thread(first.join, 10)
    assert not process.store_ok  # /ready reports the store degraded meanwhile
    out = _out(2, 1, 0)
    for _ in range(3):  # the engine's side neither blocks nor raises
        process.observer.submit(["a", "b"], [1, 1], bank.lookup(["a", "b"]), out)
    with pytest.raises(AdaptationUnavailable):
        await process.describe("a")
    await process.ensure_loaded("a")  # a first request meanwhile is served with the cached bases

    await _until(lambda: process.restarts == 1, "a new adaptation process", timeout=30)
    await process.wait_ready()
    assert process.store_ok and process._process is not first
    await process.ensure_loaded("a")  # loaded by the new process this time
    process.observer.submit(["a"], [TOKENS], bank.lookup(["a"]), _out(1, TOKENS, 3))  # a step's worth
    await _until(lambda: bank.version("a") == 1, "a version committed by the new process")
