"""The engine's side of adaptation: which bank rows a batch routes with (and, in sync mode, the routers'
update of them), and handing each forward's router inputs to the adaptation layer, grouped by tenant, real
tokens only."""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from ..adaptation import Adapter, BankView, TenantBank
from ..adaptation.capture import CaptureConfig, capture_groups, expert_load
from ..adaptation.sync import SyncUpdate

log = logging.getLogger(__name__)

CAPTURE_BATCH_TOKENS = 1024  # tokens of waiting forwards captured in one pass
CAPTURE_MAX_DELAY = 0.5  # seconds the first waiting forward waits for others


def route(
    bank: TenantBank, adapter: Adapter | None, tenants: list[str], lengths: list[int]
) -> tuple[BankView, SyncUpdate | None]:
    """The bank view of a batch and, in sync mode, the update that moves its tenants' rows before routing."""
    if adapter is None or not adapter.syncing:
        return bank.lookup(tenants), None
    # The routers' update rewrites rows in place: the forward routes from the bases, not from folded gates.
    view = bank.lookup(tenants, own=adapter.adapting(tenants), in_place=True)
    return view, adapter.sync_update(view, tenants, lengths)


class ForwardSink(Protocol):
    """Where the engine hands each forward for adaptation: an `Observer` in this process, or a
    `ProcessObserver` that sends it to a process of its own."""

    def submit(
        self, tenants: list[str], lengths: list[int], view: BankView, out: Any, update: SyncUpdate | None = None
    ) -> None: ...

    def close(self) -> None: ...


def observer_of(adapter: Adapter | None, observer: ForwardSink | None, num_experts: int) -> ForwardSink | None:
    """An engine's sink for its forwards: the one given, else an `Observer` of its adapter, if any."""
    if observer is None and adapter is not None:
        return Observer(adapter, num_experts)
    return observer


class ForwardSampler:
    """The capture's `sample_rate`, applied to whole forwards: a forward left out costs the engine nothing
    more, and a decode step (one token of each running sequence) is as fair a sample as any."""

    def __init__(self, rate: float, seed: int | None = None) -> None:
        self.rate = rate
        self._random = random.Random(seed)

    def keep(self) -> bool:
        return self.rate >= 1.0 or self._random.random() < self.rate

    @staticmethod
    def whole(config: CaptureConfig) -> CaptureConfig:
        """`config` for the capture of the forwards kept: they count whole."""
        return replace(config, sample_rate=1.0)


class Observer:
    """Hands forwards' tokens to the adapter from a thread of its own, so that the engine's next forward
    runs while earlier ones are captured.

    The capture's `sample_rate` is applied here, to whole forwards (`ForwardSampler`). Forwards are
    captured in batches: the thread waits until `batch_tokens` tokens are
    waiting, or the first of them has waited `max_delay` seconds, then captures them all, every tenant and
    sequence length in one pass. A pass costs a few dozen small operations whatever its size, so
    batching forwards divides that cost by the number of forwards batched. At most `max_waiting` tokens
    wait; a faster engine waits for capture rather than lose statistics. In sync mode the routers have
    already moved the rows, and the engine thread only reports the tokens."""

    def __init__(
        self,
        adapter: Adapter,
        num_experts: int,
        batch_tokens: int = CAPTURE_BATCH_TOKENS,
        max_delay: float = CAPTURE_MAX_DELAY,
        max_waiting: int = 4096,
        seed: int | None = None,
    ) -> None:
        self.adapter, self.num_experts = adapter, num_experts
        self.batch_tokens, self.max_delay, self.max_waiting = batch_tokens, max_delay, max_waiting
        self._sampler = ForwardSampler(adapter.config.capture.sample_rate, seed)
        self._capture_config = ForwardSampler.whole(adapter.config.capture)
        self._waiting: list[Forward] = []
        self._tokens = 0  # real tokens of the forwards waiting
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
        forward = Forward(tenants, lengths, view.versions, out.router_inputs, out.expert_indices)
        if self.adapter.syncing:
            _synced(self.adapter, forward, self.num_experts, update)
            return
        if not self._sampler.keep():
            return
        tokens = sum(lengths)
        with self._changed:
            self._changed.wait_for(lambda: self._tokens < self.max_waiting or self._closed)
            self._waiting.append(forward)
            self._tokens += tokens
            if len(self._waiting) == 1 or self._tokens - tokens < self.batch_tokens <= self._tokens:
                self._changed.notify_all()  # the first forward starts the delay; a full batch ends it

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
                self._changed.wait_for(lambda: self._tokens >= self.batch_tokens or self._closed, self.max_delay)
                if not self._waiting:
                    return
                forwards = self._waiting
                self._waiting, self._tokens = [], 0
                self._changed.notify_all()
            capture_batch(self.adapter, forwards, self.num_experts, self._capture_config)


@dataclass
class Forward:
    """One forward as the capture sees it: each sequence's tenant, real tokens and basis version, and every
    layer's router inputs and expert choices."""

    tenants: list[str]
    lengths: list[int]
    versions: list[int]
    router_inputs: list[torch.Tensor]  # L x (B, S, D)
    expert_indices: list[torch.Tensor]  # L x (B, S, k)

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


def capture_batch(adapter: Adapter, forwards: list[Forward], num_experts: int, config: CaptureConfig) -> None:
    """Captures waiting forwards in one pass; a failure loses their tokens, never the capture thread."""
    try:
        with torch.inference_mode():
            capture_forward(adapter, merge_forwards(forwards), num_experts, config)
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


def _synced(adapter: Adapter, forward: Forward, num_experts: int, update: SyncUpdate | None) -> None:
    names, groups, versions, real = forward.grouped()
    load = expert_load(forward.expert_indices, real, groups, len(names), num_experts)  # (G, L, E)
    for g, tenant in enumerate(names):
        adapter.synced(update, tenant, versions[g], int(real[groups == g].sum()), load[g])
