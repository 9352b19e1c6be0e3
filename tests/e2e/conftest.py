"""End-to-end fixtures: tiny checkpoints built in the test session and real `star-serve serve` processes.

The checkpoints are random (untrained) STAR MoE models on a byte-level BPE tokenizer trained on a few hundred
stdlib docstrings, so nothing is downloaded and nothing is trained beyond the tokenizer (a few seconds).

Three changes make a random LM usable for generation tests:
- the lm_head row of the end-of-text token is zeroed, so its logit is exactly 0 for every hidden state, and
- every other lm_head row is scaled up (x `LOGIT_SCALE`), so the other logits spread over several units and
  the largest one sits far above 0. Greedy decoding then does not pick EOS and runs to `max_tokens`, seeded
  sampling practically never draws it (a seeded draw is deterministic anyway, so no test flakes on it), and
  the wider logit gaps keep greedy choices stable under batched vs. solo float differences.
- the LM's context is `LM_CONTEXT` (more than the 256 of a toy config) so that a single request can run for
  a few seconds: long enough to observe it in flight (disconnect, drain, overload) without sleeping.

Servers are started as subprocesses (`python -m star_serve.cli serve ...`) on a free port with fresh
`STAR_STATE_DIR` / `STAR_CACHE_DIR`; a fixture waits until `GET /ready` is 200 (bounded), and stops the
process with SIGTERM (then SIGKILL after a bound) on teardown. Output goes to a log file that is shown when a
server fails to start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import (
    CLF_CONTEXT,
    CLF_NAME,
    LABELS,
    LM_CONTEXT,
    LM_NAME,
    LOGIT_SCALE,
    NUM_EXPERTS,
    NUM_LAYERS,
    Checkpoints,
    Launcher,
    RedisProcess,
    Server,
    free_port,
)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    import torch

    from star_serve.model import StarMoeConfig, StarMoeForCausalLM, StarMoeForSequenceClassification
    from star_serve.training.corpus import lm_corpus
    from star_serve.training.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("checkpoints")
    tok = train_tokenizer(lm_corpus()[0][:300], vocab_size=512, model_max_length=CLF_CONTEXT)

    def config(context: int, **extra: Any) -> StarMoeConfig:
        return StarMoeConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=1,
            max_position_embeddings=context,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            **extra,
        )

    torch.manual_seed(0)
    lm = StarMoeForCausalLM(config(LM_CONTEXT)).eval()
    with torch.no_grad():
        lm.lm_head.weight.mul_(LOGIT_SCALE)
        lm.lm_head.weight[tok.eos_token_id] = 0.0  # EOS logit is always 0, far below the top logits
    lm_dir = root / "lm"
    lm.save_pretrained(lm_dir)
    tok.model_max_length = LM_CONTEXT
    tok.save_pretrained(lm_dir)

    torch.manual_seed(0)
    id2label = dict(enumerate(LABELS))
    clf = StarMoeForSequenceClassification(
        config(CLF_CONTEXT, num_labels=len(LABELS), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    ).eval()
    clf_dir = root / "clf"
    clf.save_pretrained(clf_dir)
    tok.model_max_length = CLF_CONTEXT
    tok.save_pretrained(clf_dir)
    tok.model_max_length = LM_CONTEXT  # the tests count tokens of long LM prompts with it
    return Checkpoints(lm_dir=lm_dir, clf_dir=clf_dir, tokenizer=tok)


@pytest.fixture(scope="session")
def launch(checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """`launch(env=None, state_dir=None, models=None)`: a ready server; stopped at the end of the session
    unless the test stops it first. `state_dir` reuses a previous server's tenants and keys."""
    started: list[Server] = []

    def start(
        env: dict[str, str] | None = None, state_dir: Path | None = None, models: list[str] | None = None
    ) -> Server:
        home = tmp_path_factory.mktemp("server")
        state = state_dir or home / "state"
        port = free_port()
        server_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STAR_")},
            "STAR_STATE_DIR": str(state),
            "STAR_CACHE_DIR": str(home / "cache"),
            "STAR_DRAIN_TIMEOUT": "20",
            "STAR_MAX_BODY_BYTES": "65536",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        }
        models = models or [f"{LM_NAME}={checkpoints.lm_dir}", f"{CLF_NAME}={checkpoints.clf_dir}"]
        command = [sys.executable, "-m", "star_serve.cli", "serve", "--port", str(port), "--device", "cpu"]
        for model in models:
            command += ["--model", model]
        log_path = home / "server.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_env)
        server = Server(proc, port, state, log_path, server_env, admin_key=server_env.get("STAR_ADMIN_KEY"))
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.terminate(timeout=10)


@pytest.fixture(scope="session")
def server(launch: Launcher) -> Server:
    """The shared server: auth off, default limits, both tiny models, adaptation off. These tests compare
    answers across requests (streamed vs not, batched vs alone, same seed), which only holds when every
    answer comes from the same bases; adaptation has its own servers in test_e2e_adaptation.py."""
    return launch(env={"STAR_ADAPTATION": "off"})


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of the test's own, with an append-only file, that the test may stop and restart."""
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()
