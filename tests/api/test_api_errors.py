"""The one mapping of errors to statuses and OpenAI-style bodies (api/errors.py): request validation is a
400 naming the parameter, the engine's and the adaptation layer's errors get their statuses, unknown routes
404 and wrong methods 405, every error is counted by type, and no bad input is a 500."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from star_serve.api.app import create_app

from .support import CLF_NAME, LM_CONTEXT, LM_NAME, Checkpoints, SettingsFactory, assert_openai_error, metric

CHAT = [{"role": "user", "content": "hi"}]

# (fields over a valid completion request, the parameter the 400 names)
BAD_COMPLETION_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 10_000}, "n"),
    ({"seed": -1}, "seed"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream": "yes please"}, "stream"),
    ({"stream_options": {"include_usage": "sometimes"}}, "stream_options.include_usage"),
    ({"model": ""}, "model"),
    ({"model": 12}, "model"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["x"] * 65}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"return_routing": "maybe"}, "return_routing"),
]


@pytest.mark.parametrize(
    ("fields", "param"),
    BAD_COMPLETION_FIELDS,
    ids=[f"{p}={f[p.split('.')[0]]!r}"[:40] for f, p in BAD_COMPLETION_FIELDS],
)
def test_invalid_completion_fields_are_400_naming_the_parameter(
    client: TestClient, fields: dict[str, Any], param: str
) -> None:
    body = {"model": LM_NAME, "prompt": "hello", "max_tokens": 4} | fields
    error = assert_openai_error(client.post("/v1/completions", json=body), 400)
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    # the field's path, never pydantic's tag of a union member ("prompt.function-after[...]", "stop.str")
    assert error["param"] == param, error
    assert error["message"].startswith(param + ": "), error


def test_a_missing_field_is_400_naming_it(client: TestClient) -> None:
    error = assert_openai_error(client.post("/v1/completions", json={"model": LM_NAME}), 400)
    assert error == {
        "message": "prompt: Field required",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": 400,
    }


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"content": "no role"}]}, "messages.0.role"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": 9}, "temperature"),
    ],
)
def test_invalid_chat_fields_are_400_naming_the_parameter(
    client: TestClient, fields: dict[str, Any], param: str
) -> None:
    body = {"model": LM_NAME, "messages": CHAT, "max_tokens": 4} | fields
    error = assert_openai_error(client.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


@pytest.mark.parametrize("inputs", [[], ["x"] * 257], ids=["none", "257"])
def test_classify_takes_1_to_256_inputs(client: TestClient, inputs: list[str]) -> None:
    error = assert_openai_error(client.post("/v1/classify", json={"model": CLF_NAME, "input": inputs}), 400)
    assert error["param"] == "input" and "between 1 and 256" in error["message"]


def test_text_that_is_not_unicode_is_400(client: TestClient) -> None:
    """JSON lets a lone UTF-16 surrogate through; no tokenizer takes one."""
    raw = b'{"model": "tiny-lm", "prompt": "\\ud800", "max_tokens": 2}'
    response = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400)
    assert error["param"] == "prompt" and "not valid Unicode" in error["message"], error


@pytest.mark.parametrize(
    "raw", [b"{not json", b"", b"[1, 2, 3]", b'"a string"', b'{"model": "tiny-lm", "prompt": "x",}', b"\xff\xfe\x00"]
)
def test_a_malformed_body_is_400(client: TestClient, raw: bytes) -> None:
    response = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None or not error["param"][0].isdigit(), error  # never a character offset


def test_what_the_app_refuses_after_validation_is_400_naming_the_parameter(client: TestClient) -> None:
    def error_of(path: str, body: dict[str, Any]) -> dict[str, Any]:
        return assert_openai_error(client.post(path, json=body), 400)

    too_many = error_of("/v1/completions", {"model": LM_NAME, "prompt": "x", "n": 17})  # max_n is 16
    assert too_many["param"] == "n" and too_many["message"] == "n must be at most 16"
    empty = error_of("/v1/completions", {"model": LM_NAME, "prompt": ""})
    assert empty["param"] == "prompt" and "empty" in empty["message"]
    # the engine's RequestTooLong, for a completion and a chat
    for path, body in (
        ("/v1/completions", {"model": LM_NAME, "prompt": "hello there", "max_tokens": LM_CONTEXT}),
        ("/v1/chat/completions", {"model": LM_NAME, "messages": CHAT, "max_completion_tokens": LM_CONTEXT}),
    ):
        error = error_of(path, body)
        assert error["type"] == "invalid_request_error" and error["param"] == "max_tokens"
        assert f"context of {LM_CONTEXT} tokens" in error["message"], error


def test_an_invalid_x_tenant_header_is_400(client: TestClient) -> None:
    body = {"model": LM_NAME, "prompt": "x", "max_tokens": 2}
    for tenant in ("no spaces!", "x" * 65):
        error = assert_openai_error(client.post("/v1/completions", json=body, headers={"X-Tenant": tenant}), 400)
        assert error["param"] == "X-Tenant", error


def test_a_model_of_the_wrong_task_or_unknown_is_404(client: TestClient) -> None:
    for path, body, available in (
        ("/v1/completions", {"model": CLF_NAME, "prompt": "x", "max_tokens": 2}, LM_NAME),
        ("/v1/chat/completions", {"model": "nope", "messages": CHAT}, LM_NAME),
        ("/v1/classify", {"model": LM_NAME, "input": "x"}, CLF_NAME),
    ):
        error = assert_openai_error(client.post(path, json=body), 404)
        assert error["type"] == "not_found_error" and error["param"] == "model" and error["code"] == 404
        assert body["model"] in error["message"] and f"available: {available}" in error["message"], error


def test_unknown_routes_are_404_and_wrong_methods_405(client: TestClient) -> None:
    error = assert_openai_error(client.get("/v1/nothing-here"), 404)
    assert error["type"] == "not_found_error"
    response = client.get("/v1/completions")
    assert assert_openai_error(response, 405)["type"] == "invalid_request_error"
    assert response.headers["allow"] == "POST"


def test_errors_are_counted_by_type_and_bad_input_is_never_a_500(client: TestClient) -> None:
    invalid = metric(client, "star_errors_total", type="invalid_request_error")
    not_found = metric(client, "star_errors_total", type="not_found_error")
    internal = metric(client, "star_errors_total", type="internal_error")
    client.post("/v1/completions", json={"model": LM_NAME, "prompt": "x", "temperature": 7})
    client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    client.post("/v1/classify", json={"model": "nope", "input": "x"})
    assert metric(client, "star_errors_total", type="invalid_request_error") == invalid + 2
    assert metric(client, "star_errors_total", type="not_found_error") == not_found + 1
    assert metric(client, "star_errors_total", type="internal_error") == internal
    # and the engine still serves
    ok = client.post("/v1/completions", json={"model": LM_NAME, "prompt": "still there?", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_lost_compare_and_set_is_409(settings_for: SettingsFactory, checkpoints: Checkpoints) -> None:
    """Two apps on one snapshot directory (two replicas of the local store): the one that commits second, from
    the version it had loaded, loses the compare-and-set and gets a 409 instead of overwriting; a retry,
    from the version it then reloads, succeeds."""
    settings = settings_for(models=[f"{LM_NAME}={checkpoints.lm_dir}"])  # one model: no ?model= needed
    tenant = {"X-Tenant": "contended"}
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        for app in (first, second):
            assert app.get("/v1/subspace", headers=tenant).json()["version"] == 0
        assert first.post("/v1/subspace/reset", headers=tenant).json()["version"] == 1
        error = assert_openai_error(second.post("/v1/subspace/reset", headers=tenant), 409)
        assert error["type"] == "conflict_error" and error["param"] is None and error["code"] == 409
        assert "another writer committed version 1" in error["message"], error
        assert first.get("/v1/subspace", headers=tenant).json()["version"] == 1  # the winner's commit stands
        assert second.post("/v1/subspace/reset", headers=tenant).json()["version"] == 2  # the retry, on top of it
