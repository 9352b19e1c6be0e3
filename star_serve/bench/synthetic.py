"""`star-serve bench synthetic`: the paper's controlled setup, where which expert is right is set by which
subspace an input lies in, and a shift moves those subspaces.

The task. Inputs x in R^D come from `experts` clusters. Cluster e has a mean along its own direction u_e
(lengths `means`, distinct, so that the cluster directions are the leading eigenvectors of the inputs'
uncentred correlation, in order) plus a content part c in a plane U shared by every cluster, plus
isotropic noise. The label is the side of c on which a rule w_e of the cluster's own falls: w_e at angle
2πe/E, so the rules of clusters e and e + E/2 are opposite and an expert that serves two clusters cannot
be right for both. A classifier (one MoE block of the product's router and SwiGLU experts, then a linear
head) is right only where it routes each cluster to the expert that learned its rule.

The shift. Q(t) = exp(t log P) on span{u}, the identity elsewhere, P the signed cycle u_e -> u_{e+1}
(u_{E-1} -> -u_0): at t = 1 each cluster's direction lies where the next one's was, and on the way every
direction has turned by the same angle (`turn`: 25°, 49°, 72° and 83° at t = 0.25, 0.5, 0.75 and 0.9 with
four clusters); the content plane and the rules do not move. The clusters' subspace moves within itself, so the
distance guardrail, which measures subspaces, lets a tenant follow it.

Measured, for each seed and shift, on `eval_samples` shifted inputs: the accuracy of a STAR classifier with
its trained bases ("frozen"), with the bases of a tenant whose traffic was `traffic_samples` other shifted
inputs fed through the product's `Adapter` with its defaults (one GHA step per 512 inputs; no quality gate,
which scores token sequences and this model reads vectors: "adapted"), and with V Qᵀ, the exact
compensation of the subspace ("ceiling"); and the same for a `star_gha_only` classifier and a classifier
with a linear router trained on the same data ("linear", which has nothing to adapt). The `star` gate's linear
half reads each input aligned to the tenant's subspace, as the product's does (`StarMoeRouter.align_linear`);
"W unaligned" is the same tenant through STAR.md's gate as written, whose linear half reads the shifted input.
"Routed as unshifted" routes each input as its unshifted twin would be routed while the experts read the
shifted input: what the shift took from the experts alone, the bound of any change of routing.
"Recovered" is (adapted − frozen) / (unshifted − frozen): the share of what the shift took that
adaptation gave back.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adaptation import AdaptationConfig, Adapter, LocalDirStore, TenantBank
from ..model.configuration import StarMoeConfig
from ..model.moe import MoeOutput, StarMoeSparseBlock
from ..model.router import switch_load_balancing_loss
from .adaptation import _tenant_bases
from .report import write_report

ROUTERS = ("star", "star_gha_only", "linear")


@dataclass(frozen=True)
class SyntheticTask:
    """The clusters, their rules and the shift, drawn from `seed`."""

    seed: int
    dim: int = 32
    experts: int = 4
    means: tuple[float, ...] = (3.0, 2.5, 2.0, 1.5)  # one per cluster
    content_scale: float = 0.5
    noise: float = 0.1

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        frame = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=gen))[0].T  # orthonormal rows
        e = self.experts
        angles = torch.arange(e) * (2 * math.pi / e)
        object.__setattr__(self, "directions", frame[:e])
        object.__setattr__(self, "content", frame[e : e + 2])
        object.__setattr__(self, "rules", torch.stack([angles.cos(), angles.sin()], dim=-1))

    directions: torch.Tensor = field(init=False, repr=False, compare=False)  # u (E, D)
    content: torch.Tensor = field(init=False, repr=False, compare=False)  # U (2, D)
    rules: torch.Tensor = field(init=False, repr=False, compare=False)  # w (E, 2)

    def sample(
        self, n: int, gen: torch.Generator, shift: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`n` inputs (n, D), their labels (n,) and clusters (n,); with `shift` (D, D), the cluster means turned."""
        cluster = torch.randint(0, self.experts, (n,), generator=gen)
        c = torch.randn(n, 2, generator=gen)
        mean = torch.tensor(self.means)[cluster, None] * self.directions[cluster]
        if shift is not None:
            mean = mean @ shift.T
        x = mean + self.content_scale * c @ self.content + self.noise * torch.randn(n, self.dim, generator=gen)
        label = ((c * self.rules[cluster]).sum(-1) > 0).long()
        return x, label, cluster

    def shift(self, t: float) -> torch.Tensor:
        """Q(t) (D, D): the cluster directions turned a fraction `t` of the way onto the next cluster's."""
        e = self.experts
        cycle = torch.zeros(e, e, dtype=torch.complex128)
        cycle[torch.arange(1, e), torch.arange(e - 1)] = 1
        cycle[0, e - 1] = -1  # a signed cycle: a rotation (det +1), so it has a real logarithm
        values, vectors = torch.linalg.eig(cycle)
        log = (vectors @ torch.diag(torch.log(values)) @ torch.linalg.inv(vectors)).real
        turn = torch.linalg.matrix_exp(t * log).float()  # (E, E), in the basis u
        u = self.directions
        return torch.eye(self.dim) + u.T @ (turn - torch.eye(e)) @ u

    def turn(self, t: float) -> float:
        """The angle (degrees) by which Q(t) turns each cluster's direction."""
        u = self.directions
        cosine = float((u @ self.shift(t).T * u).sum(-1).mean())
        return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


class SyntheticClassifier(nn.Module):
    """One MoE block (the product's router and experts, top-1) and a linear head over two labels."""

    def __init__(self, task: SyntheticTask, router_type: str, gha_learning_rate: float = 1e-2) -> None:
        super().__init__()
        config = StarMoeConfig(
            vocab_size=8,
            hidden_size=task.dim,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            num_local_experts=task.experts,
            num_experts_per_tok=1,
            router_type=router_type,
            gha_learning_rate=gha_learning_rate,
        )
        self.block = StarMoeSparseBlock(config)
        self.head = nn.Linear(task.dim, 2)
        for weight in self.block.experts.parameters():
            nn.init.normal_(weight, std=0.1)
        router = self.block.router
        if hasattr(router, "weight"):
            nn.init.normal_(router.weight, std=0.02)
        if router.uses_subspace:
            nn.init.orthogonal_(router.star_gate.mixing_coef)
            nn.init.zeros_(router.star_gate.alpha)
            nn.init.orthogonal_(router.star_gate.gha.basis)

    def forward(self, x: torch.Tensor, basis: torch.Tensor | None = None) -> tuple[torch.Tensor, MoeOutput]:
        """Label logits (n, 2) of inputs `x` (n, D), routed with the trained basis or `basis` (E, D)."""
        out = self.block(x[:, None], bases=basis)
        return self.head(out.hidden_states[:, 0]), out

    @torch.no_grad()
    def accuracy(
        self, x: torch.Tensor, label: torch.Tensor, basis: torch.Tensor | None = None, align_linear: bool = True
    ) -> float:
        """With `align_linear` False, the linear half of a `star` gate reads the inputs as they are."""
        router = self.block.router
        kept, router.align_linear = router.align_linear, align_linear
        try:
            logits, _ = self(x, basis)
        finally:
            router.align_linear = kept
        return float((logits.argmax(-1) == label).float().mean())

    @torch.no_grad()
    def accuracy_routed_as(self, x: torch.Tensor, twin: torch.Tensor, label: torch.Tensor) -> float:
        """Accuracy when the experts read `x` but each input is routed as `twin` (its unshifted twin) is."""
        logits = self.block.router(twin[:, None])
        weights, indices = torch.topk(torch.softmax(logits.float(), dim=-1), 1, dim=-1)
        out = self.block.experts(x, indices.reshape(-1, 1), weights.reshape(-1, 1))
        return float((self.head(out).argmax(-1) == label).float().mean())

    @torch.no_grad()
    def experts_of(self, x: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
        return self(x, basis)[1].expert_indices.reshape(-1)


def train_classifier(
    task: SyntheticTask, router_type: str, steps: int, batch: int = 256, weight_decay: float = 0.0
) -> SyntheticClassifier:
    """AdamW on cross-entropy plus the Switch load-balancing loss (1e-2); GHA steps inside the forward.
    With `weight_decay`, an expert's weights along directions its inputs never take decay away."""
    torch.manual_seed(task.seed)
    model = SyntheticClassifier(task, router_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(task.seed + 1)
    for _ in range(steps):
        x, label, _ = task.sample(batch, gen)
        logits, out = model(x)
        aux = switch_load_balancing_loss(out.router_logits, out.expert_indices.reshape(-1, 1))
        loss = F.cross_entropy(logits, label) + 1e-2 * aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


async def adapt(model: SyntheticClassifier, traffic: torch.Tensor, store_dir: Path, chunk: int = 512) -> torch.Tensor:
    """A tenant's bases (E, D) after `traffic` (N, D) went through the product's `Adapter` with its defaults,
    `chunk` inputs per forward as an engine would capture them, the worker flushed after each."""
    trained = model.block.router.basis.detach().float()[None]  # (L=1, E, D)
    bank = TenantBank(trained, torch.device("cpu"), torch.float32)
    adapter = Adapter("synthetic", trained, bank, LocalDirStore(store_dir), AdaptationConfig(mode="async"))
    adapter.start()
    try:
        await adapter.describe("shifted")  # loads the tenant (version 0) before its first inputs
        for start in range(0, traffic.shape[0], chunk):
            bases, version = _tenant_bases(bank, "shifted")
            piece = traffic[start : start + chunk]
            load = torch.bincount(model.experts_of(piece, bases[0]), minlength=trained.shape[1])
            adapter.observe("shifted", version, bases, [piece], load[None])
            await adapter.flush()
        return _tenant_bases(bank, "shifted")[0][0].clone()
    finally:
        await adapter.stop()


@dataclass(frozen=True)
class SyntheticBenchConfig:
    out_dir: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    shifts: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)  # t: the fraction of the way to the next cluster
    routers: tuple[str, ...] = ROUTERS
    train_steps: int = 1500
    # AdamW's, decoupled (2.0 x lr 3e-3: weights decay 0.6% a step), so that an expert's weights along
    # directions its inputs never take fade, and what the shift takes splits into routing and experts
    weight_decay: float = 2.0
    traffic_samples: int = 65_536
    eval_samples: int = 8_192


def run_synthetic_bench(cfg: SyntheticBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="star-synthetic-") as tmp:
        for seed in cfg.seeds:
            task = SyntheticTask(seed)
            started = time.perf_counter()
            models = {r: train_classifier(task, r, cfg.train_steps, weight_decay=cfg.weight_decay) for r in cfg.routers}
            log(f"seed {seed}: trained {', '.join(cfg.routers)} ({time.perf_counter() - started:.0f} s)")
            gen = torch.Generator().manual_seed(10_000 + seed)
            clean_x, clean_label, _ = task.sample(cfg.eval_samples, gen)
            clean = {r: m.accuracy(clean_x, clean_label) for r, m in models.items()}
            for t in cfg.shifts:
                q = task.shift(t)
                x, label, _ = task.sample(cfg.eval_samples, gen, q)
                traffic, _, _ = task.sample(cfg.traffic_samples, gen, q)
                for name, model in models.items():
                    run: dict[str, Any] = {"seed": seed, "shift": t, "turn_degrees": task.turn(t), "router": name}
                    run["unshifted"] = clean[name]
                    run["frozen"] = model.accuracy(x, label)
                    run["routed_as_unshifted"] = model.accuracy_routed_as(x, x @ q, label)  # Q orthogonal
                    if model.block.router.uses_subspace:
                        trained = model.block.router.basis.detach().float()
                        store = Path(tmp) / f"{seed}-{t:g}-{name}"
                        adapted = asyncio.run(adapt(model, traffic, store))
                        run["adapted"] = model.accuracy(x, label, adapted)
                        if name == "star":
                            run["adapted_unaligned"] = model.accuracy(x, label, adapted, align_linear=False)
                        run["ceiling"] = model.accuracy(x, label, trained @ q.T)
                        lost = run["unshifted"] - run["frozen"]
                        run["recovered"] = (run["adapted"] - run["frozen"]) / lost if lost > 0.01 else None
                    runs.append(run)
                log(f"  t = {t:g}: " + "; ".join(_describe(r) for r in runs if r["seed"] == seed and r["shift"] == t))
    summary = summarize(runs)
    results = {
        "config": {k: v for k, v in vars(cfg).items() if k != "out_dir"},
        "task": {k: getattr(SyntheticTask(0), k) for k in ("dim", "experts", "means", "content_scale", "noise")},
        "runs": runs,
        "summary": summary,
    }
    write_report(cfg.out_dir, "synthetic", results, _table(summary, cfg), _plot(summary))
    return results


def _describe(run: dict[str, Any]) -> str:
    text = f"{run['router']} {run['frozen']:.3f}"
    if "adapted" in run:
        text += f" -> {run['adapted']:.3f} (ceiling {run['ceiling']:.3f})"
    return text


COLUMNS = ("unshifted", "frozen", "adapted_unaligned", "adapted", "ceiling", "routed_as_unshifted", "recovered")


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float] | None]]]:
    """Per router and shift, each measure's median, smallest and largest over seeds (None where not measured)."""
    summary: dict[str, dict[str, dict[str, dict[str, float] | None]]] = {}
    for router in dict.fromkeys(r["router"] for r in runs):
        summary[router] = {}
        for t in dict.fromkeys(r["shift"] for r in runs):
            mine = [r for r in runs if r["router"] == router and r["shift"] == t]
            row: dict[str, dict[str, float] | None] = {}
            for column in COLUMNS:
                values = [r[column] for r in mine if r.get(column) is not None]
                row[column] = (
                    {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None
                )
            summary[router][f"{t:g}"] = row
    return summary


def _table(summary: dict[str, Any], cfg: SyntheticBenchConfig) -> str:
    def cell(value: dict[str, float] | None, percent: bool = False) -> str:
        if value is None:
            return "–"
        if percent:
            return f"{value['median']:.0%} ({value['min']:.0%} … {value['max']:.0%})"
        return f"{value['median']:.3f} ({value['min']:.3f} … {value['max']:.3f})"

    lines = [
        "| router | shift t (turn) | unshifted | frozen | adapted, W unaligned | adapted | ceiling (V Qᵀ) "
        "| routed as unshifted | recovered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for router, rows in summary.items():
        for t, row in rows.items():
            cells = [cell(row[c]) for c in COLUMNS[:-1]] + [cell(row["recovered"], percent=True)]
            turn = SyntheticTask(cfg.seeds[0]).turn(float(t))
            lines.append(f"| {router} | {t} ({turn:.0f}°) | " + " | ".join(cells) + " |")
    lines.append(
        f"\nAccuracy, medians (smallest … largest) over {len(cfg.seeds)} seeds, on {cfg.eval_samples:,} shifted "
        f"inputs; adapted after {cfg.traffic_samples:,} shifted inputs of traffic; trained with weight decay "
        f"{cfg.weight_decay:g}. Adapted: the product's gate, whose linear half reads each input aligned to the "
        "tenant's subspace; W unaligned: STAR.md's gate as written, whose linear half reads the shifted input as it "
        "is. Routed as unshifted: the experts read the shifted inputs, routed as their unshifted twins are. "
        "Recovered: (adapted − frozen) / (unshifted − frozen), where the shift took more than 0.01.\n"
    )
    return "\n".join(lines)


def _plot(summary: dict[str, Any]) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        for i, (router, rows) in enumerate(summary.items()):
            shifts = [float(t) for t in rows]
            ax.plot(shifts, [r["frozen"]["median"] for r in rows.values()], "o--", color=f"C{i}", label=f"{router}")
            if rows[next(iter(rows))]["adapted"] is not None:
                adapted = [r["adapted"]["median"] for r in rows.values()]
                ax.plot(shifts, adapted, "o-", color=f"C{i}", label=f"{router}, adapted")
        ax.set_xlabel("shift t (at 1, each cluster's direction lies where the next one's was)")
        ax.set_ylabel("accuracy")
        ax.set_title("Synthetic task: frozen (dashed) vs adapted (solid)")
        ax.legend(fontsize=8)

    return draw
