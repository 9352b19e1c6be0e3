"""Generation through the official openai client against a real server: shape, usage, streaming, sampling."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from .support import LM_CONTEXT, LM_NAME, NUM_EXPERTS, NUM_LAYERS, Checkpoints, Server, star_of

PROMPT = "Return a list of the words in the string"


def test_health_ready_metrics(server: Server) -> None:
    health = server.http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert server.http.get("/ready").status_code == 200
    metrics = server.http.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "star_requests_running" in metrics.text


def test_models_list(server: Server) -> None:
    models = server.openai().models.list()
    assert {m.id for m in models.data} == {"tiny-lm", "tiny-clf"}
    assert all(m.object == "model" for m in models.data)


def test_completion(server: Server, checkpoints: Checkpoints) -> None:
    response = server.openai().completions.create(model=LM_NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    assert response.object == "text_completion" and response.model == LM_NAME
    [choice] = response.choices
    assert choice.index == 0 and isinstance(choice.text, str) and choice.text
    assert choice.finish_reason == "length"
    usage = response.usage
    assert usage is not None
    assert usage.prompt_tokens == checkpoints.count_tokens(PROMPT) > 0
    assert usage.completion_tokens == 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    star = star_of(response)
    assert star["tenant"] == "default"
    assert isinstance(star["subspace_version"], int) and star["subspace_version"] >= 0
    assert star.get("routing") is None


def test_chat_completion(server: Server) -> None:
    response = server.openai().chat.completions.create(
        model=LM_NAME,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}],
        max_tokens=20,
        temperature=0,
        user="someone",
    )
    assert response.object == "chat.completion"
    [choice] = response.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage is not None
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens == 20
    assert response.usage.total_tokens == response.usage.prompt_tokens + 20
    star = star_of(response)
    assert star["tenant"] == "default" and isinstance(star["subspace_version"], int)


def test_default_max_tokens_is_bounded(server: Server) -> None:
    """/v1/completions without max_tokens: OpenAI's default of 16 tokens."""
    response = server.openai().completions.create(model=LM_NAME, prompt=PROMPT, temperature=0)
    assert response.usage is not None and response.usage.completion_tokens == 16


def test_x_tenant_header_names_the_tenant_without_auth(server: Server) -> None:
    client = server.openai(default_headers={"X-Tenant": "acme"})
    response = client.completions.create(model=LM_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    assert star_of(response)["tenant"] == "acme"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_equals_non_stream(server: Server, endpoint: str) -> None:
    client = server.openai()
    common: dict[str, Any] = {"model": LM_NAME, "max_tokens": 40, "temperature": 0}
    if endpoint == "completions":
        full = client.completions.create(prompt=PROMPT, **common)
        expected = full.choices[0].text
        chunks = list(
            client.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **common)
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    else:
        messages = [{"role": "user", "content": PROMPT}]
        full = client.chat.completions.create(messages=messages, **common)
        expected = full.choices[0].message.content
        chunks = list(
            client.chat.completions.create(
                messages=messages, stream=True, stream_options={"include_usage": True}, **common
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3, "a 40-token stream came in fewer than 4 chunks"
    assert text == expected
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 40
    assert full.usage is not None and last.usage.prompt_tokens == full.usage.prompt_tokens
    assert star_of(last)["tenant"] == "default"
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_and_sse_framing(server: Server) -> None:
    body = {"model": LM_NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events), events
    assert events[-1] == "data: [DONE]"
    assert events.count("data: [DONE]") == 1
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert all(chunk.get("usage") is None for chunk in chunks), "usage sent without stream_options.include_usage"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def test_n_choices_seed_and_reproducibility(server: Server) -> None:
    client = server.openai()

    def sample(seed: int) -> list[str]:
        response = client.completions.create(
            model=LM_NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed, n=3
        )
        assert sorted(c.index for c in response.choices) == [0, 1, 2]
        assert response.usage is not None and response.usage.completion_tokens == 3 * 16
        return [c.text for c in sorted(response.choices, key=lambda c: c.index)]

    first = sample(7)
    assert len(set(first)) > 1, f"three sampled choices are all equal: {first}"
    assert sample(7) == first, "the same seed gave different texts"
    assert sample(8) != first


def test_chat_n_and_seed(server: Server) -> None:
    client = server.openai()
    kwargs: dict[str, Any] = {
        "model": LM_NAME,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 12,
        "temperature": 0.9,
        "top_p": 0.9,
        "seed": 3,
        "n": 2,
    }
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def _stop_within(text: str) -> tuple[str, str]:
    """A stop string from the middle of `text` and the text before its first occurrence."""
    for start in range(len(text) // 2, len(text) - 3):
        stop = text[start : start + 3]
        cut = text.find(stop)
        if cut > 0 and stop.strip():
            return stop, text[:cut]
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_cuts_text(server: Server, stream: bool) -> None:
    client = server.openai()
    base = client.completions.create(model=LM_NAME, prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    stop, expected = _stop_within(base)
    if stream:
        chunks = list(
            client.completions.create(
                model=LM_NAME, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "never-appears"], stream=True
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        reason = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    else:
        response = client.completions.create(model=LM_NAME, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop)
        text, reason = response.choices[0].text, response.choices[0].finish_reason
        assert response.usage is not None and response.usage.completion_tokens < 40
    assert text == expected
    assert stop not in text
    assert reason == "stop"


def _per_choice(routing: Any, n: int) -> list[list[list[int]]]:
    """`star.routing` as one (layers x experts) table per choice: the server nests a table per choice/input;
    a bare table is accepted for a single choice."""
    assert isinstance(routing, list) and routing, routing
    if n == 1 and all(isinstance(x, int) for x in routing[0]):
        routing = [routing]
    assert len(routing) == n, routing
    return routing


def test_return_routing_on_completion(server: Server) -> None:
    response = server.openai().completions.create(
        model=LM_NAME, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"return_routing": True}
    )
    [table] = _per_choice(star_of(response).get("routing"), 1)
    assert len(table) == NUM_LAYERS
    assert all(len(layer) == NUM_EXPERTS and all(isinstance(c, int) and c >= 0 for c in layer) for layer in table)
    totals = {sum(layer) for layer in table}
    assert len(totals) == 1, f"layers saw different token counts: {table}"
    usage = response.usage
    assert usage is not None
    # top-1 routing: every token the model processed (prompt and generated, the last one possibly not fed
    # back) went to exactly one expert per layer
    assert totals.pop() in (usage.prompt_tokens + usage.completion_tokens - 1, usage.total_tokens)


def test_return_routing_with_n_and_chat(server: Server) -> None:
    response = server.openai().chat.completions.create(
        model=LM_NAME,
        messages=[{"role": "user", "content": "route me"}],
        max_tokens=6,
        n=2,
        temperature=0.7,
        seed=1,
        extra_body={"return_routing": True},
    )
    tables = _per_choice(star_of(response).get("routing"), 2)
    assert all(len(t) == NUM_LAYERS and all(len(layer) == NUM_EXPERTS for layer in t) for t in tables)


def test_streamed_routing_arrives_with_the_final_chunk(server: Server) -> None:
    chunks = list(
        server.openai().completions.create(
            model=LM_NAME, prompt=PROMPT, max_tokens=6, temperature=0, stream=True, extra_body={"return_routing": True}
        )
    )
    routed = [star_of(c).get("routing") for c in chunks if star_of(c).get("routing")]
    assert routed, "no chunk carried star.routing"
    [table] = _per_choice(routed[-1], 1)
    assert len(table) == NUM_LAYERS and all(len(layer) == NUM_EXPERTS for layer in table)


def test_classify_is_not_served_by_the_openai_routes(server: Server) -> None:
    response = server.http.post("/v1/completions", json={"model": "tiny-clf", "prompt": "x", "max_tokens": 2})
    assert response.status_code in (400, 404), response.text


def test_health_is_cheap_during_generation(server: Server) -> None:
    """Liveness answers while a generation is running (the engine runs off the event loop)."""
    body = {"model": LM_NAME, "prompt": PROMPT, "max_tokens": 600, "temperature": 0, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert httpx.get(f"{server.base_url}/health", timeout=2.0).status_code == 200


def test_prompt_list_and_n_usage(server: Server, checkpoints: Checkpoints) -> None:
    """Two prompts x n=2: four choices indexed prompt-major; like OpenAI and vLLM, usage counts each prompt's
    tokens once (not once per choice) and every generated token."""
    prompts = ["first prompt here", "and a second, longer prompt than the first"]
    response = server.openai().completions.create(
        model=LM_NAME, prompt=prompts, n=2, max_tokens=5, temperature=0.5, seed=11
    )
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    usage = response.usage
    assert usage is not None
    assert usage.completion_tokens == 4 * 5
    assert usage.prompt_tokens == sum(checkpoints.count_tokens(p) for p in prompts), (
        f"prompt_tokens {usage.prompt_tokens} for prompts of {[checkpoints.count_tokens(p) for p in prompts]} "
        "tokens: the prompts are counted once per choice"
    )
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_context_boundary(server: Server, checkpoints: Checkpoints) -> None:
    """prompt + max_tokens == context is allowed and generates to the end; one more token is a 400."""
    prompt = " ".join(f"word{i}" for i in range(LM_CONTEXT))
    ids = checkpoints.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    prompt = checkpoints.tokenizer.decode(ids[: LM_CONTEXT - 20])
    prompt_tokens = checkpoints.count_tokens(prompt)
    assert LM_CONTEXT - 40 < prompt_tokens < LM_CONTEXT
    room = LM_CONTEXT - prompt_tokens
    response = server.openai().completions.create(model=LM_NAME, prompt=prompt, max_tokens=room, temperature=0)
    assert response.usage is not None and response.usage.completion_tokens == room
    assert response.usage.prompt_tokens == prompt_tokens
    too_long = server.http.post(
        "/v1/completions", json={"model": LM_NAME, "prompt": prompt, "max_tokens": room + 1, "temperature": 0}
    )
    assert too_long.status_code == 400, too_long.text


def test_tiny_top_p_is_greedy(server: Server) -> None:
    client = server.openai()
    greedy = client.completions.create(model=LM_NAME, prompt=PROMPT, max_tokens=20, temperature=0)
    nucleus = client.completions.create(
        model=LM_NAME, prompt=PROMPT, max_tokens=20, temperature=1.5, top_p=1e-6, seed=5
    )
    assert nucleus.choices[0].text == greedy.choices[0].text


def test_chat_stream_starts_with_the_assistant_role(server: Server) -> None:
    chunks = list(
        server.openai().chat.completions.create(
            model=LM_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1


def test_invalid_x_tenant_header(server: Server) -> None:
    response = server.http.post(
        "/v1/completions", json={"model": LM_NAME, "prompt": "x", "max_tokens": 2}, headers={"X-Tenant": "no spaces!"}
    )
    assert response.status_code in (400, 422), response.text


def test_a_repeated_prompt_prefix_is_served_from_the_prefix_cache(server: Server) -> None:
    """Blocks of 16 tokens: a prompt of several blocks sent again is prefilled from its last block only, and
    greedy decoding gives the same text (the server's default tenant routes with the trained bases)."""
    prompt = " ".join(["return a list of the words in the string and the sum of the numbers"] * 6)
    client = server.openai()
    hits = server.metric("star_prefix_cache_hits_total", model=LM_NAME)
    first = client.completions.create(
        model=LM_NAME, prompt=prompt, max_tokens=8, temperature=0, extra_headers={"X-Tenant": "prefix"}
    )
    again = client.completions.create(
        model=LM_NAME, prompt=prompt, max_tokens=8, temperature=0, extra_headers={"X-Tenant": "prefix"}
    )
    assert first.usage is not None and first.usage.prompt_tokens >= 48
    assert again.choices[0].text == first.choices[0].text
    reused = server.metric("star_prefix_cache_hits_total", model=LM_NAME) - hits
    assert reused == (first.usage.prompt_tokens - 1) // 16 * 16
    assert 0 < server.metric("star_prefix_cache_usage_ratio", model=LM_NAME) <= 1
