"""The live loss through the app: a tenant's measured loss in GET /v1/subspace and /metrics, and a tenant whose
committed version serves it worse than the trained bases on its own traffic rolled back to them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from star_serve.adaptation import LocalDirStore, Snapshot
from star_serve.api.app import create_app
from star_serve.model import Routing, StarMoeForCausalLM

from .support import LM_NAME, Checkpoints, SettingsFactory, metric

PROMPTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine", "all that glitters"]


@torch.no_grad()
def _loss(model: StarMoeForCausalLM, tokenizer: object, bases: torch.Tensor) -> float:
    """Mean next-token loss of PROMPTS, each alone, routed with `bases` (L, E, D)."""
    total, tokens = 0.0, 0
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])  # type: ignore[attr-defined]
        logits = model(ids, routing=Routing.shared(bases)).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        tokens += ids.shape[1] - 1
    return total / tokens


def _routing_sensitive(checkpoints: Checkpoints, directory: Path) -> tuple[Path, torch.Tensor]:
    """The tiny LM with its experts scaled up, so that routing weighs on its loss, saved to `directory`; and,
    of a few perturbations of its trained bases, the one that serves PROMPTS worst (well past the margin)."""
    model = StarMoeForCausalLM.from_pretrained(checkpoints.lm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoints.lm_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.mul_(8.0)
            layer.mlp.experts.down_proj.mul_(8.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    trained = model.trained_bases()
    candidates = []
    for seed in range(6):
        noise = torch.randn(trained.shape, generator=torch.Generator().manual_seed(seed))
        bases = trained + 4.0 * noise
        candidates.append(bases / bases.norm(dim=-1, keepdim=True))
    worst = max(candidates, key=lambda bases: _loss(model, tokenizer, bases))
    assert _loss(model, tokenizer, worst) > _loss(model, tokenizer, trained) + 0.05
    return directory, worst


def _complete(client: TestClient, tenant: str) -> None:
    for prompt in PROMPTS:
        body = {"model": LM_NAME, "prompt": prompt, "max_tokens": 1}
        response = client.post("/v1/completions", json=body, headers={"X-Tenant": tenant})
        assert response.status_code == 200, response.text


def test_a_version_that_serves_worse_than_the_trained_bases_is_rolled_back(
    settings_for: SettingsFactory, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    directory, worse = _routing_sensitive(checkpoints, tmp_path / "lm")
    settings = settings_for(
        models=[f"{LM_NAME}={directory}"],
        adaptation_loss_sample_rate=1.0,
        adaptation_loss_shadow_rate=1.0,
        adaptation_loss_window=8,
    )
    store = LocalDirStore(settings.resolved_state_dir / "snapshots")  # where the app keeps its snapshots
    assert asyncio.run(store.commit(Snapshot(LM_NAME, "bad", 1, worse), expected=0))
    with TestClient(create_app(settings)) as client:
        _complete(client, "fine")
        fine = client.get("/v1/subspace", headers={"X-Tenant": "fine"}).json()
        assert fine["version"] == 0 and fine["live"]["since_version"] == 0 and fine["live"]["tokens"] > 0
        assert fine["live"]["served"] == fine["live"]["trained_paired"]  # served by the trained bases

        _complete(client, "bad")
        deadline = time.monotonic() + 30
        while client.get("/v1/subspace", headers={"X-Tenant": "bad"}).json()["version"] == 1:
            assert time.monotonic() < deadline, "the degraded version was not rolled back"
            _complete(client, "bad")
        bad = client.get("/v1/subspace", headers={"X-Tenant": "bad"}).json()
        assert bad["version"] == 2 and bad["drift"] == [0.0] * len(bad["drift"])  # the trained bases again
        assert metric(client, "star_adaptation_live_rollbacks_total", model=LM_NAME) == 1
        assert metric(client, "star_tenant_live_tokens", model=LM_NAME, tenant="fine", kind="measured") > 0

        _complete(client, "bad")  # measured again, from the restored version on
        again = client.get("/v1/subspace", headers={"X-Tenant": "bad"}).json()["live"]
        assert again["since_version"] == 2 and not again["degraded"]
        # the restored version holds the trained bases (folded into gates, so equal to rounding only)
        assert again["served_paired"] == pytest.approx(again["trained_paired"], abs=1e-5)
        assert metric(client, "star_adaptation_live_rollbacks_total", model=LM_NAME) == 1
