"""Redis stopped mid-run: serving goes on from cached bases, /ready reports the store degraded, and the
statistics gathered meanwhile are committed once Redis is back."""

from __future__ import annotations

import redis

from .support import LM_NAME, Launcher, RedisProcess, Server, wait_until

PROMPT = "the quick brown fox jumps over the lazy dog and then the"


def _complete(server: Server, tenant: str) -> int:
    body = {"model": LM_NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    response = server.http.post("/v1/completions", json=body, headers={"X-Tenant": tenant})
    assert response.status_code == 200, response.text
    return int(response.json()["star"]["subspace_version"])


def _version(server: Server, tenant: str) -> int:
    response = server.http.get("/v1/subspace", params={"model": LM_NAME}, headers={"X-Tenant": tenant})
    assert response.status_code == 200, response.text
    return int(response.json()["version"])


def test_serving_survives_a_redis_outage(launch: Launcher, own_redis: RedisProcess) -> None:
    env = {
        "STAR_REDIS_URL": own_redis.url,
        "STAR_ADAPTATION": "async",
        "STAR_ADAPTATION_QUALITY_GATE": "false",  # commits every step: this tests the pipeline
        "STAR_ADAPTATION_MIN_TOKENS": "16",
        "STAR_ADAPTATION_LEARNING_RATE": "0.2",
    }
    server = launch(env=env)
    wait_until(lambda: _complete(server, "steady") >= 0 and _version(server, "steady") >= 1, 60, "a first version")
    before = _version(server, "steady")

    own_redis.stop()
    served_during = [_complete(server, "steady") for _ in range(3)]  # every request still answered
    assert all(v >= before for v in served_during)
    wait_until(lambda: server.http.get("/ready").json().get("store") == "degraded", 30, "/ready: store degraded")
    assert server.http.get("/ready").status_code == 200
    assert _version(server, "steady") == before  # nothing committed while the store is away

    own_redis.start()
    wait_until(lambda: _version(server, "steady") > before, 60, "the kept statistics committed after the outage")
    wait_until(lambda: server.http.get("/ready").json().get("store") == "ok", 30, "/ready: store ok again")
    stored = redis.Redis.from_url(own_redis.url)
    assert int(stored.get(f"star:{{{LM_NAME}:steady}}:version")) == _version(server, "steady")
    stored.close()
