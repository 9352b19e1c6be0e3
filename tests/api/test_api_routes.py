"""The routes (api/routes.py) that are not generation: health, readiness, metrics, the model list, and a
tenant's own adaptation state (`/v1/subspace`, its PATCH, reset and rollback) with their 4xx answers."""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi.testclient import TestClient

from star_serve.config import Settings

from .support import (
    CLF_CONTEXT,
    CLF_NAME,
    LM_CONTEXT,
    LM_NAME,
    NUM_LAYERS,
    SHARED_SNAPSHOT_KEEP,
    assert_openai_error,
    metric,
    parse_metrics,
    star_of,
)

LM = {"model": LM_NAME}


def _tenant(name: str) -> dict[str, str]:
    return {"X-Tenant": name}


def _subspace(client: TestClient, tenant: str, model: str = LM_NAME) -> dict[str, Any]:
    response = client.get("/v1/subspace", params={"model": model}, headers=_tenant(tenant))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _reset(client: TestClient, tenant: str) -> dict[str, Any]:
    response = client.post("/v1/subspace/reset", params=LM, headers=_tenant(tenant))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_health_ready_and_metrics(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": sorted([LM_NAME, CLF_NAME]), "store": "ok"}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert metric(client, "star_engine_up", model=LM_NAME) == 1.0
    assert metric(client, "star_engine_up", model=CLF_NAME) == 1.0


def test_models_lists_each_model_with_its_task_and_context(client: TestClient) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert set(cards) == {LM_NAME, CLF_NAME}
    assert cards[LM_NAME]["task"] == "generate" and cards[LM_NAME]["max_model_len"] == LM_CONTEXT
    assert cards[CLF_NAME]["task"] == "classify" and cards[CLF_NAME]["max_model_len"] == CLF_CONTEXT
    for card in cards.values():
        assert card["object"] == "model" and card["owned_by"] == "star-serve"
        assert isinstance(card["created"], int) and card["created"] > 0


def test_a_new_tenant_starts_at_version_0_on_the_trained_bases(client: TestClient) -> None:
    state = _subspace(client, "fresh")
    assert state["model"] == LM_NAME and state["tenant"] == "fresh"
    assert state["version"] == 0 and state["tokens_seen"] == 0
    assert state["frozen"] is False
    assert state["learning_rate"] == Settings.default("adaptation_learning_rate")
    assert state["last_update"] is None and state["quality"] is None
    assert state["drift"] == [0.0] * NUM_LAYERS
    assert len(state["orthogonality_defect"]) == NUM_LAYERS
    assert all(0.0 <= d < 1e-4 for d in state["orthogonality_defect"]), state["orthogonality_defect"]
    # the classifier has subspaces of its own
    assert _subspace(client, "fresh", CLF_NAME)["model"] == CLF_NAME


def test_subspace_needs_a_known_adaptable_model(client: TestClient) -> None:
    # two models served: `?model=` may not be omitted
    error = assert_openai_error(client.get("/v1/subspace"), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    for method, path in (("GET", "/v1/subspace"), ("POST", "/v1/subspace/reset")):
        error = assert_openai_error(client.request(method, path, params={"model": "nope"}), 404)
        assert error["type"] == "not_found_error" and error["param"] == "model" and "nope" in error["message"]


def test_patch_configures_only_the_callers_tenant(client: TestClient) -> None:
    response = client.patch("/v1/subspace", params=LM, headers=_tenant("patched"), json={"frozen": True})
    assert response.status_code == 200, response.text
    assert response.json()["frozen"] is True
    response = client.patch("/v1/subspace", params=LM, headers=_tenant("patched"), json={"learning_rate": 0.2})
    assert response.status_code == 200, response.text
    assert (response.json()["frozen"], response.json()["learning_rate"]) == (True, 0.2)  # one field, one change
    assert _subspace(client, "patched")["learning_rate"] == 0.2
    untouched = _subspace(client, "bystander")
    assert untouched["frozen"] is False and untouched["learning_rate"] == Settings.default("adaptation_learning_rate")
    # nothing to change is no change, and no new version
    unchanged = client.patch("/v1/subspace", params=LM, headers=_tenant("patched"), json={})
    assert unchanged.status_code == 200 and unchanged.json()["version"] == 0 and unchanged.json()["frozen"] is True


def test_patch_rejects_out_of_range_values(client: TestClient) -> None:
    for fields in ({"learning_rate": 0}, {"learning_rate": 1.5}, {"learning_rate": "fast"}, {"frozen": "maybe"}):
        response = client.patch("/v1/subspace", params=LM, headers=_tenant("patch-bad"), json=fields)
        error = assert_openai_error(response, 400)
        assert error["param"] == next(iter(fields)), error
    assert _subspace(client, "patch-bad")["learning_rate"] == Settings.default("adaptation_learning_rate")


def test_reset_commits_a_new_version_that_serves_the_tenant(client: TestClient) -> None:
    rollbacks = metric(client, "star_adaptation_rollbacks_total", model=LM_NAME)
    before = time.time()
    state = _reset(client, "resetter")
    assert state["tenant"] == "resetter" and state["version"] == 1
    assert state["drift"] == [0.0] * NUM_LAYERS  # back on the trained bases
    assert state["last_update"] is not None and before - 1 <= state["last_update"] <= time.time() + 1
    assert _subspace(client, "resetter")["version"] == 1
    assert metric(client, "star_adaptation_rollbacks_total", model=LM_NAME) == rollbacks + 1
    # the committed version is the one that serves the tenant's next request; another tenant's is untouched
    served = client.post("/v1/completions", json=LM | {"prompt": "hi", "max_tokens": 2}, headers=_tenant("resetter"))
    assert star_of(served.json())["subspace_version"] == 1
    other = client.post("/v1/completions", json=LM | {"prompt": "hi", "max_tokens": 2}, headers=_tenant("other"))
    assert (star_of(other.json())["tenant"], star_of(other.json())["subspace_version"]) == ("other", 0)


def test_rollback_commits_an_earlier_version_as_a_new_one(client: TestClient) -> None:
    assert [_reset(client, "roller")["version"] for _ in range(2)] == [1, 2]
    response = client.post("/v1/subspace/rollback", params=LM, headers=_tenant("roller"), json={"version": 1})
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 3
    to_trained = client.post("/v1/subspace/rollback", params=LM, headers=_tenant("roller"), json={"version": 0})
    assert to_trained.status_code == 200 and to_trained.json()["version"] == 4
    assert to_trained.json()["drift"] == [0.0] * NUM_LAYERS


def test_rollback_to_a_version_never_committed_is_404(client: TestClient) -> None:
    response = client.post("/v1/subspace/rollback", params=LM, headers=_tenant("never"), json={"version": 5})
    error = assert_openai_error(response, 404)
    assert error == {
        "message": "version 5 is not kept for tenant 'never'",
        "type": "not_found_error",
        "param": "version",
        "code": 404,
    }
    assert _subspace(client, "never")["version"] == 0  # nothing was committed


def test_rollback_to_a_version_no_longer_kept_is_404(client: TestClient) -> None:
    versions = [_reset(client, "pruned")["version"] for _ in range(SHARED_SNAPSHOT_KEEP + 1)]
    assert versions == list(range(1, SHARED_SNAPSHOT_KEEP + 2))
    # the store keeps the newest `snapshot_keep` versions: version 1 is gone, the newest ones are there
    gone = client.post("/v1/subspace/rollback", params=LM, headers=_tenant("pruned"), json={"version": 1})
    error = assert_openai_error(gone, 404)
    assert error["type"] == "not_found_error" and error["param"] == "version"
    kept = client.post("/v1/subspace/rollback", params=LM, headers=_tenant("pruned"), json={"version": versions[-1]})
    assert kept.status_code == 200, kept.text
    assert kept.json()["version"] == versions[-1] + 1


def test_rollback_body_is_validated(client: TestClient) -> None:
    for body, param in (({"version": -1}, "version"), ({}, "version"), ({"version": "one"}, "version")):
        response = client.post("/v1/subspace/rollback", params=LM, headers=_tenant("rb-bad"), json=body)
        error = assert_openai_error(response, 400)
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert _subspace(client, "rb-bad")["version"] == 0


def test_what_a_gateway_routes_by_is_exported(client: TestClient) -> None:
    """The queue, the KV cache's use, the tenants whose bases are on the device (in the shape of vLLM's LoRA
    info, for an endpoint picker), and who owns a tenant's updates."""
    _reset(client, "affine")  # a version of its own: its bases take a row of the bank once it is served
    completion = client.post(
        "/v1/completions", json=LM | {"prompt": "hello", "max_tokens": 2}, headers=_tenant("affine")
    )
    assert completion.status_code == 200 and star_of(completion.json())["subspace_version"] == 1
    samples = parse_metrics(client.get("/metrics").text)
    [(labels, when)] = [
        (dict(ls), v) for (n, ls), v in samples.items() if n == "star_tenant_bases_info" and ("model", LM_NAME) in ls
    ]
    assert f"{LM_NAME}:affine" in labels["running_lora_adapters"].split(",") and labels["waiting_lora_adapters"] == ""
    assert int(labels["max_lora"]) > 0 and abs(when - time.time()) < 60
    assert metric(client, "star_kv_cache_usage_ratio", model=LM_NAME) == 0.0  # nothing running now
    assert metric(client, "star_requests_waiting", model=LM_NAME) == 0.0
    assert metric(client, "star_adaptation_partition_owned", model=LM_NAME, partition="0") == 1.0
    owner = _subspace(client, "affine")["owner"]
    assert owner["partition"] == 0 and owner["replica"].endswith(f"-{os.getpid()}")  # in-process adaptation


def test_a_request_may_name_its_tenant_in_the_model_as_a_gateway_routes_it(client: TestClient) -> None:
    _reset(client, "addressed")
    by_model = client.post("/v1/completions", json={"model": f"{LM_NAME}:addressed", "prompt": "hi", "max_tokens": 1})
    assert by_model.status_code == 200, by_model.text
    assert star_of(by_model.json()) == {"tenant": "addressed", "subspace_version": 1, "routing": None}
    assert by_model.json()["model"] == LM_NAME
    chat = client.post(
        "/v1/chat/completions",
        json={"model": f"{LM_NAME}:addressed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    )
    assert chat.status_code == 200 and star_of(chat.json())["tenant"] == "addressed"
    bad = client.post("/v1/completions", json={"model": f"{LM_NAME}:no spaces", "prompt": "hi", "max_tokens": 1})
    assert assert_openai_error(bad, 400)["param"] == "model"
    unknown = client.post("/v1/completions", json={"model": "nope:addressed", "prompt": "hi", "max_tokens": 1})
    assert_openai_error(unknown, 404)
