"""Calibration: the bases end at GHA's fixed point on the training data, and the model stays as good."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from star_serve.model import StarMoeForCausalLM
from star_serve.model.gha import gha_step
from star_serve.training.calibrate import CalibrationConfig, fixed_point, gha_pass_distance
from star_serve.training.presets import get_preset
from star_serve.training.trainer import _token_stream, lm_passes, train_lm

TINY = get_preset("tiny")
CALIBRATION = CalibrationConfig(rounds=1, finetune_steps=30, pass_tokens=8192)

WORDS = ["square", "length", "name", "path", "size", "count", "type", "text", "mode", "key"]
DOCS = [
    f"def {verb}_{word}(value, default=None):\n    Return the {word} of value, or default when it is missing.\n"
    for verb in ("get", "read", "find", "parse", "load", "check")
    for word in WORDS * 2
]


def test_fixed_point_is_where_sangers_rule_stops() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=generator, dtype=torch.float64) @ torch.randn(
        16, 16, generator=generator, dtype=torch.float64
    )
    moment = x.T @ x / len(x)
    basis, eigenvalues = fixed_point(moment, 4)
    assert torch.all(eigenvalues[:-1] >= eigenvalues[1:])  # in order of eigenvalue, as Sanger's rule orders them

    def step(v: torch.Tensor) -> torch.Tensor:  # on the population statistics of that second moment
        return gha_step(v.float(), (v @ moment).float(), (v @ moment @ v.T).float(), 1, lr=1e-2)

    stepped = step(basis)
    assert torch.allclose(stepped, basis.float(), atol=1e-4)

    other = torch.linalg.qr(torch.randn(16, 4, generator=generator, dtype=torch.float64)).Q.T
    moved = step(other)
    assert (moved - other.float()).abs().max() > 1e-3  # anywhere else it moves


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("calibrated")
    result = train_lm(DOCS[::2] * 3, DOCS[1::2], out, TINY, progress=False, calibration=CALIBRATION)
    return result.summary, out


def test_after_calibration_one_more_gha_pass_moves_the_bases_less_than_the_tolerance(calibrated) -> None:
    summary, out = calibrated
    calibration = summary["calibration"]
    assert calibration["converged"] and calibration["final_move"] < CALIBRATION.tolerance
    assert calibration["gha_pass_distance"] < CALIBRATION.tolerance
    assert calibration["solves"][0][0] > calibration["final_move"]  # training had left the bases elsewhere

    model = StarMoeForCausalLM.from_pretrained(out).eval()
    stream = _token_stream(AutoTokenizer.from_pretrained(out), DOCS[::2] * 3)
    passes = lm_passes(stream, TINY.seq_len, TINY.batch_size, CALIBRATION.pass_tokens)
    assert gha_pass_distance(model, passes, model.config.gha_learning_rate, CALIBRATION.max_token_norm) < (
        CALIBRATION.tolerance
    )  # measured again on the saved checkpoint


def test_calibration_costs_no_heldout_loss(calibrated) -> None:
    summary, _ = calibrated
    # within 0.02 nats above; it may land lower, the fine-tune also training an underfit tiny model further
    assert summary["heldout_loss"] < summary["uncalibrated_heldout_loss"] + 0.02


@pytest.mark.slow
def test_cli_calibrates_an_existing_checkpoint(tmp_path: Path) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCS))
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("".join(DOCS[::3]))
    train_lm(DOCS, DOCS[:8], tmp_path / "model", TINY, progress=False)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "star_serve.cli", "calibrate", "--model", str(tmp_path / "model")),
            *(
                "--data",
                str(data),
                "--eval-data",
                str(heldout),
                "--out",
                str(tmp_path / "calibrated"),
                "--rounds",
                "1",
                "--finetune-steps",
                "20",
            ),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["calibration"]["gha_pass_distance"] < summary["calibration"]["config"]["tolerance"]
    assert summary["heldout_loss"] < summary["uncalibrated_heldout_loss"] + 0.02
    model = StarMoeForCausalLM.from_pretrained(tmp_path / "calibrated")
    trained = StarMoeForCausalLM.from_pretrained(tmp_path / "model")
    assert not torch.equal(model.trained_bases(), trained.trained_bases())
