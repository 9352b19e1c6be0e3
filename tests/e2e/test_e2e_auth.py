"""Auth on (`STAR_ADMIN_KEY`): tenants and keys through the admin API, tenant identity from the key only."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from .support import CLF_NAME, LM_NAME, Launcher, Server, assert_openai_error, star_of

ADMIN_KEY = "admin-secret-for-tests"


@pytest.fixture(scope="module")
def auth_server(launch: Launcher) -> Iterator[Server]:
    server = launch(env={"STAR_ADMIN_KEY": ADMIN_KEY})
    yield server
    server.terminate()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_tenant_key(server: Server, tenant: str) -> tuple[str, str]:
    """Creates `tenant` (if needed) and a key for it; returns (key id, key)."""
    created = server.http.post("/v1/admin/tenants", json={"name": tenant}, headers=server.admin_headers())
    assert created.status_code in (201, 409), created.text
    response = server.http.post(f"/v1/admin/tenants/{tenant}/keys", headers=server.admin_headers())
    assert response.status_code == 201, response.text
    body = response.json()
    assert isinstance(body["id"], str) and isinstance(body["key"], str) and len(body["key"]) >= 20
    return body["id"], body["key"]


def test_open_routes_need_no_key(auth_server: Server) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert auth_server.http.get(path).status_code == 200, path


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": LM_NAME, "prompt": "x", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", {"model": LM_NAME, "messages": [{"role": "user", "content": "x"}]}),
        ("POST", "/v1/classify", {"model": CLF_NAME, "input": "x"}),
        ("GET", "/v1/admin/tenants", None),
        ("POST", "/v1/admin/tenants", {"name": "sneaky"}),
    ],
)
def test_missing_or_unknown_key_is_401(auth_server: Server, method: str, path: str, body: object) -> None:
    for headers in (
        {},
        bearer("sk-star-not-a-real-key"),
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"Authorization": "Bearer"},
    ):
        response = auth_server.http.request(method, path, json=body, headers=headers)
        error = assert_openai_error(response, 401)
        assert error["type"] == "authentication_error"
    # an X-Tenant header is no substitute for a key
    assert auth_server.http.request(method, path, json=body, headers={"X-Tenant": "default"}).status_code == 401


def test_openai_client_with_a_wrong_key(auth_server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        auth_server.openai(api_key="sk-wrong").completions.create(model=LM_NAME, prompt="x", max_tokens=2)


def test_tenant_key_lifecycle(auth_server: Server) -> None:
    admin = auth_server.admin_headers()
    created = auth_server.http.post("/v1/admin/tenants", json={"name": "acme"}, headers=admin)
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "acme"
    duplicate = auth_server.http.post("/v1/admin/tenants", json={"name": "acme"}, headers=admin)
    assert duplicate.status_code in (400, 409), duplicate.text

    key_id, key = make_tenant_key(auth_server, "acme")
    tenants = auth_server.http.get("/v1/admin/tenants", headers=admin)
    assert tenants.status_code == 200 and "acme" in {t["name"] for t in tenants.json()["data"]}
    listed = auth_server.http.get("/v1/admin/tenants/acme/keys", headers=admin)
    assert listed.status_code == 200
    assert [k["id"] for k in listed.json()["data"]] == [key_id]
    assert key not in listed.text, "the key list reveals the key"

    # the key works, with the official client; the tenant comes from the key
    client = auth_server.openai(api_key=key, default_headers={"X-Tenant": "someone-else"})
    response = client.completions.create(model=LM_NAME, prompt="hello", max_tokens=3, temperature=0)
    assert star_of(response)["tenant"] == "acme"
    chat = client.chat.completions.create(model=LM_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert star_of(chat)["tenant"] == "acme"
    stream = list(client.completions.create(model=LM_NAME, prompt="hello", max_tokens=3, stream=True))
    assert star_of(stream[-1])["tenant"] == "acme"
    classified = auth_server.http.post(
        "/v1/classify", json={"model": CLF_NAME, "input": "x"}, headers=bearer(key) | {"X-Tenant": "other"}
    )
    assert classified.status_code == 200 and classified.json()["star"]["tenant"] == "acme"
    assert {m.id for m in client.models.list().data} == {LM_NAME, CLF_NAME}

    # a tenant key is no admin key
    for method, path in (
        ("GET", "/v1/admin/tenants"),
        ("POST", "/v1/admin/tenants"),
        ("POST", "/v1/admin/tenants/acme/keys"),
        ("GET", "/v1/admin/tenants/acme/keys"),
        ("DELETE", f"/v1/admin/tenants/acme/keys/{key_id}"),
        ("DELETE", "/v1/admin/tenants/acme"),
    ):
        body = {"name": "evil"} if method == "POST" and path.endswith("tenants") else None
        response = auth_server.http.request(method, path, json=body, headers=bearer(key))
        assert_openai_error(response, 403)

    # the key file holds no plaintext key
    stored = [p for p in auth_server.state_dir.rglob("*") if p.is_file()]
    assert stored, f"nothing persisted under {auth_server.state_dir}"
    assert all(key.encode() not in p.read_bytes() for p in stored)

    # deleting the key revokes it at once
    deleted = auth_server.http.delete(f"/v1/admin/tenants/acme/keys/{key_id}", headers=admin)
    assert deleted.status_code in (200, 204), deleted.text
    response = auth_server.http.post(
        "/v1/completions", json={"model": LM_NAME, "prompt": "x", "max_tokens": 2}, headers=bearer(key)
    )
    assert_openai_error(response, 401)
    assert auth_server.http.get("/v1/admin/tenants/acme/keys", headers=admin).json()["data"] == []


def test_keys_are_per_tenant(auth_server: Server) -> None:
    _, key_a = make_tenant_key(auth_server, "team-a")
    key_id_b, key_b = make_tenant_key(auth_server, "team-b")
    for key, tenant in ((key_a, "team-a"), (key_b, "team-b")):
        response = auth_server.openai(api_key=key).completions.create(model=LM_NAME, prompt="q", max_tokens=2)
        assert star_of(response)["tenant"] == tenant
    # a key id is only found under its own tenant
    wrong = auth_server.http.delete(f"/v1/admin/tenants/team-a/keys/{key_id_b}", headers=auth_server.admin_headers())
    assert wrong.status_code in (403, 404), wrong.text
    assert auth_server.openai(api_key=key_b).models.list().data


def test_deleting_a_tenant_revokes_its_keys(auth_server: Server) -> None:
    _, key = make_tenant_key(auth_server, "short-lived")
    assert auth_server.http.get("/v1/models", headers=bearer(key)).status_code == 200
    deleted = auth_server.http.delete("/v1/admin/tenants/short-lived", headers=auth_server.admin_headers())
    assert deleted.status_code in (200, 204), deleted.text
    assert auth_server.http.get("/v1/models", headers=bearer(key)).status_code == 401
    missing = auth_server.http.post("/v1/admin/tenants/short-lived/keys", headers=auth_server.admin_headers())
    assert_openai_error(missing, 404)


def test_admin_input_validation(auth_server: Server) -> None:
    admin = auth_server.admin_headers()
    for name in ("", "has space", "x" * 300, "../etc", None):
        response = auth_server.http.post("/v1/admin/tenants", json={"name": name}, headers=admin)
        assert_openai_error(response, 400, 422)
    assert_openai_error(auth_server.http.post("/v1/admin/tenants/nobody/keys", headers=admin), 404)
    assert_openai_error(auth_server.http.delete("/v1/admin/tenants/nobody", headers=admin), 404)


def test_keys_survive_a_restart(auth_server: Server, launch: Launcher) -> None:
    """Runs last in this module: it stops the module's server and starts a new one on the same state."""
    _, key = make_tenant_key(auth_server, "durable")
    revoked_id, revoked_key = make_tenant_key(auth_server, "durable")
    deleted = auth_server.http.delete(
        f"/v1/admin/tenants/durable/keys/{revoked_id}", headers=auth_server.admin_headers()
    )
    assert deleted.status_code in (200, 204), deleted.text
    auth_server.terminate()
    assert auth_server.proc.poll() is not None

    restarted = launch(env={"STAR_ADMIN_KEY": ADMIN_KEY}, state_dir=auth_server.state_dir)
    try:
        response = restarted.openai(api_key=key).completions.create(model=LM_NAME, prompt="x", max_tokens=2)
        assert star_of(response)["tenant"] == "durable"
        assert restarted.http.get("/v1/models", headers=bearer(revoked_key)).status_code == 401
        tenants = restarted.http.get("/v1/admin/tenants", headers=restarted.admin_headers()).json()["data"]
        assert "durable" in {t["name"] for t in tenants}
    finally:
        restarted.terminate()
