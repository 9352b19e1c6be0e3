"""Where a model's snapshots and statistics live, as a value that a process of its own can open too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .bus import LocalBus, RedisStatisticsBus, StatisticsBus
from .redis_store import RedisSnapshotStore
from .store import LocalDirStore, SnapshotStore


@dataclass(frozen=True)
class Backends:
    """Redis (shared by replicas) when `redis_url` is set; otherwise snapshot files under `directory` and
    statistics delivered in the process."""

    directory: Path
    keep: int = 10  # versions of each tenant's bases kept for rollback
    redis_url: str | None = None
    partitions: int = 16  # Redis Streams that tenants' statistics are sharded over

    def open(self, model: str) -> tuple[SnapshotStore, StatisticsBus]:
        if self.redis_url:
            store = RedisSnapshotStore.from_url(self.redis_url, keep=self.keep)
            return store, RedisStatisticsBus(store.redis, model, partitions=self.partitions)
        return LocalDirStore(self.directory, keep=self.keep), LocalBus()
