"""Each tenant's live quality, measured during prefill (`adaptation/live.py` says what is kept and why): the
next-token loss of a sampled share of prompts from the hidden states of the forward that served them, the
LM head applied to those prompts' positions only; a smaller share is routed again with the trained bases,
in a forward of its own that touches no KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..adaptation.live import LiveQuality
from ..model.routing import TRAINED


class PrefillMeter:
    def __init__(self, live: LiveQuality, backbone: nn.Module, lm_head: nn.Module, device: torch.device) -> None:
        self.live, self.backbone, self.lm_head, self.device = live, backbone, lm_head, device

    def __call__(
        self,
        tenants: list[str],
        versions: list[int],  # the version that served each prompt (0: the trained bases)
        ids: torch.Tensor,  # (B, S) prompts, right-padded
        real: torch.Tensor,  # (B, S): 1 or True where not padding
        hidden: torch.Tensor,  # (B, S, D) the served forward's last hidden states
        whole: list[bool] | None = None,  # False: the prompt's first tokens came from the prefix cache
    ) -> None:
        real = real.bool()
        whole = whole or [True] * len(tenants)
        measured = [i for i in range(len(tenants)) if whole[i] and int(real[i].sum()) > 1 and self.live.measure()]
        if not measured:
            return
        rows = torch.tensor(measured)
        served, tokens = self.losses(hidden[rows.to(hidden.device)], ids[rows], real[rows])
        shadowed = [j for j, i in enumerate(measured) if versions[i] > 0 and self.live.shadow()]
        trained: dict[int, float] = {}
        if shadowed:
            again = rows[torch.tensor(shadowed)]
            out = self.backbone(
                input_ids=ids[again].to(self.device),
                attention_mask=real[again].long().to(self.device),
                use_cache=False,
                routing=TRAINED,
            )
            trained = dict(zip(shadowed, self.losses(out.last_hidden_state, ids[again], real[again])[0], strict=True))
        for j, i in enumerate(measured):
            # Served by the trained bases, a prompt scores the same both ways: no second forward.
            paired = served[j] if versions[i] == 0 else trained.get(j)
            self.live.add(tenants[i], versions[i], served[j], tokens[j], paired)

    def losses(self, hidden: torch.Tensor, ids: torch.Tensor, real: torch.Tensor) -> tuple[list[float], list[int]]:
        """Per prompt, its summed next-token losses (nats) and how many tokens they cover: the LM head on the
        real positions that predict a real token only. `hidden` (m, S, D), `ids` and `real` (m, S)."""
        predicting = real[:, 1:] & real[:, :-1]  # (m, S-1): position s predicts token s + 1
        which = torch.arange(ids.shape[0])[:, None].expand_as(predicting)[predicting]  # (n,)
        logits = self.lm_head(hidden[:, :-1][predicting.to(hidden.device)]).float()  # (n, V)
        losses = F.cross_entropy(logits, ids[:, 1:][predicting].to(logits.device), reduction="none")
        sums = torch.zeros(ids.shape[0], dtype=torch.float64).index_add_(0, which, losses.double().cpu())
        return sums.tolist(), predicting.sum(dim=1).tolist()
