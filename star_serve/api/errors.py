"""The one place that maps errors to HTTP statuses and OpenAI-style error bodies."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..adaptation.errors import AdaptationUnavailable, CommitConflict, VersionNotKept
from ..engine import EngineDraining, EngineOverloaded, RequestTooLong
from ..metrics import ServingMetrics
from .schemas import error_body

log = logging.getLogger(__name__)


class ApiError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class Unauthorized(ApiError):
    status, type = 401, "authentication_error"


class Forbidden(ApiError):
    status, type = 403, "permission_error"


class NotFound(ApiError):
    status, type = 404, "not_found_error"


class ClientDisconnected(ApiError):
    status, type = 499, "client_disconnected"  # nginx's status for a client that closed the request


class GenerationFailed(ApiError):
    status, type = 500, "internal_error"


class Conflict(ApiError):
    status, type = 409, "conflict_error"


# The engine's and the adaptation layer's errors: (status, OpenAI error type, the parameter at fault). A
# 429 or 503 carries Retry-After: the error's own `retry_after`, or 1 s.
DOMAIN_ERRORS: dict[type[Exception], tuple[int, str, str | None]] = {
    RequestTooLong: (400, "invalid_request_error", "max_tokens"),
    VersionNotKept: (404, "not_found_error", "version"),
    CommitConflict: (409, "conflict_error", None),
    EngineOverloaded: (429, "overloaded_error", None),
    EngineDraining: (503, "unavailable_error", None),
    AdaptationUnavailable: (503, "unavailable_error", None),
}


# The tags pydantic adds to a location for the member of a union that failed: not part of the field's path.
UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param(loc: Sequence[int | str], error_type: str | None) -> str | None:
    """The request field at fault, as OpenAI names it (`messages.0.content`), from a validation error's
    location: the body, union members' tags and validators' names left out; None for a body that is not
    JSON (its location is a character offset)."""
    if error_type == "json_invalid":
        return None
    path: list[str] = []
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, str) and (not part.isidentifier() or part in UNION_TAGS):
            break
        path.append(str(part))
    return ".".join(path) or None


def _response(status: int, message: str, type_: str, param: str | None = None, **headers: str) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, status), status_code=status, headers=headers or None)


def install_error_handlers(app: FastAPI, metrics: ServingMetrics) -> None:
    def counted(type_: str) -> None:
        metrics.errors.labels(type_).inc()

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        counted(exc.type)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        return _response(exc.status, exc.message, exc.type, exc.param, **headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        counted("invalid_request_error")
        first = exc.errors()[0] if exc.errors() else {}
        param = _param(first.get("loc", ()), first.get("type"))
        message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        return _response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        counted(type_)
        return _response(exc.status_code, str(exc.detail), type_, **(exc.headers or {}))  # 405's Allow

    async def domain_error(_: Request, exc: Exception) -> JSONResponse:
        status, type_, param = next(v for k, v in DOMAIN_ERRORS.items() if isinstance(exc, k))
        counted(type_)
        retry = getattr(exc, "retry_after", 1.0 if status == 503 else None)
        headers = {} if retry is None else {"Retry-After": str(max(1, round(retry)))}
        return _response(status, str(exc), type_, param, **headers)

    for error in DOMAIN_ERRORS:
        app.add_exception_handler(error, domain_error)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        counted("internal_error")
        return _response(500, "internal server error", "internal_error")
