"""`star-serve bench calibration`: what test-time adaptation does to a tenant whose traffic is the training
distribution, for each model given (a calibrated checkpoint and the same one uncalibrated, side by side).

The tenant adapts as the product adapts it: an `Adapter` with `AdaptationConfig(mode="async")`, every
setting its default (guardrails, capture and clipping) but the learning rate, which is swept
(`learning_rates`, the default first); one GHA step per `step_tokens` of traffic (the default
`STAR_ADAPTATION_MIN_TOKENS`), each forward routed with the tenant's current bases. Two kinds of traffic,
`traffic_tokens` each: "repeated", a held-out slice of `repeated_tokens` sent again and again (the traffic
of bench adaptation (a)); "fresh", in-domain text never repeated, from the training documents (the held-out
split is too small for it). At each of `checkpoints`, on `eval_tokens` of held-out text disjoint from both:
routing consistency (share of tokens and layers whose top-k experts equal those under the trained bases),
the loss with the tenant's bases minus the loss with the trained ones, the same on the tenant's own traffic,
and the largest projection distance of a layer's basis from the trained one. A tenant that changes nothing
of the training distribution should be served what the trained model serves.

Each run is made without the quality gate (every guarded step committed) and, at the learning rates of
`gated_learning_rates`, with it as the product runs it: the tenant's prompts are offered to the hold-back
sample first, a held-back window counts in no statistics, and the owner commits a candidate only if it
scores no worse on that sample than the tenant's current version and the trained bases.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..adaptation import AdaptationConfig, Adapter, LocalDirStore, TenantBank
from ..adaptation.quality import QualityGate, model_scorer
from ..config import Settings
from ..model import Routing, StarMoeForCausalLM, projection_distance
from ..model.loading import load_model
from .report import write_report


@dataclass(frozen=True)
class CalibrationBenchConfig:
    models: tuple[Path, ...]  # causal-LM checkpoints, measured one after the other on the same tokens
    out_dir: Path
    learning_rates: tuple[float, ...] = (
        Settings.default("adaptation_learning_rate"),
        0.01,
        0.002,
        0.0005,
    )  # default first
    gated_learning_rates: tuple[float, ...] = (Settings.default("adaptation_learning_rate"),)
    traffic: tuple[str, ...] = ("repeated", "fresh")
    traffic_tokens: int = 409_600  # bench adaptation (a)'s amount: 100 rounds of 4096 tokens
    repeated_tokens: int = 4096  # the held-out slice that "repeated" traffic goes over again and again
    checkpoints: tuple[int, ...] = (4096, 20_480, 102_400, 409_600)  # traffic tokens after which it is measured
    eval_tokens: int = 10_240
    seq_len: int = 128
    step_tokens: int = 512
    seed: int = 0
    align_linear_gate: bool = Settings.default("adaptation_align_linear_gate")


def _windows(tokenizer: Any, docs: Sequence[str], seq_len: int, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Disjoint (N, seq_len) slices of the documents' token stream, about `sizes[i]` tokens each."""
    ids = [t for doc in docs for t in (*tokenizer(doc)["input_ids"], tokenizer.eos_token_id)]
    stream = torch.tensor(ids, dtype=torch.long)
    needed = sum(-(-size // seq_len) for size in sizes) * seq_len
    if len(stream) < needed:
        raise ValueError(f"held-out text has {len(stream)} tokens, fewer than the {needed} asked for")
    slices, at = [], 0
    for size in sizes:
        count = -(-size // seq_len)
        slices.append(stream[at : at + count * seq_len].view(count, seq_len))
        at += count * seq_len
    return slices


@torch.no_grad()
def _evaluate(model: StarMoeForCausalLM, windows: torch.Tensor, bases: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean next-token loss (nats) of `windows` routed with `bases` (L, E, D), and the top-k expert sets
    (L, N, k), sorted, of every token."""
    total, experts = 0.0, []
    for chunk in windows.split(16):
        out = model(input_ids=chunk, routing=Routing.shared(bases), output_routing=True, use_cache=False)
        logits = out.logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum").item()
        assert out.expert_indices is not None
        experts.append(torch.stack([e.reshape(-1, e.shape[-1]).sort(-1).values for e in out.expert_indices]))
    return total / (windows.numel() - windows.shape[0]), torch.cat(experts, dim=1)


def _bases(bank: TenantBank, tenant: str) -> tuple[torch.Tensor, int]:
    view = bank.lookup([tenant])
    assert view.routing.bank is not None and view.routing.index is not None
    return view.routing.bank[view.routing.index[0]].clone(), view.versions[0]


async def unshifted_tenant(
    model: StarMoeForCausalLM,
    traffic: torch.Tensor,  # (N, seq_len): the tenant's windows in the order it sends them
    evaluation: torch.Tensor,
    own: torch.Tensor,  # windows of the tenant's own traffic, scored too
    learning_rate: float,
    gated: bool,
    cfg: CalibrationBenchConfig,
    store: Path,
) -> dict[str, Any]:
    """One tenant adapted with the product's defaults (but `learning_rate`, and the quality gate only if
    `gated`) on `traffic`, one step per `cfg.step_tokens`; measured at each of `cfg.checkpoints` against
    the trained bases."""
    trained = model.trained_bases()  # (L, E, D)
    frozen_loss, frozen_experts = _evaluate(model, evaluation, trained)
    frozen_own, _ = _evaluate(model, own, trained)
    bank = TenantBank(trained, torch.device("cpu"), torch.float32)
    config = AdaptationConfig(mode="async", learning_rate=learning_rate)
    gate = QualityGate(model_scorer(model), config.quality) if gated else None
    adapter = Adapter("bench", trained, bank, LocalDirStore(store), config, gate=gate)
    adapter.start()
    tenant, per_forward = "unshifted", max(1, cfg.step_tokens // cfg.seq_len)
    rows, sent = [], 0
    try:
        await adapter.describe(tenant)  # loads the tenant (version 0) before its first tokens
        for chunk in traffic.split(per_forward):
            bases, version = _bases(bank, tenant)
            with torch.no_grad():
                out = model(input_ids=chunk, routing=Routing.shared(bases), output_routing=True, use_cache=False)
            assert out.router_inputs is not None and out.expert_indices is not None
            counted = [i for i, window in enumerate(chunk) if not (gated and adapter.hold_back(tenant, window))]
            sent += chunk.numel()
            if counted:
                inputs = [x[counted].reshape(-1, x.shape[-1]).float() for x in out.router_inputs]
                chosen = [e[counted].reshape(-1) for e in out.expert_indices]
                load = torch.stack([torch.bincount(e, minlength=bases.shape[1]) for e in chosen])
                adapter.observe(tenant, version, bases, inputs, load)
            await adapter.flush()  # one step per forward of `step_tokens`
            if sent in cfg.checkpoints or sent == traffic.numel():
                bases, version = _bases(bank, tenant)
                loss, experts = _evaluate(model, evaluation, bases)
                rows.append(
                    {
                        "traffic_tokens": sent,
                        "version": version,
                        "consistency": (experts == frozen_experts).all(-1).float().mean().item(),
                        "loss_change": loss - frozen_loss,
                        "own_loss_change": _evaluate(model, own, bases)[0] - frozen_own,
                        "drift": max(projection_distance(b, t) for b, t in zip(bases, trained, strict=True)),
                    }
                )
    finally:
        await adapter.stop()
    return {
        "frozen_loss": frozen_loss,
        "checkpoints": rows,
        "batches": dict(adapter.stats.batches),
        "rollbacks": adapter.stats.rollbacks,
    }


def run_calibration_bench(cfg: CalibrationBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from ..training.corpus import lm_corpus

    results: dict[str, Any] = {
        "config": {k: [_name(p) for p in v] if k == "models" else v for k, v in cfg.__dict__.items() if k != "out_dir"},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "device": "cpu"},
        "runs": [],
    }
    train_docs, heldout = lm_corpus()
    train_docs = [
        train_docs[i] for i in torch.randperm(len(train_docs), generator=torch.Generator().manual_seed(cfg.seed))
    ]
    with tempfile.TemporaryDirectory(prefix="star-bench-") as tmp:
        for model_dir in cfg.models:
            model, tokenizer = load_model(model_dir, "generate", torch.device("cpu"), torch.float32)
            assert isinstance(model, StarMoeForCausalLM)
            model.align_linear_gates(cfg.align_linear_gate)
            evaluation, slice_ = _windows(tokenizer, heldout, cfg.seq_len, (cfg.eval_tokens, cfg.repeated_tokens))
            (fresh,) = _windows(tokenizer, train_docs, cfg.seq_len, (cfg.traffic_tokens,))
            name = _name(model_dir)
            for kind in cfg.traffic:
                if kind == "repeated":
                    traffic, own = slice_.repeat(-(-cfg.traffic_tokens // slice_.numel()), 1), slice_
                else:
                    traffic, own = fresh, fresh[-(cfg.eval_tokens // cfg.seq_len) :]
                traffic = traffic[: cfg.traffic_tokens // cfg.seq_len]
                runs = [(lr, False) for lr in cfg.learning_rates] + [(lr, True) for lr in cfg.gated_learning_rates]
                for lr, gated in runs:
                    started = time.perf_counter()
                    store = Path(tmp) / f"{len(results['runs'])}"
                    result = asyncio.run(unshifted_tenant(model, traffic, evaluation, own, lr, gated, cfg, store))
                    result |= {"model": name, "traffic": kind, "learning_rate": lr, "gated": gated}
                    result["seconds"] = time.perf_counter() - started
                    results["runs"].append(result)
                    last = result["checkpoints"][-1]
                    log(
                        f"  {name}, {kind} traffic, lr {lr:g}{', gated' if gated else ''}: after "
                        f"{last['traffic_tokens']:,} tokens, version {last['version']}, consistency "
                        f"{last['consistency']:.3f}, held-out loss {last['loss_change']:+.4f}, own-traffic loss "
                        f"{last['own_loss_change']:+.4f} nats/token, drift {last['drift']:.3f}"
                    )
    write_report(cfg.out_dir, "calibration", results, _table(results), None)
    return results


def _name(model_dir: Path) -> str:
    """A checkpoint's name in a report: its directory and the one above (no machine's paths)."""
    return f"{model_dir.resolve().parent.name}/{model_dir.name}"


def _table(results: dict[str, Any]) -> str:
    lines = [
        "| model | traffic | learning rate | quality gate | traffic tokens | versions | routing consistency "
        "| held-out loss − frozen | own-traffic loss − frozen | drift |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        gate = "on" if run.get("gated") else "off"
        for row in run["checkpoints"]:
            lines.append(
                f"| {run['model']} | {run['traffic']} | {run['learning_rate']:g} | {gate} | {row['traffic_tokens']:,} "
                f"| {row['version']} "
                f"| {row['consistency']:.3f} | {row['loss_change']:+.4f} | {row['own_loss_change']:+.4f} "
                f"| {row['drift']:.3f} |"
            )
    frozen = {run["model"]: run["frozen_loss"] for run in results["runs"]}
    lines.append("\nHeld-out loss with the trained bases: " + ", ".join(f"{m} {v:.3f}" for m, v in frozen.items()))
    aligned = "aligned to" if results["config"]["align_linear_gate"] else "not aligned to"
    lines[-1] += f" nats/token. The linear half of the gate {aligned} the tenant's subspace."
    return "\n".join(lines) + "\n"
