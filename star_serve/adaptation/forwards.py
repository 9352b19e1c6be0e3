"""Forwards as the capture sees them: each sequence's tenant, real tokens and basis version, and every
layer's router inputs and expert choices; the prompts held back for the quality gate taken out, the rest
merged into one capture pass, then reduced to each tenant's statistics and handed to the adapter."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from .capture import CaptureConfig, capture_groups, expert_load
from .sync import SyncUpdate
from .worker import Adapter

log = logging.getLogger(__name__)


@dataclass
class Forward:
    """One forward as the capture sees it: each sequence's tenant, real tokens and basis version, and every
    layer's router inputs and expert choices."""

    tenants: list[str]
    lengths: list[int]
    versions: list[int]
    router_inputs: list[torch.Tensor]  # L x (B, S, D)
    expert_indices: list[torch.Tensor]  # L x (B, S, k)
    token_ids: torch.Tensor | None = None  # (B, S): the tokens themselves, for the held-back prompts

    def grouped(self) -> tuple[list[str], torch.Tensor, list[int], torch.Tensor]:
        """The groups of sequences of one tenant and basis version: each group's tenant and version, each
        sequence's group (B,), and the real tokens (B, S)."""
        number: dict[tuple[str, int], int] = {}
        for key in zip(self.tenants, self.versions, strict=True):
            number.setdefault(key, len(number))
        groups = torch.tensor([number[key] for key in zip(self.tenants, self.versions, strict=True)])
        return [t for t, _ in number], groups, [v for _, v in number], self.real()

    def real(self) -> torch.Tensor:
        """(B, S) bool: the real tokens, not padding."""
        seq_len = self.router_inputs[0].shape[1]
        return torch.arange(seq_len)[None, :] < torch.tensor(self.lengths)[:, None]


def merge_forwards(forwards: list[Forward]) -> Forward:
    """The forwards as one, for a single capture pass: those of one sequence length side by side and,
    where lengths differ, each real token as a sequence of its own, padding left out. One pass for the
    whole batch makes fewer operations than one per sequence length, and so hands the interpreter lock
    back and forth with the engine thread less often."""
    by_length: dict[int, list[Forward]] = {}
    for forward in forwards:
        by_length.setdefault(forward.router_inputs[0].shape[1], []).append(forward)
    parts = [same[0] if len(same) == 1 else _concatenated(same) for same in by_length.values()]
    if len(parts) == 1:
        return parts[0]
    return _concatenated([_token_by_token(part) for part in parts])


def _concatenated(forwards: list[Forward]) -> Forward:
    """Forwards of one sequence length as one, side by side."""
    return Forward(
        [t for f in forwards for t in f.tenants],
        [n for f in forwards for n in f.lengths],
        [v for f in forwards for v in f.versions],
        [torch.cat(layer) for layer in zip(*(f.router_inputs for f in forwards), strict=True)],
        [torch.cat(layer) for layer in zip(*(f.expert_indices for f in forwards), strict=True)],
    )


def _token_by_token(forward: Forward) -> Forward:
    """The forward's real tokens, in order, each as a one-token sequence of its sequence's tenant."""
    if forward.router_inputs[0].shape[1] == 1:
        return forward
    real = forward.real()
    inputs, experts = [x[real] for x in forward.router_inputs], [e[real] for e in forward.expert_indices]
    return per_token(forward.tenants, forward.lengths, forward.versions, inputs, experts)


def per_token(
    tenants: list[str],
    lengths: list[int],
    versions: list[int],
    inputs: list[torch.Tensor],  # L x (n, D): the real tokens of the sequences, in order
    experts: list[torch.Tensor],  # L x (n, k)
) -> Forward:
    """A forward of one-token sequences, each of its sequence's tenant and version."""
    return Forward(
        [t for t, n in zip(tenants, lengths, strict=True) for _ in range(n)],
        [1] * sum(lengths),
        [v for v, n in zip(versions, lengths, strict=True) for _ in range(n)],
        [x[:, None] for x in inputs],
        [e[:, None] for e in experts],
    )


def held_back(adapter: Adapter, forward: Forward) -> Forward:
    """The forward without the prompts that the adapter holds back for its quality gate: their lengths are
    0, so that none of their tokens count in the statistics."""
    if forward.token_ids is None or max(forward.lengths) < 2:  # a decode step holds no prompt
        return forward
    ids = forward.token_ids.cpu()
    lengths = [
        0 if adapter.hold_back(tenant, ids[i, :n]) else n
        for i, (tenant, n) in enumerate(zip(forward.tenants, forward.lengths, strict=True))
    ]
    return replace(forward, lengths=lengths) if lengths != forward.lengths else forward


def capture_batch(adapter: Adapter, forwards: list[Forward], num_experts: int, config: CaptureConfig) -> None:
    """Captures waiting forwards in one pass; a failure loses their tokens, never the capture thread."""
    try:
        with torch.inference_mode():
            counted = [f for f in (held_back(adapter, f) for f in forwards) if sum(f.lengths)]
            if counted:
                capture_forward(adapter, merge_forwards(counted), num_experts, config)
    except Exception:
        log.exception("capturing a forward's statistics failed; its tokens do not count")


def capture_forward(adapter: Adapter, forward: Forward, num_experts: int, config: CaptureConfig) -> None:
    """Each group's statistics against the version its tokens count against (see `Adapter.counted`): the
    version that served them in async mode, the tenant's latest shadow version in shadow mode."""
    names, groups, served, real = forward.grouped()
    counted = [adapter.counted(t, v) for t, v in zip(names, served, strict=True)]
    accepted = [v is not None for v in counted]
    if not any(accepted):
        return
    versions = [v or 0 for v in counted]
    load = expert_load(forward.expert_indices, real, groups, len(names), num_experts)  # (G, L, E)
    tokens = real & torch.tensor(accepted)[groups][:, None]  # only tokens that will count are captured
    bases = torch.stack([adapter.served_bases(t, v) for t, v in zip(names, versions, strict=True)])  # (G, L, E, D)
    stats = capture_groups(bases, groups, forward.router_inputs, tokens, groups, versions, config)
    adapter.take([t if ok else None for t, ok in zip(names, accepted, strict=True)], stats, load)


def synced(adapter: Adapter, forward: Forward, num_experts: int, update: SyncUpdate | None) -> None:
    names, groups, versions, real = forward.grouped()
    load = expert_load(forward.expert_indices, real, groups, len(names), num_experts)  # (G, L, E)
    for g, tenant in enumerate(names):
        adapter.synced(update, tenant, versions[g], int(real[groups == g].sum()), load[g])
