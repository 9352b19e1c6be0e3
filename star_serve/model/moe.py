"""The sparse MoE feed-forward block: a STAR router, top-k selection and grouped SwiGLU experts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import StarMoeConfig
from .packing import pack, packable, packed_linear, uses_packed
from .router import StarMoeRouter


class StarMoeExperts(nn.Module):
    """E SwiGLU experts with stacked weights, so that dispatch is one gather and E matmuls."""

    def __init__(self, config: StarMoeConfig) -> None:
        super().__init__()
        e, d, f = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        self._packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # see pack_for_cpu
        self._transposed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # per expert

    def pack_for_cpu(self) -> bool:
        """Keeps a copy of each expert's weights packed for the few rows an expert gets per decode step
        (`packing.py`), where that pays. True if packed. Experts too small to pack are kept a second time
        transposed, (in, out), where MKL multiplies a few rows by them faster: the demo LM's 8 experts at a
        decode step of 32 tokens, 553 -> 470 us a layer."""
        if not packable(self.gate_up_proj[0]):
            if self.gate_up_proj.device.type == "cpu" and self.gate_up_proj.dtype == torch.float32:
                with torch.no_grad():  # each expert's own tensor: no indexing of a stack at every step
                    self._transposed = (
                        list(self.gate_up_proj.detach().transpose(1, 2).contiguous().unbind()),
                        list(self.down_proj.detach().transpose(1, 2).contiguous().unbind()),
                    )
            return False
        self._packed = [
            (pack(gate_up), pack(down)) for gate_up, down in zip(self.gate_up_proj, self.down_proj, strict=True)
        ]
        return True

    def _expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and uses_packed(rows):
            gate_up, down = self._packed[e]
            gate, up = packed_linear(rows, gate_up).chunk(2, dim=-1)
            return packed_linear(F.silu(gate) * up, down)
        if self._transposed is not None and not torch.is_grad_enabled():
            gate, up = torch.mm(rows, self._transposed[0][e]).chunk(2, dim=-1)
            return torch.mm(F.silu(gate) * up, self._transposed[1][e])
        gate, up = F.linear(rows, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(
        self,
        x: torch.Tensor,  # (N, D)
        expert_indices: torch.Tensor,  # (N, k)
        weights: torch.Tensor,  # (N, k)
    ) -> torch.Tensor:
        n, k = expert_indices.shape
        if n == 0:
            return torch.zeros_like(x)
        flat = expert_indices.reshape(-1)  # (N*k,)
        order = flat.argsort(stable=True)
        token_of = order // k  # which token each grouped row belongs to
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        grouped = x[token_of]  # (N*k, D), rows of one expert contiguous
        outputs = []
        for e, rows in enumerate(grouped.split(counts)):
            if rows.shape[0] == 0:
                continue
            outputs.append(self._expert(e, rows))
        routed = torch.cat(outputs) * weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, routed)


class MoeOutput(NamedTuple):
    hidden_states: torch.Tensor  # (B, S, D)
    router_logits: torch.Tensor  # (B*S, E)
    expert_indices: torch.Tensor  # (B, S, k)


class StarMoeSparseBlock(nn.Module):
    """Routes each token to its top-k experts. Softmax over all E experts, then top-k; with k > 1 the
    selected probabilities are used as they are, without renormalisation (the reference's convention)."""

    def __init__(self, config: StarMoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = StarMoeRouter(config)
        self.experts = StarMoeExperts(config)

    def forward(
        self,
        x: torch.Tensor,  # (B, S, D)
        bases: torch.Tensor | None = None,  # (B, E, D)
        token_mask: torch.Tensor | None = None,  # (B, S)
        gate: torch.Tensor | None = None,  # (B, E, D) or (E, D): the router's gate folded beforehand
    ) -> MoeOutput:
        b, s, d = x.shape
        if self.training and self.router.router_type == "mpi":
            self.router.power_retract(self.experts.gate_up_proj)
        logits = self.router(x, bases=bases, token_mask=token_mask, gate=gate)  # (B, S, E)
        out, indices = self._experts(x.reshape(-1, d), logits.reshape(b * s, -1))
        return MoeOutput(out.reshape(b, s, d), logits.reshape(b * s, -1), indices.reshape(b, s, -1))

    def forward_batches(
        self,
        x: torch.Tensor,  # (T, D): the tokens of every batch, batch after batch
        batches: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]],  # (x (B, S, D), bases, gate)
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Several batches at once, each routed with its own bases or gate, every token through the experts
        together. Returns the outputs (T, D), and each batch's router logits (B*S, E) and experts (B, S, k)."""
        logits = [
            self.router(part, bases=bases, gate=gate).reshape(-1, self.router.num_experts)
            for part, bases, gate in batches
        ]
        out, indices = self._experts(x, logits[0] if len(logits) == 1 else torch.cat(logits))
        sizes = [part.shape[0] * part.shape[1] for part, _, _ in batches]
        chosen = [
            i.reshape(part.shape[0], part.shape[1], -1)
            for i, (part, _, _) in zip(indices.split(sizes), batches, strict=True)
        ]
        return out, logits, chosen

    def _experts(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) tokens through their top-k experts by their router logits (N, E); the outputs and the experts."""
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        return self.experts(x, indices, weights), indices
