"""Per-tenant adaptation through the real server: traffic commits versions (async, sync and shadow modes),
tenants stay isolated, settings and state survive a kill -9, and reset and rollback restore exact bytes."""

from __future__ import annotations

import asyncio
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from star_serve.adaptation.store import LocalDirStore

from .support import LM_NAME, Launcher, Server, wait_until

PROMPT = "the quick brown fox jumps over the lazy dog and then the"
# The pipeline's mechanics, every step committed; the quality gate has a test of its own below.
ENV = {
    "STAR_ADAPTATION": "async",
    "STAR_ADAPTATION_QUALITY_GATE": "false",
    "STAR_ADAPTATION_MIN_TOKENS": "16",
    "STAR_ADAPTATION_LEARNING_RATE": "0.2",
}


def _complete(server: Server, tenant: str, max_tokens: int = 8) -> dict:
    body = {"model": LM_NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    response = server.http.post("/v1/completions", json=body, headers={"X-Tenant": tenant})
    assert response.status_code == 200, response.text
    return response.json()


def _subspace(server: Server, tenant: str) -> dict:
    response = server.http.get("/v1/subspace", params={"model": LM_NAME}, headers={"X-Tenant": tenant})
    assert response.status_code == 200, response.text
    return response.json()


def _adapt(server: Server, tenant: str, versions: int) -> None:
    def committed() -> bool:
        _complete(server, tenant)
        return _subspace(server, tenant)["version"] >= versions

    wait_until(committed, timeout=60, what=f"{tenant} reaching version {versions}")


def _adaptation_processes(server: Server) -> list[int]:
    """The server's child processes that run its adaptation (spawned by multiprocessing)."""
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _alive(pid: int) -> bool:
    try:  # a zombie has died: only its exit status waits to be collected
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _stored(server: Server, tenant: str, version: int) -> torch.Tensor:
    snapshot = asyncio.run(LocalDirStore(server.state_dir / "snapshots").load(LM_NAME, tenant, version))
    assert snapshot is not None
    return snapshot.bases


@pytest.mark.parametrize("where", ["on", "off"])  # in the adaptation process (the CPU default), in this one
def test_traffic_commits_versions_for_its_tenant_only(launch: Launcher, where: str) -> None:
    server = launch(env={**ENV, "STAR_ADAPTATION_PROCESS": where})
    assert len(_adaptation_processes(server)) == (2 if where == "on" else 0)  # one per model: the LM, the classifier
    frozen = {"frozen": True}  # the bystander's own requests must not adapt it either
    server.http.patch("/v1/subspace", params={"model": LM_NAME}, json=frozen, headers={"X-Tenant": "bystander"})
    untouched_before = _complete(server, "bystander")
    _adapt(server, "busy", versions=3)

    busy = _subspace(server, "busy")
    assert busy["tokens_seen"] >= 3 * 16
    assert all(d > 0 for d in busy["drift"])
    assert _complete(server, "busy")["star"]["subspace_version"] >= 3

    bystander = _subspace(server, "bystander")
    assert bystander["version"] == 0 and max(bystander["drift"]) < 1e-6
    assert _complete(server, "bystander")["choices"] == untouched_before["choices"]
    assert not list((server.state_dir / "snapshots" / LM_NAME / "bystander").glob("*.safetensors"))


def test_shadow_mode_versions_a_tenant_but_serves_the_trained_bases(launch: Launcher) -> None:
    server = launch(env={**ENV, "STAR_ADAPTATION": "shadow"})
    first = _complete(server, "shadowed")
    _adapt(server, "shadowed", versions=2)
    shadowed = _subspace(server, "shadowed")
    assert shadowed["tokens_seen"] >= 2 * 16 and all(d > 0 for d in shadowed["drift"])
    assert torch.isfinite(_stored(server, "shadowed", shadowed["version"])).all()
    again = _complete(server, "shadowed")
    assert again["star"]["subspace_version"] == 0  # what served it: the trained bases
    assert again["choices"] == first["choices"]


def test_the_quality_gate_judges_a_tenant_candidates_on_its_held_back_prompts(launch: Launcher) -> None:
    server = launch(env={**ENV, "STAR_ADAPTATION_QUALITY_GATE": "true"})  # the default
    words = PROMPT.split()
    sent = 0

    def judged() -> bool:
        nonlocal sent
        prompt = " ".join(words[(sent + i) % len(words)] for i in range(300))  # a different text each time
        body = {"model": LM_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0}
        assert server.http.post("/v1/completions", json=body, headers={"X-Tenant": "judged"}).status_code == 200
        sent += 1
        return _subspace(server, "judged").get("quality") is not None

    wait_until(judged, timeout=90, what="a verdict of the quality gate")
    state = _subspace(server, "judged")
    verdict = state["quality"]
    assert verdict["held_back_tokens"] >= 256  # QualityConfig.min_sample_tokens
    scores = [verdict[k] for k in ("candidate", "current", "trained")]
    assert all(isinstance(x, float) and math.isfinite(x) for x in scores)
    best = min(verdict["current"], verdict["trained"])  # STAR_ADAPTATION_MAX_LOSS_INCREASE is 0
    assert verdict["accepted"] == (verdict["candidate"] <= best + 1e-9)
    if not verdict["accepted"]:
        assert verdict["reason"]
    applied = server.metric("star_adaptation_batches_total", outcome="applied")
    refused = server.metric("star_adaptation_batches_total", outcome="refused_quality")
    assert applied + refused >= 1
    assert (state["version"] >= 1) == (applied >= 1)


def test_a_first_seen_tenant_while_the_adaptation_process_restarts_gets_200_or_503(launch: Launcher) -> None:
    server = launch(env=ENV)
    for pid in _adaptation_processes(server):
        os.kill(pid, signal.SIGKILL)
    body = {"model": LM_NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    answers = [
        server.http.post("/v1/completions", json=body, headers={"X-Tenant": "newcomer"}),
        server.http.get("/v1/subspace", params={"model": LM_NAME}, headers={"X-Tenant": "newcomer-2"}),
    ]
    for answer in answers:
        assert answer.status_code in (200, 503), answer.text  # never a 500
        if answer.status_code == 503:
            assert answer.headers["retry-after"] and answer.json()["error"]["type"] == "unavailable_error"
    assert answers[0].status_code == 200  # serving goes on with the bases committed so far
    wait_until(lambda: sum(map(_alive, _adaptation_processes(server))) == 2, 60, "the adaptation processes replaced")

    def answering() -> bool:
        params, headers = {"model": LM_NAME}, {"X-Tenant": "newcomer-2"}
        return server.http.get("/v1/subspace", params=params, headers=headers).status_code == 200

    wait_until(answering, 60, "the new adaptation process answering")


def test_sync_mode_moves_the_tenants_row_with_its_own_batches(launch: Launcher) -> None:
    server = launch(env={**ENV, "STAR_ADAPTATION": "sync"})
    frozen = {"frozen": True}  # in sync mode too, its own requests would move its own row
    server.http.patch("/v1/subspace", params={"model": LM_NAME}, json=frozen, headers={"X-Tenant": "bystander"})
    before = _complete(server, "bystander")
    served = []

    def committed() -> bool:
        served.append(_complete(server, "busy")["star"]["subspace_version"])
        return _subspace(server, "busy")["version"] >= 2

    wait_until(committed, timeout=60, what="busy reaching version 2 in sync mode")
    assert served == sorted(served)
    busy = _subspace(server, "busy")
    assert all(d > 0 for d in busy["drift"]) and busy["tokens_seen"] >= 2 * 16
    stored = _stored(server, "busy", busy["version"])
    assert torch.isfinite(stored).all()
    assert _subspace(server, "bystander")["version"] == 0
    assert _complete(server, "bystander")["choices"] == before["choices"]


def test_settings_survive_a_restart(launch: Launcher) -> None:
    server = launch(env=ENV)
    patch = {"frozen": True, "learning_rate": 0.125}
    response = server.http.patch("/v1/subspace", params={"model": LM_NAME}, json=patch, headers={"X-Tenant": "t"})
    assert response.status_code == 200, response.text
    server.kill()
    again = launch(env=ENV, state_dir=server.state_dir)
    state = _subspace(again, "t")
    assert state["frozen"] is True and state["learning_rate"] == 0.125
    _complete(again, "t", max_tokens=32)
    assert _subspace(again, "t")["version"] == 0  # still frozen: its traffic adapts nothing


def test_versions_survive_kill_9(launch: Launcher) -> None:
    server = launch(env=ENV)
    _adapt(server, "durable", versions=2)
    version = _subspace(server, "durable")["version"]
    stored = _stored(server, "durable", version)
    adaptations = _adaptation_processes(server)
    assert adaptations
    server.kill()
    wait_until(lambda: not any(map(_alive, adaptations)), 10, "the adaptation processes to die with the server")

    restarted = launch(env=ENV, state_dir=server.state_dir)
    assert _subspace(restarted, "durable")["version"] == version
    assert _complete(restarted, "durable")["star"]["subspace_version"] == version
    assert torch.equal(_stored(restarted, "durable", version), stored)


def test_rollback_and_reset_restore_exact_bytes(launch: Launcher) -> None:
    server = launch(env=ENV)
    _adapt(server, "undo", versions=2)
    headers = {"X-Tenant": "undo"}
    frozen = server.http.patch("/v1/subspace", params={"model": LM_NAME}, json={"frozen": True}, headers=headers)
    assert frozen.status_code == 200 and frozen.json()["frozen"] is True

    rolled = server.http.post("/v1/subspace/rollback", params={"model": LM_NAME}, json={"version": 1}, headers=headers)
    assert rolled.status_code == 200
    assert torch.equal(_stored(server, "undo", rolled.json()["version"]), _stored(server, "undo", 1))

    reset = server.http.post("/v1/subspace/reset", params={"model": LM_NAME}, headers=headers)
    assert reset.status_code == 200
    assert max(reset.json()["drift"]) < 1e-6
    missing = server.http.post(
        "/v1/subspace/rollback", params={"model": LM_NAME}, json={"version": 99}, headers=headers
    )
    assert missing.status_code == 404
    several = server.http.get("/v1/subspace", headers=headers)  # two models served: the model must be named
    assert several.status_code == 400
