"""The tenant bank: each tenant's GHA bases for every MoE layer of one model, stacked on the device.

Row 0 holds the trained bases (version 0), which every tenant without a version of its own routes with.
Other rows are a bounded LRU of tenants' own bases. New versions are published from any thread and
applied by the engine thread at its next lookup, between forwards, so a forward never sees a half-written
row. Given the model's `router_gates`, the bank also keeps each row's routers folded into one gate per
layer, folded again only when the row changes, and hands a batch the gates it routes with.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..model import Routing, StarMoePreTrainedModel


@dataclass(frozen=True)
class RoutingPlan:
    """How one forward routes, decided once, by the bank: the model's `routing` (the stacked bases, each
    sequence's index into them, the gates folded from the rows, and in sync mode the update that moves the
    batch's rows in place before each layer routes), and each sequence's version and row of the whole bank
    (0: the trained bases), which the capture of the forward's statistics reads."""

    routing: Routing
    versions: list[int]
    rows: list[int]


class BatchRouter(Protocol):
    """What the engine asks how a batch routes: the bank itself, or (sync mode) the bank with the routers'
    update of the batch's rows."""

    def plan(self, tenants: Sequence[str], lengths: Sequence[int]) -> RoutingPlan: ...


class BasesSink(Protocol):
    """Where an adapter puts the versions it commits: the bank itself, or (with adaptation in a process of
    its own) a link to the serving process's bank."""

    trained: torch.Tensor | None

    def publish(self, tenant: str, bases: torch.Tensor | None, version: int) -> None: ...

    def relabel(self, tenant: str, version: int) -> None: ...

    def row(self, tenant: str) -> torch.Tensor | None: ...


class TenantBank:
    def __init__(
        self,
        trained: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
        capacity: int = 256,
        fold: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """`fold` maps bases (T, L, E, D) to gates of the same shape (the model's `router_gates`); without
        it, views carry no gates and forwards route from the bases."""
        self.device, self.capacity, self._fold = device, capacity, fold
        self.trained = None if trained is None else trained.to(device=device, dtype=dtype)  # (L, E, D)
        self._stack = None if self.trained is None else self.trained[None].clone()  # (T, L, E, D), grows
        self._gates = None if self._stack is None or fold is None else fold(self._stack)  # grows with `_stack`
        self._unfolded: set[int] = set()  # rows whose bases changed since their gates were folded
        self._used = 1  # rows of `_stack` in use; row 0 is the trained bases
        self._rows: OrderedDict[str, tuple[int, int]] = OrderedDict()  # tenant -> (row, version), LRU order
        self._free: list[int] = []
        self._pending: dict[str, tuple[torch.Tensor | None, int]] = {}
        self._relabels: dict[str, int] = {}
        self._lock = threading.Lock()
        self._evict_hooks: list[Callable[[str], None]] = []
        # The last batch's gates gathered, kept while neither its rows nor the gates change: a decode step
        # usually routes the same sequences as the one before (rows, gates generation, gathered).
        self._generation = 0
        self._gathered: tuple[list[int], int, torch.Tensor] | None = None

    @classmethod
    def serving(cls, model: StarMoePreTrainedModel, capacity: int = 256) -> TenantBank:
        """The bank `model` is served with, on its device and in its dtype: its routers' trained bases (none for
        a linear router), each version's gates folded by the model."""
        subspace = model.config.router_type in ("star", "star_gha_only")
        trained = model.trained_bases() if subspace else None
        return cls(trained, model.device, model.dtype, capacity, fold=model.router_gates)

    def publish(self, tenant: str, bases: torch.Tensor | None, version: int) -> None:
        """Makes `bases` (L, E, D) the tenant's routing from the next forward on; None goes back to the
        trained bases. Safe from any thread."""
        if self.trained is None:
            raise ValueError("this model's routers have no GHA subspace")
        if bases is not None and bases.shape != self.trained.shape:
            raise ValueError(f"bases of shape {tuple(bases.shape)}, expected {tuple(self.trained.shape)}")
        with self._lock:
            self._pending[tenant] = (None if bases is None else bases.detach().to("cpu", copy=True), version)

    def relabel(self, tenant: str, version: int) -> None:
        """Names the tenant's current row `version`, leaving its bases as they are: a sync-mode commit of
        bases that the routers moved in place. Safe from any thread."""
        with self._lock:
            self._relabels[tenant] = version

    def on_evict(self, hook: Callable[[str], None]) -> None:
        """Calls `hook(tenant)` (on the engine thread) when a tenant's row is given to another for want of
        room: that tenant routes with the trained bases until its version is published again."""
        self._evict_hooks.append(hook)

    def version(self, tenant: str) -> int:
        with self._lock:
            if tenant in self._pending:
                return self._pending[tenant][1]
            return self._rows.get(tenant, (0, 0))[1]

    def resident(self) -> int:
        """How many tenants have their own row on the device."""
        return len(self._rows)

    def resident_tenants(self, limit: int) -> list[str]:
        """The tenants with a row of their own on the device, the most recently routed first, `limit` at most.
        Safe from any thread (one list() of the keys, which no other thread interleaves)."""
        names = list(self._rows)
        return names[: -limit - 1 : -1] if limit else []

    def row(self, tenant: str) -> torch.Tensor | None:
        """The tenant's own row (L, E, D) on the device, None when it routes with the trained bases. Engine
        thread only."""
        if self._stack is None or tenant not in self._rows:
            return None
        return self._stack[self._rows[tenant][0]]

    def plan(self, tenants: Sequence[str], lengths: Sequence[int] = ()) -> RoutingPlan:
        """How a batch whose sequences belong to `tenants` routes: each with its tenant's row. Engine thread
        only."""
        return self.lookup(tenants)

    def lookup(self, tenants: Sequence[str], own: Collection[str] = (), in_place: bool = False) -> RoutingPlan:
        """The bank and per-sequence rows for a batch whose sequences belong to `tenants`; those in `own`
        get a row of their own (a copy of the trained bases) if they have none. With `in_place`, the forward
        may rewrite the batch's bases in place (sync mode): it gets no gates, and the rows' gates are folded
        again at the next lookup. Engine thread only."""
        if self._stack is None:
            return RoutingPlan(Routing(), [0] * len(tenants), [0] * len(tenants))
        self._apply_pending()
        for tenant in own:
            if tenant not in self._rows:
                row = self._allocate()
                self._stack[row] = self._stack[0]
                self._rows[tenant] = (row, 0)
                self._unfolded.add(row)
        rows, versions = [], []
        for tenant in tenants:
            row, version = self._rows.get(tenant, (0, 0))
            if row:
                self._rows.move_to_end(tenant)
            rows.append(row)
            versions.append(version)
        single = len(set(rows)) == 1  # one tenant's batch: a single row lets the routers skip the per-sequence path
        if single:
            index = torch.zeros(len(rows), dtype=torch.long, device=self.device)
            bank = self._stack[rows[0] : rows[0] + 1]
        else:
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            bank = self._stack[: self._used]
        if in_place:
            self._unfolded.update(rows)
            return RoutingPlan(Routing(bank, index), versions, rows)
        return RoutingPlan(Routing(bank, index, self._gates_of(rows, index, single)), versions, rows)

    def _gates_of(self, rows: list[int], index: torch.Tensor, single: bool) -> torch.Tensor | None:
        """The batch's gates: a single row's (1, L, E, D), or each sequence's (B, L, E, D), gathered again
        only when the rows or the gates changed."""
        if self._gates is None:
            return None
        assert self._fold is not None and self._stack is not None
        if self._unfolded:
            changed = torch.tensor(sorted(self._unfolded), device=self.device)
            self._gates[changed] = self._fold(self._stack.index_select(0, changed))
            self._unfolded.clear()
            self._generation += 1
        if single:
            return self._gates[rows[0] : rows[0] + 1]
        if self._gathered is not None and self._gathered[:2] == (rows, self._generation):
            return self._gathered[2]
        gathered = self._gates.index_select(0, index)  # a third of the time of advanced indexing
        self._gathered = (rows, self._generation, gathered)
        return gathered

    def _apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            relabels, self._relabels = self._relabels, {}
        assert self._stack is not None
        for tenant, (bases, version) in pending.items():
            if bases is None:
                row, _ = self._rows.pop(tenant, (0, 0))
                if row:
                    self._free.append(row)
                continue
            row = self._rows[tenant][0] if tenant in self._rows else self._allocate()
            self._stack[row] = bases.to(self._stack.device, self._stack.dtype)
            self._unfolded.add(row)
            self._rows[tenant] = (row, version)
        for tenant, version in relabels.items():
            if tenant in self._rows and version > self._rows[tenant][1]:
                self._rows[tenant] = (self._rows[tenant][0], version)

    def _allocate(self) -> int:
        assert self._stack is not None
        if self._free:
            return self._free.pop()
        if len(self._rows) >= self.capacity:  # evict the least recently used tenant
            tenant, (row, _) = self._rows.popitem(last=False)
            for hook in self._evict_hooks:
                hook(tenant)
            return row
        rows = self._stack.shape[0]
        if self._used == rows:  # grow by doubling, up to the trained row plus `capacity`
            self._stack = self._grown(self._stack)
            if self._gates is not None:
                self._gates = self._grown(self._gates)
        self._used += 1
        return self._used - 1

    def _grown(self, stack: torch.Tensor) -> torch.Tensor:
        rows = stack.shape[0]
        grown = stack.new_empty((min(2 * rows, self.capacity + 1), *stack.shape[1:]))
        grown[:rows] = stack
        return grown
