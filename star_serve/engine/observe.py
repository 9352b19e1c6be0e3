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
    names = sorted(set(tenants))
    owner = torch.tensor([names.index(t) for t in tenants])  # (B,) each sequence's tenant, as a number
    seq_len = out.router_inputs[0].shape[1]
    real = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]  # (B, S): tokens, not padding
    for t, tenant in enumerate(names):
        tokens = real if len(names) == 1 else real & (owner == t)[:, None]
        device_tokens = tokens.to(out.router_inputs[0].device)
        inputs = [layer[device_tokens] for layer in out.router_inputs]  # L x (n, D)
        load = torch.stack(
            [
                torch.bincount(layer[device_tokens].reshape(-1).cpu(), minlength=num_experts)
                for layer in out.expert_indices
            ]
        )  # (L, E)
        row = tenants.index(tenant)
        bases = view.bank[view.index[row]]  # (L, E, D): every sequence of a tenant shares its row
        adapter.observe(tenant, view.versions[row], bases, inputs, load)
