"""End-to-end fixtures: tiny checkpoints built in the test session and real `star-serve serve` processes.

The checkpoints (`support.build_checkpoints`) are random STAR MoE models on a tokenizer trained in the
session, so nothing is downloaded; `tests/api` builds the same ones for its in-process apps.

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

import pytest

from .support import (
    CLF_NAME,
    LM_NAME,
    Checkpoints,
    Launcher,
    RedisProcess,
    Server,
    build_checkpoints,
    free_port,
)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return build_checkpoints(tmp_path_factory.mktemp("checkpoints"))


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
