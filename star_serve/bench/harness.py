"""`star-serve bench lm-eval`: lm-evaluation-harness scoring a served model by log-likelihood, as STAR's users
evaluate, side by side with the harness scoring the same weights in-process.

The task is built from held-out docstrings, so nothing is downloaded: each document's first words, and four
continuations of which one is the document's own (the others are the same stretch of other documents). The
served run is the harness's `local-completions` model against a real `star-serve serve` process (token-id
prompts, `echo`, `logprobs`, the server's own tokenizer through `/tokenizer_info` and `/tokenize`); the
in-process run is its `hf` model over the same checkpoint. Reported: each run's accuracy and time, and the
largest difference between the two runs' log-likelihoods of the same continuation.

lm-evaluation-harness is a development dependency (`pip install -e '.[dev]'`), imported only here.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .report import write_report
from .server import BenchServer

TASK = "star_continuations"


def write_continuation_task(root: Path, docs: int, seed: int = 0) -> Path:
    """The multiple-choice task of `docs` held-out docstrings, as a harness task directory under `root`: which of
    four six-word continuations follows the document's first eight words."""
    from ..training.corpus import lm_corpus

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    texts = [t.split() for t in lm_corpus()[1] if len(t.split()) >= 16][: docs + 3]
    if len(texts) < docs + 3:
        raise ValueError(f"the held-out docstrings make {len(texts) - 3} documents, not {docs}")
    rows = []
    for i, words in enumerate(texts[:docs]):
        real = " ".join(words[8:14])
        choices = [real] + [" ".join(texts[i + k][8:14]) for k in (1, 2, 3)]
        rng.shuffle(choices)
        rows.append({"context": " ".join(words[:8]), "choices": choices, "answer": choices.index(real)})
    (root / f"{TASK}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / f'{TASK}.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    return root


def loglikelihoods(results: dict[str, Any], task: str = TASK) -> list[list[float]]:
    """Per document (in order), the harness's log-likelihood of each choice."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def offline_environment(home: Path) -> dict[str, str]:
    """What keeps the harness off the hub: datasets from local files only, caches under `home`."""
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(home)}


@dataclass(frozen=True)
class HarnessBenchConfig:
    model: Path
    out_dir: Path
    docs: int = 200
    max_length: int = 512


def run_harness_bench(cfg: HarnessBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise SystemExit(f"bench lm-eval needs lm-evaluation-harness: pip install 'lm_eval[hf]' ({e})") from None
    from transformers import AutoTokenizer

    from ..model import StarMoeForCausalLM

    tasks_dir = write_continuation_task(cfg.out_dir / "lm-eval-task", cfg.docs)
    os.environ.update(offline_environment(cfg.out_dir / "hf-home"))
    tasks = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    runs: dict[str, dict[str, Any]] = {}
    server = BenchServer(cfg.model, {"STAR_ADAPTATION": "off"})
    try:
        started = time.perf_counter()
        args = {"model": "bench", "base_url": f"{server.url}/v1/completions", "tokenizer_backend": "remote"}
        served = simple_evaluate(
            model="local-completions",
            model_args=args | {"max_length": cfg.max_length},
            tasks=[TASK],
            task_manager=tasks,
            log_samples=True,
        )
        runs["served"] = {"results": served, "seconds": time.perf_counter() - started}
    finally:
        server.close()
    log(f"  served: {runs['served']['seconds']:.0f} s")
    model = StarMoeForCausalLM.from_pretrained(cfg.model, torch_dtype=torch.float32).eval()
    started = time.perf_counter()
    direct = simple_evaluate(
        model=HFLM(
            pretrained=model,
            tokenizer=AutoTokenizer.from_pretrained(cfg.model),
            batch_size=1,
            device="cpu",
            max_length=cfg.max_length,
        ),
        tasks=[TASK],
        task_manager=tasks,
        log_samples=True,
    )
    runs["in_process"] = {"results": direct, "seconds": time.perf_counter() - started}
    log(f"  in process: {runs['in_process']['seconds']:.0f} s")

    pairs = zip(loglikelihoods(served), loglikelihoods(direct), strict=True)
    difference = max(abs(a - b) for remote, local in pairs for a, b in zip(remote, local, strict=True))
    summary = {
        name: {"accuracy": run["results"]["results"][TASK]["acc,none"], "seconds": run["seconds"]}
        for name, run in runs.items()
    }
    results = {
        "config": {"model": cfg.model.name, "docs": cfg.docs, "max_length": cfg.max_length},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
        "summary": summary,
        "max_loglikelihood_difference": difference,
    }
    table = "\n".join(
        [
            "| lm-evaluation-harness model | accuracy | seconds |",
            "|---|---:|---:|",
            f"| `local-completions` against star-serve | {summary['served']['accuracy']:.3f} | "
            f"{summary['served']['seconds']:.0f} |",
            f"| `hf`, the same weights in-process | {summary['in_process']['accuracy']:.3f} | "
            f"{summary['in_process']['seconds']:.0f} |",
            f"\n{cfg.docs} documents of held-out docstrings, four continuations each (chance 0.25); the largest "
            f"difference between the two runs' log-likelihoods of a continuation: {difference:.2e} nats.\n",
        ]
    )
    write_report(cfg.out_dir, "lm-eval", results, table, None)
    return results
