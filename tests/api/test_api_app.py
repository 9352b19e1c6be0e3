"""The wiring of `create_app(settings)` (api/app.py) and the state it shares (api/state.py): the lifespan
loads the models named in the settings and starts their engines and adapters, readiness follows it, the
body limit holds with and without a Content-Length, a drain and a stopped engine answer 503, and a tenant's
committed versions and settings outlive the app in its state directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from star_serve.api.app import ALL_CORES_FROM_HIDDEN_SIZE, cpu_threads, create_app
from star_serve.engine import GenerationEngine
from star_serve.engine.process import EngineProcess

from .support import (
    CLF_NAME,
    LM_NAME,
    SHARED_BODY_LIMIT,
    Checkpoints,
    SettingsFactory,
    assert_openai_error,
    metric,
    star_of,
)


def test_ready_only_inside_the_lifespan(settings_for: SettingsFactory) -> None:
    app = create_app(settings_for(adaptation="off"))
    before = TestClient(app)  # not entered: the lifespan has not run, no model is loaded
    assert before.get("/ready").status_code == 503 and before.get("/ready").json() == {"status": "loading"}
    assert before.get("/health").json() == {"status": "ok"}  # liveness: the process is up
    with TestClient(app) as client:
        ready = client.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "models": sorted([LM_NAME, CLF_NAME]), "store": "ok"}
    after = TestClient(app)  # the lifespan has ended: engines stopped
    assert after.get("/ready").status_code == 503 and after.get("/ready").json() == {"status": "loading"}


def test_a_model_given_as_a_bare_directory_is_named_after_it(
    settings_for: SettingsFactory, checkpoints: Checkpoints
) -> None:
    with TestClient(create_app(settings_for(models=[str(checkpoints.lm_dir)]))) as client:
        assert [card["id"] for card in client.get("/v1/models").json()["data"]] == [checkpoints.lm_dir.name]
        # a single model served: /v1/subspace may leave `?model=` out
        state = client.get("/v1/subspace", headers={"X-Tenant": "solo"})
        assert state.status_code == 200, state.text
        assert state.json()["model"] == checkpoints.lm_dir.name and state.json()["tenant"] == "solo"


def test_with_adaptation_off_there_is_no_subspace_and_every_answer_is_version_0(
    settings_for: SettingsFactory,
) -> None:
    with TestClient(create_app(settings_for(adaptation="off"))) as client:
        error = assert_openai_error(client.get("/v1/subspace", params={"model": LM_NAME}), 404)
        assert error["param"] == "model" and "no adaptable subspace" in error["message"]
        assert client.get("/ready").json()["store"] == "ok"  # no adapter: nothing to be degraded
        body = client.post("/v1/completions", json={"model": LM_NAME, "prompt": "x", "max_tokens": 2}).json()
        assert star_of(body)["subspace_version"] == 0


def test_body_limit_with_and_without_a_content_length(client: TestClient) -> None:
    big = {"model": LM_NAME, "prompt": "a" * SHARED_BODY_LIMIT, "max_tokens": 1}
    error = assert_openai_error(client.post("/v1/completions", json=big), 413)
    assert error["message"] == f"request body over {SHARED_BODY_LIMIT} bytes" and error["code"] == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while the body is read
        yield b'{"model": "tiny-lm", "max_tokens": 1, "prompt": "'
        for _ in range(SHARED_BODY_LIMIT // 1000 + 1):
            yield b"a" * 1000
        yield b'"}'

    response = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert assert_openai_error(response, 413)["message"] == f"request body over {SHARED_BODY_LIMIT} bytes"
    # a body just under the limit is read and served (the classifier truncates a long input to its context)
    under = {"model": CLF_NAME, "input": "a" * (SHARED_BODY_LIMIT - 100)}
    assert client.post("/v1/classify", json=under).status_code == 200


def test_a_drain_fails_readiness_and_refuses_new_inference_with_503(settings_for: SettingsFactory) -> None:
    app = create_app(settings_for(adaptation="off"))
    with TestClient(app) as client:
        app.state.star.begin_drain()  # what the server's SIGTERM handler does (api/server.py)
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        assert client.get("/health").json() == {"status": "ok"}  # still alive
        for path, body in (
            ("/v1/completions", {"model": LM_NAME, "prompt": "x", "max_tokens": 2}),
            ("/v1/chat/completions", {"model": LM_NAME, "messages": [{"role": "user", "content": "x"}]}),
            ("/v1/classify", {"model": CLF_NAME, "input": "x"}),
        ):
            response = client.post(path, json=body)
            assert assert_openai_error(response, 503)["type"] == "unavailable_error", path
            assert response.headers["retry-after"] == "1", path
        assert app.state.star.in_flight == 0  # the refused requests are not left counted


def test_a_stopped_engine_fails_liveness(settings_for: SettingsFactory) -> None:
    app = create_app(settings_for(adaptation="off"))
    with TestClient(app) as client:
        assert metric(client, "star_engine_up", model=LM_NAME) == 1.0
        app.state.star.models[LM_NAME].engine.stop()  # as if its thread had died
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "engine stopped", "models": [LM_NAME]}
        assert metric(client, "star_engine_up", model=LM_NAME) == 0.0
        assert metric(client, "star_engine_up", model=CLF_NAME) == 1.0
        response = client.post("/v1/completions", json={"model": LM_NAME, "prompt": "x", "max_tokens": 2})
        assert assert_openai_error(response, 503)["type"] == "unavailable_error"


def test_a_language_model_without_adaptation_runs_its_engine_in_a_process_of_its_own(
    settings_for: SettingsFactory,
) -> None:
    request = {"model": LM_NAME, "prompt": "the cat", "max_tokens": 4, "temperature": 0}
    seen = {}
    for mode in ("auto", "off"):
        app = create_app(settings_for(adaptation="off", engine_process=mode))
        with TestClient(app) as client:
            engine = app.state.star.models[LM_NAME].engine
            assert isinstance(engine, EngineProcess) == (mode == "auto")
            body = client.post("/v1/completions", json=request).json()
            routed = metric(client, "star_expert_tokens_total", model=LM_NAME, layer="0")  # read from the engine's steps
            seen[mode] = (body["choices"][0]["text"], body["usage"], routed)
        assert not engine.alive
    assert seen["auto"] == seen["off"] and seen["auto"][2] > 0
    adapting = create_app(settings_for())  # a model that adapts keeps its engine beside its bank
    with TestClient(adapting):
        assert isinstance(adapting.state.star.models[LM_NAME].engine, GenerationEngine)
    with pytest.raises(ValueError, match="adapts"), TestClient(create_app(settings_for(engine_process="on"))):
        pass


def test_versions_and_settings_outlive_the_app(settings_for: SettingsFactory, checkpoints: Checkpoints) -> None:
    settings = settings_for(models=[f"{LM_NAME}={checkpoints.lm_dir}"])
    tenant = {"X-Tenant": "durable"}
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/subspace/reset", headers=tenant).json()["version"] == 1
        patched = client.patch("/v1/subspace", headers=tenant, json={"frozen": True, "learning_rate": 0.25})
        assert patched.status_code == 200, patched.text
    assert (settings.resolved_state_dir / "snapshots").is_dir()  # the local snapshot store of the settings
    with TestClient(create_app(settings)) as client:
        # the first request of the tenant after the restart is served by its latest committed version
        body = client.post("/v1/completions", json={"model": LM_NAME, "prompt": "x", "max_tokens": 2}, headers=tenant)
        assert star_of(body.json())["subspace_version"] == 1
        state = client.get("/v1/subspace", headers=tenant).json()
        assert (state["version"], state["frozen"], state["learning_rate"]) == (1, True, 0.25)
        assert client.get("/v1/subspace", headers={"X-Tenant": "newcomer"}).json()["version"] == 0


def test_cpu_threads_take_every_core_for_a_wide_model_and_leave_one_to_http_otherwise() -> None:
    narrow, wide = ALL_CORES_FROM_HIDDEN_SIZE // 4, ALL_CORES_FROM_HIDDEN_SIZE
    assert cpu_threads(None, [narrow], cores=8) == 7
    assert cpu_threads(None, [narrow, wide], cores=8) == 8  # the widest served model decides
    assert cpu_threads(None, [narrow], cores=1) == 1
    assert cpu_threads(3, [wide], cores=8) == 3  # STAR_CPU_THREADS wins
