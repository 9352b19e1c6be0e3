"""`POST /v1/classify` against a real server."""

from __future__ import annotations

import math
from typing import Any

from .support import CLF_NAME, LABELS, NUM_EXPERTS, NUM_LAYERS, Checkpoints, Server, star_of

TEXTS = [
    "Send the request to the server and wait for the HTTP response.",
    "Return a list of the words in the string.",
    "x",
]


def _check_item(item: dict[str, Any], index: int) -> None:
    assert item["index"] == index
    scores = item["scores"]
    assert set(scores) == set(LABELS)
    assert math.isclose(sum(scores.values()), 1.0, abs_tol=1e-4)
    assert all(0.0 <= p <= 1.0 for p in scores.values())
    assert item["label"] in LABELS
    assert item["label"] == max(scores, key=scores.__getitem__)
    assert math.isclose(item["score"], scores[item["label"]], rel_tol=1e-6)


def test_classify_single_string(server: Server, checkpoints: Checkpoints) -> None:
    response = server.http.post("/v1/classify", json={"model": CLF_NAME, "input": TEXTS[0]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == CLF_NAME
    [item] = body["data"]
    _check_item(item, 0)
    assert body["usage"]["prompt_tokens"] == checkpoints.count_tokens(TEXTS[0])
    star = star_of(body)
    assert star["tenant"] == "default" and isinstance(star["subspace_version"], int)
    assert star.get("routing") is None


def test_classify_list_matches_single(server: Server, checkpoints: Checkpoints) -> None:
    response = server.http.post("/v1/classify", json={"model": CLF_NAME, "input": TEXTS}, headers={"X-Tenant": "t1"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == len(TEXTS)
    for index, item in enumerate(body["data"]):
        _check_item(item, index)
    assert body["usage"]["prompt_tokens"] == sum(checkpoints.count_tokens(t) for t in TEXTS)
    assert star_of(body)["tenant"] == "t1"
    # batching with other inputs (padding) does not change an input's scores
    for index, text in enumerate(TEXTS):
        [alone] = server.http.post("/v1/classify", json={"model": CLF_NAME, "input": text}).json()["data"]
        for label in LABELS:
            assert math.isclose(alone["scores"][label], body["data"][index]["scores"][label], abs_tol=1e-4)


def test_classify_return_routing(server: Server, checkpoints: Checkpoints) -> None:
    response = server.http.post("/v1/classify", json={"model": CLF_NAME, "input": TEXTS[:2], "return_routing": True})
    assert response.status_code == 200, response.text
    routing = star_of(response.json())["routing"]
    assert isinstance(routing, list) and len(routing) == 2, routing
    for text, table in zip(TEXTS[:2], routing, strict=True):
        assert len(table) == NUM_LAYERS
        tokens = checkpoints.count_tokens(text)
        for layer in table:
            assert len(layer) == NUM_EXPERTS
            assert sum(layer) == tokens  # top-1: one expert per token per layer


def test_classify_with_openai_client_extra_route(server: Server) -> None:
    """The openai client's generic `post` reaches native routes too (same base URL and auth)."""
    body = server.openai().post("/classify", cast_to=dict, body={"model": CLF_NAME, "input": "hello"})
    assert body["data"][0]["label"] in LABELS


def test_classify_bad_inputs(server: Server) -> None:
    for payload in (
        {"model": CLF_NAME, "input": []},
        {"model": CLF_NAME, "input": 5},
        {"model": CLF_NAME, "input": ["ok", 3]},
        {"model": CLF_NAME},
        {"input": "no model"},
        {"model": CLF_NAME, "input": ["x"] * 1000},
    ):
        response = server.http.post("/v1/classify", json=payload)
        assert response.status_code in (400, 422), (payload, response.status_code, response.text)
        assert "error" in response.json()
    response = server.http.post("/v1/classify", json={"model": "tiny-lm", "input": "a generation model"})
    assert response.status_code in (400, 404), response.text


def test_classify_long_input_is_handled(server: Server) -> None:
    """An input longer than the classifier's context is truncated or refused with 400, never a 5xx."""
    response = server.http.post("/v1/classify", json={"model": CLF_NAME, "input": "word " * 2000})
    assert response.status_code in (200, 400, 413), response.text
    if response.status_code == 200:
        assert response.json()["data"][0]["label"] in LABELS
