"""RedisSnapshotStore against a real redis-server: compare-and-set, exact bytes, retention, checksums,
announcements."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from star_serve.adaptation.redis_store import RedisSnapshotStore
from star_serve.adaptation.store import CorruptSnapshot, Snapshot


def _snapshot(tenant: str, version: int, seed: int) -> Snapshot:
    gen = torch.Generator().manual_seed(seed)
    return Snapshot("lm", tenant, version, torch.randn(2, 4, 16, generator=gen))


def test_compare_and_set_exact_bytes_and_retention(redis_url: str) -> None:
    tenant = uuid.uuid4().hex

    async def scenario() -> None:
        store = RedisSnapshotStore.from_url(redis_url, keep=3)
        try:
            assert await store.latest("lm", tenant) is None
            assert await store.commit(_snapshot(tenant, 1, 1), expected=0)
            assert not await store.commit(_snapshot(tenant, 1, 9), expected=0)  # the second writer loses
            for v in range(2, 6):
                assert await store.commit(_snapshot(tenant, v, v), expected=v - 1)
            latest = await store.latest("lm", tenant)
            assert latest is not None and latest.version == 5
            assert torch.equal(latest.bases, _snapshot(tenant, 5, 5).bases)
            assert await store.versions("lm", tenant) == [3, 4, 5]
            assert await store.load("lm", tenant, 2) is None
        finally:
            await store.close()

    asyncio.run(scenario())


def test_heads_give_every_tenants_latest_version_and_settings_at_once(redis_url: str) -> None:
    acme, beta, unknown = (uuid.uuid4().hex for _ in range(3))

    async def scenario() -> dict[str, tuple[int, dict[str, str]]]:
        store = RedisSnapshotStore.from_url(redis_url)
        try:
            for v in (1, 2):
                assert await store.commit(_snapshot(acme, v, v), expected=v - 1)
            await store.configure("lm", acme, {"frozen": "true"})
            await store.configure("lm", beta, {"learning_rate": "0.01"})  # settings, no version yet
            return await store.heads("lm", [acme, beta, unknown])
        finally:
            await store.close()

    assert asyncio.run(scenario()) == {
        acme: (2, {"frozen": "true"}),
        beta: (0, {"learning_rate": "0.01"}),
        unknown: (0, {}),
    }


def test_racing_writers_commit_each_version_once(redis_url: str) -> None:
    tenant = uuid.uuid4().hex

    async def scenario() -> list[bool]:
        stores = [RedisSnapshotStore.from_url(redis_url) for _ in range(8)]
        try:
            return list(
                await asyncio.gather(*(s.commit(_snapshot(tenant, 1, i), expected=0) for i, s in enumerate(stores)))
            )
        finally:
            for s in stores:
                await s.close()

    assert sorted(asyncio.run(scenario())) == [False] * 7 + [True]


def test_corruption_is_detected(redis_url: str) -> None:
    tenant = uuid.uuid4().hex

    async def scenario() -> None:
        store = RedisSnapshotStore.from_url(redis_url)
        try:
            await store.commit(_snapshot(tenant, 1, 1), expected=0)
            key = store._prefix("lm", tenant) + "snapshot:1"
            data = bytearray(await store.redis.get(key))
            data[-1] ^= 0xFF
            await store.redis.set(key, bytes(data))
            with pytest.raises(CorruptSnapshot):
                await store.latest("lm", tenant)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_commits_are_announced(redis_url: str) -> None:
    tenant = uuid.uuid4().hex

    async def scenario() -> tuple[str, int]:
        listener, writer = RedisSnapshotStore.from_url(redis_url), RedisSnapshotStore.from_url(redis_url)
        try:
            announcements = listener.announcements("lm")
            first = asyncio.ensure_future(anext(announcements))
            # the subscription is in place once Redis counts a subscriber on the channel
            while (await writer.redis.pubsub_numsub(listener.channel("lm")))[0][1] == 0:
                await asyncio.sleep(0.01)
            await writer.commit(_snapshot(tenant, 1, 1), expected=0)
            return await asyncio.wait_for(first, timeout=10)
        finally:
            await listener.close()
            await writer.close()

    assert asyncio.run(scenario()) == (tenant, 1)
