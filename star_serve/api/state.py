"""What the routes share: the served models, the tenant registry, metrics and the drain flag."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from ..adaptation import AdaptationHandle, TenantBank
from ..adaptation.live import LiveQuality
from ..config import Settings
from ..engine import ClassificationEngine, GenerationEngine
from ..engine.process import EngineProcess
from ..metrics import ServingMetrics
from .errors import ApiError, NotFound
from .logprobs import TokenTexts
from .tenants import TenantRegistry


@dataclass
class ServedModel:
    name: str
    task: Literal["generate", "classify"]
    engine: GenerationEngine | EngineProcess | ClassificationEngine
    bank: TenantBank
    tokenizer: PreTrainedTokenizerBase
    created: int
    adapter: AdaptationHandle | None = None
    live: LiveQuality | None = None  # the live loss of sampled prompts (language models that adapt)

    @functools.cached_property
    def token_texts(self) -> TokenTexts:
        return TokenTexts(self.tokenizer)


@dataclass
class AppState:
    settings: Settings
    metrics: ServingMetrics
    tenants: TenantRegistry
    models: dict[str, ServedModel] = field(default_factory=dict)
    ready: bool = False
    draining: bool = False
    in_flight: int = 0  # HTTP requests under /v1 in progress

    def begin_drain(self) -> None:
        """Readiness fails and new inference is refused (503); running requests go on."""
        self.draining = True
        for served in self.models.values():
            served.engine.draining = True

    def adapted(self, name: str | None) -> AdaptationHandle:
        """The adapter of model `name`, which may be omitted when a single model is served."""
        if name is None:
            if len(self.models) != 1:
                raise ApiError("name the model: ?model=NAME (this server serves several)", "model")
            name = next(iter(self.models))
        served = self.models.get(name)
        if served is None:
            raise NotFound(f"no model named {name!r}", "model")
        if served.adapter is None:
            raise NotFound(f"model {name!r} has no adaptable subspace (router type or adaptation off)", "model")
        return served.adapter

    def served(self, name: str | None) -> ServedModel:
        """Model `name`, whatever its task; without a name, the one language model, as vLLM serves one."""
        if name is None:
            generating = [m for m in self.models.values() if m.task == "generate"]
            if len(generating) != 1:
                raise ApiError(f"name the model: this server has {len(generating)} language models", "model")
            return generating[0]
        served = self.models.get(name)
        if served is None:
            raise NotFound(f"no model named {name!r} (available: {', '.join(self.models) or 'none'})", "model")
        return served

    def model(self, name: str, task: str) -> ServedModel:
        served = self.models.get(name)
        if served is None or served.task != task:
            names = ", ".join(n for n, m in self.models.items() if m.task == task) or "none"
            raise NotFound(f"no {task} model named {name!r} (available: {names})", "model")
        return served


async def get_state(request: Request) -> AppState:
    """A coroutine, so that FastAPI calls it on the event loop rather than in its thread pool."""
    state: AppState = request.app.state.star
    return state
