"""The OpenAI fields that log-likelihood clients (lm-evaluation-harness) and samplers use, through the real
app: `logprobs`, `echo` with `max_tokens` 0 and token-id prompts, chat's `logprobs`/`top_logprobs`,
`best_of`, the penalties, `logit_bias`, `min_tokens`, `stop_token_ids`, and the 400s of their misuse."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from star_serve.model import StarMoeForCausalLM

from .support import LM_NAME, Checkpoints, assert_openai_error, stream_chunks

PROMPT = "Return a list of the words in the string"
CHAT = [{"role": "user", "content": "Say something."}]


def _post(client: TestClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json={"model": LM_NAME} | body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


@pytest.fixture(scope="module")
def reference(checkpoints: Checkpoints) -> StarMoeForCausalLM:
    return StarMoeForCausalLM.from_pretrained(checkpoints.lm_dir, torch_dtype=torch.float32).eval()


@torch.no_grad()
def _logprobs(model: StarMoeForCausalLM, ids: list[int]) -> list[float]:
    """Each token's log-probability after the ones before it (the first excluded), the sequence alone."""
    logits = model(torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_echo_with_max_tokens_zero_scores_a_token_prompt_as_lm_eval_asks(
    client: TestClient, checkpoints: Checkpoints, reference: StarMoeForCausalLM
) -> None:
    ids = checkpoints.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    body = _post(client, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1})
    [choice] = body["choices"]
    scored = choice["logprobs"]
    assert choice["text"] == checkpoints.tokenizer.decode(ids) and choice["finish_reason"] == "length"
    assert len(scored["tokens"]) == len(ids) and "".join(scored["tokens"]) == choice["text"]
    assert scored["token_logprobs"][0] is None and scored["top_logprobs"][0] is None
    assert scored["token_logprobs"][1:] == pytest.approx(_logprobs(reference, ids), abs=1e-4)
    assert scored["text_offset"] == [sum(len(t) for t in scored["tokens"][:i]) for i in range(len(ids))]
    for token, value, top in zip(
        scored["tokens"][1:], scored["token_logprobs"][1:], scored["top_logprobs"][1:], strict=True
    ):
        assert top[token] == value and 1 <= len(top) <= 2  # the most likely one, and the token itself
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_completion_logprobs_of_generated_tokens_and_their_stream(
    client: TestClient, checkpoints: Checkpoints, reference: StarMoeForCausalLM
) -> None:
    request = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3}
    [choice] = _post(client, "/v1/completions", request)["choices"]
    scored = choice["logprobs"]
    assert len(scored["tokens"]) == 6 and scored["text_offset"][0] == 0
    if "\ufffd" not in "".join(scored["tokens"]):  # no token is part of a multi-byte character
        assert "".join(scored["tokens"]) == choice["text"]
    for top, value in zip(scored["top_logprobs"], scored["token_logprobs"], strict=True):
        assert 1 <= len(top) <= 4 and max(top.values()) == value  # greedy: the token is the most likely
    prompt_ids = checkpoints.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    generated = checkpoints.tokenizer(choice["text"], add_special_tokens=False)["input_ids"]
    if len(generated) == 6:  # the text re-encodes to the same tokens (BPE need not): compare directly
        direct = _logprobs(reference, prompt_ids + generated)[len(prompt_ids) - 1 :]
        assert scored["token_logprobs"] == pytest.approx(direct, abs=1e-4)

    chunks = stream_chunks(client, "/v1/completions", {"model": LM_NAME} | request)
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert [t for part in streamed for t in part["tokens"]] == scored["tokens"]
    assert [v for part in streamed for v in part["token_logprobs"]] == pytest.approx(scored["token_logprobs"])
    assert [o for part in streamed for o in part["text_offset"]] == scored["text_offset"]


def test_echo_streams_the_prompt_first(client: TestClient) -> None:
    chunks = stream_chunks(
        client, "/v1/completions", {"model": LM_NAME, "prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 0}
    )
    first = chunks[0]["choices"][0]
    assert first["text"] == PROMPT and first["logprobs"]["token_logprobs"][0] is None
    assert len(first["logprobs"]["tokens"]) == len(first["logprobs"]["token_logprobs"]) > 1
    whole = _post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "echo": True, "temperature": 0})
    assert whole["choices"][0]["text"].startswith(PROMPT) and whole["choices"][0]["logprobs"] is None


def test_chat_logprobs_and_top_logprobs(client: TestClient) -> None:
    body = _post(
        client,
        "/v1/chat/completions",
        {"messages": CHAT, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2},
    )
    [choice] = body["choices"]
    content = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == choice["message"]["content"] and len(content) == 4
    for token in content:
        assert token["bytes"] == list(token["token"].encode()) and token["logprob"] <= 0
        assert len(token["top_logprobs"]) == 2 and token["top_logprobs"][0]["logprob"] == token["logprob"]
    plain = _post(client, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "logprobs": True})
    assert all(t["top_logprobs"] == [] for t in plain["choices"][0]["logprobs"]["content"])
    chunks = stream_chunks(
        client,
        "/v1/chat/completions",
        {"model": LM_NAME, "messages": CHAT, "max_tokens": 4, "temperature": 0, "logprobs": True},
    )
    streamed = [
        t
        for c in chunks
        if c["choices"] and c["choices"][0]["logprobs"]
        for t in c["choices"][0]["logprobs"]["content"]
    ]
    assert [t["token"] for t in streamed] == [t["token"] for t in content]


def test_best_of_returns_the_most_likely_of_the_same_seeded_draws(client: TestClient) -> None:
    common = {"prompt": PROMPT, "max_tokens": 5, "temperature": 1.0, "seed": 11, "logprobs": 0}
    draws = _post(client, "/v1/completions", common | {"n": 3})
    best = _post(client, "/v1/completions", common | {"n": 1, "best_of": 3})

    def mean(choice: dict[str, Any]) -> float:
        values = choice["logprobs"]["token_logprobs"]
        return sum(values) / len(values)

    expected = max(draws["choices"], key=mean)
    [choice] = best["choices"]
    assert choice["index"] == 0 and choice["text"] == expected["text"]
    assert best["usage"]["completion_tokens"] == 15  # every draw is generated, and counted
    without = _post(client, "/v1/completions", {k: v for k, v in common.items() if k != "logprobs"} | {"best_of": 3})
    assert without["choices"][0]["text"] == expected["text"] and without["choices"][0]["logprobs"] is None


def test_logit_bias_and_stop_token_ids_through_the_api(client: TestClient, checkpoints: Checkpoints) -> None:
    forced = checkpoints.tokenizer(" words", add_special_tokens=False)["input_ids"][0]
    text = checkpoints.tokenizer.decode([forced])
    biased = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logit_bias": {str(forced): 100}}
    assert _post(client, "/v1/completions", biased)["choices"][0]["text"] == text * 3
    stopped = _post(client, "/v1/completions", biased | {"stop_token_ids": [forced], "min_tokens": 2})
    [choice] = stopped["choices"]
    assert choice["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 3
    assert text not in choice["text"]  # masked for the first two; the third ends it and is not shown
    penalised = _post(
        client, "/v1/completions", biased | {"frequency_penalty": 2, "presence_penalty": 2, "repetition_penalty": 1.2}
    )
    assert penalised["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/completions", {"suffix": "x"}, "suffix"),  # a field this server does not know
        ("/v1/chat/completions", {"echo": True}, "echo"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"best_of": 1, "n": 2}, "best_of"),
        ("/v1/completions", {"best_of": 2, "stream": True}, "best_of"),
        ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
        ("/v1/completions", {"stop_token_ids": [99999999]}, "stop_token_ids"),
        ("/v1/completions", {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": [1, 99999999]}, "prompt"),
        ("/v1/completions", {"prompt": [[]]}, "prompt"),
        ("/v1/completions", {"presence_penalty": 3}, "presence_penalty"),
        ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_misused_fields_are_400_naming_them(client: TestClient, path: str, fields: dict[str, Any], param: str) -> None:
    body = {"model": LM_NAME, "max_tokens": 4} | ({"messages": CHAT} if "chat" in path else {"prompt": PROMPT}) | fields
    error = assert_openai_error(client.post(path, json=body), 400)
    assert error["param"] == param, error


def test_top_k_one_samples_the_most_likely_token(client: TestClient) -> None:
    greedy = _post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    sampled = _post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.5, "top_k": 1})
    assert sampled["choices"][0]["text"] == greedy["choices"][0]["text"]
