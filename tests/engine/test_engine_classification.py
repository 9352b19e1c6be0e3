"""Dynamic batching for classification: batched results equal each text alone, batches respect their bound,
routing counts cover every token, and admission refuses cleanly."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from engine_support import DEADLINE, perturbed_bases, routing_reference, run, tiny_config, wait_until

from star_serve.adaptation import TenantBank
from star_serve.engine.classification import BatcherConfig, ClassificationEngine, collate
from star_serve.engine.types import (
    ClassificationResult,
    EngineDraining,
    EngineError,
    EngineOverloaded,
    StepStats,
)
from star_serve.model import Routing, StarMoeForSequenceClassification

CPU = torch.device("cpu")
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TEXTS = [
    "the cat sat on a mat",
    "dog",
    "a big red house on the hill by the green river",
    "",  # classified as the end-of-text token alone
    "blue stone",
    "small tree ran fast",
    "the river",
]


class Recorder:
    def __init__(self) -> None:
        self.steps: list[StepStats] = []
        self._lock = threading.Lock()

    def __call__(self, stats: StepStats) -> None:
        with self._lock:
            self.steps.append(stats)


@pytest.fixture
def make_classifier(tokenizer: Any) -> Callable[..., StarMoeForSequenceClassification]:
    def build(seed: int = 0, **overrides: Any) -> StarMoeForSequenceClassification:
        torch.manual_seed(seed)
        config = tiny_config(tokenizer, num_labels=3, id2label=LABELS, **overrides)
        return StarMoeForSequenceClassification(config).eval()

    return build


@pytest.fixture
def classifiers(tokenizer: Any) -> Iterator[Callable[..., ClassificationEngine]]:
    """`classifiers(model, bank=None, start=True, **config)` -> an engine stopped when the test ends."""
    built: list[ClassificationEngine] = []

    def build(
        model: Any, bank: TenantBank | None = None, start: bool = True, on_step: Any = None, **config: Any
    ) -> ClassificationEngine:
        if bank is None:
            bank = TenantBank(model.trained_bases(), CPU, torch.float32, fold=model.router_gates)
        engine = ClassificationEngine(model, tokenizer, bank, BatcherConfig(**config), on_step=on_step)
        built.append(engine)
        if start:
            engine.start()
        return engine

    yield build
    for engine in built:
        if engine.alive:
            engine.stop()
            assert not engine.alive


def _ids(tokenizer: Any, text: str, limit: int = 512) -> list[int]:
    return tokenizer.encode(text)[:limit] or [tokenizer.eos_token_id]


@torch.no_grad()
def _alone(model: Any, ids: list[int], bases: torch.Tensor | None = None) -> torch.Tensor:
    routing = Routing() if bases is None else Routing.shared(bases)
    return model(torch.tensor([ids]), routing=routing).logits[0].float().softmax(-1)


def _check(result: ClassificationResult, probs: torch.Tensor, tokens: int) -> None:
    best = int(probs.argmax())
    assert result.label == LABELS[best]
    assert result.score == pytest.approx(float(probs[best]), abs=1e-5)
    assert list(result.scores) == list(LABELS.values())
    for i, label in LABELS.items():
        assert result.scores[label] == pytest.approx(float(probs[i]), abs=1e-5)
    assert result.tokens == tokens


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_batched_results_equal_each_text_alone(
    pooling: str, make_classifier: Callable[..., Any], tokenizer: Any, classifiers: Callable[..., Any]
) -> None:
    model = make_classifier(classifier_pooling=pooling)
    recorder = Recorder()
    # The batch closes as soon as it is full, so all texts of one call share one forward.
    engine = classifiers(model, on_step=recorder, max_batch=len(TEXTS), max_wait=DEADLINE)
    results = run(engine.classify(TEXTS, tenant="t"))
    assert [s.batch_size for s in recorder.steps] == [len(TEXTS)]
    lengths = [len(_ids(tokenizer, t)) for t in TEXTS]
    assert recorder.steps[0].tokens == sum(lengths)
    assert len({r.label for r in results} | {max(r.scores.values()) for r in results}) > 1
    for text, result, n in zip(TEXTS, results, lengths, strict=True):
        _check(result, _alone(model, _ids(tokenizer, text)), n)
        assert result.routing is None and result.subspace_version == 0


def test_tenants_classify_with_their_own_bases(
    make_classifier: Callable[..., Any], tokenizer: Any, classifiers: Callable[..., Any]
) -> None:
    model = make_classifier()
    bank = TenantBank(model.trained_bases(), CPU, torch.float32, fold=model.router_gates)
    bases = perturbed_bases(model, 2.0, seed=3)
    bank.publish("own", bases, version=9)
    engine = classifiers(model, bank=bank, max_batch=8, max_wait=0.01)

    async def body() -> tuple[list[ClassificationResult], list[ClassificationResult]]:
        return await asyncio.gather(engine.classify(TEXTS, "own"), engine.classify(TEXTS, "other"))

    own, other = run(body())
    moved = 0.0
    for text, mine, theirs in zip(TEXTS, own, other, strict=True):
        ids = _ids(tokenizer, text)
        _check(mine, _alone(model, ids, bases), len(ids))
        _check(theirs, _alone(model, ids), len(ids))
        assert (mine.subspace_version, theirs.subspace_version) == (9, 0)
        moved = max(moved, max(abs(mine.scores[k] - theirs.scores[k]) for k in mine.scores))
    assert moved > 1e-3, "the tenant's bases should change some scores"


def test_more_texts_than_a_batch_are_split_into_bounded_batches(
    make_classifier: Callable[..., Any], tokenizer: Any, classifiers: Callable[..., Any]
) -> None:
    model = make_classifier()
    recorder = Recorder()
    engine = classifiers(model, on_step=recorder, max_batch=3, max_wait=0.01)
    texts = TEXTS * 2
    results = run(engine.classify(texts, tenant="t"))
    assert sum(s.batch_size for s in recorder.steps) == len(texts)
    assert max(s.batch_size for s in recorder.steps) <= 3
    for text, result in zip(texts, results, strict=True):
        ids = _ids(tokenizer, text)
        _check(result, _alone(model, ids), len(ids))


def test_inputs_are_truncated_to_max_input_tokens(
    make_classifier: Callable[..., Any], tokenizer: Any, classifiers: Callable[..., Any]
) -> None:
    model = make_classifier()
    engine = classifiers(model, max_input_tokens=6)
    text = "the green stone sat on a mat by the river and the dog ran fast"
    assert len(tokenizer.encode(text)) > 6
    (result,) = run(engine.classify([text], tenant="t"))
    _check(result, _alone(model, tokenizer.encode(text)[:6]), 6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_routing_counts_sum_to_the_tokens_of_each_text(
    top_k: int, make_classifier: Callable[..., Any], tokenizer: Any, classifiers: Callable[..., Any]
) -> None:
    model = make_classifier(num_experts_per_tok=top_k)
    engine = classifiers(model, max_batch=len(TEXTS), max_wait=DEADLINE)

    async def body() -> tuple[list[ClassificationResult], list[ClassificationResult]]:
        return await asyncio.gather(
            engine.classify(TEXTS[:4], "t", return_routing=True), engine.classify(TEXTS[4:], "t")
        )

    routed, plain = run(body())
    assert all(r.routing is None for r in plain)
    for text, result in zip(TEXTS[:4], routed, strict=True):
        ids = _ids(tokenizer, text)
        assert result.routing is not None and len(result.routing) == model.config.num_hidden_layers
        assert [sum(layer) for layer in result.routing] == [len(ids) * top_k] * model.config.num_hidden_layers
        assert result.routing == routing_reference(model, ids)


def test_collate_returns_at_most_max_batch_and_nothing_when_idle() -> None:
    pending: queue.Queue[int] = queue.Queue()
    for i in range(7):
        pending.put(i)
    assert collate(pending, 3, max_wait=0.0) == [0, 1, 2]  # type: ignore[arg-type]
    assert collate(pending, 3, max_wait=0.0) == [3, 4, 5]  # type: ignore[arg-type]
    assert collate(pending, 3, max_wait=0.0) == [6]  # type: ignore[arg-type]
    started = time.monotonic()
    assert collate(pending, 3, max_wait=0.0, idle=0.05) == []  # type: ignore[arg-type]
    assert 0.04 <= time.monotonic() - started < DEADLINE


def test_collate_waits_at_most_max_wait_for_company() -> None:
    pending: queue.Queue[int] = queue.Queue()
    pending.put(1)
    started = time.monotonic()
    assert collate(pending, 4, max_wait=0.05) == [1]  # type: ignore[arg-type]
    assert 0.04 <= time.monotonic() - started < DEADLINE
    pending.put(2)
    later = threading.Timer(0.01, pending.put, args=(3,))
    later.start()
    try:  # the second item arrives within max_wait and joins the batch
        assert collate(pending, 2, max_wait=DEADLINE) == [2, 3]  # type: ignore[arg-type]
    finally:
        later.join()


def test_draining_and_overload_refuse_requests(
    make_classifier: Callable[..., Any], classifiers: Callable[..., Any]
) -> None:
    model = make_classifier()
    recorder = Recorder()
    engine = classifiers(model, start=False, on_step=recorder, max_waiting=2, max_wait=0.0)

    async def body() -> list[ClassificationResult]:
        engine.draining = True
        with pytest.raises(EngineDraining):
            await engine.classify(["dog"], "t")
        engine.draining = False
        with pytest.raises(EngineOverloaded):
            await engine.classify(["dog", "cat", "tree"], "t")  # 3 > max_waiting
        engine.start()
        await wait_until(lambda: engine.stats().waiting == 0)  # the refused texts' leftovers are dropped
        return await asyncio.wait_for(engine.classify(["dog", "cat"], "t"), DEADLINE)

    results = run(body())
    assert len(results) == 2
    assert sum(s.batch_size for s in recorder.steps) == 2  # nothing of the refused call was classified


def test_classify_after_stop_fails_instead_of_hanging(
    make_classifier: Callable[..., Any], classifiers: Callable[..., Any]
) -> None:
    """Like the generation engine (EngineDraining once stopping), a stopped classifier must not accept work it
    will never do."""
    model = make_classifier()
    engine = classifiers(model)
    assert run(engine.classify(["dog"], "t"))[0].label in LABELS.values()
    engine.stop()
    assert not engine.alive

    async def body() -> None:
        with pytest.raises(EngineError):
            await asyncio.wait_for(engine.classify(["dog"], "t"), 2.0)

    run(body())
