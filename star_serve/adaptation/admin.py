"""The admin side of an adapter: what the API asks of a tenant (describe, configure, roll back, reset) and
what the metrics read at a scrape (counters, and the health of the busiest tenants, a bounded set)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model.gha import orthogonality_defects, projection_distances
from .bus import StatisticsBus
from .quality import Verdict
from .tenants import AdaptationStats, Tenants

OTHER_TENANTS = "other"  # the metrics' label for the tenants beyond the top ones


@dataclass(frozen=True)
class TenantHealth:
    tenant: str
    drift: float
    explained: float | None
    loss: tuple[float, float] | None = None  # the quality gate's last scores: (served bases, trained bases)


@dataclass(frozen=True)
class AdaptationReport:
    """What the metrics read of an adapter at a scrape: its counters, the tokens its pending statistics
    had no room for, whether its store answers, and the health of its busiest tenants."""

    stats: AdaptationStats
    dropped_tokens: int
    bus_dropped: int  # batches the statistics bus had no room for
    store_ok: bool
    health: list[TenantHealth]
    resident: int = 0  # tenants whose state is in memory here
    replica: str = ""  # this process's name as an owner of tenants' updates
    owned: list[int] = field(default_factory=list)  # the partitions of tenants whose updates it owns


class Admin:
    def __init__(self, tenants: Tenants, bus: StatisticsBus) -> None:
        self.tenants, self.bus = tenants, bus

    async def describe(self, tenant: str) -> dict[str, object]:
        tenants = self.tenants
        state = await tenants.ensure_loaded(tenant)
        bases = tenants.trained if state.bases is None else state.bases
        return {
            "model": tenants.model,
            "tenant": tenant,
            "version": state.version,
            "tokens_seen": state.tokens_seen,
            "frozen": state.frozen,
            "learning_rate": state.learning_rate,
            "last_update": state.updated,
            "drift": projection_distances(bases, tenants.trained).tolist(),
            "orthogonality_defect": orthogonality_defects(bases).tolist(),
            "quality": None if state.verdict is None else state.verdict.as_dict(),
            "owner": await self._owner(tenant),
        }

    async def _owner(self, tenant: str) -> dict[str, object] | None:
        """The partition of the tenant's statistics and the replica that owns it now (None: unknown)."""
        partition = self.bus.partition(tenant)
        try:
            return {"partition": partition, "replica": await self.bus.owner(partition)}
        except Exception:  # the store is down: the rest of the description still holds
            return None

    async def configure(self, tenant: str, frozen: bool | None, learning_rate: float | None) -> None:
        """Stores the tenant's settings (every replica and every restart sees them) and applies them here."""
        state = await self.tenants.ensure_loaded(tenant)
        settings = {}
        if frozen is not None:
            settings["frozen"] = "true" if frozen else "false"
        if learning_rate is not None:
            settings["learning_rate"] = repr(learning_rate)
        if settings:
            await self.tenants.store.configure(self.tenants.model, tenant, settings)
            self.tenants.configured(tenant, state, settings)

    async def rollback(self, tenant: str, version: int | None) -> int:
        """Commits, as a new version, the bases of `version` (None: the previous one; 0: the trained
        bases). Returns the new version number."""
        async with self.tenants.steps[tenant]:
            state = await self.tenants.ensure_loaded(tenant)
            return await self.tenants.roll_back(tenant, state, version)

    async def reset(self, tenant: str) -> int:
        return await self.rollback(tenant, 0)

    def health(self, top: int) -> list[TenantHealth]:
        """Drift and explained variance of the `top` tenants by traffic, and of the rest as one "other"
        (largest drift, traffic-weighted explained variance): a bounded set for the metrics."""
        with self.tenants.lock:
            ranked = sorted(self.tenants.states.items(), key=lambda item: -item[1].traffic)
            rows = [TenantHealth(t, s.drift, s.explained, _losses(s.verdict)) for t, s in ranked[:top]]
            rest = [s for _, s in ranked[top:]]
        if rest:
            seen = [s for s in rest if s.explained is not None and s.traffic]
            total = sum(s.traffic for s in seen)
            explained = sum(s.traffic * (s.explained or 0.0) for s in seen) / total if total else None
            rows.append(TenantHealth(OTHER_TENANTS, max(s.drift for s in rest), explained))
        return rows

    def report(self, top: int) -> AdaptationReport:
        """The counters and health that the metrics export (`top` tenants by traffic, then "other")."""
        tenants = self.tenants
        dropped = tenants.pending.dropped_tokens
        with tenants.lock:
            resident = len(tenants.states)
        return AdaptationReport(
            tenants.stats,
            dropped,
            self.bus.dropped,
            tenants.store_ok,
            self.health(top),
            resident=resident,
            replica=self.bus.replica,
            owned=sorted(self.bus.owned),
        )


def _losses(verdict: Verdict | None) -> tuple[float, float] | None:
    """(served, trained) scores of a tenant's last verdict, when it has both."""
    if verdict is None or verdict.served is None or verdict.trained is None:
        return None
    return (verdict.trained if verdict.rolled_back else verdict.served), verdict.trained
