"""Next-token sampling with per-sequence temperature, nucleus (top-p) and seed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .types import SamplingParams


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
    """One token per row: argmax for temperature 0, else a draw from the tempered nucleus distribution."""
    logits = logits.float().cpu()
    greedy = logits.argmax(dim=-1).tolist()
    tokens: list[int] = []
    for row, p, gen in zip(logits, params, generators, strict=True):
        if p.greedy:
            tokens.append(greedy[len(tokens)])
            continue
        probs = torch.softmax(row / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        tokens.append(int(torch.multinomial(probs, 1, generator=gen)))
    return tokens
