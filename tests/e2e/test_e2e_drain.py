"""SIGTERM: readiness fails, new inference gets 503, in-flight requests finish, then the process exits 0."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from .support import LM_NAME, Launcher, assert_openai_error, wait_until

TOKENS = 1900
BODY = {"model": LM_NAME, "prompt": "Return a list of the words", "max_tokens": TOKENS, "temperature": 0}


def test_sigterm_drains_in_flight_requests(launch: Launcher) -> None:
    server = launch(env={"STAR_ADAPTATION": "off"})  # the two requests' texts are compared: same bases for both
    base = server.base_url

    def plain() -> httpx.Response:
        return httpx.post(f"{base}/v1/completions", json=BODY, timeout=60.0)

    def streamed() -> tuple[int, list[str]]:
        with httpx.stream("POST", f"{base}/v1/completions", json={**BODY, "stream": True}, timeout=60.0) as response:
            return response.status_code, [line for line in response.iter_lines() if line]

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            in_flight = pool.submit(plain)
            in_flight_stream = pool.submit(streamed)
            wait_until(lambda: server.running() == 2, timeout=30, what="two requests in the running batch")

            server.proc.send_signal(signal.SIGTERM)
            wait_until(
                lambda: httpx.get(f"{base}/ready", timeout=2.0).status_code == 503, timeout=10, what="/ready 503"
            )
            assert httpx.get(f"{base}/health", timeout=2.0).status_code == 200
            assert server.running() == 2, "draining cut the in-flight requests short"
            try:
                refused: httpx.Response | None = httpx.post(f"{base}/v1/completions", json=BODY, timeout=10.0)
            except httpx.ConnectError:
                refused = None  # the process has already gone: also a refusal
            if refused is not None:
                assert_openai_error(refused, 503)
                chat = {"model": LM_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                assert_openai_error(httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=10.0), 503)

            response = in_flight.result(timeout=60)
            status, events = in_flight_stream.result(timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == TOKENS
        assert response.json()["choices"][0]["finish_reason"] == "length"
        assert status == 200 and events[-1] == "data: [DONE]"
        chunks: list[dict[str, Any]] = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        streamed_text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert streamed_text == response.json()["choices"][0]["text"]

        code = server.proc.wait(timeout=30)
        assert code == 0, f"star-serve exited with {code} after SIGTERM (expected 0):\n{server.log()}"
    finally:
        server.kill()
    try:
        httpx.get(f"{base}/health", timeout=2.0)
        raise AssertionError("the server still answers after it exited")
    except httpx.ConnectError:
        pass


def test_sigterm_when_idle_exits_zero(launch: Launcher) -> None:
    server = launch()
    try:
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=30)
    finally:
        server.kill()
    assert code == 0, f"star-serve exited with {code} after SIGTERM (expected 0):\n{server.log()}"
