"""The quality gate: a tenant's candidate version is committed only if, on a held-back sample of the
tenant's own recent prompts, it does better than both its current version and the trained bases, beyond
the sample's noise.

    capture:  a prompt ─► held back? ─ yes ─► its token ids travel with the tenant's next statistics batch
                                     └ no ──► its router inputs count in the statistics
    owner:    plan_step ─► candidate ─► score [candidate, current, trained] on the tenant's sample
                                      ─► commit, or refuse (`refused_quality`)

A held-back prompt never counts in the statistics, so that a step is judged on text it was not fitted to.
Samples are token ids, valid for any basis version; each tenant's are kept apart from every other's, and
bounded (`holdback_tokens` per tenant, `max_tenants` tenants). The first `holdback_tokens` prompt tokens
of a tenant on a replica are all held back, so that its sample exists by its first step; after that a
share `holdback_rate` of its prompts, chosen by digest, keeps the sample recent. A prompt held back is held
back whenever it comes again: a tenant that repeats its prompts would otherwise have the gate judge steps
on text they were fitted to. Comparing on the same tokens makes the comparison paired: what the sample's
texts share cancels between the rows.

A candidate is judged by its paired difference from the better of the two, and committed only when that
difference, plus `confidence` standard errors of it (from the sequences' differences), is at most the
margin (0). Refusing only the candidates that score worse was not enough: of some thirty candidates a tenant
makes, the few that scored a little better on the sample by chance were committed, and together they made
the tenant's loss on fresh text of its domain worse (`bench domains`, in-domain, every seed).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..config import Settings
from ..model import StarMoePreTrainedModel
from ..model.loading import load_model
from ..model.scoring import sequence_scores

log = logging.getLogger(__name__)

MIN_LENGTH = 2  # tokens: a shorter prompt has no next-token loss to score
HELD_DIGESTS = 512  # prompts per tenant remembered as held back (the most recent)


@dataclass(frozen=True)
class QualityConfig:
    enabled: bool = Settings.default("adaptation_quality_gate")
    max_loss_increase: float = Settings.default("adaptation_max_loss_increase")
    confidence: float = Settings.default("adaptation_quality_confidence")  # standard errors of the difference
    holdback_tokens: int = Settings.default("adaptation_holdback_tokens")  # per tenant
    holdback_rate: float = Settings.default("adaptation_holdback_rate")
    rollback_loss_increase: float = Settings.default("adaptation_rollback_loss_increase")
    min_sample_tokens: int = 256  # a smaller sample judges nothing: the step is refused
    max_sequence_tokens: int = 512  # a longer prompt is held back by its first this many tokens
    max_tenants: int = 1024  # tenants with samples at once; the least recently fed are forgotten

    @classmethod
    def from_settings(cls, settings: Settings) -> QualityConfig:
        return cls(
            settings.adaptation_quality_gate,
            settings.adaptation_max_loss_increase,
            settings.adaptation_quality_confidence,
            settings.adaptation_holdback_tokens,
            settings.adaptation_holdback_rate,
            settings.adaptation_rollback_loss_increase,
        )


class TokenSamples:
    """Per tenant, its most recent token-id sequences: `max_tokens` tokens at most (the oldest go first),
    for `max_tenants` tenants at most (the least recently fed go first). Thread-safe."""

    def __init__(self, max_tokens: int, max_tenants: int) -> None:
        self.max_tokens, self.max_tenants = max_tokens, max_tenants
        self._samples: OrderedDict[str, deque[tuple[int, torch.Tensor]]] = OrderedDict()
        self._tokens: dict[str, int] = {}
        self._next_key = 0  # each sequence's key, never reused: what a score of it is cached under
        self._lock = threading.Lock()

    def add(self, tenant: str, sequences: list[torch.Tensor]) -> None:
        if not sequences:
            return
        with self._lock:
            sample = self._samples.setdefault(tenant, deque())
            self._samples.move_to_end(tenant)
            for seq in sequences:
                sample.append((self._next_key, seq))
                self._next_key += 1
                self._tokens[tenant] = self._tokens.get(tenant, 0) + len(seq)
            while self._tokens[tenant] > self.max_tokens and len(sample) > 1:
                self._tokens[tenant] -= len(sample.popleft()[1])
            while len(self._samples) > self.max_tenants:
                gone, _ = self._samples.popitem(last=False)
                del self._tokens[gone]

    def get(self, tenant: str) -> list[torch.Tensor]:
        return [seq for _, seq in self.keyed(tenant)]

    def keyed(self, tenant: str) -> list[tuple[int, torch.Tensor]]:
        """The tenant's sequences, oldest first, each with its key."""
        with self._lock:
            return list(self._samples.get(tenant, ()))

    def take(self, tenant: str) -> list[torch.Tensor]:
        """The tenant's sequences, removed."""
        with self._lock:
            self._tokens.pop(tenant, None)
            return [seq for _, seq in self._samples.pop(tenant, ())]

    def tokens(self, tenant: str) -> int:
        with self._lock:
            return self._tokens.get(tenant, 0)


class HoldBack:
    """The capture side: which prompts are held back, and those waiting to travel with their tenant's next
    statistics batch."""

    def __init__(self, config: QualityConfig) -> None:
        self.config = config
        self.waiting = TokenSamples(config.holdback_tokens, config.max_tenants)
        # Per tenant here (bounded): the tokens held back, and digests of the prompts held back, so that a
        # prompt sent again is held back again and never counts in the statistics it is judged against.
        self._held: OrderedDict[str, tuple[int, OrderedDict[bytes, None]]] = OrderedDict()
        self._lock = threading.Lock()

    def offer(self, tenant: str, ids: torch.Tensor) -> bool:
        """Whether the prompt `ids` (S,) is held back; if it is, and is new here, it waits for the tenant's
        next batch. Past the tenant's first `holdback_tokens`, the prompt's content decides (a share
        `holdback_rate` of all prompts, by digest), so that a prompt sent again, here or to another replica,
        plays the same part each time."""
        if not self.config.enabled or len(ids) < MIN_LENGTH:
            return False
        ids = ids[: self.config.max_sequence_tokens].to("cpu", torch.int32, copy=True)
        digest = hashlib.blake2b(ids.numpy().tobytes(), digest_size=16).digest()
        with self._lock:
            held, digests = self._held.get(tenant, (0, OrderedDict()))
            if digest in digests:
                digests.move_to_end(digest)
                return True
            share = int.from_bytes(digest[:8], "little") / 2**64  # uniform in [0, 1) over prompts
            if held >= self.config.holdback_tokens and share >= self.config.holdback_rate:
                return False
            digests[digest] = None
            while len(digests) > HELD_DIGESTS:
                digests.popitem(last=False)
            self._held[tenant] = (held + len(ids), digests)
            self._held.move_to_end(tenant)
            while len(self._held) > self.config.max_tenants:
                self._held.popitem(last=False)
        self.waiting.add(tenant, [ids])
        return True

    def take(self, tenant: str) -> list[torch.Tensor]:
        """The held-back prompts of `tenant` waiting for a batch, removed."""
        return self.waiting.take(tenant)


# Scores every row of a bank (T, L, E, D) on each sequence: summed scores (T, N) and what they sum over (N,),
# lower is better (`model.scoring.sequence_scores`).
Scorer = Callable[[list[torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Verdict:
    """The gate's judgement of one candidate, on `tokens` held-back tokens of its tenant."""

    accepted: bool
    tokens: int
    candidate: float | None = None  # its score (mean next-token loss, or predictive entropy)
    current: float | None = None
    trained: float | None = None
    standard_error: float | None = None  # of the candidate's difference from the better of the two
    reason: str = ""
    rolled_back: bool = False  # the tenant was rolled back to the trained bases on this verdict

    @property
    def served(self) -> float | None:
        """The score of the bases the tenant has after this verdict (before any rollback)."""
        return self.candidate if self.accepted else self.current

    def degraded(self, margin: float) -> bool:
        """Whether the committed version scored worse than the trained bases by more than `margin`."""
        return self.current is not None and self.trained is not None and self.current - self.trained > margin

    def as_dict(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "held_back_tokens": self.tokens,
            "candidate": self.candidate,
            "current": self.current,
            "trained": self.trained,
            "standard_error": self.standard_error,
            "reason": self.reason,
            "rolled_back": self.rolled_back,
        }


class QualityGate:
    """The owner side: each tenant's held-back sample, and the judgement of its candidates on it."""

    def __init__(self, scorer: Scorer, config: QualityConfig) -> None:
        self.scorer, self.config = scorer, config
        self.samples = TokenSamples(config.holdback_tokens, config.max_tenants)
        # Per tenant, the per-sequence scores of the bases it was last judged with (by a digest of the bases,
        # then by sequence key), and what each sequence's score sums over: a tenant's current and trained
        # bases rarely change between its steps, so only its newly held-back sequences need them, and only
        # the candidate is scored on the whole sample.
        self._scores: OrderedDict[str, tuple[dict[int, float], dict[bytes, dict[int, float]]]] = OrderedDict()
        self._lock = threading.Lock()

    def receive(self, tenant: str, sequences: list[torch.Tensor]) -> None:
        """Adds held-back prompts of `tenant` (from any replica) to its sample."""
        self.samples.add(tenant, sequences)

    def judge(
        self,
        tenant: str,
        candidate: torch.Tensor,  # (L, E, D)
        current: torch.Tensor,  # (L, E, D): the committed version's
        trained: torch.Tensor,  # (L, E, D)
    ) -> Verdict:
        """Accepts `candidate` when its score on the tenant's sample, less that of the better of the current and
        the trained bases, plus `confidence` standard errors of that difference, is at most `max_loss_increase`.
        Blocking: run it off the event loop."""
        sample = self.samples.keyed(tenant)
        tokens = sum(len(s) for _, s in sample)
        if tokens < self.config.min_sample_tokens:
            reason = f"{tokens} held-back tokens, fewer than the {self.config.min_sample_tokens} that judge a step"
            return Verdict(False, tokens, reason=reason)
        totals, counts = self._score(tenant, sample, [candidate, current, trained])
        covered = max(counts.sum().item(), 1.0)
        score, now, before = (row.sum().item() / covered for row in totals)
        error = paired_standard_error(totals[0], totals[1 if now <= before else 2], counts)
        bound = score - min(now, before) + self.config.confidence * error
        accepted = bound <= self.config.max_loss_increase
        reason = "" if accepted else f"held-back score {score:.4f} against {min(now, before):.4f} (± {error:.4f})"
        return Verdict(accepted, tokens, score, now, before, error, reason)

    def _score(
        self, tenant: str, sample: list[tuple[int, torch.Tensor]], bases: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each of `bases`' per-sequence scores on `sample` (summed over what each sequence's score covers), and
        what they cover, scoring only what is not cached: bases whose sequences miss the same scores go through
        the model together, one batched pass per such group."""
        digests = [_digest(b) for b in bases]
        with self._lock:
            counts, cached = self._scores.pop(tenant, ({}, {}))
        keys = [k for k, _ in sample]
        unique = dict(zip(digests, bases, strict=True))
        groups: dict[tuple[int, ...], list[bytes]] = {}
        for digest in unique:
            mine = cached.get(digest, {})
            groups.setdefault(tuple(k for k in keys if k not in mine), []).append(digest)
        by_key = dict(sample)
        for missing, members in groups.items():
            if not missing:
                continue
            totals, sums_over = self.scorer(
                [by_key[k].long() for k in missing], torch.stack([unique[d] for d in members])
            )
            counts.update(zip(missing, sums_over.tolist(), strict=True))
            for row, digest in enumerate(members):
                cached.setdefault(digest, {}).update(zip(missing, totals[row].tolist(), strict=True))
        # The bases of this judgement stay cached (the candidate may be the next current), none else.
        fresh = {d: {k: cached[d][k] for k in keys} for d in unique}
        counts = {k: counts[k] for k in keys}
        with self._lock:
            self._scores[tenant] = (counts, fresh)
            while len(self._scores) > self.config.max_tenants:
                self._scores.popitem(last=False)
        sums_over = torch.tensor([counts[k] for k in keys], dtype=torch.float64)
        return [torch.tensor([fresh[d][k] for k in keys], dtype=torch.float64) for d in digests], sums_over


def paired_standard_error(totals: torch.Tensor, others: torch.Tensor, counts: torch.Tensor) -> float:
    """The standard error of the per-token difference between two rows scored on the same sequences:
    (Σ totals − Σ others) / Σ counts, a ratio of sums over sequences (its linearised variance); 0 for fewer
    than two sequences, where the sample says nothing of its own noise."""
    n, covered = len(counts), max(counts.sum().item(), 1.0)
    if n < 2:
        return 0.0
    differences = totals - others
    residuals = differences - differences.sum() / covered * counts
    return float((residuals.square().sum() * n / (n - 1)).sqrt() / covered)


def _digest(bases: torch.Tensor) -> bytes:
    """A digest of a basis stack's values: equal bases share their cached scores."""
    return hashlib.blake2b(bases.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()


@dataclass(frozen=True)
class GateModel:
    """Where a process of its own loads the model that scores candidates: a checkpoint directory and its task
    ("generate" or "classify"), on the CPU in float32."""

    directory: Path
    task: Literal["generate", "classify"]
    align_linear: bool = True  # as the served model's gates are (`StarMoeRouter.align_linear`)

    def load(self) -> StarMoePreTrainedModel:
        model, _ = load_model(self.directory, self.task, torch.device("cpu"), torch.float32)
        model.align_linear_gates(self.align_linear)
        return model


def model_scorer(model: StarMoePreTrainedModel) -> Scorer:
    """Scores with `model` itself; on a GPU on a stream of its own, beside the engine's."""
    device = next(model.parameters()).device
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def score(sequences: list[torch.Tensor], bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if stream is None:
            return sequence_scores(model, sequences, bank)
        with torch.cuda.stream(stream):
            return sequence_scores(model, sequences, bank)

    return score
