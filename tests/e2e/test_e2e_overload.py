"""Bounded admission: beyond the running slots and the queue, requests get 429 with Retry-After."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .support import LM_NAME, Launcher, Server, assert_openai_error, wait_until

MAX_RUNNING, MAX_WAITING = 2, 2
LONG = {"model": LM_NAME, "prompt": "Return a list of the words", "max_tokens": 1500, "temperature": 0}


@pytest.fixture(scope="module")
def small_server(launch: Launcher) -> Iterator[Server]:
    server = launch(env={"STAR_MAX_RUNNING": str(MAX_RUNNING), "STAR_MAX_WAITING": str(MAX_WAITING)})
    yield server
    server.terminate()


def post(server: Server, body: dict[str, object]) -> httpx.Response:
    with httpx.Client(base_url=server.base_url, timeout=60.0) as client:
        return client.post("/v1/completions", json=body)


def assert_429(response: httpx.Response) -> None:
    assert_openai_error(response, 429)
    retry_after = response.headers.get("retry-after")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, response.headers


def test_full_server_refuses_with_429_then_recovers(small_server: Server) -> None:
    with ThreadPoolExecutor(max_workers=MAX_RUNNING + MAX_WAITING) as pool:
        admitted = [pool.submit(post, small_server, LONG) for _ in range(MAX_RUNNING + MAX_WAITING)]
        wait_until(
            lambda: small_server.running() == MAX_RUNNING and small_server.waiting() == MAX_WAITING,
            timeout=30,
            what=f"{MAX_RUNNING} running and {MAX_WAITING} waiting requests",
        )
        # slots and queue are full: whatever comes now is refused at once
        for _ in range(3):
            assert_429(post(small_server, {**LONG, "max_tokens": 2}))
        stream = httpx.post(f"{small_server.base_url}/v1/completions", json={**LONG, "stream": True}, timeout=10)
        assert_429(stream)
        with pytest.raises(openai.RateLimitError):
            small_server.openai().completions.create(model=LM_NAME, prompt="x", max_tokens=2)
        assert small_server.waiting() == MAX_WAITING, "a refused request was queued anyway"
        results = [f.result(timeout=120) for f in admitted]
    for response in results:
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == LONG["max_tokens"]
    wait_until(lambda: small_server.running() == 0 and small_server.waiting() == 0, 10, "an idle engine")
    recovered = post(small_server, {**LONG, "max_tokens": 3})
    assert recovered.status_code == 200, recovered.text


def test_burst_beyond_capacity(small_server: Server) -> None:
    """More simultaneous long requests than slots + queue: some 429 (with Retry-After), the rest succeed."""
    burst = 3 * (MAX_RUNNING + MAX_WAITING)
    barrier = threading.Barrier(burst)

    def fire() -> httpx.Response:
        with httpx.Client(base_url=small_server.base_url, timeout=120.0) as client:
            barrier.wait(timeout=30)
            return client.post("/v1/completions", json=LONG)

    with ThreadPoolExecutor(max_workers=burst) as pool:
        responses = list(pool.map(lambda _: fire(), range(burst)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for r in responses if r.status_code == 429]
    served = [r for r in responses if r.status_code == 200]
    assert refused, f"no 429 among {burst} simultaneous requests with capacity {MAX_RUNNING + MAX_WAITING}"
    assert len(served) >= MAX_RUNNING, statuses
    for response in refused:
        assert_429(response)
    for response in served:
        assert response.json()["usage"]["completion_tokens"] == LONG["max_tokens"]
