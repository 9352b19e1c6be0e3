"""Many tenants in one running batch: each answer is what the same request gets alone."""

from __future__ import annotations

import asyncio
from typing import Any

from .support import LM_NAME, Server, star_of

TENANTS = [f"tenant-{i}" for i in range(8)]
WORDS = [
    "list",
    "words",
    "string",
    "return",
    "value",
    "object",
    "file",
    "module",
    "class",
    "function",
    "error",
    "number",
]


def requests() -> list[tuple[str, dict[str, Any]]]:
    """32 (tenant, request) pairs: different prompts and lengths; a quarter seeded samples, the rest greedy."""
    out = []
    for i in range(32):
        prompt = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 6))
        params: dict[str, Any] = {"model": LM_NAME, "prompt": prompt, "max_tokens": 12 + (i % 5) * 5}
        params |= {"temperature": 0.8, "seed": 100 + i} if i % 4 == 3 else {"temperature": 0}
        out.append((TENANTS[i % len(TENANTS)], params))
    return out


def batch_sizes(server: Server) -> tuple[float, float]:
    """(decode forwards, decode forwards of one sequence) so far."""
    total = server.metric("star_batch_size_count", model=LM_NAME, phase="decode")
    single = server.metric("star_batch_size_bucket", model=LM_NAME, phase="decode", le="1.0")
    return total, single


def test_concurrent_tenants_match_solo_answers(server: Server) -> None:
    work = requests()
    client = server.openai()
    solo = []
    for tenant, params in work:
        response = client.completions.create(**params, extra_headers={"X-Tenant": tenant})
        assert star_of(response)["tenant"] == tenant
        solo.append(response.choices[0].text)
    assert len(set(solo)) > len(solo) // 2, "the prompts hardly differ: the test would prove little"

    before = batch_sizes(server)

    async def together() -> list[Any]:
        async with server.async_openai() as aclient:
            calls = [aclient.completions.create(**p, extra_headers={"X-Tenant": t}) for t, p in work]
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(together())
    after = batch_sizes(server)
    batched_steps = (after[0] - before[0]) - (after[1] - before[1])
    assert batched_steps > 0, "no decode step ran more than one sequence: the requests were not batched"

    mismatches = []
    for (tenant, params), response, expected in zip(work, responses, solo, strict=True):
        assert star_of(response)["tenant"] == tenant
        assert response.usage.completion_tokens == params["max_tokens"]
        if response.choices[0].text != expected:
            mismatches.append((tenant, params["prompt"], expected, response.choices[0].text))
    assert not mismatches, f"{len(mismatches)} of {len(work)} batched answers differ from solo: {mismatches[:3]}"
