"""Where the engine hands each forward for adaptation (a `ForwardSink`), and how a batch routes in sync
mode. In this process, an `Observer` captures forwards on a thread of its own; with adaptation in a process
of its own, a `ProcessObserver` (`ring.py`) sends them there. Both sample whole forwards and batch them by
one `CapturePolicy`."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from .bank import RoutingPlan, TenantBank
from .capture import CaptureConfig
from .forwards import Forward, capture_batch, synced
from .sync import SyncUpdate
from .worker import Adapter


class ForwardSink(Protocol):
    """Where the engine hands each forward, after it ran: its sequences' tenants and real tokens, the plan it
    routed with, the model's output (router inputs and expert choices) and the token ids (B, S), from which
    prompts are held back for the quality gate."""

    def submit(
        self, tenants: list[str], lengths: list[int], plan: RoutingPlan, out: Any, ids: torch.Tensor | None = None
    ) -> None: ...

    def close(self) -> None: ...


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


@dataclass(frozen=True)
class CapturePolicy:
    """When waiting forwards are captured, in one pass: once `batch_tokens` tokens wait, or the first of them
    has waited `max_delay` seconds. A pass costs a few dozen small operations whatever its size, so batching
    forwards divides that cost by the number of forwards batched."""

    batch_tokens: int = 1024
    max_delay: float = 0.5

    def due(self, tokens: int, first: float, now: float | None = None) -> bool:
        """Whether `tokens` waiting since `first` (monotonic seconds) make a pass now."""
        return tokens >= self.batch_tokens or (now or time.monotonic()) - first >= self.max_delay

    def wait(self, first: float) -> float:
        """Seconds until forwards waiting since `first` are due by their delay."""
        return max(0.0, first + self.max_delay - time.monotonic())


class Observer:
    """Hands forwards' tokens to the adapter from a thread of its own, so that the engine's next forward
    runs while earlier ones are captured. At most `max_waiting` tokens wait; a faster engine waits for
    capture rather than lose statistics."""

    def __init__(
        self,
        adapter: Adapter,
        num_experts: int,
        policy: CapturePolicy = CapturePolicy(),
        max_waiting: int = 4096,
        seed: int | None = None,
    ) -> None:
        self.adapter, self.num_experts, self.policy, self.max_waiting = adapter, num_experts, policy, max_waiting
        self._sampler = ForwardSampler(adapter.config.capture.sample_rate, seed)
        self._capture_config = ForwardSampler.whole(adapter.config.capture)
        self._waiting: list[Forward] = []
        self._tokens = 0  # real tokens of the forwards waiting
        self._first = 0.0  # when the first of them arrived
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def submit(
        self, tenants: list[str], lengths: list[int], plan: RoutingPlan, out: Any, ids: torch.Tensor | None = None
    ) -> None:
        if plan.routing.bank is None or not self._sampler.keep():
            return
        forward = Forward(tenants, lengths, plan.versions, out.router_inputs, out.expert_indices, ids)
        tokens = sum(lengths)
        with self._changed:
            self._changed.wait_for(lambda: self._tokens < self.max_waiting or self._closed)
            if not self._waiting:
                self._first = time.monotonic()
            self._waiting.append(forward)
            self._tokens += tokens
            if len(self._waiting) == 1 or self._tokens - tokens < self.policy.batch_tokens <= self._tokens:
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
                self._changed.wait_for(
                    lambda: self._closed or self.policy.due(self._tokens, self._first), self.policy.wait(self._first)
                )
                if not self._waiting:
                    return
                forwards = self._waiting
                self._waiting, self._tokens = [], 0
                self._changed.notify_all()
            capture_batch(self.adapter, forwards, self.num_experts, self._capture_config)


class SyncObserver:
    """Sync mode: the routers have already moved the rows during the forward; the engine thread only reports
    each tenant's tokens and expert load, so that the worker commits a copy of the row in time."""

    def __init__(self, adapter: Adapter, num_experts: int) -> None:
        self.adapter, self.num_experts = adapter, num_experts

    def submit(
        self, tenants: list[str], lengths: list[int], plan: RoutingPlan, out: Any, ids: torch.Tensor | None = None
    ) -> None:
        if plan.routing.bank is None:
            return
        forward = Forward(tenants, lengths, plan.versions, out.router_inputs, out.expert_indices)
        update = plan.routing.update
        synced(self.adapter, forward, self.num_experts, update if isinstance(update, SyncUpdate) else None)

    def close(self) -> None:
        pass


class SyncRouting:
    """Sync mode's `BatchRouter`: each adapting tenant of the batch gets a row of its own, which the routers'
    update rewrites in place before each layer routes; the forward routes from the bases."""

    def __init__(self, bank: TenantBank, adapter: Adapter) -> None:
        self.bank, self.adapter = bank, adapter

    def plan(self, tenants: Sequence[str], lengths: Sequence[int]) -> RoutingPlan:
        names = list(tenants)
        plan = self.bank.lookup(names, own=self.adapter.adapting(names), in_place=True)
        update = self.adapter.sync_update(plan, names, list(lengths))
        return replace(plan, routing=replace(plan.routing, update=update))
