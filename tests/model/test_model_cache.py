"""Incremental decoding with the KV cache equals recomputing the whole sequence; padding and generate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

ATOL = 1e-4


@pytest.mark.parametrize(("router_type", "top_k"), [("star", 1), ("star", 2), ("linear", 1)])
def test_incremental_decoding_matches_full_forward(
    router_type: str, top_k: int, make_model: Callable[..., Any]
) -> None:
    model = make_model(router_type=router_type, num_experts_per_tok=top_k)
    ids = torch.randint(1, 101, (2, 12))
    prefix = 5
    with torch.no_grad():
        full = model(ids).logits  # (B, S, V)
        out = model(ids[:, :prefix], use_cache=True)
        assert out.cache is not None
        assert out.cache.get_seq_length() == prefix
        torch.testing.assert_close(out.logits, full[:, :prefix], rtol=0, atol=ATOL)
        cache = out.cache
        for t in range(prefix, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            assert out.logits.shape == (2, 1, 101)
            torch.testing.assert_close(out.logits[:, -1], full[:, t], rtol=0, atol=ATOL)
            cache = out.cache
        assert cache.get_seq_length() == ids.shape[1]
        # The cache matters: decoding the last token without it gives other logits.
        assert (model(ids[:, -1:]).logits[:, -1] - full[:, -1]).abs().max() > 1e-3


def test_past_key_values_is_still_accepted_as_the_cache(make_model: Callable[..., Any]) -> None:
    """Callers written for transformers before 5.24 pass the cache as `past_key_values`."""
    model = make_model()
    ids = torch.randint(1, 101, (1, 6))
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :5], use_cache=True).cache
        with pytest.warns(FutureWarning, match="past_key_values"):
            out = model(ids[:, 5:], past_key_values=cache, use_cache=True)
    assert out.cache is cache and cache.get_seq_length() == 6
    torch.testing.assert_close(out.logits[:, -1], full[:, -1], rtol=0, atol=ATOL)


def test_chunked_prefill_with_cache_matches_full_forward(make_model: Callable[..., Any]) -> None:
    model = make_model(router_type="star", num_experts_per_tok=2)
    ids = torch.randint(1, 101, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache, start = None, 0
        for size in (4, 3, 1, 2, 2):
            chunk = ids[:, start : start + size]
            out = model(chunk, cache=cache, use_cache=True)
            torch.testing.assert_close(out.logits, full[:, start : start + size], rtol=0, atol=ATOL)
            cache, start = out.cache, start + size
        assert start == ids.shape[1]


def test_incremental_decoding_with_left_padding(make_model: Callable[..., Any]) -> None:
    model = make_model(router_type="star")
    pad = 3
    row0 = torch.randint(1, 101, (9,))
    row1 = torch.randint(1, 101, (12,))
    ids = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), row0]), row1])  # (2, 12)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    prefix = 6
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        alone0 = model(row0[None]).logits[0]  # the padded row on its own, unpadded
        alone1 = model(row1[None]).logits[0]
        # Padding is invisible to the real tokens.
        torch.testing.assert_close(full[0, pad:], alone0, rtol=0, atol=ATOL)
        torch.testing.assert_close(full[1], alone1, rtol=0, atol=ATOL)
        # Without the mask, the pad tokens would be attended to.
        assert (model(ids).logits[0, pad:] - alone0).abs().max() > 1e-3

        out = model(ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True)
        torch.testing.assert_close(out.logits[0, pad:], full[0, pad:prefix], rtol=0, atol=ATOL)
        cache = out.cache
        for t in range(prefix, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
            torch.testing.assert_close(out.logits[:, -1], full[:, t], rtol=0, atol=ATOL)
            torch.testing.assert_close(out.logits[0, -1], alone0[t - pad], rtol=0, atol=ATOL)
            cache = out.cache


@pytest.mark.parametrize("router_type", ["star", "mpi"])
def test_greedy_generate_on_left_padded_batch_equals_each_row_alone(
    router_type: str, make_model: Callable[..., Any]
) -> None:
    model = make_model(router_type=router_type, seed=3)
    prompts = [torch.randint(1, 101, (n,)) for n in (4, 7, 9)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    new = 6
    kwargs = {"max_new_tokens": new, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    assert batched.shape == (3, width + new)
    assert torch.equal(batched[:, :width], ids)
    continuations = []
    for i, p in enumerate(prompts):
        single = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert single.shape == (1, len(p) + new)
        assert batched[i, width:].tolist() == single[0, len(p) :].tolist(), f"row {i}"
        continuations.append(tuple(single[0, len(p) :].tolist()))
        # Greedy decoding is argmax of the full forward at every step.
        with torch.no_grad():
            logits = model(single).logits[0]
        assert single[0, len(p) :].tolist() == logits[len(p) - 1 : -1].argmax(-1).tolist()
    assert len(set(continuations)) > 1, "different prompts should give different continuations"
