"""The statistics bus: batches survive their bytes; the local bus is bounded; on a real Redis, entries that
a dead owner read but never acknowledged are claimed by the next owner and applied exactly once, and a
returning zombie owner's copies are recognised as duplicates."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import pytest
import torch
from redis.asyncio import Redis

from star_serve.adaptation import AdaptationConfig, Adapter, CaptureConfig, TenantBank, capture
from star_serve.adaptation.bus import LocalBus, RedisStatisticsBus, StatisticsBatch
from star_serve.adaptation.redis_store import RedisSnapshotStore
from star_serve.model import orthonormalize

L, E, D = 2, 4, 16


def _trained() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.stack([orthonormalize(torch.randn(E, D, generator=gen)) for _ in range(L)])


def _batch(tenant: str, seed: int, version: int = 0) -> StatisticsBatch:
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(8, D, generator=gen) for _ in range(L)]
    stats = capture(_trained(), inputs, version, CaptureConfig(max_token_norm=1e9))
    return StatisticsBatch(tenant, stats, torch.full((L, E), 2.0), first_seen=time.time())


def test_a_batch_survives_its_bytes() -> None:
    batch = _batch("acme", 1, version=7)
    again = StatisticsBatch.from_bytes(batch.to_bytes())
    assert (again.id, again.tenant, again.version, again.stats.tokens) == (batch.id, "acme", 7, 8)
    assert again.first_seen == batch.first_seen and torch.equal(again.load, batch.load)
    for a, b in zip(again.stats.layers, batch.stats.layers, strict=True):
        assert torch.equal(a.s1, b.s1) and torch.equal(a.s2, b.s2) and a.n == b.n


def test_the_local_bus_drops_its_oldest_batch_when_full() -> None:
    async def scenario() -> None:
        bus = LocalBus(capacity=3)
        batches = [_batch("acme", i) for i in range(5)]
        for b in batches:
            await bus.publish(b)
        assert bus.dropped == 2
        assert [d.batch.id for d in await bus.receive(0.1)] == [b.id for b in batches[2:]]
        assert await bus.receive(0.01) == []

    asyncio.run(scenario())


async def _owning(bus: RedisStatisticsBus, timeout: float = 10.0) -> list:  # type: ignore[type-arg]
    """Maintains `bus` until it holds its lease (the previous owner's must expire first)."""
    deadline = time.monotonic() + timeout
    while True:
        claimed = await bus.maintain()
        if bus.owned:
            return claimed
        if time.monotonic() > deadline:
            pytest.fail("the lease was never taken over")
        await asyncio.sleep(0.05)


def test_a_dead_owners_pending_entries_are_reclaimed_and_applied_once(redis_url: str, tmp_path: Path) -> None:
    model, tenant = f"lm-{uuid.uuid4().hex[:8]}", "acme"
    config = AdaptationConfig(mode="async", learning_rate=0.1, min_tokens=1)

    def adapter(redis: Redis, bus: RedisStatisticsBus) -> Adapter:
        bank = TenantBank(_trained(), torch.device("cpu"), torch.float32)
        return Adapter(model, _trained(), bank, RedisSnapshotStore(redis), config, bus)

    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        try:
            dead = RedisStatisticsBus(redis, model, replica="dead", partitions=1, lease_ttl=0.3)
            heir = RedisStatisticsBus(redis, model, replica="heir", partitions=1, lease_ttl=0.3)
            batches = [_batch(tenant, i) for i in range(6)]
            for b in batches:
                await heir.publish(b)  # any replica publishes; only the owner reads

            await _owning(dead)
            read = await dead.receive(1.0)
            assert {d.batch.id for d in read} == {b.id for b in batches}
            # the owner dies here: read, never acknowledged, lease never released

            claimed = await _owning(heir)
            assert sorted(d.batch.id for d in claimed) == sorted(b.id for b in batches)
            owner = adapter(redis, heir)
            handled, committed = await owner.owner.apply(tenant, [d.batch for d in claimed])
            assert committed and handled == {b.id for b in batches}
            await heir.ack(claimed)
            assert owner.stats.batches["applied"] == 6 and owner.tenants[tenant].version == 1

            # the old owner comes back and applies what it had read: every batch is a duplicate
            zombie = adapter(redis, dead)
            handled, committed = await zombie.owner.apply(tenant, [d.batch for d in read])
            assert not committed and handled == {b.id for b in batches}
            assert +zombie.stats.batches == {"duplicate": 6}  # and nothing else
            assert await RedisSnapshotStore(redis).versions(model, tenant) == [1]
            pending = await redis.xpending(heir.stream(0), heir.GROUP)
            assert pending["pending"] == 0
        finally:
            await redis.aclose()

    asyncio.run(scenario())


def test_a_commit_refuses_batch_ids_already_applied(redis_url: str) -> None:
    from star_serve.adaptation.store import Snapshot

    model, tenant = f"lm-{uuid.uuid4().hex[:8]}", "acme"

    async def scenario() -> None:
        store = RedisSnapshotStore.from_url(redis_url)
        try:
            first = Snapshot(model, tenant, 1, _trained())
            assert await store.commit(first, expected=0, applied=["a", "b"])
            again = Snapshot(model, tenant, 2, _trained())
            assert not await store.commit(again, expected=1, applied=["c", "b"])  # "b" is in version 1
            assert await store.versions(model, tenant) == [1]
            assert await store.applied(model, tenant, ["a", "b", "c"]) == {"a", "b"}
            assert await store.commit(again, expected=1, applied=["c"])
        finally:
            await store.close()

    asyncio.run(scenario())


def test_the_owner_of_a_partition_is_named_by_its_lease(redis_url: str) -> None:
    model = f"lm-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        try:
            first = RedisStatisticsBus(redis, model, partitions=4, lease_ttl=5.0)
            second = RedisStatisticsBus(redis, model, replica="second", partitions=4, lease_ttl=5.0)
            assert await second.owner(second.partition("acme")) is None  # no one holds it yet
            await _owning(first)
            await second.maintain()  # every lease is taken: it owns none
            assert first.owned == {0, 1, 2, 3} and second.owned == set()
            assert first.replica.rsplit("-", 1)[1] == str(os.getpid())  # host-pid by default
            for tenant in ("acme", "globex", "initech"):
                assert await second.owner(second.partition(tenant)) == first.replica
            await first.release()
            assert await second.owner(0) is None
        finally:
            await redis.aclose()

    asyncio.run(scenario())
