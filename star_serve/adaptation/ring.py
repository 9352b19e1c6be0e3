"""Forwards from the serving process to its adaptation process: router inputs in shared memory, each
forward named on a pipe. The engine's side never waits: a forward that finds the ring full, or no
adaptation process, is dropped and counted."""

from __future__ import annotations

import contextlib
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from .bank import RoutingPlan
from .forwards import Forward, per_token
from .messages import RingForward
from .observer import ForwardSampler

RING_TOKENS = 8192  # router inputs of this many tokens can wait for the adaptation process
PIPE_BYTES = 32768  # forwards' messages waiting at most: half a pipe's buffer, so that a send never blocks


@dataclass(frozen=True)
class SharedRing:
    """Shared between the two processes: the router inputs (L, C, D), experts (L, C, k) and ids (C,) of
    waiting tokens, and how far the adaptation process has read: [tokens, message bytes], written by it
    alone."""

    inputs: torch.Tensor
    experts: torch.Tensor
    ids: torch.Tensor
    read: torch.Tensor

    @classmethod
    def create(cls, layers: int, dim: int, top_k: int, tokens: int = RING_TOKENS) -> SharedRing:
        return cls(
            torch.zeros(layers, tokens, dim).share_memory_(),
            torch.zeros(layers, tokens, top_k, dtype=torch.long).share_memory_(),
            torch.zeros(tokens, dtype=torch.long).share_memory_(),
            torch.zeros(2, dtype=torch.long).share_memory_(),
        )

    def take(
        self, message: RingForward, message_bytes: int, hold: Callable[[str, torch.Tensor], bool] | None = None
    ) -> Forward:
        """A forward's real tokens out of the ring, each as a one-token sequence of its sequence's tenant (as
        the in-process observer merges forwards of different lengths), less the prompts that `hold` holds
        back; its place in the ring is then free. The adaptation process's side."""
        start, n = message.start, message.n
        inputs = self.inputs[:, start : start + n].clone()  # (L, n, D)
        experts = self.experts[:, start : start + n].clone()  # (L, n, k)
        ids = self.ids[start : start + n].clone()  # (n,)
        self.read[0] = message.end
        self.read[1] += message_bytes
        lengths = message.lengths
        if hold is not None and message.ids and max(lengths) > 1:
            sequences = ids.split(lengths)
            lengths = [0 if hold(t, seq) else len(seq) for t, seq in zip(message.tenants, sequences, strict=True)]
            keep = torch.repeat_interleave(torch.tensor(lengths) > 0, torch.tensor(message.lengths))  # (n,)
            inputs, experts = inputs[:, keep], experts[:, keep]
        return per_token(message.tenants, lengths, message.versions, list(inputs), list(experts))


class ProcessObserver:
    """The engine's `ForwardSink` with adaptation in a process of its own: copies each sampled forward's real
    tokens into the ring and names them in the pipe."""

    def __init__(self, sample_rate: float, seed: int | None = None) -> None:
        self._sampler = ForwardSampler(sample_rate, seed)
        self._lock = threading.Lock()  # an attach (a restarted process) against the engine's submits
        self._ring: SharedRing | None = None
        self._pipe: Connection | None = None
        self._written = 0  # tokens written, counting the ring's end skipped when a forward does not fit
        self._sent = 0  # bytes of messages sent
        self.dropped_tokens = 0

    def attach(self, ring: SharedRing, pipe: Connection) -> None:
        """Sends forwards to a (new) adaptation process from now on."""
        with self._lock:
            if self._pipe is not None:
                self._pipe.close()
            self._ring, self._pipe, self._written, self._sent = ring, pipe, 0, 0

    def submit(
        self, tenants: list[str], lengths: list[int], plan: RoutingPlan, out: Any, ids: torch.Tensor | None = None
    ) -> None:
        if plan.routing.bank is None or not self._sampler.keep():
            return
        with self._lock:
            self._send(Forward(tenants, lengths, plan.versions, out.router_inputs, out.expert_indices, ids))

    def _send(self, forward: Forward) -> None:
        n = sum(forward.lengths)
        if self._ring is None or self._pipe is None or self._pipe.closed:
            self.dropped_tokens += n
            return
        capacity = self._ring.inputs.shape[1]
        at = self._written % capacity
        skip = capacity - at if at + n > capacity else 0  # a forward is contiguous in the ring
        start, end = (at + skip) % capacity, self._written + skip + n
        has_ids = forward.token_ids is not None
        message = pickle.dumps(RingForward(start, n, end, forward.tenants, forward.lengths, forward.versions, has_ids))
        read_tokens, read_bytes = self._ring.read.tolist()
        if end - read_tokens > capacity or self._sent + len(message) - read_bytes > PIPE_BYTES:
            self.dropped_tokens += n
            return
        inputs, experts = torch.stack(forward.router_inputs), torch.stack(forward.expert_indices)  # (L, B, S, ...)
        ids = forward.token_ids
        if inputs.shape[2] == 1:
            real_inputs, real_experts = inputs[:, :, 0], experts[:, :, 0]
            real_ids = None if ids is None else ids[:, 0]
        else:
            real = forward.real()  # (B, S)
            real_inputs, real_experts = inputs[:, real.to(inputs.device)], experts[:, real.to(experts.device)]
            real_ids = None if ids is None else ids[real.to(ids.device)]
        self._ring.inputs[:, start : start + n] = real_inputs
        self._ring.experts[:, start : start + n] = real_experts
        if real_ids is not None:
            self._ring.ids[start : start + n] = real_ids
        try:
            self._pipe.send_bytes(message)
        except OSError:  # the adaptation process is gone; serving goes on
            self._pipe.close()
            self.dropped_tokens += n
            return
        self._written, self._sent = end, self._sent + len(message)

    def close(self) -> None:
        """Tells the adaptation process that no more forwards come; it captures what is waiting."""
        with self._lock:
            if self._pipe is not None and not self._pipe.closed:
                with contextlib.suppress(OSError):  # the adaptation process may be gone
                    self._pipe.send(None)
                self._pipe.close()
