"""The machine's own roofline, measured in the run whose figures it judges, so that a tokens/s figure means
something on another machine: dense matmul FLOP/s and memory bandwidth on the run's device, in its dtype.

A decode step of a STAR MoE at batch B reads every weight it uses once (the experts that at least one of the
B tokens routes to, expected from uniform routing) and the batch's keys and values, and does two FLOPs per
weight and token plus attention. Its roofline time is the larger of FLOPs over the matmul rate and bytes over
the bandwidth; a configuration's share of the roofline is that time over the step time it achieved.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model import StarMoeConfig


@dataclass(frozen=True)
class Roofline:
    matmul_flops: float  # FLOP/s of a large dense matmul
    bandwidth: float  # bytes/s read from a tensor larger than any cache

    def as_dict(self) -> dict[str, float]:
        return {"matmul_gflops": self.matmul_flops / 1e9, "bandwidth_gb_s": self.bandwidth / 1e9}


def _timed(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The median seconds of `repeats` calls of `run`, after one warm-up call."""
    seconds = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure_roofline(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> Roofline:
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    flops = 2 * n**3 / _timed(lambda: torch.mm(a, b), device, repeats)
    size = 1 << 30 if device.type == "cuda" else 1 << 27  # bytes: beyond any cache
    weights = torch.ones(size // a.element_size(), device=device, dtype=dtype)
    # A decode step reads its weights and writes little: the rate of a sum over a large tensor, read once.
    bandwidth = size / _timed(lambda: weights.sum(), device, repeats)
    return Roofline(flops, bandwidth)


def decode_step(config: StarMoeConfig, batch: int, context: int, dtype_bytes: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one decode step of `batch` sequences of `context` tokens each."""
    h, layers, experts = config.hidden_size, config.num_hidden_layers, config.num_local_experts
    kv = config.num_key_value_heads * config.head_dim
    attention = 2 * h * h + 2 * h * kv
    expert = 3 * h * config.intermediate_size  # SwiGLU: gate, up, down
    router = 2 * experts * h  # the linear gate and the folded subspace gate
    head = config.vocab_size * h
    per_token = layers * (attention + config.num_experts_per_tok * expert + router) + head
    flops = batch * (2 * per_token + layers * 4 * context * h)  # attention: scores and the weighted sum
    touched = experts * (1 - (1 - 1 / experts) ** (batch * config.num_experts_per_tok))
    weights = layers * (attention + touched * expert + router) + head
    kv_cache = batch * layers * 2 * context * kv
    return flops, (weights + kv_cache) * dtype_bytes


def roofline_share(
    roofline: Roofline, config: StarMoeConfig, batch: int, context: int, dtype_bytes: int, tokens_per_s: float
) -> float:
    """The roofline's time of a decode step at `batch` over the time a step took at `tokens_per_s`."""
    flops, moved = decode_step(config, batch, context, dtype_bytes)
    bound = max(flops / roofline.matmul_flops, moved / roofline.bandwidth)
    return bound * tokens_per_s / batch
