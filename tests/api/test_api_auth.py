"""Auth on (`admin_key` set; api/auth.py) and the admin API of tenants and keys (api/tenants.py): every route
but health, readiness and metrics needs a key, the tenant comes from the key only, tenant keys cannot
administer, and keys are stored hashed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from star_serve.api.app import create_app
from star_serve.config import Settings

from .support import LM_NAME, Checkpoints, app_settings, assert_openai_error, bearer, star_of

ADMIN_KEY = "admin-secret-for-api-tests"
ADMIN = bearer(ADMIN_KEY)
COMPLETION = {"model": LM_NAME, "prompt": "hello", "max_tokens": 2}


@pytest.fixture(scope="module")
def auth_settings(checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """One model (so `/v1/subspace` needs no `?model=`), adaptation on, auth on."""
    home = tmp_path_factory.mktemp("api-auth")
    return app_settings(checkpoints, home, models=[f"{LM_NAME}={checkpoints.lm_dir}"], admin_key=ADMIN_KEY)


@pytest.fixture(scope="module")
def auth(auth_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(auth_settings)) as client:
        yield client


def make_key(client: TestClient, tenant: str) -> tuple[str, str]:
    """Creates `tenant` and a key for it; returns (key id, key)."""
    created = client.post("/v1/admin/tenants", json={"name": tenant}, headers=ADMIN)
    assert created.status_code == 201, created.text
    response = client.post(f"/v1/admin/tenants/{tenant}/keys", headers=ADMIN)
    assert response.status_code == 201, response.text
    body = response.json()
    return body["id"], body["key"]


def test_health_ready_and_metrics_need_no_key(auth: TestClient) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert auth.get(path).status_code == 200, path


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", COMPLETION),
        ("POST", "/v1/chat/completions", {"model": LM_NAME, "messages": [{"role": "user", "content": "x"}]}),
        ("GET", "/v1/subspace", None),
        ("POST", "/v1/subspace/reset", None),
        ("GET", "/v1/admin/tenants", None),
        ("POST", "/v1/admin/tenants", {"name": "sneaky"}),
    ],
)
def test_a_missing_or_unknown_key_is_401(auth: TestClient, method: str, path: str, body: Any) -> None:
    for headers, message in (
        ({}, "missing API key"),
        ({"Authorization": "Bearer"}, "missing API key"),
        ({"Authorization": "Basic YWRtaW46YWRtaW4="}, "missing API key"),
        (bearer("sk-star-not-a-real-key"), "invalid API key"),
        (bearer(ADMIN_KEY + "x"), "invalid API key"),
    ):
        response = auth.request(method, path, json=body, headers=headers)
        error = assert_openai_error(response, 401)
        assert error["type"] == "authentication_error" and message in error["message"], (headers, error)
        assert response.headers["www-authenticate"] == "Bearer"
    assert "sneaky" not in {t["name"] for t in auth.get("/v1/admin/tenants", headers=ADMIN).json()["data"]}


def test_a_tenant_key_from_creation_to_revocation(auth: TestClient) -> None:
    created = auth.post("/v1/admin/tenants", json={"name": "acme"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "acme" and created.json()["keys"] == 0
    issued = auth.post("/v1/admin/tenants/acme/keys", headers=ADMIN)
    assert issued.status_code == 201, issued.text
    key_id, key = issued.json()["id"], issued.json()["key"]
    assert issued.json()["tenant"] == "acme" and key.startswith("sk-star-") and len(key) > 40
    listed = {t["name"]: t for t in auth.get("/v1/admin/tenants", headers=ADMIN).json()["data"]}
    assert listed["acme"]["keys"] == 1
    keys = auth.get("/v1/admin/tenants/acme/keys", headers=ADMIN).json()["data"]
    assert [k["id"] for k in keys] == [key_id] and "key" not in keys[0]  # the key itself is shown once

    assert auth.get("/v1/models", headers=bearer(key)).status_code == 200
    # the tenant comes from the key: an X-Tenant header names nothing
    spoofed = bearer(key) | {"X-Tenant": "someone-else"}
    completion = auth.post("/v1/completions", json=COMPLETION, headers=spoofed)
    assert completion.status_code == 200, completion.text
    assert star_of(completion.json())["tenant"] == "acme"
    assert auth.get("/v1/subspace", headers=spoofed).json()["tenant"] == "acme"

    deleted = auth.delete(f"/v1/admin/tenants/acme/keys/{key_id}", headers=ADMIN)
    assert deleted.status_code == 204 and deleted.content == b""
    error = assert_openai_error(auth.get("/v1/models", headers=bearer(key)), 401)
    assert error["message"] == "invalid API key"
    assert auth.get("/v1/admin/tenants/acme/keys", headers=ADMIN).json()["data"] == []


def test_a_tenant_key_cannot_administer(auth: TestClient) -> None:
    _, key = make_key(auth, "plain")
    for method, path, body in (
        ("GET", "/v1/admin/tenants", None),
        ("POST", "/v1/admin/tenants", {"name": "mine"}),
        ("POST", "/v1/admin/tenants/plain/keys", None),
        ("DELETE", "/v1/admin/tenants/plain", None),
    ):
        error = assert_openai_error(auth.request(method, path, json=body, headers=bearer(key)), 403)
        assert error["type"] == "permission_error", (method, path)
    assert auth.get("/v1/models", headers=bearer(key)).status_code == 200  # its key still works


def test_the_admin_keys_own_traffic_is_the_default_tenants(auth: TestClient) -> None:
    response = auth.post("/v1/completions", json=COMPLETION, headers=ADMIN | {"X-Tenant": "acme"})
    assert response.status_code == 200, response.text
    assert star_of(response.json())["tenant"] == "default"


def test_each_tenant_adapts_only_its_own_subspace(auth: TestClient) -> None:
    _, first = make_key(auth, "first")
    _, second = make_key(auth, "second")
    assert auth.post("/v1/subspace/reset", headers=bearer(first)).json()["version"] == 1
    # no header reaches another tenant's state: the second tenant still sees its own
    state = auth.get("/v1/subspace", headers=bearer(second) | {"X-Tenant": "first"}).json()
    assert (state["tenant"], state["version"]) == ("second", 0)
    assert auth.get("/v1/subspace", headers=bearer(first)).json()["version"] == 1


def test_deleting_a_tenant_revokes_its_keys(auth: TestClient) -> None:
    _, key = make_key(auth, "leaving")
    assert auth.delete("/v1/admin/tenants/leaving", headers=ADMIN).status_code == 204
    assert assert_openai_error(auth.get("/v1/models", headers=bearer(key)), 401)["message"] == "invalid API key"
    assert "leaving" not in {t["name"] for t in auth.get("/v1/admin/tenants", headers=ADMIN).json()["data"]}


def test_admin_errors(auth: TestClient) -> None:
    make_key(auth, "taken")
    error = assert_openai_error(auth.post("/v1/admin/tenants", json={"name": "taken"}, headers=ADMIN), 409)
    assert error["type"] == "conflict_error" and error["param"] == "name"
    for name in ("bad name!", "", "x" * 65):
        error = assert_openai_error(auth.post("/v1/admin/tenants", json={"name": name}, headers=ADMIN), 400)
        assert error["type"] == "invalid_request_error" and error["param"] == "name", name
    for method, path in (
        ("POST", "/v1/admin/tenants/ghost/keys"),
        ("GET", "/v1/admin/tenants/ghost/keys"),
        ("DELETE", "/v1/admin/tenants/ghost"),
    ):
        error = assert_openai_error(auth.request(method, path, headers=ADMIN), 404)
        assert error["type"] == "not_found_error" and error["param"] == "name" and "ghost" in error["message"]
    # a key id of one tenant does not delete it through another
    key_id, key = make_key(auth, "owner")
    make_key(auth, "intruder")
    error = assert_openai_error(auth.delete(f"/v1/admin/tenants/intruder/keys/{key_id}", headers=ADMIN), 404)
    assert error["param"] == "key_id"
    assert auth.get("/v1/models", headers=bearer(key)).status_code == 200


def test_keys_are_stored_hashed_and_outlive_the_app(auth: TestClient, auth_settings: Settings) -> None:
    _, key = make_key(auth, "durable")
    stored = (auth_settings.resolved_state_dir / "tenants.json").read_text()
    assert key not in stored and hashlib.sha256(key.encode()).hexdigest() in stored
    with TestClient(create_app(auth_settings)) as restarted:  # a second app on the same state directory
        response = restarted.post("/v1/completions", json=COMPLETION, headers=bearer(key))
        assert response.status_code == 200, response.text
        assert star_of(response.json())["tenant"] == "durable"


def test_a_tenant_named_in_the_model_must_be_the_keys_own(auth: TestClient) -> None:
    _, key = make_key(auth, "initech")
    own = auth.post("/v1/completions", json=COMPLETION | {"model": f"{LM_NAME}:initech"}, headers=bearer(key))
    assert own.status_code == 200 and star_of(own.json())["tenant"] == "initech"
    other = auth.post("/v1/completions", json=COMPLETION | {"model": f"{LM_NAME}:globex"}, headers=bearer(key))
    assert "initech" in assert_openai_error(other, 403)["message"]
    admin = auth.post("/v1/completions", json=COMPLETION | {"model": f"{LM_NAME}:globex"}, headers=ADMIN)
    assert admin.status_code == 200 and star_of(admin.json())["tenant"] == "globex"
