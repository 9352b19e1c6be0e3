"""`star-serve bench prefix`: prefix caching on a shared-system-prompt load.

Every request is the same `prefix_tokens` tokens (a system prompt) followed by `suffix_tokens` of its own, and
asks for `max_tokens` greedy tokens, streamed. `clients` clients send `requests` of them to two servers of the
same model, side by side in one run: prefix caching off (`STAR_PREFIX_CACHE_BLOCKS=0`) and on (the default),
loaded in turn, `repeats` times each. Reported: time to first token (p50, p99 over each run's requests),
completion tokens/s, and the share of prompt tokens the cache served; medians over the repeats, and the
off/on ratios of the time to first token.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer

from ..training.corpus import lm_corpus
from .clients import stream_load
from .report import write_report
from .server import BenchServer

SETUPS = {"off": {"STAR_PREFIX_CACHE_BLOCKS": "0"}, "on": {}}


@dataclass(frozen=True)
class PrefixBenchConfig:
    model: Path
    out_dir: Path
    prefix_tokens: int = 256
    suffix_tokens: int = 16
    max_tokens: int = 16
    requests: int = 128
    clients: int = 32
    repeats: int = 3


def _prompts(cfg: PrefixBenchConfig) -> list[list[int]]:
    """The shared prefix, then a different stretch of held-out text for each request."""
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model), local_files_only=True)
    _, held_out = lm_corpus()
    ids: list[int] = tokenizer("\n\n".join(held_out))["input_ids"]
    need = cfg.prefix_tokens + cfg.requests * cfg.suffix_tokens
    if len(ids) < need:
        raise ValueError(f"the held-out text has {len(ids)} tokens; this load needs {need}")
    prefix, rest = ids[: cfg.prefix_tokens], ids[cfg.prefix_tokens :]
    return [prefix + rest[i * cfg.suffix_tokens : (i + 1) * cfg.suffix_tokens] for i in range(cfg.requests)]


def _hit_share(url: str) -> float:
    """The share of looked-up prompt tokens the server's prefix cache served, from its metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for name in ("star_prefix_cache_queries_total", "star_prefix_cache_hits_total"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    queries = values.get("star_prefix_cache_queries_total", 0.0)
    return values.get("star_prefix_cache_hits_total", 0.0) / queries if queries else 0.0


def run_prefix_bench(cfg: PrefixBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    prompts = _prompts(cfg)
    servers = {name: BenchServer(cfg.model, env) for name, env in SETUPS.items()}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETUPS}
    try:
        for repeat in range(cfg.repeats):
            for name, server in servers.items():
                run = asyncio.run(stream_load(server.url, "bench", prompts, cfg.max_tokens, cfg.clients))
                runs[name].append(run)
                log(
                    f"repeat {repeat + 1}, prefix cache {name}: TTFT p50 {run['ttft_p50_ms']:.0f} ms, "
                    f"p99 {run['ttft_p99_ms']:.0f} ms, {run['tokens_per_s']:.0f} tokens/s"
                )
        hit_share = {name: _hit_share(server.url) for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.close()
    summary = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} | {"hit_share": hit_share[name]}
        for name, rs in runs.items()
    }
    ratios = {
        "ttft_p50": summary["off"]["ttft_p50_ms"] / summary["on"]["ttft_p50_ms"],
        "ttft_p99": summary["off"]["ttft_p99_ms"] / summary["on"]["ttft_p99_ms"],
        "tokens_per_s": summary["on"]["tokens_per_s"] / summary["off"]["tokens_per_s"],
    }
    config = {k: v for k, v in vars(cfg).items() if k not in ("model", "out_dir")}
    results = {"config": config, "runs": runs, "summary": summary, "ratios": ratios}
    write_report(cfg.out_dir, "prefix", results, _table(summary, ratios, cfg), None)
    return results


def _table(summary: dict[str, dict[str, float]], ratios: dict[str, float], cfg: PrefixBenchConfig) -> str:
    lines = [
        "| prefix cache | TTFT p50 ms | TTFT p99 ms | tokens/s | prompt tokens from the cache |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        lines.append(
            f"| {name} | {row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} | {row['tokens_per_s']:.0f} | "
            f"{row['hit_share']:.0%} |"
        )
    lines.append(
        f"| on vs off | {ratios['ttft_p50']:.2f}x faster | {ratios['ttft_p99']:.2f}x faster | "
        f"{ratios['tokens_per_s']:.2f}x | |"
    )
    lines.append(
        f"\n{cfg.requests} requests of a shared {cfg.prefix_tokens}-token prefix and {cfg.suffix_tokens} tokens of "
        f"their own, {cfg.max_tokens} tokens each, streamed, {cfg.clients} clients; medians of {cfg.repeats} runs "
        "per setup, the two servers loaded in turn.\n"
    )
    return "\n".join(lines)
