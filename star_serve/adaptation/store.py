"""Snapshot stores: versioned, checksummed copies of a tenant's bases for one model.

One interface, two homes: `LocalDirStore` (the embedded default: files replaced atomically) and, with
`STAR_REDIS_URL`, a Redis store. A commit is a compare-and-set on the version: it succeeds only when the
store's latest version is the one the committer started from, so two writers can never both commit v+1.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors


class CorruptSnapshot(Exception):
    """A stored snapshot whose bytes do not match its checksum."""


@dataclass(frozen=True)
class Snapshot:
    model: str
    tenant: str
    version: int
    bases: torch.Tensor  # (L, E, D) float32
    created: float = field(default_factory=time.time)
    meta: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """safetensors bytes whose metadata carries the version and a SHA-256 of the tensor's bytes."""
        bases = self.bases.detach().float().cpu().contiguous()
        metadata = {
            "version": str(self.version),
            "created": repr(self.created),
            "sha256": _digest(bases),
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        return save_tensors({"bases": bases}, metadata=metadata)

    @classmethod
    def from_bytes(cls, model: str, tenant: str, data: bytes) -> Snapshot:
        tensors = load_tensors(data)
        metadata = _metadata(data)
        bases = tensors["bases"]
        if _digest(bases) != metadata.get("sha256"):
            raise CorruptSnapshot(f"{model}/{tenant} v{metadata.get('version')}: checksum mismatch")
        return cls(
            model=model,
            tenant=tenant,
            version=int(metadata["version"]),
            bases=bases,
            created=float(metadata["created"]),
            meta=json.loads(metadata.get("meta", "{}")),
        )


def _digest(bases: torch.Tensor) -> str:
    return hashlib.sha256(bases.numpy().tobytes()).hexdigest()


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors buffer (its header is 8 bytes of length, then JSON)."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__", {}))


class SnapshotStore(Protocol):
    async def commit(self, snapshot: Snapshot, expected: int, applied: Sequence[str] = ()) -> bool:
        """Stores `snapshot` if the latest stored version is `expected` (0: none yet) and none of the
        statistics batches `applied` was applied before, recording them with it; False otherwise."""
        ...

    async def applied(self, model: str, tenant: str, ids: Sequence[str]) -> set[str]:
        """Those of `ids` that a committed version has applied."""
        ...

    async def settings(self, model: str, tenant: str) -> dict[str, str]:
        """The tenant's stored settings (frozen, learning_rate); empty when none were set."""
        ...

    async def configure(self, model: str, tenant: str, settings: dict[str, str]) -> None: ...

    async def latest(self, model: str, tenant: str) -> Snapshot | None: ...

    async def load(self, model: str, tenant: str, version: int) -> Snapshot | None: ...

    async def versions(self, model: str, tenant: str) -> list[int]: ...

    async def heads(self, model: str, tenants: Sequence[str]) -> dict[str, tuple[int, dict[str, str]]]:
        """Each tenant's latest version (0: none) and settings, in one call however many tenants: what a
        replica polls to confirm that it missed no commit and no change of settings."""
        ...

    async def ping(self) -> bool:
        """Whether the store answers now."""
        ...


class LocalDirStore:
    """Snapshots as files `<root>/<model>/<tenant>/<version>.safetensors`, the newest `keep` kept.

    Each file is written to a temporary name and renamed into place, so a reader never sees half a file;
    a per-tenant lock file serialises commits between processes.
    """

    def __init__(self, root: Path, keep: int = 10) -> None:
        self.root, self.keep = root, keep

    def _dir(self, model: str, tenant: str) -> Path:
        return self.root / quote(model, safe="") / quote(tenant, safe="")

    def _versions(self, directory: Path) -> list[int]:
        if not directory.exists():
            return []
        return sorted(int(p.stem) for p in directory.glob("*.safetensors") if p.stem.isdigit())

    def _commit(self, snapshot: Snapshot, expected: int) -> bool:
        directory = self._dir(snapshot.model, snapshot.tenant)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            versions = self._versions(directory)
            if (versions[-1] if versions else 0) != expected or snapshot.version <= expected:
                return False
            final = directory / f"{snapshot.version:010d}.safetensors"
            tmp = final.with_suffix(f".tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(snapshot.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            for old in [*versions, snapshot.version][: -self.keep]:
                (directory / f"{old:010d}.safetensors").unlink(missing_ok=True)
            return True

    def _load(self, model: str, tenant: str, version: int | None) -> Snapshot | None:
        directory = self._dir(model, tenant)
        versions = self._versions(directory)
        if version is None:
            version = versions[-1] if versions else None
        if version is None or version not in versions:
            return None
        data = (directory / f"{version:010d}.safetensors").read_bytes()
        return Snapshot.from_bytes(model, tenant, data)

    async def commit(self, snapshot: Snapshot, expected: int, applied: Sequence[str] = ()) -> bool:
        # The in-process bus delivers each batch once, so there are no repeated ids to refuse here.
        return await asyncio.to_thread(self._commit, snapshot, expected)

    async def applied(self, model: str, tenant: str, ids: Sequence[str]) -> set[str]:
        return set()

    def _settings(self, model: str, tenant: str) -> dict[str, str]:
        path = self._dir(model, tenant) / "settings.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}

    def _configure(self, model: str, tenant: str, settings: dict[str, str]) -> None:
        directory = self._dir(model, tenant)
        directory.mkdir(parents=True, exist_ok=True)
        merged = {**self._settings(model, tenant), **settings}
        tmp = directory / f".settings.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(merged, sort_keys=True))
        os.replace(tmp, directory / "settings.json")

    async def settings(self, model: str, tenant: str) -> dict[str, str]:
        return await asyncio.to_thread(self._settings, model, tenant)

    async def configure(self, model: str, tenant: str, settings: dict[str, str]) -> None:
        await asyncio.to_thread(self._configure, model, tenant, settings)

    async def latest(self, model: str, tenant: str) -> Snapshot | None:
        return await asyncio.to_thread(self._load, model, tenant, None)

    async def load(self, model: str, tenant: str, version: int) -> Snapshot | None:
        return await asyncio.to_thread(self._load, model, tenant, version)

    async def versions(self, model: str, tenant: str) -> list[int]:
        return await asyncio.to_thread(self._versions, self._dir(model, tenant))

    def _heads(self, model: str, tenants: Sequence[str]) -> dict[str, tuple[int, dict[str, str]]]:
        heads = {}
        for tenant in tenants:
            versions = self._versions(self._dir(model, tenant))
            heads[tenant] = (versions[-1] if versions else 0, self._settings(model, tenant))
        return heads

    async def heads(self, model: str, tenants: Sequence[str]) -> dict[str, tuple[int, dict[str, str]]]:
        return await asyncio.to_thread(self._heads, model, list(tenants))

    async def ping(self) -> bool:
        return True
