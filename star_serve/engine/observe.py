"""The engine's side of adaptation: which bank rows a batch routes with (and, in sync mode, the routers'
update of them), and handing a forward's router inputs to the adaptation layer, grouped by tenant, real
tokens only."""

from __future__ import annotations

from typing import Any

import torch

from ..adaptation import Adapter, BankView, TenantBank
from ..adaptation.capture import capture_groups, expert_load
from ..adaptation.sync import SyncUpdate


def route(
    bank: TenantBank, adapter: Adapter | None, tenants: list[str], lengths: list[int]
) -> tuple[BankView, SyncUpdate | None]:
    """The bank view of a batch and, in sync mode, the update that moves its tenants' rows before routing."""
    if adapter is None or not adapter.syncing:
        return bank.lookup(tenants), None
    view = bank.lookup(tenants, own=adapter.adapting(tenants))
    return view, adapter.sync_update(view, tenants, lengths)


def observe(
    adapter: Adapter | None,
    tenants: list[str],  # (B,) each sequence's tenant
    lengths: list[int],  # (B,) real tokens of each sequence in this forward (the rest is padding)
    view: BankView,
    out: Any,  # a model output with router_inputs and expert_indices
    num_experts: int,
    update: SyncUpdate | None = None,
) -> None:
    """Hands the forward's tokens to the adapter, every tenant of the batch captured in one pass."""
    if adapter is None or view.bank is None or view.index is None:
        return
    names = list(dict.fromkeys(tenants))
    groups = torch.tensor([names.index(t) for t in tenants])  # (B,) each sequence's tenant, as a number
    versions = [view.versions[tenants.index(t)] for t in names]
    seq_len = out.router_inputs[0].shape[1]
    real = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]  # (B, S): tokens, not padding
    load = expert_load(out.expert_indices, real, groups, len(names), num_experts)  # (G, L, E)
    if adapter.syncing:  # the routers already moved each tenant's row with these tokens
        for g, tenant in enumerate(names):
            adapter.synced(update, tenant, versions[g], int(real[groups == g].sum()), load[g])
        return
    accepted = [adapter.accepts(t, v) for t, v in zip(names, versions, strict=True)]
    if not any(accepted):
        return
    counted = real & torch.tensor(accepted)[groups][:, None]  # only tokens that will count are captured
    stats = capture_groups(view.bank, view.index, out.router_inputs, counted, groups, versions, adapter.config.capture)
    for g, tenant in enumerate(names):
        if accepted[g]:
            adapter.take(tenant, stats[g], load[g])
