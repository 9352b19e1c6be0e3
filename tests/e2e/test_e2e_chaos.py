"""Chaos under load (`make chaos`; marked `chaos`, outside the default run): Redis killed and restarted,
the server killed with SIGKILL and restarted, an adaptation worker dying between reading and acknowledging
stream entries, and SIGTERM. Each scenario checks its pass criterion in code."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections import Counter

import httpx
import pytest
import redis

from star_serve.adaptation.bus import RedisStatisticsBus, StatisticsBatch
from star_serve.adaptation.redis_store import RedisSnapshotStore

from .support import LM_NAME, Launcher, RedisProcess, Server, wait_until

pytestmark = pytest.mark.chaos

TENANTS = ("north", "south", "east", "west")
ADAPTING = {
    "STAR_ADAPTATION": "async",
    "STAR_ADAPTATION_QUALITY_GATE": "false",  # commits every step: this tests the pipeline
    "STAR_ADAPTATION_MIN_TOKENS": "16",
    "STAR_ADAPTATION_LEARNING_RATE": "0.2",
    "STAR_SNAPSHOT_KEEP": "1000",
}


class Load:
    """Clients that keep sending completions as the four tenants, each recording what it got, in order:
    (tenant, status, served version) or (tenant, exception name, -1)."""

    def __init__(self, server: Server, clients: int = 4, max_tokens: int = 8, polite: bool = False) -> None:
        self.server, self.max_tokens, self.polite = server, max_tokens, polite  # polite: stop at a 503
        self.results: list[list[tuple[str, int | str, int]]] = [[] for _ in range(clients)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.server.base_url, timeout=60) as http:
            n = 0
            while not self._stop.is_set():
                tenant = TENANTS[(i + n) % len(TENANTS)]
                n += 1
                body = {"model": LM_NAME, "prompt": f"request {n} of client {i}", "max_tokens": self.max_tokens}
                try:
                    response = http.post("/v1/completions", json=body, headers={"X-Tenant": tenant})
                except httpx.HTTPError as e:
                    self.results[i].append((tenant, type(e).__name__, -1))
                    continue
                version = response.json()["star"]["subspace_version"] if response.status_code == 200 else -1
                self.results[i].append((tenant, response.status_code, version))
                if self.polite and response.status_code == 503:
                    return

    def count(self) -> int:
        return sum(len(r) for r in self.results)

    def stop(self) -> Counter[int | str]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return Counter(outcome for results in self.results for _, outcome, _ in results)

    def versions_seen(self) -> dict[str, list[int]]:
        """Per client and tenant, the versions served, in the order the client saw them."""
        seen: dict[str, list[int]] = {}
        for i, results in enumerate(self.results):
            for tenant, outcome, version in results:
                if outcome == 200:
                    seen.setdefault(f"{i}/{tenant}", []).append(version)
        return seen


def _versions(server: Server) -> dict[str, int]:
    found = {}
    for tenant in TENANTS:
        response = server.http.get("/v1/subspace", params={"model": LM_NAME}, headers={"X-Tenant": tenant})
        found[tenant] = int(response.json()["version"]) if response.status_code == 200 else -1
    return found


def _stored(url: str) -> dict[str, list[int]]:
    """Every version each tenant has in Redis, each loaded (and so checksum-verified) once."""

    async def read() -> dict[str, list[int]]:
        store = RedisSnapshotStore.from_url(url, keep=1000)
        try:
            found = {}
            for tenant in TENANTS:
                versions = await store.versions(LM_NAME, tenant)
                for v in versions:
                    snapshot = await store.load(LM_NAME, tenant, v)
                    assert snapshot is not None and snapshot.version == v
                found[tenant] = versions
            return found
        finally:
            await store.close()

    return asyncio.run(read())


def test_redis_killed_and_restarted_under_load(launch: Launcher, own_redis: RedisProcess) -> None:
    server = launch(env={"STAR_REDIS_URL": own_redis.url, **ADAPTING})
    load = Load(server)
    try:
        wait_until(lambda: min(_versions(server).values()) >= 2, 90, "every tenant at version 2")
        acknowledged = _versions(server)  # committed: the store said so before the server reported them

        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGKILL)
        own_redis.proc.wait(timeout=10)
        wait_until(lambda: server.http.get("/ready").json()["store"] == "degraded", 30, "/ready degraded")
        during = load.count()
        wait_until(lambda: load.count() >= during + 8, 60, "requests answered while Redis is down")

        own_redis.start()  # the same append-only file
        wait_until(lambda: server.http.get("/ready").json()["store"] == "ok", 60, "/ready ok again")
        wait_until(
            lambda: all(_versions(server)[t] > acknowledged[t] for t in TENANTS), 90, "commits after the restart"
        )
    finally:
        outcomes = load.stop()

    assert set(outcomes) == {200}, outcomes  # serving never failed
    stored = _stored(own_redis.url)
    for tenant in TENANTS:
        assert stored[tenant] == list(range(1, stored[tenant][-1] + 1))  # no version lost, none skipped
        assert stored[tenant][-1] >= acknowledged[tenant]
    for versions in load.versions_seen().values():
        assert versions == sorted(versions)  # what a client is served never goes back


def test_server_killed_under_load_restarts_on_its_latest_versions(launch: Launcher, own_redis: RedisProcess) -> None:
    env = {"STAR_REDIS_URL": own_redis.url, **ADAPTING}
    first = launch(env=env)
    load = Load(first)
    try:
        wait_until(lambda: min(_versions(first).values()) >= 2, 90, "every tenant at version 2")
        first.kill()  # SIGKILL: no drain, no hand-over of pending statistics
    finally:
        load.stop()
    client = redis.Redis.from_url(own_redis.url)
    bus = RedisStatisticsBus(client, LM_NAME)  # type: ignore[arg-type]  # only its key names are used
    left = sum(client.xlen(bus.stream(p)) for p in range(bus.partitions))  # published, not yet acknowledged

    committed = _stored(own_redis.url)  # every version loads and verifies: nothing corrupt

    second = launch(env=env)
    for tenant in TENANTS:  # served from the start: the latest committed version, or a newer one
        body = {"model": LM_NAME, "prompt": "after the restart", "max_tokens": 2}
        response = second.http.post("/v1/completions", json=body, headers={"X-Tenant": tenant})
        assert response.json()["star"]["subspace_version"] >= committed[tenant][-1]
    # what the dead process had published is applied by its successor: only its in-memory remainder
    # (under STAR_ADAPTATION_MIN_TOKENS tokens per tenant) is lost
    wait_until(
        lambda: sum(client.xlen(bus.stream(p)) for p in range(bus.partitions)) == 0,
        60,
        f"the {left} batches left in the streams applied and acknowledged",
    )
    stored = _stored(own_redis.url)
    assert _versions(second) == {t: stored[t][-1] for t in TENANTS}
    client.close()


def test_a_worker_dying_between_read_and_ack_leaves_its_entries_to_be_applied_once(
    launch: Launcher, own_redis: RedisProcess
) -> None:
    client = redis.Redis.from_url(own_redis.url)
    bus = RedisStatisticsBus(client, LM_NAME)  # type: ignore[arg-type]  # only its key names are used
    partition = bus.partition("north")
    client.set(bus.lease(partition), "dead-worker", px=40_000)  # a worker takes the lease, as a replica does,
    client.xgroup_create(bus.stream(partition), RedisStatisticsBus.GROUP, id="0", mkstream=True)  # ...
    server = launch(env={"STAR_REDIS_URL": own_redis.url, **ADAPTING})

    stream = bus.stream(partition)
    load = Load(server, clients=2)
    try:
        wait_until(lambda: client.xlen(stream) >= 3, 60, "batches published to the dead worker's stream")
    finally:
        load.stop()
    # ... reads the entries, and dies before acknowledging any
    read = client.xreadgroup(RedisStatisticsBus.GROUP, "dead-worker", {stream: ">"})
    batches = [StatisticsBatch.from_bytes(fields[b"batch"]) for _, entries in read for _, fields in entries]
    assert len(batches) >= 3 and client.xpending(stream, RedisStatisticsBus.GROUP)["pending"] == len(batches)

    # once the lease expires, the live replica takes the stream, reclaims the entries and applies each once
    wait_until(lambda: client.xlen(stream) == 0, 90, "the dead worker's entries reclaimed and acknowledged")
    for batch in batches:  # each applied, and recorded with the commit that folded it in
        assert client.zscore(f"star:{{{LM_NAME}:{batch.tenant}}}:applied", batch.id) is not None
    applied = int(server.metric("star_adaptation_batches_total", model=LM_NAME, outcome="applied"))
    duplicates = int(server.metric("star_adaptation_batches_total", model=LM_NAME, outcome="duplicate"))
    recorded = sum(int(client.zcard(f"star:{{{LM_NAME}:{t}}}:applied")) for t in TENANTS)
    published = int(server.metric("star_adaptation_batches_total", model=LM_NAME, outcome="published"))
    assert applied == recorded and duplicates == 0  # one application per batch, each recorded once
    assert applied <= published
    client.close()


def test_sigterm_under_load_finishes_what_it_accepted(launch: Launcher) -> None:
    server = launch(env={"STAR_MAX_RUNNING": "8", "STAR_MAX_WAITING": "16"})
    load = Load(server, clients=12, max_tokens=48, polite=True)
    wait_until(lambda: load.count() >= 12 and server.running() > 0, 60, "requests in flight")
    assert server.proc.poll() is None
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: server.proc.poll() is not None, 60, "the server to drain and exit")
    outcomes = load.stop()

    assert server.proc.returncode == 0
    # every request was answered in full, or refused as draining; each client stopped at its refusal
    assert set(outcomes) == {200, 503} and outcomes[503] == 12, outcomes
    assert outcomes[200] >= 12
