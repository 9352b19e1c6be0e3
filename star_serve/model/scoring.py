"""How well a model does on token sequences with given routing bases, without labels: the mean next-token
loss of a causal LM, the mean predictive entropy of a classifier (a proxy: lower is a more confident model,
not always a more accurate one). Every row of a bank of bases is scored on the same sequences in one
batched forward, so that candidate, current and trained bases are compared on exactly the same tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .modeling import StarMoeForCausalLM, StarMoeForSequenceClassification, StarMoePreTrainedModel

BATCH_TOKENS = 8192  # padded tokens per forward at most


@torch.inference_mode()
def score_sequences(
    model: StarMoePreTrainedModel,
    sequences: list[torch.Tensor],  # each (S_i,) token ids
    bank: torch.Tensor,  # (T, L, E, D): the bases to score, one row each
) -> list[float]:
    """Each bank row's score on `sequences`: mean next-token loss (nats/token) for a causal LM, mean
    predictive entropy (nats/sequence) for a classifier. Lower is better for both."""
    if not sequences:
        raise ValueError("no sequences to score")
    device = next(model.parameters()).device
    rows = bank.shape[0]
    bank = bank.to(device, model.dtype)
    total, count = torch.zeros(rows, dtype=torch.float64), 0
    for chunk in _chunks(sorted(sequences, key=len), BATCH_TOKENS // rows):
        ids, mask = _padded(chunk, device)  # (B, S)
        b = ids.shape[0]
        tenant = torch.arange(rows, device=device).repeat_interleave(b)  # (T*B,): every row on every sequence
        ids, mask = ids.repeat(rows, 1), mask.repeat(rows, 1)
        if isinstance(model, StarMoeForCausalLM):
            logits = model(input_ids=ids, attention_mask=mask, router_bank=bank, tenant_index=tenant).logits
            losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
            losses = (losses * mask[:, 1:]).sum(1)  # (T*B,)
            count += int(mask[:b, 1:].sum())
        elif isinstance(model, StarMoeForSequenceClassification):
            logits = model(input_ids=ids, attention_mask=mask, router_bank=bank, tenant_index=tenant).logits
            losses = torch.special.entr(logits.float().softmax(-1)).sum(-1)  # (T*B,) predictive entropy
            count += b
        else:
            raise TypeError(f"cannot score a {type(model).__name__}")
        total += losses.view(rows, b).sum(1).double().cpu()
    return (total / max(count, 1)).tolist()


def _chunks(sequences: list[torch.Tensor], tokens: int) -> list[list[torch.Tensor]]:
    """Sequences (sorted by length) in groups of at most `tokens` padded tokens (at least one each)."""
    chunks: list[list[torch.Tensor]] = [[]]
    for seq in sequences:
        if chunks[-1] and (len(chunks[-1]) + 1) * len(seq) > tokens:
            chunks.append([])
        chunks[-1].append(seq)
    return chunks


def _padded(sequences: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) ids, right-padded with 0, and the (B, S) mask of real tokens."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    return ids.to(device), mask.to(device, torch.long)
