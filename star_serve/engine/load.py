"""Expert load: how many tokens each MoE layer sent to each expert, kept on the model's device by the
engine thread and read by the metrics at scrape time."""

from __future__ import annotations

import torch


class ExpertLoad:
    """Cumulative counts, and a recent view that halves every `half_life` tokens, per layer and expert."""

    def __init__(self, layers: int, experts: int, device: torch.device, half_life: float = 4096.0) -> None:
        self.layers, self.experts, self.half_life = layers, experts, half_life
        with torch.inference_mode(False):  # ordinary tensors: updated in inference mode, read outside it
            self.total = torch.zeros(layers, experts, dtype=torch.long, device=device)
            self.recent = torch.zeros(layers, experts, device=device)

    def add(self, expert_indices: tuple[torch.Tensor, ...] | list[torch.Tensor], tokens: torch.Tensor) -> None:
        """Counts a forward's routing: `expert_indices` L x (B, S, k), of which `tokens` (B, S), on the host,
        are real. A decode step's tokens are all real, and are counted without a mask."""
        real = int(tokens.sum())
        indices = torch.stack(list(expert_indices))  # (L, B, S, k)
        if real != tokens.numel():
            indices = indices[:, tokens.to(indices.device, torch.bool)]  # (L, N, k)
        layers = len(expert_indices)
        offsets = torch.arange(0, layers * self.experts, self.experts, device=indices.device)
        keys = indices.reshape(layers, -1) + offsets[:, None]  # each layer's experts numbered apart
        counts = torch.bincount(keys.reshape(-1), minlength=layers * self.experts).view(layers, self.experts)
        self.total += counts
        self.recent.mul_(0.5 ** (real / self.half_life)).add_(counts)

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, recent), both (L, E), on the host."""
        return self.total.cpu(), self.recent.float().cpu()
