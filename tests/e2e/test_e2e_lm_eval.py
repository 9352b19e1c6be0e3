"""lm-evaluation-harness against a running server, as its users evaluate STAR models: a multiple-choice task
scored by log-likelihood through `local-completions` (token-id prompts, `echo`, `logprobs`, the server's own
tokenizer through `/tokenizer_info` and `/tokenize`) agrees with the same task run by the harness's `hf`
backend on the same model in-process, log-likelihood by log-likelihood; and a generation task through
`local-chat-completions`, run by the `lm_eval` command as the README shows it, answers what the chat endpoint
answers. The tasks are built from held-out docstrings: nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from star_serve.bench.harness import TASK, loglikelihoods, offline_environment, write_continuation_task
from star_serve.model import StarMoeForCausalLM
from star_serve.training.corpus import lm_corpus

from .support import LM_NAME, Checkpoints, Server

GEN_TASK = "star_chat_lines"


def _write_generation_task(root: Path) -> Path:
    """The first words of four held-out docstrings, to be continued up to the end of the line."""
    root.mkdir(parents=True, exist_ok=True)
    texts = [t.split() for t in lm_corpus()[1] if len(t.split()) >= 16][:4]
    (root / "gen.jsonl").write_text(
        "".join(json.dumps({"question": " ".join(w[:6]), "answer": " ".join(w[6:9])}) + "\n" for w in texts)
    )
    (root / f"{GEN_TASK}.yaml").write_text(
        f"task: {GEN_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n"
        '  until: ["\\n"]\n  max_gen_toks: 8\n'
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    return root


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = offline_environment(tmp_path / "hf")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.mark.slow
def test_local_completions_agrees_with_the_hf_backend_on_the_same_model(
    server: Server, checkpoints: Checkpoints, tmp_path: Path, offline: dict[str, str]
) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(write_continuation_task(tmp_path, docs=12)), include_defaults=False)
    served = simple_evaluate(
        model="local-completions",
        model_args={
            "model": LM_NAME,
            "base_url": f"{server.base_url}/v1/completions",
            "tokenizer_backend": "remote",
            "max_length": 512,
        },
        tasks=[TASK],
        task_manager=tasks,
        log_samples=True,
    )
    model = StarMoeForCausalLM.from_pretrained(checkpoints.lm_dir, torch_dtype=torch.float32).eval()
    direct = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=checkpoints.tokenizer, batch_size=1, device="cpu", max_length=512),
        tasks=[TASK],
        task_manager=tasks,
        log_samples=True,
    )
    assert served is not None and direct is not None
    through_server, in_process = loglikelihoods(served), loglikelihoods(direct)
    assert len(through_server) == 12 and all(len(choices) == 4 for choices in through_server)
    for remote, local in zip(through_server, in_process, strict=True):
        assert remote == pytest.approx(local, abs=1e-3)
    assert served["results"][TASK]["acc,none"] == direct["results"][TASK]["acc,none"]


@pytest.mark.slow
def test_the_lm_eval_command_runs_a_generation_task_through_chat_completions(
    server: Server, tmp_path: Path, offline: dict[str, str]
) -> None:
    tasks = _write_generation_task(tmp_path / "tasks")
    model_args = {"model": LM_NAME, "base_url": f"{server.base_url}/v1/chat/completions", "max_length": 512}
    command = [
        *(sys.executable, "-m", "lm_eval", "run", "--model", "local-chat-completions"),
        *("--model_args", json.dumps(model_args), "--apply_chat_template"),
        *("--tasks", GEN_TASK, "--include_path", str(tasks)),
        *("--output_path", str(tmp_path / "out"), "--log_samples"),
    ]
    run = subprocess.run(command, env=os.environ | offline, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    [samples_file] = (tmp_path / "out").rglob(f"samples_{GEN_TASK}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 4
    for sample in samples:
        [[answer]] = sample["resps"]
        messages = [{"role": "user", "content": sample["doc"]["question"]}]
        chat = server.openai().chat.completions.create(
            model=LM_NAME, messages=messages, max_tokens=8, temperature=0, stop=["\n"], seed=1234
        )
        assert answer == chat.choices[0].message.content
