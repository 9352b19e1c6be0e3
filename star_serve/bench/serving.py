"""`star-serve bench serving`: the server's generation throughput against offline transformers baselines.

In one run, on one machine and model, on the same requests (greedy, fixed length):
- the server (a real uvicorn process) with 1, 8 and 32 concurrent clients;
- transformers' `model.generate` answering the requests one at a time;
- `model.generate` on one left-padded static batch of all requests;
- decode steps alone: the engine with every request running, prefills done, its steps timed one by one in
  this thread (no HTTP, no scheduling waits): what a decode step at that batch costs the model;
- the engine with every sequence of a distinct tenant (own bases in the bank) against one tenant, and against
  the same weights with a linear router (`router_type="linear"`, as Mixtral routes) that routes as the trained
  STAR gate does (`linear_router`): the price of STAR routing and of per-tenant bases together, the three
  engines' runs taking turns.
Each figure is the median of `repeats` runs; ratios are of medians. With `shape` (a preset, such as
`star-182m`), the model is one of that shape with random weights, and the given model's tokenizer. The
machine's roofline (`roofline.py`) is measured in the same run, and each configuration's share of it given.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import load_file, save_file

from ..adaptation import TenantBank
from ..engine import EngineConfig, GenerationEngine, SamplingParams
from ..engine.generation import SequenceRequest
from ..model import StarMoeConfig, StarMoeForCausalLM
from ..model.loading import load_model, resolve_device, resolve_dtype, share_checkpoint
from ..model.router import StarMoeRouter
from ..training.presets import get_preset
from .report import write_report
from .roofline import measure_roofline, roofline_share
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
    shape: str | None = None  # a preset's shape with random weights instead of `model_dir`'s weights


def bench_prompts(n: int) -> list[str]:
    """The first 160 characters of `n` held-out documents of the demo corpus."""
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


def _engine_tenants(
    model: StarMoeForCausalLM, linear: StarMoeForCausalLM, tokenizer: Any, prompts: list[str], cfg: ServingBenchConfig
) -> dict:
    """Engine throughput with `cfg.tenants` sequences in flight: all of one tenant, each its own bases, and all
    of one tenant on `linear` (the same weights and routing, through a linear gate), one run of each in turn."""
    bank = TenantBank.serving(model, capacity=cfg.tenants)
    trained = model.trained_bases()
    generator = torch.Generator().manual_seed(0)
    for t in range(cfg.tenants):
        noise = 0.05 * torch.randn(trained.shape, generator=generator)  # drawn on the CPU: same bases everywhere
        noisy = trained + noise.to(trained.device, trained.dtype)
        bank.publish(f"tenant-{t}", noisy / noisy.norm(dim=-1, keepdim=True), version=1)
    # No prefix cache: the repeats send the same prompts, and the tenants' bases would decide what it serves.
    config = EngineConfig(max_running=cfg.tenants, max_waiting=0, prefix_blocks=0)
    star = GenerationEngine(model, tokenizer, bank, config)
    mixtral_like = GenerationEngine(linear, tokenizer, TenantBank.serving(linear), config)
    ids = [tokenizer(p)["input_ids"] for p in (prompts * (cfg.tenants // len(prompts) + 1))[: cfg.tenants]]
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, ignore_eos=True)

    def rate(engine: GenerationEngine, tenant_of: Callable[[int], str]) -> float:
        async def go() -> int:
            streams = engine.submit([SequenceRequest(x, params, tenant_of(i)) for i, x in enumerate(ids)])
            finals = [[o async for o in s][-1] for s in streams]
            return sum(f.completion_tokens for f in finals)

        started = time.perf_counter()
        tokens = asyncio.run(go())
        return tokens / (time.perf_counter() - started)

    runs: dict[str, list[float]] = {"single_tenant": [], "distinct_tenants": [], "linear_single_tenant": []}
    for engine in (star, mixtral_like):
        engine.start()
    try:
        for _ in range(cfg.repeats):  # in turn, so that a slower spell of the machine does not fall on one alone
            runs["single_tenant"].append(rate(star, lambda i: "tenant-0"))
            runs["distinct_tenants"].append(rate(star, lambda i: f"tenant-{i}"))
            runs["linear_single_tenant"].append(rate(mixtral_like, lambda i: "tenant-0"))
    finally:
        for engine in (star, mixtral_like):
            engine.stop()
    return {name: {"median_tokens_per_s": statistics.median(r), "runs": r} for name, r in runs.items()}


def _decode_steps(model: StarMoeForCausalLM, tokenizer: Any, prompts: list[str], cfg: ServingBenchConfig) -> dict:
    """Tokens/s of decode steps alone, with all `cfg.requests` sequences running: each of `cfg.max_tokens // 2`
    steps timed on its own once every prefill is done, and the batch over the median step."""
    config = EngineConfig(max_running=cfg.requests, prefix_blocks=0)
    engine = GenerationEngine(model, tokenizer, TenantBank.serving(model), config)
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, ignore_eos=True)
    steps = cfg.max_tokens // 2  # no sequence finishes while they are timed

    async def run() -> list[float]:
        engine.submit([SequenceRequest(tokenizer(p)["input_ids"], params, "bench") for p in prompts])
        while engine.stats().waiting:
            engine.step()  # prefills, the earlier newcomers decoding meanwhile
        seconds = []
        for _ in range(steps):
            started = time.perf_counter()
            engine.step()
            seconds.append(time.perf_counter() - started)
        return seconds

    seconds = asyncio.run(run())
    return {"median_tokens_per_s": len(prompts) / statistics.median(seconds), "step_ms": [1e3 * t for t in seconds]}


def linear_router(star_dir: Path, out: Path) -> Path:
    """`star_dir`'s checkpoint with a linear router (`router_type="linear"`, as Mixtral routes) that routes as
    its STAR router does with the trained bases: each layer's gate folded into one matrix (`StarMoeRouter.gate`)
    is the linear weight. Dropping the subspace half instead would change which experts the tokens go to, and
    with them the work of a step (a trained gate's linear half alone can crowd the tokens into a few experts)."""
    model = StarMoeForCausalLM.from_pretrained(str(star_dir), dtype=torch.float32)
    state = {k: v for k, v in load_file(str(star_dir / "model.safetensors")).items() if ".star_gate." not in k}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, StarMoeRouter) and module.uses_subspace:
                state[f"{name}.weight"] = module.gate().contiguous()
    config = StarMoeConfig.from_pretrained(str(star_dir))
    config.router_type = "linear"
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(state, str(out / "model.safetensors"), {"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (star_dir / name).exists():
            (out / name).write_bytes((star_dir / name).read_bytes())
    share_checkpoint(out)
    return out


def random_weights(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    """A checkpoint of preset `shape` with seeded random weights and `tokenizer_dir`'s tokenizer, in `out`."""
    preset = get_preset(shape)
    _, tokenizer = load_model(tokenizer_dir, "generate", torch.device("cpu"), torch.float32)
    config = StarMoeConfig(
        vocab_size=max(preset.vocab_size, len(tokenizer)),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **preset.model,
    )
    torch.manual_seed(0)
    model = StarMoeForCausalLM(config)
    with torch.no_grad():  # the preset's vocabulary is wider than the tokenizer's: never choose a token without text
        model.lm_head.weight[len(tokenizer) :] = 0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    share_checkpoint(out)
    return out


def run_serving_bench(cfg: ServingBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="star-bench-") as tmp:
        model_dir = cfg.model_dir
        if cfg.shape is not None:
            log(f"a {cfg.shape} model with random weights")
            model_dir = random_weights(cfg.shape, cfg.model_dir, Path(tmp) / "star")
        return _run(cfg, model_dir, linear_router(model_dir, Path(tmp) / "linear"), log)


def _run(cfg: ServingBenchConfig, model_dir: Path, linear_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    torch.manual_seed(0)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tokenizer = load_model(model_dir, "generate", device, dtype)
    assert isinstance(model, StarMoeForCausalLM)
    prompts = bench_prompts(cfg.requests)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict[str, Any] = {
        "config": {k: v.name if isinstance(v, Path) else v for k, v in cfg.__dict__.items()},  # no machine paths
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "device": name, "dtype": str(dtype)},
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    log("the machine's roofline: dense matmul and memory bandwidth")
    roofline = measure_roofline(device, dtype)
    results["roofline"] = roofline.as_dict()
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
        "STAR_PREFIX_CACHE_BLOCKS": "0",  # the warm-up and the repeats send the same prompts again
        "STAR_ADAPTATION": "off",  # its cost is `bench adaptation`'s to measure
    }
    server = BenchServer(model_dir, env)
    try:
        results["server"] = {}
        for concurrency in cfg.concurrency:
            log(f"server, {concurrency} concurrent clients")
            asyncio.run(_clients(server.url, prompts[:concurrency], cfg.max_tokens, concurrency))  # warm-up
            run = partial(_run_clients, server.url, prompts, cfg.max_tokens, concurrency)
            results["server"][str(concurrency)] = _median_rate(run, cfg.repeats)
    finally:
        server.close()
    model.pack_for_cpu()  # the engine's figures: the model as the server holds it (STAR_CPU_PACKED_WEIGHTS)
    log(f"engine, decode steps alone at batch {cfg.requests}")
    results["decode_steps"] = _decode_steps(model, tokenizer, prompts, cfg)
    log(f"engine, {cfg.tenants} sequences in flight: one tenant, {cfg.tenants} tenants, the linear router")
    linear, _ = load_model(linear_dir, "generate", device, dtype)
    assert isinstance(linear, StarMoeForCausalLM)
    linear.pack_for_cpu()
    results["tenants"] = _engine_tenants(model, linear, tokenizer, prompts, cfg)

    # Each configuration's share of the roofline, as decode steps at its batch over an average context.
    context = round(statistics.mean(len(tokenizer(p)["input_ids"]) for p in prompts) + cfg.max_tokens / 2)
    batches = {
        "hf_one_at_a_time": (results["hf_one_at_a_time"], 1),
        "hf_static_batch": (results["hf_static_batch"], cfg.requests),
        **{f"server_{c}": (results["server"][str(c)], min(c, cfg.requests)) for c in cfg.concurrency},
        "decode_steps": (results["decode_steps"], cfg.requests),
        "single_tenant": (results["tenants"]["single_tenant"], cfg.tenants),
        "distinct_tenants": (results["tenants"]["distinct_tenants"], cfg.tenants),
        "linear_single_tenant": (results["tenants"]["linear_single_tenant"], cfg.tenants),
    }
    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    for run, batch in batches.values():
        run["roofline_share"] = roofline_share(
            roofline, model.config, batch, context, dtype_bytes, run["median_tokens_per_s"]
        )

    top = results["server"][str(max(cfg.concurrency))]["median_tokens_per_s"]
    results["ratios"] = {
        "server_vs_one_at_a_time": top / results["hf_one_at_a_time"]["median_tokens_per_s"],
        "server_vs_static_batch": top / results["hf_static_batch"]["median_tokens_per_s"],
        "distinct_vs_single_tenant": results["tenants"]["distinct_tenants"]["median_tokens_per_s"]
        / results["tenants"]["single_tenant"]["median_tokens_per_s"],
        "distinct_vs_linear_router": results["tenants"]["distinct_tenants"]["median_tokens_per_s"]
        / results["tenants"]["linear_single_tenant"]["median_tokens_per_s"],
    }
    write_report(cfg.out_dir, "serving", results, _table(results, cfg), _plot(results, cfg))
    return results


def _table(results: dict[str, Any], cfg: ServingBenchConfig) -> str:
    rate = results["hf_one_at_a_time"]["median_tokens_per_s"]
    rows = [
        ("transformers `generate`, one at a time", results["hf_one_at_a_time"]),
        (f"transformers `generate`, static batch of {cfg.requests}", results["hf_static_batch"]),
        *[(f"star-serve, {c} concurrent clients", results["server"][str(c)]) for c in cfg.concurrency],
        (f"engine, decode steps alone at batch {cfg.requests}", results["decode_steps"]),
        (f"engine, {cfg.tenants} sequences of one tenant", results["tenants"]["single_tenant"]),
        (f"engine, {cfg.tenants} sequences of {cfg.tenants} tenants", results["tenants"]["distinct_tenants"]),
        (f"engine, {cfg.tenants} sequences, linear router", results["tenants"]["linear_single_tenant"]),
    ]
    lines = ["| configuration | tokens/s (median) | vs one at a time | share of the roofline |", "|---|---:|---:|---:|"]
    lines += [
        f"| {name} | {r['median_tokens_per_s']:.0f} | {r['median_tokens_per_s'] / rate:.2f}x | "
        f"{r['roofline_share']:.0%} |"
        for name, r in rows
    ]
    ratios = results["ratios"]
    lines += [
        "",
        f"Server at {max(cfg.concurrency)} clients: **{ratios['server_vs_one_at_a_time']:.2f}x** one at a time, "
        f"**{ratios['server_vs_static_batch']:.2f}x** the static batch; {cfg.tenants} distinct tenants: "
        f"**{ratios['distinct_vs_single_tenant']:.2f}x** one tenant and **{ratios['distinct_vs_linear_router']:.2f}x** "
        f"the linear router's one tenant. {cfg.requests} requests of {cfg.max_tokens} "
        f"tokens, greedy, median of {cfg.repeats} runs. Model: {cfg.shape or 'as given'}, "
        f"{results['parameters'] / 1e6:.1f}M parameters, {results['machine']['dtype']} on "
        f"{results['machine']['device']} ({results['machine']['cpus']} CPUs). Roofline measured in the same run: "
        f"{results['roofline']['matmul_gflops']:.0f} GFLOP/s dense matmul, "
        f"{results['roofline']['bandwidth_gb_s']:.1f} GB/s memory bandwidth; a share is the roofline's time of "
        "a decode step at the configuration's batch over the step time it achieved.",
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
