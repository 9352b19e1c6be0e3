"""Expert load: how many tokens each MoE layer sent to each expert, kept on the model's device by the
engine thread and read by the metrics at scrape time."""

from __future__ import annotations

import torch

from ..adaptation.capture import expert_load


class ExpertLoad:
    """Cumulative counts, and a recent view that halves every `half_life` tokens, per layer and expert."""

    def __init__(self, layers: int, experts: int, device: torch.device, half_life: float = 4096.0) -> None:
        self.layers, self.experts, self.half_life = layers, experts, half_life
        with torch.inference_mode(False):  # ordinary tensors: updated in inference mode, read outside it
            self.total = torch.zeros(layers, experts, dtype=torch.long, device=device)
            self.recent = torch.zeros(layers, experts, device=device)

    def add(self, expert_indices: tuple[torch.Tensor, ...] | list[torch.Tensor], tokens: torch.Tensor) -> None:
        """Counts a forward's routing: `expert_indices` L x (B, S, k), of which `tokens` (B, S) are real."""
        tokens = tokens.to(expert_indices[0].device, torch.bool)
        one_group = torch.zeros(tokens.shape[0], dtype=torch.long)
        counts = expert_load(list(expert_indices), tokens, one_group, 1, self.experts)[0]  # (L, E)
        decay = torch.pow(0.5, tokens.sum().to(self.recent) / self.half_life)  # on the device: no sync
        self.total += counts
        self.recent.mul_(decay).add_(counts)

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, recent), both (L, E), on the host."""
        return self.total.cpu(), self.recent.float().cpu()
