"""`POST /tokenize` and `POST /detokenize`, as vLLM has them: a prompt's token ids are the ones a completion
counts, a chat's are those of the prompt the chat endpoint renders, and detokenize gives the text back."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from .support import CLF_NAME, LM_CONTEXT, LM_NAME, assert_openai_error

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a river?"}]


def _tokenize(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_a_prompts_tokens_are_the_ones_a_completion_counts(client: TestClient) -> None:
    prompt = "the river runs past the old stone house"
    tokens = _tokenize(client, model=LM_NAME, prompt=prompt)
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == LM_CONTEXT
    completion = client.post("/v1/completions", json={"model": LM_NAME, "prompt": prompt, "max_tokens": 1})
    assert completion.json()["usage"]["prompt_tokens"] == tokens["count"]

    text = client.post("/detokenize", json={"model": LM_NAME, "tokens": tokens["tokens"]})
    assert text.status_code == 200 and text.json() == {"prompt": prompt}


def test_a_chats_tokens_are_those_of_the_prompt_the_chat_endpoint_renders(client: TestClient) -> None:
    tokens = _tokenize(client, model=LM_NAME, messages=CHAT)
    chat = client.post("/v1/chat/completions", json={"model": LM_NAME, "messages": CHAT, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == tokens["count"]
    transcript = _tokenize(client, model=LM_NAME, prompt="system: be brief\nuser: what is a river?\nassistant:")
    assert tokens["tokens"] == transcript["tokens"]  # the tiny tokenizer has no chat template


def test_a_classifier_tokenizes_too(client: TestClient) -> None:
    tokens = _tokenize(client, model=CLF_NAME, prompt="a short text")
    assert tokens["count"] == len(tokens["tokens"]) > 0


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"model": LM_NAME}, None),  # neither prompt nor messages
        ("/tokenize", {"model": LM_NAME, "prompt": "x", "messages": CHAT}, None),  # both
        ("/tokenize", {"model": LM_NAME, "prompt": "x", "echo": True}, "echo"),  # an unknown field
        ("/tokenize", {"model": LM_NAME, "messages": []}, "messages"),
        ("/detokenize", {"model": LM_NAME, "tokens": [-1]}, "tokens.0"),
        ("/detokenize", {"model": LM_NAME, "tokens": [10**9]}, "tokens"),  # not in the vocabulary
        ("/detokenize", {"model": LM_NAME, "tokens": "abc"}, "tokens"),
    ],
)
def test_bad_requests_are_400_naming_the_field(
    client: TestClient, path: str, body: dict[str, Any], param: str | None
) -> None:
    error = assert_openai_error(client.post(path, json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_an_unknown_model_is_404_listing_the_models(client: TestClient) -> None:
    error = assert_openai_error(client.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404)
    assert error["param"] == "model" and LM_NAME in error["message"] and CLF_NAME in error["message"]


def test_without_a_model_the_one_language_model_answers_and_tokenizer_info_renders_chats_as_the_server(
    client: TestClient,
) -> None:
    import jinja2

    prompt = "the river runs past the old stone house"
    assert _tokenize(client, prompt=prompt) == _tokenize(client, model=LM_NAME, prompt=prompt)  # as lm-eval asks
    assert client.post("/detokenize", json={"tokens": _tokenize(client, prompt=prompt)["tokens"]}).json() == {
        "prompt": prompt
    }
    info = client.get("/tokenizer_info").json()
    assert info == client.get("/tokenizer_info", params={"model": LM_NAME}).json()
    assert info["model"] == LM_NAME and info["model_max_length"] == LM_CONTEXT and "eos_token" in info
    rendered = jinja2.Template(info["chat_template"]).render(messages=CHAT, add_generation_prompt=True)
    assert _tokenize(client, prompt=rendered)["tokens"] == _tokenize(client, messages=CHAT)["tokens"]
    assert client.get("/tokenizer_info", params={"model": "nope"}).status_code == 404
