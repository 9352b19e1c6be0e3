"""Plain data that crosses the engine's boundary: sampling parameters, streamed outputs, results, errors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past the end-of-text token (benchmarks)


@dataclass
class GenerationOutput:
    """One streamed event of a generation: new text since the previous event, and, in the last event
    (`finish_reason` set), the totals."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "timeout" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    subspace_version: int = 0
    routing: list[list[int]] | None = None  # per layer: tokens routed to each expert
    queue_seconds: float | None = None  # from submission to the first forward (final event only)
    first_token_seconds: float | None = None  # from submission to the first token (final event only)


@dataclass
class ClassificationResult:
    label: str
    score: float
    scores: dict[str, float]
    subspace_version: int = 0
    routing: list[list[int]] | None = None
    tokens: int = 0


@dataclass(frozen=True)
class StepStats:
    """What one forward did: `phase` is "prefill", "decode" or "classify"."""

    phase: str
    batch_size: int
    tokens: int


@dataclass
class EngineStats:
    """A snapshot of the engine's load, for readiness and metrics."""

    running: int = 0
    waiting: int = 0
    expert_load: tuple[torch.Tensor, torch.Tensor] | None = None  # (total, recent), each (L, E), on the host


class EngineError(Exception):
    """Base of the errors that the engine reports to its callers."""


class EngineOverloaded(EngineError):
    def __init__(self, retry_after: float = 1.0) -> None:
        super().__init__("the server is at capacity; retry later")
        self.retry_after = retry_after


class EngineDraining(EngineError):
    def __init__(self) -> None:
        super().__init__("the server is shutting down and accepts no new requests")


class RequestTooLong(EngineError):
    """The prompt and `max_tokens` together exceed the model's context."""
