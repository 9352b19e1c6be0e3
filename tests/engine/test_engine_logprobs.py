"""Log-probabilities and the shaped sampling of the generation engine: the prompt's and the generated
tokens' log-probabilities equal a direct teacher-forced computation with the tenant's own bases; `max_tokens`
0 scores the prompt and generates nothing; logit bias, penalties, `min_tokens` and `stop_token_ids` do
exactly what their definitions say."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_support import collect, perturbed_bases, run

from star_serve.adaptation import TenantBank
from star_serve.engine import GenerationOutput, SamplingParams
from star_serve.engine.generation import GenerationEngine, SequenceRequest
from star_serve.engine.sampling import process
from star_serve.model import Routing

PROMPT = "the cat sat on a mat near the big red house"


def _generate(engine: GenerationEngine, requests: list[SequenceRequest]) -> list[list[GenerationOutput]]:
    async def go() -> list[list[GenerationOutput]]:
        streams = engine.submit(requests)
        return [await collect(s) for s in streams]

    result: list[list[GenerationOutput]] = run(go())
    return result


@torch.no_grad()
def _teacher_forced(lm: Any, ids: list[int], bases: torch.Tensor) -> torch.Tensor:
    """(len(ids) - 1, V): the log-softmax at every position but the last, the sequence alone, with `bases`."""
    logits = lm(torch.tensor([ids]), use_cache=False, routing=Routing.shared(bases)).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def test_prompt_and_generated_logprobs_equal_a_direct_computation_with_the_tenants_bases(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    bank = TenantBank(lm.trained_bases(), torch.device("cpu"), torch.float32, fold=lm.router_gates)
    own = perturbed_bases(lm, 2.0, seed=5)
    bank.publish("acme", own, version=3)
    engine = engines(lm, tokenizer, bank)
    prompt = tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, prompt_logprobs=2)
    [outputs] = _generate(engine, [SequenceRequest(prompt, params, "acme", incremental=False)])

    final = outputs[-1]
    assert final.subspace_version == 3
    scored = [entry for out in outputs for entry in (out.prompt_logprobs or [])]
    generated = [entry for out in outputs for entry in out.logprobs]
    ids = prompt + final.token_ids
    expected = _teacher_forced(lm, ids, own)
    assert [e.token for e in scored] == prompt[1:] and [e.token for e in generated] == final.token_ids
    for position, entry in enumerate([*scored, *generated]):
        row = expected[position]
        assert entry.logprob == pytest.approx(float(row[ids[position + 1]]), abs=1e-4)
        top = row.topk(len(entry.top))
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert all(len(e.top) == 2 for e in scored) and all(len(e.top) == 3 for e in generated)
    assert all(e.logprob == pytest.approx(e.top[0][1]) for e in generated)  # greedy: each is the most likely
    trained = _teacher_forced(lm, ids, lm.trained_bases())
    assert not torch.allclose(trained, expected, atol=1e-3)  # the tenant's bases do change them


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    engine = engines(lm, tokenizer)
    prompt = tokenizer.encode(PROMPT)
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=0)
    generating = SamplingParams(max_tokens=3, temperature=0.0)
    requests = [SequenceRequest(prompt, scoring, "a"), SequenceRequest(prompt, generating, "a")]
    scored, generated = _generate(engine, requests)  # one prefill batch: one scores, one generates
    assert scored[-1].finish_reason == "length" and scored[-1].token_ids == [] and scored[-1].completion_tokens == 0
    entries = [e for out in scored for e in (out.prompt_logprobs or [])]
    assert len(entries) == len(prompt) - 1 and all(e.top == () for e in entries)
    assert generated[-1].completion_tokens == 3
    assert engine.stats().running == 0  # both slots are free again


def test_process_applies_bias_penalties_and_the_minimum_length_by_their_definitions() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    params = SamplingParams(
        logit_bias=((1, 5.0),),
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        min_tokens=3,
    )
    shaped = process(logits, params, prompt=[0], generated=[3, 3], ends=(4,))
    # token 0: seen in the prompt, positive: halved; token 1: +5 bias; token 2: untouched;
    # token 3: generated twice, positive: halved, then -0.5 presence and -2 x 0.25 frequency;
    # token 4: an ending token before min_tokens: masked
    assert shaped[:4].tolist() == pytest.approx([1.0, 4.0, 0.5, 1.5 - 0.5 - 0.5])
    assert shaped[4] == -math.inf
    negative = process(torch.tensor([-1.0, 1.0]), SamplingParams(repetition_penalty=2.0), [0], [], ())
    assert negative.tolist() == [-2.0, 1.0]  # a negative logit of a seen token is multiplied
    assert process(logits, SamplingParams(min_tokens=2), [], [1, 2], (4,))[4] == -2.0  # enough tokens: free
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0]))  # the input is not changed


def test_stop_token_ids_end_a_sequence_and_min_tokens_hold_them_back(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    engine = engines(lm, tokenizer)
    prompt = tokenizer.encode(PROMPT)
    forced = tokenizer.encode(" cat")[0]
    bias = ((forced, 100.0),)  # greedy always picks it, unless masked
    stop_at_once = SamplingParams(max_tokens=8, temperature=0.0, logit_bias=bias, stop_token_ids=(forced,))
    held = SamplingParams(max_tokens=8, temperature=0.0, logit_bias=bias, stop_token_ids=(forced,), min_tokens=3)
    free = SamplingParams(max_tokens=4, temperature=0.0, logit_bias=bias)
    once, later, unstopped = _generate(
        engine, [SequenceRequest(prompt, p, "a", incremental=False) for p in (stop_at_once, held, free)]
    )
    assert once[-1].finish_reason == "stop" and once[-1].token_ids == [forced] and "".join(o.text for o in once) == ""
    assert later[-1].finish_reason == "stop" and len(later[-1].token_ids) == 4  # three others, then the stop
    assert forced not in later[-1].token_ids[:3] and later[-1].token_ids[3] == forced
    assert unstopped[-1].finish_reason == "length" and unstopped[-1].token_ids == [forced] * 4
