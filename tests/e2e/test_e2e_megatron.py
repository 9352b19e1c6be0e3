"""A reference checkpoint of the `star-182m` shape (12 layers, hidden 768, 12 heads in 4 query groups, 8
experts of 3072, GPT-2's 50,257 tokens padded to 51,200, bf16, random weights), saved as Megatron's
`torch_dist`, converted by `star-serve convert megatron` and served by `star-serve serve` to the openai
client. `make test-large`; not in the default run (about 1.6 GB of checkpoint, a few minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from convert.reference import Reference, Shape, gpt2_files

from .support import Launcher

pytestmark = pytest.mark.large

STAR_182M = Shape(layers=12, hidden=768, ffn=3072, heads=12, groups=4, experts=8, topk=1, padded_vocab=51200)


def test_a_star_182m_checkpoint_converts_and_serves(tmp_path: Path, launch: Launcher) -> None:
    vocab_file, merge_file, vocab = gpt2_files(tmp_path, size=50257)
    assert vocab == 50257
    Reference.random(STAR_182M, vocab, dtype=torch.bfloat16).save_torch_dist(tmp_path / "run")
    out = tmp_path / "star-182m"
    command = [sys.executable, "-m", "star_serve.cli", "convert", "megatron", "--load", str(tmp_path / "run")]
    command += ["--vocab-file", str(vocab_file), "--merge-file", str(merge_file), "--out", str(out)]
    converted = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    summary = json.loads(converted.stdout)
    assert summary["format"] == "torch_dist" and summary["dtype"] == "bfloat16"
    assert summary["vocabulary"] == {"tokens": 50257, "checkpoint_rows": 51200}
    assert summary["layers"] == 12 and summary["experts"] == 8 and summary["router_type"] == "star"

    server = launch(models=[f"star-182m={out}"], env={"STAR_ADAPTATION": "off"})
    client = server.openai()
    completion = client.completions.create(
        model="star-182m", prompt="the other", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert completion.usage.completion_tokens == 8
    scored = client.completions.create(model="star-182m", prompt="the other", max_tokens=0, echo=True, logprobs=1)
    logprobs = scored.choices[0].logprobs.token_logprobs
    assert logprobs[0] is None and all(p is not None and p <= 0 for p in logprobs[1:])
