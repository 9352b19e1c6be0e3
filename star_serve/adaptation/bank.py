"""The tenant bank: each tenant's GHA bases for every MoE layer of one model, as one stacked tensor."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BankView:
    """What one forward needs: the stacked bases (T, L, E, D), each sequence's row (B,) and versions."""

    bank: torch.Tensor | None
    index: torch.Tensor | None
    versions: list[int]


class TenantBank:
    """Serves every tenant's bases. A tenant with no committed version of its own routes with the
    trained bases, version 0."""

    def __init__(self, trained: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> None:
        self.trained = None if trained is None else trained.to(device=device, dtype=dtype)  # (L, E, D)
        self.device = device
        self._lock = threading.Lock()

    def lookup(self, tenants: Sequence[str]) -> BankView:
        """The bank and per-sequence index for a batch whose sequences belong to `tenants`."""
        with self._lock:
            if self.trained is None:
                return BankView(None, None, [0] * len(tenants))
            index = torch.zeros(len(tenants), dtype=torch.long, device=self.device)
            return BankView(self.trained[None], index, [0] * len(tenants))

    def version(self, tenant: str) -> int:
        return 0
