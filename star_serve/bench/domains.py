"""`star-serve bench domains`, part (d) of the adaptation benchmarks: what adaptation does to a tenant's
loss on its own domain, through a real server and real HTTP.

One tenant per domain sends a stream of its domain's text (`traffic_tokens`, as completions of one token)
to a `star-serve serve` process adapting with the product's settings, `STAR_ADAPTATION=async` (less the
rate limit of one step a second, which traffic sent this fast would meet and a tenant's would not); once the
server has handled what was sent, each tenant's committed bases are read from the server's snapshot store
and scored on `eval_tokens` of the same domain disjoint from the traffic: mean next-token loss with the
committed bases minus the loss with the trained ones. Once with the quality gate (the default) and once
without it, each for every seed (a seed chooses which windows are traffic and which evaluation).

Domains: held-out in-domain docstrings; Python source with docstrings and comments stripped; the licence
texts of /usr/share/common-licenses; the in-domain text upper-cased; the in-domain text with 15% of its
letters replaced at random.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import os
import random
import statistics
import string
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from ..adaptation import LocalDirStore
from ..model import StarMoeForCausalLM
from ..model.loading import load_model
from ..model.scoring import score_sequences
from .report import write_report
from .server import BenchServer

DOMAINS = ("in-domain", "code", "licences", "upper-case", "typos")
LICENCES = Path("/usr/share/common-licenses")
TYPO_RATE = 0.15
# The servers compared: the product's settings, and the same without the quality gate.
GATES = {"gated": {}, "ungated": {"STAR_ADAPTATION_QUALITY_GATE": "false"}}
HANDLED = ("applied", "duplicate", "stale", "frozen", "refused", "refused_quality")


@dataclass(frozen=True)
class DomainBenchConfig:
    model: Path
    out_dir: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    gates: tuple[str, ...] = tuple(GATES)
    traffic_tokens: int = 20_480  # per tenant; the held-out docstrings have about 30,000 tokens in all
    eval_tokens: int = 6_144
    seq_len: int = 128
    clients_per_tenant: int = 2
    settle_timeout: float = 900.0  # seconds for the server to handle the statistics of what was sent


def _code_documents(limit_chars: int) -> list[str]:
    """Python source of the standard library, docstrings and comments stripped (`ast.unparse` keeps no
    comments), files in a stable hashed order, about `limit_chars` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())
    docs, chars = [], 0
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                value = body[0].value
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
        docs.append(ast.unparse(tree))
        chars += len(docs[-1])
        if chars >= limit_chars:
            break
    return docs


def _licence_documents() -> list[str]:
    texts = {p.resolve().read_text(errors="replace") for p in sorted(LICENCES.iterdir()) if p.is_file()}
    if not texts:
        raise FileNotFoundError(f"no licence texts in {LICENCES}")
    return sorted(texts)


def with_typos(text: str, rate: float, seed: int) -> str:
    """`text` with each letter replaced, with probability `rate`, by a random lower-case letter."""
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase) if c.isalpha() and rng.random() < rate else c for c in text)


def domain_documents(domain: str, heldout: Sequence[str], chars: int) -> list[str]:
    if domain == "in-domain":
        return list(heldout)
    if domain == "upper-case":
        return [doc.upper() for doc in heldout]
    if domain == "typos":
        return [with_typos(doc, TYPO_RATE, i) for i, doc in enumerate(heldout)]
    if domain == "code":
        return _code_documents(chars)
    if domain == "licences":
        return _licence_documents()
    raise ValueError(f"unknown domain {domain!r}")


def split_windows(
    tokenizer: Any, docs: Sequence[str], cfg: DomainBenchConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The documents' token stream as (N, seq_len) windows, shuffled by `seed`: (traffic, evaluation)."""
    ids = [t for doc in docs for t in (*tokenizer(doc)["input_ids"], tokenizer.eos_token_id)]
    windows = torch.tensor(ids[: len(ids) // cfg.seq_len * cfg.seq_len]).view(-1, cfg.seq_len)
    n_traffic, n_eval = cfg.traffic_tokens // cfg.seq_len, cfg.eval_tokens // cfg.seq_len
    if len(windows) < n_traffic + n_eval:
        raise ValueError(f"{len(windows) * cfg.seq_len} tokens, fewer than {(n_traffic + n_eval) * cfg.seq_len}")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[order[n_eval : n_eval + n_traffic]], windows[order[:n_eval]]


async def send_traffic(url: str, prompts: dict[str, list[str]], clients_per_tenant: int) -> int:
    """Each tenant's prompts, in order, as one-token completions from `clients_per_tenant` clients of its own;
    the prompt tokens the server counted."""
    total = 0

    async def client(http: httpx.AsyncClient, tenant: str, queue: list[str]) -> None:
        nonlocal total
        while queue:
            body = {"model": "bench", "prompt": queue.pop(0), "max_tokens": 1, "temperature": 0}
            response = await http.post(f"{url}/v1/completions", json=body, headers={"X-Tenant": tenant})
            response.raise_for_status()
            total += response.json()["usage"]["prompt_tokens"]

    async with httpx.AsyncClient(timeout=600) as http:
        queues = {tenant: list(p) for tenant, p in prompts.items()}
        await asyncio.gather(*(client(http, t, q) for t, q in queues.items() for _ in range(clients_per_tenant)))
    return total


def adaptation_counters(metrics_text: str) -> dict[str, float]:
    """The `bench` model's statistics-batch outcomes and captured tokens, from a /metrics page."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.labels.get("model") != "bench" or sample.name.endswith("_created"):
                continue
            if family.name == "star_adaptation_batches":
                found[sample.labels["outcome"]] = sample.value
            elif family.name == "star_adaptation_tokens" and sample.labels.get("outcome") == "sampled":
                found["tokens"] = sample.value
    return found


def settle(url: str, timeout: float) -> dict[str, float]:
    """Waits until every statistics batch published has been handled and no new tokens were captured
    for three polls in a row; the counters then."""
    deadline, last, same = time.monotonic() + timeout, None, 0
    while time.monotonic() < deadline:
        counters = adaptation_counters(httpx.get(f"{url}/metrics", timeout=30).text)
        handled = sum(counters.get(k, 0.0) for k in HANDLED)
        same = same + 1 if counters == last and handled >= counters.get("published", 0.0) else 0
        if same >= 3:
            return counters
        last = counters
        time.sleep(1.0)
    raise TimeoutError(f"the server had not handled its statistics after {timeout:.0f} s: {last}")


def _run_server(
    cfg: DomainBenchConfig,
    gate: str,
    prompts: dict[str, list[str]],
    state_dir: Path,
    log: Callable[[str], None],
) -> tuple[dict[str, float], dict[str, Any], float]:
    env = {
        "STAR_ADAPTATION": "async",
        "STAR_STATE_DIR": str(state_dir),
        # Traffic that would take a tenant minutes arrives here in seconds: without the rate limit of one
        # step a second, its statistics make a step per STAR_ADAPTATION_MIN_TOKENS (512) as they would then.
        "STAR_ADAPTATION_MIN_INTERVAL": "0",
        **GATES[gate],
    }
    server = BenchServer(cfg.model, env)
    try:
        started = time.perf_counter()
        sent = asyncio.run(send_traffic(server.url, prompts, cfg.clients_per_tenant))
        seconds = time.perf_counter() - started
        counters = settle(server.url, cfg.settle_timeout)
        described = {
            tenant: httpx.get(
                f"{server.url}/v1/subspace", params={"model": "bench"}, headers={"X-Tenant": tenant}, timeout=30
            ).json()
            for tenant in prompts
        }
    finally:
        server.close()
    log(f"    {gate}: {sent:,} prompt tokens in {seconds:.0f} s; batches {counters}")
    return counters, described, seconds


def run_domain_bench(cfg: DomainBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from ..training.corpus import lm_corpus

    model, tokenizer = load_model(cfg.model, "generate", torch.device("cpu"), torch.float32)
    assert isinstance(model, StarMoeForCausalLM)
    trained = model.trained_bases()
    _, heldout = lm_corpus()
    chars = 12 * (cfg.traffic_tokens + cfg.eval_tokens)  # code: about 2.5 characters a token, room for 5 seeds
    documents = {domain: domain_documents(domain, heldout, chars) for domain in DOMAINS}
    results: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items() if k != "out_dir"},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "device": "cpu"},
        "runs": [],
    }
    results["config"]["model"] = cfg.model.name
    with tempfile.TemporaryDirectory(prefix="star-bench-") as tmp:
        for seed in cfg.seeds:
            splits = {d: split_windows(tokenizer, docs, cfg, seed) for d, docs in documents.items()}
            prompts = {d: tokenizer.batch_decode(traffic) for d, (traffic, _) in splits.items()}
            log(f"  seed {seed}")
            for gate in cfg.gates:
                state = Path(tmp) / f"{gate}-{seed}"
                counters, described, seconds = _run_server(cfg, gate, prompts, state, log)
                store = LocalDirStore(state / "snapshots")
                for domain, (_, evaluation) in splits.items():
                    snapshot = asyncio.run(store.latest("bench", domain))
                    bases = trained if snapshot is None else snapshot.bases.float()
                    frozen, adapted = score_sequences(model, list(evaluation), torch.stack([trained, bases]))
                    run = {
                        "seed": seed,
                        "gate": gate,
                        "domain": domain,
                        "frozen_loss": frozen,
                        "adapted_loss": adapted,
                        "loss_change": adapted - frozen,
                        "version": 0 if snapshot is None else snapshot.version,
                        "drift": max(described[domain]["drift"]),
                        "quality": described[domain].get("quality"),
                    }
                    results["runs"].append(run)
                    log(
                        f"      {domain:>10}: version {run['version']:>3}, loss {frozen:.4f} frozen, "
                        f"{adapted:.4f} adapted ({adapted - frozen:+.4f})"
                    )
                results.setdefault("servers", []).append(
                    {"seed": seed, "gate": gate, "batches": counters, "traffic_seconds": seconds}
                )
    results["summary"] = summarize(results["runs"])
    write_report(cfg.out_dir, "domains", results, _table(results, cfg), _plot(results))
    return results


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per gate and domain: the loss change's median, smallest and largest over seeds, and the median
    version reached."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for gate in sorted({r["gate"] for r in runs}):
        summary[gate] = {}
        for domain in DOMAINS:
            mine = [r for r in runs if r["gate"] == gate and r["domain"] == domain]
            if not mine:
                continue
            changes = [r["loss_change"] for r in mine]
            summary[gate][domain] = {
                "median": statistics.median(changes),
                "min": min(changes),
                "max": max(changes),
                "frozen_loss": statistics.median(r["frozen_loss"] for r in mine),
                "versions": statistics.median(r["version"] for r in mine),
            }
    return summary


def _table(results: dict[str, Any], cfg: DomainBenchConfig) -> str:
    summary = results["summary"]
    gates = [g for g in cfg.gates if g in summary]
    head = " | ".join(f"{g}: loss − frozen (min … max) | {g}: versions" for g in gates)
    lines = [f"| domain | frozen loss | {head} |", "|---|---:|" + "---:|---:|" * len(gates)]
    for domain in DOMAINS:
        cells = []
        for gate in gates:
            s = summary[gate][domain]
            cells.append(f"{s['median']:+.4f} ({s['min']:+.4f} … {s['max']:+.4f}) | {s['versions']:g}")
        frozen = summary[gates[0]][domain]["frozen_loss"]
        lines.append(f"| {domain} | {frozen:.3f} | " + " | ".join(cells) + " |")
    seeds = len(cfg.seeds)
    lines.append(
        f"\nMedians over {seeds} seeds; loss in nats/token on {cfg.eval_tokens:,} evaluation tokens per domain, "
        f"after {cfg.traffic_tokens:,} tokens of the tenant's traffic.\n"
    )
    return "\n".join(lines)


def _plot(results: dict[str, Any]) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        summary = results["summary"]
        width = 0.8 / max(len(summary), 1)
        for i, (gate, rows) in enumerate(summary.items()):
            xs = [j + (i - (len(summary) - 1) / 2) * width for j in range(len(rows))]
            medians = [r["median"] for r in rows.values()]
            spread = [[r["median"] - r["min"] for r in rows.values()], [r["max"] - r["median"] for r in rows.values()]]
            ax.bar(xs, medians, width, yerr=spread, capsize=3, label=gate, color=f"C{i}")
        ax.axhline(0, color="k", linewidth=0.8)
        ax.set_xticks(range(len(DOMAINS)), DOMAINS, fontsize=8)
        ax.set_ylabel("loss with committed − trained bases (nats/token)")
        ax.set_title("(d) Demo LM: each tenant's loss on its own domain")
        ax.legend(fontsize=8)

    return draw
