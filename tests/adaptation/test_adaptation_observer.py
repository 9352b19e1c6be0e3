"""The capture thread: forwards captured together (merged when they wait) give the statistics each would
give alone, the sample rate keeps or leaves out whole forwards, a tenant's forwards of two versions never
mix, and closing captures what is waiting."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import torch

from star_serve.adaptation import AdaptationConfig, Adapter, CaptureConfig, LocalDirStore, TenantBank, capture
from star_serve.adaptation.forwards import Forward, merge_forwards
from star_serve.adaptation.observer import Observer
from star_serve.model import orthonormalize

L, E, D, K = 2, 4, 16, 2


def _adapter(tmp_path: Path, sample_rate: float = 1.0) -> tuple[Adapter, TenantBank]:
    gen = torch.Generator().manual_seed(0)
    trained = torch.stack([orthonormalize(torch.randn(E, D, generator=gen)) for _ in range(L)])
    bank = TenantBank(trained, torch.device("cpu"), torch.float32)
    capture_config = CaptureConfig(sample_rate=sample_rate, max_token_norm=1e9)
    config = AdaptationConfig(mode="async", min_tokens=1 << 20, capture=capture_config)
    return Adapter("lm", trained, bank, LocalDirStore(tmp_path), config), bank


def _out(batch: int, seq_len: int, seed: int) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        router_inputs=[torch.randn(batch, seq_len, D, generator=gen) for _ in range(L)],
        expert_indices=[torch.randint(0, E, (batch, seq_len, K), generator=gen) for _ in range(L)],
    )


def test_forwards_captured_together_equal_each_captured_alone(tmp_path: Path) -> None:
    adapter, bank = _adapter(tmp_path)
    observer = Observer(adapter, E)
    forwards = [(["a", "b"], [5, 3], _out(2, 5, 0)), (["b", "a"], [1, 1], _out(2, 1, 1)), (["a"], [1], _out(1, 1, 2))]
    for tenants, lengths, out in forwards:
        observer.submit(tenants, lengths, bank.lookup(tenants), out)
    observer.close()

    for tenant in ("a", "b"):
        pieces = [
            [x[i, :n] for x in out.router_inputs]
            for tenants, lengths, out in forwards
            for i, (t, n) in enumerate(zip(tenants, lengths, strict=True))
            if t == tenant
        ]
        want = capture(
            adapter.trained, [torch.cat(layer) for layer in zip(*pieces, strict=True)], 0, adapter.config.capture
        )
        taken = adapter.pending.take(tenant)
        assert taken is not None
        got, load, _ = taken
        assert got.tokens == want.tokens and int(load.sum()) == want.tokens * L * K
        for g, w in zip(got.layers, want.layers, strict=True):
            torch.testing.assert_close(g.s1, w.s1)
            torch.testing.assert_close(g.s2, w.s2)


def test_the_sample_rate_keeps_whole_forwards(tmp_path: Path) -> None:
    adapter, bank = _adapter(tmp_path, sample_rate=0.5)
    observer = Observer(adapter, E, seed=7)
    lengths = list(range(1, 41))  # forward i has i tokens, so the tokens captured tell which forwards were
    for n in lengths:
        observer.submit(["a"], [n], bank.lookup(["a"]), _out(1, n, n))
    observer.close()

    draws = random.Random(7)
    kept = [n for n in lengths if draws.random() < 0.5]
    taken = adapter.pending.take("a")
    assert taken is not None and 0 < len(kept) < len(lengths)
    assert taken[0].tokens == sum(kept) and taken[0].counts.dropped == 0


def test_a_tenants_sequences_of_two_versions_stay_apart() -> None:
    out = _out(1, 1, 0)
    one = Forward(["a"], [1], [0], out.router_inputs, out.expert_indices)
    two = Forward(["a"], [1], [1], out.router_inputs, out.expert_indices)
    merged = merge_forwards([one, two])
    names, groups, versions, _ = merged.grouped()
    assert (names, groups.tolist(), versions) == (["a", "a"], [0, 1], [0, 1])


def test_forwards_of_different_lengths_make_one_pass_of_their_real_tokens() -> None:
    prefill, decode = _out(2, 5, 0), _out(3, 1, 1)
    forwards = [
        Forward(["a", "b"], [5, 2], [0, 0], prefill.router_inputs, prefill.expert_indices),
        Forward(["b", "a", "c"], [1, 1, 1], [0, 0, 3], decode.router_inputs, decode.expert_indices),
    ]
    merged = merge_forwards(forwards)
    assert merged.tenants == ["a"] * 5 + ["b"] * 2 + ["b", "a", "c"]
    assert merged.versions == [0] * 9 + [3] and merged.lengths == [1] * 10
    for layer in range(L):
        want = torch.cat([prefill.router_inputs[layer][0, :5], prefill.router_inputs[layer][1, :2]])
        torch.testing.assert_close(merged.router_inputs[layer][:7, 0], want)
        torch.testing.assert_close(merged.router_inputs[layer][7:, 0], decode.router_inputs[layer][:, 0])
        experts = prefill.expert_indices[layer]
        assert torch.equal(merged.expert_indices[layer][:7, 0], torch.cat([experts[0, :5], experts[1, :2]]))
