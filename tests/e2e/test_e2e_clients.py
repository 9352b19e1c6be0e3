"""The OpenAI clients people build on, against a running server: LangChain's `ChatOpenAI` and LiteLLM's
OpenAI-compatible provider, each with a completion, a stream and an error, answering what the official
client gets for the same greedy request."""

from __future__ import annotations

from typing import Any

import pytest

from .support import LM_NAME, Server

MESSAGES = [{"role": "user", "content": "Return a list of the words in the string"}]


def _expected(server: Server) -> str:
    chat = server.openai().chat.completions.create(model=LM_NAME, messages=MESSAGES, max_tokens=8, temperature=0)
    content = chat.choices[0].message.content
    assert content
    return content


@pytest.mark.slow
def test_langchain_chat_openai_invokes_streams_and_raises(server: Server) -> None:
    import openai
    from langchain_openai import ChatOpenAI

    def chat(model: str = LM_NAME) -> ChatOpenAI:
        return ChatOpenAI(
            model=model, base_url=f"{server.base_url}/v1", api_key="unused", max_tokens=8, temperature=0, max_retries=0
        )

    expected = _expected(server)
    answer = chat().invoke([("user", MESSAGES[0]["content"])])
    assert answer.content == expected
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] == 8
    pieces = [chunk.content for chunk in chat().stream([("user", MESSAGES[0]["content"])])]
    assert len([p for p in pieces if p]) > 1 and "".join(str(p) for p in pieces) == expected
    with pytest.raises(openai.NotFoundError, match="no generate model named"):
        chat("no-such-model").invoke("hello")


@pytest.mark.slow
def test_litellm_openai_provider_completes_streams_and_raises(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its price table from the package, not the web
    import litellm

    common: dict[str, Any] = {"api_base": f"{server.base_url}/v1", "api_key": "unused", "max_tokens": 8}
    expected = _expected(server)
    response = litellm.completion(model=f"openai/{LM_NAME}", messages=MESSAGES, temperature=0, **common)
    assert response.choices[0].message.content == expected and response.usage.completion_tokens == 8
    stream = litellm.completion(model=f"openai/{LM_NAME}", messages=MESSAGES, temperature=0, stream=True, **common)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == expected
    with pytest.raises(litellm.NotFoundError):
        litellm.completion(model="openai/no-such-model", messages=MESSAGES, num_retries=0, **common)
