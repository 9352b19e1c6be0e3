"""A client that hangs up frees its sequence's slot at once, not when the generation would have ended."""

from __future__ import annotations

import time

import httpx
import pytest

from .support import LM_CONTEXT, LM_NAME, Server, wait_until

PROMPT = "Return a list of the words"
LONG_TOKENS = LM_CONTEXT - 64


def seconds_per_token(server: Server) -> float:
    """A solo greedy generation's time per token: what the long request would have cost."""
    tokens = 200
    start = time.monotonic()
    response = server.http.post(
        "/v1/completions", json={"model": LM_NAME, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    return (time.monotonic() - start) / tokens


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_stream_disconnect_frees_the_slot(server: Server, endpoint: str) -> None:
    full_duration = seconds_per_token(server) * LONG_TOKENS
    body: dict[str, object] = {"model": LM_NAME, "max_tokens": LONG_TOKENS, "temperature": 0, "stream": True}
    body |= {"messages": [{"role": "user", "content": PROMPT}]} if "chat" in endpoint else {"prompt": PROMPT}
    wait_until(lambda: server.running() == 0, timeout=10, what="an idle engine")
    with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
        with client.stream("POST", endpoint, json=body) as response:
            assert response.status_code == 200
            events = 0
            lines = response.iter_lines()  # kept alive: a dropped iter_lines() generator closes the connection
            for line in lines:
                events += line.startswith("data: ")
                if events >= 3:
                    break
            assert events >= 3
            assert server.running() == 1, "the streaming request is not in the running batch"
        closed_at = time.monotonic()
    freed_after = wait_until(lambda: server.running() == 0, timeout=max(2.0, full_duration), what="a freed slot")
    assert time.monotonic() - closed_at < full_duration / 2, (
        f"the slot was freed {freed_after:.2f} s after the client left; the whole generation takes "
        f"~{full_duration:.2f} s"
    )
    assert server.metric("star_requests_running") == 0


def test_non_stream_disconnect_frees_the_slot(server: Server) -> None:
    full_duration = seconds_per_token(server) * LONG_TOKENS
    wait_until(lambda: server.running() == 0, timeout=10, what="an idle engine")
    body = {"model": LM_NAME, "prompt": PROMPT, "max_tokens": LONG_TOKENS, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before the answer could come
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=httpx.Timeout(30.0, read=full_duration / 8))
    closed_at = time.monotonic()
    wait_until(lambda: server.running() == 0, timeout=max(2.0, full_duration), what="a freed slot")
    assert time.monotonic() - closed_at < full_duration / 2
