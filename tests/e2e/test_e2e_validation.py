"""Bad input gets an OpenAI-style 4xx, never a 5xx, and leaves the server healthy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from .support import LM_CONTEXT, LM_NAME, Server, assert_openai_error

CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_max_tokens_beyond_context(server: Server, endpoint: str) -> None:
    body: dict[str, Any] = {"model": LM_NAME, "max_tokens": LM_CONTEXT}
    body |= {"prompt": "hello there"} if "chat" not in endpoint else {"messages": CHAT}
    error = assert_openai_error(server.http.post(endpoint, json=body), 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_alone_beyond_context(server: Server, endpoint: str) -> None:
    long_text = "the quick brown fox " * 1500  # far more tokens than the context, ~30 KB
    body: dict[str, Any] = {"model": LM_NAME}
    body |= {"prompt": long_text} if "chat" not in endpoint else {"messages": [{"role": "user", "content": long_text}]}
    assert_openai_error(server.http.post(endpoint, json=body), 400)


def test_context_error_through_openai_client(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai().completions.create(model=LM_NAME, prompt="hello", max_tokens=LM_CONTEXT + 10)
    assert caught.value.status_code == 400


def test_unknown_model_is_404(server: Server) -> None:
    for endpoint, body in (
        ("/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 2}),
        ("/v1/chat/completions", {"model": "nope", "messages": CHAT, "max_tokens": 2}),
        ("/v1/classify", {"model": "nope", "input": "x"}),
    ):
        error = assert_openai_error(server.http.post(endpoint, json=body), 404)
        assert "nope" in error["message"]
    with pytest.raises(openai.NotFoundError):
        server.openai().completions.create(model="nope", prompt="x", max_tokens=2)


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"[1, 2, 3]", b'"a string"', b'{"model": "tiny-lm", "prompt": "x",}', b"\xff\xfe\x00"],
    ids=["broken", "empty", "array", "string", "trailing-comma", "binary"],
)
def test_malformed_body(server: Server, raw: bytes) -> None:
    response = server.http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, 422)


BAD_FIELDS = [
    {"max_tokens": 0},
    {"max_tokens": -5},
    {"max_tokens": "ten"},
    {"temperature": -0.1},
    {"temperature": 2.5},
    {"temperature": "hot"},
    {"top_p": 0},
    {"top_p": 1.5},
    {"n": 0},
    {"n": 10_000},
    {"stop": ""},
    {"stop": ["a", "b", "c", "d", "e"]},
    {"stop": [1, 2]},
    {"seed": "seven"},
    {"stream": "yes please"},
    {"stream_options": {"include_usage": "sometimes"}},
    {"model": ""},
    {"model": 12},
    {"prompt": ""},
    {"prompt": []},
    {"prompt": None},
    {"prompt": {"text": "x"}},
    {"return_routing": "maybe"},
]


@pytest.mark.parametrize("fields", BAD_FIELDS, ids=lambda f: "-".join(f"{k}={v!r}"[:24] for k, v in f.items()))
def test_out_of_range_completion_fields(server: Server, fields: dict[str, Any]) -> None:
    body = {"model": LM_NAME, "prompt": "hello", "max_tokens": 4} | fields
    assert_openai_error(server.http.post("/v1/completions", json=body), 400, 422)


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"content": "no role"}]},
        {"messages": "hi"},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"max_tokens": 0},
        {"max_completion_tokens": -1},
        {"temperature": 9},
        {"n": -1},
    ],
    ids=lambda f: "-".join(f"{k}={v!r}"[:24] for k, v in f.items()),
)
def test_out_of_range_chat_fields(server: Server, fields: dict[str, Any]) -> None:
    body = {"model": LM_NAME, "messages": CHAT, "max_tokens": 4} | fields
    assert_openai_error(server.http.post("/v1/chat/completions", json=body), 400, 422)


def test_openai_client_sees_validation_as_4xx(server: Server) -> None:
    with pytest.raises((openai.BadRequestError, openai.UnprocessableEntityError)):
        server.openai().completions.create(model=LM_NAME, prompt="x", max_tokens=4, temperature=7)


def test_oversize_body_is_413(server: Server) -> None:
    # the e2e servers run with STAR_MAX_BODY_BYTES=65536
    big = {"model": LM_NAME, "prompt": "a" * 200_000, "max_tokens": 1}
    assert_openai_error(server.http.post("/v1/completions", json=big), 413)
    big_chat = {"model": LM_NAME, "messages": [{"role": "user", "content": "b" * 200_000}]}
    assert_openai_error(server.http.post("/v1/chat/completions", json=big_chat), 413)


def test_oversize_chunked_body_is_413(server: Server) -> None:
    """Without a Content-Length (chunked transfer) the limit still holds while the body is read."""

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny-lm", "max_tokens": 1, "prompt": "'
        for _ in range(20):
            yield b"a" * 10_000
        yield b'"}'

    response = server.http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert_openai_error(response, 413)


def test_unknown_route_and_wrong_method(server: Server) -> None:
    assert_openai_error(server.http.get("/v1/nothing-here"), 404)
    response = server.http.get("/v1/completions")
    assert response.status_code == 405, response.text


def test_server_is_healthy_after_bad_input(server: Server) -> None:
    """All of the above left the engine running: a normal request still works."""
    assert server.http.get("/health").status_code == 200
    response = server.openai().completions.create(model=LM_NAME, prompt="still alive?", max_tokens=3, temperature=0)
    assert response.usage is not None and response.usage.completion_tokens == 3
    assert server.metric("star_errors_total", type="internal_error") == 0
