"""Where a model's snapshots and statistics live, as a value that a process of its own can open too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from .bus import LocalBus, RedisStatisticsBus, StatisticsBus
from .redis_store import RedisSnapshotStore
from .store import LocalDirStore, SnapshotStore


@dataclass(frozen=True)
class Backends:
    """Redis (shared by replicas) when `redis_url` is set; otherwise snapshot files under `directory` and
    statistics delivered in the process."""

    directory: Path
    keep: int = Settings.default("snapshot_keep")  # versions of each tenant's bases kept for rollback
    redis_url: str | None = None
    partitions: int = Settings.default("adaptation_partitions")  # Redis Streams the statistics are sharded over

    @classmethod
    def from_settings(cls, settings: Settings) -> Backends:
        return cls(
            settings.resolved_state_dir / "snapshots",
            keep=settings.snapshot_keep,
            redis_url=settings.redis_url,
            partitions=settings.adaptation_partitions,
        )

    def open(self, model: str) -> tuple[SnapshotStore, StatisticsBus]:
        if self.redis_url:
            store = RedisSnapshotStore.from_url(self.redis_url, keep=self.keep)
            return store, RedisStatisticsBus(store.redis, model, partitions=self.partitions)
        return LocalDirStore(self.directory, keep=self.keep), LocalBus()
