"""Soak test: a million generated tokens of drifting, bursty traffic from a few tenants against a local server
(the demo models), checking that per-tenant adaptation stays inside its guardrails and the server stays healthy.

    python -m load_tests.soak --tokens 1000000 --out soak-results

Each tenant's prompts drift: they come from one family of stdlib docstrings (asyncio, email, net, ...) and
shift, mixed in gradually, to the next family on the tenant's route as the run progresses. Each tenant's
traffic is bursty: `--burst-concurrency` requests back to back for half of its cycle, one at a time for the
other half, with cycles of different lengths so that the tenants' bursts overlap now and then.

Pass criteria, checked on samples taken every `--sample-every` seconds and at the end (exit 1 if any fails):
  drift     every tenant's largest per-layer drift (GET /v1/subspace) <= the guardrail cap
  entropy   every layer's expert-load entropy (/metrics) > 0.3 ln E: no expert collapse
  memory    the server's VmRSS at the end <= 1.10 x its VmRSS once 10% of the tokens were generated
  errors    no 5xx, connection error, other 4xx or broken stream (429/503 refusals are counted, allowed)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from star_serve.adaptation import Guardrails
from star_serve.training.corpus import FAMILIES, classifier_dataset

from .server import LocalServer, Sample, metric_sum, parse_metrics

ENTROPY_SHARE = 0.3  # of ln E, the entropy of a perfectly even load
MEMORY_GROWTH = 0.10
WARMUP_SHARE = 0.10  # of the token target
MAX_TOKENS_CHOICES = (64, 128, 256)
REQUEST_TIMEOUT = 300.0
MAX_ERRORS = 50  # a broken server fails fast instead of at the time limit


@dataclass
class Tenant:
    name: str
    route: list[str]  # the prompt families it drifts through, in order
    cycle_s: float  # one burst and one quiet period
    offset_s: float

    def family(self, progress: float, rng: random.Random) -> str:
        """At `progress` (0..1) of the run: between two families of the route, the later ever more likely."""
        position = min(progress, 1.0) * (len(self.route) - 1)
        here = int(position)
        if here + 1 < len(self.route) and rng.random() < position - here:
            return self.route[here + 1]
        return self.route[here]

    def concurrency(self, elapsed: float, burst: int, quiet: int) -> int:
        in_burst = (elapsed + self.offset_s) % self.cycle_s < self.cycle_s / 2
        return burst if in_burst else quiet


@dataclass(frozen=True)
class Criterion:
    name: str
    measured: str
    limit: str
    ok: bool


@dataclass
class Tally:
    tokens: int = 0
    requests: int = 0
    refused: Counter[int] = field(default_factory=Counter)  # by status: 429, 503
    errors: Counter[str] = field(default_factory=Counter)  # "HTTP 500", "ReadError", "broken stream", ...


@dataclass
class Observations:
    """What the sampler saw, for the criteria and the report."""

    drift: dict[str, float] = field(default_factory=dict)  # tenant -> largest per-layer drift seen
    version: dict[str, int] = field(default_factory=dict)  # tenant -> last subspace version
    entropy_min: dict[str, float] = field(default_factory=dict)  # layer -> lowest entropy seen
    experts: dict[str, int] = field(default_factory=dict)  # layer -> number of experts
    rss_warm: int | None = None
    rss_end: int | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000, help="Generated tokens to reach.")
    parser.add_argument("--tenants", type=int, default=4, help="Tenants sending traffic.")
    parser.add_argument("--burst-concurrency", type=int, default=8, help="Requests in flight per tenant in a burst.")
    parser.add_argument("--quiet-concurrency", type=int, default=1, help="Requests in flight per tenant when quiet.")
    parser.add_argument("--cycle", type=float, default=20.0, help="Seconds of the first tenant's burst+quiet cycle.")
    parser.add_argument("--sample-every", type=float, default=5.0, help="Seconds between samples of the server.")
    parser.add_argument("--time-limit", type=float, default=3600.0, help="Seconds after which the run fails.")
    parser.add_argument("--lm-model", default="star-demo-lm", help="The generation model the traffic goes to.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompt and request draws.")
    parser.add_argument("--out", type=Path, default=Path("soak-results"), help="Directory of the results.")
    return parser.parse_args(argv)


def make_tenants(count: int, cycle_s: float) -> list[Tenant]:
    families = list(FAMILIES)
    return [
        Tenant(
            name=f"soak-{index}",
            route=[families[(index + step) % len(families)] for step in range(4)],
            cycle_s=cycle_s * (1 + 0.3 * index),
            offset_s=cycle_s * 0.37 * index,
        )
        for index in range(count)
    ]


class Soak:
    def __init__(self, args: argparse.Namespace, server: LocalServer, paragraphs: dict[str, list[str]]) -> None:
        self.args, self.server, self.paragraphs = args, server, paragraphs
        self.tenants = make_tenants(args.tenants, args.cycle)
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.seen = Observations()
        self.cap = Guardrails().max_distance
        self.done = asyncio.Event()
        self.started = time.monotonic()
        self.traffic_s = 0.0  # how long the traffic ran, once it has ended

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def progress(self) -> float:
        return self.tally.tokens / self.args.tokens

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=self.server.url, timeout=REQUEST_TIMEOUT, limits=limits) as client:
            workers = [
                asyncio.create_task(self.worker(client, tenant, slot))
                for tenant in self.tenants
                for slot in range(self.args.burst_concurrency)
            ]
            sampler = asyncio.create_task(self.sample_periodically(client))
            await asyncio.gather(*workers)
            self.traffic_s = self.elapsed
            sampler.cancel()
            await asyncio.sleep(2.0)  # lets the adaptation worker commit what the last requests gathered
            await self.sample(client)
            self.seen.rss_end = self.server.rss_bytes()

    async def worker(self, client: httpx.AsyncClient, tenant: Tenant, slot: int) -> None:
        args = self.args
        while not self.done.is_set():
            if slot >= tenant.concurrency(self.elapsed, args.burst_concurrency, args.quiet_concurrency):
                await asyncio.sleep(0.25)
                continue
            tokens = await self.request(client, tenant)
            self.tally.requests += 1
            self.tally.tokens += tokens
            if self.seen.rss_warm is None and self.progress >= WARMUP_SHARE:
                self.seen.rss_warm = self.server.rss_bytes()
            errors = sum(self.tally.errors.values())
            if self.tally.tokens >= args.tokens or self.elapsed > args.time_limit or errors >= MAX_ERRORS:
                self.done.set()

    async def request(self, client: httpx.AsyncClient, tenant: Tenant) -> int:
        """Sends one completion or chat completion, streamed or not; returns the tokens generated."""
        words = self.rng.choice(self.paragraphs[tenant.family(self.progress, self.rng)]).split()
        text = " ".join(words[: self.rng.randint(8, 60)])
        chat = self.rng.random() < 0.5
        body: dict[str, Any] = {
            "model": self.args.lm_model,
            "max_tokens": self.rng.choice(MAX_TOKENS_CHOICES),
            "temperature": 0.8,
            "ignore_eos": self.rng.random() < 0.7,
            **({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}),
        }
        path = "/v1/chat/completions" if chat else "/v1/completions"
        headers = {"X-Tenant": tenant.name}
        try:
            if self.rng.random() < 0.5:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                async with client.stream("POST", path, json=body, headers=headers) as response:
                    if response.status_code != 200:
                        await response.aread()
                        return await self.refused_or_failed(response.status_code)
                    return await self.read_events(response)
            response = await client.post(path, json=body, headers=headers)
            if response.status_code != 200:
                return await self.refused_or_failed(response.status_code)
            return int(response.json()["usage"]["completion_tokens"])
        except httpx.HTTPError as error:
            self.tally.errors[type(error).__name__] += 1
        except (ValueError, KeyError):  # a body that is not the JSON it should be
            self.tally.errors["bad response"] += 1
        return 0

    async def read_events(self, response: httpx.Response) -> int:
        tokens, done = 0, False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                self.tally.errors["error event in stream"] += 1
                return tokens
            tokens = int(event["usage"]["completion_tokens"]) if event.get("usage") else tokens
        if not done:
            self.tally.errors["broken stream"] += 1
        return tokens

    async def refused_or_failed(self, status: int) -> int:
        if status in (429, 503):
            self.tally.refused[status] += 1
            await asyncio.sleep(1.0)  # backs off before the next request
        else:
            self.tally.errors[f"HTTP {status}"] += 1
        return 0

    async def sample_periodically(self, client: httpx.AsyncClient) -> None:
        while True:
            await asyncio.sleep(self.args.sample_every)
            await self.sample(client)

    async def sample(self, client: httpx.AsyncClient) -> None:
        try:
            await self.observe(client)
        except httpx.HTTPError as error:  # a failed read of /v1/subspace or /metrics is a server error too
            self.tally.errors[f"sampling: {type(error).__name__}"] += 1

    async def observe(self, client: httpx.AsyncClient) -> None:
        """Reads every tenant's drift, every layer's entropy and the server's memory, and prints a line."""
        point: dict[str, Any] = {"t": round(self.elapsed, 1), "tokens": self.tally.tokens}
        for tenant in self.tenants:
            response = await client.get(
                "/v1/subspace", params={"model": self.args.lm_model}, headers={"X-Tenant": tenant.name}
            )
            response.raise_for_status()
            state = response.json()
            drift = max(state["drift"], default=0.0)
            self.seen.drift[tenant.name] = max(drift, self.seen.drift.get(tenant.name, 0.0))
            self.seen.version[tenant.name] = state["version"]
            point[f"drift:{tenant.name}"] = round(drift, 4)
        metrics = await client.get("/metrics")
        metrics.raise_for_status()
        for layer, entropy in self.layer_entropy(parse_metrics(metrics.text)).items():
            self.seen.entropy_min[layer] = min(entropy, self.seen.entropy_min.get(layer, math.inf))
            point[f"entropy:{layer}"] = round(entropy, 4)
        point["rss_mib"] = round(self.server.rss_bytes() / 2**20, 1)
        self.seen.timeline.append(point)
        rate = self.tally.tokens / max(self.elapsed, 1e-9)
        entropy_min = min(self.seen.entropy_min.values(), default=math.nan)
        print(
            f"[{self.elapsed:7.1f} s] {self.tally.tokens:>9,} tokens ({rate:,.0f}/s)  "
            f"drift max {max(self.seen.drift.values(), default=0.0):.3f}  entropy min {entropy_min:.3f}  "
            f"rss {point['rss_mib']:.0f} MiB",
            flush=True,
        )

    def layer_entropy(self, samples: list[Sample]) -> dict[str, float]:
        """layer -> entropy of its recent expert load; also counts each layer's experts (its load series)."""
        ours = [(name, labels, value) for name, labels, value in samples if labels.get("model") == self.args.lm_model]
        self.seen.experts.update(Counter(ls["layer"] for n, ls, _ in ours if n == "star_expert_load_fraction"))
        return {ls["layer"]: v for n, ls, v in ours if n == "star_expert_load_entropy"}


def judge(soak: Soak) -> list[Criterion]:
    seen, tally = soak.seen, soak.tally
    drift = max(seen.drift.values(), default=0.0)
    floors = {layer: ENTROPY_SHARE * math.log(count) for layer, count in seen.experts.items()}
    margins = {layer: seen.entropy_min[layer] - floors[layer] for layer in seen.entropy_min if layer in floors}
    worst = min(margins, key=lambda layer: margins[layer], default=None)
    growth = (seen.rss_end / seen.rss_warm - 1) if seen.rss_end and seen.rss_warm else math.nan
    errors = sum(tally.errors.values())
    entropy_name = "expert-load entropy, min over layers"
    if worst is None:
        entropy = Criterion(entropy_name, "no samples", "> 0.3 ln E", ok=False)
    else:
        limit = f"> {floors[worst]:.3f} = 0.3 ln {seen.experts[worst]} (layer {worst})"
        entropy = Criterion(entropy_name, f"{seen.entropy_min[worst]:.3f}", limit, ok=margins[worst] > 0)
    target = soak.args.tokens
    return [
        Criterion("tokens generated", f"{tally.tokens:,}", f">= {target:,}", ok=tally.tokens >= target),
        Criterion("drift, max over tenants and layers", f"{drift:.4f}", f"<= {soak.cap}", ok=drift <= soak.cap),
        entropy,
        Criterion("resident memory, end vs after warm-up", f"{growth:+.1%}", f"<= +{MEMORY_GROWTH:.0%}",
                  ok=growth <= MEMORY_GROWTH),
        Criterion("errors (5xx, connection, other 4xx, broken streams)", str(errors), "0", ok=errors == 0),
    ]  # fmt: skip


def render(results: dict[str, Any]) -> str:
    lines = ["| criterion | measured | limit | pass |", "|---|---:|---|---|"]
    lines += [
        f"| {c['name']} | {c['measured']} | {c['limit']} | {'yes' if c['ok'] else 'NO'} |" for c in results["criteria"]
    ]
    lines += ["", "| tenant | route | subspace version | max drift |", "|---|---|---:|---:|"]
    lines += [
        f"| {t['name']} | {' > '.join(t['route'])} | {t['version']} | {t['max_drift']:.4f} |"
        for t in results["tenants"]
    ]
    run = results["run"]
    lines += [
        "",
        f"{run['tokens']:,} tokens in {run['elapsed_s']:.0f} s: {run['tokens_per_s']:,.0f} tokens/s "
        f"({run['server_tokens']:,.0f} by `star_generated_tokens_total`), {run['requests']:,} requests, "
        f"refused {run['refused'] or 'none'}, errors {run['errors'] or 'none'}. Resident memory "
        f"{run['rss_warm_mib']:.0f} MiB after warm-up, {run['rss_end_mib']:.0f} MiB at the end; "
        f"entropy minima by layer {run['entropy_min']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train, heldout, labels = classifier_dataset()
    paragraphs: dict[str, list[str]] = {label: [] for label in labels}
    for text, label in [*train, *heldout]:
        paragraphs[labels[label]].append(text)
    with LocalServer(args.out / "server.log") as server:
        tokens_before = metric_sum(server.metrics(), "star_generated_tokens_total")
        soak = Soak(args, server, paragraphs)
        asyncio.run(soak.run())
        elapsed = soak.traffic_s
        server_tokens = metric_sum(server.metrics(), "star_generated_tokens_total") - tokens_before
    seen, tally = soak.seen, soak.tally
    results: dict[str, Any] = {
        "criteria": [asdict(criterion) for criterion in judge(soak)],
        "tenants": [
            {**asdict(t), "version": seen.version.get(t.name, 0), "max_drift": seen.drift.get(t.name, 0.0)}
            for t in soak.tenants
        ],
        "run": {
            "tokens": tally.tokens,
            "server_tokens": server_tokens,
            "elapsed_s": round(elapsed, 1),
            "tokens_per_s": round(tally.tokens / elapsed, 1),
            "requests": tally.requests,
            "refused": dict(tally.refused),
            "errors": dict(tally.errors),
            "rss_warm_mib": round((seen.rss_warm or 0) / 2**20, 1),
            "rss_end_mib": round((seen.rss_end or 0) / 2**20, 1),
            "entropy_min": {layer: round(v, 3) for layer, v in sorted(seen.entropy_min.items())},
            "server_exit_code": server.exit_code,
        },
        "timeline": seen.timeline,
    }
    table = render(results)
    (args.out / "soak.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "soak.md").write_text(table)
    print(table)
    failed = [c["name"] for c in results["criteria"] if not c["ok"]]
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
