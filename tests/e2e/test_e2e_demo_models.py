"""The embedded default end to end: `star-serve serve` with no model configured serves the demo models.

The demo models are built by the project's recipe on first use (a few minutes on 2 CPU cores) and cached
where `make serve` caches them, so later runs reuse them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from star_serve.training.demo import DEMO_CLASSIFIER, DEMO_LM

from .support import Server, free_port

BUILD_TIMEOUT = 1800.0  # training and calibrating both demo models from scratch (about 10 minutes on 2 cores)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("demo")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STAR_") or k == "STAR_CACHE_DIR"},
        "STAR_STATE_DIR": str(home / "state"),
        "PYTHONUNBUFFERED": "1",
    }
    port = free_port()
    log_path = home / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "star_serve.cli", "serve", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Server(proc, port, Path(env["STAR_STATE_DIR"]), log_path, env)
    try:
        server.wait_ready(timeout=BUILD_TIMEOUT)
        yield server
    finally:
        server.terminate(timeout=10)


def test_demo_models_are_served_and_answer(demo_server: Server) -> None:
    client = demo_server.openai()
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {DEMO_LM, DEMO_CLASSIFIER}

    completion = client.completions.create(
        model=DEMO_LM, prompt="Return the number of", max_tokens=12, temperature=0, extra_headers={"X-Tenant": "acme"}
    )
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 12
    assert completion.choices[0].text.strip()
    assert completion.model_extra["star"] == {"tenant": "acme", "subspace_version": 0, "routing": None}

    classified = demo_server.http.post(
        "/v1/classify",
        json={"model": DEMO_CLASSIFIER, "input": ["Send an HTTP request to the server.", "Run the event loop."]},
    )
    assert classified.status_code == 200
    data = classified.json()["data"]
    assert [d["label"] for d in data] == [max(d["scores"], key=d["scores"].get) for d in data]
    assert {"net", "asyncio"} & {d["label"] for d in data}
