"""The embedded demo models: a causal LM and a text classifier trained offline from Python's own stdlib.

The LM learns the standard library's docstrings and help texts; the classifier fine-tunes the LM's
backbone to tell which module family a docstring paragraph comes from. Both end calibrated: their GHA bases
at the fixed point of their training data (`calibrate.py`).

Built once by the project's recipe (a few minutes on 2 CPU cores), cached on disk and reused. A file lock
makes concurrent callers wait for one build instead of training twice.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..model.loading import share_checkpoint
from .calibrate import CalibrationConfig
from .corpus import classifier_dataset, lm_corpus
from .presets import Preset, get_preset
from .trainer import SUMMARY, train_classifier, train_lm

RECIPE_VERSION = 2  # 2: training ends with a calibration phase
DEMO_LM = "star-demo-lm"
DEMO_CLASSIFIER = "star-demo-classifier"


@dataclass(frozen=True)
class DemoModels:
    lm_dir: Path
    classifier_dir: Path

    def summaries(self) -> dict[str, dict[str, Any]]:
        return {
            DEMO_LM: json.loads((self.lm_dir / SUMMARY).read_text()),
            DEMO_CLASSIFIER: json.loads((self.classifier_dir / SUMMARY).read_text()),
        }


def demo_root(cache_dir: Path, preset: Preset) -> Path:
    """Where the demo models live: keyed by recipe version, preset and Python version (the data source)."""
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir / f"demo-v{RECIPE_VERSION}-{preset.name}-{py}"


def ensure_demo_models(cache_dir: Path, preset_name: str = "demo", progress: bool = True) -> DemoModels:
    """Returns the cached demo models, training whichever is missing first."""
    preset = get_preset(preset_name)
    root = demo_root(cache_dir, preset)
    models = DemoModels(root / DEMO_LM, root / DEMO_CLASSIFIER)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (models.lm_dir / SUMMARY).exists():
            train_docs, eval_docs = lm_corpus()
            _build(
                models.lm_dir,
                lambda out: train_lm(
                    train_docs, eval_docs, out, preset, progress=progress, calibration=CalibrationConfig()
                ),
            )
        if not (models.classifier_dir / SUMMARY).exists():
            train, heldout, labels = classifier_dataset()
            finetune = replace(preset, steps=preset.steps // 2)
            _build(
                models.classifier_dir,
                lambda out: train_classifier(
                    train,
                    heldout,
                    labels,
                    out,
                    finetune,
                    progress=progress,
                    init_from=models.lm_dir,
                    calibration=CalibrationConfig(),  # fine-tuning moves the bases off the LM's fixed point
                ),
            )
        for directory in (models.lm_dir, models.classifier_dir):  # an older cache may hold private (0o600) files
            share_checkpoint(directory)
    return models


def _build(final_dir: Path, train: Callable[[Path], object]) -> None:
    """Trains into `<dir>.partial` (resumable after an interruption), then moves it into place."""
    partial = final_dir.with_name(final_dir.name + ".partial")
    train(partial)
    shutil.rmtree(final_dir, ignore_errors=True)
    partial.rename(final_dir)
