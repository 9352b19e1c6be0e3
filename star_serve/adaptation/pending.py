"""Statistics captured on this replica and not yet published, for every tenant at once.

Each tenant with pending statistics holds a slot of three stacked tensors on the capture device (S1, S2 and
the expert load), so that a forward's statistics are added for all of its tenants with a few indexed adds,
however many tenants it has. The host keeps, per slot, the basis version, the token count, the capture
counts and the time of the oldest token. The slots are bounded: with all of them taken, a new tenant's
statistics are dropped, and counted, until a publication frees one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.gha import GhaStatistics
from .capture import CaptureCounts, ForwardStatistics, LayerStatistics


@dataclass
class _Slot:
    version: int
    first_seen: float
    tokens: int = 0
    counts: CaptureCounts = field(default_factory=CaptureCounts)


class PendingStatistics:
    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self.dropped_tokens = 0  # of tenants that found every slot taken
        self._slots: dict[str, tuple[int, _Slot]] = {}  # tenant -> (index, host side)
        self._free = list(range(capacity - 1, -1, -1))
        self._s1: torch.Tensor | None = None  # (P, L, E, D), allocated on the first add
        self._s2: torch.Tensor | None = None  # (P, L, E, E)
        self._load: torch.Tensor | None = None  # (P, L, E)

    def __contains__(self, tenant: str) -> bool:
        return tenant in self._slots

    def version(self, tenant: str) -> int | None:
        entry = self._slots.get(tenant)
        return None if entry is None else entry[1].version

    def tokens(self, tenant: str) -> int:
        entry = self._slots.get(tenant)
        return 0 if entry is None else entry[1].tokens

    def tenants(self) -> list[str]:
        return list(self._slots)

    def add(
        self,
        tenants: list[str],
        groups: list[int],  # each tenant's group in `stats`
        stats: ForwardStatistics,
        load: torch.Tensor,  # (G, L, E)
        now: float,
    ) -> None:
        """Adds each tenant's group of `stats` to its slot. A tenant's pending statistics must be of the
        group's version (the caller discards them first otherwise)."""
        if self._s1 is None:
            _, layers, experts, dim = stats.s1.shape
            device = stats.s1.device
            with torch.inference_mode(False):  # ordinary tensors: updated both in and out of inference mode
                self._s1 = torch.zeros(self.capacity, layers, experts, dim, device=device)
                self._s2 = torch.zeros(self.capacity, layers, experts, experts, device=device)
                self._load = torch.zeros(self.capacity, layers, experts, device=device)
        assert self._s2 is not None and self._load is not None
        into, taken = [], []
        for tenant, g in zip(tenants, groups, strict=True):
            slot = self._slot(tenant, stats.versions[g], now)
            if slot is None:
                self.dropped_tokens += stats.counts[g].sampled
                continue
            index, host = slot
            assert host.version == stats.versions[g], "discard statistics of a replaced basis first"
            host.tokens += stats.counts[g].sampled
            host.counts += stats.counts[g]
            into.append(index)
            taken.append(g)
        if not into:
            return
        device = self._s1.device
        slots, rows = torch.tensor(into, device=device), torch.tensor(taken, device=stats.s1.device)
        self._s1.index_add_(0, slots, stats.s1[rows].to(device))
        self._s2.index_add_(0, slots, stats.s2[rows].to(device))
        self._load.index_add_(0, slots, load[rows].to(device, torch.float32))

    def take(self, tenant: str) -> tuple[LayerStatistics, torch.Tensor, float] | None:
        """The tenant's statistics, load (L, E) and oldest token's time, on the host; its slot is freed."""
        entry = self._slots.pop(tenant, None)
        if entry is None:
            return None
        index, host = entry
        assert self._s1 is not None and self._s2 is not None and self._load is not None
        s1, s2, load = (t[index].to("cpu", copy=True) for t in (self._s1, self._s2, self._load))  # then cleared
        self._clear(index)
        layers = [GhaStatistics(a, b, host.tokens) for a, b in zip(s1, s2, strict=True)]
        return LayerStatistics(host.version, layers, host.counts), load, host.first_seen

    def put_back(self, tenant: str, stats: LayerStatistics, load: torch.Tensor, first_seen: float) -> bool:
        """Returns taken statistics (a publication failed); False when they no longer fit (another version
        pending, or no free slot)."""
        if self.version(tenant) not in (None, stats.version):
            return False
        forward = ForwardStatistics(
            torch.stack([layer.s1 for layer in stats.layers])[None],
            torch.stack([layer.s2 for layer in stats.layers])[None],
            [stats.counts],
            [stats.version],
            [None],
        )
        if self._slot(tenant, stats.version, first_seen) is None:
            return False
        host = self._slots[tenant][1]
        host.first_seen = min(host.first_seen, first_seen)
        self.add([tenant], [0], forward, load[None], first_seen)
        return True

    def discard(self, tenant: str) -> None:
        entry = self._slots.pop(tenant, None)
        if entry is not None:
            self._clear(entry[0])

    def _slot(self, tenant: str, version: int, now: float) -> tuple[int, _Slot] | None:
        entry = self._slots.get(tenant)
        if entry is None:
            if not self._free:
                return None
            entry = self._slots[tenant] = (self._free.pop(), _Slot(version, now))
        return entry

    def _clear(self, index: int) -> None:
        assert self._s1 is not None and self._s2 is not None and self._load is not None
        self._s1[index].zero_()
        self._s2[index].zero_()
        self._load[index].zero_()
        self._free.append(index)
