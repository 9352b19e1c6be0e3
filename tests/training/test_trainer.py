"""Training: the loop lowers the loss, resumes exactly after a crash, and the CLI writes a loadable model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from star_serve.model import StarMoeForCausalLM
from star_serve.training.presets import get_preset, tiny_config
from star_serve.training.trainer import CHECKPOINT, fit

TINY = get_preset("tiny")

DOCS = [
    f"def function_{i}(value):\n    Return the {word} of value, or None when it is missing.\n"
    for i, word in enumerate(["square", "length", "name", "path", "size", "count", "type", "text"] * 12)
]


def _tiny_model(seed: int = 0) -> StarMoeForCausalLM:
    torch.manual_seed(seed)
    return StarMoeForCausalLM(tiny_config(vocab_size=64))


def _batches(crash_at: int | None = None):
    calls = 0

    def next_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
        nonlocal calls
        calls += 1
        if calls == crash_at:
            raise KeyboardInterrupt("simulated crash")
        ids = torch.randint(0, 16, (4, 8), generator=generator).repeat(1, 4)  # a learnable repeat pattern
        return {"input_ids": ids, "labels": ids}

    return next_batch


def test_fit_lowers_the_loss(tmp_path: Path) -> None:
    model = _tiny_model()
    stats = fit(model, _batches(), TINY, tmp_path, seed=0, desc="test", progress=False)
    assert stats["final_train_loss"] < stats["first_train_loss"] - 0.5
    assert not model.training


def test_fit_resumes_bit_exactly_after_a_crash(tmp_path: Path) -> None:
    straight = _tiny_model()
    fit(straight, _batches(), TINY, tmp_path / "straight", seed=0, desc="test", progress=False)

    crashed_dir = tmp_path / "crashed"
    assert TINY.checkpoint_every < 25 < TINY.steps
    with pytest.raises(KeyboardInterrupt):
        fit(_tiny_model(), _batches(crash_at=25), TINY, crashed_dir, seed=0, desc="test", progress=False)
    assert torch.load(crashed_dir / CHECKPOINT, weights_only=False)["step"] == TINY.checkpoint_every

    resumed = _tiny_model(seed=123)  # fresh weights: everything must come from the checkpoint
    fit(resumed, _batches(), TINY, crashed_dir, seed=0, desc="test", progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _run_cli(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "star_serve.cli", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(done.stdout[done.stdout.index("{") :])


@pytest.mark.slow
def test_cli_trains_a_loadable_lm(tmp_path: Path) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    summary = _run_cli("train", "lm", "--data", str(data), "--out", str(tmp_path / "lm"), "--preset", "tiny")
    assert summary["final_train_loss"] < summary["first_train_loss"]
    assert summary["heldout_tokens_scored"] > 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training_summary.json"):
        assert (tmp_path / "lm" / name).exists(), name
    assert not (tmp_path / "lm" / CHECKPOINT).exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert model.config.router_type == "star"


@pytest.mark.slow
def test_cli_trains_a_classifier_with_labels(tmp_path: Path) -> None:
    data = tmp_path / "labelled.jsonl"
    rows = [{"text": d, "label": "even" if i % 2 == 0 else "odd"} for i, d in enumerate(DOCS)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = _run_cli(
        "train",
        "classifier",
        "--data",
        str(data),
        "--eval-data",
        str(data),
        "--out",
        str(tmp_path / "clf"),
        "--preset",
        "tiny",
    )
    assert summary["labels"] == ["even", "odd"]
    assert 0.0 <= summary["heldout_accuracy"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf")
    assert model.config.id2label == {0: "even", 1: "odd"}
