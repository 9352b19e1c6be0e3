"""Snapshots in Redis: versioned, committed atomically by compare-and-set in a Lua script, checksummed,
the last N kept, and each new version announced on a pub/sub channel for the other replicas.

Keys, for model M and tenant T (`{M}:{T}` is one hash slot):
    star:{M}:{T}:version           the latest committed version
    star:{M}:{T}:snapshot:<v>      the snapshot's bytes (safetensors with a checksum)
    star:{M}:{T}:versions          sorted set of the versions kept
    star:{M}:{T}:applied           sorted set: ids of the statistics batches each version applied
    star:{M}:{T}:settings          hash: the tenant's frozen flag and learning rate
    star:{M}:announce              channel: "<tenant> <version>" after each commit
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from .store import Snapshot

_COMMIT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then return 0 end
for i = 8, #ARGV do
    if redis.call('ZSCORE', KEYS[3], ARGV[i]) then return 0 end
end
local version = ARGV[2]
for i = 8, #ARGV do redis.call('ZADD', KEYS[3], version, ARGV[i]) end
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -65537)
redis.call('SET', ARGV[5] .. version, ARGV[3])
redis.call('SET', KEYS[1], version)
redis.call('ZADD', KEYS[2], version, version)
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if extra > 0 then
    for _, old in ipairs(redis.call('ZRANGE', KEYS[2], 0, extra - 1)) do
        redis.call('DEL', ARGV[5] .. old)
    end
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
end
redis.call('PUBLISH', ARGV[6], ARGV[7] .. ' ' .. version)
return 1
"""


class RedisSnapshotStore:
    def __init__(self, redis: Redis, keep: int = 10) -> None:
        self.redis, self.keep = redis, keep
        self._commit = redis.register_script(_COMMIT)

    @classmethod
    def from_url(cls, url: str, keep: int = 10) -> RedisSnapshotStore:
        return cls(Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0), keep)

    @staticmethod
    def _prefix(model: str, tenant: str) -> str:
        return f"star:{{{model}:{tenant}}}:"

    @staticmethod
    def channel(model: str) -> str:
        return f"star:{model}:announce"

    async def commit(self, snapshot: Snapshot, expected: int, applied: Sequence[str] = ()) -> bool:
        if snapshot.version <= expected:
            return False
        prefix = self._prefix(snapshot.model, snapshot.tenant)
        done = await self._commit(
            keys=[prefix + "version", prefix + "versions", prefix + "applied"],
            args=[
                expected,
                snapshot.version,
                snapshot.to_bytes(),
                self.keep,
                prefix + "snapshot:",
                self.channel(snapshot.model),
                snapshot.tenant,
                *applied,
            ],
        )
        return bool(done)

    async def applied(self, model: str, tenant: str, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        scores = await self.redis.zmscore(self._prefix(model, tenant) + "applied", list(ids))
        return {i for i, score in zip(ids, scores, strict=True) if score is not None}

    async def settings(self, model: str, tenant: str) -> dict[str, str]:
        return _decoded(await self.redis.hgetall(self._prefix(model, tenant) + "settings"))

    async def configure(self, model: str, tenant: str, settings: dict[str, str]) -> None:
        mapping: dict[FieldT, EncodableT] = {k: v for k, v in settings.items()}
        await self.redis.hset(self._prefix(model, tenant) + "settings", mapping=mapping)

    async def latest(self, model: str, tenant: str) -> Snapshot | None:
        version = await self.redis.get(self._prefix(model, tenant) + "version")
        return None if version is None else await self.load(model, tenant, int(version))

    async def load(self, model: str, tenant: str, version: int) -> Snapshot | None:
        data = await self.redis.get(self._prefix(model, tenant) + f"snapshot:{version}")
        return None if data is None else Snapshot.from_bytes(model, tenant, _as_bytes(data))

    async def versions(self, model: str, tenant: str) -> list[int]:
        kept = await self.redis.zrange(self._prefix(model, tenant) + "versions", 0, -1)
        return sorted(int(_as_bytes(v)) for v in kept)

    async def heads(self, model: str, tenants: Sequence[str]) -> dict[str, tuple[int, dict[str, str]]]:
        pipe = self.redis.pipeline(transaction=False)  # one round trip for all of them
        for tenant in tenants:
            pipe.get(self._prefix(model, tenant) + "version")
            pipe.hgetall(self._prefix(model, tenant) + "settings")
        replies = await pipe.execute()
        heads = {}
        for tenant, version, settings in zip(tenants, replies[::2], replies[1::2], strict=True):
            heads[tenant] = (0 if version is None else int(version), _decoded(settings))
        return heads

    async def announcements(self, model: str) -> AsyncIterator[tuple[str, int]]:
        """(tenant, version) for every commit of `model` from now on, by any replica."""
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(self.channel(model))
        try:
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                tenant, _, version = message["data"].decode().rpartition(" ")
                yield tenant, int(version)
        finally:
            await pubsub.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.redis.aclose()


def _decoded(stored: dict[bytes | str, bytes | str]) -> dict[str, str]:
    """A settings hash as Redis returns it (bytes keys and values), as text."""
    return {_as_bytes(k).decode(): _as_bytes(v).decode() for k, v in stored.items()}


def _as_bytes(value: object) -> bytes:
    """redis-py's replies are bytes for this client (decode_responses is off)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"unexpected Redis reply {value!r}")
