"""`sync` mode (STAR.md's paper-faithful variant): before a layer routes a batch, each adapting tenant's
basis for that layer takes one guarded GHA step on the tenant's own tokens of the batch, in place in the
tenant's bank row, and the batch is routed with the updated basis. Tokens are screened and clipped as in
capture; tenants never share a step, and the trained row is never written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.gha import gha_statistics
from .bank import RoutingPlan
from .capture import CaptureConfig, CaptureCounts
from .guardrails import Guardrails, guarded_layer_step


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

    def __call__(self, layer: int, router_input: torch.Tensor) -> None:
        real = torch.arange(router_input.shape[1])[None, :] < self.lengths[:, None]  # (B, S): tokens, not padding
        for tenant, t in self.tenants.items():
            mask = (real & t.sequences[:, None]).to(router_input.device)
            x = router_input[mask].detach().float()  # (n, D)
            finite = x.isfinite().all(dim=-1)
            x = x[finite]
            norms = x.norm(dim=-1, keepdim=True)
            over = norms > self.capture.max_token_norm
            x = torch.where(over, x * (self.capture.max_token_norm / norms.clamp_min(1e-12)), x)
            if layer == 0:
                self.counts.rejected += int((~finite).sum())
                self.counts.sampled += x.shape[0]
                self.counts.clipped += int(over.sum())
            if x.shape[0] == 0:
                continue
            current = self.bank[t.position, layer].float()
            stats = gha_statistics(current, x)
            step = guarded_layer_step(self.trained[layer].float(), current, stats, t.learning_rate, self.guard)
            if step.applied:
                self.bank[t.position, layer] = step.basis.to(self.bank.dtype)
            else:
                self.refused[tenant] = self.refused.get(tenant, 0) + 1
