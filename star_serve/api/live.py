"""What the server does when the live measurement (`adaptation/live.py`) finds a tenant's served version
worse than the trained bases on the same tokens of its own traffic: it rolls the tenant back to the trained
bases, as a new version, from the event loop (the engine thread only reports)."""

from __future__ import annotations

import asyncio
import logging

from ..adaptation import AdaptationError
from ..metrics import ServingMetrics
from .state import ServedModel

log = logging.getLogger(__name__)


def watch_live(served: ServedModel, metrics: ServingMetrics, loop: asyncio.AbstractEventLoop) -> None:
    """Has `served`'s live measurement roll degraded tenants back on `loop`."""
    if served.live is None:
        return

    def degraded(tenant: str, version: int) -> None:  # on the engine thread
        asyncio.run_coroutine_threadsafe(roll_back_degraded(served, metrics, tenant, version), loop)

    served.live.on_degraded = degraded


async def roll_back_degraded(served: ServedModel, metrics: ServingMetrics, tenant: str, version: int) -> None:
    """Rolls `tenant` back to the trained bases, if `version` is still the one that serves it."""
    assert served.adapter is not None and served.live is not None
    measured = served.live.describe(tenant)
    try:
        current = (await served.adapter.describe(tenant))["version"]
        if current != version:
            return  # a newer version (a commit, a rollback) replaced the degraded one meanwhile
        restored = await served.adapter.rollback(tenant, 0)
    except AdaptationError:
        log.warning("%s/%s: could not roll back degraded version %d", served.name, tenant, version, exc_info=True)
        return
    metrics.live_rollbacks.labels(served.name).inc()
    log.warning(
        "%s/%s: version %d served worse than the trained bases on its own traffic (%s); rolled back to them as "
        "version %d",
        *(served.name, tenant, version, measured, restored),
    )
