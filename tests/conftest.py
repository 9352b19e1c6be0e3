"""Suite-wide fixtures and rules: every test under tests/e2e is marked `e2e` (it starts real server
processes; `make test-fast` leaves them out); tests marked `gpu` run only where CUDA is available;
`redis_url` is a real redis-server started for the session; `make_model` builds a tiny STAR MoE."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import torch

from star_serve.bench.report import free_port
from star_serve.model import StarMoeConfig, StarMoeForCausalLM
from star_serve.training import presets


def tiny_config(**overrides: Any) -> StarMoeConfig:
    """The `tiny` preset's model (hidden 32, 2 layers, 4 heads, 2 KV heads, 4 experts) with vocabulary 101."""
    return presets.tiny_config(**{"vocab_size": 101, "pad_token_id": 0, **overrides})


@pytest.fixture
def make_config() -> Callable[..., StarMoeConfig]:
    """`make_config(**overrides)`: the `tiny` preset's model, vocabulary 101."""
    return tiny_config


@pytest.fixture
def make_model() -> Callable[..., Any]:
    """`make_model(cls=StarMoeForCausalLM, seed=0, **config_overrides)`: a tiny model in eval mode."""

    def build(cls: type = StarMoeForCausalLM, seed: int = 0, **overrides: Any) -> Any:
        torch.manual_seed(seed)
        return cls(tiny_config(**overrides)).eval()

    return build


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of the tests' own, on a free port, with nothing persisted."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.02)
    yield url
    client.close()
    proc.terminate()
    proc.wait(timeout=10)
