"""Handing a forward's router inputs to the adaptation layer, grouped by tenant, real tokens only."""

from __future__ import annotations

from typing import Any

import torch

from ..adaptation import Adapter, BankView


def observe(
    adapter: Adapter | None,
    tenants: list[str],  # (B,) each sequence's tenant
    lengths: list[int],  # (B,) real tokens of each sequence in this forward (the rest is padding)
    view: BankView,
    out: Any,  # a model output with router_inputs and expert_indices
    num_experts: int,
) -> None:
    if adapter is None or view.bank is None or view.index is None:
        return
    rows_of: dict[str, list[int]] = {}
    for i, tenant in enumerate(tenants):
        rows_of.setdefault(tenant, []).append(i)
    for tenant, rows in rows_of.items():
        inputs = [torch.cat([layer[i, : lengths[i]] for i in rows]) for layer in out.router_inputs]  # L x (n, D)
        experts = [torch.cat([layer[i, : lengths[i]] for i in rows]) for layer in out.expert_indices]
        load = torch.stack([torch.bincount(e.reshape(-1).cpu(), minlength=num_experts) for e in experts])  # (L, E)
        bases = view.bank[view.index[rows[0]]]  # (L, E, D): every sequence of a tenant shares its row
        adapter.observe(tenant, view.versions[rows[0]], bases, inputs, load)
