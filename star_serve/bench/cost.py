"""`bench adaptation` (c), cost: tokens/s of real servers (COST_SERVERS) under the same loads (many
tenants, and one), adaptation on in each of its forms vs off, and each adapting server's token-to-commit
lag. Its own module so that other benches (and the comparison of two source trees, scripts/) reuse the
load and the paired ratio."""

from __future__ import annotations

import asyncio
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .server import BenchServer

if TYPE_CHECKING:
    from .adaptation import AdaptationBenchConfig


async def _tenant_clients(url: str, prompts: list[str], tenants: int, cfg: AdaptationBenchConfig) -> int:
    """`cfg.concurrency` clients send every prompt, request i as tenant i mod `tenants`; returns the
    completion tokens received."""
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(prompts):
        queue.put_nowait(item)
    total = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal total
        while not queue.empty():
            i, prompt = queue.get_nowait()
            body = {"model": "bench", "prompt": prompt, "max_tokens": cfg.max_tokens, "temperature": 0}
            headers = {"X-Tenant": f"tenant-{i % tenants}"}
            response = await http.post(f"{url}/v1/completions", json={**body, "ignore_eos": True}, headers=headers)
            response.raise_for_status()
            total += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=cfg.concurrency)) as http:
        await asyncio.gather(*(client(http) for _ in range(cfg.concurrency)))
    return total


def _versions(url: str, tenants: int) -> list[int | None]:
    """Each tenant's committed version, as the server reports it (None where it does not)."""
    found: list[int | None] = []
    for t in range(tenants):
        try:
            response = httpx.get(
                f"{url}/v1/subspace", params={"model": "bench"}, headers={"X-Tenant": f"tenant-{t}"}, timeout=10
            )
            found.append(int(response.json()["version"]) if response.status_code == 200 else None)
        except (httpx.HTTPError, KeyError, ValueError):
            found.append(None)
    return found


# The servers of (c), each with its label: `async` with the product's defaults (the quality gate on), the
# same without the gate, with its process at the serving process's CPU priority, capturing a quarter of the
# forwards, with the adaptation in the serving process (as on a GPU), `shadow` (everything but serving the
# versions), and `off`.
SAMPLED = 0.25
COST_SERVERS = {
    "async": ({"STAR_ADAPTATION": "async"}, "`async`, gated (default)"),
    "async_ungated": ({"STAR_ADAPTATION": "async", "STAR_ADAPTATION_QUALITY_GATE": "false"}, "`async`, no gate"),
    "async_same_priority": (
        {"STAR_ADAPTATION": "async", "STAR_ADAPTATION_PROCESS_NICENESS": "0"},
        "`async`, same CPU priority",
    ),
    "async_sampled": (
        {"STAR_ADAPTATION": "async", "STAR_ADAPTATION_SAMPLE_RATE": str(SAMPLED)},
        f"`async`, sample rate {SAMPLED:g}",
    ),
    "async_inline": ({"STAR_ADAPTATION": "async", "STAR_ADAPTATION_PROCESS": "off"}, "`async` in the serving process"),
    "shadow": ({"STAR_ADAPTATION": "shadow"}, "`shadow`"),
    "off": ({"STAR_ADAPTATION": "off"}, "`off`"),
}
ADAPTING = [m for m in COST_SERVERS if m != "off"]


def cost(cfg: AdaptationBenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Tokens/s of the servers (COST_SERVERS) under the same loads; each repeat runs every load on each
    server, in an order that rotates from repeat to repeat."""
    from ..config import Settings

    modes = list(COST_SERVERS)
    with tempfile.TemporaryDirectory(prefix="star-bench-") as tmp:
        servers: dict[str, BenchServer] = {}
        try:
            for mode, (env, _) in COST_SERVERS.items():
                servers[mode] = BenchServer(cfg.lm_dir, {**server_env(cfg), **env, "STAR_STATE_DIR": f"{tmp}/{mode}"})
            loads, runs = rotated_runs(servers, cfg, log)
            versions = {m: _versions(servers[m].url, cfg.tenants) for m in ADAPTING}
            pages = {m: httpx.get(f"{servers[m].url}/metrics", timeout=10).text for m in ADAPTING}
            lag = {m: lag_quantiles(pages[m], "bench") for m in ADAPTING}
            captured = {m: captured_tokens(pages[m], "bench") for m in ADAPTING}
        finally:
            for server in servers.values():
                server.close()
    results: dict[str, Any] = {"sample_rates": [Settings().adaptation_sample_rate, SAMPLED], "loads": {}}
    for n in loads:
        median = {m: statistics.median(runs[n][m]) for m in modes}
        results["loads"][str(n)] = {
            **{m: {"median_tokens_per_s": median[m], "runs": runs[n][m]} for m in modes},
            "ratios_to_off": {m: paired_ratio(runs[n][m], runs[n]["off"]) for m in ADAPTING},
        }
    results["tenant_versions_after"] = versions
    results["token_to_commit_lag_s"] = lag
    results["captured_tokens"] = captured
    return results


def server_env(cfg: AdaptationBenchConfig) -> dict[str, str]:
    """The settings every server of the load runs with: room for all its clients at once."""
    return {"STAR_MAX_RUNNING": str(cfg.concurrency), "STAR_MAX_WAITING": "1024"}


def rotated_runs(
    servers: dict[str, BenchServer], cfg: AdaptationBenchConfig, log: Callable[[str], None]
) -> tuple[list[int], dict[int, dict[str, list[float]]]]:
    """Each server's tokens/s under each load (`cfg.tenants` tenants, and one), `cfg.repeats` times, in an
    order of servers that rotates from repeat to repeat; every server is warmed up first."""
    from ..training.corpus import lm_corpus

    _, heldout = lm_corpus()
    prompts = [doc[:160] for doc in heldout[: cfg.requests]]
    loads = sorted({cfg.tenants, 1}, reverse=True)
    names = list(servers)
    runs: dict[int, dict[str, list[float]]] = {n: {name: [] for name in names} for n in loads}
    for server in servers.values():
        asyncio.run(_tenant_clients(server.url, prompts[: cfg.concurrency], cfg.tenants, cfg))
    for r in range(cfg.repeats):
        for n in loads:
            for name in names[r % len(names) :] + names[: r % len(names)]:
                started = time.perf_counter()
                tokens = asyncio.run(_tenant_clients(servers[name].url, prompts, n, cfg))
                runs[n][name].append(tokens / (time.perf_counter() - started))
            log(f"  repeat {r + 1}, {n} tenant(s): " + ", ".join(f"{k} {runs[n][k][-1]:.0f}" for k in names))
    return loads, runs


def paired_ratio(runs: Sequence[float], baseline: Sequence[float]) -> float:
    """The median over repeats of each repeat's ratio. The runs of one repeat are seconds apart, the
    repeats minutes, so a machine whose speed drifts between repeats (a noisy neighbour, a change of
    clock) moves a repeat's two runs alike, and their ratio less than either."""
    return statistics.median(r / b for r, b in zip(runs, baseline, strict=True))


def captured_tokens(text: str, model: str) -> dict[str, float]:
    """A server's `star_adaptation_tokens_total` by outcome (sampled, dropped, ...), from its /metrics `text`."""
    return {
        s.labels["outcome"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "star_adaptation_tokens"
        for s in f.samples
        if s.name.endswith("_total") and s.labels.get("model") == model
    }


def lag_quantiles(text: str, model: str) -> dict[str, Any]:
    """Median and p99 of a server's token-to-commit lag from the `star_adaptation_lag_seconds` buckets of
    its /metrics `text`, interpolated within a bucket as Prometheus' `histogram_quantile` does."""
    family = next(f for f in text_string_to_metric_families(text) if f.name == "star_adaptation_lag_seconds")
    buckets = sorted(
        (float(s.labels["le"]), s.value)
        for s in family.samples
        if s.name.endswith("_bucket") and s.labels["model"] == model
    )  # (upper bound, cumulative count), +Inf last
    total = buckets[-1][1] if buckets else 0.0

    def quantile(q: float) -> float | None:
        if total == 0:
            return None
        rank, lower, below = q * total, 0.0, 0.0
        for upper, count in buckets:
            if count >= rank:
                if math.isinf(upper):
                    return lower  # beyond the last finite bucket: its bound, as Prometheus reports
                return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
            lower, below = upper, count
        return None

    return {"median": quantile(0.5), "p99": quantile(0.99), "commits": int(total)}
