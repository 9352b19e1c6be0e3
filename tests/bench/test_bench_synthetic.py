"""`bench synthetic`'s task and the parts of its run that are cheap: the shift is a rotation that moves only
the clusters' directions, V Qᵀ restores a subspace-only router's choices exactly, and the product's
`Adapter` carries a trained basis after a shifted subspace. The full run is a benchmark
(`star-serve bench synthetic`), not a test."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from star_serve.bench.synthetic import SyntheticBenchConfig, SyntheticTask, adapt, run_synthetic_bench, train_classifier
from star_serve.model import projection_distance


def test_the_shift_turns_each_cluster_direction_onto_the_next_and_nothing_else() -> None:
    task = SyntheticTask(0)
    u = task.directions
    torch.testing.assert_close(task.shift(0.0), torch.eye(task.dim), rtol=0, atol=1e-5)
    for t in (0.3, 0.75, 1.0):
        q = task.shift(t)
        torch.testing.assert_close(q @ q.T, torch.eye(task.dim), rtol=0, atol=1e-5)
        assert float(torch.linalg.det(q)) == pytest.approx(1.0, abs=1e-4)
        torch.testing.assert_close(task.content @ q.T, task.content, rtol=0, atol=1e-5)  # the rules' plane stays
    whole = task.shift(1.0)
    for e in range(task.experts - 1):
        torch.testing.assert_close(u[e] @ whole.T, u[e + 1], rtol=0, atol=1e-4)
    torch.testing.assert_close(u[-1] @ whole.T, -u[0], rtol=0, atol=1e-4)
    # On the way, every direction has turned by the same angle, growing with t up to 90°.
    turns = [task.turn(t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert turns[0] == pytest.approx(0.0, abs=0.1) and turns[-1] == pytest.approx(90.0, abs=1e-3)
    assert turns == sorted(turns)
    half = task.shift(0.5)
    cosines = (u @ half.T * u).sum(-1)
    torch.testing.assert_close(cosines, torch.full((task.experts,), math.cos(math.radians(task.turn(0.5)))))


def test_labels_follow_each_cluster_rule_and_clusters_with_opposite_rules_disagree() -> None:
    task = SyntheticTask(1)
    x, label, cluster = task.sample(4096, torch.Generator().manual_seed(0))
    assert set(cluster.tolist()) == set(range(task.experts))
    c = (x @ task.content.T) / task.content_scale  # the content coordinates, up to the noise
    for e in range(task.experts):
        mine = cluster == e
        agree = ((c[mine] @ task.rules[e] > 0).long() == label[mine]).float().mean()
        assert float(agree) > 0.9  # the noise flips labels near the rule's boundary
    torch.testing.assert_close(task.rules[0], -task.rules[task.experts // 2], rtol=0, atol=1e-6)


def test_the_exact_compensation_restores_a_subspace_router_choices() -> None:
    task = SyntheticTask(2)
    model = train_classifier(task, "star_gha_only", steps=50)
    x, _, _ = task.sample(512, torch.Generator().manual_seed(3))
    q = task.shift(0.75)
    basis = model.block.router.basis.detach().float()
    assert torch.equal(model.experts_of(x @ q.T, basis @ q.T), model.experts_of(x, basis))
    assert not torch.equal(model.experts_of(x @ q.T), model.experts_of(x))


def test_a_trained_basis_spans_the_cluster_directions(tmp_path: Path) -> None:
    import asyncio

    task = SyntheticTask(0)
    model = train_classifier(task, "star", steps=1000)
    basis = model.block.router.basis.detach().float()
    assert projection_distance(basis, task.directions) < 0.1
    # A tenant whose traffic is shifted moves its basis after the shifted directions (within the guardrails).
    q = task.shift(0.5)
    traffic, _, _ = task.sample(32768, torch.Generator().manual_seed(4), q)
    adapted = asyncio.run(adapt(model, traffic, tmp_path))
    target = basis @ q.T
    assert float((adapted - target).norm()) < float((basis - target).norm()) / 2


def test_a_small_run_writes_its_report(tmp_path: Path) -> None:
    cfg = SyntheticBenchConfig(
        out_dir=tmp_path, seeds=(0,), shifts=(0.5,), train_steps=30, traffic_samples=1024, eval_samples=256
    )
    results = run_synthetic_bench(cfg, log=lambda _: None)
    assert {r["router"] for r in results["runs"]} == {"star", "star_gha_only", "linear"}
    assert all("adapted" in r for r in results["runs"] if r["router"] != "linear")
    assert [r["router"] for r in results["runs"] if "adapted_unaligned" in r] == ["star"]
    assert "| star | 0.5 (49°) |" in (tmp_path / "synthetic.md").read_text()
    assert (tmp_path / "synthetic.json").exists()
