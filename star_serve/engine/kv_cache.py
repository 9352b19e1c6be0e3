"""A slot-based KV cache for continuous batching.

Each running sequence owns one slot of a preallocated (slots, heads, max_len, head_dim) buffer per layer.
A forward names the slots it runs (any subset, in any order) and where each sequence starts, so sequences
of different lengths join and leave the batch at every step without moving anyone else's cache.
"""

from __future__ import annotations

import torch

from ..model import StarMoeConfig


class SlotKVCache:
    def __init__(
        self, config: StarMoeConfig, max_slots: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (max_slots, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_slots, self.max_len = max_slots, max_len
        self.device = device
        self._slots = torch.zeros(0, dtype=torch.long, device=device)
        self._positions = torch.zeros(0, 0, dtype=torch.long, device=device)
        self._span = 0

    def bind(self, slots: torch.Tensor, starts: torch.Tensor, query_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepares a forward over `slots` (B,) whose new tokens start at `starts` (B,).

        Returns the position ids (B, S) and the attention mask (B, 1, S, K): a query sees the keys at and
        before its own position in its own slot.
        """
        self._slots = slots.to(self.device)
        self._positions = starts.to(self.device)[:, None] + torch.arange(query_len, device=self.device)  # (B, S)
        self._span = int(self._positions.max()) + 1
        if self._span > self.max_len:
            raise ValueError(f"sequence of {self._span} tokens exceeds the cache length {self.max_len}")
        keys = torch.arange(self._span, device=self.device)
        mask = keys[None, None, :] <= self._positions[:, :, None]  # (B, S, K)
        return self._positions, mask[:, None]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new (B, H, S, hd) keys and values into their slots; returns each slot's (B, H, K, hd)."""
        slots = self._slots[:, None].expand_as(self._positions)  # (B, S)
        self.keys[layer_idx][slots, :, self._positions] = key.transpose(1, 2)
        self.values[layer_idx][slots, :, self._positions] = value.transpose(1, 2)
        span = slice(0, self._span)
        return self.keys[layer_idx][self._slots, :, span], self.values[layer_idx][self._slots, :, span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._span
