"""How one forward routes, as one value the model takes (`routing=`), decided by whoever built the batch.

Per-tenant routing travels as data, as TGI's adapter indices do: `bank` (T, L, E, D) stacks T tenants' GHA
bases for every MoE layer and `index` (B,) picks each sequence's row, so one forward serves many tenants.
Serving folds each row's whole gate once per version (`StarMoePreTrainedModel.router_gates`) and routes
with `gates` instead, one product a layer. An `update`, called with each layer's index and router inputs
before that layer routes, may rewrite the layer's rows of `bank` in place: test-time adaptation in `sync`
mode (STAR.md); the layer then routes from the rewritten bases, never from gates folded before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

RouterUpdate = Callable[[int, torch.Tensor], None]  # (layer index, router inputs (B, S, D)) before routing


@dataclass(frozen=True)
class Routing:
    bank: torch.Tensor | None = None  # (T, L, E, D); None: every router's own trained basis
    index: torch.Tensor | None = None  # (B,) each sequence's row of `bank`; None: row 0 for all
    gates: torch.Tensor | None = None  # (B, L, E, D), or (1, L, E, D) shared by the batch
    update: RouterUpdate | None = None

    @classmethod
    def shared(cls, bases: torch.Tensor) -> Routing:
        """Every sequence routes with the same `bases` (L, E, D)."""
        return cls(bank=bases[None])

    def check(self, layers: int) -> None:
        for name, stacked in (("bank", self.bank), ("gates", self.gates)):
            if stacked is not None and stacked.shape[1] != layers:
                raise ValueError(f"routing {name} has {stacked.shape[1]} layers, the model {layers}")

    def layer(self, i: int, router_input: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What layer `i` routes `router_input` (B, S, D) with, as (bases, gate): at most one is set; both
        None: the router's own trained basis."""
        if self.update is not None:  # adaptation before routing: may rewrite bank[:, i]
            self.update(i, router_input)
        elif self.gates is not None:  # folded: one product routes the batch
            return None, self.gates[0, i] if self.gates.shape[0] == 1 else self.gates[:, i]
        if self.bank is None:
            return None, None
        if self.bank.shape[0] == 1 or self.index is None:  # one row for the whole batch (E, D)
            return self.bank[0, i], None
        # index_select: a third of the time of advanced indexing, bank[index, i]
        return self.bank[:, i].index_select(0, self.index), None


TRAINED = Routing()
