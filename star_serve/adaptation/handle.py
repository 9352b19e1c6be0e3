"""The one interface between a served model's adaptation and the rest of the server, and the one factory
that builds it from `Settings`. The API, the metrics and the engine see only `AdaptationHandle`; whether
the adaptation runs in this process (`LocalAdaptation`) or in one of its own (`AdaptationProcess`) is the
factory's choice, as vLLM's engine-core client is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

import torch

from ..config import Settings
from ..model import StarMoeForCausalLM, StarMoePreTrainedModel
from .backends import Backends
from .bank import BatchRouter, TenantBank
from .local import LocalAdaptation
from .observer import ForwardSink
from .process import AdaptationProcess
from .quality import GateModel, QualityGate, model_scorer
from .worker import AdaptationConfig, AdaptationReport


class AdaptationHandle(Protocol):
    on_commit: Callable[[float], None] | None  # called with each commit's token-to-commit lag (seconds)

    @property
    def sink(self) -> ForwardSink:
        """Where the engine hands each forward."""
        ...

    @property
    def routing(self) -> BatchRouter:
        """What the engine asks how each batch routes."""
        ...

    @property
    def store_ok(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """After the engine has stopped (and closed the sink): hands pending statistics over."""
        ...

    async def ensure_loaded(self, tenant: str) -> None:
        """The tenant's latest version in the bank before its first request is served; when the store or
        the adaptation process is away, serving goes on with the cached bases."""
        ...

    async def describe(self, tenant: str) -> dict[str, object]: ...

    async def configure(self, tenant: str, frozen: bool | None, learning_rate: float | None) -> None: ...

    async def rollback(self, tenant: str, version: int | None) -> int: ...

    async def reset(self, tenant: str) -> int: ...

    def report(self, top: int) -> AdaptationReport: ...


def open_adaptation(
    name: str,
    model: StarMoePreTrainedModel,
    directory: Path,  # the checkpoint it was loaded from: a process of its own loads its quality gate's copy
    bank: TenantBank,
    settings: Settings,
) -> AdaptationHandle | None:
    """The adaptation of one served model as `settings` ask, None when there is none (adaptation off, or a
    router without a subspace). `async` and `shadow` run in a process of their own on a CPU (see
    `Settings.adaptation_process`)."""
    if not adapts(settings, model.config.router_type):
        return None
    trained = model.trained_bases()
    experts = (model.config.num_local_experts, model.config.num_experts_per_tok)
    config = AdaptationConfig.from_settings(settings)
    backends = Backends.from_settings(settings)
    gated = config.quality.enabled and config.mode in ("async", "shadow")
    if _in_a_process(settings, bank.device):
        task: Literal["generate", "classify"] = "generate" if isinstance(model, StarMoeForCausalLM) else "classify"
        gate = GateModel(directory, task, settings.adaptation_align_linear_gate) if gated else None
        return AdaptationProcess(name, trained, bank, config, backends, *experts, settings.metrics_top_tenants, gate)
    store, bus = backends.open(name)
    gate_here = QualityGate(model_scorer(model), config.quality) if gated else None
    return LocalAdaptation(name, trained, bank, store, config, bus, experts[0], gate_here)


def adapts(settings: Settings, router_type: str) -> bool:
    """Whether a model whose routers are `router_type` adapts under `settings`: a subspace to adapt, and
    adaptation on."""
    return settings.adaptation != "off" and router_type in ("star", "star_gha_only")


def _in_a_process(settings: Settings, device: torch.device) -> bool:
    if settings.adaptation not in ("async", "shadow") or settings.adaptation_process == "off":
        return False
    return settings.adaptation_process == "on" or device.type == "cpu"
