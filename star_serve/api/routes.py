"""Thin HTTP routes: parse, authorize, hand to the serving logic, answer."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .auth import AdminPrincipal, CurrentPrincipal, State, addressed
from .schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    KeyCreated,
    KeyInfo,
    KeyList,
    ModelCard,
    ModelList,
    SubspacePatch,
    SubspaceRollback,
    SubspaceState,
    Tenant,
    TenantCreate,
    TenantList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from .serving import GenerationCall, classify, detokenize, tokenize, tokenizer_info
from .state import AppState

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 429, 503)
}
# A streamed generation answers with server-sent events, each `data: <chunk JSON>`, the last `data: [DONE]`.
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                    "required": ["data"],
                }
            }
        }
    }
}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {"description": "Loading, draining, or an engine stopped."}}

health = APIRouter(tags=["health"])
tokens = APIRouter(tags=["tokenizer"], responses=ERRORS)  # at the root, where vLLM serves them
inference = APIRouter(prefix="/v1", tags=["inference"], responses=ERRORS)
admin = APIRouter(prefix="/v1/admin", tags=["admin"], responses=ERRORS)


@health.get("/health", responses=UNAVAILABLE)
async def get_health(state: State) -> JSONResponse:
    """Liveness: the process and its engine loops are alive. Never looks at the store."""
    dead = [name for name, m in state.models.items() if state.ready and not m.engine.alive]
    if dead:
        return JSONResponse({"status": "engine stopped", "models": dead}, status_code=503)
    return JSONResponse({"status": "ok"})


@health.get("/ready", responses=UNAVAILABLE)
async def get_ready(state: State) -> JSONResponse:
    """Readiness: models loaded and not draining."""
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    adapters = [m.adapter for m in state.models.values() if m.adapter is not None]
    store = "ok" if all(a.store_ok for a in adapters) else "degraded"  # serving goes on from cached bases
    return JSONResponse({"status": "ready", "models": sorted(state.models), "store": store})


@health.get("/metrics", response_class=PlainTextResponse)
async def get_metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@inference.get("/models")
async def list_models(state: State, _: CurrentPrincipal) -> ModelList:
    return ModelList(
        data=[
            ModelCard(id=m.name, created=m.created, task=m.task, max_model_len=m.engine.max_context)
            for m in state.models.values()
        ]
    )


@inference.post("/completions", response_model=CompletionResponse, responses=STREAMED)
async def create_completion(
    body: CompletionRequest, request: Request, state: State, principal: CurrentPrincipal
) -> Response | CompletionResponse | ChatCompletionResponse:
    return await _generate(body, request, state, principal)


@inference.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAMED)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: State, principal: CurrentPrincipal
) -> Response | CompletionResponse | ChatCompletionResponse:
    return await _generate(body, request, state, principal)


async def _generate(
    body: CompletionRequest | ChatCompletionRequest,
    request: Request,
    state: State,
    principal: CurrentPrincipal,
) -> Response | CompletionResponse | ChatCompletionResponse:
    name, principal = addressed(principal, body.model, state.models)
    call = GenerationCall(state, state.model(name, "generate"), principal, body)
    await call.start()
    return call.stream() if body.stream else await call.respond(request)


@tokens.post("/tokenize")
async def tokenize_prompt(body: TokenizeRequest, state: State, _: CurrentPrincipal) -> TokenizeResponse:
    return tokenize(state.served(body.model), body)


@tokens.get("/tokenizer_info")
async def get_tokenizer_info(state: State, _: CurrentPrincipal, model: str | None = None) -> TokenizerInfo:
    return tokenizer_info(state.served(model))


@tokens.post("/detokenize")
async def detokenize_tokens(body: DetokenizeRequest, state: State, _: CurrentPrincipal) -> DetokenizeResponse:
    return detokenize(state.served(body.model), body)


@inference.post("/classify")
async def create_classification(body: ClassifyRequest, state: State, principal: CurrentPrincipal) -> ClassifyResponse:
    served = state.model(body.model, "classify")
    started = time.monotonic()
    outcome = "error"
    try:
        response = await classify(state, served, principal, body)
        outcome = "ok"
        return response
    finally:
        state.metrics.request_latency.labels(served.name, "classify").observe(time.monotonic() - started)
        state.metrics.requests.labels(served.name, "classify", outcome).inc()


@inference.get("/subspace")
async def get_subspace(state: State, principal: CurrentPrincipal, model: str | None = None) -> SubspaceState:
    """The caller's tenant's adaptation state: version, tokens seen, drift and orthogonality per layer."""
    return await _subspace(state, model, principal.tenant)


@inference.patch("/subspace")
async def patch_subspace(
    body: SubspacePatch, state: State, principal: CurrentPrincipal, model: str | None = None
) -> SubspaceState:
    adapter = state.adapted(model)
    await adapter.configure(principal.tenant, body.frozen, body.learning_rate)
    return await _subspace(state, model, principal.tenant)


@inference.post("/subspace/reset")
async def reset_subspace(state: State, principal: CurrentPrincipal, model: str | None = None) -> SubspaceState:
    """Back to the trained bases, committed as a new version."""
    adapter = state.adapted(model)
    await adapter.reset(principal.tenant)
    return await _subspace(state, model, principal.tenant)


@inference.post("/subspace/rollback")
async def rollback_subspace(
    body: SubspaceRollback, state: State, principal: CurrentPrincipal, model: str | None = None
) -> SubspaceState:
    """The bases of an earlier version, committed as a new version."""
    adapter = state.adapted(model)
    await adapter.rollback(principal.tenant, body.version)
    return await _subspace(state, model, principal.tenant)


async def _subspace(state: AppState, model: str | None, tenant: str) -> SubspaceState:
    """The tenant's adaptation state, with its live loss where the model measures one."""
    described = await state.adapted(model).describe(tenant)
    live = state.models[str(described["model"])].live
    return SubspaceState.model_validate({**described, "live": None if live is None else live.describe(tenant)})


@admin.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, state: State, _: AdminPrincipal) -> Tenant:
    created = await state.tenants.create_tenant(body.name)
    return Tenant(name=body.name, created=created, keys=0)


@admin.get("/tenants")
async def list_tenants(state: State, _: AdminPrincipal) -> TenantList:
    tenants = await state.tenants.list_tenants()
    return TenantList(data=[Tenant(name=t.name, created=t.created, keys=t.keys) for t in tenants])


@admin.delete("/tenants/{name}", status_code=204)
async def delete_tenant(name: str, state: State, _: AdminPrincipal) -> Response:
    await state.tenants.delete_tenant(name)
    return Response(status_code=204)


@admin.post("/tenants/{name}/keys", status_code=201)
async def create_key(name: str, state: State, _: AdminPrincipal) -> KeyCreated:
    record, key = await state.tenants.create_key(name)
    return KeyCreated(id=record.id, tenant=record.tenant, created=record.created, key=key)


@admin.get("/tenants/{name}/keys")
async def list_keys(name: str, state: State, _: AdminPrincipal) -> KeyList:
    keys = await state.tenants.keys_of(name)
    return KeyList(data=[KeyInfo(id=k.id, tenant=k.tenant, created=k.created) for k in keys])


@admin.delete("/tenants/{name}/keys/{key_id}", status_code=204)
async def delete_key(name: str, key_id: str, state: State, _: AdminPrincipal) -> Response:
    await state.tenants.delete_key(name, key_id)
    return Response(status_code=204)
