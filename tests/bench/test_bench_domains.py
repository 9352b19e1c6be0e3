"""`bench domains`'s parts that need no server: the domains' text, disjoint traffic and evaluation
windows, the counters read from a real /metrics page, and the summary over seeds. The run itself starts
servers and is a benchmark (`make bench-domains`), not a test."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, generate_latest
from transformers import PreTrainedTokenizerFast

from star_serve.adaptation import AdaptationConfig, Adapter, LocalDirStore, TenantBank
from star_serve.bench.domains import (
    DOMAINS,
    DomainBenchConfig,
    adaptation_counters,
    domain_documents,
    split_windows,
    summarize,
    with_typos,
)
from star_serve.metrics import ServingMetrics
from star_serve.model import orthonormalize
from star_serve.training.corpus import lm_corpus
from star_serve.training.tokenizer import train_tokenizer


def test_code_has_neither_docstrings_nor_comments() -> None:
    (doc, *_) = domain_documents("code", [], chars=1)
    tree = ast.parse(doc)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            assert not (isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str))
    assert not any(line.lstrip().startswith("#") for line in doc.splitlines())


def test_typos_replace_about_their_share_of_letters() -> None:
    text = "the quick brown fox jumps over the lazy dog " * 50
    changed = with_typos(text, 0.15, seed=0)
    letters = [(a, b) for a, b in zip(text, changed, strict=True) if a.isalpha()]
    share = sum(a != b for a, b in letters) / len(letters)
    assert 0.10 < share < 0.16  # a replacement by the same letter is no typo (1 in 26)
    assert [a for a in text if not a.isalpha()] == [b for a, b in zip(text, changed, strict=True) if not a.isalpha()]
    assert domain_documents("upper-case", ["abc def"], 0) == ["ABC DEF"]


def test_traffic_and_evaluation_windows_are_disjoint_and_seeded(tmp_path: Path) -> None:
    heldout = lm_corpus()[1]
    tokenizer: PreTrainedTokenizerFast = train_tokenizer(heldout[:100], vocab_size=300)
    cfg = DomainBenchConfig(model=tmp_path, out_dir=tmp_path, traffic_tokens=1024, eval_tokens=512, seq_len=64)
    traffic, evaluation = split_windows(tokenizer, heldout[:200], cfg, seed=0)
    assert traffic.shape == (16, 64) and evaluation.shape == (8, 64)
    seen = {tuple(w.tolist()) for w in traffic}
    assert not any(tuple(w.tolist()) in seen for w in evaluation)
    again, _ = split_windows(tokenizer, heldout[:200], cfg, seed=0)
    other, _ = split_windows(tokenizer, heldout[:200], cfg, seed=1)
    assert torch.equal(traffic, again) and not torch.equal(traffic, other)


def test_the_counters_come_from_the_metrics_page(tmp_path: Path) -> None:
    trained = torch.stack([orthonormalize(torch.randn(4, 16)) for _ in range(2)])
    adapter = Adapter(
        "bench",
        trained,
        TenantBank(trained, torch.device("cpu"), torch.float32),
        LocalDirStore(tmp_path),
        AdaptationConfig(mode="async"),
    )
    adapter.stats.batches.update({"published": 5, "applied": 3, "refused_quality": 2})
    adapter.stats.captured.sampled = 640
    metrics = ServingMetrics(CollectorRegistry())
    metrics.watch_adapters(lambda: [("bench", adapter)], top_tenants=10)
    counters = adaptation_counters(generate_latest(metrics.registry).decode())
    assert counters["published"] == 5 and counters["applied"] == 3 and counters["refused_quality"] == 2
    assert counters["tokens"] == 640


def test_the_summary_is_the_median_and_spread_over_seeds() -> None:
    runs = [
        {"gate": "gated", "domain": d, "loss_change": change, "frozen_loss": 3.0, "version": v}
        for d in DOMAINS
        for change, v in ((0.01, 1), (-0.02, 3), (0.03, 2))
    ]
    summary = summarize(runs)
    assert summary["gated"]["code"] == {"median": 0.01, "min": -0.02, "max": 0.03, "frozen_loss": 3.0, "versions": 2}
