"""The quality gate: scoring every bank row in one batched forward gives each row's own teacher-forced loss;
a candidate is committed only when it scores better than the current and trained bases on its tenant's
held-back prompts, beyond the sample's noise; held-back prompts never count in the statistics and travel
with the tenant's batch."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from star_serve.adaptation import AdaptationConfig, Adapter, CaptureConfig, Guardrails, LocalDirStore, TenantBank
from star_serve.adaptation.bus import StatisticsBatch
from star_serve.adaptation.capture import capture
from star_serve.adaptation.forwards import Forward, capture_forward, held_back
from star_serve.adaptation.messages import RingForward
from star_serve.adaptation.quality import (
    GateModel,
    HoldBack,
    QualityConfig,
    QualityGate,
    model_scorer,
    paired_standard_error,
)
from star_serve.adaptation.ring import SharedRing
from star_serve.adaptation.store import Snapshot
from star_serve.model import (
    Routing,
    StarMoeForCausalLM,
    StarMoeForSequenceClassification,
    orthonormalize,
)
from star_serve.model.scoring import score_sequences
from star_serve.training.tokenizer import train_tokenizer

CPU = torch.device("cpu")
GUARD = Guardrails(max_step=10.0, max_distance=1.0, orthogonality_tolerance=10.0, min_entropy_ratio=0.0)
VOCAB = 101


@pytest.fixture
def lm(make_model: Callable[..., StarMoeForCausalLM]) -> StarMoeForCausalLM:
    return make_model()


def _sequences(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(2, 40, (1,), generator=gen)),), generator=gen) for _ in range(n)]


def _moved(trained: torch.Tensor, seed: int) -> torch.Tensor:
    """Other orthonormal bases of the same shape."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([orthonormalize(layer + 0.5 * torch.randn(layer.shape, generator=gen)) for layer in trained])


def test_every_row_scores_its_own_teacher_forced_loss(lm: StarMoeForCausalLM) -> None:
    model = lm
    trained = model.trained_bases()
    bank = torch.stack([trained, _moved(trained, 2), _moved(trained, 3)])
    sequences = _sequences(12)
    scores = score_sequences(model, sequences, bank)

    for row, score in enumerate(scores):
        total, count = 0.0, 0
        for seq in sequences:  # one at a time: no padding, no other rows in the batch
            with torch.inference_mode():
                logits = model(input_ids=seq[None], routing=Routing(bank[row : row + 1])).logits
            total += float(F.cross_entropy(logits[0, :-1], seq[1:], reduction="sum"))
            count += len(seq) - 1
        assert score == pytest.approx(total / count, abs=1e-4)
    assert len(set(round(s, 6) for s in scores)) == 3  # the rows route differently, so they score differently


def test_a_classifier_scores_its_mean_predictive_entropy(
    make_model: Callable[..., StarMoeForSequenceClassification],
) -> None:
    model = make_model(StarMoeForSequenceClassification, num_labels=3)
    trained = model.trained_bases()
    sequences = _sequences(6)
    (score,) = score_sequences(model, sequences, trained[None])
    entropies = []
    for seq in sequences:
        with torch.inference_mode():
            probs = model(input_ids=seq[None], routing=Routing.shared(trained)).logits.float().softmax(-1)
        entropies.append(float(-(probs * probs.log()).sum()))
    assert score == pytest.approx(sum(entropies) / len(entropies), abs=1e-4)
    assert 0.0 < score <= math.log(3) + 1e-6


def _gate(model: StarMoeForCausalLM, **overrides: float) -> QualityGate:
    gate = QualityGate(model_scorer(model), QualityConfig(**overrides))  # type: ignore[arg-type]
    gate.receive("acme", _sequences(40))
    return gate


def test_the_gate_scores_only_what_it_has_not_scored_and_agrees_with_scoring_everything(
    lm: StarMoeForCausalLM,
) -> None:
    trained = lm.trained_bases()
    gate = _gate(lm)
    calls: list[tuple[int, int]] = []  # (rows, sequences) of each pass through the model
    scorer = gate.scorer

    def counted(sequences: list[torch.Tensor], bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((bank.shape[0], len(sequences)))
        return scorer(sequences, bank)

    gate.scorer = counted
    first, second = _moved(trained, 2), _moved(trained, 3)
    verdict = gate.judge("acme", first, trained, trained)
    n = len(gate.samples.get("acme"))
    assert calls == [(2, n)]  # the current bases are the trained ones: two distinct rows
    calls.clear()
    again = gate.judge("acme", second, trained, trained)
    assert calls == [(1, n)]  # only the new candidate; the trained bases' scores were cached
    expected = score_sequences(lm, gate.samples.get("acme"), torch.stack([second, trained]))
    assert again.candidate == pytest.approx(expected[0], abs=1e-5)
    assert again.trained == pytest.approx(expected[1], abs=1e-5) and verdict.trained == again.trained
    calls.clear()
    gate.receive("acme", [torch.arange(40) % 50])
    gate.judge("acme", second, trained, trained)
    assert calls == [(2, 1)]  # both rows cached: only the new sequence is scored


def test_the_gate_refuses_a_worse_candidate_and_accepts_a_better_one(lm: StarMoeForCausalLM) -> None:
    model = lm
    trained = model.trained_bases()
    a, b = _moved(trained, 2), _moved(trained, 3)
    gate = _gate(model)
    scores = score_sequences(model, gate.samples.get("acme"), torch.stack([a, b, trained]))
    worse, better = (a, b) if scores[0] > scores[1] else (b, a)
    best_known = min(scores[:2])

    refused = gate.judge("acme", worse, better, trained)
    assert not refused.accepted and refused.tokens >= 256 and "held-back score" in refused.reason
    assert refused.candidate == pytest.approx(max(scores[:2]), abs=1e-5)

    # Better than both on the sample, by less than its noise: committed only where the noise is not asked about.
    judged = gate.judge("acme", better, worse, trained)
    assert judged.candidate is not None and judged.trained is not None and judged.standard_error is not None
    assert judged.candidate == pytest.approx(best_known, abs=1e-5)
    difference = judged.candidate - min(judged.trained, max(scores[:2]))
    assert difference < 0 < judged.standard_error
    assert judged.accepted == (difference + QualityConfig().confidence * judged.standard_error <= 0)
    assert not judged.accepted and "±" in judged.reason
    assert _gate(model, confidence=0.0).judge("acme", better, worse, trained).accepted

    lenient = _gate(model, max_loss_increase=10.0)
    assert lenient.judge("acme", worse, better, trained).accepted  # within the margin


def test_the_paired_standard_error_is_that_of_the_mean_per_token_difference() -> None:
    gen = torch.Generator().manual_seed(0)
    others = 40 * torch.rand(50, generator=gen, dtype=torch.float64)
    per_token = torch.randn(50, generator=gen, dtype=torch.float64)
    counts = torch.full((50,), 8.0, dtype=torch.float64)
    # Sequences of one length: the textbook standard error of the mean of their per-token differences.
    expected = per_token.std().item() / math.sqrt(50)
    assert paired_standard_error(others + per_token * counts, others, counts) == pytest.approx(expected, rel=1e-9)
    lengths = torch.randint(2, 40, (50,), generator=gen).double()
    assert paired_standard_error(others + 0.3 * lengths, others, lengths) == pytest.approx(0.0, abs=1e-12)
    assert paired_standard_error(others[:1] + 1.0, others[:1], lengths[:1]) == 0.0  # one sequence: no estimate


def test_samples_are_per_tenant_and_too_few_tokens_judge_nothing(lm: StarMoeForCausalLM) -> None:
    model = lm
    trained = model.trained_bases()
    gate = _gate(model, max_loss_increase=10.0)
    assert gate.judge("acme", _moved(trained, 2), trained, trained).accepted
    other = gate.judge("globex", _moved(trained, 2), trained, trained)  # acme's prompts never judge globex
    assert not other.accepted and other.tokens == 0 and "fewer than the 256" in other.reason
    gate.receive("globex", [torch.arange(1, 11)])
    assert gate.judge("globex", _moved(trained, 2), trained, trained).tokens == 10


def test_the_sample_is_bounded_and_keeps_the_most_recent_prompts() -> None:
    gate = QualityGate(lambda s, b: [0.0] * len(b), QualityConfig(holdback_tokens=100, max_tenants=2))
    for i in range(30):
        gate.receive("acme", [torch.full((10,), i + 1)])
    kept = gate.samples.get("acme")
    assert gate.samples.tokens("acme") == 100 and [int(s[0]) for s in kept] == list(range(21, 31))
    gate.receive("b", [torch.ones(3)])
    gate.receive("c", [torch.ones(3)])  # a third tenant: the least recently fed is forgotten
    assert gate.samples.get("acme") == [] and gate.samples.tokens("c") == 3


def test_holding_back_fills_the_sample_first_then_samples_at_the_rate() -> None:
    hold = HoldBack(QualityConfig(holdback_tokens=50, holdback_rate=0.0))
    offered = [hold.offer("acme", torch.arange(i, i + 10)) for i in range(8)]
    assert offered == [True] * 5 + [False] * 3  # 50 tokens, then a rate of 0
    assert not hold.offer("acme", torch.tensor([5]))  # one token has no next-token loss
    assert hold.offer("globex", torch.arange(1, 11))  # each tenant has its own
    assert sum(len(s) for s in hold.take("acme")) == 50 and hold.take("acme") == []

    always = HoldBack(QualityConfig(holdback_tokens=10, holdback_rate=1.0))
    assert all(always.offer("acme", torch.arange(i, i + 10)) for i in range(5))
    off = HoldBack(QualityConfig(enabled=False))
    assert not off.offer("acme", torch.arange(1, 11))


def test_a_prompt_held_back_is_held_back_whenever_it_comes_again_and_sampled_once() -> None:
    hold = HoldBack(QualityConfig(holdback_tokens=20, holdback_rate=0.0))
    first, second, third = torch.arange(1, 11), torch.arange(2, 12), torch.arange(3, 13)
    assert hold.offer("acme", first) and hold.offer("acme", second)  # the tenant's first 20 tokens
    assert not hold.offer("acme", third)  # then a rate of 0
    # Sent again after the sample filled, the held-back prompts are held back again (they must never count in
    # the statistics they judge), the others are not; the sample holds each once.
    assert [hold.offer("acme", p) for p in (first, third, second, first)] == [True, False, True, True]
    assert [s.tolist() for s in hold.take("acme")] == [first.tolist(), second.tolist()]
    assert not hold.offer("globex", third[:1]) and hold.offer("globex", first)  # per tenant


def test_past_the_first_prompts_their_content_decides_the_same_on_every_replica() -> None:
    config = QualityConfig(holdback_tokens=0, holdback_rate=0.25)
    prompts = [torch.arange(i, i + 8) for i in range(400)]
    replicas = [HoldBack(config), HoldBack(config)]
    decisions = [[r.offer("acme", p) for p in prompts] for r in replicas]
    assert decisions[0] == decisions[1]
    assert 60 < sum(decisions[0]) < 140  # about a quarter of 400
    assert [replicas[0].offer("acme", p) for p in prompts] == decisions[0]  # and the same when sent again


def test_a_batch_carries_its_held_back_prompts_across_serialization(lm: StarMoeForCausalLM) -> None:
    trained = lm.trained_bases()
    stats = capture(trained, [torch.randn(8, trained.shape[-1]) for _ in trained], 0, CaptureConfig(max_token_norm=1e9))
    held = [torch.arange(1, 6, dtype=torch.int32), torch.arange(7, 10, dtype=torch.int32)]
    batch = StatisticsBatch("acme", stats, torch.ones(trained.shape[:2]), first_seen=time.time(), held=held)
    back = StatisticsBatch.from_bytes(batch.to_bytes())
    assert [s.tolist() for s in back.held] == [s.tolist() for s in held]
    assert len(back.stats.layers) == len(stats.layers) and back.stats.tokens == stats.tokens
    plain = StatisticsBatch("acme", stats, torch.ones(trained.shape[:2]), first_seen=time.time())
    assert StatisticsBatch.from_bytes(plain.to_bytes()).held == []


def _adapter(tmp_path: Path, model: StarMoeForCausalLM, **quality: float) -> Adapter:
    trained = model.trained_bases()
    config = AdaptationConfig(
        mode="async",
        learning_rate=0.5,
        min_tokens=8,
        capture=CaptureConfig(max_token_norm=1e9),
        guard=GUARD,
        quality=QualityConfig(**quality),  # type: ignore[arg-type]
    )
    gate = QualityGate(model_scorer(model), config.quality)
    return Adapter("lm", trained, TenantBank(trained, CPU, torch.float32), LocalDirStore(tmp_path), config, gate=gate)


def _serve(adapter: Adapter, model: StarMoeForCausalLM, sequences: list[torch.Tensor]) -> list[int]:
    """Routes `sequences` as one forward of tenant acme and hands it to the capture; the lengths counted."""
    lengths = [len(s) for s in sequences]
    ids = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
    mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    tenants = ["acme"] * len(sequences)
    view = adapter.bank.lookup(tenants)
    with torch.inference_mode():
        out = model.model(
            input_ids=ids,
            attention_mask=mask,
            routing=view.routing,
            output_routing=True,
            use_cache=False,
        )
    forward = held_back(adapter, Forward(tenants, lengths, view.versions, out.router_inputs, out.expert_indices, ids))
    if sum(forward.lengths):
        capture_forward(adapter, forward, model.config.num_local_experts, adapter.config.capture)
    return forward.lengths


@pytest.mark.parametrize("margin, committed", [(-1.0, False), (10.0, True)])
def test_the_owner_commits_only_what_the_gate_accepts(
    tmp_path: Path, lm: StarMoeForCausalLM, margin: float, committed: bool
) -> None:
    model = lm
    prompts = _sequences(60)
    held = sum(len(s) for s in prompts[:30])  # the first 30 prompts fill the sample; none after them
    adapter = _adapter(tmp_path, model, max_loss_increase=margin, holdback_tokens=held, holdback_rate=0.0)

    async def scenario() -> None:
        await adapter.ensure_loaded("acme")
        counted = _serve(adapter, model, prompts)
        assert counted == [0] * 30 + [len(s) for s in prompts[30:]]  # held-back prompts do not count
        assert await adapter.step("acme") == committed
        state = adapter.tenants["acme"]
        verdict = state.verdict
        assert verdict is not None and verdict.accepted == committed and verdict.tokens == held
        assert state.version == int(committed)
        assert adapter.stats.batches["refused_quality"] == (0 if committed else 1)
        described = await adapter.describe("acme")
        quality = described["quality"]
        assert isinstance(quality, dict) and quality["accepted"] == committed
        assert (await adapter.store.latest("lm", "acme") is not None) == committed

    asyncio.run(scenario())


def test_without_a_gate_nothing_is_held_back(tmp_path: Path, lm: StarMoeForCausalLM) -> None:
    model = lm
    trained = model.trained_bases()
    config = AdaptationConfig(mode="async", min_tokens=8, capture=CaptureConfig(max_token_norm=1e9))
    adapter = Adapter("lm", trained, TenantBank(trained, CPU, torch.float32), LocalDirStore(tmp_path), config)
    prompts = _sequences(4)
    assert _serve(adapter, model, prompts) == [len(s) for s in prompts]


def test_the_adaptation_process_side_of_the_ring_leaves_held_back_prompts_out() -> None:
    layers, dim, k = 2, 8, 2
    ring = SharedRing.create(layers, dim, k)
    lengths, n = [3, 4, 1], 8
    ring.inputs[:, :n] = torch.arange(n, dtype=torch.float32)[None, :, None].expand(layers, n, dim)
    ring.ids[:n] = torch.arange(1, n + 1)
    offered: list[tuple[str, list[int]]] = []

    def hold(tenant: str, ids: torch.Tensor) -> bool:
        offered.append((tenant, ids.tolist()))
        return tenant == "a"

    message = RingForward(0, n, n, ["a", "b", "c"], lengths, [0, 0, 0], ids=True)
    forward = ring.take(message, 100, hold)
    assert offered == [("a", [1, 2, 3]), ("b", [4, 5, 6, 7]), ("c", [8])]
    assert forward.tenants == ["b"] * 4 + ["c"]  # a's prompt is held back; its tokens are not captured
    assert forward.router_inputs[0][:, 0, 0].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert ring.read.tolist() == [n, 100]


def test_a_tenant_whose_committed_version_scores_worse_than_the_trained_bases_rolls_back(
    tmp_path: Path, lm: StarMoeForCausalLM
) -> None:
    model = lm
    trained = model.trained_bases()
    prompts = _sequences(60)
    held = sum(len(s) for s in prompts[:30])
    bank = torch.stack([_moved(trained, s) for s in range(2, 12)] + [trained])
    scores = score_sequences(model, prompts[:30], bank)
    seed = 2 + max(range(10), key=lambda i: scores[i])
    bad = _moved(trained, seed)  # the worst of ten
    gap = scores[seed - 2] - scores[-1]
    assert gap > 0  # a tiny random model's routing moves its loss little: the margin is a share of the gap
    margin = gap / 2
    adapter = _adapter(tmp_path, model, holdback_tokens=held, holdback_rate=0.0, rollback_loss_increase=margin)

    async def scenario() -> None:
        await adapter.store.commit(Snapshot("lm", "acme", 1, bad), expected=0)  # the tenant's served version
        await adapter.ensure_loaded("acme")
        _serve(adapter, model, prompts)
        assert not await adapter.step("acme")  # the candidate, a step from the bad bases, is refused
        state = adapter.tenants["acme"]
        assert state.verdict is not None and state.verdict.rolled_back
        assert state.verdict.current == pytest.approx(scores[seed - 2], abs=1e-4)
        assert state.version == 2 and state.bases is not None and torch.equal(state.bases, adapter.trained)
        assert adapter.stats.quality_rollbacks == 1 and adapter.stats.rollbacks == 1
        (health,) = adapter.health(10)
        assert health.loss is not None and health.loss[0] == health.loss[1] == state.verdict.trained

    asyncio.run(scenario())


@pytest.mark.parametrize("align_linear", [True, False])
def test_the_gate_model_folds_a_tenants_bases_as_the_served_model_does(
    tmp_path: Path, make_model: Callable[..., Any], align_linear: bool
) -> None:
    """The adaptation process's copy of the model judges candidates through the gate that serves them."""
    served = make_model()
    served.save_pretrained(tmp_path)
    train_tokenizer(["a tokenizer for the checkpoint"], vocab_size=300).save_pretrained(tmp_path)
    served.align_linear_gates(align_linear)
    judging = GateModel(tmp_path, "generate", align_linear).load()
    trained = served.trained_bases()
    tenant = orthonormalize(trained + 0.3 * torch.randn(trained.shape, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(judging.router_gates(tenant), served.router_gates(tenant))
    torch.testing.assert_close(judging.router_gates(trained), served.router_gates(trained))
