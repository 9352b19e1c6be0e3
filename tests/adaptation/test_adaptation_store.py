"""LocalDirStore: versions by compare-and-set, exact bytes back, checksums, the last N kept."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from star_serve.adaptation.store import CorruptSnapshot, LocalDirStore, Snapshot


def _snapshot(version: int, seed: int) -> Snapshot:
    gen = torch.Generator().manual_seed(seed)
    return Snapshot("m/odel", "acme", version, torch.randn(2, 4, 16, generator=gen), meta={"lr": "0.01"})


def test_commit_is_compare_and_set_and_loads_exact_bytes(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)

    async def scenario() -> None:
        assert await store.latest("m/odel", "acme") is None
        assert await store.commit(_snapshot(1, 1), expected=0)
        assert not await store.commit(_snapshot(1, 2), expected=0)  # a second writer loses
        assert not await store.commit(_snapshot(3, 3), expected=0)
        assert await store.commit(_snapshot(2, 2), expected=1)
        latest = await store.latest("m/odel", "acme")
        assert latest is not None and latest.version == 2 and latest.meta == {"lr": "0.01"}
        assert torch.equal(latest.bases, _snapshot(2, 2).bases)
        first = await store.load("m/odel", "acme", 1)
        assert first is not None and torch.equal(first.bases, _snapshot(1, 1).bases)
        assert await store.versions("m/odel", "acme") == [1, 2]

    asyncio.run(scenario())


def test_only_the_last_versions_are_kept(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path, keep=3)

    async def scenario() -> list[int]:
        for v in range(1, 7):
            assert await store.commit(_snapshot(v, v), expected=v - 1)
        return await store.versions("m/odel", "acme")

    assert asyncio.run(scenario()) == [4, 5, 6]


def test_a_corrupted_file_is_detected(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    asyncio.run(store.commit(_snapshot(1, 1), expected=0))
    [path] = list(tmp_path.rglob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the tensor payload
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshot):
        asyncio.run(store.latest("m/odel", "acme"))


def test_heads_give_every_tenants_latest_version_and_settings_at_once(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)

    async def scenario() -> dict[str, tuple[int, dict[str, str]]]:
        for v in (1, 2):
            assert await store.commit(_snapshot(v, v), expected=v - 1)
        await store.configure("m/odel", "acme", {"frozen": "true"})
        await store.configure("m/odel", "beta", {"learning_rate": "0.01"})  # settings, no version yet
        return await store.heads("m/odel", ["acme", "beta", "unknown"])

    assert asyncio.run(scenario()) == {
        "acme": (2, {"frozen": "true"}),
        "beta": (0, {"learning_rate": "0.01"}),
        "unknown": (0, {}),
    }
