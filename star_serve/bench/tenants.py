"""`star-serve bench tenants`: a million distinct tenants, one short request each, and what the replica
keeps of them. Through the engine directly (`engine_tenants`, with the adaptation wired as the server wires
it: capture, the tenant LRU, the bank), and through HTTP to a real server (`http_tenants`). At each
checkpoint (1k, 10k, 100k, 1M tenants seen): the resident memory of the serving process and its adaptation
process together, the adapter's resident tenant states, and the latency of the last `window` requests
(p50, p99). Target: memory flat (within 10%) beyond the LRU size, p50 within 10% of the 1k-tenant figure.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .report import write_report
from .server import BenchServer

PROMPT = "Return the list of words"


@dataclass(frozen=True)
class TenantsBenchConfig:
    model: Path
    out_dir: Path
    engine_tenants: int = 1_000_000
    http_tenants: int = 100_000
    concurrency: int = 32
    window: int = 2_000  # requests whose latencies make each checkpoint's quantiles
    checkpoints: tuple[int, ...] = field(default=(1_000, 10_000, 100_000, 1_000_000))


def tree_rss_mb(pid: int) -> float:
    """Resident memory (MiB) of process `pid` and its children (the adaptation process)."""
    total = 0.0
    for proc in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{proc}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
        except (FileNotFoundError, StopIteration):
            continue
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(c) for c in children.read().split()]
    except FileNotFoundError:
        return []


class Recorder:
    """Per-request latencies and, at each checkpoint, memory and resident tenants."""

    def __init__(self, cfg: TenantsBenchConfig, total: int, pid: int, resident: Callable[[], int | None]) -> None:
        self.cfg, self.pid, self.resident = cfg, pid, resident
        self.marks = [c for c in cfg.checkpoints if c <= total]
        self.latencies: list[float] = []
        self.rows: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def done(self, seconds: float, log: Callable[[str], None]) -> None:
        self.latencies.append(seconds)
        if self.marks and len(self.latencies) == self.marks[0]:
            seen = self.marks.pop(0)
            recent = sorted(self.latencies[-self.cfg.window :])
            row = {
                "tenants": seen,
                "rss_mb": tree_rss_mb(self.pid),
                "resident_tenants": self.resident(),
                "p50_ms": 1000 * recent[len(recent) // 2],
                "p99_ms": 1000 * recent[min(len(recent) - 1, int(0.99 * len(recent)))],
                "requests_per_s": seen / (time.perf_counter() - self.started),
            }
            self.rows.append(row)
            log(
                f"  {seen:>9,} tenants: {row['rss_mb']:.0f} MiB, {row['resident_tenants']} resident, "
                f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, {row['requests_per_s']:.0f} req/s"
            )


async def _run_engine(cfg: TenantsBenchConfig, home: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from ..api.app import load_served_model
    from ..api.state import AppState
    from ..api.tenants import FileTenantRegistry
    from ..config import Settings
    from ..engine.generation import GenerationEngine, SequenceRequest
    from ..engine.types import SamplingParams
    from ..metrics import ServingMetrics

    settings = Settings(models=[f"bench={cfg.model}"], state_dir=home / "state", cache_dir=home / "cache")
    state = AppState(settings=settings, metrics=ServingMetrics(), tenants=FileTenantRegistry(home / "tenants.json"))
    served = load_served_model("bench", cfg.model, state)
    engine, adapter = served.engine, served.adapter
    assert isinstance(engine, GenerationEngine) and adapter is not None
    engine.start()
    await adapter.start()
    try:
        ids = served.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        params = SamplingParams(max_tokens=1, temperature=0.0)
        recorder = Recorder(cfg, cfg.engine_tenants, os.getpid(), lambda: adapter.report(1).resident)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(cfg.engine_tenants):
            queue.put_nowait(i)

        async def client() -> None:
            while not queue.empty():
                tenant = f"tenant-{queue.get_nowait()}"
                started = time.perf_counter()
                await adapter.ensure_loaded(tenant)  # as the server does for each request
                [stream] = engine.submit([SequenceRequest(ids, params, tenant, incremental=False)])
                async for _ in stream:
                    pass
                recorder.done(time.perf_counter() - started, log)

        await asyncio.gather(*(client() for _ in range(cfg.concurrency)))
        return recorder.rows
    finally:
        engine.stop()
        await adapter.stop()


async def _run_http(cfg: TenantsBenchConfig, log: Callable[[str], None]) -> list[dict[str, Any]]:
    server = BenchServer(cfg.model, {})
    try:
        recorder = Recorder(cfg, cfg.http_tenants, server.process.pid, lambda: _resident(server.url))
        body = {"model": "bench", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(cfg.http_tenants):
            queue.put_nowait(i)
        limits = httpx.Limits(max_connections=cfg.concurrency)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:

            async def client() -> None:
                while not queue.empty():
                    tenant = f"tenant-{queue.get_nowait()}"
                    started = time.perf_counter()
                    try:
                        response = await http.post("/v1/completions", json=body, headers={"X-Tenant": tenant})
                        response.raise_for_status()
                    except httpx.HTTPError as error:
                        code = server.process.poll()
                        raise RuntimeError(
                            f"the request of {tenant} failed: {error!r}; the server "
                            f"{'is running' if code is None else f'exited with {code}'}; its log ends:\n{server.log()}"
                        ) from error
                    recorder.done(time.perf_counter() - started, log)

            await asyncio.gather(*(client() for _ in range(cfg.concurrency)))
        return recorder.rows
    finally:
        server.close()


def _resident(url: str) -> int | None:
    """The server's resident tenant states, from its metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("star_adaptation_tenants_resident{"):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def run_tenants_bench(cfg: TenantsBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    results: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items() if k != "out_dir"},
        "machine": {"cpus": os.cpu_count()},
    }
    results["config"]["model"] = cfg.model.name
    with tempfile.TemporaryDirectory(prefix="star-tenants-") as home:
        if cfg.engine_tenants:
            log(f"through the engine: {cfg.engine_tenants:,} tenants")
            results["engine"] = asyncio.run(_run_engine(cfg, Path(home), log))
    if cfg.http_tenants:
        log(f"through HTTP: {cfg.http_tenants:,} tenants")
        results["http"] = asyncio.run(_run_http(cfg, log))
    write_report(cfg.out_dir, "tenants", results, _table(results), None)
    return results


def _table(results: dict[str, Any]) -> str:
    lines = [
        "| path | tenants seen | resident MiB | vs 1k | tenant states kept | p50 ms | vs 1k | p99 ms | req/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in ("engine", "http"):
        rows = results.get(path) or []
        if not rows:
            continue
        base = rows[0]
        for row in rows:
            lines.append(
                f"| {path} | {row['tenants']:,} | {row['rss_mb']:.0f} | {row['rss_mb'] / base['rss_mb']:.2f} | "
                f"{row['resident_tenants']} | {row['p50_ms']:.1f} | {row['p50_ms'] / base['p50_ms']:.2f} | "
                f"{row['p99_ms']:.1f} | {row['requests_per_s']:.0f} |"
            )
    window = results["config"]["window"]
    lines.append(
        f"\nOne request of `max_tokens: 1` per tenant, {results['config']['concurrency']} at once; latencies of "
        f"the last {window:,} requests before each checkpoint; memory of the serving process and its "
        "adaptation process together.\n"
    )
    return "\n".join(lines)
