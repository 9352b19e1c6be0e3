"""The slot KV cache: sequences prefilled right-padded into chosen slots and decoded in any slot order give
the same logits as each sequence run alone, and never touch each other's slots."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from star_serve.engine.kv_cache import SlotKVCache
from star_serve.model.modeling import Batch
from star_serve.model.routing import TRAINED, Routing

CPU = torch.device("cpu")


def _cache(model: Any, slots: int = 5, max_len: int = 24) -> SlotKVCache:
    cache = SlotKVCache(model.config, slots, max_len, CPU, torch.float32)
    for layer in range(model.config.num_hidden_layers):  # stale garbage that masking must hide
        cache.keys[layer].normal_(generator=torch.Generator().manual_seed(layer))
        cache.values[layer].normal_(generator=torch.Generator().manual_seed(100 + layer))
    return cache


@torch.no_grad()
def _alone_last_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(ids[None], use_cache=False).logits[0, -1]


@torch.no_grad()
def _forward(model: Any, cache: SlotKVCache, ids: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
    positions, mask = cache.bind(torch.tensor(slots), torch.tensor(starts), ids.shape[1])
    out = model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache, use_cache=True)
    return out.logits


def test_bind_returns_positions_and_a_per_slot_causal_mask(lm: Any) -> None:
    cache = _cache(lm)
    positions, mask = cache.bind(torch.tensor([4, 1]), torch.tensor([0, 3]), 2)
    assert positions.tolist() == [[0, 1], [3, 4]]
    assert mask.shape == (2, 1, 2, 5)
    assert mask[0, 0].tolist() == [[True, False, False, False, False], [True, True, False, False, False]]
    assert mask[1, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert cache.get_seq_length() == 5


def test_prefill_in_chosen_slots_then_decode_in_any_order_equals_each_sequence_alone(lm: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = lm.config.vocab_size
    lengths, slots = [5, 9, 3], [3, 0, 4]
    # Each sequence: its prompt, then two tokens fed one at a time by two decode steps.
    seqs = [torch.randint(1, vocab, (n + 2,), generator=gen) for n in lengths]
    cache = _cache(lm)

    width = max(lengths)
    ids = torch.full((3, width), lm.config.pad_token_id)
    for i, n in enumerate(lengths):
        ids[i, :n] = seqs[i][:n]
    logits = _forward(lm, cache, ids, slots, [0, 0, 0])
    for i, n in enumerate(lengths):
        torch.testing.assert_close(logits[i, n - 1], _alone_last_logits(lm, seqs[i][:n]), rtol=0, atol=1e-5)

    # First decode: every slot, in an order unrelated to the prefill's.
    order = [2, 0, 1]
    ids = torch.stack([seqs[i][lengths[i]] for i in order])[:, None]
    logits = _forward(lm, cache, ids, [slots[i] for i in order], [lengths[i] for i in order])
    for row, i in enumerate(order):
        expected = _alone_last_logits(lm, seqs[i][: lengths[i] + 1])
        torch.testing.assert_close(logits[row, 0], expected, rtol=0, atol=1e-5)

    # Second decode: a subset, reversed; the slot left out must not change.
    untouched = [cache.keys[layer][slots[0]].clone() for layer in range(lm.config.num_hidden_layers)]
    order = [2, 1]
    ids = torch.stack([seqs[i][lengths[i] + 1] for i in order])[:, None]
    logits = _forward(lm, cache, ids, [slots[i] for i in order], [lengths[i] + 1 for i in order])
    for row, i in enumerate(order):
        torch.testing.assert_close(logits[row, 0], _alone_last_logits(lm, seqs[i]), rtol=0, atol=1e-5)
    for layer, before in enumerate(untouched):
        assert torch.equal(cache.keys[layer][slots[0]], before)


def test_consecutive_slots_read_in_place_give_the_same_logits_as_gathered_ones(lm: Any) -> None:
    """Slots 1-3 in order are read as a view of the cache, any other choice is gathered: the logits agree with
    each sequence run alone either way, and the slots outside the run are never read."""
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, lm.config.vocab_size, (9,), generator=gen) for _ in range(3)]
    cache = _cache(lm)
    logits = _forward(lm, cache, torch.stack([s[:6] for s in seqs]), [1, 2, 3], [0, 0, 0])
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(logits[i, -1], _alone_last_logits(lm, seq[:6]), rtol=0, atol=1e-5)
    for layer in range(lm.config.num_hidden_layers):  # garbage where no sequence lives must not matter
        for stale in (cache.keys[layer], cache.values[layer]):
            stale[[0, 4]] = float("nan")
    for step, rows in enumerate(([0, 1, 2], [1, 2], [2, 1])):  # in place, in place, gathered
        position = 6 + step
        ids = torch.stack([seqs[i][position] for i in rows])[:, None]
        logits = _forward(lm, cache, ids, [1 + i for i in rows], [position] * len(rows))
        for row, i in enumerate(rows):
            expected = _alone_last_logits(lm, seqs[i][: position + 1])
            torch.testing.assert_close(logits[row, 0], expected, rtol=0, atol=1e-5)


def test_a_reused_slot_forgets_its_previous_sequence(lm: Any) -> None:
    gen = torch.Generator().manual_seed(1)
    cache = _cache(lm)
    old = torch.randint(1, lm.config.vocab_size, (12,), generator=gen)
    new = torch.randint(1, lm.config.vocab_size, (5,), generator=gen)
    _forward(lm, cache, old[None], [2], [0])
    logits = _forward(lm, cache, new[None, :4], [2], [0])
    torch.testing.assert_close(logits[0, -1], _alone_last_logits(lm, new[:4]), rtol=0, atol=1e-5)
    logits = _forward(lm, cache, new[None, 4:], [2], [4])
    torch.testing.assert_close(logits[0, -1], _alone_last_logits(lm, new), rtol=0, atol=1e-5)


def test_exceeding_the_cache_length_raises(lm: Any) -> None:
    cache = _cache(lm, max_len=8)
    positions, _ = cache.bind(torch.tensor([0]), torch.tensor([7]), 1)  # the last position still fits
    assert positions.tolist() == [[7]]
    with pytest.raises(ValueError, match="exceeds the cache length"):
        cache.bind(torch.tensor([0]), torch.tensor([7]), 2)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        cache.bind(torch.tensor([1, 0]), torch.tensor([0, 8]), 1)


@torch.no_grad()
def test_a_prefill_and_decodes_in_one_forward_equal_each_batch_alone(lm: Any) -> None:
    """`forward_batches`, as a step runs its prefills beside its decodes: each batch attends over its own
    slots and routes with its own bases, and gives the hidden states, routing and keys that it gives alone."""
    gen = torch.Generator().manual_seed(3)
    vocab = lm.config.vocab_size
    seqs = [torch.randint(1, vocab, (7,), generator=gen) for _ in range(2)]
    newcomer = torch.randint(1, vocab, (1, 5), generator=gen)
    decoded = torch.stack([s[6:] for s in seqs])
    bases = lm.trained_bases()
    tenant = Routing.shared(bases + 0.3 * torch.randn(bases.shape, generator=gen))  # routes otherwise
    together, alone = _cache(lm), _cache(lm)
    for cache in (together, alone):
        _forward(lm, cache, torch.stack([s[:6] for s in seqs]), [0, 1], [0, 0])

    def by_itself(ids: torch.Tensor, slots: list[int], starts: list[int], routing: Routing) -> Any:
        positions, mask = alone.bind(torch.tensor(slots), torch.tensor(starts), ids.shape[1])
        kwargs = {"position_ids": positions, "attention_mask": mask, "cache": alone, "use_cache": True}
        return lm.model(ids, routing=routing, output_routing=True, **kwargs)

    prefill = together.binding(torch.tensor([3]), torch.tensor([0]), 5)
    decode = together.binding(torch.tensor([0, 1]), torch.tensor([6, 6]), 1)
    outs = lm.model.forward_batches(
        [
            Batch(newcomer, prefill.positions, prefill.mask, prefill),
            Batch(decoded, decode.positions, decode.mask, decode, tenant),
        ]
    )
    expected = [by_itself(newcomer, [3], [0], TRAINED), by_itself(decoded, [0, 1], [6, 6], tenant)]
    for out, reference in zip(outs, expected, strict=True):
        torch.testing.assert_close(out.last_hidden_state, reference.last_hidden_state, rtol=0, atol=1e-5)
        for ours, theirs in zip(out.expert_indices, reference.expert_indices, strict=True):
            assert torch.equal(ours, theirs)
        for ours, theirs in zip(out.router_inputs, reference.router_inputs, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    for layer in range(lm.config.num_hidden_layers):
        written = together.keys[layer][[0, 1, 3], :7], alone.keys[layer][[0, 1, 3], :7]
        torch.testing.assert_close(*written, rtol=0, atol=1e-5)
    # the tenant's bases did route the decodes: with the trained ones their experts differ
    trained = by_itself(decoded, [0, 1], [6, 6], TRAINED)
    assert any(not torch.equal(a, b) for a, b in zip(trained.expert_indices, outs[1].expert_indices, strict=True))
