"""What the in-process API tests share: the e2e tests' tiny checkpoints and assertions (re-exported from
`e2e.support`, the one place that builds them), and reading SSE streams and metrics of a TestClient."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e.support import (
    CLF_CONTEXT,
    CLF_NAME,
    LABELS,
    LM_CONTEXT,
    LM_NAME,
    NUM_EXPERTS,
    NUM_LAYERS,
    Checkpoints,
    assert_openai_error,
    build_checkpoints,
    parse_metrics,
    star_of,
)
from fastapi.testclient import TestClient

from star_serve.config import Settings

__all__ = [
    "CLF_CONTEXT",
    "CLF_NAME",
    "LABELS",
    "LM_CONTEXT",
    "LM_NAME",
    "NUM_EXPERTS",
    "NUM_LAYERS",
    "SHARED_BODY_LIMIT",
    "SHARED_SNAPSHOT_KEEP",
    "Checkpoints",
    "SettingsFactory",
    "app_settings",
    "assert_openai_error",
    "bearer",
    "build_checkpoints",
    "metric",
    "star_of",
    "stream_chunks",
]

SettingsFactory = Callable[..., Settings]  # the `settings_for` fixture

SHARED_BODY_LIMIT = 16_384  # bytes: the shared app's `max_body_bytes`
SHARED_SNAPSHOT_KEEP = 2  # the shared app's `snapshot_keep`


def app_settings(checkpoints: Checkpoints, home: Path, **overrides: Any) -> Settings:
    """Settings of an in-process app: both tiny models on the CPU, state and cache under `home`. Nothing
    comes from the environment (a developer's `STAR_*` variables would change what the tests see)."""
    values: dict[str, Any] = {
        "models": [f"{LM_NAME}={checkpoints.lm_dir}", f"{CLF_NAME}={checkpoints.clf_dir}"],
        "state_dir": home / "state",
        "cache_dir": home / "cache",
        "device": "cpu",
        "cpu_threads": torch.get_num_threads(),  # the lifespan sets torch's threads: leave them as they are
        "admin_key": None,
        "adaptation": "async",
        "adaptation_process": "off",  # the adapter on the app's own event loop, not in a child process
        "adaptation_min_tokens": 10**9,  # no GHA step: versions move only by the subspace routes
        "redis_url": None,
        **overrides,
    }
    with pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith("STAR_")]:
            env.delenv(name)
        return Settings(**values)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def stream_chunks(
    client: TestClient, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """POSTs a streamed request; checks the SSE framing (only `data:` events, one final `[DONE]`) and returns
    the chunks before `[DONE]`, parsed."""
    with client.stream("POST", path, json=body | {"stream": True}, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        events = [line for line in response.iter_lines() if line]
    assert events and all(line.startswith("data: ") for line in events), events
    payloads = [line.removeprefix("data: ") for line in events]
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1, payloads
    return [json.loads(p) for p in payloads[:-1]]


def metric(client: TestClient, name: str, **labels: str) -> float:
    """The sum of the samples of `name` on the app's /metrics whose labels include `labels` (0 if none)."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    wanted = set(labels.items())
    return sum(v for (n, ls), v in parse_metrics(response.text).items() if n == name and wanted <= ls)
