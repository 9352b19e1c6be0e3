"""The engine's side of adaptation: which bank rows a batch routes with (and, in sync mode, the routers'
update of them), and handing each forward's router inputs to the adaptation layer, grouped by tenant, real
tokens only."""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from ..adaptation import Adapter, BankView, TenantBank
from ..adaptation.capture import capture_groups, expert_load
from ..adaptation.sync import SyncUpdate

log = logging.getLogger(__name__)


def route(
    bank: TenantBank, adapter: Adapter | None, tenants: list[str], lengths: list[int]
) -> tuple[BankView, SyncUpdate | None]:
    """The bank view of a batch and, in sync mode, the update that moves its tenants' rows before routing."""
    if adapter is None or not adapter.syncing:
        return bank.lookup(tenants), None
    view = bank.lookup(tenants, own=adapter.adapting(tenants))
    return view, adapter.sync_update(view, tenants, lengths)


class Observer:
    """Hands each forward's tokens to the adapter from a thread of its own, so that the engine's next
    forward runs while the last one is captured. The forwards waiting when the thread comes round are
    captured together, every tenant of them in one pass: when capture falls behind, its fixed cost is
    shared by more forwards. At most `depth` forwards wait; a faster engine waits for capture rather than
    lose statistics. In sync mode the routers have already moved the rows, and the engine thread only
    reports the tokens."""

    def __init__(self, adapter: Adapter, num_experts: int, depth: int = 8) -> None:
        self.adapter, self.num_experts, self.depth = adapter, num_experts, depth
        self._waiting: deque[_Forward] = deque()
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def submit(
        self,
        tenants: list[str],  # (B,) each sequence's tenant
        lengths: list[int],  # (B,) real tokens of each sequence in this forward (the rest is padding)
        view: BankView,
        out: Any,  # a model output with router_inputs and expert_indices
        update: SyncUpdate | None = None,
    ) -> None:
        if view.bank is None or view.index is None:
            return
        forward = _Forward(tenants, lengths, view.versions, out.router_inputs, out.expert_indices)
        if self.adapter.syncing:
            _synced(self.adapter, forward, self.num_experts, update)
            return
        forward.bases = view.bank[view.index]  # (B, L, E, D): a copy, as the bank may change before capture
        with self._changed:
            self._changed.wait_for(lambda: len(self._waiting) < self.depth or self._closed)
            self._waiting.append(forward)
            self._changed.notify_all()

    def close(self) -> None:
        """Captures what is waiting, then stops the thread."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting or self._closed)
                if not self._waiting:
                    return
                forwards = list(self._waiting)
                self._waiting.clear()
                self._changed.notify_all()
            try:
                with torch.inference_mode():
                    for forward in _merged(forwards):
                        _capture(self.adapter, forward, self.num_experts)
            except Exception:
                log.exception("capturing a forward's statistics failed; its tokens do not count")


@dataclass
class _Forward:
    tenants: list[str]
    lengths: list[int]
    versions: list[int]
    router_inputs: list[torch.Tensor]  # L x (B, S, D)
    expert_indices: list[torch.Tensor]  # L x (B, S, k)
    bases: torch.Tensor | None = None  # (B, L, E, D): each sequence's bases

    def grouped(self) -> tuple[list[str], torch.Tensor, list[int], torch.Tensor]:
        """The groups of sequences of one tenant and basis version: each group's tenant and version, each
        sequence's group (B,), and the real tokens (B, S)."""
        number: dict[tuple[str, int], int] = {}
        for key in zip(self.tenants, self.versions, strict=True):
            number.setdefault(key, len(number))
        groups = torch.tensor([number[key] for key in zip(self.tenants, self.versions, strict=True)])
        seq_len = self.router_inputs[0].shape[1]
        real = torch.arange(seq_len)[None, :] < torch.tensor(self.lengths)[:, None]  # not padding
        return [t for t, _ in number], groups, [v for _, v in number], real


def _merged(forwards: list[_Forward]) -> list[_Forward]:
    """The forwards as fewer: those of one sequence length side by side, as one batch."""
    by_length: dict[int, list[_Forward]] = {}
    for forward in forwards:
        by_length.setdefault(forward.router_inputs[0].shape[1], []).append(forward)
    merged = []
    for same in by_length.values():
        if len(same) == 1:
            merged += same
            continue
        merged.append(
            _Forward(
                [t for f in same for t in f.tenants],
                [n for f in same for n in f.lengths],
                [v for f in same for v in f.versions],
                [torch.cat(layer) for layer in zip(*(f.router_inputs for f in same), strict=True)],
                [torch.cat(layer) for layer in zip(*(f.expert_indices for f in same), strict=True)],
                torch.cat([f.bases for f in same if f.bases is not None]),
            )
        )
    return merged


def _capture(adapter: Adapter, forward: _Forward, num_experts: int) -> None:
    assert forward.bases is not None
    names, groups, versions, real = forward.grouped()
    accepted = [adapter.accepts(t, v) for t, v in zip(names, versions, strict=True)]
    if not any(accepted):
        return
    load = expert_load(forward.expert_indices, real, groups, len(names), num_experts)  # (G, L, E)
    counted = real & torch.tensor(accepted)[groups][:, None]  # only tokens that will count are captured
    rows = torch.arange(len(forward.tenants))
    config = adapter.config.capture
    stats = capture_groups(forward.bases, rows, forward.router_inputs, counted, groups, versions, config)
    adapter.take([t if ok else None for t, ok in zip(names, accepted, strict=True)], stats, load)


def _synced(adapter: Adapter, forward: _Forward, num_experts: int, update: SyncUpdate | None) -> None:
    names, groups, versions, real = forward.grouped()
    load = expert_load(forward.expert_indices, real, groups, len(names), num_experts)  # (G, L, E)
    for g, tenant in enumerate(names):
        adapter.synced(update, tenant, versions[g], int(real[groups == g].sum()), load[g])
