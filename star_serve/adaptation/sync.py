"""`sync` mode (STAR.md's paper-faithful variant): before a layer routes a batch, each adapting tenant's
basis for that layer takes one guarded GHA step on the tenant's own tokens of the batch, in place in the
tenant's bank row, and the batch is routed with the updated basis (`SyncUpdate`). Tokens are screened and
clipped as in capture; tenants never share a step, and the trained row is never written. `SyncAdapter`
hands a copy of a tenant's row to the event loop once enough of its tokens moved it, and commits it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from ..model.gha import gha_statistics
from .bank import RoutingPlan
from .capture import CaptureConfig, CaptureCounts, screen
from .errors import CommitConflict
from .guardrails import Guardrails, collapsed, guarded_layer_step, load_entropies
from .store import Snapshot
from .tenants import Tenants


@dataclass
class SyncTenant:
    position: int  # index into the view's bank: the tenant's own row
    sequences: torch.Tensor  # (B,) bool: the batch's sequences of this tenant
    learning_rate: float


class SyncUpdate:
    """The `Routing.update` of one forward: called by the model with (layer, router inputs (B, S, D))."""

    def __init__(
        self,
        view: RoutingPlan,
        tenants: dict[str, SyncTenant],
        lengths: list[int],  # (B,) real tokens of each sequence in this forward
        trained: torch.Tensor,  # (L, E, D) on the bank's device
        capture: CaptureConfig,
        guard: Guardrails,
    ) -> None:
        assert view.routing.bank is not None
        self.bank, self.tenants, self.trained = view.routing.bank, tenants, trained
        self.lengths = torch.tensor(lengths)
        self.capture, self.guard = capture, guard
        self.counts = CaptureCounts()
        self.refused: dict[str, int] = {}  # layer steps refused by a guardrail, per tenant
        # Per tenant, (n,) each: its tokens not rejected at any layer so far, and those clipped at some layer.
        self._screened: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer: int, router_input: torch.Tensor) -> None:
        real = torch.arange(router_input.shape[1])[None, :] < self.lengths[:, None]  # (B, S): tokens, not padding
        last = layer == self.trained.shape[0] - 1
        for tenant, t in self.tenants.items():
            mask = (real & t.sequences[:, None]).to(router_input.device)
            x = router_input[mask].detach().float()  # (n, D)
            # Capture's screening rule, as far as the layers routed so far can tell: a token rejected at
            # one layer stays rejected at every later one.
            _, kept, clipped = screen(x[None], self.capture.max_token_norm)
            if tenant in self._screened:
                kept_before, clipped_before = self._screened[tenant]
                kept, clipped = kept & kept_before, clipped | clipped_before
            self._screened[tenant] = kept, clipped
            if last:
                self.counts.sampled += int(kept.sum())
                self.counts.rejected += int((~kept).sum())
                self.counts.clipped += int((clipped & kept).sum())
            x = x[kept]
            if x.shape[0] == 0:
                continue
            current = self.bank[t.position, layer].float()
            stats = gha_statistics(current, x)
            step = guarded_layer_step(self.trained[layer].float(), current, stats, t.learning_rate, self.guard)
            if step.applied:
                self.bank[t.position, layer] = step.basis.to(self.bank.dtype)
            else:
                self.refused[tenant] = self.refused.get(tenant, 0) + 1


@dataclass
class SyncState:
    """A tenant's tokens that moved its bank row since its last commit."""

    tokens: int = 0
    load: torch.Tensor | None = None  # (L, E) tokens per expert
    first_seen: float | None = None  # wall-clock time of the oldest
    bases: torch.Tensor | None = None  # a copy of the row, handed over to commit


class SyncAdapter:
    """Sync mode's part of the adapter: the routers' update of each forward, and the commits of the rows it
    moved. The engine thread builds the update and reports each forward; the event loop commits."""

    def __init__(self, tenants: Tenants) -> None:
        self.tenants = tenants
        self.config = tenants.config
        self.states: dict[str, SyncState] = {}  # under `tenants.lock`
        tenants.on_drop.append(self._forget)
        tenants.on_evict.append(self._evict)

    def _evict(self, tenant: str) -> bool:
        """Forgets the tenant's uncommitted count (its bank row keeps what it learnt); whether there was one."""
        synced = self.states.pop(tenant, None)
        return synced is not None and synced.tokens > 0

    def _forget(self, tenant: str) -> None:
        state = self.states.get(tenant)
        if state is not None:
            state.load, state.first_seen = None, None

    # -- engine thread -----------------------------------------------------------------------------

    def adapting(self, tenants: list[str]) -> list[str]:
        """Those of `tenants` whose bases the coming forward will update: each needs a bank row."""
        with self.tenants.lock:
            return [t for t in dict.fromkeys(tenants) if not self.tenants.state(t).frozen]

    def update(self, plan: RoutingPlan, tenants: list[str], lengths: list[int]) -> SyncUpdate | None:
        """The routers' in-place update of one forward, for the batch's tenants that have a row of their own."""
        bank = self.tenants.bank
        if plan.routing.bank is None or plan.routing.index is None or bank.trained is None:
            return None
        adapting: dict[str, SyncTenant] = {}
        candidates = self.adapting(tenants)
        with self.tenants.lock:
            for tenant in candidates:
                first = tenants.index(tenant)
                if plan.rows[first] == 0:  # never write the trained row
                    continue
                sequences = torch.tensor([t == tenant for t in tenants])
                position = int(plan.routing.index[first])
                adapting[tenant] = SyncTenant(position, sequences, self.tenants.state(tenant).learning_rate)
        if not adapting:
            return None
        return SyncUpdate(plan, adapting, lengths, bank.trained, self.config.capture, self.config.guard)

    def synced(self, update: SyncUpdate | None, tenant: str, version: int, tokens: int, load: torch.Tensor) -> None:
        """After a forward: `tokens` of the tenant's tokens moved its row, routed with `load` (L, E). Once
        enough have, a copy of the row is handed to the event loop to commit."""
        tenants = self.tenants
        with tenants.lock:
            state = tenants.state(tenant)
            if update is not None and tenant == next(iter(update.tenants), None):  # once per forward
                tenants.stats.captured += update.counts
                tenants.stats.refused_steps += sum(update.refused.values())
            if version != state.version and version == 0 and state.bases is not None:
                tenants.bank.publish(tenant, state.bases, state.version)  # evicted from the bank: bring it back
                return
            if state.frozen or update is None or tenant not in update.tenants:
                return
            synced = self.states.setdefault(tenant, SyncState())
            synced.tokens += tokens
            synced.load = load.cpu() if synced.load is None else synced.load + load.cpu()
            synced.first_seen = synced.first_seen or time.time()
            if synced.tokens < self.config.min_tokens and state.loaded:
                return
            row = tenants.bank.row(tenant)
            if row is None:
                return
            synced.bases = row.detach().float().cpu().clone()  # between forwards: no half-written row
        tenants.wake()

    # -- event loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Commits each tenant's row once the engine hands a copy over; loads first-seen tenants."""
        await self.tenants.run_due(self.due, self.commit)

    def due(self, tenant: str, _: object = None) -> bool:
        state = self.states.get(tenant)
        return state is not None and state.bases is not None

    async def commit(self, tenant: str) -> bool:
        """Commits the copy of the tenant's row that the engine handed over; True when committed."""
        tenants = self.tenants
        async with tenants.steps[tenant]:
            state = await tenants.ensure_loaded(tenant)
            with tenants.lock:
                synced = self.states.pop(tenant, SyncState())
                version = state.version
            if synced.bases is None or synced.tokens == 0:
                return False
            load = synced.load
            if load is not None and state.frozen_entropy is None:  # its first tokens, its row barely moved
                state.frozen_entropy = load_entropies(load).tolist()
            elif load is not None and collapsed(load, state.frozen_entropy, self.config.guard):
                with contextlib.suppress(CommitConflict):
                    await tenants.roll_back(tenant, state, None)
                return False
            meta = tenants.meta(state, mode="sync")
            snapshot = Snapshot(tenants.model, tenant, version + 1, synced.bases, meta=meta)
            try:
                committed = await tenants.store.commit(snapshot, expected=version)
            except Exception:
                with tenants.lock:  # the row keeps its updates; the next forward hands over a fresh copy
                    self.states.setdefault(tenant, SyncState()).tokens += synced.tokens
                raise
            if not committed:
                tenants.stats.commits_lost += 1
                tenants.lost(state)
                return False
            with tenants.lock:
                tenants.adopt(tenant, state, snapshot, tokens=synced.tokens, publish=False)
                tenants.bank.relabel(tenant, snapshot.version)  # the row already holds these bases, and more
            tenants.committed([time.time() - (synced.first_seen or time.time())])
            return True
