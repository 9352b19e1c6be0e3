"""Plain data that crosses the engine's boundary: sampling parameters, streamed outputs, results, errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # 0: score the prompt only (with `prompt_logprobs`), generate nothing
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past the end-of-text token (benchmarks)
    min_tokens: int = 0  # before this many tokens, end-of-text, `stop_token_ids` and `stop` cannot end it
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the sequence, as end-of-text does
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the tokens generated so far
    repetition_penalty: float = 1.0  # CTRL's, as transformers and vLLM: prompt and generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) added to the logits
    logprobs: int | None = None  # per generated token: its log-probability and the `logprobs` most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    @property
    def processes_logits(self) -> bool:
        """Whether anything but temperature and top-p shapes the distribution sampled from."""
        return bool(
            self.min_tokens
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw next-token distribution (before temperature,
    penalties and biases, as vLLM reports them by default), with the most likely tokens of that position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


@dataclass
class GenerationOutput:
    """One streamed event of a generation: new text since the previous event, and, in the last event
    (`finish_reason` set), the totals."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "timeout" | "cancelled" | "error"
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens generated since the last event
    prompt_logprobs: list[TokenLogprob] | None = None  # in the first event, where asked: prompt tokens 2..n
    prompt_tokens: int = 0
    completion_tokens: int = 0
    subspace_version: int = 0  # the tenant's version the sequence routes with, in every event
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
    kv_cache_usage: float = 0.0  # tokens held in the KV cache over its capacity (slots x context)
    expert_load: tuple[torch.Tensor, torch.Tensor] | None = None  # (total, recent), each (L, E), on the host
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found there (their prefill skipped)
    prefix_cache_usage: float = 0.0  # blocks in use over the cache's blocks


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
