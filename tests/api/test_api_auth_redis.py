"""Tenants and keys in Redis (`STAR_REDIS_URL` with auth on): two replicas on one Redis see each other's
tenants and keys at once, a key revoked on one is refused by the other on its next request, two replicas
creating the same tenant get one 201 and one 409, and a Redis restart loses no key (append-only file) while
the outage itself answers 503, never 401."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.support import RedisProcess
from fastapi.testclient import TestClient

from star_serve.api.app import create_app

from .support import LM_NAME, Checkpoints, app_settings, assert_openai_error, bearer

ADMIN = bearer("admin-of-both-replicas")
COMPLETION = {"model": LM_NAME, "prompt": "hello", "max_tokens": 1}


def _replica(checkpoints: Checkpoints, home: Path, redis_url: str) -> TestClient:
    settings = app_settings(
        checkpoints,
        home,
        models=[f"{LM_NAME}={checkpoints.lm_dir}"],
        admin_key="admin-of-both-replicas",
        redis_url=redis_url,
    )
    return TestClient(create_app(settings))


@pytest.fixture
def replicas(checkpoints: Checkpoints, tmp_path: Path, redis_url: str) -> Iterator[tuple[TestClient, TestClient]]:
    with _replica(checkpoints, tmp_path / "a", redis_url) as a, _replica(checkpoints, tmp_path / "b", redis_url) as b:
        yield a, b


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"  # the session's Redis is shared: a name of the test's own


def test_a_key_made_on_one_replica_works_on_the_other_and_its_revocation_too(
    replicas: tuple[TestClient, TestClient],
) -> None:
    a, b = replicas
    name = _tenant()
    assert a.post("/v1/admin/tenants", json={"name": name}, headers=ADMIN).status_code == 201
    created = a.post(f"/v1/admin/tenants/{name}/keys", headers=ADMIN).json()
    on_b = b.post("/v1/completions", json=COMPLETION, headers=bearer(created["key"]))
    assert on_b.status_code == 200 and on_b.json()["star"]["tenant"] == name
    assert [t["keys"] for t in b.get("/v1/admin/tenants", headers=ADMIN).json()["data"] if t["name"] == name] == [1]
    assert [k["id"] for k in b.get(f"/v1/admin/tenants/{name}/keys", headers=ADMIN).json()["data"]] == [created["id"]]

    assert b.delete(f"/v1/admin/tenants/{name}/keys/{created['id']}", headers=ADMIN).status_code == 204
    assert_openai_error(a.post("/v1/completions", json=COMPLETION, headers=bearer(created["key"])), 401)
    again = a.post(f"/v1/admin/tenants/{name}/keys", headers=ADMIN).json()
    assert b.delete(f"/v1/admin/tenants/{name}", headers=ADMIN).status_code == 204  # takes its keys with it
    assert_openai_error(a.post("/v1/completions", json=COMPLETION, headers=bearer(again["key"])), 401)
    assert_openai_error(a.post(f"/v1/admin/tenants/{name}/keys", headers=ADMIN), 404)


def test_two_replicas_creating_one_tenant_get_one_201_and_one_409(replicas: tuple[TestClient, TestClient]) -> None:
    name = _tenant()
    start = threading.Barrier(2)
    statuses: list[int] = []

    def create(client: TestClient) -> None:
        start.wait()
        statuses.append(client.post("/v1/admin/tenants", json={"name": name}, headers=ADMIN).status_code)

    threads = [threading.Thread(target=create, args=(client,)) for client in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [201, 409]


def test_keys_survive_a_redis_restart_and_the_outage_is_503(checkpoints: Checkpoints, tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    try:
        with _replica(checkpoints, tmp_path / "app", redis.url) as app:
            name = _tenant()
            assert app.post("/v1/admin/tenants", json={"name": name}, headers=ADMIN).status_code == 201
            key = app.post(f"/v1/admin/tenants/{name}/keys", headers=ADMIN).json()["key"]
            redis.stop()
            down = app.get("/v1/models", headers=bearer(key))
            assert assert_openai_error(down, 503)["type"] == "unavailable_error"
            redis.start()
            assert app.post("/v1/completions", json=COMPLETION, headers=bearer(key)).status_code == 200
    finally:
        redis.stop()
