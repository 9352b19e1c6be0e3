"""Next-token sampling with per-sequence temperature, nucleus (top-p) and seed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .types import SamplingParams

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy


def make_generator(params: SamplingParams, choice: int = 0) -> torch.Generator | None:
    """A seeded generator for a request with `seed`, distinct per choice of `n`; None without a seed."""
    if params.seed is None:
        return None
    return torch.Generator().manual_seed((params.seed * 1_000_003 + choice) % 2**63)


def sample(
    logits: torch.Tensor,  # (B, V)
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row: argmax for temperature 0, else a draw from the tempered nucleus distribution.

    A temperature too small to divide by safely, or a distribution that is not finite, falls back to the
    argmax: one request's extreme parameters must never fail the batch it shares.
    """
    logits = logits.float().cpu()
    greedy = logits.argmax(dim=-1).tolist()
    tokens: list[int] = []
    for i, (row, p, gen) in enumerate(zip(logits, params, generators, strict=True)):
        if p.temperature < MIN_TEMPERATURE:
            tokens.append(greedy[i])
            continue
        probs = torch.softmax(row / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
            keep[0] = True  # the top token always stays, however small top_p is
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        if not torch.isfinite(probs).all() or float(probs.sum()) <= 0:
            tokens.append(greedy[i])
            continue
        tokens.append(int(torch.multinomial(probs, 1, generator=gen)))
    return tokens
