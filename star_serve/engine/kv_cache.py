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
        self._slots = torch.zeros(0, dtype=torch.long, device=device)
        self._rows = torch.zeros(0, dtype=torch.long, device=device)
        self._run: slice | None = None  # the forward's slots, where they are consecutive and in order
        self._span = 0

    def bind(self, slots: torch.Tensor, starts: torch.Tensor, query_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepares a forward over `slots` (B,) whose new tokens start at `starts` (B,).

        Returns the position ids (B, S) and the attention mask (B, 1, S, K): a query sees the keys at and
        before its own position in its own slot.
        """
        self._slots = slots.to(self.device)
        first, count = int(slots[0]) if len(slots) else 0, len(slots)
        consecutive = bool(torch.equal(slots.cpu(), torch.arange(first, first + count)))
        self._run = slice(first, first + count) if consecutive else None
        positions = starts.to(self.device)[:, None] + torch.arange(query_len, device=self.device)  # (B, S)
        self._span = int(positions.max()) + 1
        if self._span > self.max_len:
            raise ValueError(f"sequence of {self._span} tokens exceeds the cache length {self.max_len}")
        self._rows = (self._slots[:, None] * self.max_len + positions).reshape(-1)  # (B*S,) in the flat view
        keys = torch.arange(self._span, device=self.device)
        mask = keys[None, None, :] <= positions[:, :, None]  # (B, S, K)
        return positions, mask[:, None]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new (B, H, S, hd) keys and values into their slots; returns each slot's (B, H, K, hd)."""
        return self._write(self.keys[layer_idx], key), self._write(self.values[layer_idx], value)

    def _write(self, cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        heads, head_dim = cache.shape[2:]
        flat = cache.view(-1, heads, head_dim)  # (slots * max_len, H, hd)
        flat.index_copy_(0, self._rows, new.transpose(1, 2).reshape(-1, heads, head_dim).to(cache.dtype))
        if self._run is not None:  # a view: no copy of the slots' keys and values
            return cache[self._run, : self._span].transpose(1, 2)  # (B, H, K, hd)
        return cache[:, : self._span].index_select(0, self._slots).transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._span
