"""The continuous-batching generation engine: every sequence, whatever it was batched with and whenever it
joined, generates what it would alone; admission, cancellation, timeouts, stops and routing counts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_support import (
    StepGate,
    collect,
    final,
    greedy,
    greedy_reference,
    perturbed_bases,
    request,
    routing_reference,
    run,
    sampled_reference,
    wait_until,
)

from star_serve.adaptation import TenantBank
from star_serve.engine.generation import GenerationEngine, SequenceRequest
from star_serve.engine.types import (
    EngineDraining,
    EngineOverloaded,
    GenerationOutput,
    RequestTooLong,
    SamplingParams,
    StepStats,
)
from star_serve.model import Routing

PROMPTS = [
    "the cat sat",
    "a big red house on the hill",
    "dog",
    "blue river ran fast",
    "small tree",
    "the green stone sat on a mat by the river",
]
CPU = torch.device("cpu")


def streamed_text(outputs: list[GenerationOutput]) -> str:
    return "".join(o.text for o in outputs)


def test_greedy_batch_equals_each_prompt_alone_and_generate(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    gate = StepGate(closed=False)
    engine = engines(lm, tokenizer, gate=gate, max_running=8)
    steps = 12

    async def body() -> list[list[GenerationOutput]]:
        streams = engine.submit([request(tokenizer, p, greedy(steps)) for p in PROMPTS])
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    results = run(body())
    widest = max(len(tokenizer.encode(p)) for p in PROMPTS)
    assert gate.steps[0] == StepStats("prefill", len(PROMPTS), len(PROMPTS) * widest)  # one batched prefill
    assert StepStats("decode", len(PROMPTS), len(PROMPTS)) in gate.steps  # and batched decodes
    for prompt, outputs in zip(PROMPTS, results, strict=True):
        ids = tokenizer.encode(prompt)
        last = final(outputs)
        expected = greedy_reference(lm, ids, steps)
        assert last.token_ids == expected
        with torch.no_grad():
            generated = lm.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=steps, min_new_tokens=steps)
        assert generated[0, len(ids) :].tolist() == expected
        assert (last.finish_reason, last.completion_tokens, last.prompt_tokens) == ("length", steps, len(ids))
        assert last.subspace_version == 0 and last.routing is None
        assert last.queue_seconds is not None and last.queue_seconds >= 0
        assert streamed_text(outputs) == tokenizer.decode(expected, skip_special_tokens=True)
    assert engine.stats().running == 0 and engine.stats().waiting == 0


def test_staggered_submissions_join_the_running_batch(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    gate = StepGate()
    engine = engines(lm, tokenizer, gate=gate, max_running=8)
    first, later = PROMPTS[:3], PROMPTS[3:]
    lengths = {p: 8 + i for i, p in enumerate(PROMPTS)}  # different lengths: sequences leave at different steps

    async def body() -> list[list[GenerationOutput]]:
        streams = engine.submit([request(tokenizer, p, greedy(lengths[p])) for p in first])
        gate.release(4)  # the first group's prefill and 3 decodes; the engine then holds in its 5th forward
        await wait_until(lambda: len(gate.steps) == 5)
        assert engine.stats().running == 3
        # Consume a little of the first group while it is held mid-generation.
        partial = [await asyncio.wait_for(anext(aiter(s)), 5) for s in streams[:1]]
        assert partial[0].finish_reason is None
        streams += engine.submit([request(tokenizer, p, greedy(lengths[p])) for p in later])
        gate.open()
        rest = await asyncio.gather(*(collect(s) for s in streams))
        return [partial + rest[0], *rest[1:]]

    results = run(body())
    phases = [(s.phase, s.batch_size) for s in gate.steps]
    assert phases[:5] == [("prefill", 3), ("decode", 3), ("decode", 3), ("decode", 3), ("decode", 3)]
    assert ("prefill", 3) in phases[5:] and ("decode", 6) in phases  # the newcomers joined the running three
    for prompt, outputs in zip(PROMPTS, results, strict=True):
        last = final(outputs)
        assert last.token_ids == greedy_reference(lm, tokenizer.encode(prompt), lengths[prompt])
        assert (last.finish_reason, last.completion_tokens) == ("length", lengths[prompt])
        assert streamed_text(outputs) == tokenizer.decode(last.token_ids, skip_special_tokens=True)


def test_mixed_tenants_each_route_with_their_own_bases(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    bank = TenantBank(lm.trained_bases(), CPU, torch.float32, fold=lm.router_gates)
    bases = {"a": perturbed_bases(lm, 2.0, seed=1), "b": perturbed_bases(lm, 2.0, seed=2)}
    bank.publish("a", bases["a"], version=3)
    bank.publish("b", bases["b"], version=5)
    versions = {"a": 3, "b": 5, "c": 0}  # "c" never published: the trained bases
    engine = engines(lm, tokenizer, bank=bank, max_running=8)
    tenants = ["a", "b", "c", "b", "a", "c"]
    steps = 10

    async def body() -> list[list[GenerationOutput]]:
        streams = engine.submit(
            [request(tokenizer, p, greedy(steps), t) for p, t in zip(PROMPTS, tenants, strict=True)]
        )
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    results = run(body())
    differs = 0
    for prompt, tenant, outputs in zip(PROMPTS, tenants, results, strict=True):
        ids = tokenizer.encode(prompt)
        last = final(outputs)
        expected = greedy_reference(lm, ids, steps, bases.get(tenant))
        assert last.token_ids == expected, f"tenant {tenant}"
        assert last.subspace_version == versions[tenant]
        differs += expected != greedy_reference(lm, ids, steps)
    assert differs >= 2, "the tenants' bases should change some greedy continuations"


def test_generate_forwards_the_router_bank(lm: Any, tokenizer: Any) -> None:
    """The references agree: HF `generate` passes `routing` through to every forward."""
    ids = tokenizer.encode(PROMPTS[1])
    bases = perturbed_bases(lm, 2.0, seed=1)
    expected = greedy_reference(lm, ids, 10, bases)
    assert expected != greedy_reference(lm, ids, 10)
    with torch.no_grad():
        out = lm.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=10,
            min_new_tokens=10,
            routing=Routing.shared(bases),
        )
    assert out[0, len(ids) :].tolist() == expected


def test_seeded_sampling_reproduces_alone_and_choices_differ(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    engine = engines(lm, tokenizer, max_running=8)
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
    prompt = PROMPTS[0]

    async def body() -> list[list[GenerationOutput]]:
        streams = engine.submit(
            [
                request(tokenizer, prompt, params),
                request(tokenizer, PROMPTS[1], greedy(6)),
                request(tokenizer, prompt, params, choice=1),
                request(tokenizer, prompt, params),
            ]
        )
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    zero, other, one, again = (final(r).token_ids for r in run(body()))
    ids = tokenizer.encode(prompt)
    assert zero == again == sampled_reference(lm, ids, params, choice=0)
    assert one == sampled_reference(lm, ids, params, choice=1)
    assert one != zero
    assert other == greedy_reference(lm, tokenizer.encode(PROMPTS[1]), 6)


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_max_tokens_finishes_with_length_and_exactly_that_many_tokens(
    max_tokens: int, lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    engine = engines(lm, tokenizer)

    async def body() -> list[GenerationOutput]:
        (stream,) = engine.submit([request(tokenizer, PROMPTS[3], greedy(max_tokens))])
        return await collect(stream)

    last = final(run(body()))
    assert (last.finish_reason, last.completion_tokens, len(last.token_ids)) == ("length", max_tokens, max_tokens)


def test_the_whole_context_can_be_used_and_no_more(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    engine = engines(lm, tokenizer)
    context = lm.config.max_position_embeddings
    ids = tokenizer.encode(PROMPTS[5])
    fits = context - len(ids)

    async def body() -> list[GenerationOutput]:
        with pytest.raises(RequestTooLong):
            engine.submit([SequenceRequest(ids, greedy(fits + 1), "t")])
        with pytest.raises(RequestTooLong):  # all or nothing: the valid first request is not queued either
            engine.submit([SequenceRequest(ids, greedy(2), "t"), SequenceRequest(ids, greedy(fits + 1), "t")])
        with pytest.raises(RequestTooLong):
            engine.submit([SequenceRequest([], greedy(2), "t")])
        assert engine.stats().waiting == 0
        (stream,) = engine.submit([SequenceRequest(ids, greedy(fits), "t")])
        return await collect(stream)

    last = final(run(body()))
    assert (last.finish_reason, last.completion_tokens) == ("length", fits)
    assert last.token_ids == greedy_reference(lm, ids, fits)


def _stop_candidate(model: Any, tokenizer: Any) -> tuple[list[int], list[int], int, str]:
    """A prompt, its greedy continuation and an index j such that the text of tokens j, j+1 is a clean ASCII stop
    string that first appears there."""
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        generated = greedy_reference(model, ids, 30)
        for j in range(2, len(generated) - 2):
            stop = tokenizer.decode(generated[j : j + 2])
            head, full = tokenizer.decode(generated[:j]), tokenizer.decode(generated[: j + 2])
            clean = stop.isascii() and stop.isprintable() and len(stop) >= 2 and "\ufffd" not in full
            if clean and full.find(stop) == len(head):
                return ids, generated, j, stop
    raise AssertionError("no usable stop string in the reference continuations")


def test_stop_strings_cut_the_text_and_finish_with_stop(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    engine = engines(lm, tokenizer)
    ids, expected, j, stop = _stop_candidate(lm, tokenizer)

    async def body() -> list[list[GenerationOutput]]:
        streams = engine.submit(
            [
                SequenceRequest(ids, greedy(30, stop=(stop,)), "t"),
                SequenceRequest(ids, greedy(30, stop=("never seen", stop)), "t"),
                SequenceRequest(ids, greedy(j + 1, stop=(stop,)), "t"),  # ends one token before the stop
            ]
        )
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    whole, second, short = run(body())
    last = final(whole)
    assert last.finish_reason == "stop"
    assert last.token_ids == expected[: j + 2]  # generation ends at the token that completed the stop string
    assert streamed_text(whole) == tokenizer.decode(expected[:j])
    assert all(stop not in o.text for o in whole)
    assert (final(second).finish_reason, final(second).token_ids) == ("stop", expected[: j + 2])
    assert streamed_text(second) == streamed_text(whole)
    # Ending by length with only a prefix of the stop string: the held-back prefix is released.
    assert (final(short).finish_reason, final(short).token_ids) == ("length", expected[: j + 1])
    assert streamed_text(short) == tokenizer.decode(expected[: j + 1])


def test_ignore_eos_keeps_generating_past_the_end_of_text(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    """A random tiny LM rarely emits the real EOS, so the engine's tokenizer calls a token it does emit EOS."""
    ids = tokenizer.encode(PROMPTS[1])
    expected = greedy_reference(lm, ids, 12)
    at = next(i for i in range(2, 12) if expected[i] not in expected[:i])  # the first new token after two
    eos = expected[at]

    class EosTokenizer:
        pad_token_id, eos_token_id = tokenizer.pad_token_id, eos

        def decode(self, ids: list[int], **kwargs: Any) -> str:
            return tokenizer.decode(ids, **kwargs)

    engine = engines(lm, EosTokenizer())

    async def body() -> list[list[GenerationOutput]]:
        streams = engine.submit(
            [
                SequenceRequest(ids, SamplingParams(max_tokens=12, temperature=0.0), "t"),
                SequenceRequest(ids, greedy(12), "t"),
            ]
        )
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    stopped, ignored = run(body())
    assert final(stopped).finish_reason == "stop"
    assert final(stopped).token_ids == expected[: at + 1]  # the EOS token is reported, its text is not
    assert streamed_text(stopped) == tokenizer.decode(expected[:at])
    assert (final(ignored).finish_reason, final(ignored).token_ids) == ("length", expected)


def test_submit_beyond_free_slots_plus_queue_is_refused_whole(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    gate = StepGate(closed=False)
    engine = engines(lm, tokenizer, start=False, gate=gate, max_running=2, max_waiting=3)
    reqs = [request(tokenizer, p, greedy(3)) for p in PROMPTS]

    async def body() -> list[list[GenerationOutput]]:
        with pytest.raises(RequestTooLong):
            engine.submit(reqs)  # 6 > 2 slots + 3 waiting: could never be admitted together, so no retrying
        assert engine.stats().waiting == 0
        streams = engine.submit(reqs[:4])
        streams += engine.submit(reqs[4:5])  # exactly full
        with pytest.raises(EngineOverloaded) as refused:
            engine.submit(reqs[5:])
        assert refused.value.retry_after > 0
        assert engine.stats().waiting == 5
        engine.start()
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    results = run(body())
    assert [final(r).finish_reason for r in results] == ["length"] * 5
    prefilled = sum(s.batch_size for s in gate.steps if s.phase == "prefill")
    assert prefilled == 5  # the refused submissions left nothing behind
    assert max(s.batch_size for s in gate.steps) <= 2


def test_draining_refuses_new_requests(lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]) -> None:
    engine = engines(lm, tokenizer)

    async def body() -> None:
        engine.draining = True
        with pytest.raises(EngineDraining):
            engine.submit([request(tokenizer, PROMPTS[0], greedy(3))])
        assert engine.stats().waiting == 0
        engine.draining = False
        (stream,) = engine.submit([request(tokenizer, PROMPTS[0], greedy(3))])
        assert final(await collect(stream)).finish_reason == "length"

    run(body())


def test_cancelling_a_running_stream_frees_its_slot(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    gate = StepGate()
    engine = engines(lm, tokenizer, gate=gate, max_running=1)
    ids = tokenizer.encode(PROMPTS[0])

    async def body() -> tuple[list[GenerationOutput], list[GenerationOutput]]:
        (stream,) = engine.submit([SequenceRequest(ids, greedy(40), "t")])
        gate.release(3)  # prefill and two decodes; the engine holds in its 4th forward
        await wait_until(lambda: len(gate.steps) == 4)
        assert engine.stats().running == 1
        stream.cancel()
        gate.open()
        cancelled = await collect(stream)
        await wait_until(lambda: engine.stats().running == 0)
        (later,) = engine.submit([SequenceRequest(ids, greedy(5), "t")])  # the only slot is free again
        return cancelled, await collect(later)

    cancelled, later = run(body())
    expected = greedy_reference(lm, ids, 5)
    last = final(cancelled)
    assert last.finish_reason == "cancelled"
    assert last.token_ids == expected[:4]  # the held forward completed; nothing ran after the cancel
    assert (final(later).finish_reason, final(later).token_ids) == ("length", expected)


def test_cancelling_a_waiting_stream_ends_it(lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]) -> None:
    """A sequence cancelled before it got a slot must still end with a final "cancelled" output."""
    gate = StepGate()
    engine = engines(lm, tokenizer, gate=gate, max_running=1)
    ids = tokenizer.encode(PROMPTS[0])

    async def body() -> tuple[list[GenerationOutput], list[GenerationOutput]]:
        (running,) = engine.submit([SequenceRequest(ids, greedy(4), "t")])
        await wait_until(lambda: len(gate.steps) == 1)  # held in the first one's prefill
        (waiting,) = engine.submit([SequenceRequest(ids, greedy(4), "t")])
        assert engine.stats().waiting == 1
        waiting.cancel()
        gate.open()
        first = await collect(running)
        await wait_until(lambda: engine.stats().waiting == 0 and engine.stats().running == 0)
        return first, await collect(waiting, timeout=2.0)

    first, cancelled = run(body())
    assert final(first).finish_reason == "length"
    assert (final(cancelled).finish_reason, final(cancelled).token_ids) == ("cancelled", [])


def test_stopping_the_engine_cancels_running_and_waiting_sequences(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    gate = StepGate()
    engine = engines(lm, tokenizer, gate=gate, max_running=1)
    ids = tokenizer.encode(PROMPTS[0])

    async def body() -> tuple[list[GenerationOutput], list[GenerationOutput]]:
        (running,) = engine.submit([SequenceRequest(ids, greedy(20), "t")])
        await wait_until(lambda: len(gate.steps) == 1)
        (waiting,) = engine.submit([SequenceRequest(ids, greedy(20), "t")])
        stopper = asyncio.create_task(asyncio.to_thread(engine.stop))
        await wait_until(lambda: engine._stopping)  # stop() has been called and is joining the thread
        gate.open()
        await asyncio.wait_for(stopper, 15)
        assert not engine.alive
        with pytest.raises(EngineDraining):
            engine.submit([SequenceRequest(ids, greedy(2), "t")])
        return await collect(running), await collect(waiting)

    running, waiting = run(body())
    assert (final(running).finish_reason, final(running).completion_tokens) == ("cancelled", 1)
    assert (final(waiting).finish_reason, final(waiting).completion_tokens) == ("cancelled", 0)


def test_a_tiny_request_timeout_finishes_with_timeout(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    engine = engines(lm, tokenizer, request_timeout=1e-6)

    async def body() -> list[GenerationOutput]:
        (stream,) = engine.submit([request(tokenizer, PROMPTS[0], greedy(20))])
        return await collect(stream)

    last = final(run(body()))
    assert last.finish_reason == "timeout"
    assert last.completion_tokens < 20


@pytest.mark.parametrize("top_k", [1, 2])
def test_routing_counts_every_token_that_went_through_the_model(
    top_k: int, make_lm: Callable[..., Any], tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    model = make_lm(num_experts_per_tok=top_k)
    bank = TenantBank(model.trained_bases(), CPU, torch.float32, fold=model.router_gates)
    bases = perturbed_bases(model, 2.0, seed=4)
    bank.publish("own", bases, version=1)
    engine = engines(model, tokenizer, bank=bank)
    plan = [
        (PROMPTS[0], 7, "t", True),
        (PROMPTS[1], 3, "own", True),
        (PROMPTS[2], 5, "t", False),
        (PROMPTS[3], 1, "t", True),
    ]

    async def body() -> list[list[GenerationOutput]]:
        streams = engine.submit([request(tokenizer, p, greedy(n), t, return_routing=r) for p, n, t, r in plan])
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    for (prompt, n, tenant, wanted), outputs in zip(plan, run(body()), strict=True):
        last = final(outputs)
        if not wanted:
            assert last.routing is None
            continue
        ids = tokenizer.encode(prompt)
        assert last.routing is not None and len(last.routing) == model.config.num_hidden_layers
        # The prompt and every generated token but the last went through the model.
        processed = len(ids) + n - 1
        assert [sum(row) for row in last.routing] == [processed * top_k] * model.config.num_hidden_layers
        fed = ids + last.token_ids[:-1]
        assert last.routing == routing_reference(model, fed, bases if tenant == "own" else None)


def test_non_incremental_requests_get_all_their_text_at_the_end(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    engine = engines(lm, tokenizer)
    ids = tokenizer.encode(PROMPTS[1])

    async def body() -> list[list[GenerationOutput]]:
        streams = engine.submit(
            [SequenceRequest(ids, greedy(9), "t", incremental=False), SequenceRequest(ids, greedy(9), "t")]
        )
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    whole, streamed = run(body())
    expected = greedy_reference(lm, ids, 9)
    text = tokenizer.decode(expected, skip_special_tokens=True)
    assert text and len(streamed) > 2  # the streaming twin got its text in several pieces
    assert len(whole) == 2 and whole[0].text == text and whole[0].finish_reason is None
    assert (final(whole).finish_reason, final(whole).token_ids, final(whole).text) == ("length", expected, "")
    assert streamed_text(streamed) == text
    last = final(whole)
    assert last.queue_seconds is not None and last.first_token_seconds is not None
    assert 0 <= last.queue_seconds <= last.first_token_seconds


def test_a_failed_step_ends_its_sequences_with_error_and_the_engine_survives(
    lm: Any, tokenizer: Any, engines: Callable[..., GenerationEngine]
) -> None:
    """The "error" finish of a failed step must reach the caller without waiting for some later step."""
    failures = [RuntimeError("injected failure")]

    def on_step(stats: StepStats) -> None:
        if failures:
            raise failures.pop()

    engine = engines(lm, tokenizer)
    engine.on_step = on_step
    ids = tokenizer.encode(PROMPTS[0])

    async def body() -> tuple[list[GenerationOutput], list[GenerationOutput]]:
        (failed,) = engine.submit([SequenceRequest(ids, greedy(5), "t")])
        await wait_until(lambda: not failures and engine.stats().running == 0 and engine.stats().waiting == 0)
        failed_outputs = await collect(failed, timeout=2.0)  # the engine is idle: nothing else will flush it
        (later,) = engine.submit([SequenceRequest(ids, greedy(5), "t")])
        return failed_outputs, await collect(later)

    failed, later = run(body())
    assert final(failed).finish_reason == "error"
    assert engine.alive
    assert (final(later).finish_reason, final(later).token_ids) == ("length", greedy_reference(lm, ids, 5))
