"""Pending statistics: a forward's tenants added at once, taken back exactly, slots bounded and reused."""

from __future__ import annotations

import torch

from star_serve.adaptation.capture import CaptureConfig, capture_groups
from star_serve.adaptation.pending import PendingStatistics
from star_serve.model import orthonormalize

L, E, D = 2, 4, 16


def _forward(tenants: int, versions: list[int], seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    bases = torch.stack([orthonormalize(torch.randn(E, D, generator=gen)) for _ in range(L)])[None]
    inputs = [torch.randn(tenants, 5, D, generator=gen) for _ in range(L)]
    real = torch.ones(tenants, 5, dtype=torch.bool)
    groups = torch.arange(tenants)
    stats = capture_groups(
        bases, torch.zeros(tenants, dtype=torch.long), inputs, real, groups, versions, CaptureConfig()
    )
    load = torch.randint(0, 5, (tenants, L, E))
    return stats, load


def test_what_is_taken_is_the_sum_of_what_was_added_and_the_slot_starts_again_from_zero() -> None:
    pending = PendingStatistics(capacity=4)
    first, load1 = _forward(2, [3, 7], seed=0)
    second, load2 = _forward(2, [3, 7], seed=1)
    pending.add(["a", "b"], [0, 1], first, load1, now=10.0)
    pending.add(["b", "a"], [1, 0], second, load2, now=11.0)
    assert pending.tokens("a") == 10 and pending.version("b") == 7

    taken = pending.take("a")
    assert taken is not None
    stats, load, first_seen = taken
    want = first.group(0) + second.group(0)
    assert stats.version == 3 and stats.tokens == 10 and first_seen == 10.0
    for got, expected in zip(stats.layers, want.layers, strict=True):
        torch.testing.assert_close(got.s1, expected.s1)
        torch.testing.assert_close(got.s2, expected.s2)
    torch.testing.assert_close(load, (load1[0] + load2[0]).float())
    assert "a" not in pending and pending.take("a") is None

    pending.add(["c"], [0], first, load1, now=12.0)  # reuses a's slot, from zero
    again = pending.take("c")
    assert again is not None
    torch.testing.assert_close(again[0].layers[1].s1, first.group(0).layers[1].s1)


def test_slots_are_bounded_and_what_does_not_fit_is_counted() -> None:
    pending = PendingStatistics(capacity=2)
    stats, load = _forward(3, [0, 0, 0], seed=0)
    pending.add(["a", "b", "c"], [0, 1, 2], stats, load, now=0.0)
    assert pending.tenants() == ["a", "b"] and pending.dropped_tokens == 5
    taken = pending.take("a")
    assert taken is not None
    assert pending.put_back("a", taken[0], taken[1], taken[2]) and pending.tokens("a") == 5
    assert not pending.put_back("c", taken[0], taken[1], taken[2])  # no slot left


def test_statistics_of_another_version_are_not_put_back() -> None:
    pending = PendingStatistics(capacity=2)
    old, load = _forward(1, [1], seed=0)
    new, _ = _forward(1, [2], seed=1)
    pending.add(["a"], [0], new, load, now=0.0)
    assert not pending.put_back("a", old.group(0), load[0], 0.0)
    assert pending.version("a") == 2 and pending.tokens("a") == 5
