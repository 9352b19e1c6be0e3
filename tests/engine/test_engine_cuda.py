"""The engine on a GPU in bfloat16 (skipped where there is no CUDA device)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_support import perturbed_bases, run

from star_serve.adaptation import TenantBank
from star_serve.engine import SamplingParams
from star_serve.engine.generation import EngineConfig, GenerationEngine, SequenceRequest
from star_serve.model import Routing

pytestmark = pytest.mark.gpu


def test_bf16_engine_on_cuda_matches_generate_and_routes_per_tenant(make_lm: Any, tokenizer: Any) -> None:
    device = torch.device("cuda")
    model = make_lm(initializer_range=0.1)
    other_bases = perturbed_bases(model, scale=0.5, seed=1)
    model = model.to(device=device, dtype=torch.bfloat16)
    bank = TenantBank(model.trained_bases(), device, torch.bfloat16, fold=model.router_gates)
    bank.publish("other", other_bases, version=1)
    engine = GenerationEngine(model, tokenizer, bank, EngineConfig(max_running=8))
    engine.start()
    try:
        prompt = tokenizer("alpha beta gamma")["input_ids"]
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

        async def alone(tenant: str) -> Any:
            [stream] = engine.submit([SequenceRequest(prompt, params, tenant)])
            return [o async for o in stream][-1]

        default, other = run(alone("default")), run(alone("other"))
        ids = torch.tensor([prompt], device=device)
        # The engine routes with the bank's folded gates; so does generate here, so that bf16 rounds alike.
        gates = model.router_gates(model.trained_bases().to(device, torch.bfloat16)[None])
        expected = model.generate(
            ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, routing=Routing(gates=gates)
        )
        expected = expected[0, len(prompt) :]
        assert default.token_ids == expected.tolist()
        assert (default.subspace_version, other.subspace_version) == (0, 1)
        assert len(other.token_ids) == 8
    finally:
        engine.stop()
