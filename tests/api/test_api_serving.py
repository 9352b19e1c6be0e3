"""Completions, chat completions and classification through the real app and engines (api/serving.py):
response shape, token counts in `usage`, streaming, `star`, routing counts."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from star_serve.api.auth import Principal
from star_serve.api.schemas import ChatCompletionRequest, CompletionRequest
from star_serve.api.serving import GenerationCall, _sse

from .support import CLF_NAME, LABELS, LM_NAME, NUM_EXPERTS, NUM_LAYERS, Checkpoints, metric, star_of, stream_chunks

PROMPT = "Return a list of the words in the string"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
CHAT_TRANSCRIPT = "system: Be brief.\nuser: Say something.\nassistant:"  # no chat template: a plain transcript


def _completion(client: TestClient, headers: dict[str, str] | None = None, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/completions", json={"model": LM_NAME, "prompt": PROMPT} | fields, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _chat(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json={"model": LM_NAME, "messages": CHAT} | fields)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_completion_shape_and_usage(client: TestClient, checkpoints: Checkpoints) -> None:
    body = _completion(client, max_tokens=12, temperature=0)
    assert body["object"] == "text_completion" and body["model"] == LM_NAME
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", body["id"]), body["id"]
    assert isinstance(body["created"], int) and body["created"] > 0
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert isinstance(choice["text"], str) and choice["text"]
    assert choice["finish_reason"] == "length"  # the tiny LM never picks end-of-text (e2e/support.py)
    assert body["usage"] == {
        "prompt_tokens": checkpoints.count_tokens(PROMPT),
        "completion_tokens": 12,
        "total_tokens": checkpoints.count_tokens(PROMPT) + 12,
    }
    # no tenant named, no version committed: the default tenant on the trained bases, no routing asked for
    assert star_of(body) == {"tenant": "default", "subspace_version": 0, "routing": None}


def test_completion_without_max_tokens_generates_openais_default_16(client: TestClient) -> None:
    body = _completion(client, temperature=0)
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "length"


def test_prompt_list_and_n_count_each_prompt_once(client: TestClient, checkpoints: Checkpoints) -> None:
    prompts = ["first prompt here", "and a second, longer prompt than the first"]
    body = _completion(client, prompt=prompts, n=2, max_tokens=5, temperature=0.8, seed=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(checkpoints.count_tokens(p) for p in prompts)
    assert usage["completion_tokens"] == 4 * 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_the_same_seed_gives_the_same_sample(client: TestClient) -> None:
    first = _completion(client, max_tokens=8, temperature=1.0, seed=1234)
    again = _completion(client, max_tokens=8, temperature=1.0, seed=1234)
    assert first["choices"][0]["text"] == again["choices"][0]["text"]


def test_streamed_completion_equals_the_non_streamed_one(client: TestClient) -> None:
    common = {"model": LM_NAME, "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    full = _completion(client, **common)
    chunks = stream_chunks(client, "/v1/completions", common | {"stream_options": {"include_usage": True}})
    *deltas, last = chunks
    assert len(deltas) > 3, "a 20-token stream came in fewer than 4 chunks"
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == LM_NAME for c in chunks)
    assert all(len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 for c in deltas)
    assert "".join(c["choices"][0]["text"] for c in deltas) == full["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in deltas if c["choices"][0]["finish_reason"]] == ["length"]
    assert deltas[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in deltas)
    # stream_options.include_usage: one last chunk without choices, carrying the same usage as the full response
    assert last["choices"] == [] and last["usage"] == full["usage"]
    assert star_of(last) == {"tenant": "default", "subspace_version": 0}


@pytest.mark.parametrize("chat", [False, True])
def test_a_streamed_text_event_is_the_chunk_encoded_whole(client: TestClient, chat: bool) -> None:
    state = client.app.state.star  # type: ignore[attr-defined]
    body = (
        ChatCompletionRequest(model=LM_NAME, messages=CHAT) if chat else CompletionRequest(model=LM_NAME, prompt=PROMPT)
    )
    call = GenerationCall(state, state.model(LM_NAME, "generate"), Principal("tenant.a-1", admin=False), body)
    event = call._text_events()
    for index, text, version in [(0, "plain", 0), (3, ' "quoted"\\ \n\t', 12), (1, "é€😀\u0000}]", 7), (0, "", 1)]:
        content = {"content": text} if chat else text
        assert event(index, text, version) == _sse(call._chunk(index, content, None, version=version))


def test_stream_without_include_usage_sends_no_usage(client: TestClient) -> None:
    chunks = stream_chunks(client, "/v1/completions", {"model": LM_NAME, "prompt": PROMPT, "max_tokens": 4})
    assert chunks and all("usage" not in c and c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_completion_shape_and_usage(client: TestClient, checkpoints: Checkpoints) -> None:
    assert not checkpoints.tokenizer.chat_template  # so the prompt is the plain transcript of the messages
    body = _chat(client, max_tokens=7, temperature=0, user="someone")
    assert body["object"] == "chat.completion" and body["model"] == LM_NAME
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"]), body["id"]
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    prompt_tokens = checkpoints.count_tokens(CHAT_TRANSCRIPT)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 7, "total_tokens": prompt_tokens + 7}
    assert star_of(body) == {"tenant": "default", "subspace_version": 0, "routing": None}


def test_chat_max_completion_tokens_wins_over_max_tokens(client: TestClient) -> None:
    body = _chat(client, max_tokens=3, max_completion_tokens=5, temperature=0)
    assert body["usage"]["completion_tokens"] == 5


def test_streamed_chat_equals_the_non_streamed_one(client: TestClient) -> None:
    common = {"model": LM_NAME, "messages": CHAT, "max_tokens": 12, "temperature": 0}
    full = _chat(client, **common)
    chunks = stream_chunks(client, "/v1/chat/completions", common | {"stream_options": {"include_usage": True}})
    first, *deltas, last = chunks
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and first["id"].startswith("chatcmpl-")
    assert "".join(c["choices"][0]["delta"]["content"] for c in deltas) == full["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in deltas if c["choices"][0]["finish_reason"]] == ["length"]
    assert last["choices"] == [] and last["usage"] == full["usage"]


def _check_routing_table(table: list[list[int]], usage: dict[str, int]) -> None:
    assert len(table) == NUM_LAYERS
    assert all(len(layer) == NUM_EXPERTS and all(isinstance(c, int) and c >= 0 for c in layer) for layer in table)
    totals = {sum(layer) for layer in table}
    assert len(totals) == 1, f"layers saw different token counts: {table}"
    # top-1: every token the model processed (prompt and generated, the last one possibly never fed back)
    # went to exactly one expert in each layer
    assert totals.pop() in (usage["total_tokens"] - 1, usage["total_tokens"])


def test_return_routing_counts_every_token(client: TestClient) -> None:
    body = _completion(client, max_tokens=6, temperature=0, return_routing=True)
    [table] = star_of(body)["routing"]
    _check_routing_table(table, body["usage"])

    common = {"model": LM_NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "return_routing": True}
    chunks = stream_chunks(client, "/v1/completions", common | {"stream_options": {"include_usage": True}})
    routed = [c for c in chunks if "routing" in star_of(c)]
    assert [c["choices"][0]["finish_reason"] for c in routed] == ["length"], "routing not on the final chunk only"
    assert star_of(routed[0])["routing"] == [table]


def test_a_stop_sequence_ends_the_choice_before_it(client: TestClient) -> None:
    text = _completion(client, max_tokens=24, temperature=0)["choices"][0]["text"]
    words = [m for m in re.finditer(r"[A-Za-z]{3,}", text) if m.start() > 0]
    assert words, f"no word to stop on in {text!r}"
    stop = words[0].group()
    body = _completion(client, max_tokens=24, temperature=0, stop=[stop])
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == text[: text.index(stop)]
    assert body["usage"]["completion_tokens"] < 24


def test_x_tenant_names_the_tenant_without_auth(client: TestClient) -> None:
    body = _completion(client, headers={"X-Tenant": "acme"}, max_tokens=2)
    assert star_of(body)["tenant"] == "acme"


def test_usage_agrees_with_the_token_metrics(client: TestClient) -> None:
    before = {
        "prompt": metric(client, "star_prompt_tokens_total", model=LM_NAME),
        "generated": metric(client, "star_generated_tokens_total", model=LM_NAME),
        "ok": metric(client, "star_requests_total", model=LM_NAME, endpoint="completions", outcome="ok"),
    }
    usage = _completion(client, max_tokens=9, n=2, temperature=0.5, seed=2)["usage"]
    assert metric(client, "star_prompt_tokens_total", model=LM_NAME) - before["prompt"] == usage["prompt_tokens"]
    generated = metric(client, "star_generated_tokens_total", model=LM_NAME) - before["generated"]
    assert generated == usage["completion_tokens"] == 18
    ok = metric(client, "star_requests_total", model=LM_NAME, endpoint="completions", outcome="ok")
    assert ok - before["ok"] == 1


TEXTS = ["Send the request to the server and wait for the HTTP response.", "Return a list of the words.", "x"]


def _check_classification(item: dict[str, Any], index: int) -> None:
    assert item["index"] == index
    scores = item["scores"]
    assert set(scores) == set(LABELS)
    assert math.isclose(sum(scores.values()), 1.0, abs_tol=1e-4)
    assert item["label"] == max(scores, key=scores.__getitem__)
    assert math.isclose(item["score"], scores[item["label"]], rel_tol=1e-6)


def test_classify_one_input(client: TestClient, checkpoints: Checkpoints) -> None:
    response = client.post("/v1/classify", json={"model": CLF_NAME, "input": TEXTS[0]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == CLF_NAME
    [item] = body["data"]
    _check_classification(item, 0)
    tokens = checkpoints.count_tokens(TEXTS[0])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert star_of(body) == {"tenant": "default", "subspace_version": 0, "routing": None}


def test_classify_a_list_with_routing(client: TestClient, checkpoints: Checkpoints) -> None:
    request = {"model": CLF_NAME, "input": TEXTS, "return_routing": True}
    response = client.post("/v1/classify", json=request, headers={"X-Tenant": "t-classify"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == len(TEXTS)
    for index, item in enumerate(body["data"]):
        _check_classification(item, index)
    assert body["usage"]["prompt_tokens"] == sum(checkpoints.count_tokens(t) for t in TEXTS)
    star = star_of(body)
    assert star["tenant"] == "t-classify" and star["subspace_version"] == 0
    assert len(star["routing"]) == len(TEXTS)
    for text, table in zip(TEXTS, star["routing"], strict=True):
        assert len(table) == NUM_LAYERS
        assert all(len(layer) == NUM_EXPERTS and sum(layer) == checkpoints.count_tokens(text) for layer in table)
