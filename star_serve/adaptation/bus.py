"""How statistics travel from the replicas that capture them to the single owner of each tenant's updates.

    replica ─ publish(batch) ─► bus ─ receive() ─► owner: guarded GHA step ─► store.commit(applied=ids) ─► ack

`LocalBus` is the embedded pipeline: one process captures and owns everything. `RedisStatisticsBus`
shards tenants over a fixed number of Redis Streams; each stream is owned by one replica at a time through
a lease key, and read by that replica in the stream's consumer group. Delivery is at least once: an owner
that dies between reading and acknowledging leaves its entries pending, and the next owner of the stream
claims them. Application is exactly once because every batch carries an id that the store's commit records
atomically with the new version, and an owner skips ids already recorded.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.typing import KeyT, StreamIdT
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..model.gha import GhaStatistics
from .capture import LayerStatistics


@dataclass(eq=False)
class StatisticsBatch:
    """One replica's statistics of one tenant, taken against one basis version."""

    tenant: str
    stats: LayerStatistics
    load: torch.Tensor  # (L, E) tokens routed to each expert
    first_seen: float  # wall-clock time of the oldest token counted
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    held: list[torch.Tensor] = field(default_factory=list)  # prompts held back for the quality gate, (S,) int32

    @property
    def version(self) -> int:
        return self.stats.version

    def to_bytes(self) -> bytes:
        tensors = {"load": self.load.detach().float().cpu().contiguous()}
        for i, layer in enumerate(self.stats.layers):
            tensors[f"s1.{i}"] = layer.s1.contiguous()
            tensors[f"s2.{i}"] = layer.s2.contiguous()
        for j, ids in enumerate(self.held):
            tensors[f"held.{j}"] = ids.to(torch.int32).contiguous()
        metadata = {
            "id": self.id,
            "tenant": self.tenant,
            "version": str(self.version),
            "tokens": str(self.stats.tokens),
            "first_seen": repr(self.first_seen),
        }
        return save_tensors(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> StatisticsBatch:
        tensors = load_tensors(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len])["__metadata__"]
        n = int(metadata["tokens"])
        count = sum(name.startswith("s1.") for name in tensors)
        layers = [GhaStatistics(tensors[f"s1.{i}"], tensors[f"s2.{i}"], n) for i in range(count)]
        held = [tensors[f"held.{j}"] for j in range(sum(name.startswith("held.") for name in tensors))]
        return cls(
            tenant=metadata["tenant"],
            stats=LayerStatistics(int(metadata["version"]), layers),
            load=tensors["load"],
            first_seen=float(metadata["first_seen"]),
            id=metadata["id"],
            held=held,
        )


@dataclass(frozen=True, eq=False)
class Delivery:
    batch: StatisticsBatch
    ref: tuple[str, str] = ("", "")  # (stream, entry id) for acknowledgement; empty for the local bus


class StatisticsBus(Protocol):
    dropped: int  # batches published but dropped for want of room, as far as this process can tell
    replica: str  # this process's name as an owner: host name and process id
    owned: set[int]  # the partitions of tenants whose updates this process owns now

    def partition(self, tenant: str) -> int: ...

    async def owner(self, partition: int) -> str | None:
        """The replica that owns `partition` now (None: no one holds it)."""
        ...

    async def publish(self, batch: StatisticsBatch) -> None: ...

    async def receive(self, timeout: float) -> list[Delivery]:
        """Batches for tenants that this process owns, waiting up to `timeout` seconds for the first."""
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None: ...

    async def maintain(self) -> list[Delivery]:
        """Renews ownership; returns deliveries to process again (claimed from a dead owner, or unacked)."""
        ...

    async def close(self) -> None: ...


class LocalBus:
    """In-process delivery, bounded: when full, the oldest batch is dropped (and counted)."""

    def __init__(self, capacity: int = 4096) -> None:
        self._queue: deque[StatisticsBatch] = deque()
        self._capacity = capacity
        self._ready = asyncio.Event()
        self.dropped = 0
        self.replica = f"{socket.gethostname()}-{os.getpid()}"
        self.owned: set[int] = {0}  # one process owns every tenant: one partition, always its own

    def partition(self, tenant: str) -> int:
        return 0

    async def owner(self, partition: int) -> str | None:
        return self.replica

    async def publish(self, batch: StatisticsBatch) -> None:
        if len(self._queue) >= self._capacity:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(batch)
        self._ready.set()

    async def receive(self, timeout: float) -> list[Delivery]:
        if not self._queue:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return []
        self._ready.clear()
        batches, self._queue = list(self._queue), deque()
        return [Delivery(b) for b in batches]

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        return None

    async def maintain(self) -> list[Delivery]:
        return []

    async def close(self) -> None:
        return None


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RedisStatisticsBus:
    """Tenants hashed over `partitions` streams `star:{M}:stats:<p>`, each owned through the lease key
    `star:{M}:owner:<p>` (a replica's id, with a time to live) and read in the consumer group `adapters`."""

    GROUP = "adapters"

    def __init__(
        self,
        redis: Redis,
        model: str,
        replica: str | None = None,
        partitions: int = 16,
        lease_ttl: float = 10.0,
        max_entries: int = 10_000,
        max_block: float = 0.5,  # a blocking read waits at most this long: well under the client's socket timeout
    ) -> None:
        self.redis, self.model, self.partitions = redis, model, partitions
        self.max_block = max_block
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}"  # the pod's name, under Kubernetes
        self.lease_ttl, self.max_entries = lease_ttl, max_entries
        self.owned: set[int] = set()
        self.dropped = 0  # streams are trimmed to about `max_entries` by Redis itself, unseen from here
        self._renew = redis.register_script(_RENEW)

    def stream(self, partition: int) -> str:
        return f"star:{{{self.model}}}:stats:{partition}"

    def lease(self, partition: int) -> str:
        return f"star:{{{self.model}}}:owner:{partition}"

    def partition(self, tenant: str) -> int:
        return zlib.crc32(tenant.encode()) % self.partitions

    async def owner(self, partition: int) -> str | None:
        held = await self.redis.get(self.lease(partition))
        return None if held is None else _text(held)

    async def publish(self, batch: StatisticsBatch) -> None:
        await self.redis.xadd(
            self.stream(self.partition(batch.tenant)),
            {"batch": batch.to_bytes()},
            maxlen=self.max_entries,
            approximate=True,
        )

    async def receive(self, timeout: float) -> list[Delivery]:
        if not self.owned:
            await asyncio.sleep(timeout)
            return []
        streams: dict[KeyT, StreamIdT] = {self.stream(p): ">" for p in sorted(self.owned)}
        block = int(min(timeout, self.max_block) * 1000) or None  # BLOCK 0 would wait forever: not at all
        replies = await self.redis.xreadgroup(self.GROUP, self.replica, streams, count=256, block=block)
        return _deliveries(replies)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        by_stream: dict[str, list[str]] = {}
        for d in deliveries:
            by_stream.setdefault(d.ref[0], []).append(d.ref[1])
        for stream, ids in by_stream.items():
            await self.redis.xack(stream, self.GROUP, *ids)
            await self.redis.xdel(stream, *ids)

    async def maintain(self) -> list[Delivery]:
        """Renews the leases held, takes free ones, and returns what must be processed again: the entries a
        previous owner of a newly taken stream left pending, and this replica's own unacknowledged ones."""
        again: list[Delivery] = []
        ttl_ms = int(self.lease_ttl * 1000)
        for p in range(self.partitions):
            if p in self.owned:
                if await self._renew(keys=[self.lease(p)], args=[self.replica, ttl_ms]):
                    again += await self._own_pending(p)
                    continue
                self.owned.discard(p)
            if await self.redis.set(self.lease(p), self.replica, nx=True, px=ttl_ms):
                self.owned.add(p)
                again += await self._take_over(p)
        return again

    async def _take_over(self, partition: int) -> list[Delivery]:
        stream = self.stream(partition)
        try:
            await self.redis.xgroup_create(stream, self.GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        claimed: list[Delivery] = []
        start = "0-0"
        while True:  # every entry pending for any consumer: whoever held the lease before is gone
            start, entries, *_ = await self.redis.xautoclaim(stream, self.GROUP, self.replica, 0, start, count=256)
            claimed += _deliveries([[stream, entries]])
            if _text(start) == "0-0":
                return claimed

    async def _own_pending(self, partition: int) -> list[Delivery]:
        streams: dict[KeyT, StreamIdT] = {self.stream(partition): "0"}
        return _deliveries(await self.redis.xreadgroup(self.GROUP, self.replica, streams, count=256))

    async def release(self) -> None:
        """Gives up every lease, so that another replica takes over at once (on a clean shutdown)."""
        for p in list(self.owned):
            if _text(await self.redis.get(self.lease(p)) or b"") == self.replica:
                await self.redis.delete(self.lease(p))
        self.owned.clear()

    async def close(self) -> None:
        await self.release()


def _deliveries(replies: object) -> list[Delivery]:
    """Deliveries from XREADGROUP's or XAUTOCLAIM's reply [[stream, [(id, {field: value}), ...]], ...]."""
    out = []
    for stream, entries in replies or []:  # type: ignore[attr-defined]
        for entry_id, fields in entries:
            if not fields:  # deleted while pending
                continue
            out.append(Delivery(StatisticsBatch.from_bytes(fields[b"batch"]), (_text(stream), _text(entry_id))))
    return out


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
