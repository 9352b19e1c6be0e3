"""The model-library tests run from one seed (tiny models come from the suite's `make_model`)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(1234)
