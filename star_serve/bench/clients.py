"""Streaming clients against an OpenAI-compatible server, measured the way its users measure one: every request
streamed to `/v1/completions`, greedy and of a fixed length (`ignore_eos`), from `clients` concurrent clients.

Per request: the time to its first token, and its time per output token after the first (the time from the
first token to the last over the tokens in between). Over the run: completion tokens/s, and each latency's
p50 and p99 over the requests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import httpx


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def stream_load(
    url: str,
    model: str,
    prompts: Sequence[str | list[int]],
    max_tokens: int,
    clients: int,
) -> dict[str, float]:
    queue: asyncio.Queue[str | list[int]] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    first_token: list[float] = []
    per_token: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            body = {
                "model": model,
                "prompt": queue.get_nowait(),
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            started = time.perf_counter()
            first = last = None
            generated = 0
            async with http.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line.removeprefix("data: "))
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        last = time.perf_counter()
                        first = first or last
                    if chunk.get("usage"):
                        generated = chunk["usage"]["completion_tokens"]
            if first is None or last is None or not generated:
                raise RuntimeError(f"a streamed completion from {url} ended without text or usage")
            tokens += generated
            first_token.append(first - started)
            if generated > 1:
                per_token.append((last - first) / (generated - 1))

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - started
    return {
        "tokens_per_s": tokens / seconds,
        "ttft_p50_ms": 1000 * _quantile(first_token, 0.5),
        "ttft_p99_ms": 1000 * _quantile(first_token, 0.99),
        "tpot_p50_ms": 1000 * _quantile(per_token, 0.5) if per_token else float("nan"),
        "tpot_p99_ms": 1000 * _quantile(per_token, 0.99) if per_token else float("nan"),
    }
