"""Sync mode: before a layer routes a batch, each unfrozen tenant's row takes one guarded GHA step on that
tenant's own real tokens of the batch, and the batch is routed with the moved row; the trained row and frozen
tenants are untouched; the worker commits a copy of the row and relabels it without overwriting it."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import torch

from star_serve.adaptation import AdaptationConfig, Adapter, CaptureConfig, Guardrails, LocalDirStore, TenantBank
from star_serve.adaptation.guardrails import guarded_layer_step
from star_serve.model import StarMoeForCausalLM, gha_statistics
from star_serve.training.presets import tiny_config

CPU = torch.device("cpu")
GUARD = Guardrails(max_step=10.0, max_distance=1.0, orthogonality_tolerance=10.0, min_entropy_ratio=0.0)


def _setup(tmp_path: Path, min_tokens: int = 1000) -> tuple[StarMoeForCausalLM, TenantBank, Adapter]:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=101, pad_token_id=0)
    model = StarMoeForCausalLM(config).eval()
    trained = model.trained_bases()
    bank = TenantBank(trained, CPU, torch.float32)
    adaptation = AdaptationConfig(
        mode="sync",
        learning_rate=0.5,
        min_tokens=min_tokens,
        capture=CaptureConfig(max_token_norm=1e9),
        guard=GUARD,
    )
    return model, bank, Adapter("lm", trained, bank, LocalDirStore(tmp_path), adaptation)


def _forward(model: StarMoeForCausalLM, bank: TenantBank, adapter: Adapter, tenants: list[str], lengths: list[int]):  # type: ignore[no-untyped-def]
    ids = torch.randint(1, 101, (len(tenants), max(lengths)), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    ids = ids.masked_fill(~mask, 0)
    view = bank.lookup(tenants, own=adapter.adapting(tenants))
    update = adapter.sync_update(view, tenants, lengths)
    with torch.inference_mode():
        out = model.model(
            input_ids=ids,
            attention_mask=mask.long(),
            routing=replace(view.routing, update=update),
            output_routing=True,
            use_cache=False,
        )
    return ids, mask, view, update, out


def test_each_tenant_steps_on_its_own_real_tokens_before_routing(tmp_path: Path) -> None:
    model, bank, adapter = _setup(tmp_path)
    trained = model.trained_bases()
    asyncio.run(adapter.configure("frozen", frozen=True, learning_rate=None))
    tenants, lengths = ["a", "b", "a", "frozen"], [5, 7, 3, 6]
    ids, mask, view, update, out = _forward(model, bank, adapter, tenants, lengths)
    assert update is not None and set(update.tenants) == {"a", "b"}

    x0 = out.router_inputs[0]  # layer 0's router inputs do not depend on any routing
    for tenant in ("a", "b"):
        mine = mask & torch.tensor([t == tenant for t in tenants])[:, None]
        tokens = x0[mine]  # real tokens of the tenant's sequences only, padding excluded
        expected = guarded_layer_step(trained[0], trained[0], gha_statistics(trained[0], tokens), 0.5, GUARD)
        assert expected.applied
        row = bank.row(tenant)
        assert row is not None and torch.allclose(row[0], expected.basis, atol=1e-5)
        assert not torch.allclose(row[0], trained[0], atol=1e-3)
    assert bank.row("frozen") is None and torch.equal(view.routing.bank[0], trained)  # type: ignore[index]

    # the batch was routed with the moved rows: a plain forward on them gives layer 0 the same logits
    again = bank.lookup(tenants)
    with torch.inference_mode():
        plain = model.model(input_ids=ids, attention_mask=mask.long(), routing=again.routing, use_cache=False)
    assert torch.allclose(plain.router_logits[0], out.router_logits[0], atol=1e-5)


def test_the_worker_commits_the_row_and_relabels_it_in_place(tmp_path: Path) -> None:
    model, bank, adapter = _setup(tmp_path, min_tokens=8)

    async def scenario() -> None:
        await adapter.ensure_loaded("a")
        tenants, lengths = ["a", "a"], [6, 4]
        _, _, view, update, _ = _forward(model, bank, adapter, tenants, lengths)
        load = torch.full((2, 4), 2.5)
        adapter.synced(update, "a", view.versions[0], 10, load)
        row = bank.row("a")
        assert row is not None
        moved = row.clone()
        await adapter.flush()
        state = adapter.tenants["a"]
        assert state.version == 1 and state.tokens_seen == 10
        stored = await adapter.store.latest("lm", "a")
        assert stored is not None and torch.equal(stored.bases, moved)

        _forward(model, bank, adapter, tenants, lengths)  # the row moves on from where it was
        assert bank.version("a") == 1
        after = bank.row("a")
        assert after is not None and not torch.equal(after, moved)

    asyncio.run(scenario())


def test_a_token_rejected_at_one_layer_stays_rejected_at_the_next(tmp_path: Path) -> None:
    """Capture's screening rule, as far as a forward that updates layer by layer can apply it: a token whose
    router input is not finite at layer 0 takes no part in layer 1's step either, and counts once as rejected."""
    model, bank, adapter = _setup(tmp_path)
    trained = model.trained_bases()
    view = bank.lookup(["a"], own=adapter.adapting(["a"]))
    update = adapter.sync_update(view, ["a"], [3])
    assert update is not None
    x0, x1 = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    x0[0, 1, 0] = float("nan")  # token 1 is broken at layer 0 only
    update(0, x0)
    update(1, x1)
    kept = x1[0, [0, 2]]
    expected = guarded_layer_step(trained[1], trained[1], gha_statistics(trained[1], kept), 0.5, GUARD)
    assert expected.applied and torch.allclose(bank.row("a")[1], expected.basis, atol=1e-5)  # type: ignore[index]
    assert (update.counts.sampled, update.counts.rejected) == (2, 1)
