"""A slot-based KV cache for continuous batching.

Each running sequence owns one slot of a preallocated (slots, heads, max_len, head_dim) buffer per layer.
A forward names the slots it runs (any subset, in any order) and where each sequence starts, so sequences
of different lengths join and leave the batch at every step without moving anyone else's cache. Attention
reads a forward's slots in place where they are a run of consecutive slots in order (the engine arranges
that as far as it can), and gathers them otherwise.
"""

from __future__ import annotations

import torch

from ..model import StarMoeConfig


class SlotKVCache:
    def __init__(
        self, config: StarMoeConfig, max_slots: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        # (slots, max_len, heads, head_dim): position-major within a slot, so that the new tokens of a forward
        # are written with one index_copy_ into a flat (slots * max_len) view.
        shape = (max_slots, max_len, config.num_key_value_heads, config.head_dim)
        layers = config.num_hidden_layers
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.max_slots, self.max_len = max_slots, max_len
        self.device = device
        self._bound: SlotBinding | None = None

    def binding(self, slots: torch.Tensor, starts: torch.Tensor, query_len: int) -> SlotBinding:
        """The cache as one batch of a forward sees it: the sequences in `slots` (B,), whose new tokens start at
        `starts` (B,). Batches of one forward bind disjoint slots, each with its own binding."""
        return SlotBinding(self, slots, starts, query_len)

    def bind(self, slots: torch.Tensor, starts: torch.Tensor, query_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepares a forward over `slots` (B,) whose new tokens start at `starts` (B,), with the cache itself
        as the model's `cache`.

        Returns the position ids (B, S) and the attention mask (B, 1, S, K): a query sees the keys at and
        before its own position in its own slot.
        """
        self._bound = self.binding(slots, starts, query_len)
        return self._bound.positions, self._bound.mask

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._bound is not None, "bind() first"
        return self._bound.update(key, value, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._bound.span if self._bound is not None else 0


class SlotBinding:
    """One batch's view of a `SlotKVCache`, passed to the model as its `cache`: the positions and mask of its
    new tokens, where they are written, and what its attention reads."""

    def __init__(self, cache: SlotKVCache, slots: torch.Tensor, starts: torch.Tensor, query_len: int) -> None:
        device = cache.device
        self.cache, self.slots = cache, slots.to(device)
        first, count = int(slots[0]) if len(slots) else 0, len(slots)
        consecutive = bool(torch.equal(slots.cpu(), torch.arange(first, first + count)))
        self.run = slice(first, first + count) if consecutive else None  # read in place where set
        self.positions = starts.to(device)[:, None] + torch.arange(query_len, device=device)  # (B, S)
        self.span = int(self.positions.max()) + 1
        if self.span > cache.max_len:
            raise ValueError(f"sequence of {self.span} tokens exceeds the cache length {cache.max_len}")
        self.rows = (self.slots[:, None] * cache.max_len + self.positions).reshape(-1)  # (B*S,) in the flat view
        keys = torch.arange(self.span, device=device)
        self.mask = (keys[None, None, :] <= self.positions[:, :, None])[:, None]  # (B, 1, S, K)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new (B, H, S, hd) keys and values into their slots; returns each slot's (B, H, K, hd)."""
        return self._write(self.cache.keys[layer_idx], key), self._write(self.cache.values[layer_idx], value)

    def _write(self, cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        heads, head_dim = cache.shape[2:]
        flat = cache.view(-1, heads, head_dim)  # (slots * max_len, H, hd)
        flat.index_copy_(0, self.rows, new.transpose(1, 2).reshape(-1, heads, head_dim).to(cache.dtype))
        if self.run is not None:  # a view: no copy of the slots' keys and values
            return cache[self.run, : self.span].transpose(1, 2)  # (B, H, K, hd)
        return cache[:, : self.span].index_select(0, self.slots).transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.span
