"""`create_app(settings)`: the wiring. The lifespan loads the models and starts their engines."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..adaptation import TenantBank, adapts, open_adaptation
from ..adaptation.live import LiveConfig, LiveQuality
from ..config import Settings
from ..engine import BatcherConfig, ClassificationEngine, EngineConfig, GenerationEngine
from ..engine.process import EngineProcess, EngineSetup
from ..engine.types import StepStats
from ..metrics import ServingMetrics
from ..model import StarMoeConfig, StarMoeForCausalLM, StarMoeForSequenceClassification
from ..model.loading import load_model, require_model_dir, resolve_device, resolve_dtype
from .errors import install_error_handlers
from .live import watch_live
from .routes import admin, health, inference, tokens
from .schemas import error_body
from .state import AppState, ServedModel
from .tenants import FileTenantRegistry, RedisTenantRegistry, TenantRegistry

log = logging.getLogger(__name__)


def model_sources(settings: Settings) -> dict[str, Path]:
    """NAME -> checkpoint directory, from `settings.models`, or the demo models when none is given."""
    if not settings.models:
        from ..training.demo import DEMO_CLASSIFIER, DEMO_LM, ensure_demo_models

        demo = ensure_demo_models(settings.cache_dir, settings.demo_preset)
        return {DEMO_LM: demo.lm_dir, DEMO_CLASSIFIER: demo.classifier_dir}
    sources = {}
    for spec in settings.models:
        name, _, path = spec.rpartition("=")
        directory = Path(path).expanduser()
        sources[name or directory.name] = directory
    return sources


def open_registry(settings: Settings) -> TenantRegistry:
    """Tenants and keys in Redis, shared by every replica, when `redis_url` is set; else in the state dir."""
    if settings.redis_url:
        return RedisTenantRegistry.from_url(settings.redis_url)
    return FileTenantRegistry(settings.resolved_state_dir / "tenants.json")


def _task_of(config: StarMoeConfig) -> Literal["generate", "classify"]:
    architectures = config.architectures or []
    return "classify" if any("SequenceClassification" in a for a in architectures) else "generate"


def load_served_model(name: str, directory: Path, state: AppState) -> ServedModel:
    settings, metrics = state.settings, state.metrics
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    checkpoint = StarMoeConfig.from_pretrained(directory)
    task = _task_of(checkpoint)
    remote = task == "generate" and _engine_in_a_process(settings, name, adapts(settings, checkpoint.router_type))
    # With its engine in a process of its own, this process keeps no more of the model than its trained bases
    model, tokenizer = load_model(directory, task, torch.device("cpu") if remote else device, dtype)
    metrics.observe_alignment(name, model.router_alignment())
    model.align_linear_gates(settings.adaptation_align_linear_gate)
    if settings.cpu_packed_weights and not remote:
        model.pack_for_cpu()
    bank = TenantBank.serving(model)
    adapter = open_adaptation(name, model, directory, bank, settings)
    if adapter is not None:
        adapter.on_commit = metrics.adaptation_lag.labels(name).observe
    routing = bank if adapter is None else adapter.routing
    sink = None if adapter is None else adapter.sink
    measured = adapter is not None and settings.adaptation_loss_sample_rate > 0
    live = LiveQuality(LiveConfig.from_settings(settings)) if measured else None

    def on_step(stats: StepStats) -> None:
        metrics.observe_step(name, stats)

    engine: GenerationEngine | EngineProcess | ClassificationEngine
    if isinstance(model, StarMoeForCausalLM):
        config = EngineConfig(
            max_running=settings.max_running,
            max_waiting=settings.max_waiting,
            max_prefill_batch=settings.max_prefill_batch,
            prefix_blocks=settings.prefix_cache_blocks,
            prefix_block_size=settings.prefix_cache_block_size,
            request_timeout=settings.request_timeout,
        )
        if remote:
            setup = EngineSetup(
                name,
                directory,
                device,
                dtype,
                config,
                threads=torch.get_num_threads(),
                packed=settings.cpu_packed_weights,
                aligned=settings.adaptation_align_linear_gate,
            )
            engine = EngineProcess(setup, on_step)
        else:
            engine = GenerationEngine(model, tokenizer, routing, config, on_step, sink, live)
    else:
        live = None  # a classifier's live quality is the quality gate's entropy proxy
        assert isinstance(model, StarMoeForSequenceClassification)
        batcher = BatcherConfig(
            max_batch=settings.classify_max_batch,
            max_wait=settings.classify_max_wait_ms / 1000,
            max_waiting=max(1, settings.max_waiting * 4),
        )
        engine = ClassificationEngine(model, tokenizer, routing, batcher, on_step, sink)
    return ServedModel(name, task, engine, bank, tokenizer, created=int(time.time()), adapter=adapter, live=live)


def _engine_in_a_process(settings: Settings, name: str, adapts: bool) -> bool:
    if settings.engine_process == "off":
        return False
    if adapts and settings.engine_process == "on":
        raise ValueError(
            f"STAR_ENGINE_PROCESS=on: model {name!r} adapts, and its engine runs beside its tenant bank and "
            "adaptation; set STAR_ADAPTATION=off, or STAR_ENGINE_PROCESS=auto to keep its engine in this process"
        )
    return not adapts


# The hidden size from which a CPU forward gains more from a second core than the HTTP loop loses by sharing
# one: on 2 cores at 32 clients, every core measured 1.6-1.9x one core at 768 (the star-182m shape; 1.0-1.06x
# on another machine) and 0.88-1.08x at 128 (the demo LM).
ALL_CORES_FROM_HIDDEN_SIZE = 512


def cpu_threads(setting: int | None, hidden_sizes: Iterable[int], cores: int | None = None) -> int:
    """Torch's threads on a CPU: the setting, else every core when a served model is wide enough to use
    them, else every core but one, left to the HTTP loop."""
    cores = cores or os.cpu_count() or 2
    if setting is not None:
        return setting
    return cores if max(hidden_sizes, default=0) >= ALL_CORES_FROM_HIDDEN_SIZE else max(1, cores - 1)


def _hidden_size(directory: Path) -> int:
    config = json.loads((require_model_dir(directory) / "config.json").read_text())
    return int(config.get("hidden_size", 0))


def create_app(settings: Settings) -> FastAPI:
    metrics = ServingMetrics()
    state = AppState(settings=settings, metrics=metrics, tenants=open_registry(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sources = await asyncio.to_thread(model_sources, settings)
        if resolve_device(settings.device).type == "cpu":
            torch.set_num_threads(cpu_threads(settings.cpu_threads, [_hidden_size(d) for d in sources.values()]))
        for name, directory in sources.items():
            served = await asyncio.to_thread(load_served_model, name, directory, state)
            served.engine.start()  # on this thread: an engine process dies with the thread that started it
            if served.adapter is not None:
                await served.adapter.start()  # on this thread: an adaptation process dies with the one that started it
            watch_live(served, metrics, asyncio.get_running_loop())
            state.models[name] = served
            metrics.engine_up.labels(name).set_function(partial(_alive, served))
        metrics.watch_engines(lambda: [(n, m.engine.stats()) for n, m in state.models.items()])
        metrics.watch_adapters(
            lambda: [(n, m.adapter) for n, m in state.models.items() if m.adapter], settings.metrics_top_tenants
        )
        metrics.watch_banks(lambda: [(n, m.bank) for n, m in state.models.items()], settings.metrics_top_tenants)
        metrics.watch_live(
            lambda: [(n, m.live) for n, m in state.models.items() if m.live], settings.metrics_top_tenants
        )
        state.ready = True
        log.info("serving %s", ", ".join(f"{n} ({m.task})" for n, m in state.models.items()))
        try:
            yield
        finally:
            state.ready = False
            for served in state.models.values():
                served.engine.stop()
                if served.adapter is not None:
                    await served.adapter.stop()
            await state.tenants.close()

    app = FastAPI(title="star-serve", version="0.1.0", lifespan=lifespan)
    app.state.star = state
    install_error_handlers(app, metrics)
    app.include_router(health)
    app.include_router(inference)
    app.include_router(tokens)
    app.include_router(admin)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(InFlight, state=state)
    return app


def _alive(served: ServedModel) -> float:
    return float(served.engine.alive)


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413, by Content-Length or while reading.

    Most clients (Python's urllib, the openai client) send the whole body before they read a response, and a
    server that closes a connection with unread bytes in it resets it: the client sees `Connection reset`, not
    the 413. So a refused body of announced length is read and thrown away first, up to `LINGER_FACTOR` times
    the limit and for `LINGER_SECONDS` at most, as nginx's lingering close does. A larger announced body, one
    sent with `Expect: 100-continue` (whose client waits for the answer before sending) and a chunked body of
    unknown length are refused at once."""

    LINGER_FACTOR = 4
    LINGER_SECONDS = 10.0

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            waits = headers.get(b"expect", b"").lower() == b"100-continue"
            if int(declared) <= (1 + self.LINGER_FACTOR) * self.max_bytes and not waits:
                await _discard(receive, int(declared), self.LINGER_SECONDS)
            await _send_error(send, 413, f"request body over {self.max_bytes} bytes")
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI passes HTTPExceptions raised while reading the body through
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


async def _discard(receive: Receive, budget: int, seconds: float) -> None:
    """Reads and drops the rest of a request body: until its end, `budget` bytes, or `seconds`."""

    async def drain() -> None:
        read = 0
        while read < budget:
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    with suppress(TimeoutError):
        await asyncio.wait_for(drain(), seconds)


class InFlight:
    """Counts HTTP requests in progress (a streamed response until its last byte), for the drain."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps(error_body(message, "invalid_request_error", None, status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
