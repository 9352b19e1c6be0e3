"""`star-serve bench adaptation`: what per-tenant test-time adaptation buys under distribution shift, and
what it costs. (One file over 400 lines: parts (a) and (b) share their tenants, routing helpers and the
report's table and plot; part (c) lives in `cost.py`.)

In one run:
(a) Rotation shift. Held-out text through the demo LM gives each MoE layer's router inputs X (N, D). They
    are turned by Q(θ) = exp(θ A), A a fixed random skew-symmetric (D, D) matrix of spectral norm 1: Q
    turns each of its invariant planes by θ·ω_j with max_j ω_j = 1, so θ is the largest angle by which Q
    turns any vector (its largest principal rotation angle); the mean turn of a token is reported too.
    Each layer's rotated inputs go straight through its router with the trained bases ("frozen"), with
    the bases of a tenant whose traffic was a disjoint slice of rotated tokens, fed to an `Adapter` for
    `rounds` rounds of observe + flush ("adapted"), and with V Qᵀ, the exact compensation in the subspace
    half ("ceiling" of any basis adaptation). Routing consistency: the share of tokens whose top-k experts
    equal their unrotated twins' under the trained bases. "Warm": the same for a deployment whose bases
    are already GHA's fixed point on unrotated traffic (a tenant adapted `warmup_rounds` on it), against
    its own unrotated routing.
(b) Corruption shift. The demo classifier on held-out paragraphs with typos, deletions, case flips, word
    shuffles and injected junk at several severities; one tenant per (corruption, severity). Its
    unlabeled corrupted paragraphs go through a real `ClassificationEngine` with the `Adapter` attached;
    then an engine without an adapter measures accuracy on the disjoint evaluation half with the trained
    bases ("frozen") and the tenant's ("adapted"); "warm" as in (a), from a tenant adapted on clean text.
(c) Cost. Real servers under the same loads (many tenants, and one), in rotating order (COST_SERVERS):
    `STAR_ADAPTATION=async` with the product's settings (every forward captured; on a CPU, in an
    adaptation process of its own, which also runs the quality gate), the same without the gate, capturing
    a quarter of the forwards (`STAR_ADAPTATION_SAMPLE_RATE`), with the adaptation in the serving process
    (`STAR_ADAPTATION_PROCESS=off`), `shadow` and `off`; median tokens/s and the ratios to `off`; the
    median and p99 token-to-commit lag from each adapting server's histogram, and how many tenants
    committed a version.

Settings. (a) takes one GHA step per round, with the product's learning rate (0.05) and step cap (0.05),
but opens the distance and orthogonality guardrails (1.0 and 1.5 instead of 0.5 and 0.25): V Qᵀ lies
0.5 (θ = 60°) to 0.96 (180°) from V in projection distance (`ceiling_distance` in the JSON), so the
default distance cap lets a tenant follow rotations up to about 60° only; the path there from a converged,
near-orthonormal basis is 0.4 (90°) to 1.0 (180°) less orthonormal, which the defaults would retract onto
orthonormal bases on the way and the open tolerance leaves as GHA takes it. (b) and (c) use the product's
defaults; the sampled server of (c) shows what sampling saves, and what it costs the tenants.

The results on the demo models, and what they mean, are in docs/bench/adaptation.md and the README.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adaptation import AdaptationConfig, Adapter, Guardrails, LocalDirStore, Observer, TenantBank
from ..engine import BatcherConfig, ClassificationEngine
from ..model import StarMoeForCausalLM, StarMoeForSequenceClassification, projection_distance
from ..model.inputs import pad_right
from ..model.loading import load_model
from ..model.router import StarMoeRouter
from .corruptions import CORRUPTIONS, corrupt
from .cost import ADAPTING, COST_SERVERS, cost
from .report import write_report

# -- (a) rotations and routing ------------------------------------------------------------------------


def rotation(dim: int, degrees: float, seed: int = 0) -> torch.Tensor:
    """Q(θ) = exp(θ A) (D, D), A a fixed (per seed) random skew-symmetric matrix of spectral norm 1, so
    that θ (up to 180°) is the largest angle by which Q turns any vector. θ = 0 gives the identity exactly."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    a = m - m.T
    a = a / torch.linalg.matrix_norm(a, ord=2)
    return torch.linalg.matrix_exp(math.radians(degrees) * a).float()


def turning_angle(x: torch.Tensor, q: torch.Tensor) -> float:
    """Mean angle (degrees) between the rows of `x` (N, D) and their images `x Qᵀ`."""
    cos = torch.nn.functional.cosine_similarity(x.double(), x.double() @ q.double().T, dim=-1)
    return float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).mean())


@torch.no_grad()
def route(router: StarMoeRouter, x: torch.Tensor, basis: torch.Tensor, k: int, subspace: bool = False) -> torch.Tensor:
    """Top-k expert choices (N, k) of tokens `x` (N, D) through one layer's router with `basis` (E, D),
    as the MoE block chooses them (softmax over all experts, then top-k). With `subspace`, through the
    gate's subspace half alone, x (R V)^T: what a `star_gha_only` router with this R routes by."""
    half = router.star_gate.mixing_coef @ basis if subspace else None  # R V (E, D)
    logits = x @ half.T if half is not None else router(x[None], bases=basis)[0]  # (N, E)
    return torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1).indices


def routing_consistency(reference: torch.Tensor, shifted: torch.Tensor) -> float:
    """Share of tokens whose set of top-k experts (N, k) is the same in both."""
    same = (reference.sort(dim=-1).values == shifted.sort(dim=-1).values).all(dim=-1)
    return float(same.float().mean())


@torch.no_grad()
def router_inputs(model: Any, tokenizer: Any, texts: Sequence[str], seq_len: int) -> list[torch.Tensor]:
    """Each MoE layer's router inputs L x (N, D) for the real tokens of `texts` (each cut to `seq_len`)."""
    ids = [tokenizer(t)["input_ids"][:seq_len] or [tokenizer.eos_token_id] for t in texts]
    layers: list[list[torch.Tensor]] = []
    for start in range(0, len(ids), 16):
        batch, mask = pad_right(ids[start : start + 16], tokenizer.pad_token_id or 0)
        out = model(input_ids=batch, attention_mask=mask, output_routing=True)
        real = mask.bool()
        for i, layer in enumerate(out.router_inputs):
            if start == 0:
                layers.append([])
            layers[i].append(layer[real].float())
    return [torch.cat(chunks) for chunks in layers]


def _token_slices(model: Any, tokenizer: Any, docs: Sequence[str], sizes: Sequence[int], seq_len: int) -> list[Any]:
    """Disjoint slices of held-out documents with at least `sizes[i]` tokens each, as router inputs."""
    slices, at = [], 0
    for size in sizes:
        taken, count = [], 0
        while count < size and at < len(docs):
            taken.append(docs[at])
            count += min(seq_len, len(tokenizer(docs[at])["input_ids"]))
            at += 1
        inputs = router_inputs(model, tokenizer, taken, seq_len)
        slices.append([x[:size] for x in inputs])
    return slices


async def _adapt_rotated(
    adapter: Adapter,
    bank: TenantBank,
    tenant: str,
    routers: list[StarMoeRouter],
    inputs: list[torch.Tensor],  # L x (N, D)
    rounds: int,
    chunk: int,
    k: int,
) -> torch.Tensor:
    """Feeds `inputs` as the tenant's traffic, `chunk` tokens per forward as an engine would, then
    flushes (one GHA step per round); `rounds` times. Returns the tenant's bases (L, E, D) afterwards."""
    await adapter.describe(tenant)  # loads the tenant (version 0) before its first tokens
    for _ in range(rounds):
        for start in range(0, inputs[0].shape[0], chunk):
            bases, version = _tenant_bases(bank, tenant)
            piece = [x[start : start + chunk] for x in inputs]
            load = torch.stack(
                [
                    torch.bincount(route(r, x, b, k).reshape(-1), minlength=b.shape[0])
                    for r, x, b in zip(routers, piece, bases, strict=True)
                ]
            )  # (L, E)
            adapter.observe(tenant, version, bases, piece, load)
        await adapter.flush()
    return _tenant_bases(bank, tenant)[0].clone()


def _tenant_bases(bank: TenantBank, tenant: str) -> tuple[torch.Tensor, int]:
    """The bases (L, E, D) the tenant routes with now, and their version."""
    view = bank.lookup([tenant])
    assert view.routing.bank is not None and view.routing.index is not None
    return view.routing.bank[view.routing.index[0]], view.versions[0]


def _consistency(
    routers: list[StarMoeRouter],
    inputs: list[torch.Tensor],
    reference: list[torch.Tensor],
    bases: torch.Tensor,
    k: int,
    subspace: bool = False,
) -> list[float]:
    """Per layer: routing consistency of `inputs` (L x (N, D)) routed with `bases` (L, E, D) vs `reference`."""
    return [
        routing_consistency(ref, route(r, x, b, k, subspace))
        for r, x, ref, b in zip(routers, inputs, reference, bases, strict=True)
    ]


async def rotation_shift(
    model: StarMoeForCausalLM, tokenizer: Any, cfg: AdaptationBenchConfig, store_dir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    from ..training.corpus import lm_corpus

    _, heldout = lm_corpus()
    evaluation, adaptation = _token_slices(model, tokenizer, heldout, (cfg.eval_tokens, cfg.adapt_tokens), 128)
    routers = [layer.mlp.router for layer in model.model.decoder_layers()]
    k = model.config.num_experts_per_tok
    trained = model.trained_bases()  # (L, E, D)
    config = AdaptationConfig(
        mode="async",
        learning_rate=cfg.rotation_learning_rate,
        min_tokens=1 << 30,  # no step on the way: one per round, at its flush
        guard=cfg.rotation_guard,
    )
    turns = {a: rotation(trained.shape[-1], a, cfg.seed) for a in cfg.angles}  # (D, D) each

    async def adapt_all(start: torch.Tensor, name: str, warmup: int) -> tuple[dict[float, torch.Tensor], Any]:
        """A deployment whose bases are `start`: one tenant per angle adapted on its rotated traffic, and
        (`warmup` > 0) one tenant adapted on unrotated traffic."""
        bank = TenantBank(start, torch.device("cpu"), torch.float32)
        adapter = Adapter(name, start, bank, LocalDirStore(store_dir / name), config)
        adapter.start()
        try:
            adapted = {}
            for angle, q in turns.items():
                turned = [x @ q.T for x in adaptation]
                adapted[angle] = await _adapt_rotated(
                    adapter, bank, f"rot-{angle:g}", routers, turned, cfg.rounds, 512, k
                )
            warm = None
            if warmup:
                warm = await _adapt_rotated(adapter, bank, "warm-up", routers, adaptation, warmup, 512, k)
            return adapted, warm
        finally:
            await adapter.stop()

    started = time.perf_counter()
    cold, warm_start = await adapt_all(trained, "cold", cfg.warmup_rounds)
    log(f"  trained bases: {len(cfg.angles)} tenants x {cfg.rounds} rounds ({time.perf_counter() - started:.0f} s)")
    assert warm_start is not None
    started = time.perf_counter()
    warm, _ = await adapt_all(warm_start, "warm", 0)
    log(f"  warm tenants: {len(cfg.angles)} tenants x {cfg.rounds} rounds ({time.perf_counter() - started:.0f} s)")

    reference = [route(r, x, b, k) for r, x, b in zip(routers, evaluation, trained, strict=True)]
    warm_reference = [route(r, x, b, k) for r, x, b in zip(routers, evaluation, warm_start, strict=True)]
    # The subspace half alone, whose whole input is V x: there the ceiling V Qᵀ restores every choice.
    half_reference = [route(r, x, b, k, True) for r, x, b in zip(routers, evaluation, warm_start, strict=True)]
    angles: dict[str, Any] = {}
    for angle, q in turns.items():
        rotated = [x @ q.T for x in evaluation]
        per_layer = {
            "frozen": _consistency(routers, rotated, reference, trained, k),
            "adapted": _consistency(routers, rotated, reference, cold[angle], k),
            "ceiling": _consistency(routers, rotated, reference, trained @ q.T, k),
            "warm_frozen": _consistency(routers, rotated, warm_reference, warm_start, k),
            "warm_adapted": _consistency(routers, rotated, warm_reference, warm[angle], k),
            "warm_ceiling": _consistency(routers, rotated, warm_reference, warm_start @ q.T, k),
            "warm_half_frozen": _consistency(routers, rotated, half_reference, warm_start, k, subspace=True),
            "warm_half_adapted": _consistency(routers, rotated, half_reference, warm[angle], k, subspace=True),
        }
        row: dict[str, Any] = {name: statistics.fmean(values) for name, values in per_layer.items()}
        row["per_layer"] = per_layer
        row["mean_token_turn_degrees"] = turning_angle(evaluation[0], q)
        # How far the exact compensation V Qᵀ lies from V: what the distance guardrail must allow.
        row["ceiling_distance"] = {
            "trained": [projection_distance(v @ q.T, v) for v in trained],
            "warm": [projection_distance(v @ q.T, v) for v in warm_start],
        }
        row["drift"] = {
            "adapted": [projection_distance(v, t) for v, t in zip(cold[angle], trained, strict=True)],
            "warm_adapted": [projection_distance(v, t) for v, t in zip(warm[angle], warm_start, strict=True)],
        }
        angles[f"{angle:g}"] = row
        log(
            f"  {angle:g}°: frozen {row['frozen']:.3f}, adapted {row['adapted']:.3f}, ceiling {row['ceiling']:.3f}"
            f" | warm: frozen {row['warm_frozen']:.3f}, adapted {row['warm_adapted']:.3f},"
            f" ceiling {row['warm_ceiling']:.3f} | subspace half: frozen {row['warm_half_frozen']:.3f},"
            f" adapted {row['warm_half_adapted']:.3f}"
        )
    return {
        "eval_tokens": evaluation[0].shape[0],
        "adapt_tokens": adaptation[0].shape[0],
        "warm_start_drift": [projection_distance(v, t) for v, t in zip(warm_start, trained, strict=True)],
        "angles": angles,
    }


# -- (b) the classifier under corruption --------------------------------------------------------------


async def _settle(adapter: Adapter, bank: TenantBank, tenants: Sequence[str], timeout: float = 30.0) -> None:
    """Flushes until no tenant's version moves any more, so that statistics already on their way to the
    worker when the traffic ended are committed too."""
    deadline = time.monotonic() + timeout
    before: list[int] = []
    while time.monotonic() < deadline:
        await adapter.flush()
        await asyncio.sleep(0.3)
        now = [bank.version(t) for t in tenants]
        if now == before:
            return
        before = now


async def _adapt_classifier(
    model: StarMoeForSequenceClassification,
    tokenizer: Any,
    start: torch.Tensor,  # (L, E, D): the deployment's bases
    traffic: dict[str, list[list[str]]],  # tenant -> its passes of texts
    store_dir: Path,
) -> TenantBank:
    """Serves every tenant's traffic concurrently through a `ClassificationEngine` with an `Adapter`
    (product defaults); returns the bank with the versions committed by then."""
    bank = TenantBank(start, torch.device("cpu"), torch.float32, capacity=len(traffic) + 1, fold=model.router_gates)
    adapter = Adapter(store_dir.name, start, bank, LocalDirStore(store_dir), AdaptationConfig(mode="async"))
    sink = Observer(adapter, model.config.num_local_experts)
    engine = ClassificationEngine(model, tokenizer, bank, BatcherConfig(max_batch=32, max_waiting=4096), sink=sink)
    adapter.start()
    engine.start()

    async def send(tenant: str, passes: list[list[str]]) -> None:
        for texts in passes:
            for i in range(0, len(texts), 8):  # requests of 8 paragraphs
                await engine.classify(texts[i : i + 8], tenant)

    try:
        await asyncio.gather(*(send(tenant, passes) for tenant, passes in traffic.items()))
        engine.stop()  # its last forwards are captured
        await _settle(adapter, bank, list(traffic))
    finally:
        engine.stop()
        await adapter.stop()
    return bank


async def _accuracies(
    model: StarMoeForSequenceClassification,
    tokenizer: Any,
    bank: TenantBank,
    jobs: dict[str, tuple[str, list[str]]],  # key -> (tenant, texts)
    labels: list[int],
) -> dict[str, float]:
    """Accuracy of each job's texts classified as its tenant, by an engine without an adapter."""
    engine = ClassificationEngine(model, tokenizer, bank, BatcherConfig(max_batch=32, max_waiting=1 << 16))
    engine.start()
    names = [model.config.id2label[y] for y in labels]
    try:
        results = await asyncio.gather(*(engine.classify(texts, tenant) for tenant, texts in jobs.values()))
    finally:
        engine.stop()
    return {
        key: sum(r.label == y for r, y in zip(found, names, strict=True)) / len(names)
        for key, found in zip(jobs, results, strict=True)
    }


async def corruption_shift(
    model: StarMoeForSequenceClassification,
    tokenizer: Any,
    cfg: AdaptationBenchConfig,
    store_dir: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    from ..training.corpus import classifier_dataset

    _, heldout, _ = classifier_dataset()
    half = len(heldout) // 2
    evaluation, adaptation = heldout[:half], [text for text, _ in heldout[half:]]
    labels = [y for _, y in evaluation]
    cells = [("clean", 0)] + [(c, s) for c in cfg.corruptions for s in cfg.severities]
    tenant = {cell: f"{cell[0]}-{cell[1]}" for cell in cells}
    traffic = {
        tenant[cell]: [
            [corrupt(t, cell[0], cell[1], seed=cfg.seed + 1 + p) for t in adaptation] for p in range(cfg.passes)
        ]
        for cell in cells
    }
    tests = {cell: [corrupt(t, cell[0], cell[1], seed=cfg.seed) for t, _ in evaluation] for cell in cells}

    started = time.perf_counter()
    trained = model.trained_bases()
    warmup = {"warm-up": [adaptation] * cfg.warmup_passes} if cfg.warmup_passes else {}
    bank = await _adapt_classifier(model, tokenizer, trained, {**traffic, **warmup}, store_dir / "cold")
    jobs = {f"{tenant[c]}/frozen": ("frozen", tests[c]) for c in cells}
    jobs |= {f"{tenant[c]}/adapted": (tenant[c], tests[c]) for c in cells}
    found = await _accuracies(model, tokenizer, bank, jobs, labels)
    log(f"  trained bases: {len(cells)} tenants, {cfg.passes} passes ({time.perf_counter() - started:.0f} s)")
    if warmup:
        started = time.perf_counter()
        warm_start = _tenant_bases(bank, "warm-up")[0].clone()
        bank = await _adapt_classifier(model, tokenizer, warm_start, traffic, store_dir / "warm")
        jobs = {f"{tenant[c]}/warm_frozen": ("frozen", tests[c]) for c in cells}
        jobs |= {f"{tenant[c]}/warm_adapted": (tenant[c], tests[c]) for c in cells}
        found |= await _accuracies(model, tokenizer, bank, jobs, labels)
        log(f"  warm tenants: {len(cells)} tenants, {cfg.passes} passes ({time.perf_counter() - started:.0f} s)")

    kinds = ["frozen", "adapted"] + (["warm_frozen", "warm_adapted"] if warmup else [])
    table: dict[str, dict[str, dict[str, float]]] = {}
    for cell in cells:
        table.setdefault(cell[0], {})[str(cell[1])] = {kind: found[f"{tenant[cell]}/{kind}"] for kind in kinds}
        log(f"  {cell[0]} {cell[1]}: " + ", ".join(f"{kind} {found[f'{tenant[cell]}/{kind}']:.3f}" for kind in kinds))
    shifted = [cell for cell in cells if cell[1] > 0]
    return {
        "eval_inputs": len(evaluation),
        "adapt_inputs": len(adaptation),
        "cells": table,
        "mean": {kind: statistics.fmean(table[c][str(s)][kind] for c, s in shifted) for kind in kinds},
        "adaptation": asdict(AdaptationConfig(mode="async")),  # the product's defaults, adapted bases served
    }


# -- the run ------------------------------------------------------------------------------------------


def _open_guardrails() -> Guardrails:
    """Part (a)'s guardrails: the product's step cap, but room for the basis to follow a large rotation
    (the product's distance cap, 0.5, refuses it beyond about 60 degrees; the orthogonality tolerance is
    opened too, so that GHA's own path is measured, not its retraction)."""
    return Guardrails(max_distance=1.0, orthogonality_tolerance=1.5)


@dataclass(frozen=True)
class AdaptationBenchConfig:
    lm_dir: Path
    classifier_dir: Path
    out_dir: Path
    seed: int = 0
    # (a) rotation shift: one GHA step (product learning rate and step cap) per round of adapt_tokens
    angles: tuple[float, ...] = (0, 15, 30, 45, 60, 90, 135, 180)
    eval_tokens: int = 2048
    adapt_tokens: int = 4096
    rounds: int = 100
    warmup_rounds: int = 400  # the warm start: a tenant adapted on unrotated traffic this many rounds
    rotation_learning_rate: float = 0.05
    rotation_guard: Guardrails = field(default_factory=_open_guardrails)
    # (b) corruption shift: product adaptation settings throughout
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = (1, 3, 5)
    passes: int = 2  # passes of each tenant over its adaptation paragraphs
    warmup_passes: int = 8  # the warm start: clean passes of one tenant (0: no warm variant)
    # (c) cost
    requests: int = 128
    max_tokens: int = 64
    concurrency: int = 32
    tenants: int = 32
    repeats: int = 9


def run_adaptation_bench(cfg: AdaptationBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    results: dict[str, Any] = {
        "config": _plain(cfg.__dict__),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "device": "cpu"},
        "timings_s": {},
    }
    lm, lm_tokenizer = load_model(cfg.lm_dir, "generate", torch.device("cpu"), torch.float32)
    classifier, clf_tokenizer = load_model(cfg.classifier_dir, "classify", torch.device("cpu"), torch.float32)
    assert isinstance(lm, StarMoeForCausalLM) and isinstance(classifier, StarMoeForSequenceClassification)
    with tempfile.TemporaryDirectory(prefix="star-bench-") as tmp:
        log("(a) rotation shift: routing consistency, frozen vs adapted")
        started = time.perf_counter()
        results["rotation"] = asyncio.run(rotation_shift(lm, lm_tokenizer, cfg, Path(tmp) / "rotation", log))
        results["timings_s"]["rotation"] = time.perf_counter() - started
        log("(b) corruption shift: classifier accuracy, frozen vs adapted")
        started = time.perf_counter()
        results["corruption"] = asyncio.run(
            corruption_shift(classifier, clf_tokenizer, cfg, Path(tmp) / "corruption", log)
        )
        results["timings_s"]["corruption"] = time.perf_counter() - started
    log("(c) cost: server throughput, adaptation on vs off")
    started = time.perf_counter()
    results["cost"] = cost(cfg, log)
    results["timings_s"]["cost"] = time.perf_counter() - started
    write_report(cfg.out_dir, "adaptation", results, _table(results, cfg), _plot(results, cfg))
    return results


def _plain(value: Any) -> Any:
    """JSON-ready config values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return value.name  # the model's or the output's name: a report does not carry this machine's paths
    if isinstance(value, Guardrails):
        return dict(value.__dict__)
    if isinstance(value, tuple):
        return list(value)
    return value


def _table(results: dict[str, Any], cfg: AdaptationBenchConfig) -> str:
    rot, corr, c = results["rotation"], results["corruption"], results["cost"]
    lines = [
        "### (a) Rotation shift: routing consistency (demo LM, mean over its 4 MoE layers)",
        "",
        "| largest angle θ | mean token turn | frozen | adapted | ceiling V·Qᵀ | warm: frozen | warm: adapted "
        "| warm: ceiling | warm, subspace half: frozen | warm, subspace half: adapted |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    columns = ("frozen", "adapted", "ceiling", "warm_frozen", "warm_adapted", "warm_ceiling")
    for angle, r in rot["angles"].items():
        values = " | ".join(f"{r[k]:.3f}" for k in (*columns, "warm_half_frozen", "warm_half_adapted"))
        lines.append(f"| {angle}° | {r['mean_token_turn_degrees']:.1f}° | {values} |")
    lines += [
        "",
        f"{rot['eval_tokens']} evaluation tokens; {rot['adapt_tokens']} other tokens as each tenant's traffic, "
        f"{cfg.rounds} rounds of one GHA step (learning rate {cfg.rotation_learning_rate}, step cap "
        f"{cfg.rotation_guard.max_step}, distance cap {cfg.rotation_guard.max_distance}). Warm: a deployment "
        f"whose bases are those of a tenant adapted {cfg.warmup_rounds} rounds on unrotated traffic, compared "
        "with its own unrotated routing. Subspace half: the same bases routing through x (R V)ᵀ alone, the "
        "gate of a `star_gha_only` router, whose ceiling is 1 at every angle.",
        "",
        "### (b) Corruption shift: classifier accuracy, frozen → adapted (demo classifier)",
        "",
    ]
    kinds = list(corr["mean"])
    pairs = [("frozen", "adapted")] + ([("warm_frozen", "warm_adapted")] if "warm_frozen" in kinds else [])
    for frozen, adapted in pairs:
        title = "trained bases" if frozen == "frozen" else "warm start"
        lines += [
            f"| {title} | " + " | ".join(f"severity {s}" for s in cfg.severities) + " |",
            "|---|" + "---:|" * len(cfg.severities),
        ]
        for name in cfg.corruptions:
            cells = corr["cells"][name]
            row = " | ".join(f"{cells[str(s)][frozen]:.3f} → {cells[str(s)][adapted]:.3f}" for s in cfg.severities)
            lines.append(f"| {name} | {row} |")
        clean = corr["cells"]["clean"]["0"]
        lines += [
            f"| clean (severity 0) | {clean[frozen]:.3f} → {clean[adapted]:.3f} |" + " |" * (len(cfg.severities) - 1),
            f"| **mean over corruptions** | **{corr['mean'][frozen]:.3f} → {corr['mean'][adapted]:.3f}** |"
            + " |" * (len(cfg.severities) - 1),
            "",
        ]
    lines += [
        f"{corr['eval_inputs']} held-out paragraphs for evaluation; the other {corr['adapt_inputs']}, corrupted "
        f"anew on each of {cfg.passes} passes, as each tenant's unlabeled traffic. Warm start: a tenant adapted on "
        f"{cfg.warmup_passes} clean passes.",
        "",
        "### (c) Cost: server throughput, adaptation on vs off",
        "",
        "| load | "
        + " | ".join(f"{label} tokens/s" for _, label in COST_SERVERS.values())
        + " | "
        + " | ".join(f"{COST_SERVERS[m][1]} / `off`" for m in ADAPTING)
        + " |",
        "|---|" + "---:|" * (len(COST_SERVERS) + len(ADAPTING)),
    ]
    for n, load in c["loads"].items():
        speeds = " | ".join(f"{load[m]['median_tokens_per_s']:.0f}" for m in COST_SERVERS)
        ratios = " | ".join(f"{load['ratios_to_off'][m]:.2f}" for m in ADAPTING)
        lines.append(f"| {n} tenant{'s' if n != '1' else ''} | {speeds} | {ratios} |")
    lines.append("")
    for mode in ADAPTING:
        lag = c["token_to_commit_lag_s"][mode]
        seconds = " / ".join("n/a" if lag[q] is None else f"{lag[q]:.2f} s" for q in ("median", "p99"))
        versions = [v for v in c["tenant_versions_after"][mode] if v is not None]
        tokens = c.get("captured_tokens", {}).get(mode, {})
        lines.append(
            f"{COST_SERVERS[mode][1]}: token-to-commit lag, median / p99 over {lag['commits']} commits, "
            f"**{seconds}**; {sum(v > 0 for v in versions)} of {len(versions)} tenants committed a version; "
            f"{tokens.get('sampled', 0):,.0f} tokens captured, {tokens.get('dropped', 0):,.0f} dropped."
        )
    lines += [
        "",
        "Lags from each server's `star_adaptation_lag_seconds` histogram, interpolated within buckets as "
        f"`histogram_quantile`. {cfg.requests} requests of {cfg.max_tokens} tokens (greedy, `ignore_eos`) from "
        f"{cfg.concurrency} concurrent clients, request i as tenant i mod the load's tenants; the servers "
        f"side by side, in an order rotated every repeat; tokens/s are medians of {cfg.repeats} runs, ratios "
        "medians of each repeat's ratio.",
    ]
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], cfg: AdaptationBenchConfig) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        fig = ax.figure
        fig.set_size_inches(12, 4.5)
        grid = fig.add_gridspec(1, 2)
        ax.set_subplotspec(grid[0])
        _draw_rotation(ax, results["rotation"])
        _draw_corruption(fig.add_subplot(grid[1]), results["corruption"], cfg)

    return draw


def _draw_corruption(ax: Any, corr: dict[str, Any], cfg: AdaptationBenchConfig) -> None:
    severities = [0, *cfg.severities]
    clean = corr["cells"]["clean"]["0"]
    for i, name in enumerate(cfg.corruptions):
        for kind, style in (("frozen", "--"), ("adapted", "o-")):
            values = [clean[kind]] + [corr["cells"][name][str(s)][kind] for s in cfg.severities]
            ax.plot(severities, values, style, color=f"C{i}", label=name if kind == "adapted" else None)
    ax.plot([], [], "k--", label="frozen")
    ax.plot([], [], "ko-", label="adapted")
    ax.set_xticks(severities)
    ax.set_xlabel("severity")
    ax.set_ylabel("accuracy")
    ax.set_title("(b) Demo classifier under corruption")
    ax.legend(fontsize=7)


def _draw_rotation(ax: Any, rot: dict[str, Any]) -> None:
    angles = [float(a) for a in rot["angles"]]
    for kind, style, label in (
        ("frozen", "C0--", "trained bases, frozen"),
        ("adapted", "C0o-", "trained bases, adapted"),
        ("ceiling", "C0:", "trained bases, ceiling V·Qᵀ"),
        ("warm_frozen", "C1--", "warm start, frozen"),
        ("warm_adapted", "C1o-", "warm start, adapted"),
        ("warm_ceiling", "C1:", "warm start, ceiling"),
        ("warm_half_frozen", "C2--", "warm start, subspace half, frozen"),
        ("warm_half_adapted", "C2o-", "warm start, subspace half, adapted"),
    ):
        ax.plot(angles, [r[kind] for r in rot["angles"].values()], style, label=label)
    ax.set_xticks(angles)
    ax.set_xlabel("largest rotation angle θ (degrees)")
    ax.set_ylabel("routing consistency")
    ax.set_title("(a) Demo LM routers under rotation")
    ax.legend(fontsize=7)
