"""`star-serve bench serving`: the server's generation throughput against offline transformers baselines.

In one run, on one machine and model, on the same requests (greedy, fixed length):
- the server (a real uvicorn process) with 1, 8 and 32 concurrent clients;
- transformers' `model.generate` answering the requests one at a time;
- `model.generate` on one left-padded static batch of all requests;
- the engine with every sequence of a distinct tenant (own bases in the bank) against one tenant.
Each figure is the median of `repeats` runs; ratios are of medians.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import torch

from ..adaptation import TenantBank
from ..engine import EngineConfig, GenerationEngine, SamplingParams
from ..engine.generation import SequenceRequest
from ..model import StarMoeForCausalLM
from ..model.loading import load_model, resolve_device, resolve_dtype
from .report import write_report
from .server import BenchServer


@dataclass(frozen=True)
class ServingBenchConfig:
    model_dir: Path
    out_dir: Path
    requests: int = 32
    max_tokens: int = 64
    concurrency: tuple[int, ...] = (1, 8, 32)
    tenants: int = 64
    repeats: int = 3
    device: str = "auto"  # every configuration runs on this device, in this dtype
    dtype: str = "auto"


def _prompts(n: int) -> list[str]:
    from ..training.corpus import lm_corpus

    _, heldout = lm_corpus()
    return [doc[:160] for doc in heldout[:n]]


def _median_rate(run: Callable[[], int], repeats: int) -> dict[str, Any]:
    """Runs `run` (which returns the tokens it generated) `repeats` times; tokens/s of each run and median."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = run()
        rates.append(tokens / (time.perf_counter() - started))
    return {"median_tokens_per_s": statistics.median(rates), "runs": rates}


# -- transformers baselines ---------------------------------------------------------------------------


def _hf_one_at_a_time(model: StarMoeForCausalLM, tokenizer: Any, prompts: list[str], max_tokens: int) -> int:
    total = 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(model.device)
        out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        total += out.shape[1] - ids["input_ids"].shape[1]
    return total


def _hf_static_batch(model: StarMoeForCausalLM, tokenizer: Any, prompts: list[str], max_tokens: int) -> int:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)


async def _clients(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> int:
    """`concurrency` clients share the prompts; returns the completion tokens received."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    total = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal total
        while not queue.empty():
            prompt = queue.get_nowait()
            body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            response = await http.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            total += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return total


def _run_clients(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> int:
    return asyncio.run(_clients(url, prompts, max_tokens, concurrency))


# -- tenants ------------------------------------------------------------------------------------------


def _engine_tenants(model: StarMoeForCausalLM, tokenizer: Any, prompts: list[str], cfg: ServingBenchConfig) -> dict:
    """Engine throughput with `cfg.tenants` sequences in flight: all of one tenant vs each its own bases."""
    trained = model.trained_bases()
    bank = TenantBank(trained, model.device, model.dtype, capacity=cfg.tenants, fold=model.router_gates)
    generator = torch.Generator().manual_seed(0)
    for t in range(cfg.tenants):
        noise = 0.05 * torch.randn(trained.shape, generator=generator)  # drawn on the CPU: same bases everywhere
        noisy = trained + noise.to(trained.device, trained.dtype)
        bank.publish(f"tenant-{t}", noisy / noisy.norm(dim=-1, keepdim=True), version=1)
    engine = GenerationEngine(model, tokenizer, bank, EngineConfig(max_running=cfg.tenants, max_waiting=0))
    engine.start()
    ids = [tokenizer(p)["input_ids"] for p in (prompts * (cfg.tenants // len(prompts) + 1))[: cfg.tenants]]
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, ignore_eos=True)

    def run(tenant_of: Callable[[int], str]) -> int:
        async def go() -> int:
            streams = engine.submit([SequenceRequest(x, params, tenant_of(i)) for i, x in enumerate(ids)])
            finals = [[o async for o in s][-1] for s in streams]
            return sum(f.completion_tokens for f in finals)

        return asyncio.run(go())

    try:
        one = _median_rate(lambda: run(lambda i: "tenant-0"), cfg.repeats)
        many = _median_rate(lambda: run(lambda i: f"tenant-{i}"), cfg.repeats)
    finally:
        engine.stop()
    return {"single_tenant": one, "distinct_tenants": many}


def run_serving_bench(cfg: ServingBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.manual_seed(0)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tokenizer = load_model(cfg.model_dir, "generate", device, dtype)
    assert isinstance(model, StarMoeForCausalLM)
    prompts = _prompts(cfg.requests)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict[str, Any] = {
        "config": {k: v.name if isinstance(v, Path) else v for k, v in cfg.__dict__.items()},  # no machine paths
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "device": name, "dtype": str(dtype)},
    }
    log(f"transformers generate, one request at a time ({cfg.requests} requests)")
    results["hf_one_at_a_time"] = _median_rate(
        lambda: _hf_one_at_a_time(model, tokenizer, prompts, cfg.max_tokens), cfg.repeats
    )
    log(f"transformers generate, one static batch of {cfg.requests}")
    results["hf_static_batch"] = _median_rate(
        lambda: _hf_static_batch(model, tokenizer, prompts, cfg.max_tokens), cfg.repeats
    )
    env = {
        "STAR_MAX_RUNNING": str(max(cfg.concurrency)),
        "STAR_MAX_WAITING": "1024",
        "STAR_DEVICE": device.type,
        "STAR_DTYPE": str(dtype).removeprefix("torch."),
    }
    server = BenchServer(cfg.model_dir, env)
    try:
        results["server"] = {}
        for concurrency in cfg.concurrency:
            log(f"server, {concurrency} concurrent clients")
            asyncio.run(_clients(server.url, prompts[:concurrency], cfg.max_tokens, concurrency))  # warm-up
            run = partial(_run_clients, server.url, prompts, cfg.max_tokens, concurrency)
            results["server"][str(concurrency)] = _median_rate(run, cfg.repeats)
    finally:
        server.close()
    log(f"engine, {cfg.tenants} sequences in flight: one tenant vs {cfg.tenants} tenants")
    results["tenants"] = _engine_tenants(model, tokenizer, prompts, cfg)

    top = results["server"][str(max(cfg.concurrency))]["median_tokens_per_s"]
    results["ratios"] = {
        "server_vs_one_at_a_time": top / results["hf_one_at_a_time"]["median_tokens_per_s"],
        "server_vs_static_batch": top / results["hf_static_batch"]["median_tokens_per_s"],
        "distinct_vs_single_tenant": results["tenants"]["distinct_tenants"]["median_tokens_per_s"]
        / results["tenants"]["single_tenant"]["median_tokens_per_s"],
    }
    write_report(cfg.out_dir, "serving", results, _table(results, cfg), _plot(results, cfg))
    return results


def _table(results: dict[str, Any], cfg: ServingBenchConfig) -> str:
    rate = results["hf_one_at_a_time"]["median_tokens_per_s"]
    rows = [
        ("transformers `generate`, one at a time", results["hf_one_at_a_time"]),
        (f"transformers `generate`, static batch of {cfg.requests}", results["hf_static_batch"]),
        *[(f"star-serve, {c} concurrent clients", results["server"][str(c)]) for c in cfg.concurrency],
        (f"engine, {cfg.tenants} sequences of one tenant", results["tenants"]["single_tenant"]),
        (f"engine, {cfg.tenants} sequences of {cfg.tenants} tenants", results["tenants"]["distinct_tenants"]),
    ]
    lines = ["| configuration | tokens/s (median) | vs one at a time |", "|---|---:|---:|"]
    lines += [
        f"| {name} | {r['median_tokens_per_s']:.0f} | {r['median_tokens_per_s'] / rate:.2f}x |" for name, r in rows
    ]
    ratios = results["ratios"]
    lines += [
        "",
        f"Server at {max(cfg.concurrency)} clients: **{ratios['server_vs_one_at_a_time']:.2f}x** one at a time, "
        f"**{ratios['server_vs_static_batch']:.2f}x** the static batch; {cfg.tenants} distinct tenants: "
        f"**{ratios['distinct_vs_single_tenant']:.2f}x** one tenant. {cfg.requests} requests of {cfg.max_tokens} "
        f"tokens, greedy, median of {cfg.repeats} runs.",
    ]
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], cfg: ServingBenchConfig) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        xs = list(cfg.concurrency)
        ax.plot(xs, [results["server"][str(c)]["median_tokens_per_s"] for c in xs], "o-", label="star-serve")
        ax.axhline(results["hf_one_at_a_time"]["median_tokens_per_s"], color="grey", ls="--", label="generate, 1 by 1")
        ax.axhline(
            results["hf_static_batch"]["median_tokens_per_s"], color="black", ls=":", label="generate, static batch"
        )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("generated tokens/s (median)")
        ax.set_title("Generation throughput")
        ax.legend()

    return draw
