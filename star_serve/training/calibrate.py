"""Calibration: a trained model's GHA bases moved to GHA's fixed point on its training data, and the rest of
the model fine-tuned to agree with them.

Test-time GHA carries any basis to the fixed point of the inputs it sees. Training leaves the bases short
of it (the in-forward Hebbian step is small and its inputs move as the model learns), so without
calibration every tenant, even one whose traffic is the training distribution, first drifts to that
fixed point and pays for it in loss: the rest of the model was trained against the unconverged bases.

Sanger's rule on inputs of second moment C has its stable fixed point at C's top-E eigenvectors in order
of eigenvalue (there `dV = V C - tril(V C Vᵀ) V` vanishes). So each pass here routes the training data
with the current bases, sums every MoE layer's router-input second moment (clipped as the server clips
them), and sets the layer's basis to those eigenvectors directly; the mixing matrix R is refit by least
squares so that the subspace gate's logits on those inputs move as little as they can. Layer l's inputs
depend on the routing below it, so passes repeat until no basis moves more than `tolerance` (projection
distance) between two passes. Then a short fine-tune of everything but V (W, R, a, the experts and the
rest) makes the weights agree with the calibrated bases; the two alternate for `rounds` rounds, and a
last solve leaves the bases at the fixed point of the fine-tuned model.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import Settings
from ..model import StarMoePreTrainedModel, projection_distance
from ..model.gha import gha_update
from ..model.router import StarMoeRouter
from .presets import Preset

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CalibrationConfig:
    tolerance: float = 0.01  # projection distance between passes under which a basis has stopped moving
    max_passes: int = 12  # per solve
    rounds: int = 2  # solve + fine-tune
    finetune_steps: int = 150  # per round
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    pass_tokens: int = 131_072  # training tokens one solve pass routes
    max_token_norm: float = Settings.default("max_token_norm")  # as the server clips router inputs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _routers(model: StarMoePreTrainedModel) -> list[StarMoeRouter]:
    routers = model._routers()
    if not routers[0].uses_subspace:
        raise ValueError(f"router_type {model.config.router_type!r} has no GHA subspace to calibrate")
    return routers


def _router_inputs(model: StarMoePreTrainedModel, batch: Batch) -> list[torch.Tensor]:
    """Each MoE layer's router inputs (N, D) for the real tokens of `batch`, in float32."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), output_routing=True)
    mask = batch.get("attention_mask")
    return [(x[mask.bool()] if mask is not None else x.reshape(-1, x.shape[-1])).float() for x in out.router_inputs]


def _clip(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    norms = x.norm(dim=-1, keepdim=True)
    return x * (max_norm / norms).clamp(max=1.0)


@torch.no_grad()
def second_moments(model: StarMoePreTrainedModel, batches: Sequence[Batch], max_token_norm: float) -> torch.Tensor:
    """Every MoE layer's router-input second moment `XᵀX / N` (L, D, D) in float64, routed as the model is."""
    model.eval()
    sums: torch.Tensor | None = None
    tokens = 0
    for batch in batches:
        inputs = [_clip(x, max_token_norm).double() for x in _router_inputs(model, batch)]
        moment = torch.stack([x.T @ x for x in inputs])
        sums = moment if sums is None else sums + moment
        tokens += inputs[0].shape[0]
    if sums is None or tokens == 0:
        raise ValueError("calibration needs at least one token")
    return sums / tokens


def fixed_point(moment: torch.Tensor, num_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GHA's stable fixed point for inputs of second moment `moment` (D, D): the top eigenvectors (E, D) in
    order of eigenvalue, and those eigenvalues (E,)."""
    values, vectors = torch.linalg.eigh(moment)  # ascending
    top = torch.arange(moment.shape[-1] - 1, moment.shape[-1] - 1 - num_components, -1)
    return vectors[:, top].T.contiguous(), values[top]


@torch.no_grad()
def _move_to(router: StarMoeRouter, basis: torch.Tensor, eigenvalues: torch.Tensor, moment: torch.Tensor) -> None:
    """Sets the router's basis to `basis` (eigenvectors of `moment`) and refits R so that the subspace
    gate's logits on inputs of that second moment change least: R' = R V C V'ᵀ diag(1/λ)."""
    old = router.basis.double()
    signs = torch.sign((basis @ old.T).gather(1, (basis @ old.T).abs().argmax(1, keepdim=True))).squeeze(1)
    basis = basis * torch.where(signs == 0, 1.0, signs)[:, None]  # sign kept close to the old rows: cosmetic
    mixing = router.star_gate.mixing_coef
    refit = mixing.double() @ old @ moment @ basis.T / eigenvalues.clamp_min(1e-12)
    mixing.copy_(refit.to(mixing.dtype))
    router.basis.copy_(basis.to(router.basis.dtype))


def solve_bases(
    model: StarMoePreTrainedModel, batches: Sequence[Batch], config: CalibrationConfig, bar: tqdm | None = None
) -> list[float]:
    """Passes of fixed-point solves until no basis moves `tolerance` between passes. Returns each pass's
    largest move over the layers (projection distance)."""
    routers = _routers(model)
    moves: list[float] = []
    for _ in range(config.max_passes):
        moments = second_moments(model, batches, config.max_token_norm)
        before = [r.basis.detach().clone() for r in routers]
        for router, moment in zip(routers, moments, strict=True):
            basis, eigenvalues = fixed_point(moment, router.num_experts)
            _move_to(router, basis, eigenvalues, moment)
        moves.append(max(projection_distance(b, r.basis) for b, r in zip(before, routers, strict=True)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(moved=f"{moves[-1]:.4f}")
        if moves[-1] < config.tolerance:
            break
    return moves


@contextlib.contextmanager
def frozen_bases(model: StarMoePreTrainedModel) -> Iterator[None]:
    """Training-mode forwards leave V where it is (the in-forward Hebbian step off) for the duration."""
    routers = _routers(model)
    rates = [r.gha_learning_rate for r in routers]
    for router in routers:
        router.gha_learning_rate = 0.0
    try:
        yield
    finally:
        for router, rate in zip(routers, rates, strict=True):
            router.gha_learning_rate = rate


@torch.no_grad()
def gha_pass_distance(
    model: StarMoePreTrainedModel, batches: Sequence[Batch], learning_rate: float, max_token_norm: float
) -> float:
    """How far one pass of Sanger steps (one per batch, at `learning_rate`, on clipped router inputs) moves
    the bases, largest over the layers; the model itself is left unchanged."""
    model.eval()
    routers = _routers(model)
    start = [r.basis.detach().clone() for r in routers]
    try:
        for batch in batches:
            for router, x in zip(routers, _router_inputs(model, batch), strict=True):
                router.basis.copy_(gha_update(router.basis, _clip(x, max_token_norm), learning_rate))
        return max(projection_distance(s, r.basis) for s, r in zip(start, routers, strict=True))
    finally:
        for router, basis in zip(routers, start, strict=True):
            router.basis.copy_(basis)


def calibrate(
    model: StarMoePreTrainedModel,
    passes: Sequence[Batch],
    next_batch: Callable[[torch.Generator], Batch] | None,
    preset: Preset,
    config: CalibrationConfig = CalibrationConfig(),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Calibrates `model` in place (see the module's docstring). `passes` are the batches one solve pass
    routes; `next_batch` draws fine-tuning batches (None: no fine-tune, bases only). Returns a summary."""
    from .trainer import fit  # the optimisation loop is the trainer's; calibration only freezes V around it

    rounds = config.rounds if next_batch is not None else 0
    summary: dict[str, Any] = {"config": config.to_dict(), "solves": []}
    finetune = replace(
        preset,
        name=f"{preset.name}-calibrate",
        steps=config.finetune_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        checkpoint_every=config.finetune_steps + 1,
    )
    with tqdm(desc="calibrate: fixed-point passes", disable=not progress, unit="pass") as bar:
        for round_ in range(rounds):
            summary["solves"].append(solve_bases(model, passes, config, bar))
            assert next_batch is not None
            with frozen_bases(model), tempfile.TemporaryDirectory(prefix="star-calibrate-") as tmp:
                fit(model, next_batch, finetune, Path(tmp), seed + round_, "calibrate: fine-tune (V frozen)", progress)
        summary["solves"].append(solve_bases(model, passes, config, bar))
    model.eval()
    summary["final_move"] = summary["solves"][-1][-1]
    summary["converged"] = summary["final_move"] < config.tolerance
    summary["gha_pass_distance"] = gha_pass_distance(
        model, passes, model.config.gha_learning_rate, config.max_token_norm
    )
    return summary
