"""Two server processes on one real Redis: one tenant's traffic on both, versions only increase, every
statistics batch either replica publishes is applied exactly once by the tenant's single owner, and both
replicas end up serving the same committed version."""

from __future__ import annotations

import redis
from prometheus_client.parser import text_string_to_metric_families

from .support import LM_NAME, Launcher, Server, wait_until

PROMPT = "the quick brown fox jumps over the lazy dog and then the"


def _served_version(server: Server, tenant: str) -> int:
    body = {"model": LM_NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    response = server.http.post("/v1/completions", json=body, headers={"X-Tenant": tenant})
    assert response.status_code == 200, response.text
    return int(response.json()["star"]["subspace_version"])


def _state_version(server: Server, tenant: str) -> int:
    response = server.http.get("/v1/subspace", params={"model": LM_NAME}, headers={"X-Tenant": tenant})
    assert response.status_code == 200, response.text
    return int(response.json()["version"])


def _batches(server: Server) -> dict[str, float]:
    """The replica's statistics batches by outcome, from its /metrics."""
    families = text_string_to_metric_families(server.http.get("/metrics").text)
    family = next(f for f in families if f.name == "star_adaptation_batches")
    return {s.labels["outcome"]: s.value for s in family.samples if s.labels["model"] == LM_NAME}


def test_replicas_share_versions_through_redis(launch: Launcher, redis_url: str) -> None:
    env = {
        "STAR_REDIS_URL": redis_url,
        "STAR_ADAPTATION": "async",
        "STAR_ADAPTATION_QUALITY_GATE": "false",  # commits every step: this tests the pipeline
        "STAR_ADAPTATION_MIN_TOKENS": "16",
        "STAR_ADAPTATION_LEARNING_RATE": "0.2",
    }
    replicas = [launch(env=env), launch(env=env)]
    for server in replicas:
        assert server.http.get("/ready").json()["store"] == "ok", server.log()

    seen: dict[int, list[int]] = {0: [], 1: []}

    def adapted() -> bool:
        for i, server in enumerate(replicas):
            seen[i].append(_served_version(server, "shared"))
        return min(_state_version(s, "shared") for s in replicas) >= 3

    wait_until(adapted, timeout=90, what="both replicas at version 3 or later")
    for versions in seen.values():
        assert versions == sorted(versions), versions  # what a replica serves never goes back

    # with the traffic stopped, announcements (or polling) bring both to the same latest version
    wait_until(
        lambda: len({_state_version(s, "shared") for s in replicas}) == 1,
        timeout=30,
        what="both replicas on the same version",
    )
    final = _state_version(replicas[0], "shared")
    assert {_served_version(s, "shared") for s in replicas} >= {final}

    # every batch published by either replica was handled once, by one owner, and each applied id recorded once.
    # A batch held back by the minimum interval may still go out, so the counters are read on both sides of the
    # store's record and taken only when nothing moved in between.
    applied_key, store = f"star:{{{LM_NAME}:shared}}:applied", redis.Redis.from_url(redis_url)
    seen_settled: list[tuple[list[dict[str, float]], int]] = []

    def settled() -> bool:
        before = [_batches(s) for s in replicas]
        recorded = int(store.zcard(applied_key))
        after = [_batches(s) for s in replicas]
        handled = sum(c["applied"] + c["stale"] + c["refused"] + c["frozen"] for c in after)
        seen_settled[:] = [(after, recorded)]
        return before == after and handled == sum(c["published"] for c in after)

    wait_until(settled, timeout=30, what="every published batch handled")
    ((counts, recorded),) = seen_settled
    assert all(c["published"] > 0 for c in counts)  # both replicas captured traffic
    assert sum(c["applied"] > 0 for c in counts) == 1  # one owner applied it all
    assert sum(c["applied"] for c in counts) == recorded >= 3
