"""The follower: every replica adopts the versions that the owners of its tenants commit, as their
announcements arrive, and confirms by polling what announcements may have missed (a dropped connection, a
restart), picking up settings changed through other replicas on the way."""

from __future__ import annotations

import asyncio

from .tenants import Tenants


class Follower:
    def __init__(self, tenants: Tenants) -> None:
        self.tenants = tenants

    @property
    def announced(self) -> bool:
        """Whether the store announces commits (Redis does; a local directory is only polled)."""
        return hasattr(self.tenants.store, "announcements")

    async def follow(self) -> None:
        """Adopts versions that other replicas commit, as their announcements arrive."""
        tenants = self.tenants
        while True:
            try:
                async for tenant, version in tenants.store.announcements(tenants.model):  # type: ignore[attr-defined]
                    tenants.store_ok = True
                    await tenants.refresh(tenant, version)
            except asyncio.CancelledError:
                raise
            except Exception:
                tenants.store_failed("following announcements")
                await asyncio.sleep(tenants.config.poll_interval)

    async def poll(self) -> None:
        """Confirms the latest version and settings of every loaded tenant, one store call a round."""
        tenants = self.tenants
        while True:
            await asyncio.sleep(tenants.config.poll_interval)
            if not await tenants.store.ping():
                tenants.store_failed("pinging")
                continue
            tenants.store_ok = True
            with tenants.lock:
                loaded = [t for t, s in tenants.states.items() if s.loaded]
            try:
                heads = await tenants.store.heads(tenants.model, loaded)  # one call, however many tenants
            except Exception:
                tenants.store_failed("polling versions")
                continue
            for tenant, (version, settings) in heads.items():
                with tenants.lock:
                    state = tenants.states.get(tenant)
                if state is None:  # forgotten meanwhile: it loads its latest when it returns
                    continue
                tenants.configured(tenant, state, settings)
                try:
                    await tenants.refresh(tenant, version)
                except Exception:
                    tenants.store_failed(f"loading version {version} of {tenant}")
                    break
