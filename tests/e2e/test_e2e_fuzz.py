"""Schemathesis against the running server's own OpenAPI document, with auth on, over every operation.

Every generated request, valid or not, must get a documented status code, never a 5xx, with a documented
Content-Type and a body that matches the declared response model. Inference routes are called with a tenant's
key, admin routes with the admin key. Generated model names and tenant names are steered, some of the time,
to ones that exist, so that requests reach the engines and the tenant registry instead of stopping at a 404.

The run is seeded (`SEED`), so CI draws the same requests every time; set FUZZ_SEED to explore others.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import checks

from .support import CLF_NAME, LM_NAME, Launcher, Server

ADMIN_KEY = "sk-admin-fuzz"
SEED = int(os.environ.get("FUZZ_SEED", "20260501"))
MAX_EXAMPLES = 25  # per operation, in the fuzzing phase; the coverage phase adds its own boundary cases
TENANT = "fuzz"  # the inference routes run as this tenant; the fuzzer never deletes it
SCRATCH = "scratch"  # the key routes' steered target: keyed, listed and un-keyed freely
DOOMED = "doomed"  # the steered target of DELETE /v1/admin/tenants/{name}
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


@dataclass(frozen=True)
class Keys:
    tenant: str  # TENANT's key
    scratch_id: str  # the id of one of SCRATCH's keys


@pytest.fixture(scope="module")
def fuzz_server(launch: Launcher) -> Iterator[Server]:
    server = launch(env={"STAR_ADMIN_KEY": ADMIN_KEY})
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def keys(fuzz_server: Server) -> Keys:
    admin = fuzz_server.admin_headers()
    for name in (TENANT, SCRATCH, DOOMED):
        response = fuzz_server.http.post("/v1/admin/tenants", json={"name": name}, headers=admin)
        assert response.status_code == 201, response.text
    created = {}
    for name in (TENANT, SCRATCH):
        response = fuzz_server.http.post(f"/v1/admin/tenants/{name}/keys", headers=admin)
        assert response.status_code == 201, response.text
        created[name] = response.json()
    return Keys(tenant=created[TENANT]["key"], scratch_id=created[SCRATCH]["id"])


def _served_model(path: str) -> str | None:
    """The model that a request to `path` can name."""
    if path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize") or path.startswith(
        "/v1/subspace"
    ):
        return LM_NAME
    return CLF_NAME if path == "/v1/classify" else None


def _path_targets(path: str, scratch_id: str) -> list[dict[str, str]]:
    """Existing path parameters that the generated ones are sometimes replaced with."""
    if path == "/v1/admin/tenants/{name}":
        return [{"name": DOOMED}]
    if path == "/v1/admin/tenants/{name}/keys":
        return [{"name": SCRATCH}]
    if path == "/v1/admin/tenants/{name}/keys/{key_id}":
        return [{"name": SCRATCH}, {"name": SCRATCH, "key_id": scratch_id}]
    return []


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server, keys: Keys) -> Any:
    # Only the keys are hidden in failure reports: the default also hides `max_tokens` (it says "token").
    hidden = {"keys-to-sanitize": ["authorization"], "sensitive-markers": ["authorization"]}
    config = schemathesis.Config.from_dict({"seed": SEED, "output": {"sanitization": hidden}})
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json", config=config, timeout=10)

    @schema.hook
    def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
        assert context.operation is not None
        path = context.operation.path
        if not isinstance(body, dict):
            return st.just(body)
        model = _served_model(path)
        if model is not None and isinstance(body.get("model"), str) and 1 <= len(body["model"]) <= 256:
            return st.sampled_from([body, {**body, "model": model}])
        if path == "/v1/admin/tenants" and isinstance(body.get("name"), str):
            return st.sampled_from([body, {**body, "name": SCRATCH}])  # an existing tenant
        return st.just(body)

    @schema.hook
    def flatmap_query(context: schemathesis.HookContext, query: Any) -> st.SearchStrategy[Any]:
        assert context.operation is not None
        if not isinstance(query, dict) or not context.operation.path.startswith("/v1/subspace"):
            return st.just(query)
        return st.sampled_from([query, {**query, "model": LM_NAME}])

    @schema.hook
    def flatmap_path_parameters(context: schemathesis.HookContext, params: Any) -> st.SearchStrategy[Any]:
        assert context.operation is not None
        targets = _path_targets(context.operation.path, keys.scratch_id)
        if not isinstance(params, dict) or not targets:
            return st.just(params)
        return st.sampled_from([params] + [{**params, **target} for target in targets])

    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _legacy_node_id(request: pytest.FixtureRequest) -> None:
    """Schemathesis 4.32's `from_fixture` reads `Node._nodeid`, which pytest 9.2 renamed; a no-op before 9.2."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms(case: schemathesis.Case, keys: Keys) -> None:
    key = ADMIN_KEY if case.operation.path.startswith("/v1/admin/") else keys.tenant
    case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=CHECKS, timeout=60)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": LM_NAME, "prompt": "Return the", "max_tokens": 4, "stream": True}),
        (
            "/v1/chat/completions",
            {"model": LM_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
        ),
    ],
    ids=["completions", "chat"],
)
def test_streamed_response_conforms(api_schema: Any, keys: Keys, path: str, body: dict[str, Any]) -> None:
    """`stream: true` answers with server-sent events: the document must say so for the 200 response."""
    case = api_schema[path]["POST"].Case(body=body)
    response = case.call_and_validate(headers={"Authorization": f"Bearer {keys.tenant}"}, checks=CHECKS, timeout=60)
    assert response.status_code == 200
    assert response.text.rstrip().endswith("data: [DONE]")


def test_existing_tenant_conforms(api_schema: Any) -> None:
    """Creating a tenant that exists is refused with a status that the document lists."""
    case = api_schema["/v1/admin/tenants"]["POST"].Case(body={"name": TENANT})
    response = case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, checks=CHECKS, timeout=60)
    assert 400 <= response.status_code < 500


def test_server_healthy_after_fuzzing(fuzz_server: Server, keys: Keys) -> None:
    """Runs after the fuzzing (file order): the engines are alive, nothing failed inside, a request works."""
    assert fuzz_server.http.get("/health").status_code == 200
    assert fuzz_server.http.get("/ready").status_code == 200
    response = fuzz_server.http.post(
        "/v1/completions",
        json={"model": LM_NAME, "prompt": "still here?", "max_tokens": 3, "temperature": 0},
        headers={"Authorization": f"Bearer {keys.tenant}"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    assert fuzz_server.metric("star_errors_total", type="internal_error") == 0, fuzz_server.log()
