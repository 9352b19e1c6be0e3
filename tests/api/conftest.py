"""In-process API fixtures: the real app of `create_app(Settings(...))` under FastAPI's `TestClient`, its
lifespan run by the client's context manager, with the real engines on the tiny checkpoints that the e2e
tests use (`e2e.support.build_checkpoints`: random weights, a tokenizer trained in the session, nothing
downloaded). No server process and no network: these tests are part of `make test-fast`.

The shared app (`client`) serves both tiny models with auth off and adaptation on (`async`, in this process,
snapshots in a local directory); a GHA step needs more tokens than the tests ever send, so a tenant's
version moves only by the subspace routes and every answer is generated from the trained bases.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from star_serve.api.app import create_app
from star_serve.config import Settings

from .support import (
    SHARED_BODY_LIMIT,
    SHARED_SNAPSHOT_KEEP,
    Checkpoints,
    SettingsFactory,
    app_settings,
    build_checkpoints,
)


@pytest.fixture(scope="package")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return build_checkpoints(tmp_path_factory.mktemp("api-checkpoints"))


@pytest.fixture
def settings_for(checkpoints: Checkpoints, tmp_path: Path) -> SettingsFactory:
    """`settings_for(**overrides)`: the settings of a fresh app with its own state dir (the test's tmp_path)."""

    def build(**overrides: Any) -> Settings:
        return app_settings(checkpoints, tmp_path, **overrides)

    return build


@pytest.fixture(scope="package")
def client(checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The shared app, started once for the package: both models, auth off, adaptation on."""
    settings = app_settings(
        checkpoints,
        tmp_path_factory.mktemp("api-shared"),
        max_body_bytes=SHARED_BODY_LIMIT,
        snapshot_keep=SHARED_SNAPSHOT_KEEP,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client
