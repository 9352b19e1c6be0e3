"""Prefix caching: the keys and values of prompt blocks kept after their prefill, for later prompts that start
with the same tokens and route with the same bases.

With STAR routing, layer k's keys and values depend on how the layers below routed, hence on the bases a
sequence routed with. So a block is keyed by the whole prompt up to its end *and* by those bases: the
trained bases, shared by every tenant that has none of its own (`TRAINED_BASES`), or one tenant's version
(`(tenant, version)`). A tenant's new version never meets the blocks of the one before, and two tenants
with different bases never share a block. Keys are BLAKE2 digests chained block by block, so a prompt
cannot be crafted to collide with another's.

Blocks are `block_size` tokens in a pool of `blocks`, per layer; the least recently used are reused first.
A hit is copied into the sequence's KV-cache slot before its prefill, which then starts after it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

from ..model import StarMoeConfig
from .kv_cache import SlotKVCache

TRAINED_BASES = "trained"


class PrefixCache:
    def __init__(
        self, config: StarMoeConfig, blocks: int, block_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.block_size, self.capacity = block_size, blocks
        self._blocks: OrderedDict[bytes, int] = OrderedDict()  # digest -> block, least recently used first
        self._free = list(range(blocks - 1, -1, -1))
        self.device = device
        self.hit_tokens = 0  # prompt tokens whose prefill a hit saved
        self.queried_tokens = 0  # prompt tokens looked up

    def __len__(self) -> int:
        return len(self._blocks)

    def digests(self, bases: Hashable, tokens: Sequence[int]) -> list[bytes]:
        """One digest per full block of `tokens` routed with `bases`: each covers the block and all before it."""
        digests: list[bytes] = []
        parent = hashlib.blake2b(repr(bases).encode(), digest_size=16).digest()
        size = self.block_size
        for start in range(0, len(tokens) - size + 1, size):
            block = array("q", tokens[start : start + size]).tobytes()
            parent = hashlib.blake2b(parent + block, digest_size=16).digest()
            digests.append(parent)
        return digests

    def match(self, digests: Sequence[bytes], prompt_len: int) -> list[int]:
        """The cached blocks of the longest run of `digests` from the first, leaving at least the prompt's last
        token to compute (its logits start the generation)."""
        usable = min(len(digests), (prompt_len - 1) // self.block_size)
        found: list[int] = []
        for digest in digests[:usable]:
            block = self._blocks.get(digest)
            if block is None:
                break
            found.append(block)
        self._touch(digests[: len(found)])
        self.queried_tokens += prompt_len
        self.hit_tokens += len(found) * self.block_size
        return found

    def load(self, blocks: Sequence[int], cache: SlotKVCache, slot: int) -> None:
        """Copies `blocks` into the first positions of `slot` of the KV cache."""
        if not blocks:
            return
        index = torch.tensor(blocks, device=self.device)
        n = len(blocks) * self.block_size
        for mine, theirs in ((self.keys, cache.keys), (self.values, cache.values)):
            for layer, pool in enumerate(mine):
                theirs[layer][slot, :n] = pool.index_select(0, index).flatten(0, 1)

    def store(self, digests: Sequence[bytes], cache: SlotKVCache, slot: int) -> None:
        """Keeps the blocks of `slot` that `digests` name and the cache lacks, reusing the least recently used."""
        size = self.block_size
        for i, digest in enumerate(digests):
            if digest in self._blocks:
                continue
            if self._free:
                block = self._free.pop()
            else:
                _, block = self._blocks.popitem(last=False)
            self._blocks[digest] = block
            for mine, theirs in ((self.keys, cache.keys), (self.values, cache.values)):
                for layer, pool in enumerate(mine):
                    pool[block] = theirs[layer][slot, i * size : (i + 1) * size]
        self._touch(digests)

    def _touch(self, digests: Sequence[bytes]) -> None:
        """Marks a prompt's blocks used, its first block last: a block is never older than those after it, so
        eviction takes a prompt's tail before its head, which other prompts are likelier to share."""
        for digest in reversed(digests):
            if digest in self._blocks:
                self._blocks.move_to_end(digest)
