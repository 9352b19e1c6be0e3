"""The demo recipe end to end on the tiny preset: `star-serve demo` builds, caches and uses both models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from star_serve.training.demo import ensure_demo_models


@pytest.mark.slow
def test_demo_builds_once_then_reuses_the_cache(tmp_path: Path) -> None:
    env = {**os.environ, "STAR_CACHE_DIR": str(tmp_path), "STAR_DEMO_PRESET": "tiny"}
    done = subprocess.run(
        [sys.executable, "-m", "star_serve.cli", "demo", "--max-tokens", "8"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    assert "continuation:" in done.stdout
    label_line = next(line for line in done.stdout.splitlines() if line.startswith("label:"))

    models = ensure_demo_models(tmp_path, "tiny", progress=False)
    summaries = models.summaries()
    lm, classifier = summaries["star-demo-lm"], summaries["star-demo-classifier"]
    assert lm["heldout_tokens_scored"] > 0 and lm["unigram_heldout_loss"] > 0
    assert label_line.split()[1] in classifier["labels"]
    assert 0 < classifier["majority_baseline_accuracy"] < 1

    weights = models.lm_dir / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    again = ensure_demo_models(tmp_path, "tiny", progress=False)
    assert again == models
    assert weights.stat().st_mtime_ns == built_at  # reused, not retrained
    assert not list(models.lm_dir.parent.glob("*.partial"))
